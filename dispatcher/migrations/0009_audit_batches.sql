-- Spine's job store on PostgreSQL, version 9: the audit lines of a commit in one row.
--
-- The lines of the jobs that ended, kept until the audit file holds them, were a row each
-- in spine_audit_outbox: a row and an index entry written, then deleted, per job. Here a
-- commit writes one row with its jobs and their lines, in order; the row goes once the
-- audit file holds its lines (a commit's lines are appended together, so its first job
-- names it). Rows an earlier version left in spine_audit_outbox are still read at a
-- leader's start and deleted as before.
CREATE TABLE spine_audit_batches (
    n     bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    jobs  text[]  COLLATE "C" NOT NULL,
    lines bytea[] NOT NULL
);
-- A batch's lines are JSON of a few hundred bytes each, written once and read only after a
-- crash: stored out of line past 2 kB, uncompressed (no compression work on every commit
-- for bytes read only after a crash).
ALTER TABLE spine_audit_batches ALTER COLUMN lines SET STORAGE EXTERNAL;

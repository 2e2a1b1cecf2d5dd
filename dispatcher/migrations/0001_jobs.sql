-- Spine's job store on PostgreSQL, version 1: the tables of the embedded (redb) store, one
-- for one (docs/dispatcher.md §5). Applied once, in a transaction, by the first dispatcher
-- that starts on the database; recorded in spine_migrations.

-- Job id → the job record as JSON, without its input.
CREATE TABLE spine_jobs (
    id     text  PRIMARY KEY,
    record bytea NOT NULL
);

-- Job id → its inline input, written once with the job (a record changes state several
-- times; a large input is not written again each time).
CREATE TABLE spine_inputs (
    id    text  PRIMARY KEY,
    input bytea NOT NULL
);

-- Submitter NUL key → the job that key created (bytes: text cannot hold the NUL).
CREATE TABLE spine_idempotency (
    key bytea PRIMARY KEY,
    job text NOT NULL
);
CREATE INDEX spine_idempotency_job ON spine_idempotency (job);

-- Agent bare JID → when it last registered (ms since the UNIX epoch): greeted after a start.
CREATE TABLE spine_agents (
    jid     text   PRIMARY KEY,
    seen_ms bigint NOT NULL
);

-- Every capability an agent has offered → when it was first offered (ms).
CREATE TABLE spine_capabilities (
    name     text   PRIMARY KEY,
    first_ms bigint NOT NULL
);

-- Audit lines of jobs that ended, kept with their outcomes until the audit file has them.
CREATE TABLE spine_audit_outbox (
    job  text  PRIMARY KEY,
    line bytea NOT NULL
);

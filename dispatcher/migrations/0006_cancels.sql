-- Spine's job store on PostgreSQL, version 6: cancels asked of a standby, for the leader. A
-- standby writes the job's id here and notifies spine_submitted; the leader cancels the job
-- and deletes the row with its next commit.
CREATE TABLE spine_cancels (
    job   text   PRIMARY KEY,
    at_ms bigint NOT NULL
);

-- Spine's job store on PostgreSQL, version 5: jobs a standby accepted, for the leader. A
-- standby stores a submission like the leader would (spine_jobs, spine_inputs,
-- spine_idempotency) and, in the same transaction, its id here, then notifies the channel
-- spine_submitted; the leader takes the jobs named here into its table and deletes their rows
-- with its next commit. A leader that dies first leaves them for the next, which loads every
-- job anyway.
CREATE TABLE spine_submitted (
    id    text   PRIMARY KEY,
    at_ms bigint NOT NULL
);

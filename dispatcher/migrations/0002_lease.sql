-- Spine's job store on PostgreSQL, version 2: leadership among dispatchers that share the
-- store (dispatcher/src/election.rs). One row: who leads, the epoch (the fencing token, one
-- more at each taking) and when the lease runs out, in the database's clock. A leader's
-- commits check the row in their transaction (FOR SHARE), so a deposed leader stores nothing.
CREATE TABLE spine_lease (
    name       text        PRIMARY KEY,
    holder     text        NOT NULL,
    epoch      bigint      NOT NULL,
    expires_at timestamptz NOT NULL
);
INSERT INTO spine_lease (name, holder, epoch, expires_at)
VALUES ('leader', '', 0, '-infinity');

-- Spine's job store on PostgreSQL, version 7: event rules made over the HTTP API
-- (PUT /v1/rules/{name}), the rule as JSON (name, on, when, do, retry). Rules of the
-- configuration file are not here.
CREATE TABLE spine_rules (
    name       text   PRIMARY KEY,
    config     bytea  NOT NULL,
    updated_ms bigint NOT NULL
);

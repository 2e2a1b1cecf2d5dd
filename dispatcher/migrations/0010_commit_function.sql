-- Spine's job store on PostgreSQL, version 10: a batch's writes in one call.
--
-- A dispatcher's commit was BEGIN, up to twenty statements (one per table, rows as
-- arrays) and COMMIT: two round trips (the COMMIT waited for the checks' answers), and for
-- every statement a message, a portal and a reply of its own at the database. The same
-- writes, in the same order, are now this function, called alone in autocommit: one
-- round trip, one statement, one transaction. Its arrays are the batch's rows; an empty
-- array writes nothing. Either check that fails raises, and nothing of the call is stored:
--   SP001  the lease no longer names p_holder at p_epoch (a deposed leader; p_holder NULL:
--          no check, a lone dispatcher's or a standby's commit);
--   SP002  an idempotency key names another job (a standby accepted the same key first).
CREATE OR REPLACE FUNCTION spine_commit(
    p_holder          text,
    p_epoch           bigint,
    p_audited         text[],
    p_dropped         bytea[],
    p_deleted         text[],
    p_without_input   text[],
    p_ids             text[],
    p_records         bytea[],
    p_with_input      text[],
    p_inputs          bytea[],
    p_idem_keys       bytea[],
    p_idem_jobs       text[],
    p_submitted       text[],
    p_now_ms          bigint,
    p_submitted_notes text[],
    p_adopted         text[],
    p_cancelled       text[],
    p_ended_notes     text[],
    p_audit_jobs      text[],
    p_audit_lines     bytea[],
    p_agents          text[],
    p_seen_ms         bigint[],
    p_caps            text[],
    p_caps_first_ms   bigint[],
    p_rule_names      text[],
    p_rule_configs    bytea[]
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    written bigint;
    note    text;
BEGIN
    IF p_holder IS NOT NULL THEN
        PERFORM 1 FROM spine_lease
            WHERE name = 'leader' AND holder = p_holder AND epoch = p_epoch FOR SHARE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'the lease is no longer %''s at epoch %', p_holder, p_epoch
                USING ERRCODE = 'SP001';
        END IF;
    END IF;
    -- Deletions first (an audit line removed and added in one batch ends added), then writes.
    IF cardinality(p_audited) > 0 THEN
        DELETE FROM spine_audit_outbox WHERE job = ANY(p_audited);
        DELETE FROM spine_audit_batches WHERE jobs[1] = ANY(p_audited);
    END IF;
    IF cardinality(p_dropped) > 0 THEN
        DELETE FROM spine_blob_chunks WHERE sha256 = ANY(p_dropped);
        DELETE FROM spine_blobs WHERE sha256 = ANY(p_dropped);
    END IF;
    IF cardinality(p_deleted) > 0 THEN
        DELETE FROM spine_idempotency WHERE job = ANY(p_deleted);
        DELETE FROM spine_inputs WHERE id = ANY(p_deleted);
        DELETE FROM spine_jobs WHERE id = ANY(p_deleted);
    END IF;
    IF cardinality(p_without_input) > 0 THEN
        DELETE FROM spine_inputs WHERE id = ANY(p_without_input);
    END IF;
    IF cardinality(p_ids) > 0 THEN
        INSERT INTO spine_jobs (id, record) SELECT * FROM UNNEST(p_ids, p_records)
            ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record;
    END IF;
    IF cardinality(p_with_input) > 0 THEN
        INSERT INTO spine_inputs (id, input) SELECT * FROM UNNEST(p_with_input, p_inputs)
            ON CONFLICT (id) DO NOTHING;
    END IF;
    -- A key is written again with each change of its job; one that names another job is
    -- not overwritten, and fails the call.
    IF cardinality(p_idem_keys) > 0 THEN
        INSERT INTO spine_idempotency (key, job) SELECT * FROM UNNEST(p_idem_keys, p_idem_jobs)
            ON CONFLICT (key) DO UPDATE SET job = EXCLUDED.job
            WHERE spine_idempotency.job = EXCLUDED.job;
        GET DIAGNOSTICS written = ROW_COUNT;
        IF written <> cardinality(p_idem_keys) THEN
            RAISE EXCEPTION 'an idempotency key of this batch names another job'
                USING ERRCODE = 'SP002';
        END IF;
    END IF;
    IF cardinality(p_submitted) > 0 THEN
        INSERT INTO spine_submitted (id, at_ms) SELECT id, p_now_ms FROM UNNEST(p_submitted) AS id
            ON CONFLICT DO NOTHING;
        FOREACH note IN ARRAY p_submitted_notes LOOP
            PERFORM pg_notify('spine_submitted', note);
        END LOOP;
    END IF;
    IF cardinality(p_adopted) > 0 THEN
        DELETE FROM spine_submitted WHERE id = ANY(p_adopted);
    END IF;
    IF cardinality(p_cancelled) > 0 THEN
        DELETE FROM spine_cancels WHERE job = ANY(p_cancelled);
    END IF;
    IF cardinality(p_ended_notes) > 0 THEN
        FOREACH note IN ARRAY p_ended_notes LOOP
            PERFORM pg_notify('spine_ended', note);
        END LOOP;
    END IF;
    IF cardinality(p_audit_jobs) > 0 THEN
        INSERT INTO spine_audit_batches (jobs, lines) VALUES (p_audit_jobs, p_audit_lines);
    END IF;
    IF cardinality(p_agents) > 0 THEN
        INSERT INTO spine_agents (jid, seen_ms) SELECT * FROM UNNEST(p_agents, p_seen_ms)
            ON CONFLICT (jid) DO UPDATE
            SET seen_ms = GREATEST(spine_agents.seen_ms, EXCLUDED.seen_ms);
    END IF;
    IF cardinality(p_caps) > 0 THEN
        INSERT INTO spine_capabilities (name, first_ms) SELECT * FROM UNNEST(p_caps, p_caps_first_ms)
            ON CONFLICT (name) DO NOTHING;
    END IF;
    -- Rules made over the API, in order; a NULL configuration deletes the rule.
    FOR i IN 1 .. coalesce(cardinality(p_rule_names), 0) LOOP
        IF p_rule_configs[i] IS NULL THEN
            DELETE FROM spine_rules WHERE name = p_rule_names[i];
        ELSE
            INSERT INTO spine_rules (name, config, updated_ms)
                VALUES (p_rule_names[i], p_rule_configs[i], p_now_ms)
                ON CONFLICT (name) DO UPDATE SET config = EXCLUDED.config,
                                                 updated_ms = EXCLUDED.updated_ms;
        END IF;
    END LOOP;
END
$$;

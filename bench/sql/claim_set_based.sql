-- PROPOSAL (not applied by migrations): a set-based claim_deliveries_text.
-- Based on db/functions/60_relay.sql as of commit 7a50ac1.
--
-- The shipped db/functions/60_relay.sql renders each claimed row in a
-- PL/pgSQL loop: render_event() per row and mint_token() per link, i.e. one
-- single-row INSERT (with three FK checks) per token — ~0.5 ms per delivery
-- on the bench machine, which caps a relay near 2,000 deliveries/s whatever
-- Python does.  This version does the same work with a fixed number of
-- statements per batch: one UPDATE that claims and skips (skip reasons
-- computed in the same pass), one INSERT … SELECT that mints every token of
-- the batch, one SELECT that renders every payload.  Same signature, same
-- rows, same skip reasons, same payload shape (the tests in
-- tests/test_relay.py pass against either version).
--
-- Try it: .venv/bin/python bench/relay.py --sql bench/sql/claim_set_based.sql
-- Adopt it: move the function into db/functions/60_relay.sql.

CREATE OR REPLACE FUNCTION barnum.claim_deliveries_text(
    p_worker text, p_limit int DEFAULT 50, p_lease interval DEFAULT '60 seconds')
RETURNS TABLE (delivery_id bigint, event_id uuid, event_type text, endpoint_id uuid, url text,
               secret text, attempt int, timeout_ms int, payload text, idempotency_key text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
-- The statements below are big; planning them afresh per call (custom
-- plans) costs more than a small batch's whole work.
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := barnum.clock();
    v_tz text;
    v_base text;
    v_ttl interval;
    v_max int;
    ids bigint[];
    expired bigint[];
    c_ids bigint[];
    c_events uuid[];
BEGIN
    IF p_worker IS NULL OR btrim(p_worker) = '' THEN
        PERFORM barnum.fail('BN400', 'worker name is required');
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 10000 THEN
        PERFORM barnum.fail('BN422', format('limit must be between 1 and 10000, got %s', p_limit));
    END IF;
    IF p_lease IS NULL OR p_lease < interval '1 second' OR p_lease > interval '1 hour' THEN
        PERFORM barnum.fail('BN422', format('lease must be between 1 second and 1 hour, got %s', p_lease));
    END IF;

    SELECT array_agg(id) INTO expired FROM (
        SELECT d.id FROM barnum.webhook_deliveries d
         WHERE d.status = 'processing' AND d.locked_until < v_now
         ORDER BY d.locked_until LIMIT p_limit
         FOR UPDATE SKIP LOCKED) x;
    expired := coalesce(expired, '{}');
    SELECT array_agg(id) INTO ids FROM (
        SELECT d.id FROM barnum.webhook_deliveries d
         WHERE d.status = 'pending' AND d.next_attempt_at <= v_now
           -- A disabled endpoint's work waits, untouched, until it is enabled.
           AND EXISTS (SELECT 1 FROM barnum.webhook_endpoints ep
                        WHERE ep.id = d.endpoint_id AND ep.is_active)
         ORDER BY d.next_attempt_at LIMIT p_limit - cardinality(expired)
         FOR UPDATE SKIP LOCKED) x;
    ids := expired || coalesce(ids, '{}');
    IF cardinality(ids) = 0 THEN
        RETURN;
    END IF;

    IF cardinality(expired) > 0 THEN
        INSERT INTO barnum.webhook_attempts (delivery_id, attempt, started_at, error)
        SELECT d.id, d.attempts, v_now, format('lease expired (worker %s)', d.locked_by)
          FROM barnum.webhook_deliveries d WHERE d.id = ANY (expired);
    END IF;

    v_tz := barnum.setting_text('timezone');
    v_base := barnum.public_base_url();
    v_ttl := barnum.setting_interval('token_ttl');
    v_max := barnum.setting_int('max_attempts');

    -- One pass: claim every row; rows that must not go out are settled at
    -- once (skipped with the reason, or dead when a reclaimed lease was the
    -- final attempt).  Skip reasons exactly as render_event() gives them.
    WITH src AS (
        SELECT d.id,
               CASE
                 WHEN d.attempts + 1 > coalesce(ep.max_attempts, v_max)
                   THEN 'dead:lease expired on the final attempt'
                 WHEN e.entity_type = 'patient' THEN coalesce(
                     barnum.patient_block_reason(e.entity_id),
                     CASE WHEN e.event_type = 'patient.reactivation' AND EXISTS (
                               SELECT 1 FROM barnum.appointments x
                                WHERE x.patient_id = e.entity_id AND x.starts_at > v_now
                                  AND x.status IN ('scheduled', 'pre_confirmed', 'confirmed'))
                          THEN 'patient has a future appointment' END,
                     CASE WHEN w.id IS NOT NULL AND w.status NOT IN ('pending', 'sent')
                          THEN format('workflow %s', w.status) END)
                 WHEN a.id IS NULL THEN 'appointment not found'
                 ELSE coalesce(barnum.patient_block_reason(a.patient_id),
                               barnum.appointment_event_stale(e.event_type, a, w, v_now))
               END AS reason
          FROM barnum.webhook_deliveries d
          JOIN barnum.whatsapp_events e ON e.id = d.event_id
          JOIN barnum.webhook_endpoints ep ON ep.id = d.endpoint_id
          LEFT JOIN barnum.appointments a ON e.entity_type = 'appointment' AND a.id = e.entity_id
          LEFT JOIN barnum.whatsapp_workflows w ON w.id = e.workflow_id
         WHERE d.id = ANY (ids)
    ), upd AS (
        UPDATE barnum.webhook_deliveries d
           SET attempts = d.attempts + 1,
               status = CASE WHEN src.reason IS NULL THEN 'processing'
                             WHEN src.reason LIKE 'dead:%' THEN 'dead_letter' ELSE 'skipped' END,
               locked_by = CASE WHEN src.reason IS NULL THEN p_worker END,
               locked_until = CASE WHEN src.reason IS NULL THEN v_now + p_lease END,
               last_error = CASE WHEN src.reason IS NULL THEN d.last_error
                                 ELSE regexp_replace(src.reason, '^dead:', '') END
          FROM src
         WHERE d.id = src.id
        RETURNING d.id, d.event_id, src.reason
    )
    SELECT array_agg(upd.id) FILTER (WHERE upd.reason IS NULL), array_agg(upd.event_id)
      INTO c_ids, c_events
      FROM upd;

    PERFORM barnum.refresh_events(c_events);
    IF c_ids IS NULL THEN
        RETURN;
    END IF;

    -- Every token of the batch in one INSERT; the plain token only travels
    -- on into the payload.
    RETURN QUERY
    WITH c AS MATERIALIZED (
        SELECT d.id AS d_id, d.attempts AS d_attempt, d.endpoint_id AS ep_id, e AS ev, a AS ap
          FROM barnum.webhook_deliveries d
          JOIN barnum.whatsapp_events e ON e.id = d.event_id
          LEFT JOIN barnum.appointments a ON e.entity_type = 'appointment' AND a.id = e.entity_id
         WHERE d.id = ANY (c_ids)
    ), toks AS MATERIALIZED (
        SELECT c.d_id, lt, (c.ap).id AS appt_id, (c.ap).patient_id AS patient_id,
               (c.ev).workflow_id AS workflow_id,
               rtrim(translate(encode(barnum.random_bytes(32), 'base64'), E'+/\n', '-_'), '=') AS tok
          FROM c
         CROSS JOIN LATERAL unnest(barnum.event_link_types((c.ev).event_type)) AS lt
         WHERE (c.ap).id IS NOT NULL
    ), minted AS (
        INSERT INTO barnum.whatsapp_action_tokens
            (token_hash, action_type, appointment_id, patient_id, workflow_id, metadata, expires_at)
        SELECT barnum.token_hash(toks.tok), toks.lt, toks.appt_id, toks.patient_id, toks.workflow_id,
               NULL, v_now + v_ttl
          FROM toks
    ), links AS (
        SELECT toks.d_id,
               jsonb_object_agg(toks.lt, v_base || '/api/action?type=' || toks.lt || '&token=' || toks.tok) AS l
          FROM toks GROUP BY toks.d_id
    )
    SELECT c.d_id, (c.ev).id, (c.ev).event_type, c.ep_id,
           replace(ep.url, '{event_type}', (c.ev).event_type), ep.secret, c.d_attempt, ep.timeout_ms,
           (jsonb_build_object(
               'event_id', (c.ev).id, 'event_type', (c.ev).event_type, 'entity_id', (c.ev).entity_id,
               'created_at', to_char((c.ev).created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
               'workflow_id', (c.ev).workflow_id)
            || CASE WHEN (c.ev).data <> '{}' THEN jsonb_build_object('data', (c.ev).data) ELSE '{}' END
            || CASE WHEN (c.ev).entity_type = 'patient' THEN jsonb_build_object(
                        'patient', (SELECT jsonb_build_object(
                                        'id', p.id, 'name', p.name, 'phone', p.phone,
                                        'last_visit_date', barnum.local_date(p.last_visit_at, v_tz))
                                      FROM barnum.patients p WHERE p.id = (c.ev).entity_id),
                        'action_links', '{}'::jsonb)
                    ELSE jsonb_build_object(
                        'appointment', barnum.appointment_json(c.ap, v_tz),
                        'action_links', coalesce(links.l, '{}'::jsonb))
               END)::text,
           (c.ev).id || '-' || extract(epoch FROM (c.ev).created_at)::bigint
      FROM c
      JOIN barnum.webhook_endpoints ep ON ep.id = c.ep_id
      LEFT JOIN links ON links.d_id = c.d_id
     ORDER BY c.d_id;
END
$$;

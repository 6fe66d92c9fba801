-- 60_relay: what the relay calls — claim, record, release, next due time,
-- dead-letter retry and queue statistics (SPEC §2.6, relay-facing).

-- Base of action links: BARNUM_PUBLIC_URL reaches SQL as the session setting
-- barnum.public_base_url (the relay sets it on its connections); otherwise
-- the public_base_url setting.
CREATE OR REPLACE FUNCTION barnum.public_base_url() RETURNS text
LANGUAGE sql STABLE
AS $$
    SELECT rtrim(coalesce(nullif(current_setting('barnum.public_base_url', true), ''),
                          barnum.setting_text('public_base_url')), '/')
$$;

-- Claim due deliveries with a lease.  The returned attempt is the fencing
-- token for record_attempts.  Payload as text, so the relay signs and sends
-- these exact bytes without parsing them.
--
-- Set-based: a fixed number of statements per batch, whatever its size —
-- one UPDATE claims every row and settles those that must not go out
-- (skipped with the reason, or dead when a reclaimed lease was the final
-- attempt), one INSERT mints every action token of the batch, one SELECT
-- renders every payload.  (A row-at-a-time loop cost ~0.5 ms a delivery.)
-- The claim itself, for the endpoint kinds the caller can deliver to (a
-- relay of the previous release knows webhooks only).  Called through the
-- versioned API functions below.
CREATE OR REPLACE FUNCTION barnum.claim_batch(
    p_worker text, p_limit int, p_lease interval, p_kinds text[])
RETURNS TABLE (delivery_id bigint, event_id uuid, event_type text, endpoint_id uuid, url text,
               secret text, attempt int, timeout_ms int, payload text, idempotency_key text, kind text)
LANGUAGE plpgsql
-- The statements are big and their shape never changes: a generic plan
-- saves re-planning them on every call.
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := barnum.clock();
    v_tz text;
    v_locale text;
    v_base text;
    v_ttl interval;
    v_max int;
    ids bigint[];
    expired bigint[];
    c_ids bigint[];
    c_events uuid[];
    -- the one-row path
    f_d barnum.webhook_deliveries;
    f_e barnum.whatsapp_events;
    f_ep barnum.webhook_endpoints;
    f_a barnum.appointments;
    f_w barnum.whatsapp_workflows;
    f_p barnum.patients;
    f_prof text;
    f_spec text;
    f_links jsonb;
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

    -- Leases that expired first (their worker died), then due pending rows.
    -- Two partial indexes, two small index scans; SKIP LOCKED lets several
    -- relays claim side by side without waiting on each other.
    SELECT array_agg(id) INTO expired FROM (
        SELECT d.id FROM barnum.webhook_deliveries d
          JOIN barnum.webhook_endpoints ep ON ep.id = d.endpoint_id
         WHERE d.status = 'processing' AND d.locked_until < v_now AND ep.kind = ANY (p_kinds)
         ORDER BY d.locked_until LIMIT p_limit
         FOR UPDATE OF d SKIP LOCKED) x;
    expired := coalesce(expired, '{}');
    -- Due rows queue by endpoint (webhook_deliveries_endpoint_due_idx): only
    -- active endpoints' queues are read, so a disabled endpoint's backlog
    -- (it waits, untouched, until the endpoint is enabled) costs nothing.
    -- Each queue offers its oldest rows; the oldest of those are claimed.
    -- Rows locked beyond the limit are free again at commit.
    SELECT array_agg(id) INTO ids FROM (
        SELECT q.id FROM barnum.webhook_endpoints ep
         CROSS JOIN LATERAL (
            SELECT d.id, d.next_attempt_at FROM barnum.webhook_deliveries d
             WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND d.next_attempt_at <= v_now
             ORDER BY d.next_attempt_at LIMIT p_limit - cardinality(expired)
             FOR UPDATE SKIP LOCKED) q
         WHERE ep.is_active AND ep.kind = ANY (p_kinds)
         ORDER BY q.next_attempt_at LIMIT p_limit - cardinality(expired)) x;
    ids := expired || coalesce(ids, '{}');
    IF cardinality(ids) = 0 THEN
        -- Nothing claimed: a waiting relay stays registered (its look after
        -- registering must not open a new window without wake-ups).
        RETURN;
    END IF;

    -- The lost attempt of a dead worker is written to the audit trail.
    IF cardinality(expired) > 0 THEN
        INSERT INTO barnum.webhook_attempts (delivery_id, attempt, started_at, error)
        SELECT d.id, d.attempts, v_now, format('lease expired (worker %s)', d.locked_by)
          FROM barnum.webhook_deliveries d WHERE d.id = ANY (expired);
    END IF;

    v_tz := barnum.setting_text('timezone');
    v_base := barnum.public_base_url();
    v_ttl := barnum.setting_interval('token_ttl');
    v_max := barnum.setting_int('max_attempts');

    -- One fresh row of an appointment event for a webhook endpoint — what
    -- sparse traffic claims, where latency counts: the same claim in plain
    -- statements by primary key.  For one row the batch statements below
    -- cost ~0.3 ms more (setting up their CTEs and joins), and a sparse
    -- event pays for that about twice (an idle process wakes slowly).
    -- Anything else — a reclaimed lease, a row to skip or dead-letter,
    -- another kind or entity — takes the general path, which is the rule.
    IF cardinality(ids) = 1 AND cardinality(expired) = 0 THEN
        SELECT * INTO f_d FROM barnum.webhook_deliveries x WHERE x.id = ids[1];
        SELECT * INTO f_e FROM barnum.whatsapp_events x WHERE x.id = f_d.event_id;
        SELECT * INTO f_ep FROM barnum.webhook_endpoints x WHERE x.id = f_d.endpoint_id;
        IF f_ep.kind = 'webhook' AND f_e.entity_type = 'appointment' THEN
            SELECT * INTO f_a FROM barnum.appointments x WHERE x.id = f_e.entity_id;
            SELECT * INTO f_w FROM barnum.whatsapp_workflows x WHERE x.id = f_e.workflow_id;
        END IF;
        IF f_a.id IS NOT NULL AND f_d.attempts + 1 <= coalesce(f_ep.max_attempts, v_max)
           AND barnum.patient_block_reason(f_a.patient_id) IS NULL
           AND barnum.appointment_event_stale(f_e.event_type, f_a, f_w, v_now) IS NULL THEN
            UPDATE barnum.webhook_deliveries x
               SET attempts = f_d.attempts + 1, status = 'processing',
                   locked_by = p_worker, locked_until = v_now + p_lease
             WHERE x.id = f_d.id;
            UPDATE barnum.whatsapp_events x
               SET status = 'processing', retry_count = greatest(x.retry_count, f_d.attempts),
                   processed_at = NULL, updated_at = now()
             WHERE x.id = f_e.id;
            WITH toks AS MATERIALIZED (
                SELECT lt, barnum.new_token() AS tok
                  FROM unnest(barnum.event_link_types(f_e.event_type)) AS lt
            ), minted AS (
                INSERT INTO barnum.whatsapp_action_tokens
                    (token_hash, action_type, appointment_id, patient_id, workflow_id, expires_at)
                SELECT barnum.token_hash(toks.tok), toks.lt, f_a.id, f_a.patient_id, f_e.workflow_id,
                       v_now + v_ttl
                  FROM toks
            )
            SELECT jsonb_object_agg(toks.lt, v_base || '/api/action?type=' || toks.lt || '&token=' || toks.tok)
              INTO f_links FROM toks;
            SELECT * INTO f_p FROM barnum.patients x WHERE x.id = f_a.patient_id;
            SELECT x.name INTO f_prof FROM barnum.professionals x WHERE x.id = f_a.professional_id;
            SELECT x.name INTO f_spec FROM barnum.specialties x WHERE x.id = f_a.specialty_id;
            RETURN QUERY
            SELECT f_d.id, f_e.id, f_e.event_type, f_ep.id, replace(f_ep.url, '{event_type}', f_e.event_type),
                   f_ep.secret, f_d.attempts + 1, f_ep.timeout_ms,
                   barnum.event_payload(f_e, barnum.appointment_doc(f_a, f_p, f_prof, f_spec, v_tz),
                                        NULL, f_links)::text,
                   f_e.id || '-' || extract(epoch FROM f_e.created_at)::bigint, f_ep.kind;
            RETURN;
        END IF;
    END IF;
    v_locale := barnum.setting_text('locale');

    -- MATERIALIZED: inlined, the reason's CASE (with its lookups) was
    -- evaluated again for every column of the UPDATE that reads it.
    WITH src AS MATERIALIZED (
        SELECT d.id,
               -- Why it must not go out (NULL: send it).  Written inline: as a
               -- function called per row it doubled the claim's cost.
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
                 -- The native sender sends WhatsApp messages only.
                 WHEN ep.kind = 'whatsapp_cloud' AND e.event_type NOT LIKE 'appointment.%'
                      AND e.event_type NOT IN ('patient.reactivation', 'message.send')
                   THEN format('%s is no WhatsApp message (whatsapp_cloud endpoint)', e.event_type)
                 -- Other entities (endpoint.disabled, …) carry their data in the event.
                 WHEN e.entity_type <> 'appointment' THEN NULL
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
               -- A reclaimed lease's last attempt may have reached the
               -- receiver before its worker died: say so next to the reason.
               last_error = CASE WHEN src.reason IS NULL THEN d.last_error
                                 WHEN d.status = 'processing' AND src.reason NOT LIKE 'dead:%'
                                 THEN src.reason || ' (after a lease expired: attempt '
                                      || d.attempts || ' may have been delivered)'
                                 ELSE regexp_replace(src.reason, '^dead:', '') END
          FROM src
         WHERE d.id = src.id
        RETURNING d.id, d.event_id, d.attempts, src.reason
    ), sending AS (
        -- An event with a delivery in flight is 'processing' whatever its
        -- other deliveries say (refresh_events ranks processing first), so
        -- the rows going out update their events directly: the general
        -- refresh, an aggregate over every delivery of each event, was a
        -- fifth of a one-row claim.
        UPDATE barnum.whatsapp_events e
           SET status = 'processing',
               retry_count = greatest(e.retry_count, m.attempts - 1),
               processed_at = NULL,
               updated_at = now()
          FROM (SELECT upd.event_id, max(upd.attempts) AS attempts
                  FROM upd WHERE upd.reason IS NULL GROUP BY upd.event_id) m
         WHERE e.id = m.event_id
    )
    SELECT array_agg(upd.id) FILTER (WHERE upd.reason IS NULL),
           array_agg(upd.event_id) FILTER (WHERE upd.reason IS NOT NULL)
      INTO c_ids, c_events
      FROM upd;

    -- Rows settled here (skipped, dead) move their events and workflows by
    -- the general rule.
    IF c_events IS NOT NULL THEN
        PERFORM barnum.refresh_events(c_events);
    END IF;
    IF c_ids IS NULL THEN
        RETURN;
    END IF;
    -- Returning several rows means events come faster than one a claim: the
    -- relay stays busy and producers need not wake it.  A claim returning
    -- one row keeps the registration, so the next event's NOTIFY reaches the
    -- relay while it is still claiming or posting (sparse traffic, where
    -- latency counts and a NOTIFY costs nothing).  Counted on the rows
    -- returned, so the relay knows whether it is still registered.
    IF cardinality(c_ids) > 1 THEN
        DELETE FROM barnum.relay_waiters WHERE worker = p_worker;
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
               (c.ev).workflow_id AS workflow_id, barnum.new_token() AS tok
          FROM c
         CROSS JOIN LATERAL unnest(barnum.event_link_types((c.ev).event_type)) AS lt
         WHERE (c.ap).id IS NOT NULL
    ), minted AS (
        INSERT INTO barnum.whatsapp_action_tokens
            (token_hash, action_type, appointment_id, patient_id, workflow_id, expires_at)
        SELECT barnum.token_hash(toks.tok), toks.lt, toks.appt_id, toks.patient_id, toks.workflow_id,
               v_now + v_ttl
          FROM toks
    ), links AS (
        SELECT toks.d_id,
               jsonb_object_agg(toks.lt, v_base || '/api/action?type=' || toks.lt || '&token=' || toks.tok) AS l,
               jsonb_object_agg(toks.lt, toks.tok) AS t
          FROM toks GROUP BY toks.d_id
    )
    SELECT c.d_id, (c.ev).id, (c.ev).event_type, c.ep_id,
           replace(ep.url, '{event_type}', (c.ev).event_type), ep.secret, c.d_attempt, ep.timeout_ms,
           CASE WHEN ep.kind = 'whatsapp_cloud'
                THEN barnum.wa_cloud_payload(c.ev, barnum.appointment_doc(c.ap, ap_p, pr.name, sp.name, v_tz),
                                             barnum.patient_doc(pp, v_tz), links.t, ep.config, v_locale)
                ELSE barnum.event_payload(c.ev, barnum.appointment_doc(c.ap, ap_p, pr.name, sp.name, v_tz),
                                          barnum.patient_doc(pp, v_tz), links.l) END::text,
           (c.ev).id || '-' || extract(epoch FROM (c.ev).created_at)::bigint,
           ep.kind
      FROM c
      JOIN barnum.webhook_endpoints ep ON ep.id = c.ep_id
      LEFT JOIN links ON links.d_id = c.d_id
      -- What the payload shows, joined for the whole batch (see appointment_doc).
      LEFT JOIN barnum.patients ap_p ON ap_p.id = (c.ap).patient_id
      LEFT JOIN barnum.professionals pr ON pr.id = (c.ap).professional_id
      LEFT JOIN barnum.specialties sp ON sp.id = (c.ap).specialty_id
      LEFT JOIN barnum.patients pp ON (c.ev).entity_type = 'patient' AND pp.id = (c.ev).entity_id
     ORDER BY c.d_id;
END
$$;

-- The relay's claim, versioned (issue 18): a new result shape is a new
-- function beside the old one, so relays of the previous release keep
-- working during a rolling deploy; the old one goes when its file entry
-- does (barnum migrate drops it after a grace period).
-- v1: the first release's shape; webhook endpoints only.
CREATE OR REPLACE FUNCTION barnum.claim_deliveries_text(
    p_worker text, p_limit int DEFAULT 50, p_lease interval DEFAULT '60 seconds')
RETURNS TABLE (delivery_id bigint, event_id uuid, event_type text, endpoint_id uuid, url text,
               secret text, attempt int, timeout_ms int, payload text, idempotency_key text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
BEGIN
    RETURN QUERY
    SELECT c.delivery_id, c.event_id, c.event_type, c.endpoint_id, c.url, c.secret, c.attempt,
           c.timeout_ms, c.payload, c.idempotency_key
      FROM barnum.claim_batch(p_worker, p_limit, p_lease, '{webhook}') c;
END
$$;

-- v2: every endpoint kind, and the kind with each row (whatsapp_cloud rows
-- go to the Graph API with a bearer token, not signed).  The wrappers are
-- PL/pgSQL for their cached plan: as SQL functions the SQL-function
-- executor planned their SELECT again on every claim.
CREATE OR REPLACE FUNCTION barnum.claim_deliveries_v2(
    p_worker text, p_limit int DEFAULT 50, p_lease interval DEFAULT '60 seconds')
RETURNS TABLE (delivery_id bigint, event_id uuid, event_type text, endpoint_id uuid, url text,
               secret text, attempt int, timeout_ms int, payload text, idempotency_key text, kind text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
BEGIN
    RETURN QUERY SELECT * FROM barnum.claim_batch(p_worker, p_limit, p_lease, '{webhook,whatsapp_cloud}');
END
$$;

-- The contract's claim_deliveries: the v1 rows, payload as jsonb.
CREATE OR REPLACE FUNCTION barnum.claim_deliveries(
    p_worker text, p_limit int DEFAULT 50, p_lease interval DEFAULT '60 seconds')
RETURNS TABLE (delivery_id bigint, event_id uuid, event_type text, endpoint_id uuid, url text,
               secret text, attempt int, timeout_ms int, payload jsonb)
LANGUAGE sql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
    SELECT c.delivery_id, c.event_id, c.event_type, c.endpoint_id, c.url, c.secret,
           c.attempt, c.timeout_ms, c.payload::jsonb
      FROM barnum.claim_deliveries_text(p_worker, p_limit, p_lease) c
$$;

-- Backoff before retry n (n = attempts made so far): base·2^(n-1) with
-- ±20 % jitter (so a receiver's recovery is not met by a synchronized herd),
-- then capped: the cap is the longest any one wait may be.
CREATE OR REPLACE FUNCTION barnum.backoff_interval(p_attempt int, p_base int, p_cap int)
RETURNS interval
LANGUAGE sql VOLATILE
AS $$
    SELECT make_interval(secs =>
        least(p_base * power(2, least(greatest(p_attempt, 1) - 1, 30)) * (0.8 + random() * 0.4), p_cap))
$$;

-- Report a batch of HTTP outcomes.  A result whose (delivery_id, attempt) no
-- longer holds the claim is ignored (fencing).  Returns results applied.
CREATE OR REPLACE FUNCTION barnum.record_attempts(p_results jsonb) RETURNS int
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
-- A custom plan per call (the planner's default for a jsonb parameter) cost
-- more than the statement itself for a small batch.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_now timestamptz := barnum.clock();
    v_base int;
    v_cap int;
    v_max int;
    v_threshold int := barnum.setting_int('endpoint_failure_threshold');
    v_disable_after interval := barnum.setting_interval('endpoint_disable_after');
    n int;
    touched uuid[];
    sick uuid[];
    gone uuid[];
    wa jsonb;
BEGIN
    IF p_results IS NULL OR jsonb_typeof(p_results) <> 'array' THEN
        PERFORM barnum.fail('BN400', 'results must be a JSON array');
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_results) x
                WHERE jsonb_typeof(x) <> 'object'
                   OR jsonb_typeof(x -> 'delivery_id') IS DISTINCT FROM 'number'
                   OR jsonb_typeof(x -> 'attempt') IS DISTINCT FROM 'number'
                   OR jsonb_typeof(x -> 'ok') IS DISTINCT FROM 'boolean') THEN
        PERFORM barnum.fail('BN400', 'each result needs delivery_id (number), attempt (number) and ok (boolean)');
    END IF;
    v_base := barnum.setting_int('backoff_base_seconds');
    v_cap := barnum.setting_int('backoff_max_seconds');
    v_max := barnum.setting_int('max_attempts');

    -- One statement: the UPDATE's WHERE is the fence (Postgres re-checks it
    -- on the newest row version if a concurrent reclaim got there first).
    WITH x AS (
        SELECT DISTINCT ON (r.delivery_id) r.*
          FROM jsonb_to_recordset(p_results) AS r(
                   delivery_id bigint, attempt int, ok boolean, retryable boolean, http_status int,
                   duration_ms int, error text, response_body text, retry_after_seconds numeric)
         ORDER BY r.delivery_id
    ), upd AS (
        UPDATE barnum.webhook_deliveries d
           SET status = CASE
                   WHEN x.ok THEN 'sent'
                   WHEN g.retry AND d.attempts < coalesce(ep.max_attempts, v_max) THEN 'pending'
                   ELSE 'dead_letter' END,
               next_attempt_at = CASE
                   WHEN NOT x.ok AND g.retry AND d.attempts < coalesce(ep.max_attempts, v_max)
                   THEN v_now + greatest(barnum.backoff_interval(d.attempts, v_base, v_cap),
                                         make_interval(secs => least(greatest(coalesce(x.retry_after_seconds, 0), 0), 86400)))
                   ELSE d.next_attempt_at END,
               locked_by = NULL, locked_until = NULL,
               last_http_status = x.http_status,
               last_error = CASE WHEN x.ok THEN NULL
                                 ELSE left(coalesce(g.graph_error, x.error, 'HTTP ' || x.http_status, 'failed'), 2000) END,
               delivered_at = CASE WHEN x.ok THEN v_now END
          FROM x, barnum.webhook_endpoints ep,
               -- The Graph API's own error (native sender): some codes are
               -- worth a retry whatever the HTTP status says.
               LATERAL (SELECT coalesce(x.retryable, false) OR ep.kind = 'whatsapp_cloud' AND NOT x.ok
                                   AND barnum.graph_retryable(barnum.graph_code(x.response_body)) AS retry,
                               CASE WHEN ep.kind = 'whatsapp_cloud' AND NOT x.ok
                                    THEN barnum.graph_error_text(x.response_body) END AS graph_error) g
         WHERE d.id = x.delivery_id AND d.attempts = x.attempt AND d.status = 'processing'
           AND ep.id = d.endpoint_id
        RETURNING d.id, d.event_id, d.endpoint_id, d.status, d.last_error, x.ok, x.attempt, x.duration_ms,
                  x.http_status, left(x.response_body, 4096) AS response_body, left(x.error, 2000) AS error,
                  ep.kind
    ), audit AS (
        INSERT INTO barnum.webhook_attempts (delivery_id, attempt, started_at, duration_ms, http_status, response_body, error)
        SELECT upd.id, upd.attempt, v_now - make_interval(secs => coalesce(upd.duration_ms, 0) / 1000.0),
               upd.duration_ms, upd.http_status, upd.response_body, upd.error
          FROM upd
    ), h AS (
        -- Endpoint health, per endpoint of the batch.  Within one batch the
        -- order of outcomes is not known: a success resets the count to the
        -- batch's own dead letters.
        SELECT upd.endpoint_id, bool_or(upd.ok) AS any_ok, bool_or(NOT upd.ok) AS any_fail,
               count(*) FILTER (WHERE upd.status = 'dead_letter') AS dead,
               bool_or(upd.http_status = 410) AS gone,
               (array_agg(upd.last_error ORDER BY upd.id DESC) FILTER (WHERE NOT upd.ok))[1] AS err
          FROM upd GROUP BY upd.endpoint_id
    ), health AS (
        -- Written only when the health changes or the timestamps are a second
        -- old: a busy endpoint's row is not rewritten by every batch.
        UPDATE barnum.webhook_endpoints ep
           SET failure_count = CASE WHEN h.any_ok THEN h.dead ELSE ep.failure_count + h.dead END,
               failing_since = CASE WHEN NOT h.any_fail THEN NULL
                                    WHEN h.any_ok THEN CASE WHEN h.dead > 0 THEN v_now END
                                    ELSE coalesce(ep.failing_since, v_now) END,
               last_attempt_at = v_now,
               last_success_at = CASE WHEN h.any_ok THEN v_now ELSE ep.last_success_at END,
               last_error = CASE WHEN h.any_fail THEN h.err ELSE ep.last_error END
          FROM h
         WHERE ep.id = h.endpoint_id
           AND (h.dead > 0 OR h.gone OR (h.any_fail AND ep.failing_since IS NULL)
                OR (h.any_ok AND (ep.failure_count > 0 OR ep.failing_since IS NOT NULL))
                OR (h.any_ok AND (ep.last_success_at IS NULL OR ep.last_success_at < v_now - interval '1 second'))
                OR ep.last_attempt_at IS NULL OR ep.last_attempt_at < v_now - interval '1 second')
        RETURNING ep.id, ep.status, ep.failure_count, ep.failing_since, h.gone
    )
    SELECT (SELECT count(*) FROM upd), (SELECT array_agg(DISTINCT upd.event_id) FROM upd),
           (SELECT array_agg(health.id) FROM health
             WHERE health.status = 'active'
               AND (health.gone OR health.failure_count >= v_threshold
                    OR health.failing_since < v_now - v_disable_after)),
           (SELECT array_agg(health.id) FROM health WHERE health.gone),
           (SELECT jsonb_agg(jsonb_build_object('event_id', upd.event_id, 'endpoint_id', upd.endpoint_id,
                                                'ok', upd.ok, 'body', upd.response_body))
              FROM upd WHERE upd.kind = 'whatsapp_cloud')
      INTO n, touched, sick, gone, wa;

    IF touched IS NOT NULL THEN
        PERFORM barnum.refresh_events(touched);
    END IF;
    IF sick IS NOT NULL THEN
        PERFORM barnum.disable_failed_endpoints(sick, coalesce(gone, '{}'), v_threshold);
    END IF;
    IF wa IS NOT NULL THEN
        PERFORM barnum.record_whatsapp_sends(wa);
    END IF;
    RETURN n;
END
$$;

-- Endpoints that kept failing are switched off ('failed'): a 410 Gone answer
-- at once, else N dead letters in a row or failing for too long.  Their
-- queued deliveries wait (the claim reads active endpoints only) until an
-- operator or the owner enables them again.  The account's other endpoints
-- get an endpoint.disabled event.
CREATE OR REPLACE FUNCTION barnum.disable_failed_endpoints(p_ids uuid[], p_gone uuid[], p_threshold int)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    WITH off AS (
        UPDATE barnum.webhook_endpoints ep
           SET status = 'failed',
               metadata = ep.metadata || jsonb_build_object(
                   'disabled_at', barnum.clock(),
                   'disabled_reason', CASE
                       WHEN ep.id = ANY (p_gone) THEN 'the receiver answered 410 Gone'
                       WHEN ep.failure_count >= p_threshold THEN format('%s dead letters in a row', ep.failure_count)
                       ELSE format('failing since %s', ep.failing_since) END),
               updated_at = now()
         WHERE ep.id = ANY (p_ids) AND ep.status = 'active'
        RETURNING ep.id, ep.account_id, ep.name, ep.phone_number, ep.metadata ->> 'disabled_reason' AS reason
    )
    INSERT INTO barnum.whatsapp_events (event_type, entity_type, entity_id, account_id, data, max_retries)
    SELECT 'endpoint.disabled', 'endpoint', off.id, off.account_id,
           jsonb_build_object('endpoint_id', off.id, 'name', off.name, 'phone_number', off.phone_number,
                              'reason', off.reason),
           barnum.setting_int('max_attempts') - 1
      FROM off;
END
$$;

-- What the native sender learnt from the Graph API: the wamid of a sent
-- message goes on its messages row (so status webhooks find it), an
-- appointment message gets its row; error 190 (the access token expired or
-- was revoked) switches the endpoint off at once — no message can leave
-- until an operator fixes the token.
CREATE OR REPLACE FUNCTION barnum.record_whatsapp_sends(p_results jsonb) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    r jsonb;
    e barnum.whatsapp_events;
    wamid text;
    v_phone text;
    c barnum.contacts;
    expired uuid[];
BEGIN
    FOR r IN SELECT x FROM jsonb_array_elements(p_results) x LOOP
        IF NOT (r ->> 'ok')::boolean THEN
            IF barnum.graph_code(r ->> 'body') = 190 THEN
                expired := array_append(expired, (r ->> 'endpoint_id')::uuid);
            END IF;
            CONTINUE;
        END IF;
        wamid := barnum.try_jsonb(r ->> 'body') #>> '{messages,0,id}';
        IF wamid IS NULL THEN
            CONTINUE;
        END IF;
        SELECT * INTO e FROM barnum.whatsapp_events WHERE id = (r ->> 'event_id')::uuid;
        IF e.event_type = 'message.send' THEN
            UPDATE barnum.messages SET wa_message_id = wamid, status_updated_at = barnum.clock()
             WHERE id = e.entity_id AND wa_message_id IS NULL;
            CONTINUE;
        END IF;
        SELECT phone INTO v_phone FROM barnum.patients
         WHERE id = CASE WHEN e.entity_type = 'patient' THEN e.entity_id
                         ELSE (SELECT patient_id FROM barnum.appointments WHERE id = e.entity_id) END;
        IF barnum.digits(v_phone) IS NULL THEN
            CONTINUE;
        END IF;
        c := barnum.find_or_create_contact(e.account_id, barnum.digits(v_phone), NULL);
        INSERT INTO barnum.messages (account_id, wa_message_id, contact_id, direction, type, content, payload,
                                     status, status_updated_at)
        VALUES (e.account_id, wamid, c.id, 'outbound', 'appointment', e.event_type,
                jsonb_build_object('event_id', e.id, 'event_type', e.event_type), 'pending', barnum.clock())
        ON CONFLICT (wa_message_id) DO NOTHING;
    END LOOP;
    IF expired IS NOT NULL THEN
        UPDATE barnum.webhook_endpoints
           SET status = 'failed',
               metadata = metadata || jsonb_build_object(
                   'disabled_reason', 'the WhatsApp access token expired or was revoked (Graph API error 190): '
                                      || 'set a new one in ' || coalesce(secret, 'WHATSAPP_TOKEN')
                                      || ' and enable the endpoint',
                   'disabled_at', barnum.clock())
         WHERE id = ANY (expired) AND status = 'active';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION barnum.graph_code(p_body text) RETURNS int
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN jsonb_typeof(j #> '{error,code}') = 'number' THEN (j #>> '{error,code}')::numeric::int END
      FROM (SELECT barnum.try_jsonb(p_body) AS j) x
$$;

CREATE OR REPLACE FUNCTION barnum.graph_error_text(p_body text) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN j ? 'error' THEN format('Graph API error %s: %s%s', j #>> '{error,code}',
                                             coalesce(j #>> '{error,error_data,details}', j #>> '{error,message}', ''),
                                             CASE j #>> '{error,code}'
                                                 WHEN '131047' THEN ' (more than 24 hours since the patient wrote: send a template)'
                                                 WHEN '131026' THEN ' (the number cannot receive WhatsApp messages)'
                                                 WHEN '190' THEN ' (the access token expired or was revoked)'
                                                 ELSE '' END) END
      FROM (SELECT barnum.try_jsonb(p_body) AS j) x
$$;

-- Graceful shutdown: hand a worker's unfinished claims back, due at once.
-- The attempt did not happen, so its number is given back too.  Safe for
-- fencing because a relay releases only after its in-flight requests have
-- finished or been cancelled: it never reports a released attempt.
CREATE OR REPLACE FUNCTION barnum.release_deliveries(p_worker text) RETURNS int
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    touched uuid[];
BEGIN
    IF p_worker IS NULL OR btrim(p_worker) = '' THEN
        PERFORM barnum.fail('BN400', 'worker name is required');
    END IF;
    DELETE FROM barnum.relay_waiters WHERE worker = p_worker;
    WITH rel AS (
        UPDATE barnum.webhook_deliveries
           SET status = 'pending', attempts = greatest(attempts - 1, 0),
               locked_by = NULL, locked_until = NULL, next_attempt_at = barnum.clock()
         WHERE status = 'processing' AND locked_by = p_worker
        RETURNING event_id)
    SELECT array_agg(event_id) INTO touched FROM rel;
    IF touched IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM barnum.refresh_events(touched);
    PERFORM barnum.wake_relays();
    RETURN cardinality(touched);
END
$$;

-- A relay going idle: registers as waiting (so producers NOTIFY it) for
-- p_ttl — the relay re-registers every sweep, so a crashed relay's row
-- simply expires — and returns next_due_at() for its timer.  Work committed
-- after this snapshot but by a statement that ran before the registration
-- committed sends no NOTIFY; the relay's sweep (every few seconds) finds it:
-- no event waits longer than one sweep interval.
CREATE OR REPLACE FUNCTION barnum.relay_idle(p_worker text, p_ttl interval DEFAULT '30 seconds')
RETURNS timestamptz
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
BEGIN
    IF p_worker IS NULL OR btrim(p_worker) = '' THEN
        PERFORM barnum.fail('BN400', 'worker name is required');
    END IF;
    INSERT INTO barnum.relay_waiters (worker, until)
    VALUES (p_worker, now() + greatest(coalesce(p_ttl, interval '30 seconds'), interval '1 second'))
    ON CONFLICT (worker) DO UPDATE SET until = EXCLUDED.until;
    RETURN barnum.next_due_at();
END
$$;

-- Earliest moment any delivery becomes claimable: a pending row's due time
-- (for an active endpoint — else the relay's timer would spin on work it may
-- not claim) or a lease's expiry.  NULL when there is nothing to do.
CREATE OR REPLACE FUNCTION barnum.next_due_at() RETURNS timestamptz
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
BEGIN
    -- PL/pgSQL for its cached plan: a SQL function with a pinned search_path
    -- is never inlined and planned its query on every call (relay_idle runs
    -- once per sparse event).
    RETURN least(
        -- The head of each active endpoint's queue (one index probe each).
        (SELECT min(q.next_attempt_at) FROM barnum.webhook_endpoints ep
          CROSS JOIN LATERAL (
             SELECT d.next_attempt_at FROM barnum.webhook_deliveries d
              WHERE d.endpoint_id = ep.id AND d.status = 'pending'
              ORDER BY d.next_attempt_at LIMIT 1) q
          WHERE ep.is_active),
        (SELECT min(locked_until) FROM barnum.webhook_deliveries WHERE status = 'processing'));
END
$$;

-- Re-queue deliveries (dead letters) with a fresh attempt budget; a failed
-- workflow that went down with its event is live again.
CREATE OR REPLACE FUNCTION barnum.requeue_deliveries(p_ids bigint[]) RETURNS int
LANGUAGE plpgsql
AS $$
DECLARE
    touched uuid[];
    n int;
BEGIN
    WITH r AS (
        UPDATE barnum.webhook_deliveries
           SET status = 'pending', attempts = 0, next_attempt_at = barnum.clock(),
               locked_by = NULL, locked_until = NULL
         WHERE id = ANY (p_ids) AND status = 'dead_letter'
        RETURNING event_id)
    SELECT array_agg(DISTINCT event_id), count(*) INTO touched, n FROM r;
    IF n > 0 THEN
        UPDATE barnum.whatsapp_workflows w SET status = 'pending'
          FROM barnum.whatsapp_events e
         WHERE e.id = ANY (touched) AND w.id = e.workflow_id AND w.status = 'failed';
        PERFORM barnum.refresh_events(touched);
        PERFORM barnum.wake_relays();
    END IF;
    RETURN n;
END
$$;

-- Put dead letters back in the queue with a fresh attempt budget: all, or
-- one event's.
CREATE OR REPLACE FUNCTION barnum.retry_dead_letters(p_event_id uuid DEFAULT NULL) RETURNS int
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
BEGIN
    IF p_event_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM barnum.whatsapp_events WHERE id = p_event_id) THEN
        PERFORM barnum.fail('BN404', format('event %s not found', p_event_id));
    END IF;
    RETURN barnum.requeue_deliveries(ARRAY(
        SELECT id FROM barnum.webhook_deliveries
         WHERE status = 'dead_letter' AND (p_event_id IS NULL OR event_id = p_event_id)));
END
$$;

-- Queue depth for dashboards and /metrics.  Every count here uses a partial
-- index, so it stays cheap with millions of delivered rows.
CREATE OR REPLACE FUNCTION barnum.queue_stats() RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
    SELECT jsonb_build_object(
        'pending', (SELECT count(*) FROM barnum.webhook_deliveries WHERE status = 'pending'),
        'due', (SELECT count(*) FROM barnum.webhook_deliveries
                 WHERE status = 'pending' AND next_attempt_at <= barnum.clock()),
        'processing', (SELECT count(*) FROM barnum.webhook_deliveries WHERE status = 'processing'),
        'dead_letter', (SELECT count(*) FROM barnum.webhook_deliveries WHERE status = 'dead_letter'),
        'oldest_due_age_seconds', coalesce((
            SELECT extract(epoch FROM barnum.clock() - min(next_attempt_at))::float8
              FROM barnum.webhook_deliveries
             WHERE status = 'pending' AND next_attempt_at <= barnum.clock()), 0),
        'next_due_at', barnum.next_due_at())
$$;

-- 95_operator: what `barnum endpoints|dlq|status|settings` call.  Operator
-- tools go through these functions, never through ad-hoc SQL in Python, so a
-- DBA sees (and can change) every rule here.  A rule about one argument
-- names it in DETAIL ({"field": …}) so a caller can point at its own input
-- (the CLI names its flag) without parsing the message.

-- (check_receiver_url, the URL rules, lives with url_parts in 40_outbox.)
CREATE OR REPLACE FUNCTION barnum.endpoint_add(
    p_name text, p_url text, p_secret text DEFAULT NULL, p_event_types text[] DEFAULT '{*}',
    p_max_attempts int DEFAULT NULL, p_timeout_ms int DEFAULT 10000, p_allow_http boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    ep barnum.webhook_endpoints;
BEGIN
    PERFORM barnum.check_endpoint_name(p_name);
    PERFORM barnum.check_receiver_url(p_url, p_allow_http);
    PERFORM barnum.check_event_patterns(p_event_types);
    IF p_max_attempts IS NOT NULL AND p_max_attempts NOT BETWEEN 1 AND 100 THEN
        PERFORM barnum.fail('BN422', 'max attempts must be between 1 and 100', '{"field": "max_attempts"}');
    END IF;
    IF p_timeout_ms IS NULL OR p_timeout_ms NOT BETWEEN 100 AND 300000 THEN
        PERFORM barnum.fail('BN422', 'timeout must be between 100 and 300000 ms', '{"field": "timeout_ms"}');
    END IF;
    IF p_secret IS NOT NULL AND length(p_secret) < 16 THEN
        PERFORM barnum.fail('BN422', 'an endpoint secret must be at least 16 characters', '{"field": "secret"}');
    END IF;
    IF EXISTS (SELECT 1 FROM barnum.webhook_endpoints WHERE name = p_name) THEN
        PERFORM barnum.fail('BN409', format('endpoint %L already exists', p_name));
    END IF;
    INSERT INTO barnum.webhook_endpoints (name, url, secret, event_types, max_attempts, timeout_ms)
    VALUES (p_name, p_url, p_secret, p_event_types, p_max_attempts, p_timeout_ms)
    RETURNING * INTO ep;
    RETURN barnum.endpoint_json(ep);
END
$$;

-- The native sender: an endpoint of kind whatsapp_cloud posting to the
-- Graph API's /{phone_number_id}/messages.  The access token is never
-- stored: p_token_env names the relay's environment variable holding it.
-- p_templates: event type → {"name", "language"} of an approved template
-- (needed outside the 24-hour window), body parameters {{1}} first name,
-- {{2}} date, {{3}} time, {{4}} professional; quick-reply buttons
-- confirm / cancel / reschedule in that order.
CREATE OR REPLACE FUNCTION barnum.endpoint_add_whatsapp(
    p_name text, p_phone_number_id text, p_token_env text DEFAULT 'WHATSAPP_TOKEN',
    p_graph_url text DEFAULT 'https://graph.facebook.com/v21.0', p_account text DEFAULT 'default',
    p_event_types text[] DEFAULT '{appointment.*,patient.reactivation,message.send}',
    p_templates jsonb DEFAULT '{}', p_allow_http boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    ep barnum.webhook_endpoints;
    v_url text;
    bad text;
BEGIN
    PERFORM barnum.check_endpoint_name(p_name);
    IF p_phone_number_id IS NULL OR p_phone_number_id !~ '^[0-9]{1,32}$' THEN
        PERFORM barnum.fail('BN422', format('phone_number_id must be the digits Meta shows for the number, got %L',
                                            p_phone_number_id), '{"field": "phone_number_id"}');
    END IF;
    IF p_token_env IS NULL OR p_token_env !~ '^[A-Z_][A-Z0-9_]{0,63}$' THEN
        PERFORM barnum.fail('BN422', format('the token variable must be an environment variable name such as WHATSAPP_TOKEN, got %L',
                                            p_token_env), '{"field": "token_env"}');
    END IF;
    IF p_graph_url IS NULL OR p_graph_url ~ '[?#]' THEN
        PERFORM barnum.fail('BN422', 'the Graph API base URL must be like https://graph.facebook.com/v21.0',
                            '{"field": "graph_url"}');
    END IF;
    v_url := rtrim(p_graph_url, '/') || '/' || p_phone_number_id || '/messages';
    PERFORM barnum.check_receiver_url(v_url, p_allow_http);
    PERFORM barnum.check_event_patterns(p_event_types);
    IF jsonb_typeof(p_templates) IS DISTINCT FROM 'object' THEN
        PERFORM barnum.fail('BN422', 'templates must be an object: event type → {"name", "language"}', '{"field": "templates"}');
    END IF;
    SELECT k INTO bad FROM jsonb_each(p_templates) AS t(k, v)
     WHERE NOT k = ANY (barnum.known_event_types()) OR jsonb_typeof(v -> 'name') IS DISTINCT FROM 'string'
        OR coalesce(v ->> 'name', '') !~ '^[a-z0-9_]+$' OR length(v ->> 'name') > 512 OR coalesce(v ->> 'language', 'pt_PT') !~ '^[a-z]{2,3}(_[A-Z]{2})?$'
     LIMIT 1;
    IF bad IS NOT NULL THEN
        PERFORM barnum.fail('BN422', format('template for %s: a known event type, a name (a-z, 0-9, _) and a language such as pt_PT', bad),
                            '{"field": "templates"}');
    END IF;
    IF EXISTS (SELECT 1 FROM barnum.webhook_endpoints WHERE name = p_name) THEN
        PERFORM barnum.fail('BN409', format('endpoint %L already exists', p_name));
    END IF;
    INSERT INTO barnum.webhook_endpoints (name, url, secret, event_types, kind, config, account_id)
    VALUES (p_name, v_url, p_token_env, p_event_types, 'whatsapp_cloud',
            jsonb_build_object('phone_number_id', p_phone_number_id, 'templates', p_templates),
            barnum.account_id_by_name(p_account))
    RETURNING * INTO ep;
    RETURN barnum.endpoint_json(ep);
END
$$;

CREATE OR REPLACE FUNCTION barnum.endpoint_list() RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
    SELECT coalesce(jsonb_agg(barnum.endpoint_json(ep) ORDER BY ep.name), '[]')
      FROM barnum.webhook_endpoints ep
$$;

CREATE OR REPLACE FUNCTION barnum.endpoint_set_active(p_name text, p_active boolean) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    ep barnum.webhook_endpoints;
BEGIN
    UPDATE barnum.webhook_endpoints SET is_active = p_active WHERE name = p_name RETURNING * INTO ep;
    IF NOT FOUND THEN
        PERFORM barnum.fail('BN404', format('no endpoint named %L', p_name));
    END IF;
    RETURN barnum.endpoint_json(ep);
END
$$;

-- Removing an endpoint drops its delivery history with it; refuse while it
-- still has work queued unless forced (nothing is lost silently).
CREATE OR REPLACE FUNCTION barnum.endpoint_remove(p_name text, p_force boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    ep barnum.webhook_endpoints;
    queued int;
    touched uuid[];
BEGIN
    SELECT * INTO ep FROM barnum.webhook_endpoints WHERE name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM barnum.fail('BN404', format('no endpoint named %L', p_name));
    END IF;
    SELECT count(*) INTO queued FROM barnum.webhook_deliveries
     WHERE endpoint_id = ep.id AND status IN ('pending', 'processing');
    IF queued > 0 AND NOT coalesce(p_force, false) THEN
        PERFORM barnum.fail('BN409', format(
            'endpoint %L has %s queued deliveries; disable it, or remove with force to drop them', p_name, queued),
            jsonb_build_object('field', 'force', 'queued', queued)::text);
    END IF;
    SELECT array_agg(DISTINCT event_id) INTO touched FROM barnum.webhook_deliveries WHERE endpoint_id = ep.id;
    DELETE FROM barnum.webhook_endpoints WHERE id = ep.id;
    IF touched IS NOT NULL THEN
        PERFORM barnum.refresh_events(touched);
    END IF;
    RETURN barnum.endpoint_json(ep) || jsonb_build_object('dropped_queued', queued);
END
$$;

-- Dead letters, newest first, with what the receiver last said.
CREATE OR REPLACE FUNCTION barnum.dlq_list(p_limit int DEFAULT 50) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 10000 THEN
        PERFORM barnum.fail('BN422', 'limit must be between 1 and 10000', '{"field": "limit"}');
    END IF;
    RETURN (
        SELECT coalesce(jsonb_agg(x ORDER BY x.created_at DESC), '[]')
          FROM (SELECT e.id AS event_id, e.event_type, ep.name AS endpoint, d.attempts,
                       d.last_http_status, d.last_error, e.created_at
                  FROM barnum.webhook_deliveries d
                  JOIN barnum.whatsapp_events e ON e.id = d.event_id
                  JOIN barnum.webhook_endpoints ep ON ep.id = d.endpoint_id
                 WHERE d.status = 'dead_letter'
                 ORDER BY e.created_at DESC
                 LIMIT p_limit) x);
END
$$;

-- `barnum status`: the queue at a glance.  Counts by status scan the
-- deliveries table (an operator command, not a hot path); the rest uses
-- partial indexes and the last hour of attempts.
CREATE OR REPLACE FUNCTION barnum.status_report() RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
    SELECT jsonb_build_object(
        'queue', barnum.queue_stats(),
        'deliveries_by_status', (
            SELECT coalesce(jsonb_object_agg(status, n), '{}')
              FROM (SELECT status, count(*) AS n FROM barnum.webhook_deliveries GROUP BY status) s),
        'events_by_status', (
            SELECT coalesce(jsonb_object_agg(status, n), '{}')
              FROM (SELECT status, count(*) AS n FROM barnum.whatsapp_events GROUP BY status) s),
        'endpoints', (
            SELECT coalesce(jsonb_agg(jsonb_build_object(
                       'name', ep.name, 'url', barnum.url_display(ep.url), 'is_active', ep.is_active,
                       'status', ep.status, 'kind', ep.kind,
                       'disabled_reason', ep.metadata ->> 'disabled_reason',
                       'url_ok', (barnum.url_parts(ep.url) ->> 'problem') IS NULL,
                       'attempts_last_hour', coalesce(h.total, 0),
                       'succeeded_last_hour', coalesce(h.ok, 0),
                       'success_rate_last_hour',
                           CASE WHEN coalesce(h.total, 0) = 0 THEN NULL
                                ELSE round(h.ok::numeric / h.total, 4) END,
                       'pending', (SELECT count(*) FROM barnum.webhook_deliveries d
                                    WHERE d.endpoint_id = ep.id AND d.status = 'pending'),
                       'dead_letter', (SELECT count(*) FROM barnum.webhook_deliveries d
                                        WHERE d.endpoint_id = ep.id AND d.status = 'dead_letter'))
                   ORDER BY ep.name), '[]')
              FROM barnum.webhook_endpoints ep
              LEFT JOIN (
                  SELECT d.endpoint_id, count(*) AS total,
                         count(*) FILTER (WHERE a.http_status BETWEEN 200 AND 299) AS ok
                    FROM barnum.webhook_attempts a
                    JOIN barnum.webhook_deliveries d ON d.id = a.delivery_id
                   WHERE a.started_at > barnum.clock() - interval '1 hour'
                   GROUP BY d.endpoint_id) h ON h.endpoint_id = ep.id))
$$;

-- `barnum dev` on a restart: the messages whose links a patient could still
-- be about to use (delivered, workflow not answered yet), rendered again as
-- the relay would now, with freshly minted links.  The links printed before
-- cannot be shown again (only their hashes are stored); they stay valid
-- alongside these — both sets act on the same appointment and workflow.
CREATE OR REPLACE FUNCTION barnum.reissue_awaiting_links() RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    v_now timestamptz := barnum.clock();
    v_tz text := barnum.setting_text('timezone');
    v_ttl interval := barnum.setting_interval('token_ttl');
    v_base text := barnum.public_base_url();
    r record;
    links jsonb;
    result jsonb := '[]';
BEGIN
    FOR r IN
        SELECT x.ev, x.ap FROM (
            SELECT DISTINCT ON (w.id) e AS ev, a AS ap, a.starts_at, e.created_at
              FROM barnum.whatsapp_workflows w
              JOIN barnum.whatsapp_events e ON e.workflow_id = w.id AND e.status = 'sent'
              JOIN barnum.appointments a ON a.id = w.appointment_id
             WHERE w.status = 'sent'
               AND cardinality(barnum.event_link_types(e.event_type)) > 0
               AND barnum.appointment_event_stale(e.event_type, a, w, v_now) IS NULL
             ORDER BY w.id, e.created_at DESC) x
         ORDER BY x.starts_at, x.created_at
    LOOP
        SELECT jsonb_object_agg(lt, v_base || '/api/action?type=' || lt || '&token='
                   || barnum.mint_token(lt, (r.ap).id, (r.ap).patient_id, (r.ev).workflow_id, NULL, v_now + v_ttl))
          INTO links
          FROM unnest(barnum.event_link_types((r.ev).event_type)) lt;
        result := result || jsonb_build_array(
            barnum.event_payload(r.ev, barnum.appointment_json(r.ap, v_tz), NULL, links));
    END LOOP;
    RETURN result;
END
$$;

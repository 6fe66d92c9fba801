-- 40_outbox: events into the outbox, fanned out into one delivery per
-- subscribed endpoint, and the relay's wake-up (SPEC §2.4).

CREATE OR REPLACE FUNCTION barnum.create_whatsapp_event(
    p_event_type text, p_entity_type text, p_entity_id uuid,
    p_workflow_id uuid DEFAULT NULL, p_scheduled_for timestamptz DEFAULT now())
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
BEGIN
    IF p_event_type IS NULL OR p_event_type !~ '^[a-z_]+\.[a-z_]+$' THEN
        PERFORM barnum.fail('BN400', format('event type must look like "appointment.confirmed", got %L', p_event_type));
    END IF;
    IF p_entity_id IS NULL THEN
        PERFORM barnum.fail('BN400', 'entity id is required');
    END IF;
    IF p_entity_type = 'appointment' THEN
        IF NOT EXISTS (SELECT 1 FROM barnum.appointments WHERE id = p_entity_id) THEN
            PERFORM barnum.fail('BN404', format('appointment %s not found', p_entity_id));
        END IF;
    ELSIF p_entity_type = 'patient' THEN
        IF NOT EXISTS (SELECT 1 FROM barnum.patients WHERE id = p_entity_id) THEN
            PERFORM barnum.fail('BN404', format('patient %s not found', p_entity_id));
        END IF;
    ELSE
        PERFORM barnum.fail('BN400', format('entity type must be appointment or patient, got %L', p_entity_type));
    END IF;
    IF p_workflow_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM barnum.whatsapp_workflows WHERE id = p_workflow_id) THEN
        PERFORM barnum.fail('BN404', format('workflow %s not found', p_workflow_id));
    END IF;
    RETURN barnum.emit_event(p_event_type, p_entity_type, p_entity_id, p_workflow_id, p_scheduled_for);
END
$$;

-- The insert itself, for Barnum's own triggers and functions: they pass
-- known-good arguments, so they skip the checks above (and the definer's
-- search_path switch, which costs more than the insert).  PL/pgSQL, not SQL:
-- a SQL function holding an INSERT is never inlined, and its INSERT was
-- planned again in every transaction.
CREATE OR REPLACE FUNCTION barnum.emit_event(
    p_event_type text, p_entity_type text, p_entity_id uuid,
    p_workflow_id uuid, p_scheduled_for timestamptz)
RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    v_id uuid;
BEGIN
    INSERT INTO barnum.whatsapp_events (event_type, entity_type, entity_id, workflow_id, scheduled_for, max_retries)
    VALUES (p_event_type, p_entity_type, p_entity_id, p_workflow_id,
            coalesce(p_scheduled_for, barnum.clock()), barnum.setting_int('max_attempts') - 1)
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

-- Wake the relays.  The payload is empty: the relay claims from the table,
-- the notification only says "look".  Postgres folds identical
-- notifications within a transaction into one, so a statement (or a whole
-- transaction) that inserts many events still sends one.
CREATE OR REPLACE FUNCTION barnum.wake_relays() RETURNS void
LANGUAGE sql
AS $$ SELECT pg_notify('barnum_events', '') $$;

-- Fan-out, per inserted event: one delivery per active endpoint of the
-- event's account whose patterns match; an event nobody wants is 'skipped' at once and its
-- workflow closed, so the open workflow does not block the next one (e.g. a
-- reactivation).  A row trigger, so that events a DBA inserts by hand fan
-- out exactly like Barnum's own.
--
-- Why per row and not per statement with a transition table: nearly every
-- event is inserted alone (by a trigger on one appointment), and for one row
-- the transition table's tuplestore plus the NOT EXISTS re-scans cost more
-- than the work itself (0.15 ms of a 1.25 ms booking; see bench/RESULTS.md).
--
-- Wake-ups: NOTIFY takes a database-wide lock at commit that serialises
-- committing transactions (halving insert throughput at 4 clients), so it
-- is sent only while a relay is idle and waiting (barnum.relay_waiters,
-- see relay_idle).  A busy relay needs no wake-up: it claims again as soon
-- as its batch is done.  Delayed work notifies too, so a waiting relay
-- re-reads next_due_at() for its timer.
-- Not SECURITY DEFINER (nor a pinned search_path, whose per-call cost here
-- was ~0.2 ms an event): outbox rows are inserted by create_whatsapp_event
-- and Barnum's triggers, themselves definer functions, or by the schema
-- owner directly.
CREATE OR REPLACE FUNCTION barnum.events_fanout_trg() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO barnum.webhook_deliveries (event_id, endpoint_id, next_attempt_at)
    SELECT NEW.id, ep.id, NEW.scheduled_for
      FROM barnum.webhook_endpoints ep
     WHERE ep.is_active AND ep.account_id = NEW.account_id
       -- An endpoint registered for one WhatsApp number hears only that
       -- number's messages (the seed: one webhook per number).
       AND (ep.phone_number IS NULL OR NEW.entity_type NOT IN ('message', 'session')
            OR ep.phone_number = NEW.data #>> '{metadata,display_phone_number}')
       AND ('*' = ANY (ep.event_types) OR NEW.event_type = ANY (ep.event_types)
                             OR barnum.glob_match(ep.event_types, NEW.event_type));
    IF NOT FOUND THEN
        UPDATE barnum.whatsapp_events
           SET status = 'skipped', last_error = 'no active endpoint', processed_at = now()
         WHERE id = NEW.id;
        UPDATE barnum.whatsapp_workflows w
           SET status = 'cancelled', metadata = w.metadata || '{"reason": "no active endpoint"}'
         WHERE w.id = NEW.workflow_id AND w.status = 'pending';
    ELSIF EXISTS (SELECT 1 FROM barnum.relay_waiters WHERE until > now()) THEN
        PERFORM barnum.wake_relays();
    END IF;
    RETURN NULL;
END
$$;
-- The statement-level trigger of the first release is replaced by the row
-- trigger below (same name, so one definition is live at any time).
SELECT barnum.ensure_trigger('barnum.whatsapp_events', 'trg_events_fanout', $trg$
CREATE OR REPLACE TRIGGER trg_events_fanout
    AFTER INSERT ON barnum.whatsapp_events
    FOR EACH ROW WHEN (NEW.status = 'pending')
    EXECUTE FUNCTION barnum.events_fanout_trg()
$trg$);

-- Event status summarises its deliveries; the workflow follows the event
-- ('sent' once delivered, 'failed' when it died, 'cancelled' with the reason
-- when it was skipped as stale).  Called by
-- every function that changes delivery states, for the events it touched.
CREATE OR REPLACE FUNCTION barnum.refresh_events(p_event_ids uuid[]) RETURNS void
LANGUAGE plpgsql
-- Planned once: re-planned per call (the default for an array parameter),
-- planning was twice the statement's run time for one event.
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    -- An event left with no delivery at all (its endpoint was removed) is
    -- skipped: nobody will ever send it.
    WITH s AS (
        SELECT ev.id AS event_id,
               CASE
                 WHEN bool_or(d.status = 'processing') THEN 'processing'
                 WHEN bool_or(d.status = 'pending') THEN 'pending'
                 WHEN bool_or(d.status = 'dead_letter') THEN 'dead_letter'
                 WHEN bool_or(d.status = 'sent') THEN 'sent'
                 ELSE 'skipped'
               END AS status,
               greatest(coalesce(max(d.attempts), 0) - 1, 0) AS retry_count,
               CASE WHEN count(d.id) = 0 THEN 'no delivery left (endpoint removed)'
                    ELSE (array_agg(d.last_error ORDER BY d.last_error IS NULL, d.id))[1] END AS last_error
          FROM unnest(p_event_ids) AS ev(id)
          LEFT JOIN barnum.webhook_deliveries d ON d.event_id = ev.id
         GROUP BY ev.id
    ), upd AS (
        UPDATE barnum.whatsapp_events e
           SET status = s.status,
               retry_count = s.retry_count,
               last_error = s.last_error,
               processed_at = CASE WHEN s.status IN ('sent', 'dead_letter', 'skipped') THEN now() END,
               updated_at = now()
          FROM s
         WHERE e.id = s.event_id
           AND (e.status, e.retry_count, e.last_error) IS DISTINCT FROM (s.status, s.retry_count, s.last_error)
        RETURNING e.workflow_id, e.status, e.last_error
    )
    UPDATE barnum.whatsapp_workflows w
       SET status = CASE upd.status WHEN 'sent' THEN 'sent' WHEN 'dead_letter' THEN 'failed' ELSE 'cancelled' END,
           metadata = CASE WHEN upd.status = 'skipped'
                           THEN w.metadata || jsonb_build_object('reason', upd.last_error)
                           ELSE w.metadata END
      FROM upd
     WHERE w.id = upd.workflow_id
       AND w.status = 'pending'
       AND upd.status IN ('sent', 'dead_letter', 'skipped');
END
$$;

-- ------------------------------------------------------------ URLs
-- The one URL parser for every address Barnum connects to (endpoints now,
-- the register API later).  RFC 3986: the authority runs from '//' to the
-- first '/', '?' or '#'; userinfo is the authority up to its LAST '@'.
-- Splitting never fails on 'scheme://…'; "problem" says why the URL is not
-- acceptable as a receiver (NULL when it is).  Stricter than RFC 3986 on
-- purpose: whatever passes has the same host and port for yarl (aiohttp),
-- urllib and the resolver (tests/test_urls.py), so no check can be fooled by
-- a host the client would not connect to.
CREATE OR REPLACE FUNCTION barnum.url_parts(p_url text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    m text[];
    scheme text; authority text; userinfo text; hostport text; host text; port_text text;
    path text; query text; fragment text;
    host_type text; port int; addr inet; label text; problem text;
    dotted_quad constant text := '^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$';
    -- RFC 3986 pchar, '/' and '?', and braces for the {event_type} placeholder.
    safe constant text := '^([A-Za-z0-9._~!$&''()*+,;=:@/?{}-]|%[0-9A-Fa-f]{2})*$';
BEGIN
    -- RFC 3986 appendix B, with the authority required.
    m := regexp_match(p_url, '^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^?#]*)(\?[^#]*)?(#.*)?$');
    IF m IS NULL THEN
        RETURN jsonb_build_object('problem', 'must be an http(s) URL like https://host/path');
    END IF;
    scheme := lower(m[1]);
    authority := m[2];
    path := m[3];
    query := substr(m[4], 2);
    fragment := substr(m[5], 2);
    IF strpos(authority, '@') > 0 THEN
        userinfo := substring(authority FROM '^(.*)@');   -- greedy: up to the last '@'
        hostport := substring(authority FROM '^.*@(.*)$');
    ELSE
        hostport := authority;
    END IF;
    IF hostport LIKE '[%' THEN
        host := substring(hostport FROM '^\[([^\]]*)\]');
        port_text := substring(hostport FROM '^\[[^\]]*\]:(.*)$');
        host_type := 'ipv6';
        IF host IS NULL OR hostport !~ '^\[[^\]]*\](:.*)?$' THEN
            problem := 'must have a valid host';
        END IF;
    ELSE
        host := lower(split_part(hostport, ':', 1));
        port_text := substring(hostport FROM '^[^:]*:(.*)$');
    END IF;

    IF problem IS NOT NULL THEN
        NULL;
    ELSIF scheme NOT IN ('http', 'https') THEN
        problem := 'must be an http(s) URL';
    ELSIF length(p_url) > 2048 THEN
        problem := 'must be at most 2048 characters';
    ELSIF strpos(p_url, '\') > 0 THEN
        problem := 'must not contain a backslash';
    ELSIF p_url ~ '[^!-~]' THEN
        problem := 'must not contain spaces, control or non-ASCII characters';
    ELSIF userinfo IS NOT NULL THEN
        -- Refused outright: credentials do not belong in a URL (use the
        -- endpoint secret), and an '@' is how hosts get smuggled past checks.
        problem := 'must not contain a user name or password (an "@" before the host)';
    ELSIF fragment IS NOT NULL THEN
        problem := 'must not have a #fragment';
    ELSIF host = '' THEN
        problem := 'must have a host';
    ELSIF host_type = 'ipv6' THEN
        -- No zone ids (%25eth0) and no IPvFuture; only a plain IPv6 address.
        IF host !~ '^[0-9A-Fa-f:.]+$' THEN
            problem := 'must have a valid IPv6 address in [brackets]';
        ELSE
            BEGIN
                addr := host::inet;
            EXCEPTION WHEN invalid_text_representation THEN
                addr := NULL;
            END;
            IF addr IS NULL OR family(addr) <> 6 THEN
                problem := 'must have a valid IPv6 address in [brackets]';
            ELSE
                host := lower(host);
            END IF;
        END IF;
    ELSIF host !~ '^[a-z0-9_.-]+$' THEN
        -- Also refuses percent-encoded hosts: clients decode them differently.
        problem := 'must have a host made of letters, digits, "-", "_" and "." (IDNs in punycode)';
    ELSIF split_part(host, '.', -1) ~ '^([0-9]+|0x[0-9a-f]*)$' THEN
        -- A numeric last label makes resolvers read an IPv4 number (127.1,
        -- 2130706433, 0x7f.1, 0177.0.0.1): only a canonical dotted quad.
        IF host !~ dotted_quad THEN
            problem := 'must have an IPv4 address as four decimal numbers 0-255 without leading zeros';
        ELSE
            host_type := 'ipv4';
        END IF;
    ELSIF length(host) > 253 THEN
        problem := 'must have a host name of at most 253 characters';
    ELSE
        host_type := 'name';
        FOREACH label IN ARRAY string_to_array(host, '.') LOOP
            IF label !~ '^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$' THEN
                problem := 'must have a host name of dot-separated labels of 1-63 letters, digits, "-" or "_"';
                EXIT;
            END IF;
        END LOOP;
    END IF;

    IF problem IS NULL AND port_text IS NOT NULL THEN
        IF port_text ~ '^[0-9]{1,5}$' AND port_text::int BETWEEN 1 AND 65535 THEN
            port := port_text::int;
        ELSE
            problem := 'must have a port between 1 and 65535 after the ":"';
        END IF;
    END IF;
    IF problem IS NULL AND (path !~ safe OR coalesce(query, '') !~ safe) THEN
        problem := 'must have a path and query of URL characters only (percent-encode the rest)';
    END IF;
    IF problem IS NULL AND replace(path || coalesce(query, ''), '{event_type}', '') ~ '[{}]' THEN
        problem := 'must not have braces other than the {event_type} placeholder';
    END IF;

    RETURN jsonb_build_object(
        'scheme', scheme, 'userinfo', userinfo, 'host', host, 'host_type', host_type, 'port', port,
        'path', path, 'query', query, 'fragment', fragment,
        'loopback', problem IS NULL AND (host = 'localhost'
                                         OR (host_type = 'ipv4' AND host LIKE '127.%')
                                         OR (host_type = 'ipv6' AND addr = '::1'::inet)),
        'problem', problem);
END
$$;
COMMENT ON FUNCTION barnum.url_parts(text) IS
    'Split an http(s) URL per RFC 3986 into scheme, userinfo, host, host_type (name|ipv4|ipv6), port, path, '
    'query, fragment, loopback; "problem" is NULL when the URL is acceptable to deliver to, else why not.';

-- The URL as operators see it: a userinfo (a credential) is masked.  Rows
-- stored before url_parts may still carry one.
CREATE OR REPLACE FUNCTION barnum.url_display(p_url text) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN u.j ->> 'userinfo' IS NULL THEN p_url
                ELSE left(p_url, length(u.j ->> 'scheme') + 3) || '***@'
                     || substr(p_url, length(u.j ->> 'scheme') + length(u.j ->> 'userinfo') + 5) END
      FROM (SELECT barnum.url_parts(p_url) AS j) u
$$;

CREATE OR REPLACE FUNCTION barnum.check_endpoint_url(p_url text) RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    problem text := barnum.url_parts(p_url) ->> 'problem';
BEGIN
    IF p_url IS NULL OR p_url = '' THEN
        PERFORM barnum.fail('BN422', 'endpoint URL must be an http(s) URL, got none');
    ELSIF problem IS NOT NULL THEN
        PERFORM barnum.fail('BN422', format('endpoint URL %s, got %L', problem, barnum.url_display(p_url)));
    END IF;
    RETURN p_url;
END
$$;

-- https is required for a receiver unless it is on this machine (loopback:
-- localhost, 127.0.0.0/8, [::1]) or the operator explicitly allows plain http.
CREATE OR REPLACE FUNCTION barnum.check_receiver_url(p_url text, p_allow_http boolean) RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    parts jsonb;
BEGIN
    PERFORM barnum.check_endpoint_url(p_url);
    parts := barnum.url_parts(p_url);
    IF parts ->> 'scheme' = 'http' AND NOT coalesce(p_allow_http, false) AND NOT (parts -> 'loopback')::boolean THEN
        PERFORM barnum.fail('BN422', format(
            'plain http is only allowed for loopback receivers; use https:// or allow http explicitly (%s)',
            parts ->> 'host'));
    END IF;
    RETURN p_url;
END
$$;

-- ------------------------------------------------------------ endpoints
CREATE OR REPLACE FUNCTION barnum.check_endpoint_name(p_name text) RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_name IS NULL OR p_name !~ '^[A-Za-z0-9_.-]{1,64}$' THEN
        PERFORM barnum.fail('BN400', format('endpoint name must be 1–64 of A-Z a-z 0-9 _ . -, got %L', p_name));
    END IF;
    RETURN p_name;
END
$$;

-- Make sure an endpoint with this name exists and points at this URL, under
-- the receiver URL rules.  Never re-enables one an operator disabled.
-- Owner only (`barnum dev`'s demo endpoint); the relay has ensure_endpoint.
CREATE OR REPLACE FUNCTION barnum.upsert_endpoint(p_name text, p_url text, p_allow_http boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = barnum, pg_temp
AS $$
DECLARE
    ep barnum.webhook_endpoints;
BEGIN
    PERFORM barnum.check_endpoint_name(p_name);
    PERFORM barnum.check_receiver_url(p_url, p_allow_http);
    INSERT INTO barnum.webhook_endpoints (name, url) VALUES (p_name, p_url)
    ON CONFLICT (name) DO UPDATE SET url = EXCLUDED.url
        WHERE webhook_endpoints.url IS DISTINCT FROM EXCLUDED.url;
    SELECT * INTO ep FROM barnum.webhook_endpoints WHERE name = p_name;
    RETURN barnum.endpoint_json(ep);
END
$$;

-- The relay's N8N_WEBHOOK_URL: it may only manage the endpoint named n8n
-- (not re-point others).  https unless loopback, as for `endpoints add`;
-- plain http to another host is kept only when it is already the stored URL
-- (an operator added it with `barnum endpoints add n8n URL --allow-http`).
CREATE OR REPLACE FUNCTION barnum.ensure_endpoint(p_name text, p_url text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
BEGIN
    IF p_name IS DISTINCT FROM 'n8n' THEN
        PERFORM barnum.fail('BN400', format(
            'ensure_endpoint manages only the endpoint named n8n, got %L; add others with barnum endpoints add',
            p_name));
    END IF;
    RETURN barnum.upsert_endpoint(p_name, p_url,
        EXISTS (SELECT 1 FROM barnum.webhook_endpoints WHERE name = p_name AND url = p_url));
END
$$;

-- An endpoint as operators see it: the secret never leaves the database
-- through this path, only whether one is set.  url_ok is false for a row
-- stored before the URL rules tightened (see url_problem): fix or remove it.
CREATE OR REPLACE FUNCTION barnum.endpoint_json(ep barnum.webhook_endpoints) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_build_object(
        'id', ep.id, 'name', ep.name,
        'url', barnum.url_display(ep.url),
        'url_ok', p.problem IS NULL, 'url_problem', p.problem,
        'has_secret', ep.secret IS NOT NULL,
        'event_types', to_jsonb(ep.event_types), 'is_active', ep.is_active,
        'status', ep.status, 'failure_count', ep.failure_count, 'last_error', ep.last_error,
        'disabled_reason', ep.metadata ->> 'disabled_reason',
        'account', (SELECT a.name FROM barnum.accounts a WHERE a.id = ep.account_id),
        'phone_number', ep.phone_number, 'kind', ep.kind,
        'token_env', CASE WHEN ep.kind = 'whatsapp_cloud' THEN ep.secret END,
        'templates', CASE WHEN ep.kind = 'whatsapp_cloud' THEN ep.config -> 'templates' END,
        'max_attempts', ep.max_attempts, 'timeout_ms', ep.timeout_ms,
        'created_at', ep.created_at, 'updated_at', ep.updated_at)
      FROM (SELECT barnum.url_parts(ep.url) ->> 'problem' AS problem) p
$$;

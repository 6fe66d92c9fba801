-- 85_api: accounts, API tokens and the webhook management API (SPEC-2 §A).
--
-- Every management call is one function that takes the caller's bearer
-- token itself: authentication, scoping to the token's account and
-- validation all happen here, so the shim only maps errors to HTTP.  Another
-- account's ids are "not found" (BN404), never "forbidden": an id's
-- existence is not revealed across accounts.

-- ------------------------------------------------------------ tokens
-- Plain tokens look like "bnt_" + 43 base64url characters; only their
-- SHA-256 is stored (barnum.token_hash, as for action tokens).
CREATE OR REPLACE FUNCTION barnum.api_account(p_token text, p_scope text) RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    t barnum.api_tokens;
BEGIN
    IF p_token IS NULL OR p_token !~ '^bnt_[A-Za-z0-9_-]{43}$' THEN
        PERFORM barnum.fail('BN401', 'missing or invalid API token');
    END IF;
    SELECT * INTO t FROM barnum.api_tokens WHERE token_hash = barnum.token_hash(p_token);
    IF NOT FOUND OR t.revoked_at IS NOT NULL THEN
        PERFORM barnum.fail('BN401', 'missing or invalid API token');
    END IF;
    IF NOT p_scope = ANY (t.scopes) THEN
        -- Known but not allowed: 403 (RFC 6750 insufficient_scope), not 401.
        PERFORM barnum.fail('BN403', format('this token lacks the scope %s', p_scope));
    END IF;
    -- At most one write a minute per token: reads stay reads.
    IF t.last_used_at IS NULL OR t.last_used_at < now() - interval '1 minute' THEN
        UPDATE barnum.api_tokens SET last_used_at = now()
         WHERE account_id = t.account_id AND id = t.id;
    END IF;
    RETURN t.account_id;
END
$$;

CREATE OR REPLACE FUNCTION barnum.account_id_by_name(p_account text) RETURNS uuid
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v uuid;
BEGIN
    SELECT id INTO v FROM barnum.accounts WHERE name = p_account;
    IF NOT FOUND THEN
        PERFORM barnum.fail('BN404', format('no account named %L (create it with: barnum accounts add %s)',
                                            p_account, coalesce(p_account, 'NAME')));
    END IF;
    RETURN v;
END
$$;

-- Operators (barnum accounts / barnum tokens): the schema owner calls these.
CREATE OR REPLACE FUNCTION barnum.account_add(p_name text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    a barnum.accounts;
BEGIN
    IF p_name IS NULL OR p_name !~ '^[A-Za-z0-9_.-]{1,64}$' THEN
        PERFORM barnum.fail('BN422', format('account name must be 1–64 of A-Z a-z 0-9 _ . -, got %L', p_name));
    END IF;
    INSERT INTO barnum.accounts (name) VALUES (p_name) ON CONFLICT (name) DO NOTHING RETURNING * INTO a;
    IF NOT FOUND THEN
        PERFORM barnum.fail('BN409', format('an account named %L exists already', p_name));
    END IF;
    RETURN jsonb_build_object('id', a.id, 'name', a.name, 'created_at', a.created_at);
END
$$;

CREATE OR REPLACE FUNCTION barnum.account_list() RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'id', a.id, 'name', a.name, 'created_at', a.created_at,
               'endpoints', (SELECT count(*) FROM barnum.webhook_endpoints ep WHERE ep.account_id = a.id),
               'active_tokens', (SELECT count(*) FROM barnum.api_tokens t
                                  WHERE t.account_id = a.id AND t.revoked_at IS NULL))
               ORDER BY a.name), '[]')
      FROM barnum.accounts a
$$;

CREATE OR REPLACE FUNCTION barnum.api_token_json(t barnum.api_tokens, p_account text) RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$
    SELECT jsonb_build_object('id', t.id, 'account', p_account, 'name', t.name, 'scopes', to_jsonb(t.scopes),
                              'created_at', t.created_at, 'last_used_at', t.last_used_at,
                              'revoked_at', t.revoked_at)
$$;

-- Returns the token's description with the plain token: the only time it exists.
CREATE OR REPLACE FUNCTION barnum.api_token_create(p_account text, p_name text, p_scopes text[] DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    v_account uuid := barnum.account_id_by_name(p_account);
    tok text := 'bnt_' || barnum.new_token();
    t barnum.api_tokens;
BEGIN
    IF p_name IS NULL OR length(btrim(p_name)) NOT BETWEEN 1 AND 100 THEN
        PERFORM barnum.fail('BN422', 'token name must be 1–100 characters');
    END IF;
    IF p_scopes IS NOT NULL AND (cardinality(p_scopes) = 0
                                 OR NOT p_scopes <@ '{webhooks:read,webhooks:write,conversations:read}') THEN
        PERFORM barnum.fail('BN422', format('scopes must be among webhooks:read, webhooks:write, conversations:read, got %s',
                                            array_to_string(p_scopes, ',')));
    END IF;
    INSERT INTO barnum.api_tokens (account_id, name, token_hash, scopes)
    VALUES (v_account, btrim(p_name), barnum.token_hash(tok),
            coalesce(p_scopes, '{webhooks:read,webhooks:write}'))
    RETURNING * INTO t;
    RETURN barnum.api_token_json(t, p_account) || jsonb_build_object('token', tok);
END
$$;

CREATE OR REPLACE FUNCTION barnum.api_token_list(p_account text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    v_account uuid := CASE WHEN p_account IS NOT NULL THEN barnum.account_id_by_name(p_account) END;
BEGIN
    RETURN (SELECT coalesce(jsonb_agg(barnum.api_token_json(t, a.name) ORDER BY a.name, t.created_at), '[]')
              FROM barnum.api_tokens t JOIN barnum.accounts a ON a.id = t.account_id
             WHERE v_account IS NULL OR t.account_id = v_account);
END
$$;

CREATE OR REPLACE FUNCTION barnum.api_token_revoke(p_id text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    t barnum.api_tokens;
    v_name text;
BEGIN
    UPDATE barnum.api_tokens SET revoked_at = coalesce(revoked_at, now())
     WHERE id = barnum.uuid_or_404(p_id, 'token')
    RETURNING * INTO t;
    IF NOT FOUND THEN
        PERFORM barnum.fail('BN404', format('no token with id %s', p_id));
    END IF;
    SELECT name INTO v_name FROM barnum.accounts WHERE id = t.account_id;
    RETURN barnum.api_token_json(t, v_name);
END
$$;

-- ------------------------------------------------------------ endpoint status
-- is_active (what the claim reads) and status (why it is off) move together
-- whichever one a writer sets, so code and DBAs that only know is_active keep
-- working; switching an endpoint on resets its failure counter.
CREATE OR REPLACE FUNCTION barnum.endpoint_status_trg() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status <> 'active' THEN
            NEW.is_active := false;
        ELSIF NOT NEW.is_active THEN
            NEW.status := 'inactive';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        NEW.is_active := NEW.status = 'active';
    ELSIF NEW.is_active IS DISTINCT FROM OLD.is_active THEN
        NEW.status := CASE WHEN NEW.is_active THEN 'active' ELSE 'inactive' END;
    END IF;
    IF NEW.is_active AND NOT OLD.is_active THEN
        NEW.failure_count := 0;
        NEW.failing_since := NULL;
    END IF;
    RETURN NEW;
END
$$;
SELECT barnum.ensure_trigger('barnum.webhook_endpoints', 'trg_endpoint_status', $trg$
CREATE OR REPLACE TRIGGER trg_endpoint_status
    BEFORE INSERT OR UPDATE ON barnum.webhook_endpoints
    FOR EACH ROW EXECUTE FUNCTION barnum.endpoint_status_trg()
$trg$);

-- A URL is checked whatever writes it (a DBA's INSERT included): the
-- structural rules of url_parts; https-unless-loopback stays the business of
-- the functions that know whether plain http was allowed.
CREATE OR REPLACE FUNCTION barnum.endpoint_url_trg() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM barnum.check_endpoint_url(NEW.url);
    RETURN NEW;
END
$$;
SELECT barnum.ensure_trigger('barnum.webhook_endpoints', 'trg_endpoint_url', $trg$
CREATE OR REPLACE TRIGGER trg_endpoint_url
    BEFORE INSERT OR UPDATE OF url ON barnum.webhook_endpoints
    FOR EACH ROW EXECUTE FUNCTION barnum.endpoint_url_trg()
$trg$);

-- Endpoints stored before the URL rules with a URL they refuse are switched
-- off ('failed', with the reason): a URL such as http://evil#@localhost/
-- reaches another host than it shows.  Run whenever this file is applied.
CREATE OR REPLACE FUNCTION barnum.disable_refused_urls() RETURNS int
LANGUAGE sql
AS $$
    WITH off AS (
        UPDATE barnum.webhook_endpoints
           SET status = 'failed',
               metadata = metadata || jsonb_build_object(
                   'disabled_reason', 'URL refused by the URL rules: ' || (barnum.url_parts(url) ->> 'problem'),
                   'disabled_at', now())
         WHERE status = 'active' AND barnum.url_parts(url) ->> 'problem' IS NOT NULL
        RETURNING 1)
    SELECT count(*)::int FROM off
$$;
SELECT barnum.disable_refused_urls();

-- ------------------------------------------------------------ helpers
-- An id from a URL path: a malformed one names nothing, so it is "not found".
CREATE OR REPLACE FUNCTION barnum.uuid_or_404(p_id text, p_what text) RETURNS uuid
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_id IS NULL OR p_id !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        PERFORM barnum.fail('BN404', format('no %s with id %s', p_what, left(coalesce(p_id, ''), 64)));
    END IF;
    RETURN p_id::uuid;
END
$$;

-- The account's endpoint, or BN404 (also for another account's id).
CREATE OR REPLACE FUNCTION barnum.api_endpoint(p_account uuid, p_id text, p_lock boolean DEFAULT false)
RETURNS barnum.webhook_endpoints
LANGUAGE plpgsql
AS $$
DECLARE
    ep barnum.webhook_endpoints;
    v_id uuid := barnum.uuid_or_404(p_id, 'webhook');
BEGIN
    IF p_lock THEN
        SELECT * INTO ep FROM barnum.webhook_endpoints WHERE id = v_id AND account_id = p_account FOR UPDATE;
    ELSE
        SELECT * INTO ep FROM barnum.webhook_endpoints WHERE id = v_id AND account_id = p_account;
    END IF;
    IF NOT FOUND THEN
        PERFORM barnum.fail('BN404', format('no webhook with id %s', v_id));
    END IF;
    RETURN ep;
END
$$;

-- A webhook as its owner sees it (the seed's field names).  The signing
-- secret is shown only when created or rotated.
CREATE OR REPLACE FUNCTION barnum.api_webhook_json(ep barnum.webhook_endpoints) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_build_object(
        'id', ep.id, 'phone_number', ep.phone_number, 'webhook_url', ep.url,
        'is_active', ep.is_active, 'status', ep.status, 'failure_count', ep.failure_count,
        'max_retries', coalesce(ep.max_attempts, barnum.setting_int('max_attempts')) - 1,
        'event_types', to_jsonb(ep.event_types), 'timeout_ms', ep.timeout_ms,
        'last_error', ep.last_error, 'last_success_at', ep.last_success_at,
        'last_attempt_at', ep.last_attempt_at, 'metadata', ep.metadata,
        'created_at', ep.created_at, 'updated_at', ep.updated_at)
$$;

-- Fields a request body may carry; anything else is a typo worth reporting.
CREATE OR REPLACE FUNCTION barnum.api_check_fields(p_body jsonb, p_allowed text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    extra text;
BEGIN
    IF p_body IS NULL OR jsonb_typeof(p_body) <> 'object' THEN
        PERFORM barnum.fail('BN400', 'the body must be a JSON object');
    END IF;
    SELECT string_agg(k, ', ' ORDER BY k) INTO extra FROM jsonb_object_keys(p_body) k WHERE k <> ALL (p_allowed);
    IF extra IS NOT NULL THEN
        PERFORM barnum.fail('BN400', format('unknown field(s): %s (allowed: %s)', extra, array_to_string(p_allowed, ', ')));
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION barnum.api_phone(p_value jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_value IS NULL OR jsonb_typeof(p_value) <> 'string' OR (p_value #>> '{}') !~ '^\+?[0-9]{7,15}$' THEN
        PERFORM barnum.fail('BN422', format('phone_number must be a string of 7–15 digits (an optional leading +), got %s',
                                            coalesce(left(p_value::text, 40), 'nothing')));
    END IF;
    -- One spelling per number, so the (account, number) key cannot be dodged.
    RETURN ltrim(p_value #>> '{}', '+');
END
$$;

CREATE OR REPLACE FUNCTION barnum.api_url(p_value jsonb) RETURNS text
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_value IS NULL OR jsonb_typeof(p_value) <> 'string' THEN
        PERFORM barnum.fail('BN422', 'webhook_url must be a string: an https:// URL (http only to a loopback host)');
    END IF;
    IF length(p_value #>> '{}') > 2048 THEN
        PERFORM barnum.fail('BN422', 'webhook_url must be at most 2048 characters');
    END IF;
    -- The one URL rule of every endpoint (95_operator): https unless loopback.
    RETURN barnum.check_receiver_url(p_value #>> '{}', false);
END
$$;

CREATE OR REPLACE FUNCTION barnum.api_max_attempts(p_value jsonb) RETURNS int
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF jsonb_typeof(p_value) <> 'number' OR p_value::numeric <> trunc(p_value::numeric)
       OR p_value::numeric NOT BETWEEN 0 AND 10 THEN
        PERFORM barnum.fail('BN422', format('max_retries must be an integer from 0 to 10, got %s', left(p_value::text, 40)));
    END IF;
    RETURN (p_value::numeric)::int + 1;
END
$$;

CREATE OR REPLACE FUNCTION barnum.api_event_types(p_value jsonb) RETURNS text[]
LANGUAGE plpgsql
AS $$
DECLARE
    v text[];
BEGIN
    IF jsonb_typeof(p_value) <> 'array' OR jsonb_array_length(p_value) NOT BETWEEN 1 AND 50
       OR EXISTS (SELECT 1 FROM jsonb_array_elements(p_value) x WHERE jsonb_typeof(x) <> 'string') THEN
        PERFORM barnum.fail('BN422', 'event_types must be an array of 1–50 strings such as ["message.*"]');
    END IF;
    SELECT array_agg(x ORDER BY n) INTO v FROM jsonb_array_elements_text(p_value) WITH ORDINALITY AS t(x, n);
    RETURN barnum.check_event_patterns(v);
END
$$;

CREATE OR REPLACE FUNCTION barnum.api_metadata(p_value jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF jsonb_typeof(p_value) <> 'object' THEN
        PERFORM barnum.fail('BN422', 'metadata must be a JSON object');
    END IF;
    IF length(p_value::text) > 16384 THEN
        PERFORM barnum.fail('BN422', 'metadata must be at most 16 KiB of JSON');
    END IF;
    RETURN p_value;
END
$$;

-- A new signing secret for an endpoint, Standard Webhooks style.
CREATE OR REPLACE FUNCTION barnum.new_endpoint_secret() RETURNS text
LANGUAGE sql VOLATILE
AS $$ SELECT 'whsec_' || encode(barnum.random_bytes(32), 'base64') $$;

-- ------------------------------------------------------------ webhooks
-- POST /api/webhooks/register: upsert by (account, phone_number).  Registering
-- again is an explicit act: it re-activates a failed or disabled webhook.
CREATE OR REPLACE FUNCTION barnum.api_register_webhook(p_token text, p_body jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    v_account uuid := barnum.api_account(p_token, 'webhooks:write');
    v_phone text;
    v_url text;
    v_attempts int;
    v_types text[];
    v_meta jsonb;
    v_secret text := barnum.new_endpoint_secret();
    v_id uuid := gen_random_uuid();
    ep barnum.webhook_endpoints;
    created boolean;
BEGIN
    PERFORM barnum.api_check_fields(p_body, '{phone_number,webhook_url,max_retries,event_types,metadata}');
    IF NOT p_body ? 'phone_number' THEN
        PERFORM barnum.fail('BN400', 'phone_number is required');
    END IF;
    IF NOT p_body ? 'webhook_url' THEN
        PERFORM barnum.fail('BN400', 'webhook_url is required');
    END IF;
    v_phone := barnum.api_phone(p_body -> 'phone_number');
    v_url := barnum.api_url(p_body -> 'webhook_url');
    -- The seed's defaults for API-registered webhooks: 3 retries.
    v_attempts := barnum.api_max_attempts(coalesce(p_body -> 'max_retries', '3'));
    v_types := CASE WHEN p_body ? 'event_types' THEN barnum.api_event_types(p_body -> 'event_types') ELSE '{*}' END;
    v_meta := CASE WHEN p_body ? 'metadata' THEN barnum.api_metadata(p_body -> 'metadata') ELSE '{}' END;

    INSERT INTO barnum.webhook_endpoints AS w
        (id, account_id, name, url, secret, event_types, max_attempts, timeout_ms, phone_number, metadata)
    VALUES (v_id, v_account, 'api-' || v_id, v_url, v_secret, v_types, v_attempts, 10000, v_phone, v_meta)
    ON CONFLICT (account_id, phone_number) WHERE phone_number IS NOT NULL DO UPDATE
       SET url = EXCLUDED.url, max_attempts = EXCLUDED.max_attempts,
           event_types = CASE WHEN p_body ? 'event_types' THEN EXCLUDED.event_types ELSE w.event_types END,
           metadata = CASE WHEN p_body ? 'metadata' THEN EXCLUDED.metadata ELSE w.metadata END,
           is_active = true, status = 'active', failure_count = 0, failing_since = NULL,
           updated_at = now()
    RETURNING * INTO ep;
    created := ep.id = v_id;
    RETURN jsonb_build_object('created', created, 'webhook',
        barnum.api_webhook_json(ep) || CASE WHEN created THEN jsonb_build_object('secret', ep.secret) ELSE '{}' END);
END
$$;

CREATE OR REPLACE FUNCTION barnum.api_list_webhooks(p_token text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    v_account uuid := barnum.api_account(p_token, 'webhooks:read');
BEGIN
    RETURN jsonb_build_object('webhooks', (
        SELECT coalesce(jsonb_agg(barnum.api_webhook_json(ep) ORDER BY ep.created_at, ep.id), '[]')
          FROM barnum.webhook_endpoints ep WHERE ep.account_id = v_account));
END
$$;

CREATE OR REPLACE FUNCTION barnum.api_get_webhook(p_token text, p_id text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    v_account uuid := barnum.api_account(p_token, 'webhooks:read');
BEGIN
    RETURN jsonb_build_object('webhook', barnum.api_webhook_json(barnum.api_endpoint(v_account, p_id)));
END
$$;

-- PATCH: only the fields present change.  is_active true re-activates and
-- resets the failure counter; rotate_secret returns the new secret once.
CREATE OR REPLACE FUNCTION barnum.api_update_webhook(p_token text, p_id text, p_body jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    v_account uuid := barnum.api_account(p_token, 'webhooks:write');
    ep barnum.webhook_endpoints;
    v_secret text;
BEGIN
    PERFORM barnum.api_check_fields(p_body,
        '{phone_number,webhook_url,max_retries,event_types,metadata,is_active,rotate_secret}');
    IF p_body = '{}' THEN
        PERFORM barnum.fail('BN400', 'nothing to update: send at least one field');
    END IF;
    IF p_body ? 'is_active' AND jsonb_typeof(p_body -> 'is_active') <> 'boolean' THEN
        PERFORM barnum.fail('BN422', 'is_active must be true or false');
    END IF;
    IF p_body ? 'rotate_secret' AND p_body -> 'rotate_secret' <> 'true' THEN
        PERFORM barnum.fail('BN422', 'rotate_secret must be true when present');
    END IF;
    ep := barnum.api_endpoint(v_account, p_id, true);
    IF p_body ? 'rotate_secret' THEN
        v_secret := barnum.new_endpoint_secret();
    END IF;
    BEGIN
        UPDATE barnum.webhook_endpoints w SET
            phone_number = CASE WHEN p_body ? 'phone_number' THEN barnum.api_phone(p_body -> 'phone_number') ELSE w.phone_number END,
            url = CASE WHEN p_body ? 'webhook_url' THEN barnum.api_url(p_body -> 'webhook_url') ELSE w.url END,
            max_attempts = CASE WHEN p_body ? 'max_retries' THEN barnum.api_max_attempts(p_body -> 'max_retries') ELSE w.max_attempts END,
            event_types = CASE WHEN p_body ? 'event_types' THEN barnum.api_event_types(p_body -> 'event_types') ELSE w.event_types END,
            metadata = CASE WHEN p_body ? 'metadata' THEN barnum.api_metadata(p_body -> 'metadata') ELSE w.metadata END,
            secret = coalesce(v_secret, w.secret),
            is_active = CASE WHEN p_body ? 'is_active' THEN (p_body ->> 'is_active')::boolean ELSE w.is_active END,
            status = CASE WHEN NOT p_body ? 'is_active' THEN w.status
                          WHEN (p_body ->> 'is_active')::boolean THEN 'active' ELSE 'inactive' END,
            failure_count = CASE WHEN (p_body ->> 'is_active')::boolean THEN 0 ELSE w.failure_count END,
            failing_since = CASE WHEN (p_body ->> 'is_active')::boolean THEN NULL ELSE w.failing_since END,
            updated_at = now()
         WHERE w.id = ep.id
        RETURNING * INTO ep;
    EXCEPTION WHEN unique_violation THEN
        PERFORM barnum.fail('BN409', format('another webhook of this account already has phone_number %s',
                                            p_body ->> 'phone_number'));
    END;
    RETURN jsonb_build_object('webhook', barnum.api_webhook_json(ep)
        || CASE WHEN v_secret IS NOT NULL THEN jsonb_build_object('secret', v_secret) ELSE '{}' END);
END
$$;

-- DELETE: the webhook and its queued deliveries go; events stay in the outbox.
CREATE OR REPLACE FUNCTION barnum.api_delete_webhook(p_token text, p_id text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    v_account uuid := barnum.api_account(p_token, 'webhooks:write');
    ep barnum.webhook_endpoints := barnum.api_endpoint(v_account, p_id, true);
    touched uuid[];
BEGIN
    SELECT array_agg(DISTINCT event_id) INTO touched
      FROM barnum.webhook_deliveries WHERE endpoint_id = ep.id AND status IN ('pending', 'processing');
    DELETE FROM barnum.webhook_endpoints WHERE id = ep.id;
    IF touched IS NOT NULL THEN
        PERFORM barnum.refresh_events(touched);
    END IF;
    RETURN jsonb_build_object('deleted', true, 'id', ep.id);
END
$$;

-- GET /api/webhooks/{id}/events: this webhook's deliveries, newest first,
-- each with its attempts.  The cursor is the last delivery id of a page.
CREATE OR REPLACE FUNCTION barnum.api_webhook_events(p_token text, p_id text, p_cursor text DEFAULT NULL,
                                                     p_limit int DEFAULT 50)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    v_account uuid := barnum.api_account(p_token, 'webhooks:read');
    ep barnum.webhook_endpoints := barnum.api_endpoint(v_account, p_id);
    v_after bigint;
    v_items jsonb;
    v_last bigint;
    v_count int;
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 200 THEN
        PERFORM barnum.fail('BN422', format('limit must be between 1 and 200, got %s', coalesce(p_limit::text, 'nothing')));
    END IF;
    IF p_cursor IS NOT NULL THEN
        IF p_cursor !~ '^[0-9]{1,18}$' THEN
            PERFORM barnum.fail('BN422', 'cursor must be the next_cursor of a previous page');
        END IF;
        v_after := p_cursor::bigint;
    END IF;
    SELECT jsonb_agg(item ORDER BY did DESC), min(did), count(*) INTO v_items, v_last, v_count
      FROM (
        SELECT d.id AS did, jsonb_build_object(
                   'event_id', e.id, 'event_type', e.event_type, 'status', d.status,
                   'attempt_count', d.attempts, 'http_status', d.last_http_status,
                   'response', (SELECT left(a.response_body, 1024) FROM barnum.webhook_attempts a
                                 WHERE a.delivery_id = d.id ORDER BY a.id DESC LIMIT 1),
                   'error', d.last_error,
                   'next_retry_at', CASE WHEN d.status = 'pending' THEN d.next_attempt_at END,
                   'created_at', d.created_at, 'delivered_at', d.delivered_at,
                   'attempts', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                                    'attempt', a.attempt, 'started_at', a.started_at, 'duration_ms', a.duration_ms,
                                    'http_status', a.http_status, 'response', left(a.response_body, 1024),
                                    'error', a.error) ORDER BY a.id), '[]')
                                  FROM barnum.webhook_attempts a WHERE a.delivery_id = d.id)) AS item
          FROM barnum.webhook_deliveries d
          JOIN barnum.whatsapp_events e ON e.id = d.event_id
         WHERE d.endpoint_id = ep.id AND (v_after IS NULL OR d.id < v_after)
         ORDER BY d.id DESC
         LIMIT p_limit) page;
    RETURN jsonb_build_object(
        'events', coalesce(v_items, '[]'),
        'next_cursor', CASE WHEN v_count = p_limit AND EXISTS (
                                 SELECT 1 FROM barnum.webhook_deliveries d
                                  WHERE d.endpoint_id = ep.id AND d.id < v_last)
                            THEN v_last::text END);
END
$$;

-- POST /api/webhooks/events/{event_id}/retry: this account's dead deliveries
-- of one event go out again.
CREATE OR REPLACE FUNCTION barnum.api_retry_event(p_token text, p_event_id text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    v_account uuid := barnum.api_account(p_token, 'webhooks:write');
    v_event uuid := barnum.uuid_or_404(p_event_id, 'event');
    ids bigint[];
    n int;
BEGIN
    SELECT array_agg(d.id) FILTER (WHERE d.status = 'dead_letter'), count(*) INTO ids, n
      FROM barnum.webhook_deliveries d
      JOIN barnum.webhook_endpoints ep ON ep.id = d.endpoint_id
     WHERE d.event_id = v_event AND ep.account_id = v_account;
    IF n = 0 THEN
        PERFORM barnum.fail('BN404', format('no event with id %s for your webhooks', v_event));
    END IF;
    IF ids IS NULL THEN
        PERFORM barnum.fail('BN409', 'nothing to retry: no delivery of this event has failed for good');
    END IF;
    RETURN jsonb_build_object('event_id', v_event, 'retried', barnum.requeue_deliveries(ids));
END
$$;

-- POST /api/webhooks/{id}/replay {since, until}: send again what this
-- webhook missed in a time range — its dead letters, and the account's
-- events it never got (created while it was off) that its patterns match.
-- Stale appointment messages are still skipped at claim time.
CREATE OR REPLACE FUNCTION barnum.api_replay_webhook(p_token text, p_id text, p_body jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    v_account uuid := barnum.api_account(p_token, 'webhooks:write');
    ep barnum.webhook_endpoints;
    v_since timestamptz;
    v_until timestamptz;
    v_now timestamptz := barnum.clock();
    ids bigint[];
    events uuid[];
    v_requeued int;
    v_created int;
BEGIN
    PERFORM barnum.api_check_fields(p_body, '{since,until}');
    ep := barnum.api_endpoint(v_account, p_id, true);
    IF NOT p_body ? 'since' THEN
        PERFORM barnum.fail('BN400', 'since is required (an ISO 8601 time)');
    END IF;
    v_since := barnum.api_time(p_body -> 'since', 'since');
    v_until := CASE WHEN p_body ? 'until' THEN barnum.api_time(p_body -> 'until', 'until') ELSE v_now END;
    IF v_since >= v_until THEN
        PERFORM barnum.fail('BN422', 'since must be before until');
    END IF;
    IF v_until - v_since > interval '31 days' THEN
        PERFORM barnum.fail('BN422', 'a replay covers at most 31 days');
    END IF;
    IF NOT ep.is_active THEN
        PERFORM barnum.fail('BN409', 'the webhook is not active: enable it first (PATCH {"is_active": true})');
    END IF;
    SELECT array_agg(d.id) INTO ids
      FROM barnum.webhook_deliveries d JOIN barnum.whatsapp_events e ON e.id = d.event_id
     WHERE d.endpoint_id = ep.id AND d.status = 'dead_letter'
       AND e.created_at >= v_since AND e.created_at < v_until;
    v_requeued := CASE WHEN ids IS NULL THEN 0 ELSE barnum.requeue_deliveries(ids) END;
    WITH ins AS (
        INSERT INTO barnum.webhook_deliveries (event_id, endpoint_id, next_attempt_at)
        SELECT e.id, ep.id, v_now
          FROM barnum.whatsapp_events e
         WHERE e.account_id = v_account AND e.created_at >= v_since AND e.created_at < v_until
           AND barnum.glob_match(ep.event_types, e.event_type)
           AND NOT EXISTS (SELECT 1 FROM barnum.webhook_deliveries d WHERE d.event_id = e.id AND d.endpoint_id = ep.id)
        ON CONFLICT (event_id, endpoint_id) DO NOTHING
        RETURNING event_id)
    SELECT count(*), array_agg(event_id) INTO v_created, events FROM ins;
    IF v_created > 0 THEN
        PERFORM barnum.refresh_events(events);
        PERFORM barnum.wake_relays();
    END IF;
    RETURN jsonb_build_object('webhook_id', ep.id, 'since', v_since, 'until', v_until,
                              'requeued', v_requeued, 'created', v_created);
END
$$;

CREATE OR REPLACE FUNCTION barnum.api_time(p_value jsonb, p_field text) RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF jsonb_typeof(p_value) <> 'string'
       OR (p_value #>> '{}') !~ '^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}(:?\d{2})?)?)?$' THEN
        PERFORM barnum.fail('BN422', format('%s must be an ISO 8601 time such as "2026-12-01T10:00:00Z"', p_field));
    END IF;
    BEGIN
        RETURN (p_value #>> '{}')::timestamptz;
    EXCEPTION WHEN others THEN
        PERFORM barnum.fail('BN422', format('%s: %s is not a valid time', p_field, p_value));
    END;
    RETURN NULL;
END
$$;

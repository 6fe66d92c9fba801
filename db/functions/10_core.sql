-- 10_core: small helpers every other file uses — the clock, settings, errors.
--
-- Convention: API functions are SECURITY DEFINER with a pinned search_path.
-- Internal helpers carry no SET clause: they are only reached from those
-- API functions (whose pinned path they inherit) and name every object
-- schema-qualified; without the SET, Postgres can inline the SQL ones and
-- skips a GUC save/restore per call — about 15 % of a patient's action.

-- The clock.  Business rules ask barnum.clock() instead of now() so tests (and
-- a DBA replaying a day) can move time: `SET barnum.clock = '2026-03-01 10:00Z'`
-- in a session or transaction.  Unset, it is now() (transaction start).
CREATE OR REPLACE FUNCTION barnum.clock() RETURNS timestamptz
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(nullif(current_setting('barnum.clock', true), '')::timestamptz, now())
$$;

-- Raise a Barnum error: SQLSTATE BN4xx that the shim maps to an HTTP status.
-- p_detail carries machine-readable context (the shim reads the locale there).
CREATE OR REPLACE FUNCTION barnum.fail(p_code text, p_message text, p_detail text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_detail IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = p_code, MESSAGE = p_message;
    END IF;
    RAISE EXCEPTION USING ERRCODE = p_code, MESSAGE = p_message, DETAIL = p_detail;
END
$$;

-- Create or replace a trigger only when its definition changed: CREATE OR
-- REPLACE TRIGGER takes a SHARE ROW EXCLUSIVE lock on the table even when
-- nothing changes, and re-applying the function files must not queue a busy
-- table's traffic behind that (issue 18).  The definition's digest is kept
-- as the trigger's comment.
CREATE OR REPLACE FUNCTION barnum.ensure_trigger(p_table regclass, p_name text, p_create text) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    want text := 'barnum:' || md5(p_create);
BEGIN
    IF EXISTS (SELECT 1 FROM pg_trigger t
                WHERE t.tgrelid = p_table AND t.tgname = p_name AND NOT t.tgisinternal
                  AND obj_description(t.oid, 'pg_trigger') = want) THEN
        RETURN;
    END IF;
    EXECUTE p_create;
    EXECUTE format('COMMENT ON TRIGGER %I ON %s IS %L', p_name, p_table, want);
END
$$;

-- Raw jsonb value of a setting; unknown keys are a programming error.
CREATE OR REPLACE FUNCTION barnum.setting(p_key text) RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v jsonb;
BEGIN
    SELECT value INTO v FROM barnum.settings WHERE key = p_key;
    IF NOT FOUND THEN
        PERFORM barnum.fail('BN404', format('unknown setting %L', p_key));
    END IF;
    RETURN v;
END
$$;

CREATE OR REPLACE FUNCTION barnum.setting_text(p_key text) RETURNS text
LANGUAGE sql STABLE
AS $$ SELECT barnum.setting(p_key) #>> '{}' $$;

CREATE OR REPLACE FUNCTION barnum.setting_interval(p_key text) RETURNS interval
LANGUAGE sql STABLE
AS $$ SELECT (barnum.setting(p_key) #>> '{}')::interval $$;

CREATE OR REPLACE FUNCTION barnum.setting_int(p_key text) RETURNS int
LANGUAGE sql STABLE
AS $$ SELECT (barnum.setting(p_key) #>> '{}')::int $$;

-- Is this an http(s) base URL the links can safely start with?  NULL when
-- yes, else why not.  Only scheme://host[:port][/path]: a user name ('@')
-- would let a link show one host and open another, a query or fragment
-- would swallow the /api/action?… the relay appends.
CREATE OR REPLACE FUNCTION barnum.base_url_problem(p_url text) RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    m text[];
    host text;
    label text;
BEGIN
    IF length(p_url) > 2000 THEN
        RETURN 'is longer than 2000 characters';
    ELSIF p_url ~ '[[:space:][:cntrl:]]' THEN
        RETURN 'must not contain whitespace or control characters';
    ELSIF strpos(p_url, '\') > 0 THEN
        RETURN 'must not contain a backslash';
    ELSIF strpos(p_url, '@') > 0 THEN
        RETURN 'must not contain a user name or password (''@'')';
    ELSIF strpos(p_url, '?') > 0 THEN
        RETURN 'must not contain a query (''?'')';
    ELSIF strpos(p_url, '#') > 0 THEN
        RETURN 'must not contain a fragment (''#'')';
    END IF;
    m := regexp_match(p_url, '^https?://([^/:]+|\[[0-9A-Fa-f:.]+\])(:[0-9]*)?(/.*)?$');
    IF m IS NULL THEN
        RETURN 'must be http:// or https:// followed by a host';
    END IF;
    host := m[1];
    IF host LIKE '[%' THEN
        -- An IPv6 literal: let inet judge it.
        BEGIN
            PERFORM substr(host, 2, length(host) - 2)::inet;
        EXCEPTION WHEN others THEN
            RETURN format('has an invalid IPv6 address %s', host);
        END;
    ELSIF host ~ '^[0-9.]+$' THEN
        IF host !~ '^([0-9]{1,3}\.){3}[0-9]{1,3}$'
           OR EXISTS (SELECT 1 FROM unnest(string_to_array(host, '.')) o WHERE o::int > 255) THEN
            RETURN format('has an invalid IPv4 address %s', host);
        END IF;
    ELSE
        IF length(host) > 253 THEN
            RETURN 'has a host name longer than 253 characters';
        END IF;
        FOREACH label IN ARRAY string_to_array(host, '.') LOOP
            IF label !~ '^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$' THEN
                RETURN format('has an invalid host name %s', host);
            END IF;
        END LOOP;
    END IF;
    IF m[2] IS NOT NULL AND (m[2] !~ '^:[0-9]{1,5}$' OR substr(m[2], 2)::int NOT BETWEEN 1 AND 65535) THEN
        RETURN format('has an invalid port %s (1–65535)', substr(m[2], 2));
    END IF;
    IF m[3] IS NOT NULL AND m[3] !~ '^(/|[A-Za-z0-9._~-]|%[0-9A-Fa-f]{2})*$' THEN
        RETURN 'has a path with characters other than letters, digits, - . _ ~ / and %XX escapes';
    END IF;
    RETURN NULL;
END
$$;

-- Validate a setting value before it is stored: the type each key needs, and
-- its range.  Raises BN422 naming the key, the bounds and the value; returns
-- the value.  The bounds keep the system working (README "Settings"):
-- reminder_lead "100000000 years" overflowed every tick(), retention
-- "1 microsecond" purged every idempotency record.  Intervals are compared
-- by extract(epoch) (a month is 30 days, a year 365.25 days).
CREATE OR REPLACE FUNCTION barnum.validate_setting(p_key text, p_value jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    t text := jsonb_typeof(p_value);
    s text := p_value #>> '{}';
    iv interval;
    lo text;
    hi text;
    n numeric;
    problem text;
BEGIN
    CASE p_key
    WHEN 'public_base_url' THEN
        IF t <> 'string' THEN
            PERFORM barnum.fail('BN422', format('public_base_url must be a string such as "https://clinic.example", got %s', p_value));
        END IF;
        problem := barnum.base_url_problem(s);
        IF problem IS NOT NULL THEN
            PERFORM barnum.fail('BN422', format('public_base_url %s, got %L', problem, s));
        END IF;
    WHEN 'timezone' THEN
        IF t <> 'string' OR NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = s) THEN
            PERFORM barnum.fail('BN422', format('timezone must be an IANA zone name such as "Europe/Lisbon", not %s', p_value));
        END IF;
    WHEN 'locale' THEN
        IF t <> 'string' OR s NOT IN ('pt', 'en') THEN
            PERFORM barnum.fail('BN422', format('locale must be "pt" or "en", got %s', p_value));
        END IF;
    WHEN 'token_ttl', 'no_show_delay', 'review_delay', 'reminder_lead', 'reactivation_after', 'retention',
         'endpoint_disable_after' THEN
        -- token_ttl: under 5 minutes no patient can use a link.  retention:
        -- at least 7 days so idempotency records outlive any n8n retry and
        -- dead letters stay for an operator to see; up to 100 years means
        -- "keep everything" (bench/scale.py sets 36500 days).
        SELECT b.lo, b.hi INTO lo, hi FROM (VALUES
            ('token_ttl', '5 minutes', '90 days'),
            ('no_show_delay', '0 seconds', '30 days'),
            ('review_delay', '0 seconds', '30 days'),
            ('reminder_lead', '1 hour', '30 days'),
            ('reactivation_after', '1 day', '5 years'),
            ('retention', '7 days', '100 years'),
            ('endpoint_disable_after', '1 hour', '90 days')) b(key, lo, hi)
         WHERE b.key = p_key;
        IF t <> 'string' THEN
            PERFORM barnum.fail('BN422', format('%s must be an interval string such as "2 hours" (between %s and %s), got %s',
                                                p_key, lo, hi, p_value));
        END IF;
        BEGIN
            iv := s::interval;
        EXCEPTION WHEN others THEN
            PERFORM barnum.fail('BN422', format('%s: %L is not an interval (try "2 hours")', p_key, s));
        END;
        IF extract(epoch FROM iv) < 0 THEN
            PERFORM barnum.fail('BN422', format('%s must %s: between %s and %s, got %L', p_key,
                                                CASE WHEN extract(epoch FROM lo::interval) = 0 THEN 'not be negative' ELSE 'be positive' END,
                                                lo, hi, s));
        END IF;
        IF extract(epoch FROM iv) NOT BETWEEN extract(epoch FROM lo::interval) AND extract(epoch FROM hi::interval) THEN
            PERFORM barnum.fail('BN422', format('%s must be between %s and %s, got %L', p_key, lo, hi, s));
        END IF;
    WHEN 'max_attempts', 'backoff_base_seconds', 'backoff_max_seconds', 'endpoint_failure_threshold' THEN
        -- backoff_base_seconds 0 would retry a failing receiver in a tight
        -- loop.  backoff_max_seconds below the base is allowed: the cap wins,
        -- every wait is the cap.
        SELECT b.lo, b.hi INTO lo, hi FROM (VALUES
            ('max_attempts', '1', '100'),
            ('backoff_base_seconds', '1', '3600'),
            ('backoff_max_seconds', '1', '604800'),
            ('endpoint_failure_threshold', '1', '10000')) b(key, lo, hi)
         WHERE b.key = p_key;
        IF t = 'number' THEN
            n := p_value::numeric;
        END IF;
        IF n IS NULL OR n <> trunc(n) OR n NOT BETWEEN lo::numeric AND hi::numeric THEN
            PERFORM barnum.fail('BN422', format('%s must be an integer between %s and %s, got %s', p_key, lo, hi, p_value));
        END IF;
    WHEN 'one_click_actions' THEN
        IF t <> 'boolean' THEN
            PERFORM barnum.fail('BN422', format('one_click_actions must be true or false, got %s', p_value));
        END IF;
    ELSE
        PERFORM barnum.fail('BN404', format('unknown setting %L', p_key));
    END CASE;
    RETURN p_value;
END
$$;

-- Settings are validated whatever writes them (a DBA's UPDATE included).
CREATE OR REPLACE FUNCTION barnum.settings_validate_trg() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM barnum.validate_setting(NEW.key, NEW.value);
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
SELECT barnum.ensure_trigger('barnum.settings', 'trg_settings_validate', $trg$
CREATE OR REPLACE TRIGGER trg_settings_validate
    BEFORE INSERT OR UPDATE ON barnum.settings
    FOR EACH ROW EXECUTE FUNCTION barnum.settings_validate_trg()
$trg$);

-- Operator API: read all settings / one setting, and set one (validated).
CREATE OR REPLACE FUNCTION barnum.get_settings() RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$ SELECT coalesce(jsonb_object_agg(key, value ORDER BY key), '{}') FROM barnum.settings $$;

CREATE OR REPLACE FUNCTION barnum.set_setting(p_key text, p_value jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
BEGIN
    IF p_key IS NULL OR p_value IS NULL THEN
        PERFORM barnum.fail('BN400', 'setting key and value are required');
    END IF;
    PERFORM barnum.validate_setting(p_key, p_value);
    UPDATE barnum.settings SET value = p_value WHERE key = p_key;
    RETURN p_value;
END
$$;

-- What the shim renders with, in one call.
CREATE OR REPLACE FUNCTION barnum.shim_config() RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
    SELECT jsonb_build_object(
        'locale', barnum.setting_text('locale'),
        'timezone', barnum.setting_text('timezone'),
        'public_base_url', barnum.setting_text('public_base_url'),
        'one_click_actions', barnum.setting('one_click_actions'))
$$;

-- Readiness: is every migration on disk applied?  The caller passes the
-- versions it sees on disk; schema_migrations is created by the runner.
CREATE OR REPLACE FUNCTION barnum.migrations_current(p_versions text[]) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
    SELECT NOT EXISTS (
        SELECT 1 FROM unnest(p_versions) v
         WHERE v NOT IN (SELECT version FROM barnum.schema_migrations))
$$;

-- Glob match for endpoint event filters: '*' any run, '?' one character.
-- PL/pgSQL: the fan-out trigger calls it per endpoint, and a SQL function
-- with a sub-select is planned again on every call.
CREATE OR REPLACE FUNCTION barnum.glob_match(p_patterns text[], p_value text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    pat text;
BEGIN
    FOREACH pat IN ARRAY coalesce(p_patterns, '{}') LOOP
        IF p_value LIKE replace(replace(replace(replace(replace(pat,
               '\', '\\'), '%', '\%'), '_', '\_'), '*', '%'), '?', '_') THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END
$$;

-- Local date and time of an instant in the clinic's zone, as the payload shows them.
CREATE OR REPLACE FUNCTION barnum.local_date(p_at timestamptz, p_tz text) RETURNS text
LANGUAGE sql STABLE
AS $$ SELECT to_char(p_at AT TIME ZONE p_tz, 'YYYY-MM-DD') $$;

CREATE OR REPLACE FUNCTION barnum.local_time(p_at timestamptz, p_tz text) RETURNS text
LANGUAGE sql STABLE
AS $$ SELECT to_char(p_at AT TIME ZONE p_tz, 'HH24:MI') $$;

-- Random bytes come from pgcrypto, wherever the extension was installed
-- (often `public`).  Functions here pin search_path to barnum, so this wrapper
-- is generated with the extension's schema qualified at apply time.
DO $do$
DECLARE
    ext_schema text;
BEGIN
    SELECT extnamespace::regnamespace::text INTO ext_schema
      FROM pg_extension WHERE extname = 'pgcrypto';
    IF ext_schema IS NULL THEN
        RAISE EXCEPTION 'extension pgcrypto is required (CREATE EXTENSION pgcrypto)';
    END IF;
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION barnum.random_bytes(n int) RETURNS bytea
        LANGUAGE sql VOLATILE
                AS 'SELECT %s.gen_random_bytes(n)'
    $f$, quote_ident(ext_schema));
END
$do$;

-- Text without diacritics, the seed's way (NFD, then drop the combining
-- marks U+0300–U+036F), so "Não" and "nao" compare equal.  normalize()
-- needs a UTF8 database; elsewhere the text is returned as it is.
CREATE OR REPLACE FUNCTION barnum.strip_diacritics(p_text text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN current_setting('server_encoding') = 'UTF8'
                THEN regexp_replace(normalize(p_text, NFD), '[\u0300-\u036f]', '', 'g')
                ELSE p_text END
$$;

-- The digits of a phone number (WhatsApp ids are digits only).
CREATE OR REPLACE FUNCTION barnum.digits(p_text text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT nullif(regexp_replace(coalesce(p_text, ''), '[^0-9]', '', 'g'), '') $$;

-- The compatibility level of the SQL API these functions implement.  Relay
-- and shim refuse to start against a level they do not speak (and /readyz
-- says so), so a deploy in the wrong order fails loudly, not half-way.
-- 1: the first release (no such function); 2: accounts, inbound WhatsApp,
-- flows, realtime, the native sender (claim_deliveries_v2).
CREATE OR REPLACE FUNCTION barnum.schema_compat() RETURNS int
LANGUAGE sql IMMUTABLE
AS $$ SELECT 2 $$;

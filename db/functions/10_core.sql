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

-- Validate a setting value before it is stored: the type each key needs, and
-- its range.  Raises BN422 with a readable message; returns the value.
CREATE OR REPLACE FUNCTION barnum.validate_setting(p_key text, p_value jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    t text := jsonb_typeof(p_value);
    s text := p_value #>> '{}';
    iv interval;
BEGIN
    CASE p_key
    WHEN 'public_base_url' THEN
        IF t <> 'string' OR s !~ '^https?://[^[:space:]/?#]+(/[^[:space:]?#]*)?$' THEN
            PERFORM barnum.fail('BN422', 'public_base_url must be an http(s) URL without query, e.g. "https://clinic.example"');
        END IF;
    WHEN 'timezone' THEN
        IF t <> 'string' OR NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = s) THEN
            PERFORM barnum.fail('BN422', format('timezone must be an IANA zone name such as "Europe/Lisbon", not %s', p_value));
        END IF;
    WHEN 'locale' THEN
        IF t <> 'string' OR s NOT IN ('pt', 'en') THEN
            PERFORM barnum.fail('BN422', 'locale must be "pt" or "en"');
        END IF;
    WHEN 'token_ttl', 'no_show_delay', 'review_delay', 'reminder_lead', 'reactivation_after', 'retention' THEN
        IF t <> 'string' THEN
            PERFORM barnum.fail('BN422', format('%s must be an interval string such as "2 hours"', p_key));
        END IF;
        BEGIN
            iv := s::interval;
        EXCEPTION WHEN others THEN
            PERFORM barnum.fail('BN422', format('%s: %L is not an interval (try "2 hours")', p_key, s));
        END;
        IF iv <= interval '0' THEN
            PERFORM barnum.fail('BN422', format('%s must be positive', p_key));
        END IF;
    WHEN 'max_attempts' THEN
        IF t <> 'number' OR p_value::numeric <> trunc(p_value::numeric) OR p_value::numeric NOT BETWEEN 1 AND 100 THEN
            PERFORM barnum.fail('BN422', 'max_attempts must be an integer between 1 and 100');
        END IF;
    WHEN 'backoff_base_seconds', 'backoff_max_seconds' THEN
        IF t <> 'number' OR p_value::numeric <> trunc(p_value::numeric) OR p_value::numeric NOT BETWEEN 0 AND 86400 THEN
            PERFORM barnum.fail('BN422', format('%s must be an integer between 0 and 86400', p_key));
        END IF;
    WHEN 'one_click_actions' THEN
        IF t <> 'boolean' THEN
            PERFORM barnum.fail('BN422', 'one_click_actions must be true or false');
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
CREATE OR REPLACE TRIGGER trg_settings_validate
    BEFORE INSERT OR UPDATE ON barnum.settings
    FOR EACH ROW EXECUTE FUNCTION barnum.settings_validate_trg();

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
CREATE OR REPLACE FUNCTION barnum.glob_match(p_patterns text[], p_value text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT EXISTS (
        SELECT 1 FROM unnest(p_patterns) pat
         WHERE p_value LIKE replace(replace(replace(replace(replace(pat,
                 '\', '\\'), '%', '\%'), '_', '\_'), '*', '%'), '?', '_'))
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

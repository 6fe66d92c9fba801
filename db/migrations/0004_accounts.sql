-- 0004: accounts, API tokens and endpoint health (SPEC-2 §A).
--
-- Everything that existed before belongs to the `default` account, whose id
-- is a constant so column defaults can name it: rows inserted by code (or a
-- DBA) that knows nothing of accounts keep working unchanged.
CREATE TABLE barnum.accounts (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name       text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9_.-]{1,64}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO barnum.accounts (id, name) VALUES ('00000000-0000-0000-0000-000000000001', 'default');

-- Bearer tokens of the management API.  Only the SHA-256 of a token is
-- stored; the plain token is printed once by `barnum tokens create`.
CREATE TABLE barnum.api_tokens (
    account_id   uuid NOT NULL REFERENCES barnum.accounts (id) ON DELETE CASCADE,
    id           uuid NOT NULL DEFAULT gen_random_uuid(),
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    token_hash   bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    scopes       text[] NOT NULL DEFAULT '{webhooks:read,webhooks:write}'
                 CHECK (scopes <@ '{webhooks:read,webhooks:write}' AND cardinality(scopes) > 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz,
    PRIMARY KEY (account_id, id),
    UNIQUE (id)
);

-- Endpoints belong to an account; API-registered ones are keyed by the
-- account's WhatsApp number (the seed: one webhook per number per client).
ALTER TABLE barnum.webhook_endpoints
    ADD COLUMN account_id uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000001'
        REFERENCES barnum.accounts (id) ON DELETE CASCADE,
    ADD COLUMN phone_number text CHECK (phone_number ~ '^\+?[0-9]{7,15}$'),
    ADD COLUMN status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive', 'failed')),
    -- Consecutive dead letters; any delivered message resets it.
    ADD COLUMN failure_count int NOT NULL DEFAULT 0,
    -- First failed attempt since the last success (NULL while healthy).
    ADD COLUMN failing_since timestamptz,
    ADD COLUMN last_success_at timestamptz,
    ADD COLUMN last_attempt_at timestamptz,
    ADD COLUMN last_error text,
    ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object');
UPDATE barnum.webhook_endpoints SET status = 'inactive' WHERE NOT is_active;
-- is_active stays the flag the claim reads; status says why it is off.
ALTER TABLE barnum.webhook_endpoints
    ADD CONSTRAINT webhook_endpoints_status_active CHECK (is_active = (status = 'active'));
CREATE UNIQUE INDEX webhook_endpoints_account_phone_key
    ON barnum.webhook_endpoints (account_id, phone_number) WHERE phone_number IS NOT NULL;
CREATE INDEX webhook_endpoints_account_idx ON barnum.webhook_endpoints (account_id);

-- Events belong to an account too; fan-out only reaches that account's
-- endpoints.
ALTER TABLE barnum.whatsapp_events
    ADD COLUMN account_id uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000001'
        REFERENCES barnum.accounts (id) ON DELETE CASCADE;

-- Settings of endpoint health.  On an upgraded database the validation
-- trigger of the previous release does not know these keys yet (functions
-- are re-applied after the migrations), so it is bypassed for this insert.
DO $$
DECLARE
    has_trigger boolean := EXISTS (SELECT 1 FROM pg_trigger
                                    WHERE tgname = 'trg_settings_validate'
                                      AND tgrelid = 'barnum.settings'::regclass);
BEGIN
    IF has_trigger THEN
        ALTER TABLE barnum.settings DISABLE TRIGGER trg_settings_validate;
    END IF;
    INSERT INTO barnum.settings (key, value) VALUES
        ('endpoint_failure_threshold', '20'),
        ('endpoint_disable_after', '"5 days"')
    ON CONFLICT (key) DO NOTHING;
    IF has_trigger THEN
        ALTER TABLE barnum.settings ENABLE TRIGGER trg_settings_validate;
    END IF;
END $$;

-- Defence in depth: a role that is ever granted these tables directly sees
-- only the rows of the account named by the session setting barnum.account_id.
-- The owner (whose SECURITY DEFINER functions are the API) is not subject to it.
ALTER TABLE barnum.accounts ENABLE ROW LEVEL SECURITY;
ALTER TABLE barnum.api_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE barnum.webhook_endpoints ENABLE ROW LEVEL SECURITY;
CREATE POLICY account_isolation ON barnum.accounts
    USING (id = nullif(current_setting('barnum.account_id', true), '')::uuid);
CREATE POLICY account_isolation ON barnum.api_tokens
    USING (account_id = nullif(current_setting('barnum.account_id', true), '')::uuid);
CREATE POLICY account_isolation ON barnum.webhook_endpoints
    USING (account_id = nullif(current_setting('barnum.account_id', true), '')::uuid);
CREATE POLICY account_isolation ON barnum.whatsapp_events
    USING (account_id = nullif(current_setting('barnum.account_id', true), '')::uuid);

-- 0001_schema: Barnum's tables, types, indexes, default settings and roles.
--
-- Forward-only: never edit this file once applied; add 0002_… instead.
-- Functions, triggers, views and grants live in db/functions (re-applied when
-- changed), so this file holds only what must not be recreated: data.

CREATE EXTENSION IF NOT EXISTS pgcrypto;
CREATE SCHEMA IF NOT EXISTS barnum;

-- ---------------------------------------------------------------- settings
CREATE TABLE barnum.settings (
    key        text PRIMARY KEY,
    value      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO barnum.settings (key, value) VALUES
    ('public_base_url',      '"http://127.0.0.1:8000"'),
    ('timezone',             '"Europe/Lisbon"'),
    ('locale',               '"pt"'),
    ('token_ttl',            '"7 days"'),
    ('no_show_delay',        '"1 hour"'),
    ('review_delay',         '"2 hours"'),
    ('reminder_lead',        '"24 hours"'),
    ('reactivation_after',   '"30 days"'),
    ('max_attempts',         '4'),
    ('backoff_base_seconds', '5'),
    ('backoff_max_seconds',  '3600'),
    ('retention',            '"90 days"'),
    ('one_click_actions',    'false');

-- ---------------------------------------------------------------- domain
CREATE TABLE barnum.patients (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name             text NOT NULL CHECK (btrim(name) <> ''),
    -- E.164: a plus sign and 7–15 digits, the first not zero.
    phone            text CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    whatsapp_opt_out boolean NOT NULL DEFAULT false,
    last_visit_at    timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE barnum.professionals (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE barnum.specialties (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TYPE barnum.appointment_status AS ENUM
    ('scheduled', 'pre_confirmed', 'confirmed', 'cancelled', 'completed', 'no_show');

CREATE TABLE barnum.appointments (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    patient_id      uuid NOT NULL REFERENCES barnum.patients (id),
    professional_id uuid REFERENCES barnum.professionals (id),
    specialty_id    uuid REFERENCES barnum.specialties (id),
    starts_at       timestamptz NOT NULL,
    status          barnum.appointment_status NOT NULL DEFAULT 'scheduled',
    cancel_reason   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX appointments_patient_idx ON barnum.appointments (patient_id, starts_at);
-- tick() scans upcoming live appointments for reminders.
CREATE INDEX appointments_live_starts_idx ON barnum.appointments (starts_at)
    WHERE status IN ('scheduled', 'pre_confirmed', 'confirmed');

CREATE TABLE barnum.whatsapp_workflows (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workflow_type  text NOT NULL CHECK (workflow_type IN
        ('pre_confirmation', 'reminder', 'reschedule_prompt', 'review_request', 'reactivation')),
    appointment_id uuid REFERENCES barnum.appointments (id),
    patient_id     uuid NOT NULL REFERENCES barnum.patients (id),
    status         text NOT NULL DEFAULT 'pending' CHECK (status IN
        ('pending', 'sent', 'completed', 'failed', 'cancelled', 'expired')),
    response       text,
    responded_at   timestamptz,
    metadata       jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
-- At most one open workflow per (appointment, type): makes triggers idempotent.
CREATE UNIQUE INDEX whatsapp_workflows_one_open_idx
    ON barnum.whatsapp_workflows (appointment_id, workflow_type)
    WHERE status IN ('pending', 'sent') AND appointment_id IS NOT NULL;
-- Reactivation has no appointment: one open per patient.
CREATE UNIQUE INDEX whatsapp_workflows_one_open_reactivation_idx
    ON barnum.whatsapp_workflows (patient_id)
    WHERE status IN ('pending', 'sent') AND workflow_type = 'reactivation';
CREATE INDEX whatsapp_workflows_patient_idx
    ON barnum.whatsapp_workflows (patient_id, workflow_type, created_at);
CREATE INDEX whatsapp_workflows_appointment_idx
    ON barnum.whatsapp_workflows (appointment_id, workflow_type, created_at);
CREATE INDEX whatsapp_workflows_sent_idx
    ON barnum.whatsapp_workflows (created_at) WHERE status = 'sent';

CREATE TABLE barnum.reschedule_requests (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    appointment_id      uuid NOT NULL REFERENCES barnum.appointments (id),
    patient_id          uuid NOT NULL REFERENCES barnum.patients (id),
    source              text NOT NULL,
    requested_starts_at timestamptz,
    status              text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'done', 'cancelled')),
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reschedule_requests_appointment_idx ON barnum.reschedule_requests (appointment_id);

-- ---------------------------------------------------------------- outbox
CREATE TABLE barnum.whatsapp_events (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    event_type    text NOT NULL CHECK (event_type ~ '^[a-z_]+\.[a-z_]+$'),
    entity_type   text NOT NULL,
    entity_id     uuid NOT NULL,
    workflow_id   uuid REFERENCES barnum.whatsapp_workflows (id) ON DELETE SET NULL,
    data          jsonb NOT NULL DEFAULT '{}',
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN
        ('pending', 'processing', 'sent', 'dead_letter', 'skipped')),
    retry_count   int NOT NULL DEFAULT 0,
    max_retries   int NOT NULL DEFAULT 3,
    last_error    text,
    scheduled_for timestamptz NOT NULL DEFAULT now(),
    processed_at  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
-- No index mentions status (not even in a predicate), so the status changes
-- every delivery makes are HOT updates: no index writes, and the fill
-- factor leaves room on the page for them.
ALTER TABLE barnum.whatsapp_events SET (fillfactor = 85);
CREATE INDEX whatsapp_events_entity_idx ON barnum.whatsapp_events (entity_id, event_type);
CREATE INDEX whatsapp_events_workflow_idx ON barnum.whatsapp_events (workflow_id);
-- Retention purge walks events oldest first (old ones are nearly all finished).
CREATE INDEX whatsapp_events_created_idx ON barnum.whatsapp_events (created_at);

CREATE TABLE barnum.webhook_endpoints (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name         text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9_.-]{1,64}$'),
    url          text NOT NULL CHECK (url ~ '^https?://[^[:space:]]+$'),
    secret       text,
    event_types  text[] NOT NULL DEFAULT '{*}',
    is_active    boolean NOT NULL DEFAULT true,
    max_attempts int CHECK (max_attempts BETWEEN 1 AND 100),
    timeout_ms   int NOT NULL DEFAULT 10000 CHECK (timeout_ms BETWEEN 100 AND 300000),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE barnum.webhook_deliveries (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id         uuid NOT NULL REFERENCES barnum.whatsapp_events (id) ON DELETE CASCADE,
    endpoint_id      uuid NOT NULL REFERENCES barnum.webhook_endpoints (id) ON DELETE CASCADE,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN
        ('pending', 'processing', 'sent', 'dead_letter', 'skipped')),
    attempts         int NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    locked_by        text,
    locked_until     timestamptz,
    last_http_status int,
    last_error       text,
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, endpoint_id)
);
-- "What is due" stays an index scan at millions of rows: only live rows are
-- in these partial indexes, delivered history never is.
CREATE INDEX webhook_deliveries_due_idx ON barnum.webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_leased_idx ON barnum.webhook_deliveries (locked_until)
    WHERE status = 'processing';
CREATE INDEX webhook_deliveries_endpoint_idx ON barnum.webhook_deliveries (endpoint_id);
CREATE INDEX webhook_deliveries_dead_idx ON barnum.webhook_deliveries (event_id)
    WHERE status = 'dead_letter';

CREATE TABLE barnum.webhook_attempts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id   bigint NOT NULL REFERENCES barnum.webhook_deliveries (id) ON DELETE CASCADE,
    attempt       int NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    duration_ms   int,
    http_status   int,
    response_body text,
    error         text
);
CREATE INDEX webhook_attempts_delivery_idx ON barnum.webhook_attempts (delivery_id);
CREATE INDEX webhook_attempts_started_idx ON barnum.webhook_attempts (started_at);

-- ---------------------------------------------------------------- tokens
CREATE TABLE barnum.whatsapp_action_tokens (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- SHA-256 of the plain token; the plain token is never stored.
    token_hash     bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    action_type    text NOT NULL CHECK (action_type IN ('confirm', 'cancel', 'reschedule')),
    -- Three tokens are minted per message on the relay's hot path: only the
    -- appointment is a foreign key (its deletion takes the tokens along);
    -- patient and workflow are copied for the record, not checked again.
    appointment_id uuid NOT NULL REFERENCES barnum.appointments (id) ON DELETE CASCADE,
    patient_id     uuid NOT NULL,
    workflow_id    uuid,
    metadata       jsonb,
    expires_at     timestamptz NOT NULL,
    used_at        timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX whatsapp_action_tokens_expires_idx ON barnum.whatsapp_action_tokens (expires_at);

-- Relays waiting for work (idle, LISTENing).  Producers NOTIFY only while
-- one waits: a NOTIFY serialises commits database-wide, so a busy system
-- must not pay for wake-ups nobody needs.  UNLOGGED: it is soft state that
-- relays re-register every sweep; a crash may empty it.
CREATE UNLOGGED TABLE barnum.relay_waiters (
    worker text PRIMARY KEY,
    until  timestamptz NOT NULL
);

-- ---------------------------------------------------------------- callbacks
-- Idempotency store for n8n callbacks: same key + same body → same response.
CREATE TABLE barnum.inbound_callbacks (
    idempotency_key text PRIMARY KEY CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    action          text NOT NULL,
    body_hash       bytea NOT NULL,
    response        jsonb,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX inbound_callbacks_created_idx ON barnum.inbound_callbacks (created_at);

-- ---------------------------------------------------------------- roles
-- NOLOGIN: operators grant them to the login roles the relay and shim use.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'barnum_relay') THEN
        CREATE ROLE barnum_relay NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'barnum_shim') THEN
        CREATE ROLE barnum_shim NOLOGIN;
    END IF;
END $$;

REVOKE ALL ON SCHEMA barnum FROM PUBLIC;
GRANT USAGE ON SCHEMA barnum TO barnum_relay, barnum_shim;
REVOKE ALL ON ALL TABLES IN SCHEMA barnum FROM PUBLIC, barnum_relay, barnum_shim;

-- Patient data is behind row level security: only the owner (whose
-- SECURITY DEFINER functions are the API) reads it.  No policies means
-- "deny" for everyone else, even if a grant slips in later.
ALTER TABLE barnum.patients               ENABLE ROW LEVEL SECURITY;
ALTER TABLE barnum.appointments           ENABLE ROW LEVEL SECURITY;
ALTER TABLE barnum.whatsapp_workflows     ENABLE ROW LEVEL SECURITY;
ALTER TABLE barnum.reschedule_requests    ENABLE ROW LEVEL SECURITY;
ALTER TABLE barnum.whatsapp_events        ENABLE ROW LEVEL SECURITY;
ALTER TABLE barnum.whatsapp_action_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE barnum.inbound_callbacks      ENABLE ROW LEVEL SECURITY;

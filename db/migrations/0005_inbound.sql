-- 0005: inbound WhatsApp Cloud API (SPEC-2 §B): the account's numbers, its
-- contacts, every message in and out with its delivery status, and what
-- arrived for a number nobody owns.

-- Meta's phone_number_id → the account that owns the number.
CREATE TABLE barnum.whatsapp_numbers (
    phone_number_id      text PRIMARY KEY CHECK (phone_number_id ~ '^[0-9]{1,32}$'),
    account_id           uuid NOT NULL REFERENCES barnum.accounts (id) ON DELETE CASCADE,
    -- Digits only (Meta's display_phone_number without '+', spaces or dashes).
    display_phone_number text CHECK (display_phone_number ~ '^[0-9]{7,15}$'),
    created_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX whatsapp_numbers_account_idx ON barnum.whatsapp_numbers (account_id);

-- A WhatsApp user as one account knows them; linked to a patient by phone.
CREATE TABLE barnum.contacts (
    account_id uuid NOT NULL REFERENCES barnum.accounts (id) ON DELETE CASCADE,
    id         uuid NOT NULL DEFAULT gen_random_uuid(),
    wa_id      text NOT NULL CHECK (wa_id ~ '^[0-9]{5,20}$'),
    phone      text,
    name       text,
    patient_id uuid REFERENCES barnum.patients (id) ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, id),
    UNIQUE (id),
    UNIQUE (account_id, wa_id)
);
CREATE INDEX contacts_patient_idx ON barnum.contacts (patient_id) WHERE patient_id IS NOT NULL;

-- Every message, inbound or outbound, once (Meta redelivers for days: the
-- wamid is the dedup key).  status only moves forward (status_rank).
CREATE TABLE barnum.messages (
    account_id        uuid NOT NULL REFERENCES barnum.accounts (id) ON DELETE CASCADE,
    id                uuid NOT NULL DEFAULT gen_random_uuid(),
    -- NULL for an outbound message not sent yet (the sender stores the wamid).
    wa_message_id     text UNIQUE CHECK (length(wa_message_id) BETWEEN 1 AND 256),
    contact_id        uuid NOT NULL REFERENCES barnum.contacts (id) ON DELETE CASCADE,
    phone_number_id   text,
    direction         text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    type              text NOT NULL,
    content           text,
    payload           jsonb NOT NULL DEFAULT '{}',
    status            text CHECK (status IN ('pending', 'received', 'sent', 'delivered', 'read', 'failed')),
    error             jsonb,
    status_updated_at timestamptz,
    session_id        uuid,
    sent_at           timestamptz,
    -- What a reply did (an action it performed, or why staff must look).
    outcome           jsonb,
    -- clock_timestamp(): a conversation keeps its order within a transaction.
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (account_id, id),
    UNIQUE (id)
);
CREATE INDEX messages_contact_idx ON barnum.messages (contact_id, created_at);
CREATE INDEX messages_created_idx ON barnum.messages (created_at);

-- Notifications for a phone_number_id no account owns: kept for an operator,
-- still answered 200 (Meta would retry for days otherwise).
CREATE TABLE barnum.unrouted_webhooks (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    phone_number_id text,
    payload         jsonb NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX unrouted_webhooks_received_idx ON barnum.unrouted_webhooks (received_at);

ALTER TABLE barnum.whatsapp_numbers ENABLE ROW LEVEL SECURITY;
ALTER TABLE barnum.contacts ENABLE ROW LEVEL SECURITY;
ALTER TABLE barnum.messages ENABLE ROW LEVEL SECURITY;
ALTER TABLE barnum.unrouted_webhooks ENABLE ROW LEVEL SECURITY;
CREATE POLICY account_isolation ON barnum.whatsapp_numbers
    USING (account_id = nullif(current_setting('barnum.account_id', true), '')::uuid);
CREATE POLICY account_isolation ON barnum.contacts
    USING (account_id = nullif(current_setting('barnum.account_id', true), '')::uuid);
CREATE POLICY account_isolation ON barnum.messages
    USING (account_id = nullif(current_setting('barnum.account_id', true), '')::uuid);

-- 0006: keyword flows and their sessions (SPEC-2 §C), and a token scope for
-- the realtime endpoint (§D).

CREATE TABLE barnum.flows (
    account_id  uuid NOT NULL REFERENCES barnum.accounts (id) ON DELETE CASCADE,
    id          uuid NOT NULL DEFAULT gen_random_uuid(),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    -- The seed's matchesTrigger keyword ('default' matches every text).
    trigger     text NOT NULL CHECK (length(btrim(trigger)) BETWEEN 1 AND 200),
    status      text NOT NULL DEFAULT 'Active' CHECK (status IN ('Active', 'Inactive')),
    definition  jsonb NOT NULL,
    -- "The first matching flow" is the oldest: clock_timestamp() keeps flows
    -- created in one transaction in their order.
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, id),
    UNIQUE (id),
    UNIQUE (account_id, name)
);

CREATE TABLE barnum.flow_sessions (
    account_id      uuid NOT NULL REFERENCES barnum.accounts (id) ON DELETE CASCADE,
    id              uuid NOT NULL DEFAULT gen_random_uuid(),
    contact_id      uuid NOT NULL REFERENCES barnum.contacts (id) ON DELETE CASCADE,
    flow_id         uuid NOT NULL REFERENCES barnum.flows (id) ON DELETE CASCADE,
    status          text NOT NULL DEFAULT 'Active' CHECK (status IN ('Active', 'Paused', 'Completed', 'Errored')),
    current_node_id text,
    context         jsonb NOT NULL DEFAULT '{}',
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, id),
    UNIQUE (id),
    UNIQUE (contact_id, flow_id)
);
CREATE INDEX flow_sessions_open_idx ON barnum.flow_sessions (contact_id) WHERE status IN ('Active', 'Paused');

ALTER TABLE barnum.messages
    ADD CONSTRAINT messages_session_fk FOREIGN KEY (session_id) REFERENCES barnum.flow_sessions (id) ON DELETE SET NULL;

-- conversations:read: the realtime endpoint (Socket.IO) for a staff frontend.
ALTER TABLE barnum.api_tokens DROP CONSTRAINT api_tokens_scopes_check;
ALTER TABLE barnum.api_tokens ADD CONSTRAINT api_tokens_scopes_check
    CHECK (scopes <@ '{webhooks:read,webhooks:write,conversations:read}' AND cardinality(scopes) > 0);

ALTER TABLE barnum.flows ENABLE ROW LEVEL SECURITY;
ALTER TABLE barnum.flow_sessions ENABLE ROW LEVEL SECURITY;
CREATE POLICY account_isolation ON barnum.flows
    USING (account_id = nullif(current_setting('barnum.account_id', true), '')::uuid);
CREATE POLICY account_isolation ON barnum.flow_sessions
    USING (account_id = nullif(current_setting('barnum.account_id', true), '')::uuid);

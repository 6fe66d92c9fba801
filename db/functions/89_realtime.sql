-- 89_realtime: what the Socket.IO endpoint (listener/realtime.py) is fed
-- with (SPEC-2 §D).
--
-- Triggers NOTIFY channel barnum_realtime with ids only, so a payload never
-- nears NOTIFY's 8 kB limit:
--   message:<message_id>:<contact_id>             a message row was inserted
--   status:<message_id>:<contact_id>:<status>     its status changed
--   session:<session_id>:<contact_id>:<status>    a flow session began or changed status
--   typing:<contact_id>:start|stop                barnum.notify_typing
-- The contact id lets the shim drop, without a query, what no open socket
-- watches; the status word keeps two quick changes two distinct events
-- (NOTIFY folds identical payloads of one transaction, and the row may have
-- moved on by the time it is read).  Details come from realtime_events: one
-- round trip per burst.

-- Is any shim watching a conversation now (registered by realtime_listening)?
-- With nobody watching, nothing is NOTIFYed: NOTIFY serialises commits.
-- PL/pgSQL: called for every message row, and a SQL function with a
-- sub-select would be planned again on each call.
CREATE OR REPLACE FUNCTION barnum.realtime_watched() RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM barnum.realtime_listeners WHERE until > now());
END
$$;

CREATE OR REPLACE FUNCTION barnum.realtime_notify_message() RETURNS trigger
LANGUAGE plpgsql
SET search_path = barnum, pg_temp
AS $$
BEGIN
    IF NOT barnum.realtime_watched() THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('barnum_realtime', format('message:%s:%s', NEW.id, NEW.contact_id));
    ELSIF NEW.status IS NOT NULL THEN
        PERFORM pg_notify('barnum_realtime', format('status:%s:%s:%s', NEW.id, NEW.contact_id, NEW.status));
    END IF;
    RETURN NULL;
END
$$;

SELECT barnum.ensure_trigger('barnum.messages', 'trg_messages_realtime_insert', $trg$
CREATE OR REPLACE TRIGGER trg_messages_realtime_insert
    AFTER INSERT ON barnum.messages
    FOR EACH ROW EXECUTE FUNCTION barnum.realtime_notify_message()
$trg$);

SELECT barnum.ensure_trigger('barnum.messages', 'trg_messages_realtime_status', $trg$
CREATE OR REPLACE TRIGGER trg_messages_realtime_status
    AFTER UPDATE OF status ON barnum.messages
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION barnum.realtime_notify_message()
$trg$);

CREATE OR REPLACE FUNCTION barnum.realtime_notify_session() RETURNS trigger
LANGUAGE plpgsql
SET search_path = barnum, pg_temp
AS $$
BEGIN
    IF barnum.realtime_watched() THEN
        PERFORM pg_notify('barnum_realtime', format('session:%s:%s:%s', NEW.id, NEW.contact_id, NEW.status));
    END IF;
    RETURN NULL;
END
$$;

SELECT barnum.ensure_trigger('barnum.flow_sessions', 'trg_flow_sessions_realtime_insert', $trg$
CREATE OR REPLACE TRIGGER trg_flow_sessions_realtime_insert
    AFTER INSERT ON barnum.flow_sessions
    FOR EACH ROW EXECUTE FUNCTION barnum.realtime_notify_session()
$trg$);

SELECT barnum.ensure_trigger('barnum.flow_sessions', 'trg_flow_sessions_realtime_status', $trg$
CREATE OR REPLACE TRIGGER trg_flow_sessions_realtime_status
    AFTER UPDATE OF status ON barnum.flow_sessions
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION barnum.realtime_notify_session()
$trg$);

-- The flow executor's "bot is typing" around its sends.  Like every NOTIFY it
-- is delivered at commit, so start and stop in one transaction arrive
-- together: call start in its own transaction when the wait is to be seen.
CREATE OR REPLACE FUNCTION barnum.notify_typing(p_contact_id uuid, p_on boolean) RETURNS void
LANGUAGE sql
SET search_path = barnum, pg_temp
AS $$
    SELECT pg_notify('barnum_realtime',
                     format('typing:%s:%s', p_contact_id, CASE WHEN p_on THEN 'start' ELSE 'stop' END))
     WHERE p_contact_id IS NOT NULL AND p_on IS NOT NULL AND barnum.realtime_watched()
$$;

-- A shim with at least one conversation open registers (and re-registers
-- before p_ttl runs out); when its last one closes it leaves.  The
-- registration commits before join:conversation is acknowledged, so events
-- after the ack are not missed.
CREATE OR REPLACE FUNCTION barnum.realtime_listening(p_worker text, p_ttl interval DEFAULT '30 seconds')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
BEGIN
    IF p_worker IS NULL OR btrim(p_worker) = '' OR p_ttl IS NULL OR p_ttl NOT BETWEEN '1 second' AND '1 hour' THEN
        PERFORM barnum.fail('BN422', 'realtime_listening needs a worker name and a ttl of 1 second to 1 hour');
    END IF;
    INSERT INTO barnum.realtime_listeners (worker, until) VALUES (p_worker, now() + p_ttl)
    ON CONFLICT (worker) DO UPDATE SET until = EXCLUDED.until;
    DELETE FROM barnum.realtime_listeners WHERE until < now() - interval '1 minute';
END
$$;

CREATE OR REPLACE FUNCTION barnum.realtime_quiet(p_worker text) RETURNS void
LANGUAGE sql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$ DELETE FROM barnum.realtime_listeners WHERE worker = p_worker $$;

CREATE OR REPLACE FUNCTION barnum.is_uuid(p text) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT coalesce(p ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$', false)
$$;

-- A message as the seed's frontend knows it (Prisma's Message, camelCase).
CREATE OR REPLACE FUNCTION barnum.realtime_message_json(m barnum.messages) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_build_object(
        'id', m.id, 'waMessageId', m.wa_message_id, 'direction', m.direction, 'type', m.type,
        'content', m.content, 'payload', m.payload, 'status', m.status, 'error', m.error,
        'statusUpdatedAt', m.status_updated_at, 'sentAt', m.sent_at, 'createdAt', m.created_at,
        'contactId', m.contact_id, 'sessionId', m.session_id, 'accountId', m.account_id)
$$;

-- One notification's event: {account_id, room, event, data}, or NULL when
-- the payload is not ours or its row is gone (deleted since).
CREATE OR REPLACE FUNCTION barnum.realtime_event(p_payload text) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    part text[] := string_to_array(p_payload, ':');
    kind text := coalesce(part[1], '');
    m barnum.messages;
    s barnum.flow_sessions;
    c barnum.contacts;
    v_account uuid;
    v_contact uuid;
    v_event text;
    v_data jsonb;
BEGIN
    IF kind IN ('message', 'status', 'session') THEN
        IF NOT (barnum.is_uuid(part[2]) AND barnum.is_uuid(part[3])) THEN
            RETURN NULL;
        END IF;
    ELSIF kind = 'typing' THEN
        IF NOT barnum.is_uuid(part[2]) OR coalesce(part[3] NOT IN ('start', 'stop'), true) THEN
            RETURN NULL;
        END IF;
    ELSE
        RETURN NULL;
    END IF;

    IF kind = 'message' THEN
        SELECT * INTO m FROM barnum.messages WHERE id = part[2]::uuid;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        v_account := m.account_id;
        v_contact := m.contact_id;
        v_event := 'message:new';
        v_data := jsonb_build_object('message', barnum.realtime_message_json(m), 'contactId', m.contact_id);
    ELSIF kind = 'status' THEN
        SELECT * INTO m FROM barnum.messages WHERE id = part[2]::uuid;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        v_account := m.account_id;
        v_contact := m.contact_id;
        v_event := 'message:status';
        -- The status this notification was about; the row may be further on.
        v_data := jsonb_build_object('messageId', m.id, 'waMessageId', m.wa_message_id,
                                     'status', coalesce(part[4], m.status), 'contactId', m.contact_id,
                                     'error', CASE WHEN part[4] = 'failed' THEN m.error END,
                                     'statusUpdatedAt', m.status_updated_at);
    ELSIF kind = 'session' THEN
        SELECT * INTO s FROM barnum.flow_sessions WHERE id = part[2]::uuid;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        v_account := s.account_id;
        v_contact := s.contact_id;
        v_event := 'session:updated';
        v_data := jsonb_build_object('sessionId', s.id, 'status', coalesce(part[4], s.status),
                                     'contactId', s.contact_id, 'flowId', s.flow_id);
    ELSE
        SELECT * INTO c FROM barnum.contacts WHERE id = part[2]::uuid;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        v_account := c.account_id;
        v_contact := c.id;
        v_event := 'typing:' || part[3];
        v_data := jsonb_build_object('contactId', c.id);
    END IF;
    RETURN jsonb_build_object('account_id', v_account, 'room', 'conversation:' || v_contact,
                              'event', v_event, 'data', v_data);
END
$$;

-- A burst of notifications in one round trip: their events in the order
-- given (commit order), the unknown or vanished ones left out.
CREATE OR REPLACE FUNCTION barnum.realtime_events(p_payloads text[]) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
    SELECT coalesce(jsonb_agg(e ORDER BY n), '[]')
      FROM unnest(p_payloads) WITH ORDINALITY AS p(payload, n),
           LATERAL barnum.realtime_event(p.payload) e
     WHERE e IS NOT NULL
$$;

-- Socket.IO connect: the token's account (BN401 / BN403 like the API).
CREATE OR REPLACE FUNCTION barnum.realtime_auth(p_token text) RETURNS uuid
LANGUAGE sql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
    SELECT barnum.api_account(p_token, 'conversations:read')
$$;

-- join:conversation: false for a malformed id, one that exists nowhere and
-- another account's alike — the answer never tells them apart.
CREATE OR REPLACE FUNCTION barnum.realtime_can_join(p_token text, p_contact_id text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    v_account uuid := barnum.api_account(p_token, 'conversations:read');
BEGIN
    IF p_contact_id IS NULL OR NOT barnum.is_uuid(p_contact_id) THEN
        RETURN false;
    END IF;
    RETURN EXISTS (SELECT 1 FROM barnum.contacts WHERE account_id = v_account AND id = p_contact_id::uuid);
END
$$;

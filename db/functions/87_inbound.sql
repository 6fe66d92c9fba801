-- 87_inbound: the WhatsApp Cloud API webhook (SPEC-2 §B).  One call,
-- ingest_whatsapp(payload), per POST the shim has verified: contacts are
-- found or created, messages stored once (Meta redelivers, unordered, for
-- days: the wamid is the key), statuses only move forward, events go through
-- the outbox, and a patient's reply to Barnum's own message acts.

-- ------------------------------------------------------------ small rules
-- Statuses move forward only; failed is final and keeps its error.
CREATE OR REPLACE FUNCTION barnum.status_rank(p_status text) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE p_status WHEN 'sent' THEN 1 WHEN 'delivered' THEN 2 WHEN 'read' THEN 3
                         WHEN 'failed' THEN 4 ELSE 0 END
$$;

-- Meta's unix-seconds string as a time (NULL when absent or absurd).
CREATE OR REPLACE FUNCTION barnum.wa_time(p_value jsonb) RETURNS timestamptz
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN p_value #>> '{}' ~ '^[0-9]{1,11}$' THEN to_timestamp((p_value #>> '{}')::bigint) END
$$;

-- A reply's words without case, accents, punctuation or extra spaces.
CREATE OR REPLACE FUNCTION barnum.normalize_reply(p_text text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT btrim(regexp_replace(barnum.strip_diacritics(lower(coalesce(p_text, ''))), '[^a-z0-9]+', ' ', 'g'))
$$;

-- confirm / cancel for a whole reply that says exactly that in the clinic's
-- language (or English), else NULL: anything else is not guessed at.
CREATE OR REPLACE FUNCTION barnum.reply_intent(p_text text, p_locale text) RETURNS text
LANGUAGE sql STABLE
AS $$
    SELECT CASE
        WHEN w = ANY (CASE p_locale
                WHEN 'pt' THEN ARRAY['sim', 's', '1', 'confirmo', 'confirmar', 'confirmado', 'confirmada',
                                     'ok', 'sim confirmo', 'sim obrigado', 'sim obrigada']
                ELSE ARRAY[]::text[] END
              || ARRAY['yes', 'y', '1', 'confirm', 'confirmed', 'ok', 'yes please'])
            THEN 'confirm'
        WHEN w = ANY (CASE p_locale
                WHEN 'pt' THEN ARRAY['nao', 'n', '2', 'cancelar', 'cancelo', 'desmarcar', 'nao vou',
                                     'nao posso', 'nao obrigado', 'nao obrigada']
                ELSE ARRAY[]::text[] END
              || ARRAY['no', 'n', '2', 'cancel', 'no thanks'])
            THEN 'cancel'
    END
      FROM (SELECT barnum.normalize_reply(p_text) AS w) x
$$;

-- What a message carries: (type, content, metadata, the id of a button or
-- list reply).  Media keep their id for later download.  PL/pgSQL, not SQL:
-- a SQL function that cannot be inlined is planned again on every call
-- (146 µs of an ingest, measured), a PL/pgSQL one keeps its plans.
CREATE OR REPLACE FUNCTION barnum.wa_message_parts(m jsonb, OUT type text, OUT content text,
                                                   OUT metadata jsonb, OUT reply_id text)
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    t text := coalesce(m ->> 'type', 'unknown');
BEGIN
    type := t;
    content := CASE t
        WHEN 'text' THEN m #>> '{text,body}'
        WHEN 'button' THEN m #>> '{button,text}'
        WHEN 'interactive' THEN coalesce(m #>> '{interactive,button_reply,title}',
                                         m #>> '{interactive,list_reply,title}')
        WHEN 'location' THEN coalesce(m #>> '{location,name}', m #>> '{location,address}',
                                      (m #>> '{location,latitude}') || ',' || (m #>> '{location,longitude}'))
        WHEN 'reaction' THEN m #>> '{reaction,emoji}'
        ELSE m -> t ->> 'caption'
    END;
    reply_id := coalesce(m #>> '{interactive,button_reply,id}', m #>> '{interactive,list_reply,id}',
                         m #>> '{button,payload}');
    metadata := jsonb_strip_nulls(jsonb_build_object(
        'media_id', CASE WHEN t IN ('image', 'audio', 'video', 'document', 'sticker') THEN m -> t ->> 'id' END,
        'mime_type', CASE WHEN t IN ('image', 'audio', 'video', 'document', 'sticker') THEN m -> t ->> 'mime_type' END,
        'filename', CASE WHEN t = 'document' THEN m #>> '{document,filename}' END,
        'location', CASE WHEN t = 'location' THEN m -> 'location' END,
        'reply_id', reply_id,
        'context_message_id', m #>> '{context,id}'));
END
$$;

-- ------------------------------------------------------------ the answer
-- The change a patient's answer makes, shared by action links and WhatsApp
-- replies: the workflow answered first (so the status trigger's clean-up
-- sees it), then the appointment.  p_appointment is locked by the caller and
-- the action allowed (action_blocked_reason).
CREATE OR REPLACE FUNCTION barnum.apply_patient_answer(
    p_appointment barnum.appointments, p_type text, p_workflow_id uuid, p_via text)
RETURNS barnum.appointments
LANGUAGE plpgsql
AS $$
DECLARE
    a barnum.appointments := p_appointment;
    v_now timestamptz := barnum.clock();
BEGIN
    UPDATE barnum.whatsapp_workflows
       SET status = 'completed', response = p_type, responded_at = v_now,
           metadata = metadata || jsonb_build_object('via', p_via)
     WHERE appointment_id = a.id AND status IN ('pending', 'sent')
       AND (id = p_workflow_id OR workflow_type = ANY (
            CASE WHEN p_type = 'reschedule'
                 THEN ARRAY['pre_confirmation', 'reminder', 'reschedule_prompt']
                 ELSE ARRAY['pre_confirmation', 'reminder'] END));
    IF p_type = 'confirm' AND a.status <> 'confirmed' THEN
        UPDATE barnum.appointments SET status = 'confirmed' WHERE id = a.id RETURNING * INTO a;
    ELSIF p_type = 'cancel' THEN
        UPDATE barnum.appointments
           SET status = 'cancelled',
               cancel_reason = format('cancelled by the patient (%s)', replace(p_via, '_', ' '))
         WHERE id = a.id RETURNING * INTO a;
    ELSIF p_type = 'reschedule' THEN
        PERFORM barnum.open_reschedule_request(a, p_via);
    END IF;
    RETURN a;
END
$$;

-- ------------------------------------------------------------ events
-- A conversation event (message.*, session.*): its entity is the message or
-- the session named by the type's prefix; its data is the whole payload.
-- PL/pgSQL for its cached plan (as SQL it was planned on every call).
CREATE OR REPLACE FUNCTION barnum.emit_message_event(
    p_type text, p_account uuid, p_entity_id uuid, p_data jsonb)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO barnum.whatsapp_events (event_type, entity_type, entity_id, account_id, data, scheduled_for, max_retries)
    VALUES (p_type, split_part(p_type, '.', 1), p_entity_id, p_account, p_data, barnum.clock(),
            barnum.setting_int('max_attempts') - 1);
END
$$;

-- ------------------------------------------------------------ replies that act
-- A reply to Barnum's own message: a button whose payload is
-- "barnum:<action>:<token>" acts exactly like the action link (same token,
-- single use); a text that clearly says yes or no answers the contact's
-- latest open confirmation request.  Anything unclear, or an answer the
-- appointment no longer allows, becomes a message.needs_attention event for
-- staff — never a guess.  Returns the outcome stored on the message.
CREATE OR REPLACE FUNCTION barnum.act_on_reply(
    p_msg barnum.messages, p_contact barnum.contacts, p_reply_id text, p_to text)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    v_action text;
    v_token text;
    v_result jsonb;
    v_open jsonb;
    v_reason text;
    a barnum.appointments;
    w_id uuid;
    v_now timestamptz := barnum.clock();
    v_outcome jsonb;
BEGIN
    IF p_reply_id ~ '^barnum:(confirm|cancel|reschedule):[A-Za-z0-9_-]{16,128}$' THEN
        v_action := split_part(p_reply_id, ':', 2);
        v_token := split_part(p_reply_id, ':', 3);
        BEGIN
            v_result := barnum.perform_action(v_token, v_action);
            v_outcome := jsonb_build_object('action', v_action, 'via', 'button',
                                          'appointment_id', v_result #>> '{appointment,id}',
                                          'status', v_result ->> 'status');
        EXCEPTION WHEN SQLSTATE 'BN400' OR SQLSTATE 'BN404' OR SQLSTATE 'BN409' OR SQLSTATE 'BN410' THEN
            v_reason := format('the %s button could not be applied: %s', v_action, SQLERRM);
        END;
    ELSIF p_msg.type IN ('text', 'button', 'interactive') THEN
        -- The open confirmation requests of every patient with this phone.
        SELECT jsonb_agg(jsonb_build_object('workflow_id', w.id, 'appointment_id', w.appointment_id)
                         ORDER BY w.created_at DESC)
          INTO v_open
          FROM barnum.whatsapp_workflows w
          JOIN barnum.appointments ap ON ap.id = w.appointment_id
         WHERE w.patient_id IN (SELECT id FROM barnum.patients WHERE phone = '+' || p_contact.wa_id)
           AND w.workflow_type IN ('pre_confirmation', 'reminder') AND w.status IN ('pending', 'sent')
           AND ap.starts_at > v_now;
        IF v_open IS NULL THEN
            RETURN NULL;  -- nothing awaits an answer: an ordinary message
        END IF;
        v_action := barnum.reply_intent(p_msg.content, barnum.setting_text('locale'));
        IF v_action IS NULL THEN
            v_reason := 'the reply is not a clear yes or no to the open confirmation request';
        ELSIF (SELECT count(DISTINCT x ->> 'appointment_id') FROM jsonb_array_elements(v_open) x) > 1 THEN
            v_reason := 'several appointments await an answer from this number';
        ELSE
            w_id := (v_open -> 0 ->> 'workflow_id')::uuid;
            SELECT * INTO a FROM barnum.appointments WHERE id = (v_open -> 0 ->> 'appointment_id')::uuid FOR UPDATE;
            v_reason := barnum.action_blocked_reason(v_action, a, v_now);
            IF v_reason IS NULL THEN
                a := barnum.apply_patient_answer(a, v_action, w_id, 'whatsapp_reply');
                v_outcome := jsonb_build_object('action', v_action, 'via', 'text', 'appointment_id', a.id,
                                              'status', a.status);
            ELSE
                v_reason := format('%s cannot be applied: %s', v_action, v_reason);
            END IF;
        END IF;
    ELSE
        RETURN NULL;
    END IF;

    IF v_reason IS NOT NULL THEN
        v_outcome := jsonb_build_object('needs_attention', v_reason, 'intent', v_action,
                                      'appointment_id', coalesce(a.id, (v_open -> 0 ->> 'appointment_id')::uuid));
        PERFORM barnum.emit_message_event('message.needs_attention', p_msg.account_id, p_msg.id,
            jsonb_build_object('account_id', p_msg.account_id, 'message_id', p_msg.wa_message_id,
                               'from', p_contact.wa_id, 'to', p_to, 'type', p_msg.type,
                               'content', p_msg.content, 'reason', v_reason,
                               'contact', jsonb_build_object('id', p_contact.id, 'name', p_contact.name,
                                                             'patient_id', p_contact.patient_id),
                               'appointment_id', v_outcome ->> 'appointment_id',
                               'metadata', jsonb_build_object('display_phone_number', p_to)));
    END IF;
    UPDATE barnum.messages SET outcome = v_outcome WHERE id = p_msg.id;
    RETURN v_outcome;
END
$$;

-- ------------------------------------------------------------ ingest
-- POST /whatsapp/webhook, after the shim checked X-Hub-Signature-256.
-- Returns counts; never fails on content it does not know (it is ignored),
-- only on a body that is not a WhatsApp notification at all (BN400).
CREATE OR REPLACE FUNCTION barnum.ingest_whatsapp(p_payload jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    ch jsonb;
    val jsonb;
    m jsonb;
    st jsonb;
    c jsonb;
    v_pnid text;
    v_to text;
    v_account uuid;
    v_contact barnum.contacts;
    v_msg barnum.messages;
    v_parts record;
    v_name text;
    v_now timestamptz := barnum.clock();
    n_new int := 0;
    n_dup int := 0;
    n_status int := 0;
    n_stale int := 0;
    n_unrouted int := 0;
    n_acted int := 0;
    n_attention int := 0;
    n_flows int := 0;
    outcome jsonb;
BEGIN
    IF p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object'
       OR p_payload ->> 'object' IS DISTINCT FROM 'whatsapp_business_account'
       OR jsonb_typeof(p_payload -> 'entry') IS DISTINCT FROM 'array' THEN
        PERFORM barnum.fail('BN400', 'not a WhatsApp Business Account notification (object, entry[])');
    END IF;

    FOR ch IN
        SELECT x FROM jsonb_array_elements(p_payload -> 'entry') e,
                      jsonb_array_elements(CASE WHEN jsonb_typeof(e -> 'changes') = 'array'
                                                THEN e -> 'changes' ELSE '[]' END) x
         WHERE x ->> 'field' = 'messages' AND jsonb_typeof(x -> 'value') = 'object'
    LOOP
        val := ch -> 'value';
        v_pnid := val #>> '{metadata,phone_number_id}';
        v_to := barnum.digits(val #>> '{metadata,display_phone_number}');
        SELECT account_id INTO v_account FROM barnum.whatsapp_numbers WHERE phone_number_id = v_pnid;
        IF NOT FOUND THEN
            INSERT INTO barnum.unrouted_webhooks (phone_number_id, payload) VALUES (v_pnid, ch);
            n_unrouted := n_unrouted + 1;
            CONTINUE;
        END IF;

        -- Inbound messages: the sender's contact, the message once, its event.
        FOR m IN SELECT x FROM jsonb_array_elements(CASE WHEN jsonb_typeof(val -> 'messages') = 'array'
                                                         THEN val -> 'messages' ELSE '[]' END) x
        LOOP
            IF barnum.digits(m ->> 'from') IS NULL OR coalesce(m ->> 'id', '') = '' THEN
                CONTINUE;
            END IF;
            SELECT x #>> '{profile,name}' INTO v_name
              FROM jsonb_array_elements(CASE WHEN jsonb_typeof(val -> 'contacts') = 'array'
                                             THEN val -> 'contacts' ELSE '[]' END) x
             WHERE x ->> 'wa_id' = m ->> 'from' LIMIT 1;
            v_contact := barnum.find_or_create_contact(v_account, barnum.digits(m ->> 'from'), v_name);
            SELECT * INTO v_parts FROM barnum.wa_message_parts(m);
            INSERT INTO barnum.messages (account_id, wa_message_id, contact_id, phone_number_id, direction,
                                         type, content, payload, status, status_updated_at, sent_at)
            VALUES (v_account, m ->> 'id', v_contact.id, v_pnid, 'inbound', v_parts.type,
                    left(v_parts.content, 65536), m, 'received', v_now, barnum.wa_time(m -> 'timestamp'))
            ON CONFLICT (wa_message_id) DO NOTHING
            RETURNING * INTO v_msg;
            IF NOT FOUND THEN
                n_dup := n_dup + 1;  -- a redelivery: stored and announced already
                CONTINUE;
            END IF;
            n_new := n_new + 1;
            PERFORM barnum.emit_message_event('message.received', v_account, v_msg.id, jsonb_build_object(
                'account_id', v_account, 'message_id', v_msg.wa_message_id, 'from', v_contact.wa_id,
                'to', v_to, 'timestamp', to_char(coalesce(v_msg.sent_at, v_now) AT TIME ZONE 'UTC',
                                                 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                'type', v_msg.type, 'content', v_msg.content,
                'metadata', v_parts.metadata || jsonb_strip_nulls(jsonb_build_object(
                    'phone_number_id', v_pnid, 'display_phone_number', v_to,
                    'contact_id', v_contact.id, 'contact_name', v_contact.name,
                    'patient_id', v_contact.patient_id))));
            outcome := barnum.act_on_reply(v_msg, v_contact, v_parts.reply_id, v_to);
            IF outcome ? 'needs_attention' THEN
                n_attention := n_attention + 1;
            ELSIF outcome IS NOT NULL THEN
                n_acted := n_acted + 1;
            ELSIF barnum.dispatch_flows(v_msg, v_contact, v_parts.reply_id) IS NOT NULL THEN
                -- Not about an appointment: the account's flows may answer it.
                n_flows := n_flows + 1;
            END IF;
        END LOOP;

        -- Statuses of messages the business sent: forward only.
        FOR st IN SELECT x FROM jsonb_array_elements(CASE WHEN jsonb_typeof(val -> 'statuses') = 'array'
                                                          THEN val -> 'statuses' ELSE '[]' END) x
        LOOP
            IF coalesce(st ->> 'id', '') = '' OR barnum.status_rank(st ->> 'status') = 0 THEN
                CONTINUE;
            END IF;
            IF barnum.digits(st ->> 'recipient_id') IS NOT NULL THEN
                v_contact := barnum.find_or_create_contact(v_account, barnum.digits(st ->> 'recipient_id'), NULL);
                -- A message sent by someone else (n8n) is known from its first status on.
                INSERT INTO barnum.messages (account_id, wa_message_id, contact_id, phone_number_id, direction,
                                             type, payload)
                VALUES (v_account, st ->> 'id', v_contact.id, v_pnid, 'outbound', 'unknown', '{}')
                ON CONFLICT (wa_message_id) DO NOTHING;
            END IF;
            UPDATE barnum.messages ms
               SET status = st ->> 'status',
                   error = CASE WHEN st ->> 'status' = 'failed' THEN st -> 'errors' ELSE ms.error END,
                   status_updated_at = coalesce(barnum.wa_time(st -> 'timestamp'), v_now)
             WHERE ms.wa_message_id = st ->> 'id' AND ms.direction = 'outbound'
               AND barnum.status_rank(st ->> 'status') > barnum.status_rank(ms.status)
            RETURNING * INTO v_msg;
            IF NOT FOUND THEN
                n_stale := n_stale + 1;  -- older news, a repeat, or an unknown message
                CONTINUE;
            END IF;
            n_status := n_status + 1;
            PERFORM barnum.emit_message_event('message.status', v_account, v_msg.id, jsonb_build_object(
                'account_id', v_account, 'message_id', v_msg.wa_message_id, 'status', v_msg.status,
                'from', v_to, 'to', barnum.digits(st ->> 'recipient_id'),
                'timestamp', to_char(v_msg.status_updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                'error', v_msg.error,
                'metadata', jsonb_strip_nulls(jsonb_build_object(
                    'phone_number_id', v_pnid, 'display_phone_number', v_to,
                    'conversation', st -> 'conversation', 'pricing', st -> 'pricing'))));
        END LOOP;
    END LOOP;
    RETURN jsonb_build_object('messages', n_new, 'duplicates', n_dup, 'statuses', n_status,
                              'stale_statuses', n_stale, 'unrouted', n_unrouted,
                              'acted', n_acted, 'needs_attention', n_attention, 'flows', n_flows);
END
$$;

-- Find or create the account's contact for a WhatsApp id; a profile name
-- refreshes the stored one.  Linked to the patient with that phone when
-- exactly one has it.  Safe under concurrency (one row per account × wa_id).
CREATE OR REPLACE FUNCTION barnum.find_or_create_contact(p_account uuid, p_wa_id text, p_name text)
RETURNS barnum.contacts
LANGUAGE plpgsql
AS $$
DECLARE
    c barnum.contacts;
BEGIN
    SELECT * INTO c FROM barnum.contacts WHERE account_id = p_account AND wa_id = p_wa_id;
    IF FOUND AND (p_name IS NULL OR c.name IS NOT DISTINCT FROM p_name) THEN
        RETURN c;
    END IF;
    INSERT INTO barnum.contacts AS k (account_id, wa_id, phone, name, patient_id)
    VALUES (p_account, p_wa_id, '+' || p_wa_id, left(p_name, 256),
            (SELECT CASE WHEN count(*) = 1 THEN min(id::text)::uuid END
               FROM barnum.patients WHERE phone = '+' || p_wa_id))
    ON CONFLICT (account_id, wa_id) DO UPDATE
       SET name = coalesce(EXCLUDED.name, k.name), updated_at = now()
    RETURNING * INTO c;
    RETURN c;
END
$$;

-- ------------------------------------------------------------ operators
CREATE OR REPLACE FUNCTION barnum.whatsapp_number_add(p_phone_number_id text, p_account text, p_display text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    n barnum.whatsapp_numbers;
BEGIN
    IF p_phone_number_id IS NULL OR p_phone_number_id !~ '^[0-9]{1,32}$' THEN
        PERFORM barnum.fail('BN422', format('phone_number_id must be the digits Meta shows for the number, got %L',
                                            p_phone_number_id), '{"field": "phone_number_id"}');
    END IF;
    IF p_display IS NOT NULL AND coalesce(barnum.digits(p_display), '') !~ '^[0-9]{7,15}$' THEN
        PERFORM barnum.fail('BN422', format('the display number must have 7–15 digits, got %L', p_display),
                            '{"field": "display"}');
    END IF;
    INSERT INTO barnum.whatsapp_numbers (phone_number_id, account_id, display_phone_number)
    VALUES (p_phone_number_id, barnum.account_id_by_name(p_account), barnum.digits(p_display))
    ON CONFLICT (phone_number_id) DO NOTHING
    RETURNING * INTO n;
    IF NOT FOUND THEN
        PERFORM barnum.fail('BN409', format('phone_number_id %s is routed already (barnum numbers list)',
                                            p_phone_number_id));
    END IF;
    RETURN jsonb_build_object('phone_number_id', n.phone_number_id, 'account', p_account,
                              'display_phone_number', n.display_phone_number);
END
$$;

CREATE OR REPLACE FUNCTION barnum.whatsapp_number_list() RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'phone_number_id', n.phone_number_id, 'account', a.name,
               'display_phone_number', n.display_phone_number, 'created_at', n.created_at)
               ORDER BY a.name, n.phone_number_id), '[]')
      FROM barnum.whatsapp_numbers n JOIN barnum.accounts a ON a.id = n.account_id
$$;

CREATE OR REPLACE FUNCTION barnum.whatsapp_number_remove(p_phone_number_id text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
BEGIN
    DELETE FROM barnum.whatsapp_numbers WHERE phone_number_id = p_phone_number_id;
    IF NOT FOUND THEN
        PERFORM barnum.fail('BN404', format('phone_number_id %s is not routed', p_phone_number_id));
    END IF;
    RETURN jsonb_build_object('removed', p_phone_number_id);
END
$$;

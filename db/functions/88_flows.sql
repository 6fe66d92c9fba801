-- 88_flows: keyword flows and their sessions, executed in PL/pgSQL (SPEC-2 §C).
--
-- A flow's definition is a graph of nodes:
--   {"start": "hello", "nodes": {
--      "hello": {"type": "message", "text": "Olá {{contact.name}}!", "next": "menu"},
--      "menu":  {"type": "buttons", "text": "Quer marcar?", "buttons": [
--                   {"id": "yes", "title": "Sim", "next": "ask"}, {"id": "no", "title": "Não", "next": "bye"}]},
--      "ask":   {"type": "question", "text": "Para quando?", "var": "when", "next": "check"},
--      "check": {"type": "condition", "var": "when", "op": "contains", "value": "amanha",
--                "then": "staff", "else": "bye"},
--      "staff": {"type": "handoff", "text": "Um colaborador vai responder."},
--      "bye":   {"type": "end", "text": "Obrigado!"}}}
-- message (send, go on), buttons / list (send, wait; the reply's id picks the
-- branch), question (send, wait; the answer goes into context[var]),
-- condition (branch on context), handoff (pause, tell staff), end.
-- advance_session walks from the session's node until it must wait,
-- queueing each outbound message as a message.send event in the outbox.

-- ------------------------------------------------------------ trigger matching
-- The seed's matchesTrigger: no text or no keyword → no; "default" matches
-- every text; else equal, contained, or one of the words — after trim,
-- diacritics stripped, lower case.
CREATE OR REPLACE FUNCTION barnum.matches_trigger(p_text text, p_trigger text) RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT CASE
        WHEN coalesce(p_text, '') = '' OR coalesce(p_trigger, '') = '' THEN false
        WHEN k = 'default' THEN true
        ELSE m = k OR strpos(m, k) > 0 OR k = ANY (regexp_split_to_array(m, '\s+'))
    END
      FROM (SELECT lower(barnum.strip_diacritics(btrim(p_text))) AS m,
                   lower(barnum.strip_diacritics(btrim(p_trigger))) AS k) x
$$;

-- ------------------------------------------------------------ validation
CREATE OR REPLACE FUNCTION barnum.flow_problem(p_def jsonb) RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    nodes jsonb;
    k text;
    n jsonb;
    t text;
    target text;
    b jsonb;
    cyc text;
BEGIN
    IF p_def IS NULL OR jsonb_typeof(p_def) <> 'object' THEN
        RETURN 'the definition must be a JSON object {"start": …, "nodes": {…}}';
    END IF;
    nodes := p_def -> 'nodes';
    IF jsonb_typeof(nodes) IS DISTINCT FROM 'object' OR nodes = '{}' THEN
        RETURN 'nodes must be a non-empty object of node id → node';
    END IF;
    IF (SELECT count(*) FROM jsonb_object_keys(nodes)) > 500 THEN
        RETURN 'a flow has at most 500 nodes';
    END IF;
    IF jsonb_typeof(p_def -> 'start') IS DISTINCT FROM 'string' OR NOT nodes ? (p_def ->> 'start') THEN
        RETURN format('start must name a node, got %s', coalesce(p_def ->> 'start', 'nothing'));
    END IF;
    FOR k, n IN SELECT key, value FROM jsonb_each(nodes) LOOP
        IF jsonb_typeof(n) <> 'object' THEN
            RETURN format('node %s must be an object', k);
        END IF;
        t := n ->> 'type';
        IF t IS NULL OR t NOT IN ('message', 'buttons', 'list', 'question', 'condition', 'handoff', 'end') THEN
            RETURN format('node %s has an unknown type %s (message, buttons, list, question, condition, handoff, end)',
                          k, coalesce(t, 'nothing'));
        END IF;
        IF t IN ('message', 'buttons', 'list', 'question')
           AND (jsonb_typeof(n -> 'text') IS DISTINCT FROM 'string' OR btrim(n ->> 'text') = '') THEN
            RETURN format('node %s (%s) needs a text', k, t);
        END IF;
        IF t = 'message' AND length(n ->> 'text') > 4096 OR t IN ('buttons', 'list') AND length(n ->> 'text') > 1024 THEN
            RETURN format('node %s: text too long for WhatsApp', k);
        END IF;
        IF t = 'buttons' AND (jsonb_typeof(n -> 'buttons') IS DISTINCT FROM 'array'
                              OR jsonb_array_length(n -> 'buttons') NOT BETWEEN 1 AND 3) THEN
            RETURN format('node %s: buttons must be 1 to 3 (WhatsApp reply buttons)', k);
        END IF;
        IF t = 'list' AND (jsonb_typeof(n -> 'rows') IS DISTINCT FROM 'array'
                           OR jsonb_array_length(n -> 'rows') NOT BETWEEN 1 AND 10) THEN
            RETURN format('node %s: rows must be 1 to 10 (a WhatsApp list)', k);
        END IF;
        IF t = 'list' AND (jsonb_typeof(n -> 'button') IS DISTINCT FROM 'string' OR length(n ->> 'button') NOT BETWEEN 1 AND 20) THEN
            RETURN format('node %s: a list needs its button title (1–20 characters)', k);
        END IF;
        FOR b IN SELECT x FROM jsonb_array_elements(CASE t WHEN 'buttons' THEN n -> 'buttons'
                                                           WHEN 'list' THEN n -> 'rows' ELSE '[]' END) x LOOP
            IF jsonb_typeof(b -> 'id') IS DISTINCT FROM 'string' OR length(b ->> 'id') NOT BETWEEN 1 AND 200
               OR jsonb_typeof(b -> 'title') IS DISTINCT FROM 'string'
               OR length(b ->> 'title') NOT BETWEEN 1 AND (CASE t WHEN 'buttons' THEN 20 ELSE 24 END) THEN
                RETURN format('node %s: each option needs an id and a title of 1–%s characters', k,
                              CASE t WHEN 'buttons' THEN 20 ELSE 24 END);
            END IF;
        END LOOP;
        IF t IN ('buttons', 'list') AND (SELECT count(DISTINCT x ->> 'id') <> count(*)
                                           FROM jsonb_array_elements(CASE t WHEN 'buttons' THEN n -> 'buttons'
                                                                            ELSE n -> 'rows' END) x) THEN
            RETURN format('node %s: option ids must be distinct', k);
        END IF;
        IF t IN ('question', 'condition') AND coalesce(n ->> 'var', '') !~ '^[a-z_][a-z0-9_]{0,62}$' THEN
            RETURN format('node %s: var must be a name like "when" (a-z, 0-9, _)', k);
        END IF;
        IF t = 'condition' AND coalesce(n ->> 'op', '') NOT IN ('equals', 'not_equals', 'contains', 'exists', 'not_exists') THEN
            RETURN format('node %s: op must be equals, not_equals, contains, exists or not_exists', k);
        END IF;
        IF t = 'condition' AND n ->> 'op' IN ('equals', 'not_equals', 'contains')
           AND jsonb_typeof(n -> 'value') IS DISTINCT FROM 'string' THEN
            RETURN format('node %s: %s needs a string value', k, n ->> 'op');
        END IF;
        IF t = 'condition' AND (n ->> 'then' IS NULL OR n ->> 'else' IS NULL) THEN
            RETURN format('node %s: a condition needs then and else', k);
        END IF;
        IF t = 'question' AND n ->> 'next' IS NULL THEN
            RETURN format('node %s: a question needs next', k);
        END IF;
        -- Every edge must land on a node.
        FOR target IN
            SELECT v FROM (VALUES (n ->> 'next'), (n ->> 'then'), (n ->> 'else')) e(v) WHERE v IS NOT NULL
            UNION ALL
            SELECT x ->> 'next' FROM jsonb_array_elements(CASE t WHEN 'buttons' THEN n -> 'buttons'
                                                               WHEN 'list' THEN n -> 'rows' ELSE '[]' END) x
        LOOP
            IF target IS NULL OR NOT nodes ? target THEN
                RETURN format('node %s points to %s, which is not a node', k, coalesce(target, 'nothing'));
            END IF;
        END LOOP;
    END LOOP;
    -- A loop of nodes that never wait would spin forever.
    WITH RECURSIVE edge AS (
        SELECT key AS src, v AS dst
          FROM jsonb_each(nodes), LATERAL (VALUES (value ->> 'next'), (value ->> 'then'), (value ->> 'else')) e(v)
         WHERE value ->> 'type' IN ('message', 'condition') AND v IS NOT NULL
           AND nodes -> v ->> 'type' IN ('message', 'condition')
    ), walk(start, node, path, looped) AS (
        SELECT src, dst, ARRAY[src], src = dst FROM edge
        UNION ALL
        SELECT w.start, e.dst, w.path || w.node, e.dst = ANY (w.path || w.node)
          FROM walk w JOIN edge e ON e.src = w.node
         WHERE NOT w.looped AND cardinality(w.path) < 501
    )
    SELECT array_to_string(path || node, ' → ') INTO cyc FROM walk WHERE looped LIMIT 1;
    IF cyc IS NOT NULL THEN
        RETURN format('the nodes %s loop without a node that waits for the contact (buttons, list, question)', cyc);
    END IF;
    RETURN NULL;
END
$$;

-- Definitions are validated whatever writes them.
CREATE OR REPLACE FUNCTION barnum.flows_validate_trg() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    problem text := barnum.flow_problem(NEW.definition);
BEGIN
    IF problem IS NOT NULL THEN
        PERFORM barnum.fail('BN422', format('flow %L: %s', NEW.name, problem), '{"field": "definition"}');
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
SELECT barnum.ensure_trigger('barnum.flows', 'trg_flows_validate', $trg$
CREATE OR REPLACE TRIGGER trg_flows_validate
    BEFORE INSERT OR UPDATE OF definition, name ON barnum.flows
    FOR EACH ROW EXECUTE FUNCTION barnum.flows_validate_trg()
$trg$);

-- ------------------------------------------------------------ executor
-- {{var}} and {{contact.name}} from the session's context.
CREATE OR REPLACE FUNCTION barnum.flow_render(p_text text, p_context jsonb, p_contact barnum.contacts)
RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    out text := p_text;
    m text[];
BEGIN
    FOR m IN SELECT regexp_matches(p_text, '\{\{\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\}\}', 'g') LOOP
        out := replace(out, '{{' || m[1] || '}}', coalesce(CASE m[1]
            WHEN 'contact.name' THEN p_contact.name
            WHEN 'contact.phone' THEN p_contact.phone
            ELSE p_context ->> m[1] END, ''));
    END LOOP;
    RETURN regexp_replace(out, '\{\{\s*[A-Za-z_][A-Za-z0-9_.]*\s*\}\}', '', 'g');
END
$$;

-- Queue one outbound message of a session: a messages row (pending, its
-- wamid comes when it is sent) and a message.send event whose data holds the
-- Cloud API request body, for n8n or the native sender.
CREATE OR REPLACE FUNCTION barnum.flow_send(
    s barnum.flow_sessions, c barnum.contacts, p_node jsonb, p_text text, p_route jsonb)
RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    body jsonb;
    v_type text;
    v_id uuid;
BEGIN
    CASE p_node ->> 'type'
    WHEN 'buttons' THEN
        v_type := 'interactive';
        body := jsonb_build_object('type', 'interactive', 'interactive', jsonb_build_object(
            'type', 'button', 'body', jsonb_build_object('text', p_text),
            'action', jsonb_build_object('buttons', (
                SELECT jsonb_agg(jsonb_build_object('type', 'reply', 'reply',
                                 jsonb_build_object('id', b ->> 'id', 'title', b ->> 'title')) ORDER BY i)
                  FROM jsonb_array_elements(p_node -> 'buttons') WITH ORDINALITY AS x(b, i)))));
    WHEN 'list' THEN
        v_type := 'interactive';
        body := jsonb_build_object('type', 'interactive', 'interactive', jsonb_build_object(
            'type', 'list', 'body', jsonb_build_object('text', p_text),
            'action', jsonb_build_object('button', p_node ->> 'button', 'sections', jsonb_build_array(
                jsonb_build_object('title', left(coalesce(p_node ->> 'section', p_node ->> 'button'), 24), 'rows', (
                    SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                               'id', r ->> 'id', 'title', r ->> 'title', 'description', r ->> 'description')) ORDER BY i)
                      FROM jsonb_array_elements(p_node -> 'rows') WITH ORDINALITY AS x(r, i)))))));
    ELSE
        v_type := 'text';
        body := jsonb_build_object('type', 'text', 'text', jsonb_build_object('preview_url', false, 'body', p_text));
    END CASE;
    body := jsonb_build_object('messaging_product', 'whatsapp', 'recipient_type', 'individual', 'to', c.wa_id) || body;
    INSERT INTO barnum.messages (account_id, contact_id, phone_number_id, direction, type, content, payload,
                                 status, status_updated_at, session_id)
    VALUES (s.account_id, c.id, p_route ->> 'phone_number_id', 'outbound', v_type, p_text, body,
            'pending', barnum.clock(), s.id)
    RETURNING id INTO v_id;
    -- The relay sends a batch concurrently: sequence (per session) lets a
    -- sender keep the conversation's order.
    PERFORM barnum.emit_message_event('message.send', s.account_id, v_id, jsonb_build_object(
        'account_id', s.account_id, 'message_id', v_id, 'session_id', s.id, 'contact_id', c.id,
        'sequence', (SELECT count(*) FROM barnum.messages m WHERE m.session_id = s.id AND m.direction = 'outbound'),
        'to', c.wa_id, 'type', v_type, 'content', p_text, 'whatsapp', body,
        'metadata', jsonb_strip_nulls(p_route)));
    RETURN v_id;
END
$$;

-- Walk a session from where it is until a node waits for the contact.
-- p_input: {"text": …, "reply_id": …} of the contact's message (NULL to
-- start).  Any error marks the session Errored with the reason (the inbound
-- message is stored by the caller before, so nothing is lost).
CREATE OR REPLACE FUNCTION barnum.advance_session(p_session_id uuid, p_input jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    s barnum.flow_sessions;
    c barnum.contacts;
    def jsonb;
    node jsonb;
    node_id text;
    choice jsonb;
    answer text;
    route jsonb;
    sent int := 0;
    steps int := 0;
    v_status text;
BEGIN
    SELECT * INTO s FROM barnum.flow_sessions WHERE id = p_session_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM barnum.fail('BN404', format('no session %s', p_session_id));
    END IF;
    IF s.status <> 'Active' THEN
        RETURN jsonb_build_object('session_id', s.id, 'status', s.status, 'sent', 0);
    END IF;
    SELECT * INTO c FROM barnum.contacts WHERE id = s.contact_id;
    SELECT definition INTO def FROM barnum.flows WHERE id = s.flow_id;
    -- Replies leave from the number the contact last wrote to.
    SELECT jsonb_build_object('phone_number_id', m.phone_number_id,
                              'display_phone_number', n.display_phone_number)
      INTO route
      FROM barnum.messages m LEFT JOIN barnum.whatsapp_numbers n ON n.phone_number_id = m.phone_number_id
     WHERE m.contact_id = c.id AND m.direction = 'inbound'
     ORDER BY m.created_at DESC LIMIT 1;
    route := coalesce(route, '{}');
    PERFORM barnum.notify_typing(c.id, true);
    BEGIN
        node_id := s.current_node_id;
        IF node_id IS NULL THEN
            node_id := def ->> 'start';
        ELSE
            -- The session waits here: the contact's message is the answer.
            node := def -> 'nodes' -> node_id;
            IF node ->> 'type' IN ('buttons', 'list') THEN
                SELECT x INTO choice
                  FROM jsonb_array_elements(CASE node ->> 'type' WHEN 'buttons' THEN node -> 'buttons'
                                                                ELSE node -> 'rows' END) x
                 WHERE x ->> 'id' = p_input ->> 'reply_id'
                    OR barnum.normalize_reply(x ->> 'title') = barnum.normalize_reply(p_input ->> 'text')
                 LIMIT 1;
                IF choice IS NULL THEN
                    -- Not one of the options: say so and ask again.
                    PERFORM barnum.flow_send(s, c, '{"type": "message"}',
                        coalesce(node ->> 'fallback', 'Por favor, escolha uma das opções.'), route);
                    PERFORM barnum.flow_send(s, c, node, barnum.flow_render(node ->> 'text', s.context, c), route);
                    sent := 2;
                    node_id := NULL;
                    v_status := 'Active';
                ELSE
                    s.context := s.context || jsonb_build_object('last_choice', choice ->> 'id');
                    node_id := choice ->> 'next';
                END IF;
            ELSIF node ->> 'type' = 'question' THEN
                answer := coalesce(p_input ->> 'text', p_input ->> 'title');
                IF coalesce(btrim(answer), '') = '' THEN
                    PERFORM barnum.flow_send(s, c, node, barnum.flow_render(node ->> 'text', s.context, c), route);
                    sent := 1;
                    node_id := NULL;
                    v_status := 'Active';
                ELSE
                    s.context := s.context || jsonb_build_object(node ->> 'var', left(answer, 4096));
                    node_id := node ->> 'next';
                END IF;
            END IF;
        END IF;

        WHILE v_status IS NULL LOOP
            steps := steps + 1;
            IF steps > 100 THEN
                RAISE EXCEPTION 'the flow walked 100 nodes without waiting for the contact';
            END IF;
            IF node_id IS NULL THEN
                v_status := 'Completed';
                EXIT;
            END IF;
            node := def -> 'nodes' -> node_id;
            IF node IS NULL THEN
                RAISE EXCEPTION 'node % is not in the flow', node_id;
            END IF;
            CASE node ->> 'type'
            WHEN 'message' THEN
                PERFORM barnum.flow_send(s, c, node, barnum.flow_render(node ->> 'text', s.context, c), route);
                sent := sent + 1;
                node_id := node ->> 'next';
            WHEN 'condition' THEN
                node_id := CASE
                    WHEN CASE node ->> 'op'
                        WHEN 'exists' THEN coalesce(s.context ->> (node ->> 'var'), '') <> ''
                        WHEN 'not_exists' THEN coalesce(s.context ->> (node ->> 'var'), '') = ''
                        WHEN 'equals' THEN barnum.normalize_reply(s.context ->> (node ->> 'var'))
                                           = barnum.normalize_reply(node ->> 'value')
                        WHEN 'not_equals' THEN barnum.normalize_reply(s.context ->> (node ->> 'var'))
                                               IS DISTINCT FROM barnum.normalize_reply(node ->> 'value')
                        WHEN 'contains' THEN strpos(barnum.normalize_reply(s.context ->> (node ->> 'var')),
                                                    barnum.normalize_reply(node ->> 'value')) > 0
                    END THEN node ->> 'then' ELSE node ->> 'else' END;
            WHEN 'buttons', 'list', 'question' THEN
                PERFORM barnum.flow_send(s, c, node, barnum.flow_render(node ->> 'text', s.context, c), route);
                sent := sent + 1;
                v_status := 'Active';  -- wait here
            WHEN 'handoff' THEN
                IF coalesce(node ->> 'text', '') <> '' THEN
                    PERFORM barnum.flow_send(s, c, node, barnum.flow_render(node ->> 'text', s.context, c), route);
                    sent := sent + 1;
                END IF;
                v_status := 'Paused';
                PERFORM barnum.emit_message_event('session.handoff', s.account_id, s.id, jsonb_build_object(
                    'account_id', s.account_id, 'session_id', s.id, 'flow_id', s.flow_id, 'contact_id', c.id,
                    'from', c.wa_id, 'contact_name', c.name, 'node', node_id, 'context', s.context,
                    'metadata', jsonb_strip_nulls(route)));
            WHEN 'end' THEN
                IF coalesce(node ->> 'text', '') <> '' THEN
                    PERFORM barnum.flow_send(s, c, node, barnum.flow_render(node ->> 'text', s.context, c), route);
                    sent := sent + 1;
                END IF;
                v_status := 'Completed';
                node_id := NULL;
            END CASE;
        END LOOP;

        UPDATE barnum.flow_sessions
           SET status = v_status,
               current_node_id = CASE WHEN v_status = 'Completed' THEN NULL
                                      ELSE coalesce(node_id, s.current_node_id) END,
               context = s.context, error = NULL, updated_at = now()
         WHERE id = s.id;
    EXCEPTION WHEN OTHERS THEN
        -- Everything this walk queued is undone with it; the session says why.
        v_status := 'Errored';
        sent := 0;
        UPDATE barnum.flow_sessions SET status = 'Errored', error = left(SQLERRM, 2000), updated_at = now()
         WHERE id = s.id;
    END;
    PERFORM barnum.notify_typing(c.id, false);
    RETURN jsonb_build_object('session_id', s.id, 'status', v_status, 'sent', sent);
END
$$;

-- ------------------------------------------------------------ dispatch
-- An inbound message meets the flows: the contact's Active or Paused session
-- takes precedence (a Paused one waits for staff: the message is only
-- attached); else the account's first Active flow whose trigger matches the
-- text starts (or restarts) its session.  Only one flow runs.
CREATE OR REPLACE FUNCTION barnum.dispatch_flows(p_msg barnum.messages, p_contact barnum.contacts, p_reply_id text)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    s barnum.flow_sessions;
    f barnum.flows;
BEGIN
    SELECT * INTO s FROM barnum.flow_sessions
     WHERE contact_id = p_contact.id AND status IN ('Active', 'Paused')
     ORDER BY updated_at DESC LIMIT 1
       FOR UPDATE;
    IF FOUND THEN
        UPDATE barnum.messages SET session_id = s.id WHERE id = p_msg.id;
        IF s.status = 'Paused' THEN
            RETURN jsonb_build_object('session_id', s.id, 'status', 'Paused', 'sent', 0);
        END IF;
        RETURN barnum.advance_session(s.id, jsonb_build_object('text', p_msg.content, 'reply_id', p_reply_id));
    END IF;
    IF p_msg.type <> 'text' THEN
        RETURN NULL;  -- the seed matches triggers on text only
    END IF;
    SELECT * INTO f FROM barnum.flows
     WHERE account_id = p_msg.account_id AND status = 'Active' AND barnum.matches_trigger(p_msg.content, trigger)
     ORDER BY created_at, id LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO barnum.flow_sessions AS fs (account_id, contact_id, flow_id)
    VALUES (p_msg.account_id, p_contact.id, f.id)
    ON CONFLICT (contact_id, flow_id) DO UPDATE
       SET status = 'Active', current_node_id = NULL, context = '{}', error = NULL, updated_at = now()
    RETURNING * INTO s;
    UPDATE barnum.messages SET session_id = s.id WHERE id = p_msg.id;
    RETURN barnum.advance_session(s.id, NULL);
END
$$;

-- ------------------------------------------------------------ operators
-- barnum flows import: create or replace flows by (account, name).
CREATE OR REPLACE FUNCTION barnum.flow_import(p_account text, p_doc jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    v_account uuid := barnum.account_id_by_name(coalesce(p_account, 'default'));
    item jsonb;
    f barnum.flows;
    out jsonb := '[]';
BEGIN
    IF jsonb_typeof(p_doc) = 'object' THEN
        p_doc := jsonb_build_array(p_doc);
    END IF;
    IF jsonb_typeof(p_doc) IS DISTINCT FROM 'array' OR jsonb_array_length(p_doc) = 0 THEN
        PERFORM barnum.fail('BN422', 'the file must hold a flow object or an array of them');
    END IF;
    FOR item IN SELECT x FROM jsonb_array_elements(p_doc) x LOOP
        PERFORM barnum.api_check_fields(item, '{name,trigger,status,definition}');
        IF jsonb_typeof(item -> 'name') IS DISTINCT FROM 'string' OR jsonb_typeof(item -> 'trigger') IS DISTINCT FROM 'string' THEN
            PERFORM barnum.fail('BN422', 'each flow needs a name and a trigger (strings)');
        END IF;
        IF coalesce(item ->> 'status', 'Active') NOT IN ('Active', 'Inactive') THEN
            PERFORM barnum.fail('BN422', format('flow %L: status must be Active or Inactive', item ->> 'name'));
        END IF;
        INSERT INTO barnum.flows AS fl (account_id, name, trigger, status, definition)
        VALUES (v_account, item ->> 'name', item ->> 'trigger', coalesce(item ->> 'status', 'Active'),
                coalesce(item -> 'definition', 'null'))
        ON CONFLICT (account_id, name) DO UPDATE
           SET trigger = EXCLUDED.trigger, status = EXCLUDED.status, definition = EXCLUDED.definition
        RETURNING * INTO f;
        out := out || jsonb_build_object('id', f.id, 'name', f.name, 'trigger', f.trigger, 'status', f.status,
                                         'nodes', (SELECT count(*) FROM jsonb_object_keys(f.definition -> 'nodes')));
    END LOOP;
    RETURN out;
END
$$;

CREATE OR REPLACE FUNCTION barnum.flow_list(p_account text DEFAULT NULL) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'id', f.id, 'account', a.name, 'name', f.name, 'trigger', f.trigger, 'status', f.status,
               'nodes', (SELECT count(*) FROM jsonb_object_keys(f.definition -> 'nodes')),
               'sessions', (SELECT jsonb_object_agg(st, n) FROM (
                   SELECT s.status AS st, count(*) AS n FROM barnum.flow_sessions s WHERE s.flow_id = f.id
                    GROUP BY s.status) x),
               'updated_at', f.updated_at) ORDER BY a.name, f.created_at), '[]')
      FROM barnum.flows f JOIN barnum.accounts a ON a.id = f.account_id
     WHERE p_account IS NULL OR a.name = p_account
$$;

CREATE OR REPLACE FUNCTION barnum.flow_set_status(p_account text, p_name text, p_status text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    f barnum.flows;
BEGIN
    UPDATE barnum.flows SET status = p_status, updated_at = now()
     WHERE account_id = barnum.account_id_by_name(coalesce(p_account, 'default')) AND name = p_name
    RETURNING * INTO f;
    IF NOT FOUND THEN
        PERFORM barnum.fail('BN404', format('no flow named %L in account %s (barnum flows list)', p_name,
                                            coalesce(p_account, 'default')));
    END IF;
    RETURN jsonb_build_object('name', f.name, 'status', f.status);
END
$$;

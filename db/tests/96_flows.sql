-- 96_flows: trigger matching (the seed's matchesTrigger), definition
-- validation, each node type of advance_session, dispatch precedence, and a
-- flow driven by ingest_whatsapp.
BEGIN;
SELECT plan(70);

SET LOCAL barnum.clock = '2030-06-01 09:00:00+00';

-- ------------------------------------------------------------ helpers
CREATE FUNCTION pg_temp.note(p_wamid text, p_body text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('object', 'whatsapp_business_account', 'entry', jsonb_build_array(jsonb_build_object(
        'id', '1', 'changes', jsonb_build_array(jsonb_build_object('field', 'messages', 'value', jsonb_build_object(
            'messaging_product', 'whatsapp',
            'metadata', jsonb_build_object('display_phone_number', '15550783881', 'phone_number_id', '106540352242922'),
            'contacts', jsonb_build_array(jsonb_build_object('profile', jsonb_build_object('name', 'Rui'), 'wa_id', '351966000006')),
            'messages', jsonb_build_array(jsonb_build_object('from', '351966000006', 'id', p_wamid,
                                                             'timestamp', '1906354800', 'type', 'text',
                                                             'text', jsonb_build_object('body', p_body)))))))))
$$;
CREATE FUNCTION pg_temp.button(p_wamid text, p_id text, p_title text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_set(pg_temp.note(p_wamid, ''), '{entry,0,changes,0,value,messages,0}', jsonb_build_object(
        'from', '351966000006', 'id', p_wamid, 'timestamp', '1906354800', 'type', 'interactive',
        'interactive', jsonb_build_object('type', 'button_reply',
                                          'button_reply', jsonb_build_object('id', p_id, 'title', p_title))))
$$;
CREATE FUNCTION pg_temp.sess(p_flow text) RETURNS barnum.flow_sessions LANGUAGE sql AS $$
    SELECT s.* FROM barnum.flow_sessions s JOIN barnum.flows f ON f.id = s.flow_id WHERE f.name = p_flow $$;
CREATE FUNCTION pg_temp.sent() RETURNS text[] LANGUAGE sql AS $$
    SELECT coalesce(array_agg(content ORDER BY created_at), '{}') FROM barnum.messages
     WHERE direction = 'outbound' $$;
CREATE FUNCTION pg_temp.def(p_nodes jsonb, p_start text DEFAULT 'a') RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('start', p_start, 'nodes', p_nodes) $$;

-- ============================================================ matchesTrigger
SELECT is(barnum.matches_trigger(t, k), want, format('matches_trigger(%L, %L) = %s', t, k, want))
  FROM (VALUES ('Olá!', 'ola', true), ('  HOLA  ', 'hola', true), ('quero marcar consulta', 'marcar', true),
               ('marcação', 'marcacao', true), ('qualquer coisa', 'default', true), ('x', 'DEFAULT', true),
               (NULL, 'default', false), ('', 'default', false), ('bom dia', 'noite', false),
               ('remarcar', 'marcar', true), ('hello', '', false)) AS v(t, k, want);

-- ============================================================ validation
SELECT throws_ok(format('INSERT INTO barnum.flows (account_id, name, trigger, definition) VALUES (%L, %L, %L, %L)',
                        '00000000-0000-0000-0000-000000000001', 'bad', 'x', d), 'BN422', NULL, label)
  FROM (VALUES
    ('{"nodes": {"a": {"type": "end"}}}', 'no start'),
    ('{"start": "a", "nodes": {"a": {"type": "dance"}}}', 'an unknown node type'),
    ('{"start": "a", "nodes": {"a": {"type": "message", "text": "hi", "next": "zz"}}}', 'a dangling edge'),
    ('{"start": "a", "nodes": {"a": {"type": "message", "text": "hi", "next": "b"}, "b": {"type": "message", "text": "again", "next": "a"}}}',
     'a loop without a wait'),
    ('{"start": "a", "nodes": {"a": {"type": "condition", "var": "x", "op": "exists", "then": "a", "else": "b"}, "b": {"type": "end"}}}',
     'a condition looping on itself'),
    ('{"start": "a", "nodes": {"a": {"type": "buttons", "text": "?", "buttons": [{"id": "1", "title": "a", "next": "b"}, {"id": "2", "title": "b", "next": "b"}, {"id": "3", "title": "c", "next": "b"}, {"id": "4", "title": "d", "next": "b"}]}, "b": {"type": "end"}}}',
     'four buttons'),
    ('{"start": "a", "nodes": {"a": {"type": "question", "text": "?", "next": "b"}, "b": {"type": "end"}}}', 'a question without var'),
    ('{"start": "a", "nodes": {"a": {"type": "message", "next": "b"}, "b": {"type": "end"}}}', 'a message without text')
  ) AS v(d, label);
SELECT lives_ok($$ INSERT INTO barnum.flows (account_id, name, trigger, definition) VALUES
    ('00000000-0000-0000-0000-000000000001', 'loop-ok', 'zzz-never', '{"start": "a", "nodes": {
        "a": {"type": "buttons", "text": "?", "buttons": [{"id": "again", "title": "Again", "next": "b"}]},
        "b": {"type": "message", "text": "once more", "next": "a"}}}') $$,
    'a loop through a wait node is fine');
SELECT throws_like($$ UPDATE barnum.flows SET definition = '{"start": "a", "nodes": {"a": {"type": "dance"}}}' WHERE name = 'loop-ok' $$,
                   '%unknown type dance%', 'an update is validated too, with the reason');

-- ============================================================ fixtures
SELECT barnum.whatsapp_number_add('106540352242922', 'default', '15550783881');
INSERT INTO barnum.webhook_endpoints (name, url, event_types) VALUES ('n8n', 'https://n8n.example/in', '{*}');
SELECT is(jsonb_array_length(barnum.flow_import('default', jsonb_build_array(
    jsonb_build_object('name', 'booking', 'trigger', 'marcar', 'definition', pg_temp.def('{
        "a": {"type": "message", "text": "Olá {{contact.name}}!", "next": "menu"},
        "menu": {"type": "buttons", "text": "Quer marcar uma consulta?", "fallback": "Escolha Sim ou Não.",
                 "buttons": [{"id": "yes", "title": "Sim", "next": "when"}, {"id": "no", "title": "Não", "next": "bye"}]},
        "when": {"type": "question", "text": "Para quando?", "var": "when", "next": "check"},
        "check": {"type": "condition", "var": "when", "op": "contains", "value": "amanha", "then": "staff", "else": "pick"},
        "pick": {"type": "list", "text": "Escolha o horário para {{when}}", "button": "Horários",
                 "rows": [{"id": "9", "title": "09:00", "next": "bye"}, {"id": "14", "title": "14:00", "next": "bye"}]},
        "staff": {"type": "handoff", "text": "Um colaborador vai responder."},
        "bye": {"type": "end", "text": "Obrigado!"}}')),
    jsonb_build_object('name', 'also-marcar', 'trigger', 'marcar', 'definition',
                       pg_temp.def('{"a": {"type": "end", "text": "second flow"}}')),
    jsonb_build_object('name', 'broken', 'trigger', 'quebrar', 'definition',
                       pg_temp.def('{"a": {"type": "end", "text": "fine so far"}}'))))), 3, 'flow_import creates three flows');
SELECT throws_ok($$ SELECT barnum.flow_import('default', '{"name": "x", "trigger": "y", "definition": {"start": "a", "nodes": {"a": {"type": "dance"}}}}') $$,
                 'BN422', NULL, 'flow_import refuses an invalid definition');
SELECT throws_ok($$ SELECT barnum.flow_import('default', '{"name": "x", "trigger": "y", "definiton": {}}') $$,
                 'BN400', NULL, 'flow_import refuses an unknown field');

-- ============================================================ a walk through every node type
SELECT is(barnum.ingest_whatsapp(pg_temp.note('wamid.F1', 'Quero marcar!')) -> 'flows', '1', 'a matching text starts a flow');
SELECT is((pg_temp.sess('booking')).status, 'Active', 'the first matching flow has the session');
SELECT is((pg_temp.sess('also-marcar')), NULL, '… and only the first flow runs');
SELECT is((pg_temp.sess('booking')).current_node_id, 'menu', 'message went on; buttons wait');
SELECT is(pg_temp.sent(), ARRAY['Olá Rui!', 'Quer marcar uma consulta?'], 'the message and the buttons are queued');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_events WHERE event_type = 'message.send'), 2,
          'each as a message.send event');
SELECT is((SELECT data #>> '{whatsapp,interactive,action,buttons,1,reply,id}' FROM barnum.whatsapp_events
            WHERE event_type = 'message.send' AND data ->> 'content' = 'Quer marcar uma consulta?'), 'no',
          'the buttons are a Cloud API interactive message');
SELECT is((SELECT data #>> '{whatsapp,to}' FROM barnum.whatsapp_events WHERE event_type = 'message.send' LIMIT 1),
          '351966000006', 'addressed to the contact');
SELECT is((SELECT session_id FROM barnum.messages WHERE wa_message_id = 'wamid.F1'), (pg_temp.sess('booking')).id,
          'the inbound message belongs to the session');

SELECT is(barnum.ingest_whatsapp(pg_temp.note('wamid.F2', 'talvez')) -> 'flows', '1', 'an answer that is no option');
SELECT is((pg_temp.sess('booking')).current_node_id, 'menu', '… keeps the session at the buttons');
SELECT is((pg_temp.sent())[3:4], ARRAY['Escolha Sim ou Não.', 'Quer marcar uma consulta?'], '… says so and asks again');

SELECT lives_ok($$ SELECT barnum.ingest_whatsapp(pg_temp.button('wamid.F3', 'yes', 'Sim')) $$, 'a button reply');
SELECT is((pg_temp.sess('booking')).current_node_id, 'when', 'branches by the reply id to the question');
SELECT lives_ok($$ SELECT barnum.ingest_whatsapp(pg_temp.note('wamid.F4', 'Sexta-feira')) $$, 'an answer to the question');
SELECT is((pg_temp.sess('booking')).context ->> 'when', 'Sexta-feira', 'the answer is stored in context');
SELECT is((pg_temp.sess('booking')).current_node_id, 'pick', 'the condition took else (no "amanha"); the list waits');
SELECT is((pg_temp.sent())[array_length(pg_temp.sent(), 1)], 'Escolha o horário para Sexta-feira', 'context is rendered into texts');
SELECT is((SELECT payload #>> '{interactive,type}' FROM barnum.messages WHERE content = 'Escolha o horário para Sexta-feira'),
          'list', 'the list is a Cloud API list message');
SELECT lives_ok($$ SELECT barnum.ingest_whatsapp(pg_temp.note('wamid.F5', '14:00')) $$, 'a list answered by its title');
SELECT is((pg_temp.sess('booking')).status, 'Completed', 'end completes the session');
SELECT is((pg_temp.sent())[array_length(pg_temp.sent(), 1)], 'Obrigado!', 'with its text');
SELECT is((pg_temp.sess('booking')).current_node_id, NULL, 'a completed session has no node');

-- A new trigger restarts the completed session; this time towards staff.
SELECT lives_ok($$ SELECT barnum.ingest_whatsapp(pg_temp.note('wamid.F6', 'marcar')) $$, 'the trigger again');
SELECT is((pg_temp.sess('booking')).status, 'Active', 'restarts the session');
SELECT is((pg_temp.sess('booking')).context, '{}'::jsonb, 'with an empty context');
SELECT lives_ok($$ SELECT barnum.ingest_whatsapp(pg_temp.note('wamid.F7', 'sim')) $$, 'yes by text');
SELECT lives_ok($$ SELECT barnum.ingest_whatsapp(pg_temp.note('wamid.F8', 'amanhã de manhã')) $$, 'an answer with amanhã');
SELECT is((pg_temp.sess('booking')).status, 'Paused', 'the condition (diacritics ignored) led to handoff: paused');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_events WHERE event_type = 'session.handoff'), 1,
          'staff are told (session.handoff)');
SELECT is((SELECT data ->> 'session_id' FROM barnum.whatsapp_events WHERE event_type = 'session.handoff'),
          (pg_temp.sess('booking')).id::text, '… with the session');
CREATE TEMP TABLE before_paused AS SELECT count(*) AS n FROM barnum.messages WHERE direction = 'outbound';
SELECT lives_ok($$ SELECT barnum.ingest_whatsapp(pg_temp.note('wamid.F9', 'olá? marcar')) $$, 'a message while paused');
SELECT is((SELECT count(*) FROM barnum.messages WHERE direction = 'outbound'), (SELECT n FROM before_paused),
          'a paused session sends nothing (staff answer)');
SELECT is((SELECT session_id FROM barnum.messages WHERE wa_message_id = 'wamid.F9'), (pg_temp.sess('booking')).id,
          'the message is attached to the paused session');
SELECT is((pg_temp.sess('also-marcar')), NULL, 'the paused session takes precedence over another matching flow');

-- ============================================================ errors
UPDATE barnum.flow_sessions SET status = 'Completed' WHERE id = (pg_temp.sess('booking')).id;
ALTER TABLE barnum.flows DISABLE TRIGGER trg_flows_validate;
UPDATE barnum.flows SET definition = '{"start": "a", "nodes": {"a": {"type": "message", "text": "hi", "next": "gone"}}}'
 WHERE name = 'broken';
ALTER TABLE barnum.flows ENABLE TRIGGER trg_flows_validate;
SELECT lives_ok($$ SELECT barnum.ingest_whatsapp(pg_temp.note('wamid.E1', 'quebrar')) $$, 'a flow that fails at run time');
SELECT is((pg_temp.sess('broken')).status, 'Errored', 'marks its session Errored');
SELECT matches((pg_temp.sess('broken')).error, 'node gone is not in the flow', '… with the reason');
SELECT is((SELECT count(*)::int FROM barnum.messages WHERE content = 'hi'), 0, 'what the failed walk queued is undone');
SELECT is((SELECT count(*)::int FROM barnum.messages WHERE wa_message_id = 'wamid.E1'), 1, 'the inbound message is kept');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_events WHERE event_type = 'message.received'
            AND data ->> 'message_id' = 'wamid.E1'), 1, '… and announced');

-- ============================================================ operators
SELECT is(barnum.flow_set_status('default', 'booking', 'Inactive') ->> 'status', 'Inactive', 'flows can be disabled');
SELECT throws_ok($$ SELECT barnum.flow_set_status('default', 'nope', 'Inactive') $$, 'BN404', NULL, 'an unknown flow is 404');
SELECT is((SELECT x ->> 'status' FROM jsonb_array_elements(barnum.flow_list()) x WHERE x ->> 'name' = 'booking'), 'Inactive',
          'flow_list shows the status');
SELECT lives_ok($$ SELECT barnum.ingest_whatsapp(pg_temp.note('wamid.G1', 'marcar')) $$, 'the trigger with booking off');
SELECT is((pg_temp.sess('also-marcar')).status, 'Completed', 'the next matching Active flow runs instead');

SELECT * FROM finish();
ROLLBACK;

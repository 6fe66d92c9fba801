-- 97_realtime: what the Socket.IO endpoint is fed with (SPEC-2 §D): the
-- events realtime_event(s) builds from the triggers' NOTIFY payloads, and the
-- token checks of connect and join.  That the triggers really NOTIFY (only
-- at commit) is checked over LISTEN in tests/test_realtime.py.
BEGIN;
SELECT plan(45);

-- ------------------------------------------------------------ fixtures
SELECT barnum.account_add('acme');
CREATE TEMP TABLE tok (name text PRIMARY KEY, token text);
INSERT INTO tok SELECT 'reader', d ->> 'token'
  FROM barnum.api_token_create('default', 'frontend', '{conversations:read}') d;
INSERT INTO tok SELECT 'hooks', d ->> 'token'
  FROM barnum.api_token_create('default', 'hooks-only', '{webhooks:read}') d;
INSERT INTO tok SELECT 'acme', d ->> 'token'
  FROM barnum.api_token_create('acme', 'acme-frontend', '{conversations:read}') d;
INSERT INTO tok SELECT 'revoked', d ->> 'token'
  FROM barnum.api_token_create('default', 'gone', '{conversations:read}') d;
SELECT barnum.api_token_revoke((SELECT id FROM barnum.api_tokens WHERE name = 'gone')::text);
CREATE FUNCTION pg_temp.tok(p text) RETURNS text LANGUAGE sql AS $$ SELECT token FROM tok WHERE name = p $$;
GRANT SELECT ON tok TO barnum_shim;

INSERT INTO barnum.contacts (account_id, id, wa_id, name)
SELECT id, '97000000-0000-0000-0000-0000000000c1', '351911000001', 'Sheena' FROM barnum.accounts WHERE name = 'default';
INSERT INTO barnum.contacts (account_id, id, wa_id, name)
SELECT id, '97000000-0000-0000-0000-0000000000c2', '351911000002', 'Other' FROM barnum.accounts WHERE name = 'acme';
INSERT INTO barnum.messages (account_id, id, wa_message_id, contact_id, direction, type, content, status)
SELECT account_id, '97000000-0000-0000-0000-0000000000a1', 'wamid.RT1', id, 'inbound', 'text', 'Olá', 'received'
  FROM barnum.contacts WHERE wa_id = '351911000001';
INSERT INTO barnum.messages (account_id, id, wa_message_id, contact_id, direction, type, content, status, error)
SELECT account_id, '97000000-0000-0000-0000-0000000000a2', 'wamid.RT2', id, 'outbound', 'text', 'Hi', 'failed',
       '[{"code": 131047}]'
  FROM barnum.contacts WHERE wa_id = '351911000001';
INSERT INTO barnum.flows (account_id, id, name, trigger, definition)
SELECT account_id, '97000000-0000-0000-0000-0000000000f1', 'hello', 'oi',
       '{"start": "a", "nodes": {"a": {"type": "end"}}}'
  FROM barnum.contacts WHERE wa_id = '351911000001';
INSERT INTO barnum.flow_sessions (account_id, id, contact_id, flow_id, status)
SELECT account_id, '97000000-0000-0000-0000-0000000000e1', id, '97000000-0000-0000-0000-0000000000f1', 'Active'
  FROM barnum.contacts WHERE wa_id = '351911000001';

-- ============================================================ triggers
SELECT has_trigger('barnum', 'messages', 'trg_messages_realtime_insert', 'messages announce inserts');
SELECT has_trigger('barnum', 'messages', 'trg_messages_realtime_status', 'messages announce status changes');
SELECT has_trigger('barnum', 'flow_sessions', 'trg_flow_sessions_realtime_insert', 'sessions announce their start');
SELECT has_trigger('barnum', 'flow_sessions', 'trg_flow_sessions_realtime_status', 'sessions announce status changes');
SELECT matches((SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'trg_messages_realtime_status'),
               'UPDATE OF status .*WHEN \(\(old\.status IS DISTINCT FROM new\.status\)\)',
               'a message status "change" to the same value announces nothing');
SELECT matches((SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'trg_flow_sessions_realtime_status'),
               'UPDATE OF status .*WHEN \(\(old\.status IS DISTINCT FROM new\.status\)\)',
               'neither does a session''s');

-- ============================================================ events
SELECT is(barnum.realtime_event('message:97000000-0000-0000-0000-0000000000a1:97000000-0000-0000-0000-0000000000c1')
            - 'data',
          jsonb_build_object('account_id', (SELECT id FROM barnum.accounts WHERE name = 'default'),
                             'room', 'conversation:97000000-0000-0000-0000-0000000000c1',
                             'event', 'message:new'),
          'message: → message:new in the contact''s room, with its account');
SELECT is(barnum.realtime_event('message:97000000-0000-0000-0000-0000000000a1:97000000-0000-0000-0000-0000000000c1')
            #>> '{data,contactId}', '97000000-0000-0000-0000-0000000000c1', 'message:new carries contactId');
SELECT is((barnum.realtime_event('message:97000000-0000-0000-0000-0000000000a1:97000000-0000-0000-0000-0000000000c1')
            #> '{data,message}') - '{createdAt,payload,accountId,statusUpdatedAt,sentAt,error,sessionId}'::text[],
          '{"id": "97000000-0000-0000-0000-0000000000a1", "waMessageId": "wamid.RT1", "direction": "inbound",
            "type": "text", "content": "Olá", "status": "received",
            "contactId": "97000000-0000-0000-0000-0000000000c1"}'::jsonb,
          '… and the message as the seed''s frontend knows it (camelCase)');
SELECT ok((barnum.realtime_event('message:97000000-0000-0000-0000-0000000000a1:97000000-0000-0000-0000-0000000000c1')
            #> '{data,message}') ?& '{createdAt,payload,sessionId,statusUpdatedAt}',
          '… with createdAt, payload, sessionId and statusUpdatedAt');

SELECT is(barnum.realtime_event('status:97000000-0000-0000-0000-0000000000a2:97000000-0000-0000-0000-0000000000c1:sent')
            ->> 'event', 'message:status', 'status: → message:status');
SELECT is((barnum.realtime_event('status:97000000-0000-0000-0000-0000000000a2:97000000-0000-0000-0000-0000000000c1:sent')
            -> 'data') - 'statusUpdatedAt',
          '{"messageId": "97000000-0000-0000-0000-0000000000a2", "waMessageId": "wamid.RT2", "status": "sent",
            "contactId": "97000000-0000-0000-0000-0000000000c1", "error": null}'::jsonb,
          '… with the status the notification was about (the row may have moved on), no error');
SELECT is(barnum.realtime_event('status:97000000-0000-0000-0000-0000000000a2:97000000-0000-0000-0000-0000000000c1:failed')
            #> '{data,error}', '[{"code": 131047}]'::jsonb, 'a failed status carries its error');

SELECT is(barnum.realtime_event('session:97000000-0000-0000-0000-0000000000e1:97000000-0000-0000-0000-0000000000c1:Completed')
            - 'account_id',
          '{"room": "conversation:97000000-0000-0000-0000-0000000000c1", "event": "session:updated",
            "data": {"sessionId": "97000000-0000-0000-0000-0000000000e1", "status": "Completed",
                     "contactId": "97000000-0000-0000-0000-0000000000c1",
                     "flowId": "97000000-0000-0000-0000-0000000000f1"}}'::jsonb,
          'session: → session:updated {sessionId, status, contactId}');

SELECT is(barnum.realtime_event('typing:97000000-0000-0000-0000-0000000000c1:start') - 'account_id',
          '{"room": "conversation:97000000-0000-0000-0000-0000000000c1", "event": "typing:start",
            "data": {"contactId": "97000000-0000-0000-0000-0000000000c1"}}'::jsonb,
          'typing:…:start → typing:start {contactId}');
SELECT is(barnum.realtime_event('typing:97000000-0000-0000-0000-0000000000c1:stop') ->> 'event', 'typing:stop',
          'typing:…:stop → typing:stop');
SELECT is(barnum.realtime_event('typing:97000000-0000-0000-0000-0000000000c2:stop') ->> 'account_id',
          (SELECT id::text FROM barnum.accounts WHERE name = 'acme'), 'an event names the contact''s own account');

-- Not ours, malformed, or vanished: NULL, never an error.
SELECT is(barnum.realtime_event('hello'), NULL, 'an unknown kind → NULL');
SELECT is(barnum.realtime_event(NULL), NULL, 'NULL → NULL');
SELECT is(barnum.realtime_event('message:not-a-uuid:97000000-0000-0000-0000-0000000000c1'), NULL, 'a malformed id → NULL');
SELECT is(barnum.realtime_event('message:97000000-0000-0000-0000-0000000000a1'), NULL, 'a missing part → NULL');
SELECT is(barnum.realtime_event('typing:97000000-0000-0000-0000-0000000000c1:maybe'), NULL, 'typing neither start nor stop → NULL');
SELECT is(barnum.realtime_event('typing:97000000-0000-0000-0000-0000000000c1'), NULL, 'typing without start or stop → NULL');
SELECT is(barnum.realtime_event('message:97000000-0000-0000-0000-0000000000ff:97000000-0000-0000-0000-0000000000c1'),
          NULL, 'a message that is gone → NULL');
SELECT is(barnum.realtime_event('typing:97000000-0000-0000-0000-0000000000ff:start'), NULL, 'a contact that is gone → NULL');

SELECT is(jsonb_path_query_array(barnum.realtime_events(ARRAY[
              'typing:97000000-0000-0000-0000-0000000000c1:start',
              'message:97000000-0000-0000-0000-0000000000ff:97000000-0000-0000-0000-0000000000c1',
              'message:97000000-0000-0000-0000-0000000000a1:97000000-0000-0000-0000-0000000000c1',
              'garbage',
              'typing:97000000-0000-0000-0000-0000000000c1:stop']), '$[*].event'),
          '["typing:start", "message:new", "typing:stop"]'::jsonb,
          'realtime_events: a burst in one call, in the order given, the vanished and unknown left out');
SELECT is(barnum.realtime_events('{}'), '[]'::jsonb, 'realtime_events of nothing → []');

-- ============================================================ typing
SELECT lives_ok($$ SELECT barnum.notify_typing('97000000-0000-0000-0000-0000000000c1', true) $$, 'notify_typing(start)');
SELECT lives_ok($$ SELECT barnum.notify_typing(NULL, false) $$, 'notify_typing of no contact does nothing');

-- ============================================================ auth
SELECT is(barnum.realtime_auth(pg_temp.tok('reader')), (SELECT id FROM barnum.accounts WHERE name = 'default'),
          'realtime_auth: a conversations:read token → its account');
SELECT throws_ok(format('SELECT barnum.realtime_auth(%L)', pg_temp.tok('hooks')), 'BN403', NULL,
                 'a token without conversations:read → BN403');
SELECT throws_ok($$ SELECT barnum.realtime_auth('bnt_' || repeat('x', 43)) $$, 'BN401', NULL, 'an unknown token → BN401');
SELECT throws_ok($$ SELECT barnum.realtime_auth('nope') $$, 'BN401', NULL, 'a malformed token → BN401');
SELECT throws_ok($$ SELECT barnum.realtime_auth(NULL) $$, 'BN401', NULL, 'no token → BN401');
SELECT throws_ok(format('SELECT barnum.realtime_auth(%L)', pg_temp.tok('revoked')), 'BN401', NULL,
                 'a revoked token → BN401');

SELECT is(barnum.realtime_can_join(pg_temp.tok('reader'), '97000000-0000-0000-0000-0000000000c1'), true,
          'realtime_can_join: the account''s own contact');
SELECT is(barnum.realtime_can_join(pg_temp.tok('reader'), '97000000-0000-0000-0000-0000000000C1'), true,
          '… in any case of hex digits');
SELECT is(barnum.realtime_can_join(pg_temp.tok('reader'), '97000000-0000-0000-0000-0000000000c2'), false,
          'another account''s contact → false');
SELECT is(barnum.realtime_can_join(pg_temp.tok('acme'), '97000000-0000-0000-0000-0000000000c2'), true,
          '… which its own account may join');
SELECT is(barnum.realtime_can_join(pg_temp.tok('reader'), '97000000-0000-0000-0000-0000000000ff'), false,
          'a contact that exists nowhere → false, the same answer');
SELECT is(barnum.realtime_can_join(pg_temp.tok('reader'), 'x'' OR 1=1 --'), false, 'a malformed id → false');
SELECT is(barnum.realtime_can_join(pg_temp.tok('reader'), NULL), false, 'no id → false');
SELECT throws_ok(format('SELECT barnum.realtime_can_join(%L, %L)', pg_temp.tok('revoked'),
                        '97000000-0000-0000-0000-0000000000c1'), 'BN401', NULL,
                 'a revoked token cannot join anything (BN401)');

-- ============================================================ as barnum_shim
SET LOCAL ROLE barnum_shim;
SELECT is(jsonb_array_length(barnum.realtime_events(ARRAY['typing:97000000-0000-0000-0000-0000000000c1:start'])), 1,
          'barnum_shim can call realtime_events (and it reads through RLS-protected tables)');
SELECT is(barnum.realtime_can_join(pg_temp.tok('reader'), '97000000-0000-0000-0000-0000000000c1'), true,
          'barnum_shim can call realtime_can_join');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;

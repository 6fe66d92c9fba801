-- 95_inbound: ingest_whatsapp (SPEC-2 §B) with payloads shaped like Meta's
-- documented Cloud API webhook examples: routing, contacts, dedup on wamid,
-- statuses that never regress, events through the outbox, replies that act.
BEGIN;
SELECT plan(75);

SET LOCAL barnum.clock = '2030-05-01 09:00:00+00';

-- ------------------------------------------------------------ helpers
-- A notification as Meta sends it: one entry, one change of field "messages".
CREATE FUNCTION pg_temp.note(p_pnid text, p_value jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('object', 'whatsapp_business_account', 'entry', jsonb_build_array(
        jsonb_build_object('id', '102290129340398', 'changes', jsonb_build_array(jsonb_build_object(
            'field', 'messages',
            'value', jsonb_build_object('messaging_product', 'whatsapp',
                                        'metadata', jsonb_build_object('display_phone_number', '15550783881',
                                                                       'phone_number_id', p_pnid)) || p_value)))))
$$;
CREATE FUNCTION pg_temp.text_msg(p_wamid text, p_from text, p_body text, p_name text DEFAULT 'Sheena Nelson')
RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'contacts', jsonb_build_array(jsonb_build_object('profile', jsonb_build_object('name', p_name), 'wa_id', p_from)),
        'messages', jsonb_build_array(jsonb_build_object('from', p_from, 'id', p_wamid, 'timestamp', '1906354800',
                                                         'text', jsonb_build_object('body', p_body), 'type', 'text')))
$$;
CREATE FUNCTION pg_temp.status(p_wamid text, p_status text, p_ts text, p_extra jsonb DEFAULT '{}') RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('statuses', jsonb_build_array(jsonb_build_object(
        'id', p_wamid, 'status', p_status, 'timestamp', p_ts, 'recipient_id', '351911000001') || p_extra))
$$;
CREATE FUNCTION pg_temp.events(p_type text) RETURNS int LANGUAGE sql AS $$
    SELECT count(*)::int FROM barnum.whatsapp_events WHERE event_type = p_type $$;
CREATE FUNCTION pg_temp.msg(p_wamid text) RETURNS barnum.messages LANGUAGE sql AS $$
    SELECT * FROM barnum.messages WHERE wa_message_id = p_wamid $$;

-- ------------------------------------------------------------ fixtures
SELECT barnum.account_add('acme');
SELECT barnum.whatsapp_number_add('106540352242922', 'default', '+1 555-078-3881');
SELECT barnum.whatsapp_number_add('200000000000001', 'acme', '15550000002');
INSERT INTO barnum.webhook_endpoints (name, url, event_types, phone_number) VALUES
    ('all-messages', 'https://hooks.example/all', '{message.*}', NULL),
    ('this-number', 'https://hooks.example/this', '{message.*}', '15550783881'),
    ('other-number', 'https://hooks.example/other', '{message.*}', '15559999999'),
    ('n8n', 'https://n8n.example/in', '{appointment.*}', NULL);
INSERT INTO barnum.webhook_endpoints (name, url, event_types, account_id)
SELECT 'acme-hook', 'https://acme.example/h', '{*}', id FROM barnum.accounts WHERE name = 'acme';
INSERT INTO barnum.patients (id, name, phone) VALUES
    ('95000000-0000-0000-0000-000000000001', 'Sheena Nelson', '+351911000001'),
    ('95000000-0000-0000-0000-000000000002', 'Twin A', '+351922000002'),
    ('95000000-0000-0000-0000-000000000003', 'Twin B', '+351922000002');

-- ============================================================ bad input, routing
SELECT throws_ok($$ SELECT barnum.ingest_whatsapp('{"object": "page", "entry": []}') $$, 'BN400', NULL,
                 'a notification of another object is refused');
SELECT throws_ok($$ SELECT barnum.ingest_whatsapp('[1]') $$, 'BN400', NULL, 'not an object is refused');
SELECT is(barnum.ingest_whatsapp(pg_temp.note('999', pg_temp.text_msg('wamid.U1', '351911000001', 'hi'))) -> 'unrouted',
          '1', 'an unknown phone_number_id is kept as unrouted');
SELECT is((SELECT count(*)::int FROM barnum.unrouted_webhooks WHERE phone_number_id = '999'), 1, '… in unrouted_webhooks');
SELECT is((SELECT count(*)::int FROM barnum.messages), 0, '… and stores no message');
SELECT is(barnum.ingest_whatsapp('{"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "account_update", "value": {}}]}]}') -> 'messages',
          '0', 'other fields are ignored');
SELECT throws_ok($$ SELECT barnum.whatsapp_number_add('106540352242922', 'acme', NULL) $$, 'BN409', NULL,
                 'a number is routed to one account');
SELECT throws_ok($$ SELECT barnum.whatsapp_number_add('abc', 'acme', NULL) $$, 'BN422', NULL, 'phone_number_id is digits');

-- ============================================================ a text message
CREATE TEMP TABLE r1 AS SELECT barnum.ingest_whatsapp(pg_temp.note('106540352242922',
    pg_temp.text_msg('wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=', '351911000001', 'Olá, bom dia'))) AS r;
SELECT is((SELECT r -> 'messages' FROM r1), '1', 'one new message');
SELECT is((pg_temp.msg('wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=')).content, 'Olá, bom dia', 'its text is stored');
SELECT is((pg_temp.msg('wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=')).direction, 'inbound', 'as inbound');
SELECT is((pg_temp.msg('wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=')).sent_at,
          '2030-05-30 07:00:00+00'::timestamptz, 'with Meta''s timestamp');
SELECT is((SELECT name FROM barnum.contacts WHERE wa_id = '351911000001'), 'Sheena Nelson', 'the contact has the profile name');
SELECT is((SELECT patient_id FROM barnum.contacts WHERE wa_id = '351911000001'),
          '95000000-0000-0000-0000-000000000001'::uuid, 'and is linked to the patient with that phone');
SELECT is((SELECT account_id FROM barnum.contacts WHERE wa_id = '351911000001'),
          '00000000-0000-0000-0000-000000000001'::uuid, 'in the number''s account');
SELECT is(pg_temp.events('message.received'), 1, 'one message.received event');
SELECT is((SELECT data - 'metadata' FROM barnum.whatsapp_events WHERE event_type = 'message.received'),
          jsonb_build_object('account_id', '00000000-0000-0000-0000-000000000001', 'message_id',
                             'wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=',
                             'from', '351911000001', 'to', '15550783881', 'timestamp', '2030-05-30T07:00:00Z',
                             'type', 'text', 'content', 'Olá, bom dia'),
          'its payload is the seed''s (account_id, message_id, from, to, timestamp, type, content)');
SELECT is((SELECT array_agg(ep.name ORDER BY ep.name) FROM barnum.webhook_deliveries d
             JOIN barnum.webhook_endpoints ep ON ep.id = d.endpoint_id
             JOIN barnum.whatsapp_events e ON e.id = d.event_id WHERE e.event_type = 'message.received'),
          ARRAY['all-messages', 'this-number'], 'fan-out: the account''s endpoints for this number (or any number)');
-- The rendered payload is flat (the seed's shape) plus the envelope.
SELECT is((SELECT jsonb_object_keys_agg FROM (SELECT array_agg(k ORDER BY k) AS jsonb_object_keys_agg
             FROM barnum.whatsapp_events e, jsonb_object_keys(barnum.event_payload(e, NULL, NULL, NULL)) k
            WHERE e.event_type = 'message.received') x),
          ARRAY['account_id', 'content', 'created_at', 'entity_id', 'event_id', 'event_type', 'from', 'message_id',
                'metadata', 'timestamp', 'to', 'type', 'workflow_id'], 'the payload has the seed''s keys');

-- Redelivery: nothing new.
SELECT is(barnum.ingest_whatsapp(pg_temp.note('106540352242922',
    pg_temp.text_msg('wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=', '351911000001', 'Olá, bom dia'))) -> 'duplicates',
    '1', 'the same wamid again is a duplicate');
SELECT is(pg_temp.events('message.received'), 1, '… with no second event');
SELECT is((SELECT count(*)::int FROM barnum.contacts), 1, '… and no second contact');

-- Several entries and changes in one POST, an acme number among them.
SELECT is(barnum.ingest_whatsapp(jsonb_build_object('object', 'whatsapp_business_account', 'entry', jsonb_build_array(
    pg_temp.note('106540352242922', pg_temp.text_msg('wamid.M1', '351933000003', 'um', 'Rui')) -> 'entry' -> 0,
    pg_temp.note('200000000000001', pg_temp.text_msg('wamid.M2', '351933000003', 'dois', 'Rui')) -> 'entry' -> 0))) -> 'messages',
    '2', 'several entries in one POST');
SELECT is((SELECT count(DISTINCT account_id)::int FROM barnum.contacts WHERE wa_id = '351933000003'), 2,
          'one contact per account for the same WhatsApp user');
SELECT is((SELECT count(*)::int FROM barnum.webhook_deliveries d JOIN barnum.whatsapp_events e ON e.id = d.event_id
             JOIN barnum.webhook_endpoints ep ON ep.id = d.endpoint_id
            WHERE ep.name = 'acme-hook'), 1, 'acme''s message reaches only acme''s endpoint');

-- Media and locations keep what matters.
SELECT lives_ok($$ SELECT barnum.ingest_whatsapp(pg_temp.note('106540352242922', jsonb_build_object('messages', jsonb_build_array(
    jsonb_build_object('from', '351911000001', 'id', 'wamid.IMG', 'timestamp', '1906354801', 'type', 'image',
                       'image', jsonb_build_object('caption', 'o meu exame', 'mime_type', 'image/jpeg',
                                                   'sha256', 'abc', 'id', '1234567890')),
    jsonb_build_object('from', '351911000001', 'id', 'wamid.LOC', 'timestamp', '1906354802', 'type', 'location',
                       'location', jsonb_build_object('latitude', 38.72, 'longitude', -9.14, 'name', 'Clínica', 'address', 'Lisboa')),
    jsonb_build_object('from', '351911000001', 'id', 'wamid.DOC', 'timestamp', '1906354803', 'type', 'document',
                       'document', jsonb_build_object('filename', 'receita.pdf', 'mime_type', 'application/pdf', 'id', '555')))))) $$,
    'media, location and document messages are ingested');
SELECT is((pg_temp.msg('wamid.IMG')).content, 'o meu exame', 'an image''s caption is its content');
SELECT is((SELECT data #>> '{metadata,media_id}' FROM barnum.whatsapp_events
            WHERE event_type = 'message.received' AND data ->> 'message_id' = 'wamid.IMG'), '1234567890',
          'its media id is in the event metadata');
SELECT is((pg_temp.msg('wamid.LOC')).content, 'Clínica', 'a location''s name is its content');
SELECT is((SELECT data #>> '{metadata,filename}' FROM barnum.whatsapp_events
            WHERE data ->> 'message_id' = 'wamid.DOC'), 'receita.pdf', 'a document keeps its file name');

-- ============================================================ statuses
SELECT is(barnum.ingest_whatsapp(pg_temp.note('106540352242922', pg_temp.status('wamid.OUT1', 'sent', '1906354900'))) -> 'statuses',
          '1', 'a status of an unknown outbound message is applied');
SELECT is((pg_temp.msg('wamid.OUT1')).direction, 'outbound', '… to a placeholder outbound message');
SELECT is((pg_temp.msg('wamid.OUT1')).status, 'sent', '… now sent');
SELECT is(barnum.ingest_whatsapp(pg_temp.note('106540352242922', pg_temp.status('wamid.OUT1', 'read', '1906354960'))) -> 'statuses',
          '1', 'read moves it forward');
SELECT is(barnum.ingest_whatsapp(pg_temp.note('106540352242922', pg_temp.status('wamid.OUT1', 'delivered', '1906354930'))) -> 'stale_statuses',
          '1', 'delivered after read (out of order) is stale');
SELECT is((pg_temp.msg('wamid.OUT1')).status, 'read', 'the status never regresses');
SELECT is((pg_temp.msg('wamid.OUT1')).status_updated_at, to_timestamp(1906354960), 'and keeps read''s time');
SELECT is(pg_temp.events('message.status'), 2, 'one message.status event per forward move');
SELECT is((SELECT data ->> 'status' FROM barnum.whatsapp_events WHERE event_type = 'message.status'
            ORDER BY created_at DESC, data ->> 'status' DESC LIMIT 1), 'sent', 'the events carry the status');
SELECT is(barnum.ingest_whatsapp(pg_temp.note('106540352242922', pg_temp.status('wamid.OUT2', 'failed', '1906354900',
    '{"errors": [{"code": 131047, "title": "Re-engagement message"}]}'))) -> 'statuses', '1', 'failed is applied');
SELECT is(barnum.ingest_whatsapp(pg_temp.note('106540352242922', pg_temp.status('wamid.OUT2', 'sent', '1906354800'))) -> 'statuses',
          '0', 'a late sent after failed is not');
SELECT is((pg_temp.msg('wamid.OUT2')).status, 'failed', 'failed is final');
SELECT is((pg_temp.msg('wamid.OUT2')).error -> 0 ->> 'code', '131047', 'and keeps its error');
SELECT is(barnum.ingest_whatsapp(pg_temp.note('106540352242922', pg_temp.status('wamid.OUT1', 'read', '1906354960'))) -> 'statuses',
          '0', 'a repeated status changes nothing');

-- ============================================================ replies that act
-- An appointment awaiting confirmation (trg_pre_confirmation opens the workflow).
INSERT INTO barnum.appointments (id, patient_id, starts_at) VALUES
    ('95000000-0000-0000-0000-0000000000a1', '95000000-0000-0000-0000-000000000001', '2030-05-10 10:00+00');
CREATE TEMP TABLE tok AS SELECT barnum.generate_action_token('confirm', '95000000-0000-0000-0000-0000000000a1',
                                                             '95000000-0000-0000-0000-000000000001') AS t;
-- A quick-reply button carrying the action token.
SELECT is(barnum.ingest_whatsapp(pg_temp.note('106540352242922', jsonb_build_object('messages', jsonb_build_array(
    jsonb_build_object('from', '351911000001', 'id', 'wamid.BTN1', 'timestamp', '1906355000', 'type', 'button',
                       'context', jsonb_build_object('from', '15550783881', 'id', 'wamid.OUT1'),
                       'button', jsonb_build_object('text', 'Confirmar', 'payload', 'barnum:confirm:' || (SELECT t FROM tok))))))) -> 'acted',
    '1', 'a button with barnum:confirm:<token> acts');
SELECT is((SELECT status::text FROM barnum.appointments WHERE id = '95000000-0000-0000-0000-0000000000a1'), 'confirmed',
          '… the appointment is confirmed');
SELECT isnt((SELECT used_at FROM barnum.whatsapp_action_tokens WHERE token_hash = barnum.token_hash((SELECT t FROM tok))), NULL,
            '… and the token is used (single use, the action link''s path)');
SELECT is((pg_temp.msg('wamid.BTN1')).outcome ->> 'action', 'confirm', 'the message records what it did');
SELECT is(barnum.ingest_whatsapp(pg_temp.note('106540352242922', jsonb_build_object('messages', jsonb_build_array(
    jsonb_build_object('from', '351911000001', 'id', 'wamid.BTN2', 'timestamp', '1906355001', 'type', 'interactive',
                       'interactive', jsonb_build_object('type', 'button_reply', 'button_reply', jsonb_build_object(
                           'id', 'barnum:confirm:' || (SELECT t FROM tok), 'title', 'Confirmar'))))))) -> 'needs_attention',
    '1', 'the same token in another message cannot act twice: staff are told');
SELECT ok((pg_temp.msg('wamid.BTN2')).outcome ->> 'needs_attention' LIKE '%already used%', '… saying why');

-- Text replies answer the latest open confirmation request.
INSERT INTO barnum.appointments (id, patient_id, starts_at) VALUES
    ('95000000-0000-0000-0000-0000000000a2', '95000000-0000-0000-0000-000000000001', '2030-05-12 10:00+00');
SELECT is(barnum.ingest_whatsapp(pg_temp.note('106540352242922', pg_temp.text_msg('wamid.T1', '351911000001', 'talvez amanhã'))) -> 'needs_attention',
          '1', 'an unclear text to an open request needs attention');
SELECT is((SELECT data ->> 'reason' FROM barnum.whatsapp_events WHERE event_type = 'message.needs_attention'
            AND data ->> 'message_id' = 'wamid.T1'), 'the reply is not a clear yes or no to the open confirmation request',
          '… a message.needs_attention event says why');
SELECT is((SELECT status::text FROM barnum.appointments WHERE id = '95000000-0000-0000-0000-0000000000a2'), 'scheduled',
          '… and nothing is guessed');
SELECT is(barnum.ingest_whatsapp(pg_temp.note('106540352242922', pg_temp.text_msg('wamid.T2', '351911000001', '  NÃO!! '))) -> 'acted',
          '1', '"  NÃO!! " answers it');
SELECT is((SELECT status::text FROM barnum.appointments WHERE id = '95000000-0000-0000-0000-0000000000a2'), 'cancelled',
          '… cancelling the appointment');
SELECT is((SELECT response FROM barnum.whatsapp_workflows
            WHERE appointment_id = '95000000-0000-0000-0000-0000000000a2' AND workflow_type = 'pre_confirmation'), 'cancel',
          '… and answering its workflow');
SELECT is(barnum.ingest_whatsapp(pg_temp.note('106540352242922', pg_temp.text_msg('wamid.T3', '351911000001', 'sim'))) -> 'acted',
          '0', 'with nothing open, a text is an ordinary message');
-- Two patients share a phone, each with an open request: never guess whose.
INSERT INTO barnum.appointments (patient_id, starts_at) VALUES
    ('95000000-0000-0000-0000-000000000002', '2030-05-20 10:00+00'),
    ('95000000-0000-0000-0000-000000000003', '2030-05-21 10:00+00');
SELECT is(barnum.ingest_whatsapp(pg_temp.note('106540352242922', pg_temp.text_msg('wamid.T4', '351922000002', 'Sim'))) -> 'needs_attention',
          '1', 'a yes with two appointments awaiting needs attention');
SELECT is((SELECT count(*)::int FROM barnum.appointments WHERE patient_id IN
            ('95000000-0000-0000-0000-000000000002', '95000000-0000-0000-0000-000000000003') AND status = 'confirmed'), 0,
          '… and confirms neither');
SELECT is((SELECT patient_id FROM barnum.contacts WHERE wa_id = '351922000002'), NULL,
          'a contact whose phone two patients share is linked to neither');

-- ============================================================ reply words
SELECT is(barnum.reply_intent(w, 'pt'), want, format('reply_intent(%L) = %s', w, coalesce(want, 'NULL')))
  FROM (VALUES ('SIM', 'confirm'), ('sim!', 'confirm'), ('Sím', 'confirm'), ('1', 'confirm'), ('yes', 'confirm'),
               ('Não', 'cancel'), ('nao', 'cancel'), ('2', 'cancel'), ('no', 'cancel'), ('NÃO POSSO', 'cancel'),
               ('sim e não', NULL), ('12', NULL), ('', NULL)) AS v(w, want);

-- ============================================================ roles
SELECT ok(has_function_privilege('barnum_shim', 'barnum.ingest_whatsapp(jsonb)', 'EXECUTE'),
          'the shim may call ingest_whatsapp');
SELECT ok(NOT has_function_privilege('barnum_shim', 'barnum.whatsapp_number_add(text, text, text)', 'EXECUTE'),
          'the shim may not route numbers');

SELECT * FROM finish();
ROLLBACK;

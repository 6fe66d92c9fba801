-- 98_native: the native sender's rendering and Graph API error rules (SPEC-2 §E).
BEGIN;
SELECT plan(10);

SELECT is(barnum.wa_text('appointment.pre_confirmed',
            '{"date": "2030-01-02", "time": "10:00", "patient": {"name": "Ana Costa"},
              "professional": {"name": "Dr. Rui"}, "specialty": {"name": "Dentária"}}', NULL, 'pt'),
          'Olá Ana! Tem uma consulta de Dentária a 2030-01-02 às 10:00 com Dr. Rui. Confirma?',
          'a request names specialty and professional');
SELECT is(barnum.wa_text('appointment.pre_confirmed',
            '{"date": "2030-01-02", "time": "10:00", "patient": {"name": "Ana"}, "professional": {"name": null},
              "specialty": {"name": null}}', NULL, 'pt'),
          'Olá Ana! Tem uma consulta a 2030-01-02 às 10:00. Confirma?', 'unknown parts are left out, not blank');
SELECT is(barnum.wa_text('appointment.reminder', '{"date": "2030-01-02", "time": "10:00", "patient": {"name": "Ana"}}',
                         NULL, 'en'),
          'Reminder, Ana: your appointment is on 2030-01-02 at 10:00. Will you come?', 'English');
SELECT is(barnum.wa_cloud_payload(jsonb_populate_record(NULL::barnum.whatsapp_events,
                                      '{"event_type": "endpoint.disabled", "entity_type": "endpoint", "data": {}}'),
                                  NULL, NULL, NULL, '{}', 'pt'), NULL, 'an event that is no message renders nothing');
SELECT ok(barnum.graph_retryable(130429), 'throttling (130429) is retried');
SELECT ok(NOT barnum.graph_retryable(131047), 'the re-engagement window (131047) is final');
SELECT is(barnum.graph_code('{"error": {"code": 190, "message": "x"}}'), 190, 'graph_code reads error.code');
SELECT is(barnum.graph_code('not json'), NULL, 'graph_code of a non-JSON answer is NULL');
SELECT matches(barnum.graph_error_text('{"error": {"code": 131047, "message": "Re-engagement message"}}'),
               'send a template', 'the 131047 error says what to do');
SELECT throws_ok($$ SELECT barnum.endpoint_add_whatsapp('wa', '123', 'WHATSAPP_TOKEN', 'https://graph.example/v21.0',
                                                        'default', '{appointment.*}', '{"nope.x": {"name": "a"}}') $$,
                 'BN422', NULL, 'a template for an unknown event type is refused');
SELECT * FROM finish();
ROLLBACK;

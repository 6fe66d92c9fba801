-- 30_tokens: one-time action tokens (seed API) and the shim's action-link
-- functions peek_action / perform_action (SPEC §2.6, §4.1).
BEGIN;
SELECT plan(67);

SET LOCAL barnum.clock = '2030-01-10 10:00:00+00';

INSERT INTO barnum.patients (id, name, phone) VALUES
    ('30000000-0000-0000-0000-000000000001', 'Token Patient', '+351930000001'),
    ('30000000-0000-0000-0000-000000000002', 'Other Patient', '+351930000002');
-- A receiver exists, so outbox events stay queued as in production.
INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('receiver', 'https://hooks.example/receiver');
INSERT INTO barnum.appointments (id, patient_id, starts_at, status) VALUES
    ('30000000-0000-0000-0000-0000000000a1', '30000000-0000-0000-0000-000000000001', '2030-01-20 09:00+00', 'scheduled'),
    ('30000000-0000-0000-0000-0000000000a2', '30000000-0000-0000-0000-000000000001', '2030-01-21 09:00+00', 'scheduled'),
    ('30000000-0000-0000-0000-0000000000a3', '30000000-0000-0000-0000-000000000001', '2030-01-22 09:00+00', 'scheduled'),
    ('30000000-0000-0000-0000-0000000000a4', '30000000-0000-0000-0000-000000000001', '2030-01-23 09:00+00', 'cancelled'),
    ('30000000-0000-0000-0000-0000000000a5', '30000000-0000-0000-0000-000000000001', '2030-01-24 09:00+00', 'scheduled'),
    ('30000000-0000-0000-0000-0000000000a6', '30000000-0000-0000-0000-000000000001', '2030-01-12 09:00+00', 'scheduled');

-- Plain tokens are kept here, in the test session only, to call the API with.
CREATE TEMP TABLE toks (name text PRIMARY KEY, tok text) ON COMMIT DROP;
CREATE FUNCTION pg_temp.tok(p_name text) RETURNS text LANGUAGE sql AS
    $$ SELECT tok FROM toks WHERE name = p_name $$;
CREATE FUNCTION pg_temp.used(p_name text) RETURNS timestamptz LANGUAGE sql AS
    $$ SELECT used_at FROM barnum.whatsapp_action_tokens WHERE token_hash = sha256(convert_to(pg_temp.tok(p_name), 'UTF8')) $$;
-- A fingerprint of everything an action could change.
CREATE FUNCTION pg_temp.state() RETURNS text LANGUAGE sql AS $$
    SELECT md5(concat_ws('|',
        (SELECT string_agg(id || status::text || starts_at || coalesce(cancel_reason, ''), ',' ORDER BY id) FROM barnum.appointments),
        (SELECT string_agg(id || status || coalesce(response, ''), ',' ORDER BY id) FROM barnum.whatsapp_workflows),
        (SELECT string_agg(id || coalesce(used_at::text, '-'), ',' ORDER BY id) FROM barnum.whatsapp_action_tokens),
        (SELECT count(*) FROM barnum.whatsapp_events),
        (SELECT count(*) FROM barnum.reschedule_requests)))
$$;

INSERT INTO toks VALUES
    ('gen',        barnum.generate_action_token('confirm', '30000000-0000-0000-0000-0000000000a5', '30000000-0000-0000-0000-000000000001')),
    ('gen2',       barnum.generate_action_token('confirm', '30000000-0000-0000-0000-0000000000a5', '30000000-0000-0000-0000-000000000001')),
    ('short',      barnum.generate_action_token('cancel', '30000000-0000-0000-0000-0000000000a5', '30000000-0000-0000-0000-000000000001',
                                                NULL, '{"src": "test"}', 3)),
    ('mark',       barnum.generate_action_token('confirm', '30000000-0000-0000-0000-0000000000a5', '30000000-0000-0000-0000-000000000001')),
    ('confirm',    barnum.generate_action_token('confirm', '30000000-0000-0000-0000-0000000000a1', '30000000-0000-0000-0000-000000000001')),
    ('cancel',     barnum.generate_action_token('cancel', '30000000-0000-0000-0000-0000000000a2', '30000000-0000-0000-0000-000000000001')),
    ('reschedule', barnum.generate_action_token('reschedule', '30000000-0000-0000-0000-0000000000a3', '30000000-0000-0000-0000-000000000001')),
    ('on_cancelled', barnum.generate_action_token('confirm', '30000000-0000-0000-0000-0000000000a4', '30000000-0000-0000-0000-000000000001')),
    ('wrong_type', barnum.generate_action_token('confirm', '30000000-0000-0000-0000-0000000000a5', '30000000-0000-0000-0000-000000000001')),
    ('soon',       barnum.generate_action_token('confirm', '30000000-0000-0000-0000-0000000000a6', '30000000-0000-0000-0000-000000000001')),
    ('expiring',   barnum.generate_action_token('confirm', '30000000-0000-0000-0000-0000000000a5', '30000000-0000-0000-0000-000000000001',
                                                NULL, NULL, 1));

-- ============================================================ generate_action_token
SELECT matches(pg_temp.tok('gen'), '^[A-Za-z0-9_-]{43}$',
               'a token is 43 characters of base64url without padding (32 random bytes)');
SELECT isnt(pg_temp.tok('gen'), pg_temp.tok('gen2'), 'two tokens for the same action differ');
SELECT ok(EXISTS (SELECT 1 FROM barnum.whatsapp_action_tokens
                   WHERE token_hash = sha256(convert_to(pg_temp.tok('gen'), 'UTF8'))),
          'the token is stored as its SHA-256 in token_hash');
SELECT is_empty(
    $$SELECT 1 FROM barnum.whatsapp_action_tokens t, toks
       WHERE t::text LIKE '%' || toks.tok || '%' OR encode(t.token_hash, 'escape') LIKE '%' || toks.tok || '%'$$,
    'no plain token appears in any column of whatsapp_action_tokens');
SELECT is_empty(
    $$SELECT 1 FROM barnum.whatsapp_events e, toks WHERE e::text LIKE '%' || toks.tok || '%'$$,
    'no plain token appears in the outbox');
SELECT results_eq(
    $$SELECT action_type, appointment_id, patient_id, expires_at, used_at FROM barnum.whatsapp_action_tokens
       WHERE token_hash = sha256(convert_to(pg_temp.tok('gen'), 'UTF8'))$$,
    $$VALUES ('confirm', '30000000-0000-0000-0000-0000000000a5'::uuid, '30000000-0000-0000-0000-000000000001'::uuid,
              '2030-01-17 10:00+00'::timestamptz, NULL::timestamptz)$$,
    'the stored token has its action, appointment, patient, expiry clock + 7 days, unused');
SELECT results_eq(
    $$SELECT expires_at, metadata FROM barnum.whatsapp_action_tokens
       WHERE token_hash = sha256(convert_to(pg_temp.tok('short'), 'UTF8'))$$,
    $$VALUES ('2030-01-13 10:00+00'::timestamptz, '{"src": "test"}'::jsonb)$$,
    'p_expires_in_days and p_metadata are honoured');

SELECT pg_temp.state() AS state_before \gset
SELECT throws_ok($$SELECT barnum.generate_action_token(NULL, '30000000-0000-0000-0000-0000000000a5', '30000000-0000-0000-0000-000000000001')$$,
                 'BN400', NULL, 'generate_action_token without action type raises BN400');
SELECT throws_ok($$SELECT barnum.generate_action_token('delete', '30000000-0000-0000-0000-0000000000a5', '30000000-0000-0000-0000-000000000001')$$,
                 'BN400', NULL, 'generate_action_token with an unknown action type raises BN400');
SELECT throws_ok($$SELECT barnum.generate_action_token('confirm', NULL, '30000000-0000-0000-0000-000000000001')$$,
                 'BN400', NULL, 'generate_action_token without appointment raises BN400');
SELECT throws_ok($$SELECT barnum.generate_action_token('confirm', '30000000-0000-0000-0000-00000000dead', '30000000-0000-0000-0000-000000000001')$$,
                 'BN404', NULL, 'generate_action_token for an unknown appointment raises BN404');
SELECT throws_ok($$SELECT barnum.generate_action_token('confirm', '30000000-0000-0000-0000-0000000000a5', '30000000-0000-0000-0000-000000000002')$$,
                 'BN422', NULL, 'generate_action_token for another patient''s appointment raises BN422');
SELECT throws_ok($$SELECT barnum.generate_action_token('confirm', '30000000-0000-0000-0000-0000000000a5', '30000000-0000-0000-0000-000000000001', NULL, NULL, 0)$$,
                 'BN422', NULL, 'generate_action_token with 0 days of validity raises BN422');
SELECT throws_ok($$SELECT barnum.generate_action_token('confirm', '30000000-0000-0000-0000-0000000000a5', '30000000-0000-0000-0000-000000000001', '30000000-0000-0000-0000-00000000dead')$$,
                 'BN404', NULL, 'generate_action_token with an unknown workflow raises BN404');
SELECT is(pg_temp.state(), :'state_before', 'failed generate_action_token calls stored nothing');

-- ============================================================ validate_action_token
SELECT results_eq(
    format('SELECT valid, appointment_id, patient_id, action_type, metadata, error_message FROM barnum.validate_action_token(%L)',
           pg_temp.tok('short')),
    $$VALUES (true, '30000000-0000-0000-0000-0000000000a5'::uuid, '30000000-0000-0000-0000-000000000001'::uuid,
              'cancel', '{"src": "test"}'::jsonb, NULL::text)$$,
    'validate_action_token: a fresh token is valid and names its appointment, patient, action and metadata');
SELECT is(pg_temp.used('short'), NULL, 'validate_action_token is read-only: used_at stays null');
SELECT results_eq(
    $$SELECT valid, appointment_id, error_message FROM barnum.validate_action_token('no-such-token-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa')$$,
    $$VALUES (false, NULL::uuid, 'Token not found')$$,
    'validate_action_token: an unknown token is invalid, ''Token not found''');
SELECT results_eq(
    $$SELECT valid, error_message FROM barnum.validate_action_token(NULL)$$,
    $$VALUES (false, 'Token not found')$$,
    'validate_action_token: NULL is invalid, not an error');

-- ============================================================ mark_token_used
SELECT lives_ok(format('SELECT barnum.mark_token_used(%L)', pg_temp.tok('mark')), 'mark_token_used marks a fresh token');
SELECT is(pg_temp.used('mark'), '2030-01-10 10:00+00'::timestamptz, 'mark_token_used sets used_at to the clock');
SELECT results_eq(
    format('SELECT valid, error_message FROM barnum.validate_action_token(%L)', pg_temp.tok('mark')),
    $$VALUES (false, 'Token already used')$$,
    'validate_action_token: a used token is invalid, ''Token already used''');
SELECT throws_ok(format('SELECT barnum.mark_token_used(%L)', pg_temp.tok('mark')),
                 'BN410', NULL, 'mark_token_used on a used token raises BN410');
SELECT throws_ok($$SELECT barnum.mark_token_used('no-such-token-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa')$$,
                 'BN404', NULL, 'mark_token_used on an unknown token raises BN404');
SELECT throws_ok($$SELECT barnum.mark_token_used('')$$, 'BN400', NULL, 'mark_token_used with an empty token raises BN400');

-- ============================================================ peek_action
SELECT is((barnum.peek_action(pg_temp.tok('confirm')) ->> 'action_type'), 'confirm', 'peek_action returns the action type');
SELECT is((barnum.peek_action(pg_temp.tok('confirm')) #>> '{appointment,id}'), '30000000-0000-0000-0000-0000000000a1',
          'peek_action returns the appointment');
SELECT is((barnum.peek_action(pg_temp.tok('confirm')) -> 'appointment') ->> 'date', '2030-01-20',
          'peek_action shows the date in the clinic time zone');
SELECT is((barnum.peek_action(pg_temp.tok('confirm')) -> 'appointment') ->> 'time', '09:00',
          'peek_action shows the time in the clinic time zone');
SELECT is((barnum.peek_action(pg_temp.tok('confirm')) ->> 'locale'), 'pt', 'peek_action returns the clinic locale');
SELECT is(pg_temp.used('confirm'), NULL, 'peek_action is read-only: the token stays unused');
SELECT is((SELECT status::text FROM barnum.appointments WHERE id = '30000000-0000-0000-0000-0000000000a1'), 'scheduled',
          'peek_action is read-only: the appointment is unchanged');
SELECT throws_ok($$SELECT barnum.peek_action('no-such-token-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa')$$,
                 'BN404', NULL, 'peek_action on an unknown token raises BN404');
SELECT throws_ok($$SELECT barnum.peek_action('x')$$, 'BN404', NULL, 'peek_action on a malformed token raises BN404');
SELECT throws_ok(format('SELECT barnum.peek_action(%L)', pg_temp.tok('mark')),
                 'BN410', NULL, 'peek_action on a used token raises BN410');
SELECT throws_ok(format('SELECT barnum.peek_action(%L)', pg_temp.tok('on_cancelled')),
                 'BN409', NULL, 'peek_action of a confirm link for a cancelled appointment raises BN409');

-- ============================================================ perform_action: confirm
SELECT results_eq(
    format($q$SELECT r ->> 'action', r ->> 'status' FROM barnum.perform_action(%L, 'confirm') r$q$, pg_temp.tok('confirm')),
    $$VALUES ('confirm', 'confirmed')$$,
    'perform_action confirm returns action confirm and status confirmed');
SELECT is((SELECT status::text FROM barnum.appointments WHERE id = '30000000-0000-0000-0000-0000000000a1'), 'confirmed',
          'confirm: the appointment is confirmed');
SELECT results_eq(
    $$SELECT status, response, responded_at FROM barnum.whatsapp_workflows
       WHERE appointment_id = '30000000-0000-0000-0000-0000000000a1' AND workflow_type = 'pre_confirmation'$$,
    $$VALUES ('completed', 'confirm', '2030-01-10 10:00+00'::timestamptz)$$,
    'confirm: the pre_confirmation workflow is completed with the answer');
SELECT is(pg_temp.used('confirm'), '2030-01-10 10:00+00'::timestamptz, 'confirm: the token is marked used');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_events
            WHERE entity_id = '30000000-0000-0000-0000-0000000000a1' AND event_type = 'appointment.confirmed'), 1,
          'confirm: the follow-up event appointment.confirmed is emitted');
SELECT pg_temp.state() AS state_before \gset
SELECT throws_ok(format($q$SELECT barnum.perform_action(%L, 'confirm')$q$, pg_temp.tok('confirm')),
                 'BN410', 'this link was already used', 'a second use of the same token raises BN410');
SELECT is(pg_temp.state(), :'state_before', 'the second use changed nothing');

-- ============================================================ perform_action: cancel
SELECT results_eq(
    format($q$SELECT r ->> 'action', r ->> 'status' FROM barnum.perform_action(%L, 'cancel') r$q$, pg_temp.tok('cancel')),
    $$VALUES ('cancel', 'cancelled')$$,
    'perform_action cancel returns status cancelled');
SELECT results_eq(
    $$SELECT status::text, cancel_reason IS NOT NULL FROM barnum.appointments WHERE id = '30000000-0000-0000-0000-0000000000a2'$$,
    $$VALUES ('cancelled', true)$$,
    'cancel: the appointment is cancelled with a reason');
SELECT results_eq(
    $$SELECT status, response FROM barnum.whatsapp_workflows
       WHERE appointment_id = '30000000-0000-0000-0000-0000000000a2' AND workflow_type = 'pre_confirmation'$$,
    $$VALUES ('completed', 'cancel')$$,
    'cancel: the pre_confirmation workflow is completed with the answer');
SELECT isnt(pg_temp.used('cancel'), NULL, 'cancel: the token is marked used');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_events
            WHERE entity_id = '30000000-0000-0000-0000-0000000000a2' AND event_type = 'appointment.cancelled'), 1,
          'cancel: appointment.cancelled is emitted');

-- ============================================================ perform_action: reschedule
SELECT results_eq(
    format($q$SELECT r ->> 'action', r ->> 'status' FROM barnum.perform_action(%L, 'reschedule') r$q$, pg_temp.tok('reschedule')),
    $$VALUES ('reschedule', 'scheduled')$$,
    'perform_action reschedule returns action reschedule; the appointment keeps its status');
SELECT results_eq(
    $$SELECT patient_id, source, status FROM barnum.reschedule_requests
       WHERE appointment_id = '30000000-0000-0000-0000-0000000000a3'$$,
    $$VALUES ('30000000-0000-0000-0000-000000000001'::uuid, 'action_link', 'open')$$,
    'reschedule: an open reschedule_requests row is recorded');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_events
            WHERE entity_id = '30000000-0000-0000-0000-0000000000a3' AND event_type = 'appointment.reschedule_requested'), 1,
          'reschedule: appointment.reschedule_requested is emitted');
SELECT results_eq(
    $$SELECT status, response FROM barnum.whatsapp_workflows
       WHERE appointment_id = '30000000-0000-0000-0000-0000000000a3' AND workflow_type = 'pre_confirmation'$$,
    $$VALUES ('completed', 'reschedule')$$,
    'reschedule: the pre_confirmation workflow is completed with the answer');
SELECT isnt(pg_temp.used('reschedule'), NULL, 'reschedule: the token is marked used');

-- ============================================================ perform_action: errors change nothing
SELECT pg_temp.state() AS state_before \gset
SELECT throws_ok(format($q$SELECT barnum.perform_action(%L, 'cancel')$q$, pg_temp.tok('wrong_type')),
                 'BN400', NULL, 'a confirm token used to cancel raises BN400');
SELECT throws_ok(format($q$SELECT barnum.perform_action(%L, 'delete')$q$, pg_temp.tok('wrong_type')),
                 'BN400', NULL, 'an unknown action type raises BN400');
SELECT throws_ok($$SELECT barnum.perform_action('no-such-token-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 'confirm')$$,
                 'BN404', 'this link is not valid', 'an unknown token raises BN404');
SELECT throws_ok(format($q$SELECT barnum.perform_action(%L, 'confirm')$q$, pg_temp.tok('on_cancelled')),
                 'BN409', NULL, 'confirming a cancelled appointment raises BN409');
SELECT is(pg_temp.state(), :'state_before', 'wrong type / unknown / illegal-state calls changed nothing');
SELECT is(pg_temp.used('wrong_type'), NULL, 'a token refused for the wrong type stays usable');
SELECT is(pg_temp.used('on_cancelled'), NULL, 'a token refused for an illegal state stays unused');
SELECT is((SELECT status::text FROM barnum.appointments WHERE id = '30000000-0000-0000-0000-0000000000a4'), 'cancelled',
          'the cancelled appointment stays cancelled');

-- ============================================================ expiry (move the clock)
SET LOCAL barnum.clock = '2030-01-11 10:00:01+00';
SELECT results_eq(
    format('SELECT valid, error_message FROM barnum.validate_action_token(%L)', pg_temp.tok('expiring')),
    $$VALUES (false, 'Token expired')$$,
    'validate_action_token: a token past expires_at is invalid, ''Token expired''');
SELECT throws_ok(format('SELECT barnum.peek_action(%L)', pg_temp.tok('expiring')),
                 'BN410', 'this link has expired', 'peek_action on an expired token raises BN410');
SELECT pg_temp.state() AS state_before \gset
SELECT throws_ok(format($q$SELECT barnum.perform_action(%L, 'confirm')$q$, pg_temp.tok('expiring')),
                 'BN410', 'this link has expired', 'perform_action on an expired token raises BN410');
SELECT is(pg_temp.state(), :'state_before', 'the expired use changed nothing');
SELECT is((SELECT status::text FROM barnum.appointments WHERE id = '30000000-0000-0000-0000-0000000000a5'), 'scheduled',
          'the appointment of the expired token is unchanged');

-- A still-valid link for an appointment whose time has passed cannot confirm it.
SET LOCAL barnum.clock = '2030-01-12 09:30+00';
SELECT throws_ok(format($q$SELECT barnum.perform_action(%L, 'confirm')$q$, pg_temp.tok('soon')),
                 'BN409', NULL, 'confirming after the appointment time raises BN409');

SELECT * FROM finish();
ROLLBACK;

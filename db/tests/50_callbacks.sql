-- 50_callbacks: handle_callback, n8n's six actions, validation and
-- idempotency (SPEC §2.6, §4.2).
BEGIN;
SELECT plan(62);

SET LOCAL barnum.clock = '2030-01-10 10:00:00+00';

INSERT INTO barnum.patients (id, name, phone) VALUES
    ('50000000-0000-0000-0000-000000000001', 'Callback Patient', '+351950000001'),
    ('50000000-0000-0000-0000-000000000002', 'Reactivated Patient', '+351950000002'),
    ('50000000-0000-0000-0000-000000000003', 'Campaign Patient', '+351950000003');
-- A receiver exists, so outbox events stay queued as in production.
INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('receiver', 'https://hooks.example/receiver');
INSERT INTO barnum.appointments (id, patient_id, starts_at) VALUES
    ('50000000-0000-0000-0000-0000000000c1', '50000000-0000-0000-0000-000000000001', '2030-01-20 09:00+00'),
    ('50000000-0000-0000-0000-0000000000c2', '50000000-0000-0000-0000-000000000001', '2030-01-21 09:00+00'),
    ('50000000-0000-0000-0000-0000000000c3', '50000000-0000-0000-0000-000000000001', '2030-01-22 09:00+00'),
    ('50000000-0000-0000-0000-0000000000c4', '50000000-0000-0000-0000-000000000001', '2030-01-09 09:00+00'),
    ('50000000-0000-0000-0000-0000000000c5', '50000000-0000-0000-0000-000000000001', '2030-01-09 11:00+00'),
    ('50000000-0000-0000-0000-0000000000c6', '50000000-0000-0000-0000-000000000001', '2030-01-23 09:00+00'),
    ('50000000-0000-0000-0000-0000000000c7', '50000000-0000-0000-0000-000000000001', '2030-01-24 09:00+00'),
    ('50000000-0000-0000-0000-0000000000c8', '50000000-0000-0000-0000-000000000001', '2030-01-25 09:00+00');
UPDATE barnum.appointments SET status = 'no_show'   WHERE id = '50000000-0000-0000-0000-0000000000c4';
UPDATE barnum.appointments SET status = 'completed' WHERE id = '50000000-0000-0000-0000-0000000000c5';
UPDATE barnum.appointments SET status = 'cancelled' WHERE id = '50000000-0000-0000-0000-0000000000c6';
INSERT INTO barnum.whatsapp_workflows (id, workflow_type, patient_id, status) VALUES
    ('50000000-0000-0000-0000-0000000000f2', 'reactivation', '50000000-0000-0000-0000-000000000002', 'sent');

-- A fingerprint of everything a callback could change.
CREATE FUNCTION pg_temp.state() RETURNS text LANGUAGE sql AS $$
    SELECT md5(concat_ws('|',
        (SELECT string_agg(id || status::text || starts_at || coalesce(cancel_reason, ''), ',' ORDER BY id) FROM barnum.appointments),
        (SELECT string_agg(id || status || coalesce(response, '') || metadata::text, ',' ORDER BY id) FROM barnum.whatsapp_workflows),
        (SELECT count(*) FROM barnum.whatsapp_events),
        (SELECT count(*) FROM barnum.reschedule_requests),
        (SELECT count(*) FROM barnum.inbound_callbacks)))
$$;

-- ============================================================ confirm
SELECT results_eq(
    $$SELECT r -> 'success', r ? 'message', r #>> '{data,appointment,status}'
        FROM barnum.handle_callback('confirm', '{"appointmentId": "50000000-0000-0000-0000-0000000000c1", "patientResponse": "Sim"}') r$$,
    $$VALUES ('true'::jsonb, true, 'confirmed')$$,
    'confirm: {"success": true, "message": …, "data": {appointment: confirmed}}');
SELECT is((SELECT status::text FROM barnum.appointments WHERE id = '50000000-0000-0000-0000-0000000000c1'), 'confirmed',
          'confirm: the appointment is confirmed');
SELECT results_eq(
    $$SELECT status, response, responded_at FROM barnum.whatsapp_workflows
       WHERE appointment_id = '50000000-0000-0000-0000-0000000000c1' AND workflow_type = 'pre_confirmation'$$,
    $$VALUES ('completed', 'Sim', '2030-01-10 10:00+00'::timestamptz)$$,
    'confirm: the pre_confirmation workflow is completed with the patient''s response');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_events
            WHERE entity_id = '50000000-0000-0000-0000-0000000000c1' AND event_type = 'appointment.confirmed'), 1,
          'confirm: appointment.confirmed is emitted');
SELECT is((barnum.handle_callback('confirm', '{"appointmentId": "50000000-0000-0000-0000-0000000000c1"}') -> 'success'),
          'true'::jsonb, 'confirming an already confirmed appointment succeeds');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_events
            WHERE entity_id = '50000000-0000-0000-0000-0000000000c1' AND event_type = 'appointment.confirmed'), 1,
          'a repeated confirm emits no second appointment.confirmed');

-- ============================================================ cancel
SELECT is((barnum.handle_callback('cancel', '{"appointmentId": "50000000-0000-0000-0000-0000000000c2", "reason": "Tenho febre"}')
           -> 'success'), 'true'::jsonb, 'cancel succeeds');
SELECT results_eq(
    $$SELECT status::text, cancel_reason FROM barnum.appointments WHERE id = '50000000-0000-0000-0000-0000000000c2'$$,
    $$VALUES ('cancelled', 'Tenho febre')$$,
    'cancel: the appointment is cancelled and the reason kept');
SELECT results_eq(
    $$SELECT status, response FROM barnum.whatsapp_workflows
       WHERE appointment_id = '50000000-0000-0000-0000-0000000000c2' AND workflow_type = 'pre_confirmation'$$,
    $$VALUES ('completed', 'cancelled')$$,
    'cancel: the pre_confirmation workflow records the answer');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_events
            WHERE entity_id = '50000000-0000-0000-0000-0000000000c2' AND event_type = 'appointment.cancelled'), 1,
          'cancel: appointment.cancelled is emitted');

-- ============================================================ reschedule (clinic time zone)
SELECT is((barnum.handle_callback('reschedule',
              '{"appointmentId": "50000000-0000-0000-0000-0000000000c3", "newDate": "2030-07-15", "newTime": "14:30"}')
           #>> '{data,appointment,time}'), '14:30', 'reschedule succeeds and echoes the local time');
SELECT results_eq(
    $$SELECT status::text, starts_at FROM barnum.appointments WHERE id = '50000000-0000-0000-0000-0000000000c3'$$,
    $$VALUES ('scheduled', '2030-07-15 13:30+00'::timestamptz)$$,
    'reschedule: 14:30 in Europe/Lisbon summer time is 13:30 UTC');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_events
            WHERE entity_id = '50000000-0000-0000-0000-0000000000c3' AND event_type = 'appointment.rescheduled'), 1,
          'reschedule: appointment.rescheduled is emitted');

UPDATE barnum.settings SET value = '"America/New_York"' WHERE key = 'timezone';
SELECT lives_ok($$SELECT barnum.handle_callback('reschedule',
                  '{"appointmentId": "50000000-0000-0000-0000-0000000000c7", "newDate": "2030-01-28", "newTime": "09:15"}')$$,
                'reschedule with another clinic time zone');
SELECT is((SELECT starts_at FROM barnum.appointments WHERE id = '50000000-0000-0000-0000-0000000000c7'),
          '2030-01-28 14:15+00'::timestamptz, 'reschedule parses the date/time in the timezone setting (New York, UTC−5)');
UPDATE barnum.settings SET value = '"Europe/Lisbon"' WHERE key = 'timezone';

SELECT pg_temp.state() AS state_before \gset
SELECT throws_ok($$SELECT barnum.handle_callback('reschedule',
                   '{"appointmentId": "50000000-0000-0000-0000-0000000000c3", "newDate": "2030-03-31", "newTime": "01:30"}')$$,
                 'BN422', NULL, 'reschedule into the spring-forward gap (01:30 on 2030-03-31 in Lisbon) raises BN422');
SELECT throws_ok($$SELECT barnum.handle_callback('reschedule',
                   '{"appointmentId": "50000000-0000-0000-0000-0000000000c3", "newDate": "2030-02-30", "newTime": "10:00"}')$$,
                 'BN422', NULL, 'reschedule to an impossible date (Feb 30) raises BN422');
SELECT throws_ok($$SELECT barnum.handle_callback('reschedule',
                   '{"appointmentId": "50000000-0000-0000-0000-0000000000c3", "newDate": "2030-01-01", "newTime": "10:00"}')$$,
                 'BN422', NULL, 'reschedule into the past raises BN422');
SELECT throws_ok($$SELECT barnum.handle_callback('reschedule',
                   '{"appointmentId": "50000000-0000-0000-0000-0000000000c3", "newDate": "2030-08-01", "newTime": "25:00"}')$$,
                 'BN422', NULL, 'reschedule to 25:00 raises BN422');
SELECT throws_ok($$SELECT barnum.handle_callback('reschedule',
                   '{"appointmentId": "50000000-0000-0000-0000-0000000000c3", "newDate": "01/08/2030", "newTime": "10:00"}')$$,
                 'BN422', NULL, 'reschedule with a non-ISO date raises BN422');
SELECT throws_ok($$SELECT barnum.handle_callback('reschedule',
                   '{"appointmentId": "50000000-0000-0000-0000-0000000000c3", "newDate": "2030-08-01"}')$$,
                 'BN400', 'newTime is required', 'reschedule without newTime raises BN400');
SELECT throws_ok($$SELECT barnum.handle_callback('reschedule',
                   '{"appointmentId": "50000000-0000-0000-0000-0000000000c5", "newDate": "2030-08-01", "newTime": "10:00"}')$$,
                 'BN409', NULL, 'rescheduling a completed appointment by callback raises BN409');
SELECT is(pg_temp.state(), :'state_before', 'the refused reschedules changed nothing');

-- ============================================================ no_show_reschedule
SELECT results_eq(
    $$SELECT r -> 'success', (r #>> '{data,attempt}')::int, (r #>> '{data,reschedule_request_id}') IS NOT NULL
        FROM barnum.handle_callback('no_show_reschedule', '{"appointmentId": "50000000-0000-0000-0000-0000000000c4", "attempt": 2}') r$$,
    $$VALUES ('true'::jsonb, 2, true)$$,
    'no_show_reschedule succeeds and returns the attempt and the reschedule request');
SELECT results_eq(
    $$SELECT status, response, (metadata ->> 'attempt')::int FROM barnum.whatsapp_workflows
       WHERE appointment_id = '50000000-0000-0000-0000-0000000000c4' AND workflow_type = 'reschedule_prompt'$$,
    $$VALUES ('completed', 'reschedule_requested', 2)$$,
    'no_show_reschedule records the answer and the attempt on the reschedule_prompt workflow');
SELECT results_eq(
    $$SELECT source, status FROM barnum.reschedule_requests WHERE appointment_id = '50000000-0000-0000-0000-0000000000c4'$$,
    $$VALUES ('no_show_callback', 'open')$$,
    'no_show_reschedule opens a reschedule request');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_events
            WHERE entity_id = '50000000-0000-0000-0000-0000000000c4' AND event_type = 'appointment.reschedule_requested'), 1,
          'no_show_reschedule emits appointment.reschedule_requested');
SELECT throws_ok($$SELECT barnum.handle_callback('no_show_reschedule', '{"appointmentId": "50000000-0000-0000-0000-0000000000c4"}')$$,
                 'BN400', 'attempt is required', 'no_show_reschedule without attempt raises BN400');
SELECT throws_ok($$SELECT barnum.handle_callback('no_show_reschedule', '{"appointmentId": "50000000-0000-0000-0000-0000000000c8", "attempt": 1}')$$,
                 'BN409', NULL, 'no_show_reschedule for an appointment that was no no-show raises BN409');

-- ============================================================ reactivation
SELECT results_eq(
    $$SELECT r -> 'success', r #>> '{data,workflow_id}'
        FROM barnum.handle_callback('reactivation', '{"patientId": "50000000-0000-0000-0000-000000000002", "workflowType": "reactivation"}') r$$,
    $$VALUES ('true'::jsonb, '50000000-0000-0000-0000-0000000000f2')$$,
    'reactivation succeeds on the patient''s open reactivation workflow');
SELECT results_eq(
    $$SELECT status, responded_at FROM barnum.whatsapp_workflows WHERE id = '50000000-0000-0000-0000-0000000000f2'$$,
    $$VALUES ('completed', '2030-01-10 10:00+00'::timestamptz)$$,
    'reactivation completes the workflow');
SELECT lives_ok($$SELECT barnum.handle_callback('reactivation', '{"patientId": "50000000-0000-0000-0000-000000000003", "workflowType": "winback"}')$$,
                'reactivation for a patient without an open workflow is accepted');
SELECT results_eq(
    $$SELECT workflow_type, status FROM barnum.whatsapp_workflows WHERE patient_id = '50000000-0000-0000-0000-000000000003'$$,
    $$VALUES ('reactivation', 'completed')$$,
    'it is recorded as a completed reactivation workflow');
SELECT throws_ok($$SELECT barnum.handle_callback('reactivation', '{"patientId": "50000000-0000-0000-0000-00000000dead", "workflowType": "reactivation"}')$$,
                 'BN404', NULL, 'reactivation for an unknown patient raises BN404');
SELECT throws_ok($$SELECT barnum.handle_callback('reactivation', '{"workflowType": "reactivation"}')$$,
                 'BN400', 'patientId is required', 'reactivation without patientId raises BN400');

-- ============================================================ review
SELECT throws_ok($$SELECT barnum.handle_callback('review', '{"appointmentId": "50000000-0000-0000-0000-0000000000c5", "reviewSubmitted": true, "rating": 7}')$$,
                 'BN422', NULL, 'review with rating 7 raises BN422');
SELECT throws_ok($$SELECT barnum.handle_callback('review', '{"appointmentId": "50000000-0000-0000-0000-0000000000c5", "reviewSubmitted": true, "rating": 0}')$$,
                 'BN422', NULL, 'review with rating 0 raises BN422');
SELECT throws_ok($$SELECT barnum.handle_callback('review', '{"appointmentId": "50000000-0000-0000-0000-0000000000c5", "reviewSubmitted": true}')$$,
                 'BN400', NULL, 'a submitted review without rating raises BN400');
SELECT is((SELECT status FROM barnum.whatsapp_workflows
            WHERE appointment_id = '50000000-0000-0000-0000-0000000000c5' AND workflow_type = 'review_request'),
          'pending', 'refused reviews leave the review_request open');
SELECT results_eq(
    $$SELECT r -> 'success', (r #>> '{data,rating}')::int
        FROM barnum.handle_callback('review', '{"appointmentId": "50000000-0000-0000-0000-0000000000c5", "reviewSubmitted": true, "rating": 5}') r$$,
    $$VALUES ('true'::jsonb, 5)$$,
    'review with rating 5 succeeds');
SELECT results_eq(
    $$SELECT status, response, (metadata ->> 'rating')::int FROM barnum.whatsapp_workflows
       WHERE appointment_id = '50000000-0000-0000-0000-0000000000c5' AND workflow_type = 'review_request'$$,
    $$VALUES ('completed', '5', 5)$$,
    'review records the rating on the review_request workflow');
-- (Rating 1 being accepted is in 85_hardening: the first review is final.)
SELECT throws_ok($$SELECT barnum.handle_callback('review', '{"appointmentId": "50000000-0000-0000-0000-0000000000c5", "reviewSubmitted": true, "rating": 1}')$$,
                 'BN409', NULL, 'a second review with another rating raises BN409');
SELECT throws_ok($$SELECT barnum.handle_callback('review', '{"appointmentId": "50000000-0000-0000-0000-0000000000c1", "reviewSubmitted": true, "rating": 4}')$$,
                 'BN409', NULL, 'reviewing an appointment that is not completed raises BN409');

-- ============================================================ generic errors change nothing
SELECT pg_temp.state() AS state_before \gset
SELECT throws_ok($$SELECT barnum.handle_callback('confirm', '{}')$$,
                 'BN400', 'appointmentId is required', 'a missing appointmentId raises BN400');
SELECT throws_ok($$SELECT barnum.handle_callback('confirm', '{"appointmentId": "50000000-0000-0000-0000-00000000dead"}')$$,
                 'BN404', NULL, 'an unknown appointment raises BN404');
SELECT throws_ok($$SELECT barnum.handle_callback('confirm', '{"appointmentId": "not-a-uuid"}')$$,
                 'BN422', NULL, 'a malformed appointmentId raises BN422');
SELECT throws_ok($$SELECT barnum.handle_callback('confirm', '{"appointmentId": "50000000-0000-0000-0000-0000000000c6"}')$$,
                 'BN409', NULL, 'confirming a cancelled appointment raises BN409');
SELECT throws_ok($$SELECT barnum.handle_callback('cancel', '{"appointmentId": "50000000-0000-0000-0000-0000000000c6"}')$$,
                 'BN409', NULL, 'cancelling a cancelled appointment raises BN409');
SELECT throws_ok($$SELECT barnum.handle_callback('confirm', '{"appointmentId": "50000000-0000-0000-0000-0000000000c4"}')$$,
                 'BN409', NULL, 'confirming a no-show raises BN409');
SELECT throws_ok($$SELECT barnum.handle_callback('delete', '{"appointmentId": "50000000-0000-0000-0000-0000000000c8"}')$$,
                 'BN400', NULL, 'an unknown action raises BN400');
SELECT throws_ok($$SELECT barnum.handle_callback(NULL, '{"appointmentId": "50000000-0000-0000-0000-0000000000c8"}')$$,
                 'BN400', 'action is required', 'no action at all raises BN400');
SELECT throws_ok($$SELECT barnum.handle_callback('confirm', '{"action": "cancel", "appointmentId": "50000000-0000-0000-0000-0000000000c8"}')$$,
                 'BN400', NULL, 'a body action contradicting the action argument raises BN400');
SELECT throws_ok($$SELECT barnum.handle_callback('confirm', '[1, 2]')$$,
                 'BN400', NULL, 'a body that is not a JSON object raises BN400');
SELECT is(pg_temp.state(), :'state_before', 'refused callbacks changed nothing');
SELECT is((barnum.handle_callback(NULL, '{"action": "confirm", "appointmentId": "50000000-0000-0000-0000-0000000000c8"}')
           #>> '{data,appointment,status}'), 'confirmed', 'the action may come from the body');

-- ============================================================ idempotency
INSERT INTO barnum.appointments (id, patient_id, starts_at)
VALUES ('50000000-0000-0000-0000-0000000000c9', '50000000-0000-0000-0000-000000000001', '2030-01-26 09:00+00');
SELECT barnum.handle_callback('cancel', '{"appointmentId": "50000000-0000-0000-0000-0000000000c9", "reason": "r"}', 'key-1')::text
    AS first_response \gset
SELECT is(barnum.handle_callback('cancel', '{"appointmentId": "50000000-0000-0000-0000-0000000000c9", "reason": "r"}', 'key-1')::text,
          :'first_response', 'same key + same body returns the first response (no BN409 for the now-cancelled appointment)');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_events
            WHERE entity_id = '50000000-0000-0000-0000-0000000000c9' AND event_type = 'appointment.cancelled'), 1,
          'the repeated callback was applied once');
SELECT is((SELECT response::text FROM barnum.inbound_callbacks WHERE idempotency_key = 'key-1'), :'first_response',
          'the response is stored under the idempotency key');
SELECT throws_ok($$SELECT barnum.handle_callback('cancel', '{"appointmentId": "50000000-0000-0000-0000-0000000000c9", "reason": "other"}', 'key-1')$$,
                 'BN409', NULL, 'same key + another body raises BN409');
SELECT throws_ok($$SELECT barnum.handle_callback('confirm', '{"appointmentId": "50000000-0000-0000-0000-0000000000c9", "reason": "r"}', 'key-1')$$,
                 'BN409', NULL, 'same key + another action raises BN409');
SELECT throws_ok($$SELECT barnum.handle_callback('confirm', '{"appointmentId": "50000000-0000-0000-0000-00000000dead"}', 'key-2')$$,
                 'BN404', NULL, 'a failing keyed callback raises its error');
SELECT is_empty($$SELECT 1 FROM barnum.inbound_callbacks WHERE idempotency_key = 'key-2'$$,
                'a failed callback does not consume its idempotency key');

SELECT * FROM finish();
ROLLBACK;

-- 20_triggers: appointment triggers → workflows + outbox events, and the
-- outbox fan-out into deliveries (SPEC §2.4, §2.5).
BEGIN;
SELECT plan(55);

SET LOCAL barnum.clock = '2030-01-10 10:00:00+00';

INSERT INTO barnum.patients (id, name, phone, whatsapp_opt_out) VALUES
    ('20000000-0000-0000-0000-000000000001', 'Ana Reachable', '+351910000001', false),
    ('20000000-0000-0000-0000-000000000002', 'Bruno Visitor', '+351910000002', false),
    ('20000000-0000-0000-0000-000000000003', 'Carla OptOut',  '+351910000003', true),
    ('20000000-0000-0000-0000-000000000004', 'Duarte NoPhone', NULL,           false);

-- ============================================================ no endpoint yet
-- pre-confirmation on insert
INSERT INTO barnum.appointments (id, patient_id, starts_at)
VALUES ('20000000-0000-0000-0000-0000000000a1', '20000000-0000-0000-0000-000000000001', '2030-01-20 09:00+00');

SELECT results_eq(
    $$SELECT workflow_type FROM barnum.whatsapp_workflows
       WHERE appointment_id = '20000000-0000-0000-0000-0000000000a1'$$,
    $$VALUES ('pre_confirmation')$$,
    'inserting a future appointment records one pre_confirmation workflow');
SELECT results_eq(
    $$SELECT e.event_type, e.entity_type, e.workflow_id, e.scheduled_for FROM barnum.whatsapp_events e
       WHERE e.entity_id = '20000000-0000-0000-0000-0000000000a1'$$,
    $$SELECT 'appointment.pre_confirmed', 'appointment', w.id, '2030-01-10 10:00+00'::timestamptz
        FROM barnum.whatsapp_workflows w WHERE w.appointment_id = '20000000-0000-0000-0000-0000000000a1'$$,
    'it emits one appointment.pre_confirmed event, due now, linked to the workflow');
SELECT results_eq(
    $$SELECT status, last_error, processed_at IS NOT NULL FROM barnum.whatsapp_events
       WHERE entity_id = '20000000-0000-0000-0000-0000000000a1'$$,
    $$VALUES ('skipped', 'no active endpoint', true)$$,
    'with no active endpoint the event is skipped with last_error ''no active endpoint''');
SELECT is_empty(
    $$SELECT 1 FROM barnum.webhook_deliveries d JOIN barnum.whatsapp_events e ON e.id = d.event_id
       WHERE e.entity_id = '20000000-0000-0000-0000-0000000000a1'$$,
    'an event nobody wants has no deliveries');
SELECT is_empty(
    $$SELECT 1 FROM barnum.whatsapp_workflows
       WHERE appointment_id = '20000000-0000-0000-0000-0000000000a1' AND status IN ('pending', 'sent')$$,
    'a workflow whose only event was skipped (no endpoint) is not left open');

-- past appointments (data import) and non-live inserts ask nothing
INSERT INTO barnum.appointments (id, patient_id, starts_at)
VALUES ('20000000-0000-0000-0000-0000000000a0', '20000000-0000-0000-0000-000000000001', '2030-01-01 09:00+00');
SELECT is_empty($$SELECT 1 FROM barnum.whatsapp_workflows WHERE appointment_id = '20000000-0000-0000-0000-0000000000a0'$$,
                'an appointment inserted with a past starts_at gets no workflow');
SELECT is_empty($$SELECT 1 FROM barnum.whatsapp_events WHERE entity_id = '20000000-0000-0000-0000-0000000000a0'$$,
                'an appointment inserted with a past starts_at gets no event');
INSERT INTO barnum.appointments (id, patient_id, starts_at, status)
VALUES ('20000000-0000-0000-0000-0000000000b0', '20000000-0000-0000-0000-000000000001', '2030-01-21 09:00+00', 'cancelled');
SELECT is_empty($$SELECT 1 FROM barnum.whatsapp_events WHERE entity_id = '20000000-0000-0000-0000-0000000000b0'$$,
                'an appointment inserted as cancelled gets no pre-confirmation');

-- opt-out and no phone: workflow recorded as cancelled with a reason, no event
INSERT INTO barnum.appointments (id, patient_id, starts_at) VALUES
    ('20000000-0000-0000-0000-0000000000c3', '20000000-0000-0000-0000-000000000003', '2030-01-20 09:00+00'),
    ('20000000-0000-0000-0000-0000000000c4', '20000000-0000-0000-0000-000000000004', '2030-01-20 09:00+00');
SELECT results_eq(
    $$SELECT workflow_type, status, metadata ->> 'reason' FROM barnum.whatsapp_workflows
       WHERE appointment_id = '20000000-0000-0000-0000-0000000000c3'$$,
    $$VALUES ('pre_confirmation', 'cancelled', 'patient opted out')$$,
    'an opted-out patient''s pre_confirmation workflow is cancelled with reason ''patient opted out''');
SELECT is_empty($$SELECT 1 FROM barnum.whatsapp_events WHERE entity_id = '20000000-0000-0000-0000-0000000000c3'$$,
                'an opted-out patient gets no pre_confirmed event');
SELECT results_eq(
    $$SELECT workflow_type, status, metadata ->> 'reason' FROM barnum.whatsapp_workflows
       WHERE appointment_id = '20000000-0000-0000-0000-0000000000c4'$$,
    $$VALUES ('pre_confirmation', 'cancelled', 'patient has no phone')$$,
    'a patient without phone: pre_confirmation workflow cancelled with reason ''patient has no phone''');
SELECT is_empty($$SELECT 1 FROM barnum.whatsapp_events WHERE entity_id = '20000000-0000-0000-0000-0000000000c4'$$,
                'a patient without phone gets no pre_confirmed event');

-- ============================================================ endpoints for fan-out
INSERT INTO barnum.webhook_endpoints (id, name, url, event_types, is_active) VALUES
    ('20000000-0000-0000-0000-0000000000e1', 'all',      'https://hooks.example/all',      '{*}', true),
    ('20000000-0000-0000-0000-0000000000e2', 'appt',     'https://hooks.example/appt',     '{appointment.*}', true),
    ('20000000-0000-0000-0000-0000000000e3', 'noshow',   'https://hooks.example/noshow',   '{appointment.no_show}', true),
    ('20000000-0000-0000-0000-0000000000e4', 'patients', 'https://hooks.example/patients', '{patient.*}', true),
    ('20000000-0000-0000-0000-0000000000e5', 'off',      'https://hooks.example/off',      '{*}', false);

INSERT INTO barnum.appointments (id, patient_id, starts_at)
VALUES ('20000000-0000-0000-0000-0000000000a2', '20000000-0000-0000-0000-000000000001', '2030-01-20 10:00+00');

SELECT results_eq(
    $$SELECT d.endpoint_id FROM barnum.webhook_deliveries d JOIN barnum.whatsapp_events e ON e.id = d.event_id
       WHERE e.entity_id = '20000000-0000-0000-0000-0000000000a2' AND e.event_type = 'appointment.pre_confirmed'
       ORDER BY d.endpoint_id$$,
    $$VALUES ('20000000-0000-0000-0000-0000000000e1'::uuid), ('20000000-0000-0000-0000-0000000000e2'::uuid)$$,
    'appointment.pre_confirmed fans out to the ''*'' and ''appointment.*'' endpoints only');
SELECT is((SELECT count(*)::int FROM barnum.webhook_deliveries d JOIN barnum.whatsapp_events e ON e.id = d.event_id
            WHERE e.entity_id = '20000000-0000-0000-0000-0000000000a2'), 2,
          'two matching endpoints → two deliveries');
SELECT is_empty(
    $$SELECT 1 FROM barnum.webhook_deliveries d JOIN barnum.whatsapp_events e ON e.id = d.event_id
       WHERE e.entity_id = '20000000-0000-0000-0000-0000000000a2'
         AND d.endpoint_id = '20000000-0000-0000-0000-0000000000e3'$$,
    'an exact pattern for another event type does not match');
SELECT is_empty(
    $$SELECT 1 FROM barnum.webhook_deliveries d JOIN barnum.whatsapp_events e ON e.id = d.event_id
       WHERE e.entity_id = '20000000-0000-0000-0000-0000000000a2'
         AND d.endpoint_id = '20000000-0000-0000-0000-0000000000e4'$$,
    'a ''patient.*'' pattern does not match appointment events');
SELECT is_empty(
    $$SELECT 1 FROM barnum.webhook_deliveries WHERE endpoint_id = '20000000-0000-0000-0000-0000000000e5'$$,
    'an inactive endpoint gets no deliveries');
SELECT results_eq(
    $$SELECT DISTINCT d.status, d.attempts, d.next_attempt_at FROM barnum.webhook_deliveries d
        JOIN barnum.whatsapp_events e ON e.id = d.event_id
       WHERE e.entity_id = '20000000-0000-0000-0000-0000000000a2'$$,
    $$VALUES ('pending', 0, '2030-01-10 10:00+00'::timestamptz)$$,
    'new deliveries are pending, 0 attempts, due at the event''s scheduled_for');
SELECT is((SELECT status FROM barnum.whatsapp_events WHERE entity_id = '20000000-0000-0000-0000-0000000000a2'),
          'pending', 'an event with deliveries is pending');
SELECT results_eq(
    $$SELECT workflow_type, status FROM barnum.whatsapp_workflows
       WHERE appointment_id = '20000000-0000-0000-0000-0000000000a2'$$,
    $$VALUES ('pre_confirmation', 'pending')$$,
    'inserting a future appointment opens one pending pre_confirmation workflow');

-- ============================================================ no_show
UPDATE barnum.appointments SET status = 'no_show' WHERE id = '20000000-0000-0000-0000-0000000000a2';

SELECT results_eq(
    $$SELECT status FROM barnum.whatsapp_workflows
       WHERE appointment_id = '20000000-0000-0000-0000-0000000000a2' AND workflow_type = 'reschedule_prompt'$$,
    $$VALUES ('pending')$$,
    'no_show opens a pending reschedule_prompt workflow');
SELECT is((SELECT status FROM barnum.whatsapp_workflows
            WHERE appointment_id = '20000000-0000-0000-0000-0000000000a2' AND workflow_type = 'pre_confirmation'),
          'cancelled', 'no_show closes the open pre_confirmation workflow');
SELECT results_eq(
    $$SELECT e.scheduled_for, e.workflow_id FROM barnum.whatsapp_events e
       WHERE e.entity_id = '20000000-0000-0000-0000-0000000000a2' AND e.event_type = 'appointment.no_show'$$,
    $$SELECT '2030-01-10 11:00+00'::timestamptz, w.id FROM barnum.whatsapp_workflows w
       WHERE w.appointment_id = '20000000-0000-0000-0000-0000000000a2' AND w.workflow_type = 'reschedule_prompt'$$,
    'no_show emits appointment.no_show at clock + no_show_delay (1 hour), linked to the prompt');
SELECT results_eq(
    $$SELECT d.endpoint_id, d.next_attempt_at FROM barnum.webhook_deliveries d JOIN barnum.whatsapp_events e ON e.id = d.event_id
       WHERE e.entity_id = '20000000-0000-0000-0000-0000000000a2' AND e.event_type = 'appointment.no_show'
       ORDER BY d.endpoint_id$$,
    $$VALUES ('20000000-0000-0000-0000-0000000000e1'::uuid, '2030-01-10 11:00+00'::timestamptz),
             ('20000000-0000-0000-0000-0000000000e2'::uuid, '2030-01-10 11:00+00'::timestamptz),
             ('20000000-0000-0000-0000-0000000000e3'::uuid, '2030-01-10 11:00+00'::timestamptz)$$,
    'the delayed no_show event fans out to 3 endpoints (incl. the exact pattern), due at scheduled_for');
SELECT is_empty(
    $$SELECT 1 FROM barnum.whatsapp_events
       WHERE entity_id = '20000000-0000-0000-0000-0000000000a2'
         AND event_type IN ('appointment.cancelled', 'appointment.confirmed', 'appointment.rescheduled')$$,
    'no_show emits no status event');

-- the delay follows the setting
UPDATE barnum.settings SET value = '"3 hours"' WHERE key = 'no_show_delay';
INSERT INTO barnum.appointments (id, patient_id, starts_at)
VALUES ('20000000-0000-0000-0000-0000000000a3', '20000000-0000-0000-0000-000000000001', '2030-01-20 11:00+00');
UPDATE barnum.appointments SET status = 'no_show' WHERE id = '20000000-0000-0000-0000-0000000000a3';
SELECT is((SELECT scheduled_for FROM barnum.whatsapp_events
            WHERE entity_id = '20000000-0000-0000-0000-0000000000a3' AND event_type = 'appointment.no_show'),
          '2030-01-10 13:00+00'::timestamptz,
          'with no_show_delay = 3 hours the no_show event is scheduled at clock + 3 hours');

-- ============================================================ completed
INSERT INTO barnum.appointments (id, patient_id, starts_at)
VALUES ('20000000-0000-0000-0000-0000000000a4', '20000000-0000-0000-0000-000000000002', '2030-01-10 08:00+00');
UPDATE barnum.appointments SET status = 'completed' WHERE id = '20000000-0000-0000-0000-0000000000a4';

SELECT results_eq(
    $$SELECT status FROM barnum.whatsapp_workflows
       WHERE appointment_id = '20000000-0000-0000-0000-0000000000a4' AND workflow_type = 'review_request'$$,
    $$VALUES ('pending')$$,
    'completed opens a pending review_request workflow');
SELECT results_eq(
    $$SELECT e.scheduled_for, e.workflow_id FROM barnum.whatsapp_events e
       WHERE e.entity_id = '20000000-0000-0000-0000-0000000000a4' AND e.event_type = 'appointment.completed'$$,
    $$SELECT '2030-01-10 12:00+00'::timestamptz, w.id FROM barnum.whatsapp_workflows w
       WHERE w.appointment_id = '20000000-0000-0000-0000-0000000000a4' AND w.workflow_type = 'review_request'$$,
    'completed emits appointment.completed at clock + review_delay (2 hours)');
SELECT is((SELECT last_visit_at FROM barnum.patients WHERE id = '20000000-0000-0000-0000-000000000002'),
          '2030-01-10 08:00+00'::timestamptz, 'completed sets patients.last_visit_at to the visit time');

UPDATE barnum.settings SET value = '"30 minutes"' WHERE key = 'review_delay';
INSERT INTO barnum.appointments (id, patient_id, starts_at)
VALUES ('20000000-0000-0000-0000-0000000000a5', '20000000-0000-0000-0000-000000000001', '2030-01-10 09:00+00');
UPDATE barnum.appointments SET status = 'completed' WHERE id = '20000000-0000-0000-0000-0000000000a5';
SELECT is((SELECT scheduled_for FROM barnum.whatsapp_events
            WHERE entity_id = '20000000-0000-0000-0000-0000000000a5' AND event_type = 'appointment.completed'),
          '2030-01-10 10:30+00'::timestamptz,
          'with review_delay = 30 minutes the review event is scheduled at clock + 30 minutes');

-- completed → rescheduled → completed again: still one open review_request (idempotent)
UPDATE barnum.appointments SET status = 'scheduled', starts_at = '2030-01-10 09:30+00'
 WHERE id = '20000000-0000-0000-0000-0000000000a5';
UPDATE barnum.appointments SET status = 'completed' WHERE id = '20000000-0000-0000-0000-0000000000a5';
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_workflows
            WHERE appointment_id = '20000000-0000-0000-0000-0000000000a5' AND workflow_type = 'review_request'
              AND status IN ('pending', 'sent')), 1,
          'completing twice keeps one open review_request workflow');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_events
            WHERE entity_id = '20000000-0000-0000-0000-0000000000a5' AND event_type = 'appointment.completed'), 1,
          'completing twice emits one appointment.completed event');

-- ============================================================ status events
INSERT INTO barnum.appointments (id, patient_id, starts_at) VALUES
    ('20000000-0000-0000-0000-0000000000a6', '20000000-0000-0000-0000-000000000001', '2030-01-22 09:00+00'),
    ('20000000-0000-0000-0000-0000000000a7', '20000000-0000-0000-0000-000000000001', '2030-01-23 09:00+00'),
    ('20000000-0000-0000-0000-0000000000a8', '20000000-0000-0000-0000-000000000001', '2030-01-24 09:00+00');

UPDATE barnum.appointments SET status = 'confirmed' WHERE id = '20000000-0000-0000-0000-0000000000a6';
SELECT results_eq(
    $$SELECT event_type, workflow_id, scheduled_for FROM barnum.whatsapp_events
       WHERE entity_id = '20000000-0000-0000-0000-0000000000a6' AND event_type <> 'appointment.pre_confirmed'$$,
    $$VALUES ('appointment.confirmed', NULL::uuid, '2030-01-10 10:00+00'::timestamptz)$$,
    'scheduled → confirmed emits one appointment.confirmed event, due now');

UPDATE barnum.appointments SET status = 'cancelled', cancel_reason = 'busy' WHERE id = '20000000-0000-0000-0000-0000000000a7';
SELECT results_eq(
    $$SELECT event_type FROM barnum.whatsapp_events
       WHERE entity_id = '20000000-0000-0000-0000-0000000000a7' AND event_type <> 'appointment.pre_confirmed'$$,
    $$VALUES ('appointment.cancelled')$$,
    'scheduled → cancelled emits one appointment.cancelled event');
SELECT is((SELECT status FROM barnum.whatsapp_workflows WHERE appointment_id = '20000000-0000-0000-0000-0000000000a7'),
          'cancelled', 'cancelling closes the appointment''s open workflows');

UPDATE barnum.appointments SET starts_at = '2030-01-25 15:00+00' WHERE id = '20000000-0000-0000-0000-0000000000a8';
SELECT results_eq(
    $$SELECT event_type FROM barnum.whatsapp_events
       WHERE entity_id = '20000000-0000-0000-0000-0000000000a8' AND event_type <> 'appointment.pre_confirmed'$$,
    $$VALUES ('appointment.rescheduled')$$,
    'moving starts_at emits one appointment.rescheduled event');
SELECT results_eq(
    $$SELECT status, metadata ->> 'closed_reason' FROM barnum.whatsapp_workflows
       WHERE appointment_id = '20000000-0000-0000-0000-0000000000a8' AND workflow_type = 'pre_confirmation'$$,
    $$VALUES ('cancelled', 'appointment rescheduled')$$,
    'rescheduling voids the old time''s pre_confirmation workflow');

-- unreachable patients get no status events either
UPDATE barnum.appointments SET status = 'confirmed' WHERE id = '20000000-0000-0000-0000-0000000000c3';
UPDATE barnum.appointments SET status = 'cancelled' WHERE id = '20000000-0000-0000-0000-0000000000c4';
SELECT is_empty($$SELECT 1 FROM barnum.whatsapp_events
                   WHERE entity_id IN ('20000000-0000-0000-0000-0000000000c3', '20000000-0000-0000-0000-0000000000c4')$$,
                'opted-out / phoneless patients get no confirmed / cancelled events');

-- opted-out no_show: prompt recorded as cancelled, no event
UPDATE barnum.appointments SET status = 'no_show' WHERE id = '20000000-0000-0000-0000-0000000000c3';
SELECT results_eq(
    $$SELECT status, metadata ->> 'reason' FROM barnum.whatsapp_workflows
       WHERE appointment_id = '20000000-0000-0000-0000-0000000000c3' AND workflow_type = 'reschedule_prompt'$$,
    $$VALUES ('cancelled', 'patient opted out')$$,
    'an opted-out no-show gets a cancelled reschedule_prompt with the reason');
SELECT is_empty($$SELECT 1 FROM barnum.whatsapp_events WHERE entity_id = '20000000-0000-0000-0000-0000000000c3'$$,
                'an opted-out no-show gets no appointment.no_show event');

-- ============================================================ idempotency
SELECT throws_ok(
    $$INSERT INTO barnum.whatsapp_workflows (workflow_type, appointment_id, patient_id)
      VALUES ('review_request', '20000000-0000-0000-0000-0000000000a4', '20000000-0000-0000-0000-000000000002')$$,
    '23505', NULL, 'a second open workflow of one type for one appointment is refused');
SELECT is_empty(
    $$SELECT appointment_id, workflow_type FROM barnum.whatsapp_workflows
       WHERE status IN ('pending', 'sent') AND appointment_id IS NOT NULL
       GROUP BY 1, 2 HAVING count(*) > 1$$,
    'no appointment has two open workflows of the same type');

-- A no-show the clinic re-books directly: the old prompt is void (like the
-- pre-confirmation and reminder of the old time), and a no-show at the new
-- time gets its own prompt — still at most one open.
UPDATE barnum.appointments SET status = 'scheduled', starts_at = '2030-01-26 09:00+00'
 WHERE id = '20000000-0000-0000-0000-0000000000a3';
SELECT is_empty($$SELECT 1 FROM barnum.whatsapp_workflows
                   WHERE appointment_id = '20000000-0000-0000-0000-0000000000a3' AND workflow_type = 'reschedule_prompt'
                     AND status IN ('pending', 'sent')$$,
                'rescheduling a no-show closes its open reschedule_prompt');
UPDATE barnum.appointments SET status = 'no_show' WHERE id = '20000000-0000-0000-0000-0000000000a3';
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_workflows
            WHERE appointment_id = '20000000-0000-0000-0000-0000000000a3' AND workflow_type = 'reschedule_prompt'
              AND status IN ('pending', 'sent')), 1,
          'after a second no-show there is exactly one open reschedule_prompt');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_events
            WHERE entity_id = '20000000-0000-0000-0000-0000000000a3' AND event_type = 'appointment.no_show'), 2,
          'the no-show at the new time emits its own appointment.no_show');

-- ============================================================ create_whatsapp_event
SELECT isa_ok(barnum.create_whatsapp_event('appointment.confirmed', 'appointment', '20000000-0000-0000-0000-0000000000a1'),
              'uuid', 'create_whatsapp_event returns the event id');
SELECT throws_ok($$SELECT barnum.create_whatsapp_event('Bad Type', 'appointment', '20000000-0000-0000-0000-0000000000a1')$$,
                 'BN400', NULL, 'create_whatsapp_event rejects a malformed event type (BN400)');
SELECT throws_ok($$SELECT barnum.create_whatsapp_event('appointment.confirmed', 'appointment', '20000000-0000-0000-0000-00000000dead')$$,
                 'BN404', NULL, 'create_whatsapp_event on an unknown appointment raises BN404');
SELECT throws_ok($$SELECT barnum.create_whatsapp_event('appointment.confirmed', 'invoice', '20000000-0000-0000-0000-0000000000a1')$$,
                 'BN400', NULL, 'create_whatsapp_event rejects an unknown entity type (BN400)');
SELECT throws_ok($$SELECT barnum.create_whatsapp_event('appointment.confirmed', 'appointment', NULL)$$,
                 'BN400', NULL, 'create_whatsapp_event requires an entity id (BN400)');
SELECT isnt(barnum.create_whatsapp_event('patient.reactivation', 'patient', '20000000-0000-0000-0000-000000000001',
                                         NULL, '2030-01-11 00:00+00'),
            NULL, 'create_whatsapp_event accepts a patient entity with a scheduled_for');
SELECT results_eq(
    $$SELECT d.endpoint_id, d.next_attempt_at FROM barnum.webhook_deliveries d JOIN barnum.whatsapp_events e ON e.id = d.event_id
       WHERE e.event_type = 'patient.reactivation' ORDER BY d.endpoint_id$$,
    $$VALUES ('20000000-0000-0000-0000-0000000000e1'::uuid, '2030-01-11 00:00+00'::timestamptz),
             ('20000000-0000-0000-0000-0000000000e4'::uuid, '2030-01-11 00:00+00'::timestamptz)$$,
    'patient.reactivation fans out to ''*'' and ''patient.*'', due at the given scheduled_for');

-- ============================================================ events a DBA inserts by hand
-- One multi-row statement: every pending row fans out like Barnum's own;
-- a history row (already sent) gets no delivery.
INSERT INTO barnum.whatsapp_events (id, event_type, entity_type, entity_id, scheduled_for, status) VALUES
    ('20000000-0000-0000-0000-0000000000f1', 'appointment.confirmed', 'appointment', '20000000-0000-0000-0000-0000000000a2', '2030-01-12 00:00+00', 'pending'),
    ('20000000-0000-0000-0000-0000000000f2', 'patient.reactivation', 'patient', '20000000-0000-0000-0000-000000000001', '2030-01-12 00:00+00', 'pending'),
    ('20000000-0000-0000-0000-0000000000f3', 'appointment.confirmed', 'appointment', '20000000-0000-0000-0000-0000000000a2', '2030-01-12 00:00+00', 'sent');
SELECT results_eq(
    $$SELECT event_id, endpoint_id FROM barnum.webhook_deliveries
       WHERE event_id IN ('20000000-0000-0000-0000-0000000000f1', '20000000-0000-0000-0000-0000000000f2')
       ORDER BY event_id, endpoint_id$$,
    $$VALUES ('20000000-0000-0000-0000-0000000000f1'::uuid, '20000000-0000-0000-0000-0000000000e1'::uuid),
             ('20000000-0000-0000-0000-0000000000f1'::uuid, '20000000-0000-0000-0000-0000000000e2'::uuid),
             ('20000000-0000-0000-0000-0000000000f2'::uuid, '20000000-0000-0000-0000-0000000000e1'::uuid),
             ('20000000-0000-0000-0000-0000000000f2'::uuid, '20000000-0000-0000-0000-0000000000e4'::uuid)$$,
    'a multi-row INSERT by hand fans out each pending event to its matching endpoints');
SELECT is_empty($$SELECT 1 FROM barnum.webhook_deliveries WHERE event_id = '20000000-0000-0000-0000-0000000000f3'$$,
                'an event inserted as already sent gets no delivery');
SELECT is((SELECT status FROM barnum.whatsapp_events WHERE id = '20000000-0000-0000-0000-0000000000f3'), 'sent',
          'and keeps its status');

SELECT * FROM finish();
ROLLBACK;

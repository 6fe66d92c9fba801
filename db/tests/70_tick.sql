-- 70_tick: time-driven work — reminders, reactivation, workflow expiry,
-- retention purge (SPEC §2.5).  Times are relative to now() (created_at
-- columns default to now()); the clock is moved with set_config.
BEGIN;
SELECT plan(53);

CREATE FUNCTION pg_temp.at(p_offset interval) RETURNS void LANGUAGE sql AS $$
    SELECT set_config('barnum.clock', (now() + p_offset)::text, true) $$;
CREATE FUNCTION pg_temp.reminders(p_appt uuid) RETURNS int LANGUAGE sql AS $$
    SELECT count(*)::int FROM barnum.whatsapp_events WHERE entity_id = p_appt AND event_type = 'appointment.reminder' $$;
CREATE FUNCTION pg_temp.reactivations(p_patient uuid) RETURNS int LANGUAGE sql AS $$
    SELECT count(*)::int FROM barnum.whatsapp_events WHERE entity_id = p_patient AND event_type = 'patient.reactivation' $$;
CREATE TEMP TABLE ticks (label text PRIMARY KEY, result jsonb) ON COMMIT DROP;
CREATE TEMP TABLE claimed (delivery_id bigint, event_id uuid, event_type text, endpoint_id uuid, url text,
                           secret text, attempt int, timeout_ms int, payload jsonb) ON COMMIT DROP;

DO $$ BEGIN PERFORM pg_temp.at('0'); END $$;

INSERT INTO barnum.webhook_endpoints (id, name, url) VALUES ('70000000-0000-0000-0000-0000000000e1', 'all', 'https://hooks.example/all');
INSERT INTO barnum.patients (id, name, phone, whatsapp_opt_out, last_visit_at) VALUES
    ('70000000-0000-0000-0000-000000000001', 'Reminded',       '+351970000001', false, NULL),
    ('70000000-0000-0000-0000-000000000002', 'Opted out',      '+351970000002', true,  NULL),
    ('70000000-0000-0000-0000-000000000003', 'No phone',       NULL,            false, NULL),
    ('70000000-0000-0000-0000-000000000005', 'Inactive',       '+351970000005', false, now() - interval '40 days'),
    ('70000000-0000-0000-0000-000000000006', 'Inactive booked','+351970000006', false, now() - interval '40 days'),
    ('70000000-0000-0000-0000-000000000007', 'Recent visitor', '+351970000007', false, now() - interval '10 days'),
    ('70000000-0000-0000-0000-000000000008', 'Inactive optout','+351970000008', true,  now() - interval '40 days'),
    ('70000000-0000-0000-0000-000000000009', 'Soon',           '+351970000009', false, NULL),
    ('70000000-0000-0000-0000-000000000010', 'Books late',     '+351970000010', false, now() - interval '400 days');
INSERT INTO barnum.appointments (id, patient_id, starts_at, status) VALUES
    ('70000000-0000-0000-0000-0000000000a1', '70000000-0000-0000-0000-000000000001', now() + interval '30 hours', 'scheduled'),
    ('70000000-0000-0000-0000-0000000000a2', '70000000-0000-0000-0000-000000000002', now() + interval '30 hours', 'scheduled'),
    ('70000000-0000-0000-0000-0000000000a3', '70000000-0000-0000-0000-000000000003', now() + interval '30 hours', 'scheduled'),
    ('70000000-0000-0000-0000-0000000000a4', '70000000-0000-0000-0000-000000000001', now() + interval '30 hours', 'cancelled'),
    ('70000000-0000-0000-0000-0000000000a6', '70000000-0000-0000-0000-000000000006', now() + interval '10 days',  'scheduled'),
    ('70000000-0000-0000-0000-0000000000a9', '70000000-0000-0000-0000-000000000009', now() + interval '2 hours',  'scheduled');
-- Pre-confirmations already went out for a1 and a9.
UPDATE barnum.whatsapp_workflows SET status = 'sent'
 WHERE appointment_id IN ('70000000-0000-0000-0000-0000000000a1', '70000000-0000-0000-0000-0000000000a9');
UPDATE barnum.webhook_deliveries SET status = 'sent';
UPDATE barnum.whatsapp_events SET status = 'sent';

-- Outbox history for the retention purge (the event ids name their role).
INSERT INTO barnum.whatsapp_events (id, event_type, entity_type, entity_id, status, created_at) VALUES
    ('70000000-0000-0000-0000-0000000000b1', 'appointment.confirmed', 'appointment', '70000000-0000-0000-0000-0000000000a1', 'pending', now()),
    ('70000000-0000-0000-0000-0000000000b2', 'appointment.confirmed', 'appointment', '70000000-0000-0000-0000-0000000000a1', 'pending', now()),
    ('70000000-0000-0000-0000-0000000000b3', 'appointment.confirmed', 'appointment', '70000000-0000-0000-0000-0000000000a1', 'pending', now()),
    ('70000000-0000-0000-0000-0000000000b4', 'appointment.confirmed', 'appointment', '70000000-0000-0000-0000-0000000000a1', 'pending', now()),
    ('70000000-0000-0000-0000-0000000000b5', 'appointment.confirmed', 'appointment', '70000000-0000-0000-0000-0000000000a1', 'pending', now());
UPDATE barnum.whatsapp_events e SET status = v.status, created_at = now() - v.age
  FROM (VALUES ('70000000-0000-0000-0000-0000000000b1'::uuid, 'sent',        interval '100 days'),
               ('70000000-0000-0000-0000-0000000000b2'::uuid, 'skipped',     interval '100 days'),
               ('70000000-0000-0000-0000-0000000000b3'::uuid, 'dead_letter', interval '100 days'),
               ('70000000-0000-0000-0000-0000000000b4'::uuid, 'pending',     interval '100 days'),
               ('70000000-0000-0000-0000-0000000000b5'::uuid, 'sent',        interval '10 days')) v(id, status, age)
 WHERE e.id = v.id;
UPDATE barnum.webhook_deliveries d SET status = e.status
  FROM barnum.whatsapp_events e WHERE e.id = d.event_id AND e.id::text LIKE '70000000-0000-0000-0000-0000000000b%';
INSERT INTO barnum.webhook_attempts (delivery_id, attempt, http_status)
SELECT id, 1, 200 FROM barnum.webhook_deliveries WHERE event_id = '70000000-0000-0000-0000-0000000000b1';
-- An action token that expired long ago.
SELECT barnum.generate_action_token('confirm', '70000000-0000-0000-0000-0000000000a1', '70000000-0000-0000-0000-000000000001') IS NOT NULL
    AS minted \g /dev/null
UPDATE barnum.whatsapp_action_tokens SET expires_at = now() - interval '100 days';

-- ============================================================ phase A: clock = now
INSERT INTO ticks VALUES ('A1', barnum.tick());
SELECT ok((SELECT result FROM ticks WHERE label = 'A1') ?& ARRAY['reminders', 'reactivations', 'workflows_expired', 'events_purged'],
          'tick() returns jsonb counts: reminders, reactivations, workflows_expired, events_purged');
SELECT is(jsonb_typeof((SELECT result -> 'reminders' FROM ticks WHERE label = 'A1')), 'number', 'the counts are numbers');
SELECT is(pg_temp.reminders('70000000-0000-0000-0000-0000000000a1'), 0,
          'no reminder for an appointment 30 h away (reminder_lead 24 h)');
SELECT is(pg_temp.reminders('70000000-0000-0000-0000-0000000000a9'), 1,
          'a reminder for an appointment 2 h away');
SELECT results_eq(
    $$SELECT w.status, (w.metadata ->> 'starts_at')::timestamptz, e.scheduled_for
        FROM barnum.whatsapp_workflows w JOIN barnum.whatsapp_events e ON e.workflow_id = w.id
       WHERE w.appointment_id = '70000000-0000-0000-0000-0000000000a9' AND w.workflow_type = 'reminder'$$,
    $$SELECT 'pending', now() + interval '2 hours', now()$$,
    'the reminder workflow records the starts_at it is for; its event is due now');

SELECT is(pg_temp.reactivations('70000000-0000-0000-0000-000000000005'), 1,
          'a patient whose last visit is 40 days old, with nothing booked, gets patient.reactivation');
SELECT results_eq(
    $$SELECT w.workflow_type, w.status, w.appointment_id FROM barnum.whatsapp_workflows w
       WHERE w.patient_id = '70000000-0000-0000-0000-000000000005'$$,
    $$VALUES ('reactivation', 'pending', NULL::uuid)$$,
    'with a pending reactivation workflow');
SELECT is(pg_temp.reactivations('70000000-0000-0000-0000-000000000006'), 0, 'no reactivation for a patient with a future appointment');
SELECT is(pg_temp.reactivations('70000000-0000-0000-0000-000000000007'), 0, 'no reactivation for a patient seen 10 days ago');
SELECT is(pg_temp.reactivations('70000000-0000-0000-0000-000000000008'), 0, 'no reactivation for an opted-out patient');
SELECT is((SELECT (result ->> 'reactivations')::int FROM ticks WHERE label = 'A1'), 2,
          'tick counted two reactivations (patients 5 and 10)');

SELECT is((SELECT (result ->> 'events_purged')::int FROM ticks WHERE label = 'A1'), 3,
          'tick purged the three finished events older than retention');
SELECT is_empty($$SELECT 1 FROM barnum.whatsapp_events WHERE id IN ('70000000-0000-0000-0000-0000000000b1',
                  '70000000-0000-0000-0000-0000000000b2', '70000000-0000-0000-0000-0000000000b3')$$,
                'sent / skipped / dead_letter events older than 90 days are gone');
SELECT is_empty($$SELECT 1 FROM barnum.webhook_deliveries WHERE event_id IN ('70000000-0000-0000-0000-0000000000b1',
                  '70000000-0000-0000-0000-0000000000b2', '70000000-0000-0000-0000-0000000000b3')$$,
                'their deliveries are gone too');
SELECT is_empty($$SELECT 1 FROM barnum.webhook_attempts a LEFT JOIN barnum.webhook_deliveries d ON d.id = a.delivery_id
                   WHERE d.id IS NULL$$,
                'no orphaned webhook_attempts remain');
SELECT ok(EXISTS (SELECT 1 FROM barnum.whatsapp_events WHERE id = '70000000-0000-0000-0000-0000000000b4'),
          'an old event that is still pending is kept');
SELECT ok(EXISTS (SELECT 1 FROM barnum.whatsapp_events WHERE id = '70000000-0000-0000-0000-0000000000b5'),
          'a sent event younger than retention is kept');
SELECT is_empty($$SELECT 1 FROM barnum.whatsapp_action_tokens WHERE expires_at < now() - interval '90 days'$$,
                'action tokens expired longer than retention are purged');

INSERT INTO ticks VALUES ('A2', barnum.tick());
SELECT is((SELECT (result ->> 'reminders')::int + (result ->> 'reactivations')::int + (result ->> 'events_purged')::int
             FROM ticks WHERE label = 'A2'), 0, 'a second tick at the same time does nothing (idempotent)');
SELECT is(pg_temp.reminders('70000000-0000-0000-0000-0000000000a9'), 1, 'still one reminder');
SELECT is(pg_temp.reactivations('70000000-0000-0000-0000-000000000005'), 1, 'still one reactivation');

-- Patient 10 was asked too, but books before the message goes out.
SELECT is(pg_temp.reactivations('70000000-0000-0000-0000-000000000010'), 1, 'patient 10 was asked to come back');
INSERT INTO barnum.appointments (id, patient_id, starts_at) VALUES
    ('70000000-0000-0000-0000-0000000000aa', '70000000-0000-0000-0000-000000000010', now() + interval '5 days');

-- ============================================================ phase B: clock = now + 7 h
DO $$ BEGIN PERFORM pg_temp.at('7 hours'); END $$;
INSERT INTO ticks VALUES ('B1', barnum.tick());
SELECT is(pg_temp.reminders('70000000-0000-0000-0000-0000000000a1'), 1,
          'the appointment entering the 24 h window (23 h away) gets one appointment.reminder');
SELECT results_eq(
    $$SELECT status, (metadata ->> 'starts_at')::timestamptz FROM barnum.whatsapp_workflows
       WHERE appointment_id = '70000000-0000-0000-0000-0000000000a1' AND workflow_type = 'reminder'$$,
    $$SELECT 'pending', now() + interval '30 hours'$$,
    'its reminder workflow is pending, for the current starts_at');
SELECT is(pg_temp.reminders('70000000-0000-0000-0000-0000000000a2'), 0, 'no reminder event for an opted-out patient');
SELECT is(pg_temp.reminders('70000000-0000-0000-0000-0000000000a3'), 0, 'no reminder event for a patient without phone');
SELECT is(pg_temp.reminders('70000000-0000-0000-0000-0000000000a4'), 0, 'no reminder for a cancelled appointment');
SELECT is_empty($$SELECT 1 FROM barnum.whatsapp_workflows
                   WHERE appointment_id IN ('70000000-0000-0000-0000-0000000000a2', '70000000-0000-0000-0000-0000000000a3',
                                            '70000000-0000-0000-0000-0000000000a4')
                     AND workflow_type = 'reminder' AND status IN ('pending', 'sent')$$,
                'no open reminder workflow for opted-out, phoneless or cancelled appointments');
SELECT is((SELECT status FROM barnum.whatsapp_workflows
            WHERE appointment_id = '70000000-0000-0000-0000-0000000000a9' AND workflow_type = 'pre_confirmation'),
          'expired', 'a sent workflow of an appointment now in the past is expired');
SELECT is((SELECT status FROM barnum.whatsapp_workflows
            WHERE appointment_id = '70000000-0000-0000-0000-0000000000a1' AND workflow_type = 'pre_confirmation'),
          'sent', 'a sent workflow of an upcoming appointment stays sent');
SELECT cmp_ok((SELECT (result ->> 'workflows_expired')::int FROM ticks WHERE label = 'B1'), '>=', 1,
              'tick counted the expired workflow');
INSERT INTO ticks VALUES ('B2', barnum.tick());
SELECT is(pg_temp.reminders('70000000-0000-0000-0000-0000000000a1'), 1, 'a second tick creates no second reminder');

-- ============================================================ phase C: reschedule inside the window
UPDATE barnum.appointments SET starts_at = now() + interval '30 hours 30 minutes'
 WHERE id = '70000000-0000-0000-0000-0000000000a1';
SELECT is((SELECT status FROM barnum.whatsapp_workflows
            WHERE appointment_id = '70000000-0000-0000-0000-0000000000a1' AND workflow_type = 'reminder'), 'cancelled',
          'rescheduling voids the reminder for the old time');
INSERT INTO ticks VALUES ('C1', barnum.tick());
SELECT is(pg_temp.reminders('70000000-0000-0000-0000-0000000000a1'), 2, 'after the reschedule tick creates a new reminder');
SELECT results_eq(
    $$SELECT (metadata ->> 'starts_at')::timestamptz FROM barnum.whatsapp_workflows
       WHERE appointment_id = '70000000-0000-0000-0000-0000000000a1' AND workflow_type = 'reminder' AND status = 'pending'$$,
    $$SELECT now() + interval '30 hours 30 minutes'$$,
    'the new reminder is for the new starts_at');

INSERT INTO claimed SELECT * FROM barnum.claim_deliveries('tick-test', 100);
SELECT results_eq(
    $$SELECT d.status, d.last_error IS NOT NULL FROM barnum.webhook_deliveries d JOIN barnum.whatsapp_events e ON e.id = d.event_id
        JOIN barnum.whatsapp_workflows w ON w.id = e.workflow_id
       WHERE e.entity_id = '70000000-0000-0000-0000-0000000000a1' AND e.event_type = 'appointment.reminder'
         AND w.status = 'cancelled'$$,
    $$VALUES ('skipped', true)$$,
    'the old reminder''s delivery is skipped at claim, with a reason');
SELECT results_eq(
    $$SELECT c.payload #>> '{appointment,starts_at}' FROM claimed c
       WHERE c.event_type = 'appointment.reminder' AND c.payload ->> 'entity_id' = '70000000-0000-0000-0000-0000000000a1'$$,
    $$SELECT to_jsonb(now() + interval '30 hours 30 minutes') #>> '{}'$$,
    'only the new reminder is delivered, showing the new time');
SELECT is((SELECT count(*)::int FROM claimed WHERE event_type = 'patient.reactivation'
             AND payload #>> '{patient,id}' = '70000000-0000-0000-0000-000000000005'), 1,
          'the reactivation is delivered with the patient payload');
SELECT results_eq(
    $$SELECT d.status, d.last_error FROM barnum.webhook_deliveries d JOIN barnum.whatsapp_events e ON e.id = d.event_id
       WHERE e.entity_id = '70000000-0000-0000-0000-000000000010' AND e.event_type = 'patient.reactivation'$$,
    $$VALUES ('skipped', 'patient has a future appointment')$$,
    'the reactivation of a patient who booked meanwhile is skipped at claim');
SELECT is_empty($$SELECT 1 FROM barnum.whatsapp_workflows
                   WHERE patient_id = '70000000-0000-0000-0000-000000000010' AND workflow_type = 'reactivation'
                     AND status IN ('pending', 'sent')$$,
                'a workflow whose only message was skipped is not left open');

-- ============================================================ phase D: reactivation period
UPDATE barnum.whatsapp_workflows SET status = 'completed'
 WHERE patient_id = '70000000-0000-0000-0000-000000000005' AND workflow_type = 'reactivation';
INSERT INTO ticks VALUES ('D1', barnum.tick());
SELECT is(pg_temp.reactivations('70000000-0000-0000-0000-000000000005'), 1,
          'no new reactivation within reactivation_after of the last one, even once answered');
DO $$ BEGIN PERFORM pg_temp.at('31 days'); END $$;
INSERT INTO ticks VALUES ('D2', barnum.tick());
SELECT is(pg_temp.reactivations('70000000-0000-0000-0000-000000000005'), 2,
          'after reactivation_after has passed the still-inactive patient is asked again');
SELECT is(pg_temp.reactivations('70000000-0000-0000-0000-000000000006'), 1,
          'once the booked appointment is in the past, that inactive patient is asked too');
SELECT is(pg_temp.reactivations('70000000-0000-0000-0000-000000000010'), 2,
          'a skipped reactivation does not block the next one once reactivation_after has passed');

-- ============================================================ retention in bounded batches
DO $$ BEGIN PERFORM pg_temp.at('0'); END $$;
INSERT INTO barnum.whatsapp_events (id, event_type, entity_type, entity_id, status, created_at) VALUES
    ('70000000-0000-0000-0000-0000000000c1', 'appointment.confirmed', 'appointment', '70000000-0000-0000-0000-0000000000a1', 'sent', now() - interval '200 days'),
    ('70000000-0000-0000-0000-0000000000c2', 'appointment.confirmed', 'appointment', '70000000-0000-0000-0000-0000000000a1', 'sent', now() - interval '199 days');
INSERT INTO ticks VALUES ('E1', barnum.tick(1));
SELECT is((SELECT (result ->> 'events_purged')::int FROM ticks WHERE label = 'E1'), 1, 'tick(1) purges at most one event');
SELECT ok(NOT EXISTS (SELECT 1 FROM barnum.whatsapp_events WHERE id = '70000000-0000-0000-0000-0000000000c1')
          AND EXISTS (SELECT 1 FROM barnum.whatsapp_events WHERE id = '70000000-0000-0000-0000-0000000000c2'),
          'the oldest goes first');

-- ============================================================ the window follows reminder_lead; confirmed counts
INSERT INTO barnum.appointments (id, patient_id, starts_at, status) VALUES
    ('70000000-0000-0000-0000-0000000000a5', '70000000-0000-0000-0000-000000000001', now() + interval '40 hours', 'confirmed');
INSERT INTO ticks VALUES ('F1', barnum.tick());
SELECT is(pg_temp.reminders('70000000-0000-0000-0000-0000000000a5'), 0, 'no reminder 40 h ahead with reminder_lead 24 h');
UPDATE barnum.settings SET value = '"48 hours"' WHERE key = 'reminder_lead';
INSERT INTO ticks VALUES ('F2', barnum.tick());
SELECT is(pg_temp.reminders('70000000-0000-0000-0000-0000000000a5'), 1,
          'after reminder_lead is raised to 48 h the confirmed appointment gets its reminder');

-- ============================================================ expiry time on the workflow row
SELECT is((SELECT expires_at FROM barnum.whatsapp_workflows
            WHERE appointment_id = '70000000-0000-0000-0000-0000000000a5' AND workflow_type = 'pre_confirmation'),
          now() + interval '40 hours', 'a confirmation request expires when its appointment starts');
SELECT is((SELECT expires_at FROM barnum.whatsapp_workflows
            WHERE appointment_id = '70000000-0000-0000-0000-0000000000a5' AND workflow_type = 'reminder'),
          now() + interval '40 hours', 'a reminder expires when its appointment starts');
-- Expiry is bounded per tick: three due sent workflows, batch of 2.
INSERT INTO barnum.appointments (id, patient_id, starts_at) VALUES
    ('70000000-0000-0000-0000-0000000000b1', '70000000-0000-0000-0000-000000000001', now() + interval '50 hours'),
    ('70000000-0000-0000-0000-0000000000b2', '70000000-0000-0000-0000-000000000001', now() + interval '51 hours'),
    ('70000000-0000-0000-0000-0000000000b3', '70000000-0000-0000-0000-000000000001', now() + interval '52 hours');
UPDATE barnum.whatsapp_workflows SET status = 'sent'
 WHERE appointment_id IN ('70000000-0000-0000-0000-0000000000b1', '70000000-0000-0000-0000-0000000000b2',
                          '70000000-0000-0000-0000-0000000000b3') AND workflow_type = 'pre_confirmation';
DO $$ BEGIN PERFORM pg_temp.at('53 hours'); END $$;
INSERT INTO ticks VALUES ('G1', barnum.tick(2));
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_workflows
            WHERE appointment_id IN ('70000000-0000-0000-0000-0000000000b1', '70000000-0000-0000-0000-0000000000b2',
                                     '70000000-0000-0000-0000-0000000000b3') AND status = 'expired'),
          2, 'tick(2) expires at most two workflows');
SELECT is((SELECT status FROM barnum.whatsapp_workflows
            WHERE appointment_id = '70000000-0000-0000-0000-0000000000b3' AND workflow_type = 'pre_confirmation'),
          'sent', 'the latest-starting one waits for the next tick (oldest first)');
INSERT INTO ticks VALUES ('G2', barnum.tick(2));
SELECT is((SELECT status FROM barnum.whatsapp_workflows
            WHERE appointment_id = '70000000-0000-0000-0000-0000000000b3' AND workflow_type = 'pre_confirmation'),
          'expired', 'the next tick expires the rest');

SELECT * FROM finish();
ROLLBACK;

-- 40_relay: claim_deliveries / record_attempts / release_deliveries /
-- next_due_at / retry_dead_letters / queue_stats (SPEC §2.4, §2.6 relay-facing).
-- The clock moves forward scenario by scenario; each scenario uses its own rows.
BEGIN;
SELECT plan(143);

SET LOCAL barnum.clock = '2030-01-10 10:00:00+00';

-- ------------------------------------------------------------ helpers
-- The delivery of an appointment's event of a type.
CREATE FUNCTION pg_temp.did(p_entity uuid, p_type text) RETURNS bigint LANGUAGE sql AS $$
    SELECT d.id FROM barnum.webhook_deliveries d JOIN barnum.whatsapp_events e ON e.id = d.event_id
     WHERE e.entity_id = p_entity AND e.event_type = p_type $$;
CREATE FUNCTION pg_temp.dl(p_id bigint) RETURNS barnum.webhook_deliveries LANGUAGE sql AS $$
    SELECT * FROM barnum.webhook_deliveries WHERE id = p_id $$;
CREATE FUNCTION pg_temp.ev(p_id bigint) RETURNS barnum.whatsapp_events LANGUAGE sql AS $$
    SELECT e.* FROM barnum.whatsapp_events e JOIN barnum.webhook_deliveries d ON d.event_id = e.id WHERE d.id = p_id $$;
CREATE FUNCTION pg_temp.wf(p_id bigint) RETURNS barnum.whatsapp_workflows LANGUAGE sql AS $$
    SELECT w.* FROM barnum.whatsapp_workflows w JOIN barnum.whatsapp_events e ON e.workflow_id = w.id
      JOIN barnum.webhook_deliveries d ON d.event_id = e.id WHERE d.id = p_id $$;
-- Report one HTTP outcome.
CREATE FUNCTION pg_temp.rec(p_id bigint, p_attempt int, p_ok boolean, p_retryable boolean, p_http int,
                            p_extra jsonb DEFAULT '{}') RETURNS int LANGUAGE sql AS $$
    SELECT barnum.record_attempts(jsonb_build_array(jsonb_build_object(
        'delivery_id', p_id, 'attempt', p_attempt, 'ok', p_ok, 'retryable', p_retryable,
        'http_status', p_http, 'duration_ms', 25) || p_extra)) $$;
-- Every claim's rows, labelled.
CREATE TEMP TABLE claimed (label text, delivery_id bigint, event_id uuid, event_type text, endpoint_id uuid,
                           url text, secret text, attempt int, timeout_ms int, payload jsonb) ON COMMIT DROP;
CREATE FUNCTION pg_temp.claim(p_label text, p_worker text, p_lease interval DEFAULT '60 seconds', p_limit int DEFAULT 50)
RETURNS int LANGUAGE sql AS $$
    WITH c AS (INSERT INTO claimed SELECT p_label, c.* FROM barnum.claim_deliveries(p_worker, p_limit, p_lease) c RETURNING 1)
    SELECT count(*)::int FROM c $$;

-- ------------------------------------------------------------ fixtures
UPDATE barnum.settings SET value = '"https://clinic.example"' WHERE key = 'public_base_url';
UPDATE barnum.settings SET value = '"America/Sao_Paulo"' WHERE key = 'timezone';

INSERT INTO barnum.patients (id, name, phone) VALUES
    ('40000000-0000-0000-0000-000000000001', 'João Silva', '+351912345678'),
    ('40000000-0000-0000-0000-000000000003', 'Inactive Patient', '+351940000003'),
    ('40000000-0000-0000-0000-000000000004', 'Later OptOut', '+351940000004');
INSERT INTO barnum.professionals (id, name) VALUES ('40000000-0000-0000-0000-0000000000f1', 'Dr. Maria Santos');
INSERT INTO barnum.specialties (id, name) VALUES ('40000000-0000-0000-0000-0000000000f2', 'Medicina Dentária');

SELECT is(barnum.next_due_at(), NULL, 'next_due_at is NULL when nothing is queued');
SELECT ok(barnum.queue_stats() ?& ARRAY['pending', 'due', 'processing', 'dead_letter', 'oldest_due_age_seconds', 'next_due_at'],
          'queue_stats has keys pending, due, processing, dead_letter, oldest_due_age_seconds, next_due_at');

INSERT INTO barnum.webhook_endpoints (id, name, url, secret, event_types, timeout_ms) VALUES
    ('40000000-0000-0000-0000-0000000000e1', 'n8n', 'https://hooks.example/in/{event_type}', 's3cret', '{appointment.*}', 5000);
INSERT INTO barnum.webhook_endpoints (id, name, url, secret, event_types, max_attempts) VALUES
    ('40000000-0000-0000-0000-0000000000e2', 'patients', 'https://hooks.example/patients', NULL, '{patient.*}', 2);

-- ============================================================ 1. claim renders the payload
INSERT INTO barnum.appointments (id, patient_id, professional_id, specialty_id, starts_at) VALUES
    ('40000000-0000-0000-0000-0000000000a1', '40000000-0000-0000-0000-000000000001',
     '40000000-0000-0000-0000-0000000000f1', '40000000-0000-0000-0000-0000000000f2', '2030-07-01 01:30+00');

SELECT is(barnum.next_due_at(), '2030-01-10 10:00+00'::timestamptz, 'next_due_at is the due time of the pending delivery');
SELECT is(pg_temp.claim('c1', 'w1'), 1, 'claim_deliveries returns the one due delivery');
SELECT results_eq(
    $$SELECT delivery_id, event_type, endpoint_id, attempt, timeout_ms FROM claimed WHERE label = 'c1'$$,
    $$SELECT pg_temp.did('40000000-0000-0000-0000-0000000000a1', 'appointment.pre_confirmed'), 'appointment.pre_confirmed',
             '40000000-0000-0000-0000-0000000000e1'::uuid, 1, 5000$$,
    'the claim row carries delivery, event type, endpoint, attempt 1 and the endpoint timeout');
SELECT is((SELECT url FROM claimed WHERE label = 'c1'), 'https://hooks.example/in/appointment.pre_confirmed',
          '{event_type} in the endpoint URL is replaced by the event type');
SELECT is((SELECT secret FROM claimed WHERE label = 'c1'), 's3cret', 'the endpoint secret is passed to the relay');
SELECT results_eq(
    $$SELECT c.payload ->> 'event_id', c.payload ->> 'event_type', c.payload ->> 'entity_id', c.payload ->> 'workflow_id'
        FROM claimed c WHERE label = 'c1'$$,
    $$SELECT e.id::text, 'appointment.pre_confirmed', '40000000-0000-0000-0000-0000000000a1', e.workflow_id::text
        FROM barnum.whatsapp_events e WHERE e.entity_id = '40000000-0000-0000-0000-0000000000a1'$$,
    'payload has event_id, event_type, entity_id and workflow_id');
SELECT ok((SELECT (payload ->> 'workflow_id') IS NOT NULL FROM claimed WHERE label = 'c1'),
          'the pre_confirmed payload names its workflow');
SELECT matches((SELECT payload ->> 'created_at' FROM claimed WHERE label = 'c1'), '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$',
               'payload created_at is ISO 8601 UTC');
SELECT results_eq(
    $$SELECT payload #>> '{appointment,date}', payload #>> '{appointment,time}' FROM claimed WHERE label = 'c1'$$,
    $$VALUES ('2030-06-30', '22:30')$$,
    'appointment date/time are rendered in the clinic time zone setting (America/Sao_Paulo)');
SELECT results_eq(
    $$SELECT payload #>> '{appointment,id}', payload #>> '{appointment,status}', payload #>> '{appointment,patient,name}',
             payload #>> '{appointment,patient,phone}', payload #>> '{appointment,professional,name}',
             payload #>> '{appointment,specialty,name}'
        FROM claimed WHERE label = 'c1'$$,
    $$VALUES ('40000000-0000-0000-0000-0000000000a1', 'scheduled', 'João Silva', '+351912345678',
              'Dr. Maria Santos', 'Medicina Dentária')$$,
    'payload appointment has id, status, patient name/phone, professional and specialty');
SELECT results_eq(
    $$SELECT array_agg(k ORDER BY k) FROM claimed, jsonb_object_keys(payload -> 'action_links') k WHERE label = 'c1'$$,
    $$VALUES (ARRAY['cancel', 'confirm', 'reschedule'])$$,
    'a pre_confirmed payload has three action links: confirm, cancel, reschedule');
SELECT is(
    (SELECT count(*)::int FROM claimed, jsonb_each_text(payload -> 'action_links') l
      WHERE label = 'c1' AND l.value LIKE 'https://clinic.example/api/action?type=' || l.key || '&token=%'),
    3, 'each link is public_base_url + /api/action?type=<action>&token=…');
SELECT is(
    (SELECT count(*)::int FROM claimed, jsonb_each_text(payload -> 'action_links') l,
            barnum.validate_action_token(substring(l.value FROM 'token=(.*)$')) v
      WHERE label = 'c1' AND v.valid AND v.action_type = l.key
        AND v.appointment_id = '40000000-0000-0000-0000-0000000000a1'),
    3, 'each link''s token is valid for its action and appointment');
SELECT results_eq(
    $$SELECT DISTINCT t.expires_at FROM claimed, jsonb_each_text(payload -> 'action_links') l, barnum.whatsapp_action_tokens t
       WHERE label = 'c1' AND t.token_hash = sha256(convert_to(substring(l.value FROM 'token=(.*)$'), 'UTF8'))$$,
    $$VALUES ('2030-01-17 10:00+00'::timestamptz)$$,
    'link tokens expire after token_ttl (7 days)');
SELECT results_eq(
    $$SELECT status, attempts, locked_by, locked_until FROM barnum.webhook_deliveries
       WHERE id = pg_temp.did('40000000-0000-0000-0000-0000000000a1', 'appointment.pre_confirmed')$$,
    $$VALUES ('processing', 1, 'w1', '2030-01-10 10:01:00+00'::timestamptz)$$,
    'the claimed delivery is processing, attempt 1, leased to the worker until clock + lease');
SELECT is((pg_temp.ev(pg_temp.did('40000000-0000-0000-0000-0000000000a1', 'appointment.pre_confirmed'))).status,
          'processing', 'the event is processing while a delivery is claimed');
SELECT is(pg_temp.claim('c1b', 'w2'), 0, 'a second claim gets nothing: the row is already claimed');
SELECT is((barnum.queue_stats() ->> 'processing')::int, 1, 'queue_stats counts the processing delivery');

-- ============================================================ 2. success
SELECT is(pg_temp.rec(pg_temp.did('40000000-0000-0000-0000-0000000000a1', 'appointment.pre_confirmed'), 1, true, false, 200,
                      '{"response_body": "ok", "duration_ms": 120}'),
          1, 'record_attempts applies a success and returns 1');
SELECT results_eq(
    $$SELECT status, delivered_at, locked_by, last_http_status, last_error FROM barnum.webhook_deliveries
       WHERE id = pg_temp.did('40000000-0000-0000-0000-0000000000a1', 'appointment.pre_confirmed')$$,
    $$VALUES ('sent', '2030-01-10 10:00+00'::timestamptz, NULL::text, 200, NULL::text)$$,
    'success: the delivery is sent, delivered_at set, lease cleared');
SELECT results_eq(
    $$SELECT status, processed_at IS NOT NULL FROM barnum.whatsapp_events
       WHERE entity_id = '40000000-0000-0000-0000-0000000000a1'$$,
    $$VALUES ('sent', true)$$,
    'success: the event is sent and processed');
SELECT is((pg_temp.wf(pg_temp.did('40000000-0000-0000-0000-0000000000a1', 'appointment.pre_confirmed'))).status,
          'sent', 'success: the workflow is sent');
SELECT results_eq(
    $$SELECT attempt, http_status, duration_ms, response_body, error FROM barnum.webhook_attempts
       WHERE delivery_id = pg_temp.did('40000000-0000-0000-0000-0000000000a1', 'appointment.pre_confirmed')$$,
    $$VALUES (1, 200, 120, 'ok', NULL::text)$$,
    'success: one webhook_attempts row with status, duration and body');
SELECT is(pg_temp.rec(pg_temp.did('40000000-0000-0000-0000-0000000000a1', 'appointment.pre_confirmed'), 1, false, true, 500),
          0, 'a late second report for a finished delivery is ignored');

-- ============================================================ 3. lease expiry and fencing
INSERT INTO barnum.appointments (id, patient_id, starts_at)
VALUES ('40000000-0000-0000-0000-0000000000a2', '40000000-0000-0000-0000-000000000001', '2030-01-20 09:00+00');
SELECT is(pg_temp.claim('c3', 'w-slow', '30 seconds'), 1, 'the slow worker claims the delivery');
SET LOCAL barnum.clock = '2030-01-10 10:00:20+00';
SELECT is(pg_temp.claim('c3a', 'w-fast'), 0, 'a live lease is not reclaimed');
SET LOCAL barnum.clock = '2030-01-10 10:00:31+00';
SELECT is(pg_temp.claim('c3b', 'w-fast'), 1, 'after the lease expired the delivery is claimed again');
SELECT results_eq(
    $$SELECT attempt FROM claimed WHERE label IN ('c3', 'c3b') ORDER BY label$$,
    $$VALUES (1), (2)$$,
    'the reclaim carries attempt + 1');
SELECT results_eq(
    $$SELECT status, attempts, locked_by FROM barnum.webhook_deliveries
       WHERE id = pg_temp.did('40000000-0000-0000-0000-0000000000a2', 'appointment.pre_confirmed')$$,
    $$VALUES ('processing', 2, 'w-fast')$$,
    'the delivery is now leased to the new worker with attempt 2');
SELECT ok(EXISTS (SELECT 1 FROM barnum.webhook_attempts
                   WHERE delivery_id = pg_temp.did('40000000-0000-0000-0000-0000000000a2', 'appointment.pre_confirmed')
                     AND attempt = 1 AND error LIKE '%lease expired%'),
          'the lost attempt 1 is written to webhook_attempts');
SELECT is(pg_temp.rec(pg_temp.did('40000000-0000-0000-0000-0000000000a2', 'appointment.pre_confirmed'), 1, true, false, 200),
          0, 'fencing: the slow worker''s result for attempt 1 is ignored');
SELECT is((pg_temp.dl(pg_temp.did('40000000-0000-0000-0000-0000000000a2', 'appointment.pre_confirmed'))).status,
          'processing', 'fencing: the stale result did not change the delivery');
SELECT is(pg_temp.rec(pg_temp.did('40000000-0000-0000-0000-0000000000a2', 'appointment.pre_confirmed'), 2, true, false, 200),
          1, 'the current holder''s result for attempt 2 applies');
SELECT is((pg_temp.dl(pg_temp.did('40000000-0000-0000-0000-0000000000a2', 'appointment.pre_confirmed'))).status,
          'sent', 'the delivery is sent by attempt 2');

-- ============================================================ 4. retryable failures, backoff, max attempts
SET LOCAL barnum.clock = '2030-01-10 10:01:00+00';
INSERT INTO barnum.appointments (id, patient_id, starts_at)
VALUES ('40000000-0000-0000-0000-0000000000a3', '40000000-0000-0000-0000-000000000001', '2030-01-20 10:00+00');
SELECT is(pg_temp.claim('c4', 'w1'), 1, 'claim the delivery for the retry scenario');
SELECT is(pg_temp.rec(pg_temp.did('40000000-0000-0000-0000-0000000000a3', 'appointment.pre_confirmed'), 1, false, true, 503),
          1, 'a retryable failure is recorded');
SELECT results_eq(
    $$SELECT status, attempts, locked_by, last_http_status, last_error IS NOT NULL FROM barnum.webhook_deliveries
       WHERE id = pg_temp.did('40000000-0000-0000-0000-0000000000a3', 'appointment.pre_confirmed')$$,
    $$VALUES ('pending', 1, NULL::text, 503, true)$$,
    'retryable failure: back to pending, lease cleared, status and error kept');
SELECT ok((pg_temp.dl(pg_temp.did('40000000-0000-0000-0000-0000000000a3', 'appointment.pre_confirmed'))).next_attempt_at
          BETWEEN '2030-01-10 10:01:04+00' AND '2030-01-10 10:01:06+00',
          'retry 1 waits base 5 s ±20 % (4–6 s)');
SELECT is((pg_temp.ev(pg_temp.did('40000000-0000-0000-0000-0000000000a3', 'appointment.pre_confirmed'))).status,
          'pending', 'the event is pending again while a retry is scheduled');
SELECT is((pg_temp.wf(pg_temp.did('40000000-0000-0000-0000-0000000000a3', 'appointment.pre_confirmed'))).status,
          'pending', 'the workflow stays pending during retries');
SELECT is(pg_temp.claim('c4a', 'w1'), 0, 'the retry is not claimable before its backoff');

SET LOCAL barnum.clock = '2030-01-10 10:01:10+00';
SELECT is(pg_temp.claim('c4b', 'w1'), 1, 'after the backoff the delivery is claimed again');
SELECT is((SELECT attempt FROM claimed WHERE label = 'c4b'), 2, 'the second claim is attempt 2');
SELECT is(pg_temp.rec(pg_temp.did('40000000-0000-0000-0000-0000000000a3', 'appointment.pre_confirmed'), 2, false, true, NULL,
                      '{"error": "connection refused"}'), 1, 'a second retryable failure is recorded');
SELECT ok((pg_temp.dl(pg_temp.did('40000000-0000-0000-0000-0000000000a3', 'appointment.pre_confirmed'))).next_attempt_at
          BETWEEN '2030-01-10 10:01:18+00' AND '2030-01-10 10:01:22+00',
          'retry 2 waits 10 s ±20 % (8–12 s)');
SELECT is((pg_temp.dl(pg_temp.did('40000000-0000-0000-0000-0000000000a3', 'appointment.pre_confirmed'))).last_error,
          'connection refused', 'the reported error is kept in last_error');

SET LOCAL barnum.clock = '2030-01-10 10:01:40+00';
SELECT is(pg_temp.claim('c4c', 'w1'), 1, 'third claim');
SELECT is(pg_temp.rec(pg_temp.did('40000000-0000-0000-0000-0000000000a3', 'appointment.pre_confirmed'), 3, false, true, 502),
          1, 'a third retryable failure is recorded');
SELECT ok((pg_temp.dl(pg_temp.did('40000000-0000-0000-0000-0000000000a3', 'appointment.pre_confirmed'))).next_attempt_at
          BETWEEN '2030-01-10 10:01:56+00' AND '2030-01-10 10:02:04+00',
          'retry 3 waits 20 s ±20 % (16–24 s)');
SELECT is((pg_temp.ev(pg_temp.did('40000000-0000-0000-0000-0000000000a3', 'appointment.pre_confirmed'))).retry_count,
          2, 'the event''s retry_count follows the attempts (2 retries so far)');

SET LOCAL barnum.clock = '2030-01-10 10:02:10+00';
SELECT is(pg_temp.claim('c4d', 'w1'), 1, 'fourth claim');
SELECT is((SELECT attempt FROM claimed WHERE label = 'c4d'), 4, 'the fourth claim is attempt 4');
SELECT is(pg_temp.rec(pg_temp.did('40000000-0000-0000-0000-0000000000a3', 'appointment.pre_confirmed'), 4, false, true, 503),
          1, 'the failure of the last allowed attempt is recorded');
SELECT results_eq(
    $$SELECT status, attempts FROM barnum.webhook_deliveries
       WHERE id = pg_temp.did('40000000-0000-0000-0000-0000000000a3', 'appointment.pre_confirmed')$$,
    $$VALUES ('dead_letter', 4)$$,
    'after max_attempts (4) the delivery is a dead letter');
SELECT is((pg_temp.ev(pg_temp.did('40000000-0000-0000-0000-0000000000a3', 'appointment.pre_confirmed'))).status,
          'dead_letter', 'the event is a dead letter');
SELECT is((pg_temp.wf(pg_temp.did('40000000-0000-0000-0000-0000000000a3', 'appointment.pre_confirmed'))).status,
          'failed', 'the workflow of a dead event is failed');
SELECT is((SELECT count(*)::int FROM barnum.webhook_attempts
            WHERE delivery_id = pg_temp.did('40000000-0000-0000-0000-0000000000a3', 'appointment.pre_confirmed')),
          4, 'four webhook_attempts rows were written');

-- ============================================================ 5. Retry-After
SET LOCAL barnum.clock = '2030-01-10 10:03:00+00';
INSERT INTO barnum.appointments (id, patient_id, starts_at)
VALUES ('40000000-0000-0000-0000-0000000000a4', '40000000-0000-0000-0000-000000000001', '2030-01-20 11:00+00');
SELECT is(pg_temp.claim('c5', 'w1'), 1, 'claim for the Retry-After scenario');
SELECT is(pg_temp.rec(pg_temp.did('40000000-0000-0000-0000-0000000000a4', 'appointment.pre_confirmed'), 1, false, true, 429,
                      '{"retry_after_seconds": 120}'), 1, 'a 429 with Retry-After is recorded');
SELECT is((pg_temp.dl(pg_temp.did('40000000-0000-0000-0000-0000000000a4', 'appointment.pre_confirmed'))).next_attempt_at,
          '2030-01-10 10:05:00+00'::timestamptz, 'a Retry-After larger than the backoff is honoured');
SELECT is(barnum.next_due_at(), '2030-01-10 10:05:00+00'::timestamptz,
          'next_due_at is the earliest pending due time');
SELECT results_eq(
    $$SELECT (s ->> 'pending')::int, (s ->> 'due')::int, (s ->> 'processing')::int, (s ->> 'dead_letter')::int
        FROM barnum.queue_stats() s$$,
    $$VALUES (1, 0, 0, 1)$$,
    'queue_stats: 1 pending (not due), 0 processing, 1 dead letter');

-- ============================================================ 6. non-retryable failure
SET LOCAL barnum.clock = '2030-01-10 10:06:00+00';
INSERT INTO barnum.appointments (id, patient_id, starts_at)
VALUES ('40000000-0000-0000-0000-0000000000a5', '40000000-0000-0000-0000-000000000001', '2030-01-20 12:00+00');
SELECT is(pg_temp.claim('c6', 'w1'), 2, 'claim returns the new delivery and the retry now due');
SELECT is(barnum.record_attempts(jsonb_build_array(
    jsonb_build_object('delivery_id', pg_temp.did('40000000-0000-0000-0000-0000000000a5', 'appointment.pre_confirmed'),
                       'attempt', 1, 'ok', false, 'retryable', false, 'http_status', 400, 'error', 'HTTP 400',
                       'response_body', repeat('x', 5000)),
    jsonb_build_object('delivery_id', pg_temp.did('40000000-0000-0000-0000-0000000000a4', 'appointment.pre_confirmed'),
                       'attempt', 2, 'ok', true, 'http_status', 204))),
    2, 'record_attempts applies a whole batch in one call');
SELECT results_eq(
    $$SELECT status, attempts, last_http_status FROM barnum.webhook_deliveries
       WHERE id = pg_temp.did('40000000-0000-0000-0000-0000000000a5', 'appointment.pre_confirmed')$$,
    $$VALUES ('dead_letter', 1, 400)$$,
    'a non-retryable 4xx is a dead letter after one attempt');
SELECT is((pg_temp.wf(pg_temp.did('40000000-0000-0000-0000-0000000000a5', 'appointment.pre_confirmed'))).status,
          'failed', 'its workflow is failed');
SELECT is((pg_temp.dl(pg_temp.did('40000000-0000-0000-0000-0000000000a4', 'appointment.pre_confirmed'))).status,
          'sent', 'the other result of the batch was applied too');
SELECT is((SELECT length(response_body) FROM barnum.webhook_attempts
            WHERE delivery_id = pg_temp.did('40000000-0000-0000-0000-0000000000a5', 'appointment.pre_confirmed')),
          4096, 'webhook_attempts keeps the first 4 KiB of the response body');

-- ============================================================ 7. endpoint max_attempts override, patient payload
SET LOCAL barnum.clock = '2030-01-10 10:07:00+00';
SELECT isnt(barnum.create_whatsapp_event('patient.reactivation', 'patient', '40000000-0000-0000-0000-000000000003'),
            NULL, 'a patient.reactivation event is created');
SELECT is(pg_temp.claim('c7', 'w1'), 1, 'claim the patient event');
SELECT is((SELECT secret FROM claimed WHERE label = 'c7'), NULL, 'an endpoint without secret passes NULL (the relay''s WEBHOOK_SECRET)');
SELECT is((SELECT url FROM claimed WHERE label = 'c7'), 'https://hooks.example/patients', 'a URL without placeholder is passed as is');
SELECT results_eq(
    $$SELECT payload #>> '{patient,id}', payload #>> '{patient,phone}', payload ? 'appointment' FROM claimed WHERE label = 'c7'$$,
    $$VALUES ('40000000-0000-0000-0000-000000000003', '+351940000003', false)$$,
    'a patient event carries the patient and no appointment');
SELECT is((SELECT payload -> 'patient' FROM claimed WHERE label = 'c7'),
          '{"id": "40000000-0000-0000-0000-000000000003", "name": "Inactive Patient", "phone": "+351940000003",
            "last_visit_date": null}'::jsonb,
          'the patient object has id, name, phone and last_visit_date (none yet)');
SELECT is((SELECT payload -> 'action_links' FROM claimed WHERE label = 'c7'), '{}'::jsonb,
          'a patient event has no action links');
SELECT is(pg_temp.rec(pg_temp.did('40000000-0000-0000-0000-000000000003', 'patient.reactivation'), 1, false, true, 500), 1,
          'first failure on the max_attempts = 2 endpoint');
SELECT is((pg_temp.dl(pg_temp.did('40000000-0000-0000-0000-000000000003', 'patient.reactivation'))).status, 'pending',
          'one attempt of two: retried');
SET LOCAL barnum.clock = '2030-01-10 10:07:10+00';
SELECT is(pg_temp.claim('c7b', 'w1'), 1, 'claim the retry');
SELECT is(pg_temp.rec(pg_temp.did('40000000-0000-0000-0000-000000000003', 'patient.reactivation'), 2, false, true, 500), 1,
          'second failure on the max_attempts = 2 endpoint');
SELECT is((pg_temp.dl(pg_temp.did('40000000-0000-0000-0000-000000000003', 'patient.reactivation'))).status, 'dead_letter',
          'the endpoint''s max_attempts (2) overrides the setting (4)');

-- ============================================================ 8. stale deliveries are skipped at claim
SET LOCAL barnum.clock = '2030-01-10 10:08:00+00';
INSERT INTO barnum.appointments (id, patient_id, starts_at) VALUES
    ('40000000-0000-0000-0000-0000000000a6', '40000000-0000-0000-0000-000000000001', '2030-01-21 09:00+00'),
    ('40000000-0000-0000-0000-0000000000a7', '40000000-0000-0000-0000-000000000001', '2030-01-11 09:00+00'),
    ('40000000-0000-0000-0000-0000000000a8', '40000000-0000-0000-0000-000000000004', '2030-01-21 10:00+00');
-- a reminder for a7 (as tick() would create it)
WITH w AS (
    INSERT INTO barnum.whatsapp_workflows (workflow_type, appointment_id, patient_id, metadata)
    VALUES ('reminder', '40000000-0000-0000-0000-0000000000a7', '40000000-0000-0000-0000-000000000001',
            '{"starts_at": "2030-01-11 09:00:00+00"}') RETURNING id)
SELECT barnum.create_whatsapp_event('appointment.reminder', 'appointment', '40000000-0000-0000-0000-0000000000a7', w.id,
                                    '2030-01-10 10:08:00+00') IS NOT NULL AS created FROM w \g /dev/null
-- the pre-confirmations go out for a7 first
UPDATE barnum.webhook_deliveries SET status = 'sent'
 WHERE id = pg_temp.did('40000000-0000-0000-0000-0000000000a7', 'appointment.pre_confirmed');
UPDATE barnum.appointments SET status = 'cancelled'
 WHERE id IN ('40000000-0000-0000-0000-0000000000a6', '40000000-0000-0000-0000-0000000000a7');
UPDATE barnum.patients SET whatsapp_opt_out = true WHERE id = '40000000-0000-0000-0000-000000000004';

SELECT is(pg_temp.claim('c8', 'w1'), 2, 'only the two cancellation notices are returned');
SELECT bag_eq($$SELECT event_type, event_id FROM claimed WHERE label = 'c8'$$,
              $$SELECT event_type, id FROM barnum.whatsapp_events
                 WHERE event_type = 'appointment.cancelled'
                   AND entity_id IN ('40000000-0000-0000-0000-0000000000a6', '40000000-0000-0000-0000-0000000000a7')$$,
              'the claim returned the appointment.cancelled deliveries only');
SELECT results_eq(
    $$SELECT status, last_error FROM barnum.webhook_deliveries
       WHERE id = pg_temp.did('40000000-0000-0000-0000-0000000000a6', 'appointment.pre_confirmed')$$,
    $$VALUES ('skipped', 'appointment is cancelled')$$,
    'a pre_confirmation of an appointment cancelled before the claim is skipped with the reason');
SELECT is((pg_temp.ev(pg_temp.did('40000000-0000-0000-0000-0000000000a6', 'appointment.pre_confirmed'))).status,
          'skipped', 'its event is skipped');
SELECT results_eq(
    $$SELECT status, last_error FROM barnum.webhook_deliveries
       WHERE id = pg_temp.did('40000000-0000-0000-0000-0000000000a7', 'appointment.reminder')$$,
    $$VALUES ('skipped', 'appointment is cancelled')$$,
    'a reminder of an appointment cancelled before the claim is skipped with the reason');
SELECT results_eq(
    $$SELECT status, last_error FROM barnum.webhook_deliveries
       WHERE id = pg_temp.did('40000000-0000-0000-0000-0000000000a8', 'appointment.pre_confirmed')$$,
    $$VALUES ('skipped', 'patient opted out')$$,
    'a delivery for a patient who opted out after the event was created is skipped');
SELECT is_empty(
    $$SELECT 1 FROM barnum.whatsapp_events WHERE entity_id = '40000000-0000-0000-0000-0000000000a8'
         AND event_type <> 'appointment.pre_confirmed'$$,
    'opting out adds no event');
SELECT is(pg_temp.rec(d.id, 1, true, false, 200), 1, 'deliver the cancellation notices')
  FROM (SELECT delivery_id AS id FROM claimed WHERE label = 'c8' ORDER BY delivery_id) d;

-- ============================================================ 9. release_deliveries
SET LOCAL barnum.clock = '2030-01-10 10:09:00+00';
INSERT INTO barnum.appointments (id, patient_id, starts_at)
VALUES ('40000000-0000-0000-0000-0000000000a9', '40000000-0000-0000-0000-000000000001', '2030-01-22 09:00+00');
SELECT is(pg_temp.claim('c9', 'w-stop'), 1, 'the stopping worker holds one claim');
SELECT is(barnum.release_deliveries('w-other'), 0, 'release_deliveries of a worker without claims returns 0');
SELECT is(barnum.release_deliveries('w-stop'), 1, 'release_deliveries returns the number of released claims');
SELECT results_eq(
    $$SELECT status, locked_by, locked_until, next_attempt_at FROM barnum.webhook_deliveries
       WHERE id = pg_temp.did('40000000-0000-0000-0000-0000000000a9', 'appointment.pre_confirmed')$$,
    $$VALUES ('pending', NULL::text, NULL::timestamptz, '2030-01-10 10:09:00+00'::timestamptz)$$,
    'a released claim is pending again, unlocked, due now');
SELECT is(pg_temp.claim('c9b', 'w1'), 1, 'the released delivery can be claimed at once');
SELECT is((pg_temp.ev(pg_temp.did('40000000-0000-0000-0000-0000000000a9', 'appointment.pre_confirmed'))).status,
          'processing', 'the event follows its reclaimed delivery');
SELECT throws_ok($$SELECT barnum.release_deliveries('')$$, 'BN400', NULL, 'release_deliveries without worker raises BN400');
SELECT is(pg_temp.rec(pg_temp.did('40000000-0000-0000-0000-0000000000a9', 'appointment.pre_confirmed'),
                      (SELECT attempt FROM claimed WHERE label = 'c9b'), true, false, 200), 1,
          'deliver it');

-- ============================================================ 10. retry_dead_letters
SELECT is((barnum.queue_stats() ->> 'dead_letter')::int, 3, 'three dead letters so far');
SELECT is(barnum.retry_dead_letters(
              (pg_temp.ev(pg_temp.did('40000000-0000-0000-0000-0000000000a5', 'appointment.pre_confirmed'))).id),
          1, 'retry_dead_letters(event) requeues that event''s dead delivery');
SELECT results_eq(
    $$SELECT status, attempts, next_attempt_at FROM barnum.webhook_deliveries
       WHERE id = pg_temp.did('40000000-0000-0000-0000-0000000000a5', 'appointment.pre_confirmed')$$,
    $$VALUES ('pending', 0, '2030-01-10 10:09:00+00'::timestamptz)$$,
    'the retried delivery is pending, due now, with a fresh attempt budget');
SELECT is((pg_temp.ev(pg_temp.did('40000000-0000-0000-0000-0000000000a5', 'appointment.pre_confirmed'))).status,
          'pending', 'the retried event is pending');
SELECT is((pg_temp.wf(pg_temp.did('40000000-0000-0000-0000-0000000000a5', 'appointment.pre_confirmed'))).status,
          'pending', 'the failed workflow is live again');
SELECT throws_ok($$SELECT barnum.retry_dead_letters('40000000-0000-0000-0000-00000000dead')$$,
                 'BN404', NULL, 'retry_dead_letters of an unknown event raises BN404');
SELECT is(barnum.retry_dead_letters(), 2, 'retry_dead_letters() requeues all remaining dead letters');
SELECT is((barnum.queue_stats() ->> 'dead_letter')::int, 0, 'no dead letters remain');
SELECT is((barnum.queue_stats() ->> 'due')::int, 3, 'the three requeued deliveries are due');

-- ============================================================ 11. lease lost on the final attempt
UPDATE barnum.settings SET value = '1' WHERE key = 'max_attempts';
SELECT is(pg_temp.claim('c11', 'w-dies', '1 second'), 3, 'a worker claims the three with a 1 s lease');
SET LOCAL barnum.clock = '2030-01-10 10:09:05+00';
SELECT is(pg_temp.claim('c11b', 'w1'), 1, 'after the lease expired only the endpoint-override delivery (max 2) is returned');
SELECT results_eq(
    $$SELECT status, last_error FROM barnum.webhook_deliveries
       WHERE id = pg_temp.did('40000000-0000-0000-0000-0000000000a5', 'appointment.pre_confirmed')$$,
    $$VALUES ('dead_letter', 'lease expired on the final attempt')$$,
    'a lease lost on the final attempt makes the delivery a dead letter');

SELECT pg_temp.claim('sink', 'w1') AS n \g /dev/null

-- ============================================================ 12. a disabled endpoint receives nothing
INSERT INTO barnum.webhook_endpoints (id, name, url, event_types) VALUES
    ('40000000-0000-0000-0000-0000000000e3', 'paused', 'https://hooks.example/paused', '{appointment.confirmed}');
SELECT isnt(barnum.create_whatsapp_event('appointment.confirmed', 'appointment', '40000000-0000-0000-0000-0000000000a9'),
            NULL, 'an event for the soon-disabled endpoint is queued');
SELECT is((SELECT count(*)::int FROM barnum.webhook_deliveries WHERE endpoint_id = '40000000-0000-0000-0000-0000000000e3'),
          1, 'the endpoint got its delivery while active');
UPDATE barnum.webhook_endpoints SET is_active = false WHERE id = '40000000-0000-0000-0000-0000000000e3';
SELECT is(pg_temp.claim('c12', 'w1'), 1, 'the claim returns the active endpoint''s delivery');
SELECT is_empty($$SELECT 1 FROM claimed WHERE label = 'c12' AND endpoint_id = '40000000-0000-0000-0000-0000000000e3'$$,
                'a pending delivery of an endpoint disabled before the claim is not handed to the relay');
SELECT isnt((SELECT status FROM barnum.webhook_deliveries WHERE endpoint_id = '40000000-0000-0000-0000-0000000000e3'),
            'processing', 'the disabled endpoint''s delivery is not leased');
SELECT pg_temp.rec(delivery_id, attempt, true, false, 200) FROM claimed WHERE label = 'c12' \g /dev/null
SELECT cmp_ok(barnum.next_due_at(), '>',
              (SELECT next_attempt_at FROM barnum.webhook_deliveries
                WHERE endpoint_id = '40000000-0000-0000-0000-0000000000e3'),
              'next_due_at ignores the due delivery of a disabled endpoint (the relay''s timer does not spin on it)');
UPDATE barnum.webhook_deliveries SET status = 'sent' WHERE endpoint_id = '40000000-0000-0000-0000-0000000000e3';

-- ============================================================ 12b. oldest first across the endpoints' queues
INSERT INTO barnum.webhook_endpoints (id, name, url, event_types) VALUES
    ('40000000-0000-0000-0000-0000000000e5', 'third', 'https://hooks.example/third', '{appointment.confirmed}');
SELECT barnum.create_whatsapp_event('appointment.confirmed', 'appointment', '40000000-0000-0000-0000-0000000000a9')
    AS ev3 \gset
UPDATE barnum.webhook_deliveries
   SET next_attempt_at = CASE endpoint_id WHEN '40000000-0000-0000-0000-0000000000e5' THEN '2030-01-10 10:08:00+00'
                                          ELSE '2030-01-10 10:08:30+00'::timestamptz END
 WHERE event_id = :'ev3';
SELECT is(pg_temp.claim('c12b', 'w1', '60 seconds', 1), 1, 'a claim of one row over two endpoints'' queues');
SELECT is((SELECT endpoint_id FROM claimed WHERE label = 'c12b'), '40000000-0000-0000-0000-0000000000e5'::uuid,
          'the oldest due row across the active endpoints'' queues comes first');
SELECT is(pg_temp.claim('c12c', 'w1', '60 seconds', 1), 1, 'the next claim of one row');
SELECT is((SELECT endpoint_id FROM claimed WHERE label = 'c12c'), '40000000-0000-0000-0000-0000000000e1'::uuid,
          'then the next oldest, from the other queue');
SELECT pg_temp.rec(delivery_id, attempt, true, false, 200) FROM claimed WHERE label IN ('c12b', 'c12c') \g /dev/null
UPDATE barnum.webhook_endpoints SET is_active = false WHERE id = '40000000-0000-0000-0000-0000000000e5';

-- ============================================================ 13. claim limit and the backoff cap
SET LOCAL barnum.clock = '2030-01-10 10:10:00+00';
UPDATE barnum.settings SET value = '20' WHERE key = 'backoff_base_seconds';
UPDATE barnum.settings SET value = '10' WHERE key = 'backoff_max_seconds';
UPDATE barnum.settings SET value = '4' WHERE key = 'max_attempts';
SELECT barnum.create_whatsapp_event('appointment.rescheduled', 'appointment', '40000000-0000-0000-0000-0000000000a9')
  FROM generate_series(1, 20) \g /dev/null
SELECT is(pg_temp.claim('c13a', 'w1', '60 seconds', 5), 5, 'claim_deliveries returns at most p_limit rows');
SELECT is(pg_temp.claim('c13b', 'w1'), 15, 'the next claim gets the rest');
SELECT is(barnum.record_attempts((SELECT jsonb_agg(jsonb_build_object('delivery_id', delivery_id, 'attempt', attempt,
                                                                       'ok', false, 'retryable', true, 'http_status', 503))
                                    FROM claimed WHERE label IN ('c13a', 'c13b'))),
          20, 'twenty retryable failures recorded in one batch');
SELECT is_empty($$SELECT d.id, d.next_attempt_at FROM barnum.webhook_deliveries d JOIN claimed c ON c.delivery_id = d.id
                   WHERE c.label IN ('c13a', 'c13b')
                     AND NOT (d.next_attempt_at > '2030-01-10 10:10:00+00' AND d.next_attempt_at <= '2030-01-10 10:10:10+00')$$,
                'no wait exceeds backoff_max_seconds (10 s) even with jitter, when base·2^(n-1) (20 s) is above the cap');

-- ============================================================ 13b. an event sent to two endpoints
-- A claim moves the events of the rows it hands out straight to 'processing'
-- (a delivery in flight outranks every other state of its siblings).
INSERT INTO barnum.webhook_endpoints (id, name, url, event_types) VALUES
    ('40000000-0000-0000-0000-0000000000e4', 'second', 'https://hooks.example/second', '{appointment.confirmed}');
SELECT barnum.create_whatsapp_event('appointment.confirmed', 'appointment', '40000000-0000-0000-0000-0000000000a9')
    AS ev2 \gset
SELECT is(pg_temp.claim('c13c', 'w1'), 2, 'an event for two endpoints is claimed as two deliveries');
SELECT is((SELECT status FROM barnum.whatsapp_events WHERE id = :'ev2'), 'processing',
          'the two-endpoint event is processing once claimed');
SELECT is(pg_temp.rec(delivery_id, attempt, endpoint_id <> '40000000-0000-0000-0000-0000000000e4',
                      true, CASE WHEN endpoint_id = '40000000-0000-0000-0000-0000000000e4' THEN 503 ELSE 200 END), 1,
          'one endpoint accepts it, the other fails retryably: ' || endpoint_id)
  FROM claimed WHERE label = 'c13c' ORDER BY delivery_id;
SELECT results_eq(
    $$SELECT status, retry_count, processed_at IS NULL FROM barnum.whatsapp_events WHERE id = '$$ || :'ev2' || $$'$$,
    $$VALUES ('pending', 0, true)$$,
    'one delivery sent and one waiting for its retry: the event is pending');
SET LOCAL barnum.clock = '2030-01-10 10:10:30+00';
SELECT ok(pg_temp.claim('c13d', 'w1') >= 1, 'the retry is claimed after its backoff');
SELECT results_eq(
    $$SELECT status, retry_count, processed_at IS NULL FROM barnum.whatsapp_events WHERE id = '$$ || :'ev2' || $$'$$,
    $$VALUES ('processing', 1, true)$$,
    'the retry''s claim makes the event processing again, retry_count 1, not processed');
SELECT is(pg_temp.rec(delivery_id, attempt, true, false, 200), 1, 'the retry is delivered')
  FROM claimed WHERE label = 'c13d' AND event_id = :'ev2';
SELECT results_eq(
    $$SELECT status, retry_count, processed_at IS NOT NULL FROM barnum.whatsapp_events WHERE id = '$$ || :'ev2' || $$'$$,
    $$VALUES ('sent', 1, true)$$,
    'both endpoints served: the event is sent and processed');

-- ============================================================ 14. bad input
SELECT throws_ok($$SELECT * FROM barnum.claim_deliveries('w1', 0)$$, 'BN422', NULL, 'claim_deliveries with limit 0 raises BN422');
SELECT throws_ok($$SELECT * FROM barnum.claim_deliveries('', 10)$$, 'BN400', NULL, 'claim_deliveries with an empty worker raises BN400');
SELECT throws_ok($$SELECT * FROM barnum.claim_deliveries(NULL, 10)$$, 'BN400', NULL, 'claim_deliveries with a NULL worker raises BN400');
SELECT throws_ok($$SELECT * FROM barnum.claim_deliveries('w1', 10, '0 seconds')$$, 'BN422', NULL, 'claim_deliveries with a zero lease raises BN422');
SELECT throws_ok($$SELECT barnum.record_attempts('{"delivery_id": 1}')$$, 'BN400', NULL, 'record_attempts with a non-array raises BN400');
SELECT throws_ok($$SELECT barnum.record_attempts('[{"delivery_id": 1}]')$$, 'BN400', NULL, 'record_attempts without attempt/ok raises BN400');
SELECT throws_ok($$SELECT barnum.record_attempts('[{"delivery_id": "x", "attempt": 1, "ok": true}]')$$, 'BN400', NULL,
                 'record_attempts with a non-numeric delivery_id raises BN400');
SELECT throws_ok($$SELECT barnum.record_attempts(NULL)$$, 'BN400', NULL, 'record_attempts(NULL) raises BN400');
SELECT is(barnum.record_attempts('[]'), 0, 'record_attempts of an empty batch returns 0');

SELECT * FROM finish();
ROLLBACK;

-- 41_claim_one_row: a claim that locks one fresh row takes a path of its own
-- (plain statements by primary key, for sparse traffic's latency); it must
-- do exactly what the batch path does, and leave every other case to it.
BEGIN;
SELECT plan(16);

SET LOCAL barnum.clock = '2030-02-10 10:00:00+00';
UPDATE barnum.settings SET value = '"https://clinic.example"' WHERE key = 'public_base_url';
UPDATE barnum.settings SET value = '"America/Sao_Paulo"' WHERE key = 'timezone';

-- A payload with what differs between two events of the same appointment
-- data left out: ids, creation time and the tokens in the links.
CREATE FUNCTION pg_temp.shape(p_payload text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT (regexp_replace(p_payload, 'token=[A-Za-z0-9_-]+', 'token=T', 'g')::jsonb
            - 'event_id' - 'entity_id' - 'workflow_id' - 'created_at') #- '{appointment,id}' $$;
CREATE TEMP TABLE got (label text, n int, delivery_id bigint, event_id uuid, event_type text, endpoint_id uuid,
                       url text, secret text, attempt int, timeout_ms int, payload text, idempotency_key text,
                       kind text) ON COMMIT DROP;

INSERT INTO barnum.webhook_endpoints (id, name, url, secret)
VALUES ('41000000-0000-0000-0000-0000000000e1', 'one-row', 'https://hooks.example/{event_type}', 'k1');
INSERT INTO barnum.patients (id, name, phone)
VALUES ('41000000-0000-0000-0000-000000000001', 'Ana Costa', '+351941000001');
INSERT INTO barnum.professionals (id, name) VALUES ('41000000-0000-0000-0000-0000000000a1', 'Dr. Rui');
INSERT INTO barnum.specialties (id, name) VALUES ('41000000-0000-0000-0000-0000000000b1', 'Ortodontia');
-- Three bookings alike but for their ids, due one after the other.
INSERT INTO barnum.appointments (id, patient_id, professional_id, specialty_id, starts_at)
SELECT ('41000000-0000-0000-0000-00000000010' || g)::uuid, '41000000-0000-0000-0000-000000000001',
       '41000000-0000-0000-0000-0000000000a1', '41000000-0000-0000-0000-0000000000b1', '2030-02-20 14:30+00'
  FROM generate_series(1, 3) g;

-- One row locked: the one-row path.  Then two: the batch path.
INSERT INTO got SELECT 'one', row_number() OVER (), c.* FROM barnum.claim_deliveries_v2('w41', 1, '60 seconds') c;
INSERT INTO got SELECT 'batch', row_number() OVER (), c.* FROM barnum.claim_deliveries_v2('w41', 10, '60 seconds') c;
SELECT is((SELECT count(*)::int FROM got WHERE label = 'one'), 1, 'a claim of one row returns it');
SELECT is((SELECT count(*)::int FROM got WHERE label = 'batch'), 2, 'the batch claim returns the other two');

SELECT is((SELECT pg_temp.shape(payload) FROM got WHERE label = 'one'),
          (SELECT pg_temp.shape(payload) FROM got WHERE label = 'batch' AND n = 1),
          'the one-row path renders the same payload as the batch path');
SELECT is((SELECT (url, secret, attempt, timeout_ms, kind, event_type) FROM got WHERE label = 'one'),
          (SELECT (url, secret, attempt, timeout_ms, kind, event_type) FROM got WHERE label = 'batch' AND n = 1),
          'and the same url, secret, attempt, timeout and kind');
SELECT is((SELECT idempotency_key FROM got WHERE label = 'one'),
          (SELECT e.id || '-' || extract(epoch FROM e.created_at)::bigint FROM barnum.whatsapp_events e
             JOIN got ON got.event_id = e.id WHERE got.label = 'one'),
          'the idempotency key is {event_id}-{unix seconds}');
SELECT is((SELECT url FROM got WHERE label = 'one'), 'https://hooks.example/appointment.pre_confirmed',
          'the URL placeholder is filled in');

SELECT is((SELECT (d.status, d.attempts, d.locked_by, d.locked_until) FROM barnum.webhook_deliveries d
             JOIN got ON got.delivery_id = d.id WHERE got.label = 'one'),
          ('processing'::text, 1, 'w41'::text, '2030-02-10 10:01:00+00'::timestamptz),
          'the row is leased to the worker, attempt 1');
SELECT is((SELECT (e.status, e.retry_count, e.processed_at) FROM barnum.whatsapp_events e
             JOIN got ON got.event_id = e.id WHERE got.label = 'one'),
          ('processing'::text, 0, NULL::timestamptz), 'its event is processing');
SELECT is((SELECT array_agg(t.action_type ORDER BY t.action_type) FROM barnum.whatsapp_action_tokens t
             JOIN barnum.whatsapp_events e ON e.entity_id = t.appointment_id
             JOIN got ON got.event_id = e.id WHERE got.label = 'one'),
          ARRAY['cancel', 'confirm', 'reschedule'], 'three tokens are minted for its appointment');
SELECT ok((SELECT bool_and(EXISTS (
               SELECT 1 FROM barnum.whatsapp_action_tokens t
                WHERE t.token_hash = barnum.token_hash(substring(l.value #>> '{}' FROM 'token=(.*)$'))
                  AND t.action_type = l.key AND t.expires_at = '2030-02-17 10:00:00+00'))
             FROM got, jsonb_each(got.payload::jsonb -> 'action_links') l WHERE got.label = 'one'),
          'each link carries a token whose hash is stored, for its action, expiring after token_ttl');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_action_tokens t
             JOIN barnum.whatsapp_events e ON e.entity_id = t.appointment_id
             JOIN got ON got.event_id = e.id WHERE got.label = 'one'), 3, 'and no other token');

-- A one-row claim of an event that must not go out is settled by the
-- general rule: skipped with the reason, no row returned, no token.  (The
-- patient opts out after booking: no other event is queued.)
INSERT INTO barnum.patients (id, name, phone)
VALUES ('41000000-0000-0000-0000-000000000002', 'Rita Sousa', '+351941000002');
INSERT INTO barnum.appointments (id, patient_id, starts_at)
VALUES ('41000000-0000-0000-0000-000000000201', '41000000-0000-0000-0000-000000000002', '2030-02-21 10:00+00');
UPDATE barnum.patients SET whatsapp_opt_out = true WHERE id = '41000000-0000-0000-0000-000000000002';
SELECT is((SELECT count(*)::int FROM barnum.claim_deliveries_v2('w41', 1, '60 seconds')), 0,
          'a one-row claim of an event that must not go out returns nothing');
SELECT is((SELECT (d.status, d.last_error) FROM barnum.webhook_deliveries d
             JOIN barnum.whatsapp_events e ON e.id = d.event_id
            WHERE e.entity_id = '41000000-0000-0000-0000-000000000201'),
          ('skipped'::text, 'patient opted out'::text), 'it is skipped with the reason');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_action_tokens
            WHERE appointment_id = '41000000-0000-0000-0000-000000000201'), 0, 'and nothing is minted for it');

-- A one-row claim keeps the worker's waiter registration; the batch claim
-- of two rows above ended it.
SELECT barnum.relay_idle('w41b');
INSERT INTO barnum.appointments (patient_id, starts_at)
VALUES ('41000000-0000-0000-0000-000000000001', '2030-02-22 10:00+00');
SELECT is((SELECT count(*)::int FROM barnum.claim_deliveries_v2('w41b', 5, '60 seconds')), 1,
          'one due row, claimed alone');
SELECT ok(EXISTS (SELECT 1 FROM barnum.relay_waiters WHERE worker = 'w41b'),
          'the one-row path keeps the waiter registration');

SELECT * FROM finish();
ROLLBACK;

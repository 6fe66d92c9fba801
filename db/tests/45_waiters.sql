-- Relays waiting for work (relay_idle) and what claims and releases do to
-- the registration.  Whether a NOTIFY is sent is visible only after commit,
-- so tests/test_wakeups.py checks that part.
BEGIN;
SELECT plan(13);

SELECT has_table('barnum', 'relay_waiters', 'relay_waiters exists');
SELECT is((SELECT relpersistence FROM pg_class WHERE oid = 'barnum.relay_waiters'::regclass),
          'u'::"char", 'relay_waiters is UNLOGGED (soft state)');

SELECT is(barnum.relay_idle('w1', '30 seconds'), NULL::timestamptz,
          'relay_idle returns next_due_at(): NULL with nothing queued');
SELECT ok(EXISTS (SELECT 1 FROM barnum.relay_waiters WHERE worker = 'w1' AND until > now()),
          'relay_idle registers the worker as waiting');
SELECT lives_ok($$SELECT barnum.relay_idle('w1', '60 seconds')$$, 'registering again renews');
SELECT is((SELECT count(*)::int FROM barnum.relay_waiters WHERE worker = 'w1'), 1,
          'one row per worker');

SELECT * FROM barnum.claim_deliveries_text('w1', 10, '60 seconds');
SELECT ok(EXISTS (SELECT 1 FROM barnum.relay_waiters WHERE worker = 'w1'),
          'a claim that finds nothing keeps the registration (the look after registering opens no gap)');

INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('w-hooks', 'https://hooks.example/w');
INSERT INTO barnum.patients (id, name, phone) VALUES ('45000000-0000-0000-0000-000000000001', 'Ana', '+351945000001');
INSERT INTO barnum.appointments (patient_id, starts_at)
VALUES ('45000000-0000-0000-0000-000000000001', now() + interval '3 days');
SELECT is((SELECT count(*)::int FROM barnum.claim_deliveries_text('w1', 10, '60 seconds')), 1,
          'the claim returns the due delivery');
SELECT ok(EXISTS (SELECT 1 FROM barnum.relay_waiters WHERE worker = 'w1'),
          'a one-row claim keeps the registration (sparse traffic: the next event''s NOTIFY wakes the relay at once)');

INSERT INTO barnum.appointments (patient_id, starts_at)
SELECT '45000000-0000-0000-0000-000000000001', now() + interval '4 days' + g * interval '1 hour'
  FROM generate_series(1, 2) g;
SELECT is((SELECT count(*)::int FROM barnum.claim_deliveries_text('w1', 10, '60 seconds')), 2,
          'the claim returns both due deliveries');
SELECT ok(NOT EXISTS (SELECT 1 FROM barnum.relay_waiters WHERE worker = 'w1'),
          'a claim of several rows means busy: the registration is gone (producers send no NOTIFY)');

SELECT barnum.relay_idle('w2');
SELECT barnum.release_deliveries('w2');
SELECT ok(NOT EXISTS (SELECT 1 FROM barnum.relay_waiters WHERE worker = 'w2'),
          'release (shutdown) removes the registration');

SELECT throws_ok($$SELECT barnum.relay_idle('', '30 seconds')$$, 'BN400', 'worker name is required',
                 'an empty worker name is rejected');

SELECT * FROM finish();
ROLLBACK;

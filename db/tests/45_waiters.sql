-- Relays waiting for work (relay_idle) and what claims and releases do to
-- the registration.  Whether a NOTIFY is sent is visible only after commit,
-- so tests/test_wakeups.py checks that part.
BEGIN;
SELECT plan(9);

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
SELECT ok(NOT EXISTS (SELECT 1 FROM barnum.relay_waiters WHERE worker = 'w1'),
          'a claim means busy: the registration is gone');

SELECT barnum.relay_idle('w2');
SELECT barnum.release_deliveries('w2');
SELECT ok(NOT EXISTS (SELECT 1 FROM barnum.relay_waiters WHERE worker = 'w2'),
          'release (shutdown) removes the registration');

SELECT throws_ok($$SELECT barnum.relay_idle('', '30 seconds')$$, 'BN400', 'worker name is required',
                 'an empty worker name is rejected');

SELECT * FROM finish();
ROLLBACK;

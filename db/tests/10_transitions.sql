-- 10_transitions: the appointment status trigger (SPEC §2.3): legal moves,
-- BN409 for the rest, and the explicit reschedule out of final states.
BEGIN;
SELECT plan(53);

SET LOCAL barnum.clock = '2030-01-10 10:00:00+00';

INSERT INTO barnum.patients (id, name, phone)
VALUES ('10000000-0000-0000-0000-000000000001', 'Transition Patient', '+351910000001');

-- ------------------------------------------------------------ the full 6×6 matrix
-- Expected legality of every (from, to) status change without moving starts_at.
CREATE TEMP TABLE matrix (ord serial, f barnum.appointment_status, t barnum.appointment_status,
                          legal boolean, id uuid DEFAULT gen_random_uuid()) ON COMMIT DROP;
INSERT INTO matrix (f, t, legal) VALUES
    ('scheduled', 'scheduled', true),      ('scheduled', 'pre_confirmed', true),
    ('scheduled', 'confirmed', true),      ('scheduled', 'cancelled', true),
    ('scheduled', 'completed', true),      ('scheduled', 'no_show', true),
    ('pre_confirmed', 'scheduled', false), ('pre_confirmed', 'pre_confirmed', true),
    ('pre_confirmed', 'confirmed', true),  ('pre_confirmed', 'cancelled', true),
    ('pre_confirmed', 'completed', true),  ('pre_confirmed', 'no_show', true),
    ('confirmed', 'scheduled', false),     ('confirmed', 'pre_confirmed', false),
    ('confirmed', 'confirmed', true),      ('confirmed', 'cancelled', true),
    ('confirmed', 'completed', true),      ('confirmed', 'no_show', true),
    ('cancelled', 'scheduled', false),     ('cancelled', 'pre_confirmed', false),
    ('cancelled', 'confirmed', false),     ('cancelled', 'cancelled', true),
    ('cancelled', 'completed', false),     ('cancelled', 'no_show', false),
    ('completed', 'scheduled', false),     ('completed', 'pre_confirmed', false),
    ('completed', 'confirmed', false),     ('completed', 'cancelled', false),
    ('completed', 'completed', true),      ('completed', 'no_show', false),
    ('no_show', 'scheduled', false),       ('no_show', 'pre_confirmed', false),
    ('no_show', 'confirmed', false),       ('no_show', 'cancelled', true),
    ('no_show', 'completed', false),       ('no_show', 'no_show', true);

INSERT INTO barnum.appointments (id, patient_id, starts_at, status)
SELECT id, '10000000-0000-0000-0000-000000000001', '2030-01-20 09:00:00+00', f FROM matrix;

SELECT CASE WHEN legal
    THEN lives_ok(format('UPDATE barnum.appointments SET status = %L WHERE id = %L', t, id),
                  format('%s → %s is allowed', f, t))
    ELSE throws_ok(format('UPDATE barnum.appointments SET status = %L WHERE id = %L', t, id),
                   'BN409', NULL, format('%s → %s raises BN409', f, t))
    END
  FROM matrix ORDER BY ord;

SELECT is_empty($$
    SELECT m.f, m.t FROM matrix m JOIN barnum.appointments a ON a.id = m.id
     WHERE a.status <> CASE WHEN m.legal THEN m.t ELSE m.f END$$,
    'legal transitions applied the new status; illegal ones left the status unchanged');

SELECT throws_ok(
    format('UPDATE barnum.appointments SET status = ''confirmed'' WHERE id = %L',
           (SELECT id FROM matrix WHERE f = 'cancelled' AND t = 'confirmed')),
    'BN409', 'illegal appointment transition: cancelled → confirmed',
    'the BN409 message names both statuses');

-- ------------------------------------------------------------ explicit reschedule
INSERT INTO barnum.appointments (id, patient_id, starts_at, status, cancel_reason) VALUES
    ('10000000-0000-0000-0000-0000000000a1', '10000000-0000-0000-0000-000000000001', '2030-01-20 09:00+00', 'cancelled', 'patient ill'),
    ('10000000-0000-0000-0000-0000000000a2', '10000000-0000-0000-0000-000000000001', '2030-01-05 09:00+00', 'completed', NULL),
    ('10000000-0000-0000-0000-0000000000a3', '10000000-0000-0000-0000-000000000001', '2030-01-05 09:00+00', 'no_show', NULL),
    ('10000000-0000-0000-0000-0000000000a4', '10000000-0000-0000-0000-000000000001', '2030-01-20 09:00+00', 'cancelled', 'x'),
    ('10000000-0000-0000-0000-0000000000a5', '10000000-0000-0000-0000-000000000001', '2030-01-05 09:00+00', 'completed', NULL),
    ('10000000-0000-0000-0000-0000000000a6', '10000000-0000-0000-0000-000000000001', '2030-01-05 09:00+00', 'no_show', NULL),
    ('10000000-0000-0000-0000-0000000000a7', '10000000-0000-0000-0000-000000000001', '2030-01-20 09:00+00', 'confirmed', NULL),
    ('10000000-0000-0000-0000-0000000000a8', '10000000-0000-0000-0000-000000000001', '2030-01-20 09:00+00', 'scheduled', NULL);

-- cancelled → scheduled with a new time
SELECT lives_ok($$UPDATE barnum.appointments SET status = 'scheduled', starts_at = '2030-02-01 10:00+00'
                   WHERE id = '10000000-0000-0000-0000-0000000000a1'$$,
                'cancelled → scheduled with a new starts_at (reschedule) is allowed');
SELECT results_eq($$SELECT status::text, starts_at FROM barnum.appointments WHERE id = '10000000-0000-0000-0000-0000000000a1'$$,
                  $$VALUES ('scheduled', '2030-02-01 10:00+00'::timestamptz)$$,
                  'the rescheduled cancelled appointment is scheduled at the new time');
SELECT is((SELECT cancel_reason FROM barnum.appointments WHERE id = '10000000-0000-0000-0000-0000000000a1'), NULL,
          'rescheduling clears the old cancel_reason');

-- completed → scheduled with a new time
SELECT lives_ok($$UPDATE barnum.appointments SET status = 'scheduled', starts_at = '2030-02-02 10:00+00'
                   WHERE id = '10000000-0000-0000-0000-0000000000a2'$$,
                'completed → scheduled with a new starts_at (reschedule) is allowed');
SELECT results_eq($$SELECT status::text, starts_at FROM barnum.appointments WHERE id = '10000000-0000-0000-0000-0000000000a2'$$,
                  $$VALUES ('scheduled', '2030-02-02 10:00+00'::timestamptz)$$,
                  'the rescheduled completed appointment is scheduled at the new time');

-- no_show → scheduled with a new time
SELECT lives_ok($$UPDATE barnum.appointments SET status = 'scheduled', starts_at = '2030-02-03 10:00+00'
                   WHERE id = '10000000-0000-0000-0000-0000000000a3'$$,
                'no_show → scheduled with a new starts_at (reschedule) is allowed');
SELECT results_eq($$SELECT status::text, starts_at FROM barnum.appointments WHERE id = '10000000-0000-0000-0000-0000000000a3'$$,
                  $$VALUES ('scheduled', '2030-02-03 10:00+00'::timestamptz)$$,
                  'the rescheduled no-show appointment is scheduled at the new time');

-- Moving a final appointment without putting it back to scheduled is not a reschedule.
SELECT throws_ok($$UPDATE barnum.appointments SET starts_at = '2030-02-01 10:00+00'
                    WHERE id = '10000000-0000-0000-0000-0000000000a4'$$,
                 'BN409', NULL, 'moving a cancelled appointment while it stays cancelled raises BN409');
SELECT throws_ok($$UPDATE barnum.appointments SET starts_at = '2030-02-01 10:00+00'
                    WHERE id = '10000000-0000-0000-0000-0000000000a5'$$,
                 'BN409', NULL, 'moving a completed appointment while it stays completed raises BN409');
SELECT throws_ok($$UPDATE barnum.appointments SET starts_at = '2030-02-01 10:00+00', status = 'confirmed'
                    WHERE id = '10000000-0000-0000-0000-0000000000a5'$$,
                 'BN409', NULL, 'completed → confirmed with a new starts_at raises BN409');
SELECT throws_ok($$UPDATE barnum.appointments SET starts_at = '2030-02-01 10:00+00'
                    WHERE id = '10000000-0000-0000-0000-0000000000a6'$$,
                 'BN409', NULL, 'moving a no-show appointment while it stays no_show raises BN409');
SELECT results_eq($$SELECT status::text, starts_at FROM barnum.appointments
                     WHERE id IN ('10000000-0000-0000-0000-0000000000a4', '10000000-0000-0000-0000-0000000000a5',
                                  '10000000-0000-0000-0000-0000000000a6') ORDER BY id$$,
                  $$VALUES ('cancelled', '2030-01-20 09:00+00'::timestamptz),
                           ('completed', '2030-01-05 09:00+00'::timestamptz),
                           ('no_show', '2030-01-05 09:00+00'::timestamptz)$$,
                  'rejected moves left status and starts_at unchanged');

-- Live appointments may be moved.
SELECT lives_ok($$UPDATE barnum.appointments SET status = 'scheduled', starts_at = '2030-02-04 10:00+00'
                   WHERE id = '10000000-0000-0000-0000-0000000000a7'$$,
                'confirmed → scheduled with a new starts_at (reschedule) is allowed');
SELECT lives_ok($$UPDATE barnum.appointments SET starts_at = '2030-02-05 10:00+00'
                   WHERE id = '10000000-0000-0000-0000-0000000000a8'$$,
                'a scheduled appointment can be moved and stay scheduled');
SELECT lives_ok($$UPDATE barnum.appointments SET cancel_reason = 'note' WHERE id = '10000000-0000-0000-0000-0000000000a4'$$,
                'updating another column of a cancelled appointment is allowed');

SELECT * FROM finish();
ROLLBACK;

-- 60_roles: barnum_relay and barnum_shim reach data only through their own
-- SECURITY DEFINER functions (SPEC §2.7).
BEGIN;
SELECT plan(84);

INSERT INTO barnum.patients (id, name, phone)
VALUES ('60000000-0000-0000-0000-000000000001', 'Role Patient', '+351960000001');
INSERT INTO barnum.appointments (id, patient_id, starts_at)
VALUES ('60000000-0000-0000-0000-0000000000a1', '60000000-0000-0000-0000-000000000001', now() + interval '10 days');

-- ============================================================ the roles
SELECT has_role('barnum_relay', 'role barnum_relay exists');
SELECT has_role('barnum_shim', 'role barnum_shim exists');
SELECT ok(NOT (SELECT rolcanlogin FROM pg_roles WHERE rolname = 'barnum_relay'), 'barnum_relay is NOLOGIN');
SELECT ok(NOT (SELECT rolcanlogin FROM pg_roles WHERE rolname = 'barnum_shim'), 'barnum_shim is NOLOGIN');
SELECT isnt_superuser('barnum_relay', 'barnum_relay is not a superuser');
SELECT isnt_superuser('barnum_shim', 'barnum_shim is not a superuser');
SELECT ok(NOT (SELECT rolbypassrls FROM pg_roles WHERE rolname = 'barnum_relay'), 'barnum_relay does not bypass RLS');
SELECT ok(NOT (SELECT rolbypassrls FROM pg_roles WHERE rolname = 'barnum_shim'), 'barnum_shim does not bypass RLS');

-- ============================================================ catalog: function privileges
SELECT function_privs_are('barnum', f.name, f.args, f.role, f.privs,
                          format('%s %s EXECUTE barnum.%s', f.role,
                                 CASE WHEN f.privs = '{}' THEN 'may not' ELSE 'may' END, f.name))
  FROM (VALUES
    ('claim_deliveries',   ARRAY['text', 'integer', 'interval'], 'barnum_relay', ARRAY['EXECUTE']),
    ('record_attempts',    ARRAY['jsonb'],                       'barnum_relay', ARRAY['EXECUTE']),
    ('release_deliveries', ARRAY['text'],                        'barnum_relay', ARRAY['EXECUTE']),
    ('next_due_at',        ARRAY[]::text[],                      'barnum_relay', ARRAY['EXECUTE']),
    ('tick',               ARRAY['integer'],                     'barnum_relay', ARRAY['EXECUTE']),
    ('retry_dead_letters', ARRAY['uuid'],                        'barnum_relay', ARRAY['EXECUTE']),
    ('queue_stats',        ARRAY[]::text[],                      'barnum_relay', ARRAY['EXECUTE']),
    ('handle_callback',    ARRAY['text', 'jsonb', 'text'],       'barnum_relay', ARRAY[]::text[]),
    ('peek_action',        ARRAY['text'],                        'barnum_relay', ARRAY[]::text[]),
    ('perform_action',     ARRAY['text', 'text'],                'barnum_relay', ARRAY[]::text[]),
    ('peek_action',        ARRAY['text'],                        'barnum_shim',  ARRAY['EXECUTE']),
    ('perform_action',     ARRAY['text', 'text'],                'barnum_shim',  ARRAY['EXECUTE']),
    ('handle_callback',    ARRAY['text', 'jsonb', 'text'],       'barnum_shim',  ARRAY['EXECUTE']),
    ('validate_action_token', ARRAY['text'],                     'barnum_shim',  ARRAY['EXECUTE']),
    ('claim_deliveries',   ARRAY['text', 'integer', 'interval'], 'barnum_shim',  ARRAY[]::text[]),
    ('record_attempts',    ARRAY['jsonb'],                       'barnum_shim',  ARRAY[]::text[]),
    ('release_deliveries', ARRAY['text'],                        'barnum_shim',  ARRAY[]::text[]),
    ('tick',               ARRAY['integer'],                     'barnum_shim',  ARRAY[]::text[]),
    ('create_whatsapp_event', ARRAY['text', 'text', 'uuid', 'uuid', 'timestamp with time zone'], 'barnum_relay', ARRAY[]::text[]),
    ('create_whatsapp_event', ARRAY['text', 'text', 'uuid', 'uuid', 'timestamp with time zone'], 'barnum_shim',  ARRAY[]::text[]),
    ('generate_action_token', ARRAY['text', 'uuid', 'uuid', 'uuid', 'jsonb', 'integer'], 'barnum_shim', ARRAY[]::text[]),
    ('mark_token_used',    ARRAY['text'],                        'barnum_shim',  ARRAY[]::text[])
  ) AS f(name, args, role, privs);

SELECT is_empty($$
    SELECT p.oid::regprocedure::text FROM pg_proc p
     WHERE p.pronamespace = 'barnum'::regnamespace
       AND has_function_privilege('public', p.oid, 'EXECUTE')$$,
    'PUBLIC may execute no barnum function');

-- ============================================================ catalog: no table privileges
SELECT is_empty($$
    SELECT r.rolname, c.relname FROM pg_class c CROSS JOIN (VALUES ('barnum_relay'), ('barnum_shim')) r(rolname)
     WHERE c.relnamespace = 'barnum'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
       AND has_table_privilege(r.rolname, c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE')$$,
    'neither role holds any privilege on any table or view in barnum');
SELECT table_privs_are('barnum', 'patients', 'barnum_relay', ARRAY[]::text[], 'barnum_relay has no privilege on patients');
SELECT table_privs_are('barnum', 'patients', 'barnum_shim', ARRAY[]::text[], 'barnum_shim has no privilege on patients');

-- ============================================================ as barnum_relay
SET LOCAL ROLE barnum_relay;
SELECT lives_ok($$SELECT * FROM barnum.claim_deliveries('relay-test', 10)$$, 'barnum_relay can call claim_deliveries');
SELECT lives_ok($$SELECT barnum.record_attempts('[]')$$, 'barnum_relay can call record_attempts');
SELECT lives_ok($$SELECT barnum.release_deliveries('relay-test')$$, 'barnum_relay can call release_deliveries');
SELECT lives_ok($$SELECT barnum.next_due_at()$$, 'barnum_relay can call next_due_at');
SELECT lives_ok($$SELECT barnum.tick()$$, 'barnum_relay can call tick');
SELECT lives_ok($$SELECT barnum.queue_stats()$$, 'barnum_relay can call queue_stats');
SELECT lives_ok($$SELECT barnum.retry_dead_letters()$$, 'barnum_relay can call retry_dead_letters');
SELECT throws_ok($$SELECT barnum.handle_callback('confirm', '{"appointmentId": "60000000-0000-0000-0000-0000000000a1"}')$$,
                 '42501', NULL, 'barnum_relay cannot call handle_callback');
SELECT throws_ok($$SELECT barnum.peek_action('aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa')$$,
                 '42501', NULL, 'barnum_relay cannot call peek_action');
SELECT throws_ok($$SELECT barnum.perform_action('aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 'confirm')$$,
                 '42501', NULL, 'barnum_relay cannot call perform_action');
SELECT throws_ok(format('SELECT 1 FROM barnum.%I', t), '42501', NULL, format('barnum_relay cannot SELECT from barnum.%s', t))
  FROM unnest(ARRAY['settings', 'patients', 'professionals', 'specialties', 'appointments', 'whatsapp_workflows',
                    'reschedule_requests', 'whatsapp_events', 'webhook_endpoints', 'webhook_deliveries',
                    'webhook_attempts', 'whatsapp_action_tokens', 'inbound_callbacks']) t;
SELECT throws_ok($$INSERT INTO barnum.patients (name) VALUES ('x')$$, '42501', NULL, 'barnum_relay cannot INSERT into patients');
SELECT throws_ok($$INSERT INTO barnum.whatsapp_events (event_type, entity_type, entity_id)
                   VALUES ('appointment.confirmed', 'appointment', gen_random_uuid())$$,
                 '42501', NULL, 'barnum_relay cannot INSERT into whatsapp_events');
SELECT throws_ok($$UPDATE barnum.webhook_deliveries SET status = 'sent'$$, '42501', NULL,
                 'barnum_relay cannot UPDATE webhook_deliveries');
RESET ROLE;

-- ============================================================ as barnum_shim
SET LOCAL ROLE barnum_shim;
SELECT lives_ok($$SELECT barnum.handle_callback('confirm', '{"appointmentId": "60000000-0000-0000-0000-0000000000a1"}')$$,
                'barnum_shim can call handle_callback');
SELECT throws_ok($$SELECT barnum.peek_action('aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa')$$,
                 'BN404', NULL, 'barnum_shim can call peek_action (it gets the business error, not 42501)');
SELECT throws_ok($$SELECT barnum.perform_action('aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 'confirm')$$,
                 'BN404', NULL, 'barnum_shim can call perform_action (it gets the business error, not 42501)');
SELECT lives_ok($$SELECT * FROM barnum.validate_action_token('aaaa')$$, 'barnum_shim can call validate_action_token');
SELECT throws_ok($$SELECT * FROM barnum.claim_deliveries('shim', 10)$$, '42501', NULL, 'barnum_shim cannot call claim_deliveries');
SELECT throws_ok($$SELECT barnum.record_attempts('[]')$$, '42501', NULL, 'barnum_shim cannot call record_attempts');
SELECT throws_ok($$SELECT barnum.tick()$$, '42501', NULL, 'barnum_shim cannot call tick');
SELECT throws_ok(format('SELECT 1 FROM barnum.%I', t), '42501', NULL, format('barnum_shim cannot SELECT from barnum.%s', t))
  FROM unnest(ARRAY['settings', 'patients', 'professionals', 'specialties', 'appointments', 'whatsapp_workflows',
                    'reschedule_requests', 'whatsapp_events', 'webhook_endpoints', 'webhook_deliveries',
                    'webhook_attempts', 'whatsapp_action_tokens', 'inbound_callbacks']) t;
SELECT throws_ok($$INSERT INTO barnum.patients (name) VALUES ('x')$$, '42501', NULL, 'barnum_shim cannot INSERT into patients');
SELECT throws_ok($$UPDATE barnum.appointments SET status = 'cancelled'$$, '42501', NULL, 'barnum_shim cannot UPDATE appointments');
SELECT throws_ok($$INSERT INTO barnum.inbound_callbacks (idempotency_key, action, body_hash) VALUES ('k', 'confirm', '\x00')$$,
                 '42501', NULL, 'barnum_shim cannot INSERT into inbound_callbacks');
RESET ROLE;

SELECT is((SELECT status::text FROM barnum.appointments WHERE id = '60000000-0000-0000-0000-0000000000a1'), 'confirmed',
          'the shim''s callback took effect through the definer function');

SELECT * FROM finish();
ROLLBACK;

-- 00_schema: the objects SPEC §2 names exist with the contracted shapes.
BEGIN;
SELECT plan(203);

-- ------------------------------------------------------------ schema, tables
SELECT has_schema('barnum', 'schema barnum exists');
SELECT has_extension('pgcrypto', 'extension pgcrypto is installed');

SELECT has_table('barnum', t, format('table barnum.%s exists', t))
  FROM unnest(ARRAY['settings', 'patients', 'professionals', 'specialties', 'appointments',
                    'whatsapp_workflows', 'reschedule_requests', 'whatsapp_events',
                    'webhook_endpoints', 'webhook_deliveries', 'webhook_attempts',
                    'whatsapp_action_tokens', 'inbound_callbacks']) AS t;

-- ------------------------------------------------------------ columns (§2.2–§2.4)
SELECT has_column('barnum', c.t, c.col, format('column %s.%s exists', c.t, c.col))
  FROM (VALUES
    ('settings', 'key'), ('settings', 'value'), ('settings', 'updated_at'),
    ('patients', 'id'), ('patients', 'name'), ('patients', 'phone'), ('patients', 'whatsapp_opt_out'),
    ('patients', 'last_visit_at'), ('patients', 'created_at'), ('patients', 'updated_at'),
    ('professionals', 'id'), ('professionals', 'name'),
    ('specialties', 'id'), ('specialties', 'name'),
    ('appointments', 'id'), ('appointments', 'patient_id'), ('appointments', 'professional_id'),
    ('appointments', 'specialty_id'), ('appointments', 'starts_at'), ('appointments', 'status'),
    ('appointments', 'cancel_reason'), ('appointments', 'created_at'), ('appointments', 'updated_at'),
    ('whatsapp_workflows', 'id'), ('whatsapp_workflows', 'workflow_type'), ('whatsapp_workflows', 'appointment_id'),
    ('whatsapp_workflows', 'patient_id'), ('whatsapp_workflows', 'status'), ('whatsapp_workflows', 'response'),
    ('whatsapp_workflows', 'responded_at'), ('whatsapp_workflows', 'metadata'), ('whatsapp_workflows', 'created_at'),
    ('whatsapp_workflows', 'updated_at'),
    ('reschedule_requests', 'id'), ('reschedule_requests', 'appointment_id'), ('reschedule_requests', 'patient_id'),
    ('reschedule_requests', 'source'), ('reschedule_requests', 'requested_starts_at'), ('reschedule_requests', 'status'),
    ('reschedule_requests', 'created_at'),
    ('whatsapp_events', 'id'), ('whatsapp_events', 'event_type'), ('whatsapp_events', 'entity_type'),
    ('whatsapp_events', 'entity_id'), ('whatsapp_events', 'workflow_id'), ('whatsapp_events', 'data'),
    ('whatsapp_events', 'status'), ('whatsapp_events', 'retry_count'), ('whatsapp_events', 'max_retries'),
    ('whatsapp_events', 'last_error'), ('whatsapp_events', 'scheduled_for'), ('whatsapp_events', 'processed_at'),
    ('whatsapp_events', 'created_at'), ('whatsapp_events', 'updated_at'),
    ('webhook_endpoints', 'id'), ('webhook_endpoints', 'name'), ('webhook_endpoints', 'url'),
    ('webhook_endpoints', 'secret'), ('webhook_endpoints', 'event_types'), ('webhook_endpoints', 'is_active'),
    ('webhook_endpoints', 'max_attempts'), ('webhook_endpoints', 'timeout_ms'), ('webhook_endpoints', 'created_at'),
    ('webhook_endpoints', 'updated_at'),
    ('webhook_deliveries', 'id'), ('webhook_deliveries', 'event_id'), ('webhook_deliveries', 'endpoint_id'),
    ('webhook_deliveries', 'status'), ('webhook_deliveries', 'attempts'), ('webhook_deliveries', 'next_attempt_at'),
    ('webhook_deliveries', 'locked_by'), ('webhook_deliveries', 'locked_until'), ('webhook_deliveries', 'last_http_status'),
    ('webhook_deliveries', 'last_error'), ('webhook_deliveries', 'delivered_at'), ('webhook_deliveries', 'created_at'),
    ('webhook_attempts', 'id'), ('webhook_attempts', 'delivery_id'), ('webhook_attempts', 'attempt'),
    ('webhook_attempts', 'started_at'), ('webhook_attempts', 'duration_ms'), ('webhook_attempts', 'http_status'),
    ('webhook_attempts', 'response_body'), ('webhook_attempts', 'error'),
    ('whatsapp_action_tokens', 'token_hash')
  ) AS c(t, col);

SELECT hasnt_column('barnum', 'whatsapp_action_tokens', 'token',
                    'whatsapp_action_tokens has no plain token column');
SELECT col_type_is('barnum', 'appointments', 'status', 'barnum.appointment_status',
                   'appointments.status is barnum.appointment_status');
SELECT col_default_is('barnum', 'appointments', 'status', 'scheduled'::barnum.appointment_status,
                      'appointments.status defaults to scheduled');
SELECT col_not_null('barnum', 'appointments', 'patient_id', 'appointments.patient_id is NOT NULL');
SELECT col_not_null('barnum', 'appointments', 'starts_at', 'appointments.starts_at is NOT NULL');
SELECT col_not_null('barnum', 'patients', 'name', 'patients.name is NOT NULL');
SELECT col_default_is('barnum', 'patients', 'whatsapp_opt_out', 'false',
                      'patients.whatsapp_opt_out defaults to false');
SELECT col_default_is('barnum', 'webhook_endpoints', 'event_types', '{*}',
                      'webhook_endpoints.event_types defaults to {*}');
SELECT col_default_is('barnum', 'webhook_endpoints', 'timeout_ms', '10000',
                      'webhook_endpoints.timeout_ms defaults to 10000');
SELECT col_is_null('barnum', 'webhook_endpoints', 'secret', 'webhook_endpoints.secret is nullable');
SELECT col_type_is('barnum', 'webhook_deliveries', 'id', 'bigint', 'webhook_deliveries.id is bigint');
SELECT col_type_is('barnum', 'webhook_attempts', 'id', 'bigint', 'webhook_attempts.id is bigint');
SELECT col_is_unique('barnum', 'webhook_endpoints', ARRAY['name'], 'webhook_endpoints.name is unique');
SELECT col_is_unique('barnum', 'webhook_deliveries', ARRAY['event_id', 'endpoint_id'],
                     'webhook_deliveries is unique on (event_id, endpoint_id)');
SELECT col_default_is('barnum', 'reschedule_requests', 'status', 'open',
                      'reschedule_requests.status defaults to open');

-- ------------------------------------------------------------ enum
SELECT has_type('barnum', 'appointment_status', 'type barnum.appointment_status exists');
SELECT enum_has_labels('barnum', 'appointment_status',
    ARRAY['scheduled', 'pre_confirmed', 'confirmed', 'cancelled', 'completed', 'no_show'],
    'appointment_status has the six labels in order');

-- ------------------------------------------------------------ functions (§2.6)
SELECT has_function('barnum', f.name, f.args, format('function barnum.%s(%s) exists', f.name, array_to_string(f.args, ', ')))
  FROM (VALUES
    ('generate_action_token', ARRAY['text', 'uuid', 'uuid', 'uuid', 'jsonb', 'integer']),
    ('validate_action_token', ARRAY['text']),
    ('mark_token_used', ARRAY['text']),
    ('create_whatsapp_event', ARRAY['text', 'text', 'uuid', 'uuid', 'timestamp with time zone']),
    ('claim_deliveries', ARRAY['text', 'integer', 'interval']),
    ('record_attempts', ARRAY['jsonb']),
    ('release_deliveries', ARRAY['text']),
    ('next_due_at', ARRAY[]::text[]),
    ('tick', ARRAY['integer']),
    ('retry_dead_letters', ARRAY['uuid']),
    ('queue_stats', ARRAY[]::text[]),
    ('peek_action', ARRAY['text']),
    ('perform_action', ARRAY['text', 'text']),
    ('handle_callback', ARRAY['text', 'jsonb', 'text'])
  ) AS f(name, args);

SELECT function_returns('barnum', 'generate_action_token', ARRAY['text', 'uuid', 'uuid', 'uuid', 'jsonb', 'integer'],
                        'text', 'generate_action_token returns text');
SELECT function_returns('barnum', 'validate_action_token', ARRAY['text'], 'setof record',
                        'validate_action_token returns a table');
SELECT function_returns('barnum', 'mark_token_used', ARRAY['text'], 'void', 'mark_token_used returns void');
SELECT function_returns('barnum', 'create_whatsapp_event', ARRAY['text', 'text', 'uuid', 'uuid', 'timestamp with time zone'],
                        'uuid', 'create_whatsapp_event returns uuid');
SELECT function_returns('barnum', 'claim_deliveries', ARRAY['text', 'integer', 'interval'], 'setof record',
                        'claim_deliveries returns a table');
SELECT function_returns('barnum', 'record_attempts', ARRAY['jsonb'], 'integer', 'record_attempts returns int');
SELECT function_returns('barnum', 'release_deliveries', ARRAY['text'], 'integer', 'release_deliveries returns int');
SELECT function_returns('barnum', 'next_due_at', ARRAY[]::text[], 'timestamp with time zone',
                        'next_due_at returns timestamptz');
SELECT function_returns('barnum', 'tick', ARRAY['integer'], 'jsonb', 'tick returns jsonb');
SELECT function_returns('barnum', 'retry_dead_letters', ARRAY['uuid'], 'integer', 'retry_dead_letters returns int');
SELECT function_returns('barnum', 'queue_stats', ARRAY[]::text[], 'jsonb', 'queue_stats returns jsonb');
SELECT function_returns('barnum', 'peek_action', ARRAY['text'], 'jsonb', 'peek_action returns jsonb');
SELECT function_returns('barnum', 'perform_action', ARRAY['text', 'text'], 'jsonb', 'perform_action returns jsonb');
SELECT function_returns('barnum', 'handle_callback', ARRAY['text', 'jsonb', 'text'], 'jsonb',
                        'handle_callback returns jsonb');

-- Output columns of the table functions (the relay and the seed read them by name).
SELECT is(
    (SELECT array_to_string(p.proargnames[p.pronargs + 1:], ',')
       FROM pg_proc p WHERE p.oid = 'barnum.claim_deliveries(text,int,interval)'::regprocedure),
    'delivery_id,event_id,event_type,endpoint_id,url,secret,attempt,timeout_ms,payload',
    'claim_deliveries returns (delivery_id, event_id, event_type, endpoint_id, url, secret, attempt, timeout_ms, payload)');
SELECT is(
    (SELECT array_to_string(p.proargnames[p.pronargs + 1:], ',')
       FROM pg_proc p WHERE p.oid = 'barnum.validate_action_token(text)'::regprocedure),
    'valid,appointment_id,patient_id,action_type,metadata,error_message',
    'validate_action_token returns (valid, appointment_id, patient_id, action_type, metadata, error_message)');

-- Defaults: callable with only the required arguments.
SELECT is((SELECT pronargdefaults::int FROM pg_proc WHERE oid = 'barnum.tick(int)'::regprocedure), 1,
          'tick''s batch argument is optional');
SELECT is((SELECT pronargdefaults::int FROM pg_proc
            WHERE oid = 'barnum.generate_action_token(text,uuid,uuid,uuid,jsonb,int)'::regprocedure), 3,
          'generate_action_token has 3 optional arguments');
SELECT is((SELECT pronargdefaults::int FROM pg_proc
            WHERE oid = 'barnum.claim_deliveries(text,int,interval)'::regprocedure), 2,
          'claim_deliveries has limit and lease optional');
SELECT is((SELECT pronargdefaults::int FROM pg_proc
            WHERE oid = 'barnum.handle_callback(text,jsonb,text)'::regprocedure), 1,
          'handle_callback''s idempotency key is optional');

-- SECURITY DEFINER on the API functions, each with a pinned search_path.
SELECT is_definer('barnum', f.name, f.args, format('barnum.%s is SECURITY DEFINER', f.name))
  FROM (VALUES
    ('generate_action_token', ARRAY['text', 'uuid', 'uuid', 'uuid', 'jsonb', 'integer']),
    ('validate_action_token', ARRAY['text']),
    ('mark_token_used', ARRAY['text']),
    ('create_whatsapp_event', ARRAY['text', 'text', 'uuid', 'uuid', 'timestamp with time zone']),
    ('claim_deliveries', ARRAY['text', 'integer', 'interval']),
    ('record_attempts', ARRAY['jsonb']),
    ('release_deliveries', ARRAY['text']),
    ('next_due_at', ARRAY[]::text[]),
    ('tick', ARRAY['integer']),
    ('retry_dead_letters', ARRAY['uuid']),
    ('queue_stats', ARRAY[]::text[]),
    ('peek_action', ARRAY['text']),
    ('perform_action', ARRAY['text', 'text']),
    ('handle_callback', ARRAY['text', 'jsonb', 'text'])
  ) AS f(name, args);

SELECT is_empty($$
    SELECT p.oid::regprocedure::text FROM pg_proc p
     WHERE p.pronamespace = 'barnum'::regnamespace AND p.prosecdef
       AND NOT coalesce('search_path=barnum, pg_temp' = ANY (p.proconfig), false)$$,
    'every SECURITY DEFINER function in barnum pins search_path = barnum, pg_temp');

-- ------------------------------------------------------------ triggers
SELECT has_trigger('barnum', 'appointments', t, format('trigger %s on barnum.appointments', t))
  FROM unnest(ARRAY['trg_pre_confirmation', 'trg_no_show', 'trg_review', 'trg_status_events']) AS t;

-- ------------------------------------------------------------ settings defaults (§2.2)
SELECT is((SELECT value FROM barnum.settings WHERE key = s.key), s.val,
          format('setting %s defaults to %s', s.key, s.val))
  FROM (VALUES
    ('public_base_url',      '"http://127.0.0.1:8000"'::jsonb),
    ('timezone',             '"Europe/Lisbon"'),
    ('locale',               '"pt"'),
    ('token_ttl',            '"7 days"'),
    ('no_show_delay',        '"1 hour"'),
    ('review_delay',         '"2 hours"'),
    ('reminder_lead',        '"24 hours"'),
    ('reactivation_after',   '"30 days"'),
    ('max_attempts',         '4'),
    ('backoff_base_seconds', '5'),
    ('backoff_max_seconds',  '3600'),
    ('retention',            '"90 days"'),
    ('one_click_actions',    'false'),
    ('endpoint_failure_threshold', '20'),
    ('endpoint_disable_after', '"5 days"')
  ) AS s(key, val);
SELECT is((SELECT count(*)::int FROM barnum.settings), 15, 'exactly the 15 documented settings are seeded');

-- ------------------------------------------------------------ E.164 phone check
SELECT lives_ok($$INSERT INTO barnum.patients (name, phone) VALUES ('E164 ok', '+351912345678')$$,
                'phone +351912345678 is accepted');
SELECT lives_ok($$INSERT INTO barnum.patients (name, phone) VALUES ('E164 short', '+1234567')$$,
                'phone with 7 digits is accepted');
SELECT lives_ok($$INSERT INTO barnum.patients (name, phone) VALUES ('E164 long', '+123456789012345')$$,
                'phone with 15 digits is accepted');
SELECT lives_ok($$INSERT INTO barnum.patients (name, phone) VALUES ('No phone', NULL)$$,
                'a patient without phone is accepted');
SELECT throws_ok($$INSERT INTO barnum.patients (name, phone) VALUES ('E164 no plus', '351912345678')$$,
                 '23514', NULL, 'phone without + is rejected');
SELECT throws_ok($$INSERT INTO barnum.patients (name, phone) VALUES ('E164 too short', '+123456')$$,
                 '23514', NULL, 'phone with 6 digits is rejected');
SELECT throws_ok($$INSERT INTO barnum.patients (name, phone) VALUES ('E164 too long', '+1234567890123456')$$,
                 '23514', NULL, 'phone with 16 digits is rejected');
SELECT throws_ok($$INSERT INTO barnum.patients (name, phone) VALUES ('E164 spaces', '+351 912 345 678')$$,
                 '23514', NULL, 'phone with spaces is rejected');

-- ------------------------------------------------------------ indexes
SELECT ok(EXISTS (
    SELECT 1 FROM pg_index i
      JOIN pg_class c ON c.oid = i.indrelid
     WHERE c.oid = 'barnum.webhook_deliveries'::regclass
       AND i.indpred IS NOT NULL
       AND pg_get_expr(i.indpred, i.indrelid) ~ 'status = ''pending'''
       AND pg_get_indexdef(i.indexrelid) ~ 'next_attempt_at'),
    'webhook_deliveries has a partial index on next_attempt_at WHERE status = pending');
SELECT ok(EXISTS (
    SELECT 1 FROM pg_index i
     WHERE i.indrelid = 'barnum.whatsapp_workflows'::regclass AND i.indisunique AND i.indpred IS NOT NULL
       AND pg_get_indexdef(i.indexrelid) ~ 'appointment_id' AND pg_get_indexdef(i.indexrelid) ~ 'workflow_type'),
    'whatsapp_workflows has a partial unique index: one open workflow per (appointment, type)');

-- ------------------------------------------------------------ row level security
SELECT ok((SELECT relrowsecurity FROM pg_class WHERE oid = format('barnum.%I', t)::regclass),
          format('row level security is enabled on barnum.%s', t))
  FROM unnest(ARRAY['patients', 'appointments', 'whatsapp_workflows', 'reschedule_requests',
                    'whatsapp_events', 'whatsapp_action_tokens', 'inbound_callbacks']) AS t;

SELECT * FROM finish();
ROLLBACK;

-- 85_hardening: settings stay inside bounds that keep the system working,
-- and n8n's callbacks obey the same rules as the patients' action links
-- (issue 12, items 5 and 6).
BEGIN;
SELECT plan(71);

SET LOCAL barnum.clock = '2030-01-10 10:00:00+00';

-- ============================================================ settings: bounds
SELECT settings_before FROM (SELECT barnum.get_settings()::text AS settings_before) s \gset

SELECT lives_ok($$SELECT barnum.validate_setting(key, value) FROM barnum.settings$$,
                'every seeded default is inside its bounds');

SELECT throws_ok($$SELECT barnum.set_setting('reminder_lead', '"100000000 years"')$$,
                 'BN422', 'reminder_lead must be between 1 hour and 30 days, got ''100000000 years''',
                 'reminder_lead "100000000 years" raises BN422 naming the key, the bounds and the value');
SELECT throws_ok($$SELECT barnum.set_setting('reminder_lead', '"30 minutes"')$$,
                 'BN422', NULL, 'reminder_lead below 1 hour raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('retention', '"1 microsecond"')$$,
                 'BN422', 'retention must be between 7 days and 100 years, got ''1 microsecond''',
                 'retention "1 microsecond" raises BN422 (it would purge every idempotency record)');
SELECT throws_ok($$SELECT barnum.set_setting('retention', '"6 days"')$$,
                 'BN422', NULL, 'retention below 7 days raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('retention', '"101 years"')$$,
                 'BN422', NULL, 'retention above 100 years raises BN422');
SELECT lives_ok($$SELECT barnum.set_setting('retention', '"36500 days"')$$,
                'retention "36500 days" (keep everything, as bench/scale.py sets it) is accepted');
SELECT throws_ok($$SELECT barnum.set_setting('token_ttl', '"0.000001 seconds"')$$,
                 'BN422', 'token_ttl must be between 5 minutes and 90 days, got ''0.000001 seconds''',
                 'token_ttl "0.000001 seconds" raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('token_ttl', '"91 days"')$$,
                 'BN422', NULL, 'token_ttl above 90 days raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('token_ttl', '"-1 hour"')$$,
                 'BN422', 'token_ttl must be positive: between 5 minutes and 90 days, got ''-1 hour''',
                 'a negative token_ttl raises BN422 saying it must be positive');
SELECT throws_ok($$SELECT barnum.set_setting('token_ttl', '"infinity"')$$,
                 'BN422', NULL, 'token_ttl "infinity" raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('token_ttl', '"soon"')$$,
                 'BN422', 'token_ttl: ''soon'' is not an interval (try "2 hours")',
                 'an unparsable interval raises BN422 quoting it');
SELECT throws_ok($$SELECT barnum.set_setting('token_ttl', '3600')$$,
                 'BN422', NULL, 'an interval given as a number raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('no_show_delay', '"31 days"')$$,
                 'BN422', NULL, 'no_show_delay above 30 days raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('no_show_delay', '"-1 minute"')$$,
                 'BN422', 'no_show_delay must not be negative: between 0 seconds and 30 days, got ''-1 minute''',
                 'a negative no_show_delay raises BN422');
SELECT lives_ok($$SELECT barnum.set_setting('no_show_delay', '"0 seconds"')$$,
                'no_show_delay 0 (prompt at once) is accepted');
SELECT lives_ok($$SELECT barnum.set_setting('no_show_delay', '"2 seconds"')$$,
                'no_show_delay "2 seconds" (tests/test_relay.py) is accepted');
SELECT throws_ok($$SELECT barnum.set_setting('review_delay', '"2 months"')$$,
                 'BN422', NULL, 'review_delay above 30 days raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('review_delay', '"-5 minutes"')$$,
                 'BN422', NULL, 'a negative review_delay raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('reactivation_after', '"12 hours"')$$,
                 'BN422', NULL, 'reactivation_after below 1 day raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('reactivation_after', '"6 years"')$$,
                 'BN422', NULL, 'reactivation_after above 5 years raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('max_attempts', '101')$$,
                 'BN422', 'max_attempts must be an integer between 1 and 100, got 101',
                 'max_attempts 101 raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('backoff_base_seconds', '0')$$,
                 'BN422', 'backoff_base_seconds must be an integer between 1 and 3600, got 0',
                 'backoff_base_seconds 0 (retry in a tight loop) raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('backoff_base_seconds', '3601')$$,
                 'BN422', NULL, 'backoff_base_seconds above 3600 raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('backoff_max_seconds', '604801')$$,
                 'BN422', NULL, 'backoff_max_seconds above 7 days raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('backoff_max_seconds', '0')$$,
                 'BN422', NULL, 'backoff_max_seconds 0 raises BN422');
SELECT lives_ok($$SELECT barnum.set_setting('backoff_base_seconds', '20'), barnum.set_setting('backoff_max_seconds', '10')$$,
                'backoff_max_seconds below backoff_base_seconds is accepted (the cap wins: every wait is the cap)');
SELECT throws_ok($$SELECT barnum.set_setting('locale', '"fr"')$$,
                 'BN422', 'locale must be "pt" or "en", got "fr"', 'locale "fr" raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('timezone', '"Mars/Olympus"')$$,
                 'BN422', NULL, 'a timezone that is not a zone name raises BN422');

-- public_base_url: only scheme://host[:port][/path]
SELECT throws_ok($$SELECT barnum.set_setting('public_base_url', '"https://a@evil"')$$,
                 'BN422', 'public_base_url must not contain a user name or password (''@''), got ''https://a@evil''',
                 'public_base_url with userinfo raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('public_base_url', '"https://clinic.example@evil.example/"')$$,
                 'BN422', NULL, 'public_base_url "https://clinic.example@evil.example/" raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('public_base_url', '"https://clinic.example/a?x=1"')$$,
                 'BN422', NULL, 'public_base_url with a query raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('public_base_url', '"https://clinic.example/#top"')$$,
                 'BN422', NULL, 'public_base_url with a fragment raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('public_base_url', '"https://evil.example\\clinic.example"')$$,
                 'BN422', NULL, 'public_base_url with a backslash raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('public_base_url', '"https://clinic .example"')$$,
                 'BN422', NULL, 'public_base_url with whitespace raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('public_base_url', '"javascript://clinic.example/%0Aalert(1)"')$$,
                 'BN422', NULL, 'public_base_url with another scheme raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('public_base_url', '"https://"')$$,
                 'BN422', NULL, 'public_base_url without a host raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('public_base_url', '"https://-clinic.example"')$$,
                 'BN422', NULL, 'public_base_url with an invalid host name raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('public_base_url', '"https://999.1.1.1"')$$,
                 'BN422', NULL, 'public_base_url with an impossible IPv4 address raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('public_base_url', '"https://clinic.example:99999"')$$,
                 'BN422', NULL, 'public_base_url with a port above 65535 raises BN422');
SELECT throws_ok($$SELECT barnum.set_setting('public_base_url', '"https://clinic.example/<script>"')$$,
                 'BN422', NULL, 'public_base_url with characters a URL path cannot hold raises BN422');
SELECT lives_ok($$SELECT barnum.set_setting('public_base_url', '"https://clinic.example/barnum/"'),
                         barnum.set_setting('public_base_url', '"http://127.0.0.1:8000"'),
                         barnum.set_setting('public_base_url', '"https://[2001:db8::1]:8443/links"'),
                         barnum.set_setting('public_base_url', '"https://Clinic-1.Example.PT/a%20b/c_d~e.f"')$$,
                'ordinary public_base_urls (path, IPv4 and port, IPv6 literal, mixed case) are accepted');

-- A DBA's UPDATE goes through the same check.
SELECT throws_ok($$UPDATE barnum.settings SET value = '"1 microsecond"' WHERE key = 'retention'$$,
                 'BN422', NULL, 'a direct UPDATE to an out-of-bounds value raises BN422');

-- With every interval at its upper bound, tick() still runs.
SELECT barnum.set_setting('reminder_lead', '"30 days"'), barnum.set_setting('reactivation_after', '"5 years"'),
       barnum.set_setting('retention', '"100 years"'), barnum.set_setting('token_ttl', '"90 days"');
SELECT lives_ok($$SELECT barnum.tick()$$, 'tick() runs with every interval setting at its upper bound');

-- Restore the defaults for the callback half; refused writes changed nothing.
UPDATE barnum.settings s SET value = d.value
  FROM jsonb_each(:'settings_before'::jsonb) d WHERE d.key = s.key;
SELECT is(barnum.get_settings()::text, :'settings_before', 'defaults restored');

-- ============================================================ callbacks obey the action-link rules
INSERT INTO barnum.patients (id, name, phone) VALUES
    ('85000000-0000-0000-0000-000000000001', 'Hardening Patient', '+351985000001'),
    ('85000000-0000-0000-0000-000000000002', 'Reactivated Patient', '+351985000002'),
    ('85000000-0000-0000-0000-000000000003', 'Campaign Patient', '+351985000003');
INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('receiver', 'https://hooks.example/receiver');
INSERT INTO barnum.appointments (id, patient_id, starts_at) VALUES
    -- h1: yesterday, still scheduled; h2: confirmed, yesterday
    ('85000000-0000-0000-0000-0000000000a1', '85000000-0000-0000-0000-000000000001', '2030-01-09 09:00+00'),
    ('85000000-0000-0000-0000-0000000000a2', '85000000-0000-0000-0000-000000000001', '2030-01-09 11:00+00'),
    -- h3: a no-show later cancelled; h4: a no-show with its follow-up open
    ('85000000-0000-0000-0000-0000000000a3', '85000000-0000-0000-0000-000000000001', '2030-01-08 09:00+00'),
    ('85000000-0000-0000-0000-0000000000a4', '85000000-0000-0000-0000-000000000001', '2030-01-08 11:00+00'),
    -- h5, h6: completed visits; h7: cancelled, next week; h8, h9: more no-shows
    ('85000000-0000-0000-0000-0000000000a5', '85000000-0000-0000-0000-000000000001', '2030-01-07 09:00+00'),
    ('85000000-0000-0000-0000-0000000000a6', '85000000-0000-0000-0000-000000000001', '2030-01-07 11:00+00'),
    ('85000000-0000-0000-0000-0000000000a7', '85000000-0000-0000-0000-000000000001', '2030-01-17 09:00+00'),
    ('85000000-0000-0000-0000-0000000000a8', '85000000-0000-0000-0000-000000000001', '2030-01-06 09:00+00'),
    ('85000000-0000-0000-0000-0000000000a9', '85000000-0000-0000-0000-000000000001', '2030-01-06 11:00+00');
UPDATE barnum.appointments SET status = 'confirmed' WHERE id = '85000000-0000-0000-0000-0000000000a2';
UPDATE barnum.appointments SET status = 'no_show'
 WHERE id IN ('85000000-0000-0000-0000-0000000000a3', '85000000-0000-0000-0000-0000000000a4',
              '85000000-0000-0000-0000-0000000000a8', '85000000-0000-0000-0000-0000000000a9');
UPDATE barnum.appointments SET status = 'cancelled' WHERE id = '85000000-0000-0000-0000-0000000000a3';
UPDATE barnum.appointments SET status = 'completed'
 WHERE id IN ('85000000-0000-0000-0000-0000000000a5', '85000000-0000-0000-0000-0000000000a6');
UPDATE barnum.appointments SET status = 'cancelled' WHERE id = '85000000-0000-0000-0000-0000000000a7';
INSERT INTO barnum.whatsapp_workflows (id, workflow_type, patient_id, status) VALUES
    ('85000000-0000-0000-0000-0000000000f2', 'reactivation', '85000000-0000-0000-0000-000000000002', 'sent');

CREATE FUNCTION pg_temp.state() RETURNS text LANGUAGE sql AS $$
    SELECT md5(concat_ws('|',
        (SELECT string_agg(id || status::text || starts_at || coalesce(cancel_reason, ''), ',' ORDER BY id) FROM barnum.appointments),
        (SELECT string_agg(id || status || coalesce(response, '') || metadata::text, ',' ORDER BY id) FROM barnum.whatsapp_workflows),
        (SELECT count(*) FROM barnum.whatsapp_events),
        (SELECT count(*) FROM barnum.reschedule_requests)))
$$;
SELECT pg_temp.state() AS state_before \gset

-- confirm / cancel / reschedule: the rule of action_blocked_reason
SELECT throws_ok($$SELECT barnum.perform_action(
                     barnum.generate_action_token('confirm', '85000000-0000-0000-0000-0000000000a1', '85000000-0000-0000-0000-000000000001'),
                     'confirm')$$,
                 'BN409', 'the appointment time has passed', 'the action link refuses to confirm a past appointment (reference)');
SELECT throws_ok($$SELECT barnum.handle_callback('confirm', '{"appointmentId": "85000000-0000-0000-0000-0000000000a1"}')$$,
                 'BN409', 'cannot confirm: the appointment time has passed',
                 'confirm callback on a past appointment raises BN409 like the action link');
SELECT throws_ok($$SELECT barnum.handle_callback('confirm', '{"appointmentId": "85000000-0000-0000-0000-0000000000a2"}')$$,
                 'BN409', NULL, 'confirm callback on a confirmed appointment in the past raises BN409');
SELECT throws_ok($$SELECT barnum.handle_callback('cancel', '{"appointmentId": "85000000-0000-0000-0000-0000000000a1"}')$$,
                 'BN409', 'cannot cancel: the appointment time has passed',
                 'cancel callback on a past appointment raises BN409 like the action link');
SELECT throws_ok($$SELECT barnum.handle_callback('reschedule',
                   '{"appointmentId": "85000000-0000-0000-0000-0000000000a7", "newDate": "2030-02-01", "newTime": "10:00"}')$$,
                 'BN409', 'cannot reschedule: the appointment is cancelled',
                 'reschedule callback on a cancelled appointment raises BN409 like the action link');

-- no_show_reschedule: only a no-show whose follow-up is open
SELECT throws_ok($$SELECT barnum.handle_callback('no_show_reschedule', '{"appointmentId": "85000000-0000-0000-0000-0000000000a3", "attempt": 1}')$$,
                 'BN409', 'cannot record a no-show reschedule: the appointment is cancelled',
                 'no_show_reschedule on a cancelled appointment raises BN409');
SELECT is(pg_temp.state(), :'state_before', 'the refused callbacks changed nothing (no completed workflow rewritten)');
SELECT is((barnum.handle_callback('no_show_reschedule', '{"appointmentId": "85000000-0000-0000-0000-0000000000a4", "attempt": 1}')
           -> 'success'), 'true'::jsonb, 'no_show_reschedule on a no-show with its follow-up open succeeds');
SELECT throws_ok($$SELECT barnum.handle_callback('no_show_reschedule', '{"appointmentId": "85000000-0000-0000-0000-0000000000a4", "attempt": 2}')$$,
                 'BN409', 'the no-show follow-up of this appointment was already answered',
                 'a second no_show_reschedule on an answered follow-up raises BN409');
SELECT results_eq(
    $$SELECT status, response, (metadata ->> 'attempt')::int FROM barnum.whatsapp_workflows
       WHERE appointment_id = '85000000-0000-0000-0000-0000000000a4' AND workflow_type = 'reschedule_prompt'$$,
    $$VALUES ('completed', 'reschedule_requested', 1)$$,
    'the first answer (attempt 1) stands');
-- h9: its follow-up's delivery failed (n8n may have sent it all the same).
UPDATE barnum.whatsapp_workflows SET status = 'failed'
 WHERE appointment_id = '85000000-0000-0000-0000-0000000000a9' AND workflow_type = 'reschedule_prompt';
SELECT is((barnum.handle_callback('no_show_reschedule', '{"appointmentId": "85000000-0000-0000-0000-0000000000a9", "attempt": 1}')
           -> 'success'), 'true'::jsonb, 'no_show_reschedule on a no-show whose follow-up was never answered (delivery failed) succeeds');
SELECT lives_ok($$SELECT barnum.handle_callback('cancel', '{"appointmentId": "85000000-0000-0000-0000-0000000000a8"}')$$,
                'a no-show may still be cancelled by callback (the answer "no" to its follow-up)');
SELECT results_eq(
    $$SELECT status, response FROM barnum.whatsapp_workflows
       WHERE appointment_id = '85000000-0000-0000-0000-0000000000a8' AND workflow_type = 'reschedule_prompt'$$,
    $$VALUES ('completed', 'cancelled')$$,
    'cancelling a no-show answers its follow-up');

-- review: the first answer is final
SELECT barnum.handle_callback('review', '{"appointmentId": "85000000-0000-0000-0000-0000000000a5", "reviewSubmitted": true, "rating": 5}')
    #>> '{data,workflow_id}' AS review_wf \gset
SELECT is((barnum.handle_callback('review', '{"appointmentId": "85000000-0000-0000-0000-0000000000a5", "reviewSubmitted": true, "rating": 5}')
           #>> '{data,workflow_id}'), :'review_wf', 'the same review again returns 200 and the same workflow');
SELECT throws_ok($$SELECT barnum.handle_callback('review', '{"appointmentId": "85000000-0000-0000-0000-0000000000a5", "reviewSubmitted": true, "rating": 2}')$$,
                 'BN409', 'a review was already recorded for this appointment (5)',
                 'a contradicting second review raises BN409');
SELECT throws_ok($$SELECT barnum.handle_callback('review', '{"appointmentId": "85000000-0000-0000-0000-0000000000a5", "reviewSubmitted": false}')$$,
                 'BN409', NULL, 'declining after a submitted review raises BN409');
SELECT results_eq(
    $$SELECT status, response, count(*) OVER () FROM barnum.whatsapp_workflows
       WHERE appointment_id = '85000000-0000-0000-0000-0000000000a5' AND workflow_type = 'review_request'$$,
    $$VALUES ('completed', '5', 1::bigint)$$,
    'one review_request, with the first answer');
SELECT is((barnum.handle_callback('review', '{"appointmentId": "85000000-0000-0000-0000-0000000000a6", "reviewSubmitted": true, "rating": 1}')
           #>> '{data,rating}'), '1', 'rating 1 is accepted');

-- reactivation: onto the patient's workflow, not a new row per call
SELECT is((barnum.handle_callback('reactivation', '{"patientId": "85000000-0000-0000-0000-000000000002", "workflowType": "reactivation"}')
           #>> '{data,workflow_id}'), '85000000-0000-0000-0000-0000000000f2',
          'reactivation completes the open workflow');
SELECT is((barnum.handle_callback('reactivation', '{"patientId": "85000000-0000-0000-0000-000000000002", "workflowType": "reactivation"}')
           #>> '{data,workflow_id}'), '85000000-0000-0000-0000-0000000000f2',
          'the same reactivation again returns the same workflow');
SELECT throws_ok($$SELECT barnum.handle_callback('reactivation', '{"patientId": "85000000-0000-0000-0000-000000000002", "workflowType": "reactivation", "status": "declined"}')$$,
                 'BN409', 'a reactivation result was already recorded for this patient (completed)',
                 'a contradicting reactivation result raises BN409');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_workflows WHERE patient_id = '85000000-0000-0000-0000-000000000002'), 1,
          'no reactivation row was added for the patient with a workflow');
SELECT lives_ok($$SELECT barnum.handle_callback('reactivation', '{"patientId": "85000000-0000-0000-0000-000000000003", "workflowType": "winback"}'),
                         barnum.handle_callback('reactivation', '{"patientId": "85000000-0000-0000-0000-000000000003", "workflowType": "winback"}'),
                         barnum.handle_callback('reactivation', '{"patientId": "85000000-0000-0000-0000-000000000003", "workflowType": "winback"}')$$,
                'three reactivation callbacks for a patient without a workflow');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_workflows WHERE patient_id = '85000000-0000-0000-0000-000000000003'), 1,
          'they are recorded as one reactivation workflow, not one per call');
-- A later campaign (after reactivation_after) is a new answer.
SET LOCAL barnum.clock = '2030-03-01 10:00:00+00';
SELECT lives_ok($$SELECT barnum.handle_callback('reactivation', '{"patientId": "85000000-0000-0000-0000-000000000003", "workflowType": "winback", "status": "declined"}')$$,
                'a reactivation result after reactivation_after is a new campaign and is accepted');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_workflows WHERE patient_id = '85000000-0000-0000-0000-000000000003'), 2,
          'the new campaign has its own workflow');

SELECT * FROM finish();
ROLLBACK;

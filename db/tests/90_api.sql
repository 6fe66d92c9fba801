-- 90_api: accounts, API tokens, the webhook management API and endpoint
-- health (SPEC-2 §A).  Two accounts, acme and globex, each with a token.
BEGIN;
SELECT plan(128);

SET LOCAL barnum.clock = '2030-03-01 10:00:00+00';

-- ------------------------------------------------------------ helpers
CREATE TEMP TABLE tok (account text PRIMARY KEY, token text, id uuid) ON COMMIT DROP;
CREATE FUNCTION pg_temp.t(p_account text) RETURNS text LANGUAGE sql AS $$
    SELECT token FROM tok WHERE account = p_account $$;
CREATE FUNCTION pg_temp.ep(p_id text) RETURNS barnum.webhook_endpoints LANGUAGE sql AS $$
    SELECT * FROM barnum.webhook_endpoints WHERE id = p_id::uuid $$;
CREATE FUNCTION pg_temp.endpoints_digest() RETURNS text LANGUAGE sql AS $$
    SELECT md5(coalesce(string_agg(ep::text, '|' ORDER BY id), '')) FROM barnum.webhook_endpoints ep $$;
-- Report one HTTP outcome for every delivery claimed by worker w.
CREATE FUNCTION pg_temp.claim_and_record(p_ok boolean, p_http int, p_retryable boolean DEFAULT false)
RETURNS int LANGUAGE sql AS $$
    SELECT barnum.record_attempts(coalesce(jsonb_agg(jsonb_build_object(
               'delivery_id', c.delivery_id, 'attempt', c.attempt, 'ok', p_ok, 'retryable', p_retryable,
               'http_status', p_http, 'duration_ms', 5, 'response_body', 'answer ' || p_http)), '[]'))
      FROM barnum.claim_deliveries('w', 100) c $$;
-- An outbox event of an account (endpoint.* events need no appointment).
CREATE FUNCTION pg_temp.emit(p_account text) RETURNS uuid LANGUAGE sql AS $$
    INSERT INTO barnum.whatsapp_events (event_type, entity_type, entity_id, account_id, data, created_at, scheduled_for)
    SELECT 'endpoint.disabled', 'endpoint', gen_random_uuid(), a.id, '{"test": true}', barnum.clock(), barnum.clock()
      FROM barnum.accounts a WHERE a.name = p_account
    RETURNING id $$;

-- ============================================================ accounts and tokens
SELECT is((SELECT name FROM barnum.accounts WHERE id = '00000000-0000-0000-0000-000000000001'), 'default',
          'the migration creates the default account');
SELECT is((SELECT count(*)::int FROM barnum.webhook_endpoints WHERE account_id IS NULL), 0,
          'every endpoint belongs to an account');
SELECT ok((barnum.account_add('acme')) ->> 'name' = 'acme', 'account_add creates an account');
SELECT lives_ok($$ SELECT barnum.account_add('globex') $$, 'a second account');
SELECT throws_ok($$ SELECT barnum.account_add('acme') $$, 'BN409', 'an account named ''acme'' exists already',
                 'account names are unique');
SELECT throws_ok($$ SELECT barnum.account_add('no spaces') $$, 'BN422', NULL, 'account names are checked');
SELECT throws_like($$ SELECT barnum.api_token_create('initech', 'ci') $$, '%barnum accounts add%',
                   'a token for an unknown account names the command that creates it');

INSERT INTO tok SELECT 'acme', d ->> 'token', (d ->> 'id')::uuid FROM barnum.api_token_create('acme', 'ci') d;
INSERT INTO tok SELECT 'globex', d ->> 'token', (d ->> 'id')::uuid FROM barnum.api_token_create('globex', 'ci') d;
INSERT INTO tok SELECT 'acme-ro', d ->> 'token', (d ->> 'id')::uuid
  FROM barnum.api_token_create('acme', 'dashboard', '{webhooks:read}') d;
SELECT matches(pg_temp.t('acme'), '^bnt_[A-Za-z0-9_-]{43}$', 'a token is bnt_ + 43 base64url characters');
SELECT is((SELECT count(*)::int FROM barnum.api_tokens WHERE token_hash = barnum.token_hash(pg_temp.t('acme'))), 1,
          'only the token''s SHA-256 is stored');
SELECT ok(NOT EXISTS (SELECT 1 FROM barnum.api_tokens t WHERE t::text LIKE '%' || pg_temp.t('acme') || '%'),
          'the plain token is nowhere in the table');
SELECT ok(NOT (barnum.api_token_list('acme') @? '$[*].token'), 'api_token_list never shows a token');
SELECT is(jsonb_array_length(barnum.api_token_list('acme')), 2, 'api_token_list filters by account');
SELECT throws_ok($$ SELECT barnum.api_token_create('acme', 'x', '{admin}') $$, 'BN422', NULL, 'unknown scopes are refused');

-- ============================================================ authentication
SELECT throws_ok($$ SELECT barnum.api_list_webhooks(NULL) $$, 'BN401', 'missing or invalid API token', 'no token: BN401');
SELECT throws_ok($$ SELECT barnum.api_list_webhooks('garbage') $$, 'BN401', 'missing or invalid API token', 'malformed token: BN401');
SELECT throws_ok(format('SELECT barnum.api_list_webhooks(%L)', 'bnt_' || repeat('A', 43)), 'BN401',
                 'missing or invalid API token', 'unknown token: BN401');
SELECT throws_ok(format('SELECT barnum.api_register_webhook(%L, %L)', pg_temp.t('acme-ro'),
                        '{"phone_number": "351911111111", "webhook_url": "https://a.example/h"}'),
                 'BN403', 'this token lacks the scope webhooks:write', 'a read-only token cannot write (403)');
SELECT lives_ok(format('SELECT barnum.api_list_webhooks(%L)', pg_temp.t('acme-ro')), 'a read-only token can read');
SELECT isnt((SELECT last_used_at FROM barnum.api_tokens WHERE id = (SELECT id FROM tok WHERE account = 'acme-ro')), NULL,
            'a used token has last_used_at');

-- ============================================================ register
CREATE TEMP TABLE reg (label text PRIMARY KEY, doc jsonb) ON COMMIT DROP;
INSERT INTO reg SELECT 'acme-1', barnum.api_register_webhook(pg_temp.t('acme'),
    '{"phone_number": "+351911111111", "webhook_url": "https://hooks.acme.example/wa", "metadata": {"team": "ops"}}');
SELECT is((SELECT doc -> 'created' FROM reg WHERE label = 'acme-1'), 'true', 'register creates a webhook');
SELECT is((SELECT doc #>> '{webhook,phone_number}' FROM reg WHERE label = 'acme-1'), '351911111111',
          'the phone number is stored in one spelling (no +)');
SELECT is((SELECT doc #>> '{webhook,max_retries}' FROM reg WHERE label = 'acme-1'), '3',
          'API webhooks retry 3 times by default (the seed)');
SELECT is((SELECT doc #>> '{webhook,timeout_ms}' FROM reg WHERE label = 'acme-1'), '10000', '10 s timeout');
SELECT matches((SELECT doc #>> '{webhook,secret}' FROM reg WHERE label = 'acme-1'), '^whsec_',
               'a new webhook gets its own whsec_ signing secret, shown once');
SELECT is((SELECT account_id FROM barnum.webhook_endpoints WHERE id = (SELECT (doc #>> '{webhook,id}')::uuid FROM reg WHERE label = 'acme-1')),
          (SELECT id FROM barnum.accounts WHERE name = 'acme'), 'the webhook belongs to the token''s account');

INSERT INTO reg SELECT 'acme-1-again', barnum.api_register_webhook(pg_temp.t('acme'),
    '{"phone_number": "351911111111", "webhook_url": "https://hooks.acme.example/v2", "max_retries": 5}');
SELECT is((SELECT doc -> 'created' FROM reg WHERE label = 'acme-1-again'), 'false', 'the same number again updates');
SELECT is((SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1-again'),
          (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'), '… the same webhook');
SELECT is((SELECT doc #>> '{webhook,webhook_url}' FROM reg WHERE label = 'acme-1-again'), 'https://hooks.acme.example/v2',
          '… with the new URL');
SELECT is((SELECT doc #>> '{webhook,max_retries}' FROM reg WHERE label = 'acme-1-again'), '5', '… and max_retries');
SELECT is((SELECT doc #>> '{webhook,metadata,team}' FROM reg WHERE label = 'acme-1-again'), 'ops',
          '… keeping metadata it did not send');
SELECT ok(NOT (SELECT doc -> 'webhook' ? 'secret' FROM reg WHERE label = 'acme-1-again'),
          'an update does not show the secret again');

INSERT INTO reg SELECT 'globex-1', barnum.api_register_webhook(pg_temp.t('globex'),
    '{"phone_number": "351911111111", "webhook_url": "https://globex.example/wa"}');
SELECT is((SELECT doc -> 'created' FROM reg WHERE label = 'globex-1'), 'true',
          'another account may register the same number: its own webhook');
INSERT INTO reg SELECT 'acme-2', barnum.api_register_webhook(pg_temp.t('acme'),
    '{"phone_number": "351922222222", "webhook_url": "https://hooks.acme.example/second", "event_types": ["endpoint.*"]}');

-- Bad input: a precise error, nothing changed.
CREATE TEMP TABLE before_bad AS SELECT pg_temp.endpoints_digest() AS d;
SELECT throws_ok(format('SELECT barnum.api_register_webhook(%L, %L)', pg_temp.t('acme'), b), code, NULL, label)
  FROM (VALUES
    ('[1]', 'BN400', 'a body that is not an object'),
    ('{"webhook_url": "https://a.example/h"}', 'BN400', 'phone_number missing'),
    ('{"phone_number": "351933333333"}', 'BN400', 'webhook_url missing'),
    ('{"phone_number": "351933333333", "webhook_url": "https://a.example/h", "retries": 2}', 'BN400', 'an unknown field'),
    ('{"phone_number": "12", "webhook_url": "https://a.example/h"}', 'BN422', 'a phone number too short'),
    ('{"phone_number": 351933333333, "webhook_url": "https://a.example/h"}', 'BN422', 'a phone number that is not a string'),
    ('{"phone_number": "351933333333", "webhook_url": "http://a.example/h"}', 'BN422', 'plain http outside loopback'),
    ('{"phone_number": "351933333333", "webhook_url": "ftp://a.example/h"}', 'BN422', 'not http(s)'),
    ('{"phone_number": "351933333333", "webhook_url": "http://x?@127.0.0.1/"}', 'BN422', 'a userinfo trick posing as loopback'),
    ('{"phone_number": "351933333333", "webhook_url": 7}', 'BN422', 'a URL that is not a string'),
    ('{"phone_number": "351933333333", "webhook_url": "https://a.example/h", "max_retries": 11}', 'BN422', 'max_retries above 10'),
    ('{"phone_number": "351933333333", "webhook_url": "https://a.example/h", "max_retries": 1.5}', 'BN422', 'max_retries not an integer'),
    ('{"phone_number": "351933333333", "webhook_url": "https://a.example/h", "metadata": [1]}', 'BN422', 'metadata not an object'),
    ('{"phone_number": "351933333333", "webhook_url": "https://a.example/h", "event_types": []}', 'BN422', 'no event types')
  ) AS v(b, code, label);
SELECT is(pg_temp.endpoints_digest(), (SELECT d FROM before_bad), 'bad registrations changed nothing');

-- ============================================================ list, get, isolation
SELECT is(jsonb_array_length(barnum.api_list_webhooks(pg_temp.t('acme')) -> 'webhooks'), 2, 'acme lists its two webhooks');
SELECT is(jsonb_array_length(barnum.api_list_webhooks(pg_temp.t('globex')) -> 'webhooks'), 1, 'globex lists its one');
SELECT ok(NOT (barnum.api_list_webhooks(pg_temp.t('acme')) @? '$.webhooks[*].secret'), 'a list never shows secrets');
SELECT is(barnum.api_get_webhook(pg_temp.t('acme'), (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-2')) #>> '{webhook,phone_number}',
          '351922222222', 'get returns the account''s webhook');

CREATE TEMP TABLE other AS SELECT doc #>> '{webhook,id}' AS id FROM reg WHERE label = 'globex-1';
SELECT throws_ok(format(q, pg_temp.t('acme'), (SELECT id FROM other)), 'BN404', NULL, label)
  FROM (VALUES
    ('SELECT barnum.api_get_webhook(%L, %L)', 'get of another account''s webhook is 404'),
    ('SELECT barnum.api_update_webhook(%L, %L, ''{"is_active": false}'')', 'update of another account''s webhook is 404'),
    ('SELECT barnum.api_delete_webhook(%L, %L)', 'delete of another account''s webhook is 404'),
    ('SELECT barnum.api_webhook_events(%L, %L)', 'events of another account''s webhook are 404'),
    ('SELECT barnum.api_replay_webhook(%L, %L, ''{"since": "2030-02-28T00:00:00Z"}'')', 'replay of another account''s webhook is 404')
  ) AS v(q, label);
SELECT throws_ok(format('SELECT barnum.api_get_webhook(%L, %L)', pg_temp.t('acme'), 'not-a-uuid'), 'BN404', NULL,
                 'a malformed id is not found either');
SELECT is((pg_temp.ep((SELECT id FROM other))).is_active, true, 'globex''s webhook was not touched');

-- ============================================================ update, delete
SELECT is(barnum.api_update_webhook(pg_temp.t('acme'), (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-2'),
                                    '{"is_active": false}') #>> '{webhook,status}', 'inactive', 'PATCH is_active false → inactive');
SELECT is((pg_temp.ep((SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-2'))).is_active, false, '… and not active');
SELECT matches(barnum.api_update_webhook(pg_temp.t('acme'), (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-2'),
                                         '{"rotate_secret": true}') #>> '{webhook,secret}', '^whsec_', 'rotate_secret returns a new secret');
SELECT throws_ok(format('SELECT barnum.api_update_webhook(%L, %L, %L)', pg_temp.t('acme'),
                        (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-2'), '{"phone_number": "351911111111"}'),
                 'BN409', NULL, 'moving to a number another webhook of the account has is a conflict');
SELECT throws_ok(format('SELECT barnum.api_update_webhook(%L, %L, %L)', pg_temp.t('acme'),
                        (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-2'), '{}'),
                 'BN400', 'nothing to update: send at least one field', 'an empty PATCH is a 400');
SELECT throws_ok(format('SELECT barnum.api_update_webhook(%L, %L, %L)', pg_temp.t('acme'),
                        (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-2'), '{"is_active": "yes"}'),
                 'BN422', 'is_active must be true or false', 'is_active must be a boolean');

-- ============================================================ fan-out per account, health
-- Only acme-1 (URL …/v2) and acme-2 (endpoint.*, now inactive) are acme's.
SELECT lives_ok($$ SELECT pg_temp.emit('acme') $$, 'an acme event');
SELECT is((SELECT count(*)::int FROM barnum.webhook_deliveries d JOIN barnum.webhook_endpoints ep ON ep.id = d.endpoint_id
            WHERE ep.account_id = (SELECT id FROM barnum.accounts WHERE name = 'globex')), 0,
          'an acme event never reaches globex''s webhook');
SELECT is((SELECT count(*)::int FROM barnum.webhook_deliveries), 1, 'it reaches acme''s one active webhook');

-- History of that delivery: a failure, then its events page.
SELECT is(pg_temp.claim_and_record(false, 503, true), 1, 'a retryable failure is recorded');
SELECT is((barnum.api_webhook_events(pg_temp.t('acme'), (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'))
           -> 'events' -> 0 ->> 'http_status'), '503', 'the events page shows the HTTP status');
SELECT is((barnum.api_webhook_events(pg_temp.t('acme'), (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'))
           -> 'events' -> 0 ->> 'response'), 'answer 503', '… the response excerpt');
SELECT isnt((barnum.api_webhook_events(pg_temp.t('acme'), (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'))
            -> 'events' -> 0 ->> 'next_retry_at'), NULL, '… and when it is retried');
SELECT is(jsonb_array_length(barnum.api_webhook_events(pg_temp.t('acme'), (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'))
           -> 'events' -> 0 -> 'attempts'), 1, '… with each attempt');
SELECT isnt((pg_temp.ep((SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'))).failing_since, NULL,
            'a failed attempt marks the endpoint failing');
SELECT is((pg_temp.ep((SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'))).failure_count, 0,
          'a retry is not a dead letter: the count stays 0');

-- Pagination: three more events, pages of two.
SELECT pg_temp.emit('acme') FROM generate_series(1, 3);
CREATE TEMP TABLE page1 AS SELECT barnum.api_webhook_events(pg_temp.t('acme'),
    (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'), NULL, 2) AS p;
SELECT is(jsonb_array_length((SELECT p -> 'events' FROM page1)), 2, 'a page holds limit items');
SELECT isnt((SELECT p ->> 'next_cursor' FROM page1), NULL, 'a full page has a next_cursor');
CREATE TEMP TABLE page2 AS SELECT barnum.api_webhook_events(pg_temp.t('acme'),
    (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'), (SELECT p ->> 'next_cursor' FROM page1), 2) AS p;
SELECT is(jsonb_array_length((SELECT p -> 'events' FROM page2)), 2, 'the second page holds the rest');
SELECT is((SELECT p ->> 'next_cursor' FROM page2), NULL, 'the last page has no next_cursor');
SELECT ok(NOT EXISTS (SELECT 1 FROM jsonb_array_elements((SELECT p -> 'events' FROM page1)) a
                        JOIN jsonb_array_elements((SELECT p -> 'events' FROM page2)) b ON a ->> 'event_id' = b ->> 'event_id'),
          'pages do not overlap');
SELECT throws_ok(format('SELECT barnum.api_webhook_events(%L, %L, %L)', pg_temp.t('acme'),
                        (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'), 'abc'),
                 'BN422', NULL, 'a bad cursor is a 422');
SELECT throws_ok(format('SELECT barnum.api_webhook_events(%L, %L, NULL, 500)', pg_temp.t('acme'),
                        (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1')),
                 'BN422', NULL, 'a limit above 200 is a 422');

-- Dead letters in a row switch the endpoint off ('failed').
UPDATE barnum.settings SET value = '3' WHERE key = 'endpoint_failure_threshold';
SET LOCAL barnum.clock = '2030-03-01 12:00:00+00';
SELECT is(pg_temp.claim_and_record(false, 400), 4, 'four final failures (400)');
SELECT is((pg_temp.ep((SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'))).status, 'failed',
          'threshold dead letters in a row → failed');
SELECT is((pg_temp.ep((SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'))).is_active, false, '… and inactive');
SELECT matches((pg_temp.ep((SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'))).metadata ->> 'disabled_reason',
               'dead letters in a row', '… with the reason');
SELECT is((SELECT count(*)::int FROM barnum.whatsapp_events
            WHERE event_type = 'endpoint.disabled' AND entity_id = (SELECT (doc #>> '{webhook,id}')::uuid FROM reg WHERE label = 'acme-1')),
          1, 'an endpoint.disabled event is emitted');

-- Retry of one event, replay of a range.
CREATE TEMP TABLE dead_event AS
    SELECT d.event_id FROM barnum.webhook_deliveries d WHERE d.status = 'dead_letter' ORDER BY d.id LIMIT 1;
SELECT throws_ok(format('SELECT barnum.api_retry_event(%L, %L)', pg_temp.t('globex'), (SELECT event_id FROM dead_event)),
                 'BN404', NULL, 'another account cannot retry acme''s event');
SELECT is(barnum.api_retry_event(pg_temp.t('acme'), (SELECT event_id::text FROM dead_event)) -> 'retried', '1',
          'retry re-queues the event''s dead delivery');
SELECT throws_ok(format('SELECT barnum.api_retry_event(%L, %L)', pg_temp.t('acme'), (SELECT event_id FROM dead_event)),
                 'BN409', NULL, 'retrying again with nothing dead is a conflict');
SELECT throws_ok(format('SELECT barnum.api_replay_webhook(%L, %L, %L)', pg_temp.t('acme'),
                        (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'), '{"since": "2030-03-01T00:00:00Z"}'),
                 'BN409', NULL, 'a failed webhook must be enabled before a replay');
SELECT is(barnum.api_update_webhook(pg_temp.t('acme'), (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'),
                                    '{"is_active": true}') #>> '{webhook,failure_count}', '0',
          'enabling resets the failure counter');
SELECT is(barnum.api_replay_webhook(pg_temp.t('acme'), (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'),
                                    '{"since": "2030-03-01T00:00:00Z", "until": "2030-03-01T13:00:00Z"}') -> 'requeued',
          '3', 'replay re-queues the range''s dead letters');
SELECT is((SELECT count(*)::int FROM barnum.webhook_deliveries WHERE status = 'dead_letter'), 0, 'no dead letter is left');
SELECT throws_ok(format('SELECT barnum.api_replay_webhook(%L, %L, %L)', pg_temp.t('acme'),
                        (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'), b), code, NULL, label)
  FROM (VALUES
    ('{}', 'BN400', 'replay needs since'),
    ('{"since": "yesterday"}', 'BN422', 'since must be ISO 8601'),
    ('{"since": "2030-03-01T00:00:00Z", "until": "2030-02-01T00:00:00Z"}', 'BN422', 'since must be before until'),
    ('{"since": "2029-01-01T00:00:00Z", "until": "2030-03-01T00:00:00Z"}', 'BN422', 'at most 31 days'),
    ('{"since": "2030-03-01T00:00:00Z", "from": 1}', 'BN400', 'an unknown field')
  ) AS v(b, code, label);

-- A 410 Gone disables at once.
SET LOCAL barnum.clock = '2030-03-01 13:00:00+00';
SELECT is(pg_temp.claim_and_record(false, 410), 4, 'the re-queued deliveries meet a 410');
SELECT is((pg_temp.ep((SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'))).status, 'failed', '410 Gone → failed');
SELECT is((pg_temp.ep((SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'))).metadata ->> 'disabled_reason',
          'the receiver answered 410 Gone', '… with that reason');

-- Failing for too long (endpoint_disable_after) switches it off too.
UPDATE barnum.webhook_endpoints SET is_active = true WHERE id = (SELECT (doc #>> '{webhook,id}')::uuid FROM reg WHERE label = 'acme-1');
SELECT is((pg_temp.ep((SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'))).status, 'active',
          'setting is_active (the operator''s way) makes the status active');
UPDATE barnum.settings SET value = '20' WHERE key = 'endpoint_failure_threshold';
SELECT pg_temp.emit('acme');
SELECT is(pg_temp.claim_and_record(false, 503, true), 1, 'a retryable failure at 13:00');
SET LOCAL barnum.clock = '2030-03-07 13:00:00+00';
SELECT is(pg_temp.claim_and_record(false, 503, true), 1, 'still failing six days later');
SELECT is((pg_temp.ep((SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'))).status, 'failed',
          'failing for longer than endpoint_disable_after → failed');
SELECT matches((pg_temp.ep((SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'))).metadata ->> 'disabled_reason',
               '^failing since', '… with that reason');

-- A success resets the health.
UPDATE barnum.webhook_endpoints SET is_active = true WHERE id = (SELECT (doc #>> '{webhook,id}')::uuid FROM reg WHERE label = 'acme-1');
UPDATE barnum.webhook_deliveries SET next_attempt_at = barnum.clock() WHERE status = 'pending';
SELECT ok(pg_temp.claim_and_record(true, 200) >= 1, 'deliveries succeed');
SELECT is((pg_temp.ep((SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'))).failing_since, NULL, 'success clears failing_since');
SELECT is((pg_temp.ep((SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-1'))).last_success_at,
          '2030-03-07 13:00:00+00'::timestamptz, 'and sets last_success_at');

-- endpoint.disabled reaches the account's other active webhooks, not others'.
SELECT lives_ok(format('SELECT barnum.api_update_webhook(%L, %L, ''{"is_active": true}'')', pg_temp.t('acme'),
                       (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-2')), 'acme-2 back on');
SELECT is(pg_temp.claim_and_record(false, 410), 0, 'nothing is due');
SELECT pg_temp.emit('acme');
SELECT is(pg_temp.claim_and_record(false, 410), 2, 'both acme webhooks answer 410 Gone');
SELECT is((SELECT count(*)::int FROM barnum.webhook_endpoints
            WHERE account_id = (SELECT id FROM barnum.accounts WHERE name = 'acme') AND status = 'failed'), 2,
          'both are failed');
SELECT is((pg_temp.ep((SELECT id FROM other))).status, 'active', 'globex''s webhook is untouched by acme''s failures');
SELECT is((SELECT count(*)::int FROM barnum.webhook_deliveries d JOIN barnum.whatsapp_events e ON e.id = d.event_id
            WHERE e.event_type = 'endpoint.disabled' AND d.endpoint_id = (SELECT id::uuid FROM other)), 0,
          'acme''s endpoint.disabled never reaches globex');

-- ============================================================ legacy URLs
ALTER TABLE barnum.webhook_endpoints DISABLE TRIGGER trg_endpoint_url;
INSERT INTO barnum.webhook_endpoints (id, name, url) VALUES
    ('9a000000-0000-0000-0000-000000000001', 'legacy-frag', 'http://evil#@localhost/');
ALTER TABLE barnum.webhook_endpoints ENABLE TRIGGER trg_endpoint_url;
SELECT is(barnum.disable_refused_urls(), 1, 'a stored URL the rules refuse is switched off when the functions are applied');
SELECT is((pg_temp.ep('9a000000-0000-0000-0000-000000000001')).status, 'failed', '… as failed');
SELECT matches((pg_temp.ep('9a000000-0000-0000-0000-000000000001')).metadata ->> 'disabled_reason', 'fragment',
               '… saying why');

-- ============================================================ delete; revoked tokens
SELECT is(barnum.api_delete_webhook(pg_temp.t('acme'), (SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-2')) -> 'deleted',
          'true', 'delete removes a webhook');
SELECT is(pg_temp.ep((SELECT doc #>> '{webhook,id}' FROM reg WHERE label = 'acme-2')), NULL, '… it is gone');
SELECT ok(barnum.api_token_revoke((SELECT id::text FROM tok WHERE account = 'acme')) ->> 'revoked_at' IS NOT NULL,
          'api_token_revoke revokes');
SELECT throws_ok(format('SELECT barnum.api_list_webhooks(%L)', pg_temp.t('acme')), 'BN401', 'missing or invalid API token',
                 'a revoked token is refused');
SELECT throws_ok($$ SELECT barnum.api_token_revoke('5a5a5a5a-0000-0000-0000-000000000000') $$, 'BN404', NULL,
                 'revoking an unknown token is 404');

-- ============================================================ roles, RLS
SELECT ok(has_function_privilege('barnum_shim', 'barnum.api_register_webhook(text, jsonb)', 'EXECUTE'),
          'the shim may call the API functions');
SELECT ok(NOT has_function_privilege('barnum_shim', 'barnum.api_token_create(text, text, text[])', 'EXECUTE'),
          'the shim may not mint tokens');
SELECT ok((SELECT relrowsecurity FROM pg_class WHERE oid = 'barnum.webhook_endpoints'::regclass),
          'RLS is on for webhook_endpoints');
SELECT ok((SELECT relrowsecurity FROM pg_class WHERE oid = 'barnum.api_tokens'::regclass), 'RLS is on for api_tokens');
-- A role granted the table directly sees only the account of its session.
CREATE ROLE barnum_test_reader NOLOGIN;
GRANT USAGE ON SCHEMA barnum TO barnum_test_reader;
GRANT SELECT ON barnum.webhook_endpoints TO barnum_test_reader;
SELECT set_config('barnum.account_id', (SELECT id::text FROM barnum.accounts WHERE name = 'globex'), true);
SET LOCAL ROLE barnum_test_reader;
SELECT is((SELECT count(*)::int FROM barnum.webhook_endpoints), 1, 'RLS: a direct reader sees only its account''s rows');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;

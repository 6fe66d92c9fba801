-- 98_api_docs: what every function granted to a role does, in the catalog
-- (COMMENT ON FUNCTION), so `\df+` shows it and docs/sql-api.md is generated
-- from it (scripts/sql-api-docs).  A granted function without a comment
-- fails the test suite (tests/test_sql_api_docs.py).

-- ------------------------------------------------------------ relay
COMMENT ON FUNCTION barnum.claim_deliveries(text, int, interval) IS
'SPEC §2.6. Claim up to p_limit due deliveries for worker p_worker with a lease of p_lease (FOR UPDATE SKIP LOCKED); payload rendered now with fresh action tokens; stale events are skipped with a reason instead of returned. attempt is the fencing token for record_attempts.';
COMMENT ON FUNCTION barnum.claim_deliveries_text(text, int, interval) IS
'v1 (the first release''s relay): claim_deliveries of webhook endpoints with the payload as text (signed byte for byte) and the idempotency key. Kept beside v2 so relays of the previous release keep working during a rolling deploy.';
COMMENT ON FUNCTION barnum.claim_deliveries_v2(text, int, interval) IS
'v2 (what the relay calls): the v1 rows of every endpoint kind, plus the kind (webhook: signed POST; whatsapp_cloud: a Graph API message with a bearer token).';
COMMENT ON FUNCTION barnum.schema_compat() IS
'The SQL API''s compatibility level (2). Relay and shim check it at start and /readyz reports it; a level they do not speak stops them with a clear message.';
COMMENT ON FUNCTION barnum.record_attempts(jsonb) IS
'Report a batch of HTTP outcomes [{delivery_id, attempt, ok, retryable, http_status, duration_ms, error, response_body, retry_after_seconds}]: sent, back to pending with backoff, or dead letter; results whose attempt no longer holds the claim are ignored. Keeps events, workflows and endpoint health in step. Returns the results applied.';
COMMENT ON FUNCTION barnum.release_deliveries(text) IS
'Graceful shutdown: hand a worker''s unfinished claims back, due at once. Returns how many.';
COMMENT ON FUNCTION barnum.next_due_at() IS
'Earliest time a delivery of an active endpoint becomes claimable (or a lease expires); NULL when nothing is queued.';
COMMENT ON FUNCTION barnum.relay_idle(text, interval) IS
'A relay going idle registers as waiting (producers NOTIFY barnum_events only then) for p_ttl and gets next_due_at() for its timer.';
COMMENT ON FUNCTION barnum.tick(int) IS
'Time-driven work, one at a time (advisory lock): reminders, reactivation, expiry of unanswered workflows, retention purge, each in batches of p_batch. Returns what it did.';
COMMENT ON FUNCTION barnum.retry_dead_letters(uuid) IS
'Put dead letters back in the queue with a fresh attempt budget: all, or one event''s. Returns how many.';
COMMENT ON FUNCTION barnum.queue_stats() IS
'Queue depth for dashboards and /metrics: pending, due, processing, dead_letter, oldest_due_age_seconds, next_due_at.';
COMMENT ON FUNCTION barnum.ensure_endpoint(text, text) IS
'N8N_WEBHOOK_URL: make sure the endpoint named n8n exists with this URL (the URL rules apply; never re-enables a disabled one). Any other name is refused.';

-- ------------------------------------------------------------ shim
COMMENT ON FUNCTION barnum.peek_action(text) IS
'The confirmation page of an action link: the appointment and the action, read-only. BN404 unknown link, BN410 used or expired, BN409 the appointment no longer allows it.';
COMMENT ON FUNCTION barnum.perform_action(text, text) IS
'An action link''s POST: confirm, cancel or reschedule with a single-use token (row-locked: of concurrent calls exactly one succeeds), the same change a WhatsApp reply makes.';
COMMENT ON FUNCTION barnum.handle_callback(text, jsonb, text) IS
'An n8n callback (SPEC §4.2): p_action (or the body''s action) applied to the body, idempotent on p_idempotency_key (the same key with another body is BN409).';
COMMENT ON FUNCTION barnum.validate_action_token(text) IS
'Seed API: whether a plain action token is valid, and for what (read-only).';
COMMENT ON FUNCTION barnum.shim_config() IS
'The settings the shim renders with: locale, public_base_url, one_click_actions.';
COMMENT ON FUNCTION barnum.migrations_current(text[]) IS
'Readiness: true when every migration version in p_versions is applied.';
COMMENT ON FUNCTION barnum.api_register_webhook(text, jsonb) IS
'POST /api/webhooks/register with the caller''s bearer token: create or update (and re-activate) the account''s webhook for a phone number. {created, webhook (with its secret when created)}.';
COMMENT ON FUNCTION barnum.api_list_webhooks(text) IS
'GET /api/webhooks/list: the token''s account''s webhooks.';
COMMENT ON FUNCTION barnum.api_get_webhook(text, text) IS
'GET /api/webhooks/{id}: one webhook of the token''s account (BN404 for any other id).';
COMMENT ON FUNCTION barnum.api_update_webhook(text, text, jsonb) IS
'PATCH /api/webhooks/{id}: change the fields sent; is_active true re-activates and resets the failure count; rotate_secret returns a new secret once.';
COMMENT ON FUNCTION barnum.api_delete_webhook(text, text) IS
'DELETE /api/webhooks/{id}: remove the webhook and its queued deliveries.';
COMMENT ON FUNCTION barnum.api_webhook_events(text, text, text, int) IS
'GET /api/webhooks/{id}/events: delivery history newest first with each attempt; p_cursor is the next_cursor of the previous page, p_limit 1–200.';
COMMENT ON FUNCTION barnum.api_retry_event(text, text) IS
'POST /api/webhooks/events/{event_id}/retry: the account''s dead deliveries of one event go out again with fresh attempts.';
COMMENT ON FUNCTION barnum.api_replay_webhook(text, text, jsonb) IS
'POST /api/webhooks/{id}/replay {since, until}: re-queue the webhook''s dead letters of the range and create deliveries for the account''s matching events it never got (at most 31 days).';
COMMENT ON FUNCTION barnum.ingest_whatsapp(jsonb) IS
'POST /whatsapp/webhook after the signature check: store every message once (wamid), apply statuses forward only, announce message.received / message.status, act on replies to Barnum''s messages, run keyword flows. Returns counts.';

-- ------------------------------------------------------------ realtime (shim)
COMMENT ON FUNCTION barnum.realtime_event(text) IS
'One barnum_realtime notification''s Socket.IO event {account_id, room, event, data} (message:new, message:status, typing:start|stop, session:updated), or NULL when the payload is not ours or its row is gone.';
COMMENT ON FUNCTION barnum.realtime_events(text[]) IS
'A burst of barnum_realtime notifications in one round trip: their events in the order given (commit order), unknown or vanished ones left out.';
COMMENT ON FUNCTION barnum.realtime_auth(text) IS
'Socket.IO connect: the account of a bearer token with the scope conversations:read (BN401 / BN403 otherwise).';
COMMENT ON FUNCTION barnum.realtime_can_join(text, text) IS
'join:conversation: whether the token''s account owns the contact; false alike for a malformed id, an unknown one and another account''s.';
COMMENT ON FUNCTION barnum.notify_typing(uuid, boolean) IS
'NOTIFY barnum_realtime typing:<contact>:start|stop (sent at commit, in order with the messages of the same transaction).';
COMMENT ON FUNCTION barnum.realtime_listening(text, interval) IS
'A shim with a conversation open registers for p_ttl (and re-registers while watching): only then do the realtime triggers NOTIFY.';
COMMENT ON FUNCTION barnum.realtime_quiet(text) IS
'A shim whose last conversation closed leaves: with nobody watching, message inserts send no NOTIFY.';

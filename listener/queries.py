"""Every SQL statement Barnum's Python sends, in one place.

Modelled on Procrastinate's SQL file of named queries: each entry is a named, documented
statement, and almost every one is a single call of a PL/pgSQL function in
schema ``barnum`` (see ``db/functions``).  Business rules live in those
functions; Python only passes arguments and maps results.  The only module
that sends them is ``listener/store.py`` (one typed function per statement);
everything else calls that.  The SQL text is
written for asyncpg (``$1`` placeholders); the synchronous migration runner
(psycopg) keeps its own bookkeeping statements in ``listener/migrate.py``.
"""

from __future__ import annotations

# --- relay -----------------------------------------------------------------

#: Claim up to $2 due deliveries for worker $1 with lease $3 (interval).
#: Returns delivery_id, event_id, event_type, endpoint_id, url, secret,
#: attempt, timeout_ms, payload, idempotency_key — the same rows as the
#: contract's ``claim_deliveries`` but with the payload rendered as text so
#: Python only signs and sends the exact bytes (no parse/re-encode), and the
#: stable ``X-Idempotency-Key`` computed in SQL.
CLAIM_DELIVERIES = """
SELECT delivery_id, event_id, event_type, endpoint_id, url, secret, attempt,
       timeout_ms, payload, idempotency_key, kind
  FROM barnum.claim_deliveries_v2($1, $2, $3::interval)
"""

#: Report one batch of HTTP outcomes ($1: jsonb array); returns rows applied.
RECORD_ATTEMPTS = "SELECT barnum.record_attempts($1::jsonb)"

#: Hand back a worker's unfinished claims (graceful shutdown).
RELEASE_DELIVERIES = "SELECT barnum.release_deliveries($1)"

#: Earliest time a pending delivery is due (NULL when none).
NEXT_DUE_AT = "SELECT barnum.next_due_at()"

#: Going idle: register worker $1 as waiting for NOTIFY for $2 (interval) and
#: get next_due_at() for the timer — one round trip.
RELAY_IDLE = "SELECT barnum.relay_idle($1, $2::interval)"

#: Time-driven work (reminders, reactivation, expiry, retention); jsonb counts.
TICK = "SELECT barnum.tick()::text"

#: Queue depth by status and oldest due age, as jsonb.
QUEUE_STATS = "SELECT barnum.queue_stats()::text"

#: Make sure the endpoint named $1 (only "n8n") exists with URL $2 (never re-enables).
ENSURE_ENDPOINT = "SELECT barnum.ensure_endpoint($1, $2)::text"

#: Owner only (``barnum dev``'s demo): endpoint $1 exists with URL $2 (never re-enables).
UPSERT_ENDPOINT = "SELECT barnum.upsert_endpoint($1, $2)::text"

# --- shim ------------------------------------------------------------------

#: Read-only view of an action token for the confirmation page (jsonb).
PEEK_ACTION = "SELECT barnum.peek_action($1)::text"

#: Perform action $2 with token $1 in one transaction (jsonb result).
PERFORM_ACTION = "SELECT barnum.perform_action($1, $2)::text"

#: Apply an n8n callback: action $1, body $2 (jsonb text), idempotency key $3.
HANDLE_CALLBACK = "SELECT barnum.handle_callback($1, $2::jsonb, $3)::text"

#: The SQL API's compatibility level (relay and shim check it; /readyz too).
SCHEMA_COMPAT = "SELECT barnum.schema_compat()"

#: Settings the shim renders with (locale, public_base_url, one_click_actions).
SHIM_CONFIG = "SELECT barnum.shim_config()::text"

# --- management API (shim, /api/webhooks/…; SPEC-2 §A) -----------------------
# Each takes the caller's bearer token as $1 (NULL when absent): SQL
# authenticates, scopes to the token's account and validates.

#: $2 = body (jsonb text).  {"created": bool, "webhook": {...}}.
API_REGISTER_WEBHOOK = "SELECT barnum.api_register_webhook($1, $2::jsonb)::text"

#: {"webhooks": [...]} of the token's account.
API_LIST_WEBHOOKS = "SELECT barnum.api_list_webhooks($1)::text"

#: $2 = webhook id (text from the path; malformed → BN404).
API_GET_WEBHOOK = "SELECT barnum.api_get_webhook($1, $2)::text"

#: $2 = webhook id, $3 = body (jsonb text): the fields to change.
API_UPDATE_WEBHOOK = "SELECT barnum.api_update_webhook($1, $2, $3::jsonb)::text"

#: $2 = webhook id.
API_DELETE_WEBHOOK = "SELECT barnum.api_delete_webhook($1, $2)::text"

#: $2 = webhook id, $3 = cursor (text or NULL), $4 = page size.
API_WEBHOOK_EVENTS = "SELECT barnum.api_webhook_events($1, $2, $3, $4)::text"

#: $2 = event id: re-queue the account's dead deliveries of it.
API_RETRY_EVENT = "SELECT barnum.api_retry_event($1, $2)::text"

#: $2 = webhook id, $3 = body {since, until} (jsonb text).
API_REPLAY_WEBHOOK = "SELECT barnum.api_replay_webhook($1, $2, $3::jsonb)::text"

# --- WhatsApp Cloud API webhook (shim, /whatsapp/webhook; SPEC-2 §B) ---------

#: $1 = the verified notification's raw body (text → jsonb; a syntax error is
#: SQLSTATE 22P02).  Counts of what was stored.
INGEST_WHATSAPP = "SELECT barnum.ingest_whatsapp($1::jsonb)::text"

# --- realtime (shim, /socket.io/; SPEC-2 §D) ---------------------------------

#: Socket.IO connect: $1 = bearer token → the account's uuid (BN401 / BN403).
REALTIME_AUTH = "SELECT barnum.realtime_auth($1)"

#: join:conversation: $1 = token, $2 = contact id (any text) → boolean; false
#: for a malformed id, one that exists nowhere or another account's alike.
REALTIME_CAN_JOIN = "SELECT barnum.realtime_can_join($1, $2)"

#: $1 = text[] of barnum_realtime payloads → jsonb array (as text) of
#: {account_id, room, event, data} in the same order, vanished rows left out.
REALTIME_EVENTS = "SELECT barnum.realtime_events($1::text[])::text"

#: The LISTEN connection's health check (needs no privilege).
REALTIME_PING = "SELECT 1"

#: A shim watching at least one conversation registers ($1 worker, $2 ttl):
#: only then do the realtime triggers NOTIFY (NOTIFY serialises commits).
REALTIME_LISTENING = "SELECT barnum.realtime_listening($1, $2::interval)"

#: The shim's last conversation closed: no more NOTIFYs for it.
REALTIME_QUIET = "SELECT barnum.realtime_quiet($1)"

# --- operator tools (barnum endpoints | dlq | status | settings) --------------

#: Add an endpoint: name, url, secret, event_types text[], max_attempts,
#: timeout_ms, allow_http.  Returns the endpoint as jsonb (no secret).
ENDPOINT_ADD = "SELECT barnum.endpoint_add($1, $2, $3, $4::text[], $5, $6, $7)::text"

#: The receiver URL rule alone: url, allow_http.  ``barnum endpoints add``
#: calls it with allow_http = true after a refusal to learn whether plain
#: http was the reason (and then names --allow-http).
CHECK_RECEIVER_URL = "SELECT barnum.check_receiver_url($1, $2)"

#: Add a native WhatsApp sender: name, phone_number_id, token env name,
#: Graph base URL, account, event_types text[], templates jsonb, allow_http.
ENDPOINT_ADD_WHATSAPP = "SELECT barnum.endpoint_add_whatsapp($1, $2, $3, $4, $5, $6::text[], $7::jsonb, $8)::text"

#: All endpoints as a jsonb array (secrets never leave the database here).
ENDPOINT_LIST = "SELECT barnum.endpoint_list()::text"

#: Enable ($2 = true) or disable an endpoint by name.
ENDPOINT_SET_ACTIVE = "SELECT barnum.endpoint_set_active($1, $2)::text"

#: Remove an endpoint; refused while it has queued work unless $2 (force).
ENDPOINT_REMOVE = "SELECT barnum.endpoint_remove($1, $2)::text"

#: Dead letters, newest first ($1 = limit).
DLQ_LIST = "SELECT barnum.dlq_list($1)::text"

#: Re-queue dead letters: all, or one event's ($1 uuid or NULL).
DLQ_RETRY = "SELECT barnum.retry_dead_letters($1::uuid)"

#: Queue, statuses and per-endpoint success over the last hour (jsonb).
STATUS_REPORT = "SELECT barnum.status_report()::text"

#: Every setting as a jsonb object.
SETTINGS_GET = "SELECT barnum.get_settings()::text"

#: Set one setting ($2 as jsonb text); validated in SQL (BN404/BN422).
SETTINGS_SET = "SELECT barnum.set_setting($1, $2::jsonb)::text"

#: Accounts and API tokens (barnum accounts | tokens).  The plain token is
#: returned by TOKEN_CREATE only.
ACCOUNT_ADD = "SELECT barnum.account_add($1)::text"
ACCOUNT_LIST = "SELECT barnum.account_list()::text"
TOKEN_CREATE = "SELECT barnum.api_token_create($1, $2, $3::text[])::text"
TOKEN_LIST = "SELECT barnum.api_token_list($1)::text"
TOKEN_REVOKE = "SELECT barnum.api_token_revoke($1)::text"

#: WhatsApp numbers (phone_number_id → account) for inbound routing.
NUMBER_ADD = "SELECT barnum.whatsapp_number_add($1, $2, $3)::text"
NUMBER_LIST = "SELECT barnum.whatsapp_number_list()::text"
NUMBER_REMOVE = "SELECT barnum.whatsapp_number_remove($1)::text"

#: Keyword flows (barnum flows): import a file's flows into an account
#: ($1 account name, $2 jsonb: a flow or an array), list, enable/disable.
FLOW_IMPORT = "SELECT barnum.flow_import($1, $2::jsonb)::text"
FLOW_LIST = "SELECT barnum.flow_list($1)::text"
FLOW_SET_STATUS = "SELECT barnum.flow_set_status($1, $2, $3)::text"

# --- barnum dev ---------------------------------------------------------------

#: Messages delivered in an earlier run whose patient has not answered yet,
#: rendered again with fresh action links (jsonb array of payloads).  Old
#: links are stored only as hashes, so "re-printing" them means new ones.
REISSUE_AWAITING_LINKS = "SELECT barnum.reissue_awaiting_links()::text"

#: Seed the demo clinic (a professional, a specialty, a patient) and one
#: appointment in two days at 10:00 clinic time (outside the 24 h reminder window) — only into an empty database.
#: Its INSERT fires trg_pre_confirmation like any real booking.  Returns the
#: appointment id, or NULL when the database already had patients.
DEMO_SEED = """
WITH guard AS (
    SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM barnum.patients)
), prof AS (
    INSERT INTO barnum.professionals (name) SELECT 'Dr.ª Maria Santos' FROM guard RETURNING id
), spec AS (
    INSERT INTO barnum.specialties (name) SELECT 'Medicina Dentária' FROM guard RETURNING id
), pat AS (
    INSERT INTO barnum.patients (name, phone) SELECT 'João Silva', '+351912345678' FROM guard RETURNING id
)
INSERT INTO barnum.appointments (patient_id, professional_id, specialty_id, starts_at)
SELECT pat.id, prof.id, spec.id,
       ((now() AT TIME ZONE barnum.setting_text('timezone'))::date + 2 + time '10:00')
           AT TIME ZONE barnum.setting_text('timezone')
  FROM pat, prof, spec
RETURNING id
"""

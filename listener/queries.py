"""Every SQL statement Barnum's Python sends, in one place.

Modelled on Procrastinate's ``queries.sql``: each entry is a named, documented
statement, and almost every one is a single call of a PL/pgSQL function in
schema ``barnum`` (see ``db/functions``).  Business rules live in those
functions; Python only passes arguments and maps results.  The SQL text is
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
       timeout_ms, payload, idempotency_key
  FROM barnum.claim_deliveries_text($1, $2, $3::interval)
"""

#: Report one batch of HTTP outcomes ($1: jsonb array); returns rows applied.
RECORD_ATTEMPTS = "SELECT barnum.record_attempts($1::jsonb)"

#: Hand back a worker's unfinished claims (graceful shutdown).
RELEASE_DELIVERIES = "SELECT barnum.release_deliveries($1)"

#: Earliest time a pending delivery is due (NULL when none).
NEXT_DUE_AT = "SELECT barnum.next_due_at()"

#: Time-driven work (reminders, reactivation, expiry, retention); jsonb counts.
TICK = "SELECT barnum.tick()::text"

#: Queue depth by status and oldest due age, as jsonb.
QUEUE_STATS = "SELECT barnum.queue_stats()::text"

#: Make sure the endpoint named $1 exists with URL $2 (never re-enables).
ENSURE_ENDPOINT = "SELECT barnum.ensure_endpoint($1, $2)::text"

# --- shim ------------------------------------------------------------------

#: Read-only view of an action token for the confirmation page (jsonb).
PEEK_ACTION = "SELECT barnum.peek_action($1)::text"

#: Perform action $2 with token $1 in one transaction (jsonb result).
PERFORM_ACTION = "SELECT barnum.perform_action($1, $2)::text"

#: Apply an n8n callback: action $1, body $2 (jsonb text), idempotency key $3.
HANDLE_CALLBACK = "SELECT barnum.handle_callback($1, $2::jsonb, $3)::text"

#: True when every migration file on disk is applied (readiness probe):
#: $1 = array of versions present on disk.
MIGRATIONS_CURRENT = "SELECT barnum.migrations_current($1::text[])"

#: Settings the shim renders with (locale, public_base_url, one_click_actions).
SHIM_CONFIG = "SELECT barnum.shim_config()::text"

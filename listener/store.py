"""The typed data-access layer: the only caller of :mod:`listener.queries`.

One ``async`` function per named statement, documented like it.  Each takes
an asyncpg pool or connection (``conn``: anything with ``fetch``/``fetchval``)
and returns typed values: documents SQL renders as ``::text`` are parsed here,
once — except where the caller forwards SQL's JSON text unchanged as an HTTP
body (the management API, ``handle_callback``), which stays ``str``.
Business rules are in SQL (``db/functions``); this module only passes
arguments and maps results.  ``timeout`` is asyncpg's per-call timeout
(``None``: the connection's default).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol, TypedDict, cast

from listener import queries


class Executor(Protocol):
    """An asyncpg ``Pool`` or ``Connection`` (what the functions below need)."""

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]: ...

    async def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any: ...


#: A JSON object SQL returned (its keys are documented by the SQL function).
Doc = dict[str, Any]


def _object(text: object) -> Doc:
    value = json.loads(text) if isinstance(text, str) else None
    if not isinstance(value, dict):
        raise RuntimeError(f"unexpected SQL result of type {type(value).__name__}")
    return value


def _array(text: object) -> list[Any]:
    value = json.loads(text) if isinstance(text, str) else None
    if not isinstance(value, list):
        raise RuntimeError(f"unexpected SQL result of type {type(value).__name__}")
    return value


# --- relay -----------------------------------------------------------------


class ClaimedRow(TypedDict):
    """One claimed delivery (``claim_deliveries_v2``)."""

    delivery_id: int
    event_id: uuid.UUID
    event_type: str
    endpoint_id: uuid.UUID
    url: str
    #: webhook: the signing secret (NULL: the relay's WEBHOOK_SECRET);
    #: whatsapp_cloud: the name of the environment variable holding the token.
    secret: str | None
    attempt: int
    timeout_ms: int
    #: The exact bytes to send, as text (never parsed by Python).
    payload: str | None
    idempotency_key: str
    kind: str


class AttemptResult(TypedDict):
    """One HTTP outcome for ``record_attempts``."""

    delivery_id: int
    attempt: int
    ok: bool
    retryable: bool
    http_status: int | None
    duration_ms: int
    error: str | None
    response_body: str | None
    retry_after_seconds: float | None


async def claim(conn: Executor, worker: str, limit: int, lease: timedelta, *,
                timeout: float | None = None) -> list[ClaimedRow]:
    """Claim up to ``limit`` due deliveries for ``worker`` with ``lease``:
    the contract's ``claim_deliveries`` rows
    with the payload rendered as text, so Python only signs and sends the
    exact bytes, the stable ``X-Idempotency-Key`` computed in SQL, and the
    endpoint kind."""
    rows = await conn.fetch(queries.CLAIM_DELIVERIES, worker, limit, lease, timeout=timeout)
    return [cast(ClaimedRow, dict(row)) for row in rows]


async def record_attempts(conn: Executor, results: Sequence[AttemptResult], *,
                          timeout: float | None = None) -> int:
    """Report one batch of HTTP outcomes; the number of results applied
    (results whose attempt no longer holds the claim are ignored)."""
    document = json.dumps(results, separators=(",", ":"), ensure_ascii=False)
    return int(await conn.fetchval(queries.RECORD_ATTEMPTS, document, timeout=timeout) or 0)


async def release_deliveries(conn: Executor, worker: str, *, timeout: float | None = None) -> int:
    """Hand back a worker's unfinished claims (graceful shutdown); how many."""
    return int(await conn.fetchval(queries.RELEASE_DELIVERIES, worker, timeout=timeout) or 0)


async def next_due_at(conn: Executor, *, timeout: float | None = None) -> datetime | None:
    """Earliest time a pending delivery is due (None when none)."""
    value: datetime | None = await conn.fetchval(queries.NEXT_DUE_AT, timeout=timeout)
    return value


async def relay_idle(conn: Executor, worker: str, ttl: timedelta, *, timeout: float | None = None) -> datetime | None:
    """Going idle: register ``worker`` as waiting for NOTIFY for ``ttl`` and get ``next_due_at()`` for the timer — one round trip."""
    value: datetime | None = await conn.fetchval(queries.RELAY_IDLE, worker, ttl, timeout=timeout)
    return value


async def tick(conn: Executor, *, timeout: float | None = None) -> Doc:
    """Time-driven work (reminders, reactivation, expiry, retention): counts."""
    text = await conn.fetchval(queries.TICK, timeout=timeout)
    return _object(text) if text else {}


async def queue_stats(conn: Executor, *, timeout: float | None = None) -> Doc:
    """Queue depth by status and oldest due age ({} when SQL says nothing)."""
    text = await conn.fetchval(queries.QUEUE_STATS, timeout=timeout)
    return _object(text) if text else {}


async def ensure_endpoint(conn: Executor, name: str, url: str, *, timeout: float | None = None) -> Doc:
    """Make sure the endpoint ``name`` (only "n8n") exists with ``url``
    (never re-enables it); the endpoint."""
    return _object(await conn.fetchval(queries.ENSURE_ENDPOINT, name, url, timeout=timeout))


async def upsert_endpoint(conn: Executor, name: str, url: str) -> Doc:
    """Owner only (``barnum dev``'s demo): endpoint ``name`` exists with
    ``url`` (never re-enables it); the endpoint."""
    return _object(await conn.fetchval(queries.UPSERT_ENDPOINT, name, url))


# --- shim ------------------------------------------------------------------


async def peek_action(conn: Executor, token: str, *, timeout: float | None = None) -> Doc:
    """Read-only view of an action token for the confirmation page."""
    return _object(await conn.fetchval(queries.PEEK_ACTION, token, timeout=timeout))


async def perform_action(conn: Executor, token: str, action: str, *, timeout: float | None = None) -> Doc:
    """Perform ``action`` with ``token`` in one transaction."""
    return _object(await conn.fetchval(queries.PERFORM_ACTION, token, action, timeout=timeout))


async def handle_callback(conn: Executor, action: str | None, body_text: str, key: str | None, *,
                          timeout: float | None = None) -> str | None:
    """Apply an n8n callback (``body_text``: the JSON object as received,
    ``key``: its idempotency key).  SQL's JSON text, sent on unchanged."""
    text: str | None = await conn.fetchval(queries.HANDLE_CALLBACK, action, body_text, key, timeout=timeout)
    return text


async def schema_compat(conn: Executor, *, timeout: float | None = None) -> int:
    """The SQL API's compatibility level (relay and shim check it; /readyz too)."""
    return int(await conn.fetchval(queries.SCHEMA_COMPAT, timeout=timeout))


async def shim_config(conn: Executor, *, timeout: float | None = None) -> Doc:
    """Settings the shim renders with (locale, public_base_url, one_click_actions)."""
    return _object(await conn.fetchval(queries.SHIM_CONFIG, timeout=timeout))


# --- management API (shim, /api/webhooks/…; SPEC-2 §A) -----------------------
# Each takes the caller's bearer token (None when absent): SQL authenticates,
# scopes to the token's account and validates.  Except for registering, the
# result is SQL's JSON text, which the API sends on unchanged.


async def api_register_webhook(conn: Executor, token: str | None, body: Any, *,
                               timeout: float | None = None) -> Doc:
    """``body``: the request's JSON.  ``{"created": bool, "webhook": {...}}``."""
    return _object(await conn.fetchval(queries.API_REGISTER_WEBHOOK, token, json.dumps(body), timeout=timeout))


async def api_list_webhooks(conn: Executor, token: str | None, *, timeout: float | None = None) -> str | None:
    """``{"webhooks": [...]}`` of the token's account."""
    text: str | None = await conn.fetchval(queries.API_LIST_WEBHOOKS, token, timeout=timeout)
    return text


async def api_get_webhook(conn: Executor, token: str | None, webhook_id: str, *,
                          timeout: float | None = None) -> str | None:
    """One webhook (``webhook_id``: text from the path; malformed → BN404)."""
    text: str | None = await conn.fetchval(queries.API_GET_WEBHOOK, token, webhook_id, timeout=timeout)
    return text


async def api_update_webhook(conn: Executor, token: str | None, webhook_id: str, body: Any, *,
                             timeout: float | None = None) -> str | None:
    """Change the fields ``body`` (the request's JSON) names."""
    text: str | None = await conn.fetchval(queries.API_UPDATE_WEBHOOK, token, webhook_id, json.dumps(body),
                                           timeout=timeout)
    return text


async def api_delete_webhook(conn: Executor, token: str | None, webhook_id: str, *,
                             timeout: float | None = None) -> str | None:
    """Delete a webhook."""
    text: str | None = await conn.fetchval(queries.API_DELETE_WEBHOOK, token, webhook_id, timeout=timeout)
    return text


async def api_webhook_events(conn: Executor, token: str | None, webhook_id: str, cursor: str | None, limit: int,
                             *, timeout: float | None = None) -> str | None:
    """A page of a webhook's events (``cursor``: None for the first page)."""
    text: str | None = await conn.fetchval(queries.API_WEBHOOK_EVENTS, token, webhook_id, cursor, limit,
                                           timeout=timeout)
    return text


async def api_retry_event(conn: Executor, token: str | None, event_id: str, *,
                          timeout: float | None = None) -> str | None:
    """Re-queue the account's dead deliveries of ``event_id``."""
    text: str | None = await conn.fetchval(queries.API_RETRY_EVENT, token, event_id, timeout=timeout)
    return text


async def api_replay_webhook(conn: Executor, token: str | None, webhook_id: str, body: Any, *,
                             timeout: float | None = None) -> str | None:
    """Replay a webhook's events; ``body``: ``{since, until}``."""
    text: str | None = await conn.fetchval(queries.API_REPLAY_WEBHOOK, token, webhook_id, json.dumps(body),
                                           timeout=timeout)
    return text


# --- WhatsApp Cloud API webhook (shim, /whatsapp/webhook; SPEC-2 §B) ---------


async def ingest_whatsapp(conn: Executor, payload: str, *, timeout: float | None = None) -> Doc:
    """Store a verified notification (``payload``: its raw body, parsed by the
    jsonb cast — a syntax error is SQLSTATE 22P02): counts of what was stored."""
    text = await conn.fetchval(queries.INGEST_WHATSAPP, payload, timeout=timeout)
    result: Doc = json.loads(text) if isinstance(text, str) else {}
    return result


# --- realtime (shim, /socket.io/; SPEC-2 §D) ---------------------------------


async def realtime_auth(conn: Executor, token: str, *, timeout: float | None = None) -> str:
    """Socket.IO connect: the token's account id (BN401 / BN403 otherwise)."""
    return str(await conn.fetchval(queries.REALTIME_AUTH, token, timeout=timeout))


async def realtime_can_join(conn: Executor, token: str, contact_id: str, *, timeout: float | None = None) -> bool:
    """join:conversation: false for a malformed id, one that exists nowhere
    or another account's alike."""
    return await conn.fetchval(queries.REALTIME_CAN_JOIN, token, contact_id, timeout=timeout) is True


async def realtime_events(conn: Executor, payloads: list[str], *, timeout: float | None = None) -> list[Any]:
    """``barnum_realtime`` payloads → ``{account_id, room, event, data}`` in
    the same order, vanished rows left out."""
    text = await conn.fetchval(queries.REALTIME_EVENTS, payloads, timeout=timeout)
    events: list[Any] = json.loads(text) if isinstance(text, str) else []
    return events


async def realtime_ping(conn: Executor, *, timeout: float | None = None) -> None:
    """The LISTEN connection's health check (needs no privilege)."""
    await conn.fetchval(queries.REALTIME_PING, timeout=timeout)


async def realtime_listening(conn: Executor, worker: str, ttl: timedelta, *,
                             timeout: float | None = None) -> None:
    """Register this shim as watching for ``ttl`` (re-register before it ends):
    only then do the realtime triggers NOTIFY."""
    await conn.fetchval(queries.REALTIME_LISTENING, worker, ttl, timeout=timeout)


async def realtime_quiet(conn: Executor, worker: str, *, timeout: float | None = None) -> None:
    """This shim watches nothing any more."""
    await conn.fetchval(queries.REALTIME_QUIET, worker, timeout=timeout)


# --- operator tools (barnum endpoints | dlq | status | settings | …) ----------


async def endpoint_add(conn: Executor, name: str, url: str, secret: str | None, event_types: list[str],
                       max_attempts: int | None, timeout_ms: int | None, allow_http: bool) -> Doc:
    """Add an endpoint; the endpoint (no secret)."""
    return _object(await conn.fetchval(queries.ENDPOINT_ADD, name, url, secret, event_types,
                                       max_attempts, timeout_ms, allow_http))


async def check_receiver_url(conn: Executor, url: str, allow_http: bool) -> None:
    """The receiver URL rule alone (raises its BN422).  ``barnum endpoints
    add`` calls it with ``allow_http`` after a refusal to learn whether plain
    http was the reason (and then names --allow-http)."""
    await conn.fetchval(queries.CHECK_RECEIVER_URL, url, allow_http)


async def endpoint_add_whatsapp(conn: Executor, name: str, phone_number_id: str, token_env: str, graph_url: str,
                                account: str, event_types: list[str],
                                templates: Mapping[str, Mapping[str, str]], allow_http: bool) -> Doc:
    """Add a native WhatsApp sender (the token is read from ``token_env`` in
    the relay's environment); the endpoint."""
    return _object(await conn.fetchval(queries.ENDPOINT_ADD_WHATSAPP, name, phone_number_id, token_env, graph_url,
                                       account, event_types, json.dumps(templates), allow_http))


async def endpoint_list(conn: Executor) -> list[Doc]:
    """All endpoints (secrets never leave the database here)."""
    return _array(await conn.fetchval(queries.ENDPOINT_LIST))


async def endpoint_set_active(conn: Executor, name: str, active: bool) -> Doc:
    """Enable or disable an endpoint by name; the endpoint."""
    return _object(await conn.fetchval(queries.ENDPOINT_SET_ACTIVE, name, active))


async def endpoint_remove(conn: Executor, name: str, force: bool) -> Doc:
    """Remove an endpoint; refused while it has queued work unless ``force``."""
    return _object(await conn.fetchval(queries.ENDPOINT_REMOVE, name, force))


async def dlq_list(conn: Executor, limit: int | None) -> list[Doc]:
    """Dead letters, newest first."""
    return _array(await conn.fetchval(queries.DLQ_LIST, limit))


async def dlq_retry(conn: Executor, event_id: str | None) -> int:
    """Re-queue dead letters: all (``event_id`` None) or one event's; how many."""
    return int(await conn.fetchval(queries.DLQ_RETRY, event_id) or 0)


async def status_report(conn: Executor) -> Doc:
    """Queue, statuses and per-endpoint success over the last hour."""
    return _object(await conn.fetchval(queries.STATUS_REPORT))


async def get_settings(conn: Executor) -> Doc:
    """Every setting."""
    return _object(await conn.fetchval(queries.SETTINGS_GET))


async def set_setting(conn: Executor, key: str, value: Any) -> str:
    """Set one setting (validated in SQL: BN404/BN422); the stored value as JSON text."""
    return str(await conn.fetchval(queries.SETTINGS_SET, key, json.dumps(value)))


async def account_add(conn: Executor, name: str) -> Doc:
    """Add an account."""
    return _object(await conn.fetchval(queries.ACCOUNT_ADD, name))


async def account_list(conn: Executor) -> list[Doc]:
    """Every account."""
    return _array(await conn.fetchval(queries.ACCOUNT_LIST))


async def token_create(conn: Executor, account: str, name: str, scopes: list[str] | None) -> Doc:
    """Create an API token; the only result that holds the plain token."""
    return _object(await conn.fetchval(queries.TOKEN_CREATE, account, name, scopes))


async def token_list(conn: Executor, account: str | None) -> list[Doc]:
    """API tokens (never their plain text), of one account or all."""
    return _array(await conn.fetchval(queries.TOKEN_LIST, account))


async def token_revoke(conn: Executor, token_id: str) -> Doc:
    """Revoke an API token."""
    return _object(await conn.fetchval(queries.TOKEN_REVOKE, token_id))


async def number_add(conn: Executor, phone_number_id: str, account: str, display: str | None) -> Doc:
    """Route a WhatsApp number (phone_number_id) to an account."""
    return _object(await conn.fetchval(queries.NUMBER_ADD, phone_number_id, account, display))


async def number_list(conn: Executor) -> list[Doc]:
    """WhatsApp numbers and their accounts."""
    return _array(await conn.fetchval(queries.NUMBER_LIST))


async def number_remove(conn: Executor, phone_number_id: str) -> Doc:
    """Stop routing a WhatsApp number."""
    return _object(await conn.fetchval(queries.NUMBER_REMOVE, phone_number_id))


async def flow_import(conn: Executor, account: str, flows_json: str) -> list[Doc]:
    """Import a file's flows (``flows_json``: a flow or an array) into an account."""
    return _array(await conn.fetchval(queries.FLOW_IMPORT, account, flows_json))


async def flow_list(conn: Executor, account: str | None) -> list[Doc]:
    """Keyword flows, of one account or all."""
    return _array(await conn.fetchval(queries.FLOW_LIST, account))


async def flow_set_status(conn: Executor, account: str, name: str, status: str) -> Doc:
    """Enable ("Active") or disable ("Inactive") a flow."""
    return _object(await conn.fetchval(queries.FLOW_SET_STATUS, account, name, status))


# --- barnum dev ---------------------------------------------------------------


async def reissue_awaiting_links(conn: Executor) -> list[Doc]:
    """Messages delivered in an earlier run whose patient has not answered
    yet, rendered again with fresh action links (old links are stored only
    as hashes, so "re-printing" them means new ones)."""
    return _array(await conn.fetchval(queries.REISSUE_AWAITING_LINKS))


async def demo_seed(conn: Executor) -> uuid.UUID | None:
    """Seed the demo clinic and one appointment in two days — only into an
    empty database; the appointment id, or None when it had patients."""
    value: uuid.UUID | None = await conn.fetchval(queries.DEMO_SEED)
    return value

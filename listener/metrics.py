"""Prometheus metrics (the seed's monitoring list, SPEC §6 issue 5).

Counters are process-local and moved by the relay and the shim; the queue
gauges are refreshed from ``queue_stats()`` just before each scrape (shim)
or on every sweep (relay).

``barnum relay --processes N --metrics-port P`` uses prometheus-client's
multiprocess mode: the supervising parent makes a private directory, passes
it to its children as ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client reads
it at import, so every metric below writes to a per-process file there) and
serves the sum over all children with :func:`multiprocess_registry`.  Hence
each gauge's ``multiprocess_mode``: the queue gauges are one database-wide
value, so the most recent refresh of a live process wins.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client import multiprocess

from listener import store

DELIVERIES = Counter(
    "barnum_deliveries_total",
    "Delivery attempts by outcome (delivered, retry, dead_letter, stale)",
    ["outcome"],
)
DELIVERY_SECONDS = Histogram(
    "barnum_delivery_duration_seconds",
    "HTTP duration of one delivery attempt",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ACTIONS = Counter(
    "barnum_action_requests_total",
    "Patients' action-link requests by type, method and outcome (HTTP status)",
    ["type", "method", "status"],
)
CALLBACKS = Counter(
    "barnum_callbacks_total",
    "n8n callbacks by action and outcome (HTTP status)",
    ["action", "status"],
)
API_REQUESTS = Counter(
    "barnum_api_requests_total",
    "Management API requests by route, method and outcome (HTTP status)",
    ["route", "method", "status"],
)
WHATSAPP_WEBHOOKS = Counter(
    "barnum_whatsapp_webhooks_total",
    "WhatsApp Cloud API webhook requests by outcome (stored, bad_signature, too_large, bad_json, "
    "unavailable, verified, verify_refused, …)",
    ["outcome"],
)
SIGNATURE_FAILURES = Counter(
    "barnum_signature_failures_total",
    "Callbacks and WhatsApp notifications rejected because the signature was missing, wrong or stale",
)
REPLAYABLE_SIGNATURES = Counter(
    "barnum_callbacks_body_only_signature_total",
    "Callbacks accepted with a hex signature that covers no timestamp (replayable; "
    "set WEBHOOK_REQUIRE_TIMESTAMP once this stays at zero)",
)
REALTIME_CONNECTIONS = Counter(
    "barnum_realtime_connections_total",
    "Socket.IO connection attempts by outcome (accepted, unauthorized, forbidden, unavailable)",
    ["outcome"],
)
REALTIME_EVENTS = Counter(
    "barnum_realtime_events_total",
    "Socket.IO events emitted to conversation rooms, by event",
    ["event"],
)
REALTIME_NOTIFICATIONS = Counter(
    "barnum_realtime_notifications_total",
    "barnum_realtime notifications received: queued (a socket watches the conversation) or unwatched "
    "(dropped without a query)",
    ["outcome"],
)
REALTIME_CLIENTS = Gauge(
    "barnum_realtime_clients",
    "Socket.IO clients connected now",
    multiprocess_mode="livesum",
)
QUEUE_DEPTH = Gauge(
    "barnum_queue_deliveries",
    "Deliveries by queue state (pending, due, processing, dead_letter)",
    ["state"],
    multiprocess_mode="livemostrecent",
)
OLDEST_DUE_AGE = Gauge(
    "barnum_queue_oldest_due_age_seconds",
    "Age of the oldest delivery that is due and not yet sent",
    multiprocess_mode="livemostrecent",
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def set_queue_gauges(stats: dict[str, Any]) -> None:
    """Copy a ``queue_stats()`` document into the gauges."""
    for state in ("pending", "due", "processing", "dead_letter"):
        value = stats.get(state)
        if isinstance(value, (int, float)):
            QUEUE_DEPTH.labels(state=state).set(value)
    age = stats.get("oldest_due_age_seconds")
    if isinstance(age, (int, float)):
        OLDEST_DUE_AGE.set(age)


async def refresh_queue_gauges(conn: Any) -> None:
    """Fetch ``queue_stats()`` over an asyncpg connection/pool and set the gauges."""
    stats = await store.queue_stats(conn)
    if stats:
        set_queue_gauges(stats)


def render() -> bytes:
    """The exposition text of every Barnum metric."""
    return generate_latest(REGISTRY)


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry summing the metric files children wrote under ``path``."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return registry


def mark_process_dead(pid: int, path: str) -> None:
    """Drop a finished child's live gauges (its counters keep counting)."""
    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def serve(port: int, registry: CollectorRegistry = REGISTRY) -> Callable[[], None]:
    """Serve ``registry`` at ``http://127.0.0.1:PORT/metrics`` from a thread
    (loopback only, like the shim's default); returns a function stopping it.
    Raises OSError when the port cannot be bound."""
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5.0)

    return stop


def serve_for(command: str, port: int, registry: CollectorRegistry = REGISTRY) -> Callable[[], None] | None:
    """:func:`serve` for ``barnum COMMAND --metrics-port``: None (after one
    line on stderr) if the port is taken."""
    try:
        return serve(port, registry)
    except OSError as exc:
        print(f"barnum {command}: cannot serve metrics on 127.0.0.1:{port}: {exc.strerror or exc}",
              file=sys.stderr)
        return None

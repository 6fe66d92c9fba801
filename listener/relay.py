"""The relay: outbox → signed webhooks (SPEC §2.4, §3, §7).

One process runs one :class:`Relay`:

* a small asyncpg pool claims due deliveries (``claim_deliveries_v2``:
  the payload arrives as text and is signed and sent as those exact bytes) and
  reports each batch's outcomes with one ``record_attempts`` call;
* one dedicated connection ``LISTEN``s on ``barnum_events``
  (``LISTEN_DATABASE_URL`` if set): a notification wakes the delivery loop;
* a timer set to ``next_due_at()`` wakes it for delayed work and retries;
* a sweep every ``--sweep-interval`` seconds checks the LISTEN connection
  (a silently dead listener is the classic failure of this design), reconnects
  it with capped exponential backoff, calls ``tick()`` and wakes the loop.

Draining: a sliding window (:class:`Deliverer`).  Claim up to ``--batch``
rows and POST them concurrently (at most ``--concurrency`` requests in flight
per process); claim again as soon as there is room — up to
``--batch × --batches-in-flight`` rows claimed and not yet recorded — so a
slow receiver holds only its own requests, never the next claim; outcomes
are recorded in the background, many per ``record_attempts`` call.

Shutdown (SIGTERM/SIGINT): stop claiming, let in-flight requests finish
within ``--grace`` seconds, record what finished, ``release_deliveries`` the
rest, exit 0.  A SIGKILL loses nothing: the leases expire and another relay
(or this one, restarted) reclaims the rows; ``attempt`` fences late results.

Logs: one JSON line per delivery (event, endpoint, status, duration, attempt)
— never a secret, a payload (it holds action tokens) or a URL's query.

The command line (``barnum relay``, ``python -m listener.relay``) is
:mod:`listener.relay_cli`; ``--processes N`` runs :mod:`listener.supervisor`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets as _secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
from listener import logs, metrics, store
from listener.config import Config, ConfigError
from listener.db import barnum_error, create_pool, schema_problem
from listener.signing import outbound_headers, parse_secrets
from listener.store import AttemptResult, ClaimedRow
from listener.transport import FINAL_ERROR_PREFIX, HttpResult, Transport

log = logging.getLogger("barnum.relay")

#: The NOTIFY channel outbox inserts wake us on.
CHANNEL = "barnum_events"
#: Upper bound of one database round trip before we call the connection bad.
DB_TIMEOUT = 30.0
#: Reconnect / retry backoff: first wait and cap (seconds).
BACKOFF_FIRST = 0.1
BACKOFF_CAP = 5.0
#: When due work exists but could not be claimed (another relay holds the
#: rows), look again after this long instead of spinning.
BUSY_RETRY = 0.05
#: After going idle, look once more this much later (see _deliver_loop).
SETTLE = 0.05
#: Longest a finished delivery waits for others of its claim to share one
#: record_attempts call (seconds).
LINGER = 0.005
#: Longest the claim loop waits for its own requests after a short claim of
#: several rows before looking again (seconds) — the most a hanging request
#: delays newer events.  (A claim of one row or none goes idle at once.)
BUSY_POLL = 0.05
#: Most outcomes recorded in one record_attempts call.
MAX_RECORD = 1000
#: At most this many error strings in a summary.
MAX_SUMMARY_ERRORS = 50


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    concurrency: int = 32
    batch: int = 50
    sweep_interval: float = 5.0
    grace: float = 10.0
    lease: float = 60.0
    batches_in_flight: int = 2

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        return cls(
            concurrency=args.concurrency,
            batch=args.batch,
            sweep_interval=args.sweep_interval,
            grace=args.grace,
            lease=args.lease,
            batches_in_flight=getattr(args, "batches_in_flight", 2),
        )


# ---------------------------------------------------------------- summary


@dataclass
class Stats:
    """What one pass (or a whole run) did."""

    claimed: int = 0
    delivered: int = 0
    retried: int = 0  # retryable failures (the SQL dead-letters the last one)
    dead: int = 0  # final failures (non-retryable status or error)
    skipped: int = 0  # results record_attempts ignored: the claim was lost (fencing)
    errors: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def error(self, text: str) -> None:
        if len(self.errors) < MAX_SUMMARY_ERRORS:
            self.errors.append(text)

    @property
    def failed(self) -> int:
        return self.retried + self.dead

    def summary(self) -> dict[str, Any]:
        """The ``--once`` summary."""
        return {
            "success": True,
            "claimed": self.claimed,
            "delivered": self.delivered,
            "retried": self.retried,
            "dead": self.dead,
            "skipped": self.skipped,
            "duration": round(time.monotonic() - self.started, 3),
            "errors": list(self.errors),
        }

    def seed_summary(self) -> dict[str, Any]:
        """The seed's cron response: ``{success, processed, failed, errors}``."""
        return {
            "success": True,
            "processed": self.delivered,
            "failed": self.failed,
            "errors": list(self.errors),
        }


def worker_name() -> str:
    """Unique per process: ``hostname:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{_secrets.token_hex(3)}"


def _backoff(failures: int) -> float:
    return float(min(BACKOFF_CAP, BACKOFF_FIRST * (2 ** max(failures - 1, 0))))


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


# ---------------------------------------------------------------- delivery


class Deliverer:
    """Claims due deliveries, POSTs them, records the outcomes.

    A sliding window, not batch-at-a-time: up to ``window`` deliveries
    (``batch × batches_in_flight``) may be claimed and not yet recorded.  The
    claim loop takes another batch as soon as a quarter of a batch of room is
    free, so one slow request (a receiver timing out) holds only its own slot
    instead of keeping the next batch waiting for it.  Outcomes go to one
    background recorder that sends them in ``record_attempts`` calls of up to
    ``MAX_RECORD`` rows (group commit: what finished while the last call ran
    goes in the next one).  A slot is freed only when its outcome is recorded,
    so a slow database pushes back on claiming and no lease runs out unrecorded.

    Shared by the long-running :class:`Relay`, ``--once`` and the shim's
    in-process ``POST /api/internal`` (:func:`run_once`).
    """

    def __init__(
        self,
        pool: Any,
        transport: Transport,
        config: Config,
        worker: str,
        *,
        batch: int = 50,
        concurrency: int = 32,
        lease: float = 60.0,
        batches_in_flight: int = 2,
    ) -> None:
        self.pool = pool
        self.transport = transport
        self.worker = worker
        self.batch = batch
        self.window = batch * max(1, batches_in_flight)
        self.min_claim = max(1, batch // 4)
        self.lease_seconds = lease
        self.lease = timedelta(seconds=lease)
        self.default_key = config.signing_key
        self.semaphore = asyncio.Semaphore(concurrency)
        self.stats = Stats()
        #: Set when no new batch may be claimed (shutdown).
        self.stopping = False
        #: Set when in-flight requests must be abandoned (grace period over).
        self.abort = asyncio.Event()
        self._keys: dict[str, bytes | None] = {}
        #: Claimed rows whose outcome is not recorded yet (nor given up on).
        self._open = 0
        self._room = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Requests not finished yet (a subset of the open rows).
        self._posting = 0
        self._all_posted = asyncio.Event()
        self._results: list[AttemptResult] = []
        self._result_added = asyncio.Event()
        self._recorder: asyncio.Task[None] | None = None
        #: Called after outcomes with failures were recorded (new due times).
        self.on_recorded: Callable[[], None] | None = None
        #: Claims that returned several rows (each ends a waiter registration).
        self.multi_row_claims = 0

    def stop(self) -> None:
        """Claim no more (shutdown); a claim loop waiting for room returns."""
        self.stopping = True
        self._room.set()

    # -- claiming --------------------------------------------------------

    async def drain(self) -> int:
        """Claim and start deliveries until a claim comes back with one row
        or none; rows claimed.  Does not wait for the last requests: see :meth:`settle`."""
        total = 0
        while not self.stopping and not self.abort.is_set():
            self._room.clear()
            room = self.window - self._open
            if room < self.min_claim:
                await self._wait_for(self._room)
                continue
            limit = min(self.batch, room)
            rows = await self.claim(limit)
            total += len(rows)
            self._start(rows)
            if len(rows) < limit:
                if len(rows) <= 1:
                    # The queue is empty and traffic sparse: go idle now.
                    # A one-row claim kept our registration, so the next
                    # event's NOTIFY wakes us; after a claim of several rows
                    # relay_idle registers us again and reports anything
                    # that arrived since.  An empty claim here would only
                    # lengthen the cycle a new event waits for.
                    break
                # Events are arriving faster than one per claim.  Stay busy
                # (unregistered: producers send no NOTIFY) while our
                # requests run, then look again — what arrived meanwhile
                # goes out in one claim.  Wait at most BUSY_POLL, so a
                # hanging request delays newer events by that much, not by
                # its timeout.
                self._all_posted.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wait_for(self._all_posted), BUSY_POLL)
        return total

    async def claim(self, limit: int | None = None) -> list[ClaimedRow]:
        rows = await store.claim(self.pool, self.worker, limit or self.batch, self.lease, timeout=DB_TIMEOUT)
        self.stats.claimed += len(rows)
        if len(rows) > 1:
            # claim_batch dropped this worker's waiter registration.
            self.multi_row_claims += 1
        return rows

    def _start(self, rows: list[ClaimedRow]) -> None:
        self._open += len(rows)
        for row in rows:
            task = asyncio.create_task(self._deliver_one(row))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _wait_for(self, event: asyncio.Event) -> None:
        """Wait for ``event`` or the abort, whichever comes first."""
        waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self.abort.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def _free(self, n: int) -> None:
        self._open -= n
        self._room.set()

    # -- delivering ------------------------------------------------------

    async def _deliver_one(self, row: ClaimedRow) -> None:
        queued = False
        self._posting += 1
        try:
            result = await self._deliver(row)
            if result is not None:
                metrics.DELIVERY_SECONDS.observe((result.get("duration_ms") or 0) / 1000.0)
                metrics.DELIVERIES.labels(
                    outcome="delivered" if result["ok"] else ("retry" if result["retryable"] else "dead_letter")).inc()
                self._results.append(result)
                queued = True
        except Exception as exc:  # noqa: BLE001 — a bug here must not leak the slot
            logs.log(log, logging.ERROR, "delivery task failed", error=_describe(exc))
        finally:
            # (A cancelled request — grace period over — is not recorded:
            # release_deliveries hands its row back.)
            self._posting -= 1
            if self._posting == 0:
                self._all_posted.set()
            if queued:
                self._result_added.set()
                self._kick_recorder()
            else:
                self._free(1)

    async def settle(self) -> None:
        """Wait until every started request has finished — or, once the
        grace period is over (``abort``), cancel what is still in flight."""
        while self._tasks:
            if self.abort.is_set():
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
                return
            everything = asyncio.ensure_future(asyncio.wait(list(self._tasks)))
            aborted = asyncio.ensure_future(self.abort.wait())
            try:
                await asyncio.wait({everything, aborted}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                aborted.cancel()
                everything.cancel()

    # -- recording -------------------------------------------------------

    def _kick_recorder(self) -> None:
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.create_task(self._record_loop(), name="barnum-relay-record")

    async def _record_loop(self) -> None:
        while self._results:
            # Requests of the same claim finish within milliseconds of each
            # other: give them a moment to join this call (at most LINGER,
            # never while stopping or when nothing else is in flight).
            deadline = time.monotonic() + LINGER
            while (len(self._results) < self.batch and self._posting > 0 and not self.stopping
                   and (left := deadline - time.monotonic()) > 0):
                self._result_added.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._result_added.wait(), left)
            chunk = self._results[:MAX_RECORD]
            del self._results[:MAX_RECORD]
            try:
                await self.record(chunk)
            finally:
                self._free(len(chunk))
            if self.on_recorded is not None and not all(r["ok"] for r in chunk):
                # Retries got new due times: the relay's timer must look again.
                self.on_recorded()

    async def flush(self) -> None:
        """Wait until every finished request's outcome has been recorded."""
        while self._results or (self._recorder is not None and not self._recorder.done()):
            if self._recorder is None or self._recorder.done():
                self._kick_recorder()
            assert self._recorder is not None
            with contextlib.suppress(Exception):
                await asyncio.shield(self._recorder)

    def _key(self, secret: str | None) -> bytes | None:
        if not secret:
            return self.default_key
        try:
            return self._keys[secret]
        except KeyError:
            pass
        try:
            key: bytes | None = parse_secrets(secret)[0]
        except ValueError:
            key = None
        self._keys[secret] = key
        return key

    def _request(self, row: ClaimedRow) -> tuple[bytes, dict[str, str]] | HttpResult:
        """Body and headers of one delivery, or why it cannot be sent."""
        if row["payload"] is None:
            return HttpResult(None, None, None, FINAL_ERROR_PREFIX + "nothing to send for this event", 0)
        body: bytes = row["payload"].encode()
        if row.get("kind") == "whatsapp_cloud":
            # The Graph API: the access token stays in the relay's
            # environment; the endpoint's secret names the variable.
            name = row["secret"] or "WHATSAPP_TOKEN"
            token = os.environ.get(name, "").strip()
            if not token:
                return HttpResult(None, None, None,
                                  FINAL_ERROR_PREFIX + f"{name} is not set in the relay's environment", 0)
            return body, {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        key = self._key(row["secret"])
        if key is None:
            return HttpResult(None, None, None,
                              FINAL_ERROR_PREFIX + "the endpoint's secret is not valid (whsec_ needs base64)", 0)
        return body, outbound_headers(
            key, body, event_id=str(row["event_id"]), event_type=row["event_type"],
            idempotency_key=row["idempotency_key"],
        )

    async def _deliver(self, row: ClaimedRow) -> AttemptResult | None:
        event_id = str(row["event_id"])
        request = self._request(row)
        if isinstance(request, HttpResult):
            result = request
        else:
            body, headers = request
            async with self.semaphore:
                if self.stopping:
                    # Shutting down: a request not yet started is not in
                    # flight; release_deliveries hands the row back.
                    return None
                result = await self.transport.post(row["url"], body, headers, row["timeout_ms"])
        ok = result.ok
        retryable = (not ok) and result.retryable
        if ok:
            self.stats.delivered += 1
            outcome = "delivered"
        elif retryable:
            self.stats.retried += 1
            outcome = "retryable_failure"
        else:
            self.stats.dead += 1
            outcome = "final_failure"
        error = result.error
        if not ok:
            reason = error or f"HTTP {result.status}"
            self.stats.error(f"event {event_id} to endpoint {row['endpoint_id']}: {reason}"
                             + (" (retryable)" if retryable else " (final)"))
        logs.log(
            log, logging.INFO, "delivery",
            event_id=event_id, endpoint_id=str(row["endpoint_id"]), delivery_id=row["delivery_id"],
            attempt=row["attempt"], status=outcome, http_status=result.status,
            duration_ms=result.duration_ms, **({"error": error} if error else {}),
        )
        return {
            "delivery_id": row["delivery_id"],
            "attempt": row["attempt"],
            "ok": ok,
            "retryable": retryable,
            "http_status": result.status,
            "duration_ms": result.duration_ms,
            "error": error,
            "response_body": result.body,
            "retry_after_seconds": result.retry_after,
        }

    async def record(self, results: list[AttemptResult]) -> None:
        """``record_attempts`` for a batch; retried with backoff while the
        database is unreachable (up to the lease: after it the rows are
        someone else's and fencing would ignore us anyway)."""
        if not results:
            return
        deadline = time.monotonic() + self.lease_seconds
        failures = 0
        while True:
            try:
                applied = await store.record_attempts(self.pool, results, timeout=DB_TIMEOUT)
                break
            except Exception as exc:  # noqa: BLE001 — database trouble of any kind
                failures += 1
                if barnum_error(exc) is not None or time.monotonic() >= deadline or self.abort.is_set():
                    logs.log(log, logging.ERROR, "could not record a batch; its leases will expire",
                             rows=len(results), error=_describe(exc))
                    self.stats.error(f"record_attempts failed: {_describe(exc)}")
                    return
                logs.log(log, logging.WARNING, "record_attempts failed; retrying",
                         rows=len(results), error=_describe(exc), attempt=failures)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.abort.wait(), _backoff(failures))
        self.stats.skipped += len(results) - applied


# ---------------------------------------------------------------- one pass


async def process_due(
    pool: Any,
    transport: Transport,
    config: Config,
    worker: str,
    *,
    batch: int = 50,
    concurrency: int = 32,
    lease: float = 60.0,
    batches_in_flight: int = 2,
    tick: bool = True,
    deliverer: Deliverer | None = None,
) -> Stats:
    """Run ``tick()`` then deliver everything due now; the pass's :class:`Stats`."""
    d = deliverer or Deliverer(pool, transport, config, worker, batch=batch, concurrency=concurrency,
                               lease=lease, batches_in_flight=batches_in_flight)
    if tick:
        try:
            await store.tick(pool, timeout=DB_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 — a failed tick must not block delivery
            logs.log(log, logging.ERROR, "tick failed", error=_describe(exc))
            d.stats.error(f"tick failed: {_describe(exc)}")
    try:
        await d.drain()
    finally:
        await d.settle()
        await d.flush()
        if d.abort.is_set() or d.stopping:
            await _release(pool, worker)
    return d.stats


async def run_once(pool: Any, transport: Transport, config: Config, worker: str,
                   **options: Any) -> dict[str, Any]:
    """One relay pass in-process (the shim's ``POST /api/internal``):
    ``{"success": true, "processed": n, "failed": n, "errors": [...]}``."""
    stats = await process_due(pool, transport, config, worker, **options)
    return stats.seed_summary()


async def _release(pool: Any, worker: str) -> int:
    """Hand back this worker's unfinished claims; a few tries, then leave
    them to lease expiry."""
    for failures in range(1, 6):
        try:
            released = await store.release_deliveries(pool, worker, timeout=10.0)
            if released:
                logs.log(log, logging.INFO, "released unfinished deliveries", worker=worker, count=released)
            return released
        except Exception as exc:  # noqa: BLE001
            logs.log(log, logging.WARNING, "release_deliveries failed", error=_describe(exc), attempt=failures)
            await asyncio.sleep(_backoff(failures))
    return 0


async def ensure_n8n_endpoint(pool: Any, config: Config) -> None:
    """``N8N_WEBHOOK_URL`` → an endpoint named ``n8n`` with that URL
    (inserted or re-pointed; never re-enabled)."""
    if not config.n8n_webhook_url:
        return
    try:
        await store.ensure_endpoint(pool, "n8n", config.n8n_webhook_url, timeout=DB_TIMEOUT)
    except asyncpg.PostgresError as exc:
        err = barnum_error(exc)
        if err is not None:
            raise ConfigError(f"N8N_WEBHOOK_URL: {err.message}") from None
        raise


# ---------------------------------------------------------------- the relay


class Relay:
    """The long-running relay of one process."""

    def __init__(self, config: Config, options: Options | None = None, *, worker: str | None = None) -> None:
        config.require("DATABASE_URL", "WEBHOOK_SECRET")
        self.config = config
        self.options = options or Options()
        self.worker = worker or worker_name()
        self.pool: Any = None
        self.listen_conn: Any = None
        self.transport = Transport(self.options.concurrency)
        self.deliverer: Deliverer | None = None
        self.stopping = False
        self.stats = Stats()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._sweep_now = asyncio.Event()
        self._listener_lock = asyncio.Lock()
        self._grace_timer: asyncio.TimerHandle | None = None
        self.on_signal: Callable[[int], None] | None = None
        #: Set when metrics are served (``--metrics-port``): sweeps refresh the queue gauges.
        self.queue_gauges = False
        # How long a "waiting" registration lives: the sweep renews it, so a
        # crashed relay's registration lapses on its own.
        self._waiter_ttl = timedelta(seconds=max(30.0, 3 * self.options.sweep_interval))

    # -- lifecycle -------------------------------------------------------

    def request_stop(self, signum: int | None = None) -> None:
        """Stop claiming; in-flight work gets ``grace`` seconds.  A second
        request abandons in-flight work at once."""
        if self.on_signal is not None and signum is not None:
            self.on_signal(signum)
        if self.stopping:
            if self.deliverer is not None:
                self.deliverer.abort.set()
            return
        logs.log(log, logging.INFO, "stopping", worker=self.worker, grace_seconds=self.options.grace,
                 **({"signal": signal.Signals(signum).name} if signum else {}))
        self.stopping = True
        self._stop.set()
        self._wake.set()
        self._sweep_now.set()
        if self.deliverer is not None:
            self.deliverer.stop()
            abort = self.deliverer.abort
            self._grace_timer = asyncio.get_running_loop().call_later(self.options.grace, abort.set)

    def _install_signals(self) -> list[int]:
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop, int(sig))
                installed.append(int(sig))
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (e.g. embedded): the caller stops us
        return installed

    async def _sleep(self, seconds: float) -> None:
        """Sleep, cut short by a stop request."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _connect_pool(self, *, retry: bool) -> Any:
        failures = 0
        while True:
            try:
                return await create_pool(
                    self.config.database_url or "",
                    public_url=self.config.public_url,
                    min_size=1,
                    # claims + the recorder + relay_idle + sweep, with room to spare
                    max_size=2 * self.options.batches_in_flight + 3,
                    application_name="barnum-relay",
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError) as exc:
                failures += 1
                if not retry or self.stopping:
                    raise
                logs.log(log, logging.WARNING, "database unreachable; retrying",
                         error=_describe(exc), attempt=failures)
                await self._sleep(_backoff(failures))
                if self.stopping:
                    raise

    async def run(self, *, once: bool = False) -> int:
        """Run until stopped (or, with ``once``, until nothing is due)."""
        installed = self._install_signals()
        try:
            try:
                self.pool = await self._connect_pool(retry=not once)
            except Exception as exc:  # noqa: BLE001
                if self.stopping:
                    return 0
                print(f"barnum relay: cannot connect to the database: {_describe(exc)}", file=sys.stderr)
                return 1
            problem = await schema_problem(self.pool)
            if problem is not None:
                print(f"barnum relay: {problem}", file=sys.stderr)
                await self._shutdown()
                return 2
            try:
                await ensure_n8n_endpoint(self.pool, self.config)
                self.deliverer = Deliverer(
                    self.pool, self.transport, self.config, self.worker,
                    batch=self.options.batch, concurrency=self.options.concurrency,
                    lease=self.options.lease, batches_in_flight=self.options.batches_in_flight,
                )
                self.deliverer.stats = self.stats
                self.deliverer.on_recorded = self._wake.set
                if self.stopping:
                    self.deliverer.stop()
                if once:
                    await process_due(self.pool, self.transport, self.config, self.worker,
                                      deliverer=self.deliverer)
                    print(json.dumps(self.stats.summary()), flush=True)
                    return 0
                await self._serve()
                return 0
            finally:
                await self._shutdown()
        finally:
            loop = asyncio.get_running_loop()
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def _serve(self) -> None:
        await self._ensure_listener()
        logs.log(log, logging.INFO, "relay started", worker=self.worker, pid=os.getpid(),
                 concurrency=self.options.concurrency, batch=self.options.batch,
                 batches_in_flight=self.options.batches_in_flight,
                 sweep_interval=self.options.sweep_interval, lease=self.options.lease)
        self._sweep_now.set()  # tick once at start
        sweeper = asyncio.create_task(self._sweep_loop(), name="barnum-relay-sweep")
        try:
            await self._deliver_loop()
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sweeper

    async def _shutdown(self) -> None:
        if self.pool is not None and self.deliverer is not None:
            # In-flight requests get the rest of the grace period (the timer
            # set by request_stop aborts them), then outcomes are recorded
            # and whatever did not finish is handed back.
            await self.deliverer.settle()
            await self.deliverer.flush()
            await _release(self.pool, self.worker)
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        await self.transport.close()
        if self.listen_conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.listen_conn.close(), 2.0)
            self.listen_conn = None
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), 5.0)
            except Exception:  # noqa: BLE001
                self.pool.terminate()
        if self.stopping or self.stats.claimed:
            logs.log(log, logging.INFO, "relay stopped", worker=self.worker,
                     **{k: v for k, v in self.stats.summary().items() if k not in ("errors", "success")})

    # -- the delivery loop -----------------------------------------------

    async def _deliver_loop(self) -> None:
        assert self.deliverer is not None
        failures = 0
        claimed = 0
        # False until we have looked once more after registering as waiting
        # (see below); the first registration needs that look too.
        settled = False
        due: datetime | None = None
        # When relay_idle last registered us, and multi_row_claims then: a
        # claim returning several rows ends the registration, one returning
        # one row or none keeps it (claim_batch).
        registered_at: float | None = None
        registered_mark = 0
        while not self.stopping:
            self._wake.clear()
            try:
                claimed = await self.deliverer.drain()
                if self.stopping:
                    break
                if claimed and self._wake.is_set():
                    # Woken while claiming (the next event's NOTIFY, or a
                    # retry was recorded): claim again at once — relay_idle
                    # first would put its round trip before that event.
                    settled = False
                    continue
                still_registered = (
                    registered_at is not None and registered_mark == self.deliverer.multi_row_claims
                    and time.monotonic() - registered_at < self._waiter_ttl.total_seconds() / 2)
                if claimed and still_registered:
                    # Sparse traffic: one event, one one-row claim.  We are
                    # still registered, so producers NOTIFY us, and the timer
                    # stands (delayed work queued since then notified us too)
                    # — no relay_idle round trip per event.
                    if due is not None and self._delay_until(due) == BUSY_RETRY:
                        due = None
                else:
                    # Requests may still be in flight (a slow receiver): they
                    # finish in the background.  A failure among them wakes
                    # this loop once recorded (on_recorded), so the timer sees
                    # the retry's new due time.
                    # Going idle: register as waiting, so producers NOTIFY us
                    # (they do not while every relay is busy), and get the timer.
                    mark = self.deliverer.multi_row_claims
                    due = await store.relay_idle(self.pool, self.worker, self._waiter_ttl, timeout=DB_TIMEOUT)
                    registered_at, registered_mark = time.monotonic(), mark
                    if claimed:
                        # A claim may have deregistered us: this registration
                        # needs its own look after it.
                        settled = False
                if failures:
                    logs.log(log, logging.INFO, "database reachable again", worker=self.worker)
                failures = 0
            except Exception as exc:  # noqa: BLE001 — database down, restarted, …
                if self.stopping:
                    break
                failures += 1
                logs.log(log, logging.WARNING, "delivery loop: database error; backing off",
                         error=_describe(exc), attempt=failures)
                await self._sleep(_backoff(failures))
                continue
            delay = self._delay_until(due)
            if delay == BUSY_RETRY and claimed:
                # Work arrived between our last claim and going idle (it sent
                # no NOTIFY: we were not registered yet).  Claim it now; the
                # pause is only for rows another relay holds.
                delay = 0.0
            elif not settled and (delay is None or delay > SETTLE):
                # Just gone idle.  A producer whose trigger ran before our
                # registration committed sent no NOTIFY, and if it committed
                # after relay_idle's snapshot we did not see its work either:
                # look once more shortly (its commit takes an fsync or so).
                # A claim that finds nothing keeps the registration, so this
                # look opens no new gap.  The sweep bounds anything that
                # still slips through (a producer transaction held open
                # longer than SETTLE).
                settled = True
                delay = SETTLE
            if delay is None or delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)

    @staticmethod
    def _delay_until(due: datetime | None) -> float | None:
        """Seconds until ``due``: ``None`` = nothing scheduled (wait for a
        wake-up).  Due work that we could not claim (another relay holds the
        rows) is looked at again after a short pause."""
        if due is None:
            return None
        if due.tzinfo is None:
            due = due.replace(tzinfo=timezone.utc)
        delay = (due - datetime.now(timezone.utc)).total_seconds()
        return BUSY_RETRY if delay <= 0 else delay + 0.002

    # -- LISTEN and sweep -------------------------------------------------

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._wake.set()

    def _on_listener_lost(self, conn: Any) -> None:
        if conn is self.listen_conn and not self.stopping:
            logs.log(log, logging.WARNING, "LISTEN connection lost; reconnecting", worker=self.worker)
            self._sweep_now.set()

    async def _connect_listener(self) -> Any:
        dsn = self.config.listen_database_url or self.config.database_url
        conn = await asyncpg.connect(
            dsn, timeout=10.0, server_settings={"application_name": "barnum-relay-listen"},
        )
        try:
            await conn.add_listener(CHANNEL, self._on_notify)
            conn.add_termination_listener(self._on_listener_lost)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _listener_healthy(self) -> bool:
        conn = self.listen_conn
        if conn is None or conn.is_closed():
            return False
        try:
            # Any round trip proves the connection; this one is granted to
            # the relay role and cheap.
            await store.next_due_at(conn, timeout=min(5.0, max(1.0, self.options.sweep_interval)))
            return True
        except Exception:  # noqa: BLE001
            return False

    async def _ensure_listener(self) -> bool:
        """Check the LISTEN connection; reconnect with capped exponential
        backoff if it is gone.  True when it was reconnected."""
        async with self._listener_lock:
            if await self._listener_healthy():
                return False
            old, self.listen_conn = self.listen_conn, None
            if old is not None:
                old.terminate()
                logs.log(log, logging.WARNING, "LISTEN connection is dead; reconnecting", worker=self.worker)
            failures = 0
            while not self.stopping:
                try:
                    self.listen_conn = await self._connect_listener()
                    if old is not None or failures:
                        logs.log(log, logging.INFO, "LISTEN connection restored", worker=self.worker)
                    return True
                except Exception as exc:  # noqa: BLE001
                    failures += 1
                    logs.log(log, logging.WARNING, "LISTEN connect failed; retrying",
                             error=_describe(exc), attempt=failures)
                    await self._sleep(_backoff(failures))
            return False

    async def _sweep_loop(self) -> None:
        while not self.stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._sweep_now.wait(), self.options.sweep_interval)
            if self.stopping:
                break
            self._sweep_now.clear()
            await self._sweep()

    async def _sweep(self) -> None:
        try:
            await self._ensure_listener()
        except Exception as exc:  # noqa: BLE001
            logs.log(log, logging.ERROR, "LISTEN check failed", error=_describe(exc))
        if self.stopping:
            return
        try:
            counts = await store.tick(self.pool, timeout=DB_TIMEOUT)
            if self.queue_gauges:
                await metrics.refresh_queue_gauges(self.pool)
            if any(v for v in counts.values() if isinstance(v, (int, float))):
                logs.log(log, logging.INFO, "tick", **{k: v for k, v in counts.items()
                                                       if isinstance(v, (int, float, str))})
        except Exception as exc:  # noqa: BLE001
            logs.log(log, logging.WARNING, "tick failed", error=_describe(exc))
        # Whatever a missed notification would have said, look now.
        self._wake.set()


__all__ = ["run_once", "process_due", "Relay", "Deliverer", "Options", "Stats", "worker_name"]

if __name__ == "__main__":
    # `python -m listener.relay` is `barnum relay` (the --processes children
    # and the previous releases' service files start it this way).
    from listener.relay_cli import _cli

    sys.exit(_cli())

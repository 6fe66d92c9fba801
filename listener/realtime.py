"""Realtime conversations over Socket.IO (SPEC-2 §D), mounted in the shim.

A python-socketio ``AsyncServer`` answers at ``/socket.io/`` (Engine.IO 4 /
Socket.IO 5 — what ``socket.io-client`` 4.x speaks), so the seed's frontend
connects unchanged with ``io(URL, {auth: {token}})``:

* **connect**: an API token with scope ``conversations:read`` from
  ``auth.token`` or an ``Authorization: Bearer`` header, checked by SQL
  (``realtime_auth``); anything else is refused (``connect_error``).
* ``join:conversation`` (contactId) joins the room of that contact only if
  ``realtime_can_join`` says it is the token's account's; the ack is true or
  false, and false says nothing about whether the id exists elsewhere.
  ``leave:conversation`` leaves it.
* The server emits ``message:new``, ``message:status``, ``typing:start``,
  ``typing:stop`` and ``session:updated`` to ``conversation:<contactId>``.

It is fed by one dedicated asyncpg connection that LISTENs on
``barnum_realtime`` (``LISTEN_DATABASE_URL`` if set): the payloads carry ids
only; a notification about a contact no socket watches is dropped without a
query, the rest are drained in bursts into **one** ``realtime_events`` call
each and emitted in the order they arrived (commit order).  The connection is
health-checked and re-opened with capped exponential backoff.  Internally a
room is also keyed by the account that joined it, so an event can only reach
sockets of its own account.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

import asyncpg
import socketio

from listener import logs, metrics, store
from listener.config import Config
from listener.db import barnum_error

log = logging.getLogger("barnum.realtime")
_P = ParamSpec("_P")
_T = TypeVar("_T")

CHANNEL: Final = "barnum_realtime"
#: Where socket.io-client looks by default (its ``path`` option).
PATH: Final = "/socket.io"
#: Same shape as SQL's check in ``api_account``: anything else is refused
#: without a query.
TOKEN_RE: Final = re.compile(r"bnt_[A-Za-z0-9_-]{43}")
#: Notifications per realtime_events call.
BATCH_MAX: Final = 500
#: Seconds between health checks of the LISTEN connection.
HEALTH_INTERVAL: Final = 10.0
#: How long a registration in barnum.realtime_listeners lasts (refreshed
#: every HEALTH_INTERVAL while a conversation is open here).
REGISTRATION_TTL: Final = timedelta(seconds=30)
BACKOFF_FIRST: Final = 0.5
BACKOFF_CAP: Final = 30.0
ACQUIRE_TIMEOUT: Final = 5.0
QUERY_TIMEOUT: Final = 10.0
#: Rooms one socket may be in (a staff screen shows a handful).
MAX_ROOMS_PER_CLIENT: Final = 200
#: A client's packets are tiny ("join:conversation", an id).
MAX_MESSAGE_BYTES: Final = 16 * 1024


@dataclass
class _Client:
    account: str
    #: Kept (in memory only) to re-check the account on every join, so a
    #: revoked token joins nothing more.  Never logged.
    token: str = field(repr=False)
    rooms: set[str] = field(default_factory=set)


def room_of(account: str, contact: str) -> str:
    """The Socket.IO room: the seed's name, keyed by the account."""
    return f"{account}:conversation:{contact}"


def contact_of(payload: str) -> str | None:
    """The contact id a ``barnum_realtime`` payload is about (see 89_realtime.sql)."""
    parts = payload.split(":")
    if parts[0] == "typing" and len(parts) == 3:
        return parts[1]
    if parts[0] in ("message", "status", "session") and len(parts) >= 3:
        return parts[2]
    return None


def bearer_token(auth: Any, environ: dict[str, Any]) -> str | None:
    """The token of a connect: ``auth.token`` first (what socket.io-client
    sends), else ``Authorization: Bearer``."""
    if isinstance(auth, dict) and isinstance(auth.get("token"), str):
        value: str = auth["token"]
        # A frontend may pass the header's value as it is.
        return value[7:].strip() if value[:7].lower() == "bearer " else value.strip()
    header = environ.get("HTTP_AUTHORIZATION")
    if isinstance(header, str):
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return None


def _backoff(failures: int) -> float:
    return float(min(BACKOFF_CAP, BACKOFF_FIRST * (2 ** max(failures - 1, 0))))


def _error_fields(exc: BaseException) -> dict[str, Any]:
    """Type and SQLSTATE only: a message may quote a token."""
    fields: dict[str, Any] = {"error_type": type(exc).__name__}
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str):
        fields["sqlstate"] = state
    return fields


class Realtime:
    """The Socket.IO server and its LISTEN feed; one per shim app."""

    def __init__(self, config: Config) -> None:
        self.config = config
        origins: list[str] | str | None
        if "*" in config.cors_origins:
            origins = "*"
        elif config.cors_origins:
            origins = list(config.cors_origins)
        else:
            origins = None  # python-engineio: same origin only
        self.sio = socketio.AsyncServer(
            async_mode="asgi",
            cors_allowed_origins=origins,
            logger=False,
            engineio_logger=False,
            max_http_buffer_size=MAX_MESSAGE_BYTES,
        )
        self.sio.on("connect", self._on_connect)
        self.sio.on("disconnect", self._on_disconnect)
        self.sio.on("join:conversation", self._on_join)
        self.sio.on("leave:conversation", self._on_leave)
        self.pool: Any = None
        self.clients: dict[str, _Client] = {}
        #: contact id → sockets in its room (any account): what is worth a query.
        self.watched: collections.Counter[str] = collections.Counter()
        self._pending: collections.deque[str] = collections.deque()
        self._wake = asyncio.Event()
        self._lost = asyncio.Event()
        self._stop = asyncio.Event()
        self._conn: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        #: This process's name in barnum.realtime_listeners, and when it last
        #: registered there (monotonic; 0: not registered).
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._registered_at = 0.0

    # --- ASGI ---------------------------------------------------------------

    def handles(self, scope: dict[str, Any]) -> bool:
        path = scope.get("path", "")
        return scope.get("type") in ("http", "websocket") and (path == PATH or path.startswith(PATH + "/"))

    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        await self.sio.handle_request(scope, receive, send)

    # --- lifecycle ----------------------------------------------------------

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is open."""
        return self._conn is not None and not self._conn.is_closed()

    async def start(self, pool: Any) -> None:
        """Begin listening (in the background: a database that is away now
        does not stop the shim)."""
        self.pool = pool
        self._stop.clear()
        if not (self.config.listen_database_url or self.config.database_url):
            # An app given only a pool (embedding): no URL to LISTEN with.
            logs.log(log, logging.WARNING, "realtime: no DATABASE_URL to LISTEN with; no events will be sent")
            return
        self._tasks = [asyncio.create_task(self._supervise(), name="realtime-listen"),
                       asyncio.create_task(self._drain(), name="realtime-emit")]

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._lost.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.sio.shutdown(), 5.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        await self._close_listener()

    # --- LISTEN ---------------------------------------------------------------

    async def _connect(self) -> Any:
        dsn = self.config.listen_database_url or self.config.database_url
        conn = await asyncpg.connect(dsn, timeout=10.0,
                                     server_settings={"application_name": "barnum-shim-realtime"})
        try:
            await conn.add_listener(CHANNEL, self._on_notify)
            conn.add_termination_listener(self._on_lost)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _close_listener(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except Exception:  # noqa: BLE001 - closing anyway
                conn.terminate()

    async def _healthy(self) -> bool:
        conn = self._conn
        if conn is None or conn.is_closed():
            return False
        try:
            await store.realtime_ping(conn, timeout=5.0)
            return True
        except Exception:  # noqa: BLE001 - any failure means "re-open it"
            return False

    def _on_lost(self, conn: Any) -> None:
        if conn is self._conn and not self._stop.is_set():
            logs.log(log, logging.WARNING, "realtime: LISTEN connection lost; reconnecting")
            self._lost.set()

    async def _supervise(self) -> None:
        failures = 0
        while not self._stop.is_set():
            if not await self._healthy():
                had = self._conn is not None
                if self._conn is not None:
                    self._conn.terminate()
                    self._conn = None
                try:
                    self._conn = await self._connect()
                except Exception as exc:  # noqa: BLE001 - retried with backoff
                    failures += 1
                    logs.log(log, logging.WARNING, "realtime: LISTEN connect failed; retrying",
                             attempt=failures, **_error_fields(exc))
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), _backoff(failures))
                    continue
                if had or failures:
                    logs.log(log, logging.INFO, "realtime: LISTEN connection restored")
                failures = 0
            await self._keep_registration()
            self._lost.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._lost.wait(), HEALTH_INTERVAL)

    async def _keep_registration(self) -> None:
        """While a conversation is open here, stay registered (the triggers
        NOTIFY only then); when none is, leave."""
        try:
            if self.watched:
                await self._register()
            elif self._registered_at:
                await self._db(store.realtime_quiet, self.worker)
                self._registered_at = 0.0
        except Exception as exc:  # noqa: BLE001 - retried at the next health check
            logs.log(log, logging.WARNING, "realtime: registration failed", **_error_fields(exc))

    async def _register(self) -> None:
        await self._db(store.realtime_listening, self.worker, REGISTRATION_TTL)
        self._registered_at = time.monotonic()

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        contact = contact_of(payload)
        # Nobody watches this conversation: no query, no work.
        if contact is None or contact not in self.watched:
            metrics.REALTIME_NOTIFICATIONS.labels(outcome="unwatched").inc()
            return
        metrics.REALTIME_NOTIFICATIONS.labels(outcome="queued").inc()
        self._pending.append(payload)
        self._wake.set()

    async def _drain(self) -> None:
        """Notifications → one realtime_events call per burst → emits, in order."""
        while not self._stop.is_set():
            await self._wake.wait()
            self._wake.clear()
            while self._pending and not self._stop.is_set():
                batch = [self._pending.popleft() for _ in range(min(BATCH_MAX, len(self._pending)))]
                try:
                    async with self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as con:
                        events = await store.realtime_events(con, batch, timeout=QUERY_TIMEOUT)
                except Exception as exc:  # noqa: BLE001 - these events are lost; clients refetch
                    logs.log(log, logging.WARNING, "realtime: events unavailable; dropped",
                             notifications=len(batch), **_error_fields(exc))
                    continue
                for event in events:
                    try:
                        await self._emit(event)
                    except Exception as exc:  # noqa: BLE001 - one bad emit must not stop the feed
                        logs.log(log, logging.ERROR, "realtime: emit failed", **_error_fields(exc))

    async def _emit(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        name, room, account = event.get("event"), event.get("room"), event.get("account_id")
        if not (isinstance(name, str) and isinstance(room, str) and isinstance(account, str)):
            return
        contact = room.removeprefix("conversation:")
        await self.sio.emit(name, event.get("data"), to=room_of(account, contact))
        metrics.REALTIME_EVENTS.labels(event=name).inc()

    # --- Socket.IO handlers ------------------------------------------------------

    async def _db(self, call: Callable[Concatenate[Any, _P], Awaitable[_T]], *args: _P.args,
                  **kwargs: _P.kwargs) -> _T:
        """``call`` (a :mod:`listener.store` function) on a pooled connection."""
        if self.pool is None:
            raise asyncpg.InterfaceError("the database pool is not open")
        kwargs.setdefault("timeout", QUERY_TIMEOUT)
        async with self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as con:
            return await call(con, *args, **kwargs)

    async def _on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        token = bearer_token(auth, environ)
        if token is None or not TOKEN_RE.fullmatch(token):
            metrics.REALTIME_CONNECTIONS.labels(outcome="unauthorized").inc()
            raise socketio.exceptions.ConnectionRefusedError(
                "missing or invalid API token", {"code": "UNAUTHORIZED"})
        try:
            account = await self._db(store.realtime_auth, token)
        except Exception as exc:  # noqa: BLE001 - every failure refuses the connection
            err = barnum_error(exc)
            if err is not None and err.code in ("BN401", "BN403"):
                code = "UNAUTHORIZED" if err.code == "BN401" else "FORBIDDEN"
                metrics.REALTIME_CONNECTIONS.labels(outcome=code.lower()).inc()
                raise socketio.exceptions.ConnectionRefusedError(err.message, {"code": code}) from None
            metrics.REALTIME_CONNECTIONS.labels(outcome="unavailable").inc()
            logs.log(log, logging.WARNING, "realtime: connect failed", **_error_fields(exc))
            raise socketio.exceptions.ConnectionRefusedError(
                "the service is unavailable; retry later", {"code": "UNAVAILABLE"}) from None
        self.clients[sid] = _Client(account=str(account), token=token)
        metrics.REALTIME_CONNECTIONS.labels(outcome="accepted").inc()
        metrics.REALTIME_CLIENTS.inc()

    async def _on_disconnect(self, sid: str, *_reason: Any) -> None:
        client = self.clients.pop(sid, None)
        if client is None:
            return
        metrics.REALTIME_CLIENTS.dec()
        for contact in client.rooms:
            self._unwatch(contact)

    async def _on_join(self, sid: str, contact_id: Any = None, *_: Any) -> bool:
        client = self.clients.get(sid)
        if client is None or not isinstance(contact_id, str) or len(contact_id) > 64:
            return False
        try:
            contact = str(uuid.UUID(contact_id))  # the form NOTIFY payloads use
        except ValueError:
            return False
        if contact in client.rooms:
            return True
        if len(client.rooms) >= MAX_ROOMS_PER_CLIENT:
            return False
        try:
            allowed = await self._db(store.realtime_can_join, client.token, contact_id)
        except Exception as exc:  # noqa: BLE001 - refused either way
            err = barnum_error(exc)
            if err is not None and err.code in ("BN401", "BN403"):
                # The token was revoked (or lost its scope) since connecting.
                await self.sio.disconnect(sid)
            else:
                logs.log(log, logging.WARNING, "realtime: join failed", **_error_fields(exc))
            return False
        if allowed is not True or self.clients.get(sid) is not client:
            return False
        if contact in client.rooms:  # joined meanwhile by a concurrent call
            return True
        if time.monotonic() - self._registered_at > HEALTH_INTERVAL:
            # Registered (committed) before the ack: what commits after it is sent.
            try:
                await self._register()
            except Exception as exc:  # noqa: BLE001 - not joined: the client may retry
                logs.log(log, logging.WARNING, "realtime: registration failed", **_error_fields(exc))
                return False
        await self.sio.enter_room(sid, room_of(client.account, contact))
        client.rooms.add(contact)
        self.watched[contact] += 1
        return True

    async def _on_leave(self, sid: str, contact_id: Any = None, *_: Any) -> bool:
        client = self.clients.get(sid)
        if client is None or not isinstance(contact_id, str) or len(contact_id) > 64:
            return False
        try:
            contact = str(uuid.UUID(contact_id))
        except ValueError:
            return False
        if contact not in client.rooms:
            return False
        client.rooms.discard(contact)
        await self.sio.leave_room(sid, room_of(client.account, contact))
        self._unwatch(contact)
        return True

    def _unwatch(self, contact: str) -> None:
        self.watched[contact] -= 1
        if self.watched[contact] <= 0:
            del self.watched[contact]


class SocketIOMiddleware:
    """Pure ASGI: ``/socket.io/…`` goes to Socket.IO, the rest to the shim
    (its lifespan included, which starts and stops :class:`Realtime`)."""

    def __init__(self, app: Any, realtime: Realtime) -> None:
        self.app = app
        self.realtime = realtime

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.realtime.handles(scope):
            await self.realtime.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

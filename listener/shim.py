"""The HTTP shim (SPEC §4): patients' action links and n8n's signed callbacks.

A Starlette app served by uvicorn.  The shim holds no business rule: each
request is checked (size, media type, signature, JSON syntax), turned into
exactly one SQL call (``peek_action``, ``perform_action`` or
``handle_callback``), and the answer — or the ``BN4xx`` SQLSTATE — is mapped
to HTTP.

Routes
  GET|POST /api/action?type=…&token=…          action link (HTML)
  GET|POST /api/action/{confirm,cancel,reschedule}?token=…   seed aliases
  POST     /api/webhook                         n8n callback, action in body (JSON)
  POST     /api/webhooks/appointments/{confirm,cancel,reschedule,no-show-reschedule},
           /api/webhooks/reactivation/record, /api/webhooks/reviews/record
  POST     /api/internal (alias /api/internal/process-events)   one relay pass
  GET      /healthz, /readyz, /openapi.json

Hooks for the CLI: :func:`add_arguments` and :func:`main` (``barnum shim``);
:func:`serve` / :class:`ShimServer` to run the shim inside another event loop
(``barnum run``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import importlib
import json
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Concatenate, Final, ParamSpec, TypeVar
from urllib.parse import quote

import asyncpg
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from listener import logs, metrics, pages, store
from listener.config import Config, ConfigError
from listener.db import barnum_error, create_pool, schema_problem
from listener.realtime import Realtime, SocketIOMiddleware
from listener.signing import Verdict, verify_callback

log = logging.getLogger("barnum.shim")
_P = ParamSpec("_P")
_T = TypeVar("_T")

#: Largest callback body accepted (SPEC §4.2); enforced while reading.
MAX_BODY_BYTES: Final = 64 * 1024
#: Waiting for a pooled connection / for one SQL call (seconds).
ACQUIRE_TIMEOUT: Final = 5.0
QUERY_TIMEOUT: Final = 15.0
#: /readyz gives the database this long to answer.
READY_TIMEOUT: Final = 2.0
#: Pool size of one shim process.
POOL_MIN: Final = 2
POOL_MAX: Final = 10

ACTION_TYPES: Final = ("confirm", "cancel", "reschedule")
CALLBACK_ACTIONS: Final = ("confirm", "cancel", "reschedule", "no_show_reschedule", "reactivation", "review")
#: Same shape as SQL's check in ``usable_token``: anything else is not a link of ours.
TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]{16,128}")

#: Seed aliases of the callback endpoint → the action the path implies.
WEBHOOK_ALIASES: Final = {
    "/api/webhooks/appointments/confirm": "confirm",
    "/api/webhooks/appointments/cancel": "cancel",
    "/api/webhooks/appointments/reschedule": "reschedule",
    "/api/webhooks/appointments/no-show-reschedule": "no_show_reschedule",
    "/api/webhooks/reactivation/record": "reactivation",
    "/api/webhooks/reviews/record": "review",
}

#: Error code of the JSON error body for each HTTP status.
ERROR_CODES: Final = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    410: "GONE",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "UNPROCESSABLE",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}

#: Headers of every response: nothing cached, nothing leaked, nothing framed.
_COMMON_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
HTML_HEADERS: Final = {**_COMMON_HEADERS, "Content-Security-Policy": pages.CSP}
JSON_HEADERS: Final = {
    **_COMMON_HEADERS,
    "Content-Security-Policy": "default-src 'none'; base-uri 'none'; frame-ancestors 'none'",
}

#: One relay pass for POST /api/internal: ``{"success", "processed", "failed", "errors"}``.
RelayPass = Callable[[], Awaitable[dict[str, Any]]]


# ----------------------------------------------------------------- responses


def html_response(status: int, document: str) -> Response:
    return Response(document.encode("utf-8"), status, headers=HTML_HEADERS, media_type="text/html; charset=utf-8")


def json_response(status: int, content: object | bytes, headers: dict[str, str] | None = None) -> Response:
    """JSON with the common headers; ``bytes`` are sent as they are (SQL's text)."""
    body = content if isinstance(content, bytes) else json.dumps(content, ensure_ascii=False).encode("utf-8")
    all_headers = JSON_HEADERS if headers is None else {**JSON_HEADERS, **headers}
    return Response(body, status, headers=all_headers, media_type="application/json")


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    code = ERROR_CODES.get(status, "INTERNAL" if status >= 500 else "BAD_REQUEST")
    return json_response(status, {"success": False, "error": {"code": code, "message": message}}, headers)


# ----------------------------------------------------------------- errors


def _sqlstate(exc: BaseException) -> str:
    code = getattr(exc, "sqlstate", None)
    return code if isinstance(code, str) else ""


def is_unavailable(exc: BaseException) -> bool:
    """The database could not be reached or went away (→ 503, worth a retry)."""
    if isinstance(exc, (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)):
        return True
    # 08: connection exception, 57: operator intervention (shutdown, starting up).
    return _sqlstate(exc)[:2] in ("08", "57")


def _log_failure(msg: str, exc: BaseException, **fields: Any) -> None:
    """Log an unexpected failure.  A database error is logged by type and
    SQLSTATE only (its message may quote request values); a Python error
    with its message, which never holds request data here."""
    extra = {"fields": {**fields, **_error_fields(exc)}}
    if isinstance(exc, asyncpg.PostgresError):
        log.error(msg, extra=extra)
    else:
        log.error(msg, exc_info=exc, extra=extra)


def _error_fields(exc: BaseException) -> dict[str, Any]:
    """What a log line may say about an unexpected failure: its type and
    SQLSTATE — never its message, which can quote request data."""
    fields: dict[str, Any] = {"error_type": type(exc).__name__}
    state = _sqlstate(exc)
    if state:
        fields["sqlstate"] = state
    return fields


# ----------------------------------------------------------------- state


@dataclass
class _Shim:
    config: Config
    pool: Any
    owns_pool: bool
    relay_pass: RelayPass | None
    #: The clinic locale last reported by SQL (pages rendered without a query).
    locale: str = pages.DEFAULT_LOCALE
    relay_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The relay's HTTP transport, opened by the first /api/internal call.
    transport: Any = None
    #: /openapi.json, built once by create_app.
    openapi_doc: bytes = b"{}"

    # --- database -------------------------------------------------------

    async def db(self, call: Callable[Concatenate[Any, _P], Awaitable[_T]], *args: _P.args,
                 **kwargs: _P.kwargs) -> _T:
        """``call`` (a :mod:`listener.store` function) on a pooled connection,
        with the shim's query timeout unless ``timeout=`` says otherwise."""
        if self.pool is None:
            raise asyncpg.InterfaceError("the database pool is not open")
        kwargs.setdefault("timeout", QUERY_TIMEOUT)
        # asyncio.timeout rather than acquire(timeout=…): asyncpg runs a
        # timed acquire through asyncio.wait_for, a task of its own per
        # request (5–15 µs of CPU a call, measured with 16 in flight).
        async with asyncio.timeout(ACQUIRE_TIMEOUT):
            con = await self.pool.acquire()
        try:
            return await call(con, *args, **kwargs)
        finally:
            await self.pool.release(con)

    def learn_locale(self, value: object) -> str:
        if isinstance(value, str) and value:
            self.locale = pages.normalize_locale(value)
        return self.locale

    async def clinic_locale(self) -> str:
        """The clinic locale now, for pages rendered before any SQL call;
        the last known one if the database cannot say."""
        try:
            doc = await self.db(store.shim_config, timeout=READY_TIMEOUT)
            return self.learn_locale(doc.get("locale"))
        except Exception as exc:  # noqa: BLE001 - best effort: any failure keeps the cached locale
            log.debug("shim_config unavailable", extra={"fields": _error_fields(exc)})
        return self.locale

    # --- action links (HTML) --------------------------------------------

    async def action(self, request: Request) -> Response:
        started = time.perf_counter()
        path_type: str | None = request.path_params.get("kind")
        kind = path_type or request.query_params.get("type") or ""
        response = await self._action(request, path_type)
        label = kind if kind in ACTION_TYPES else "invalid"
        metrics.ACTIONS.labels(type=label, method=request.method, status=str(response.status_code)).inc()
        logs.log(
            log,
            logging.INFO if response.status_code < 500 else logging.ERROR,
            "action link",
            method=request.method,
            type=label,
            status=response.status_code,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return response

    async def _action(self, request: Request, path_type: str | None) -> Response:
        query_type = request.query_params.get("type")
        if path_type is not None:
            if query_type is not None and query_type != path_type:
                return html_response(400, pages.error_page(await self.clinic_locale(), 400))
            action = path_type
        else:
            action = query_type or ""
        if action not in ACTION_TYPES:
            return html_response(400, pages.error_page(await self.clinic_locale(), 400))
        token = request.query_params.get("token") or ""
        if not TOKEN_RE.fullmatch(token):
            return html_response(404, pages.error_page(await self.clinic_locale(), 404))
        try:
            if request.method == "POST":
                return await self._perform(token, action)
            peek = await self.db(store.peek_action, token)
            locale = self.learn_locale(peek.get("locale"))
            if peek.get("action_type") != action:
                return html_response(400, pages.error_page(locale, 400))
            # One-click (the seed's behaviour) only for a real GET: HEAD is
            # what link checkers send, and it must never act.
            if peek.get("one_click_actions") is True and request.method == "GET":
                return await self._perform(token, action)
            if path_type is not None:
                form_action = f"?token={quote(token)}"
            else:
                form_action = f"?type={quote(action)}&token={quote(token)}"
            appointment = peek.get("appointment")
            return html_response(
                200,
                pages.action_page(locale, action, appointment if isinstance(appointment, dict) else {}, form_action),
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes a page, never a trace
            return self._action_error(exc)

    async def _perform(self, token: str, action: str) -> Response:
        result = await self.db(store.perform_action, token, action)
        self.learn_locale(result.get("locale"))
        appointment = result.get("appointment")
        return html_response(
            200,
            pages.result_page(
                self.locale,
                str(result.get("action") or action),
                appointment if isinstance(appointment, dict) else {},
            ),
        )

    def _action_error(self, exc: BaseException) -> Response:
        err = barnum_error(exc)
        if err is not None:
            locale = self.learn_locale(err.detail.get("locale"))
            status = err.http_status
            if status not in (400, 404, 409, 410):
                status = 400
            reason = None
            if status == 410:
                reason = "expired" if "expired" in err.message else "used" if "used" in err.message else None
            return html_response(status, pages.error_page(locale, status, reason))
        if is_unavailable(exc):
            logs.log(log, logging.WARNING, "database unavailable", route="action", **_error_fields(exc))
            return html_response(503, pages.error_page(self.locale, 503))
        _log_failure("action link failed", exc)
        return html_response(500, pages.error_page(self.locale, 500))

    # --- callbacks (JSON) -----------------------------------------------

    def webhook_endpoint(self, action: str | None) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            response, label = await self._webhook(request, action)
            metrics.CALLBACKS.labels(action=label, status=str(response.status_code)).inc()
            logs.log(
                log,
                logging.INFO if response.status_code < 500 else logging.ERROR,
                "callback",
                action=label,
                status=response.status_code,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )
            return response

        return endpoint

    async def _webhook(self, request: Request, action: str | None) -> tuple[Response, str]:
        label = action or "unknown"
        headers = request.headers

        # 1. Size: the declared length, then the bytes actually read.
        declared = headers.get("content-length")
        if declared is not None:
            try:
                too_big = int(declared) > MAX_BODY_BYTES
            except ValueError:
                return json_error(400, "invalid Content-Length"), label
            if too_big:
                return json_error(413, f"the body is larger than {MAX_BODY_BYTES} bytes"), label
        try:
            body = await read_limited(request, MAX_BODY_BYTES)
        except ClientDisconnect:
            return json_error(400, "the client went away"), label
        if body is None:
            return json_error(413, f"the body is larger than {MAX_BODY_BYTES} bytes"), label

        # 2. Media type.
        if not is_json_media_type(headers.get("content-type")):
            return json_error(415, "Content-Type must be application/json"), label

        # 3. Signature over the exact bytes (constant-time, any accepted secret).
        verdict = self.verify_signature(request, body)
        if not verdict.ok:
            metrics.SIGNATURE_FAILURES.inc()
            return json_error(401, "missing or invalid webhook signature"), label
        if verdict.scheme == "hex-body":
            metrics.REPLAYABLE_SIGNATURES.inc()

        # 4. JSON syntax (the values are SQL's business).
        try:
            text = body.decode("utf-8")
            doc = json.loads(text, parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return json_error(400, "the body is not valid JSON"), label
        if not isinstance(doc, dict):
            return json_error(400, "the body must be a JSON object"), label
        if action is None and isinstance(doc.get("action"), str) and doc["action"] in CALLBACK_ACTIONS:
            label = doc["action"]

        # 5. One SQL call; the idempotency key is one the signature covers.
        try:
            result = await self.db(store.handle_callback, action, text, verdict.idempotency_key)
        except Exception as exc:  # noqa: BLE001 - mapped to a JSON error below
            return self._webhook_error(exc), label
        if not isinstance(result, str):
            log.error("handle_callback returned no document")
            return json_error(500, "internal error"), label
        return json_response(200, result.encode("utf-8")), label

    def verify_signature(self, request: Request, body: bytes) -> Verdict:
        """Standard Webhooks, else the hex scheme (see :func:`verify_callback`)."""
        return verify_callback(
            self.config.webhook_secrets,
            body,
            request.headers,
            require_timestamp=self.config.webhook_require_timestamp,
        )

    def _webhook_error(self, exc: BaseException) -> Response:
        err = barnum_error(exc)
        if err is not None:
            return json_error(err.http_status, err.message)
        state = _sqlstate(exc)
        if state.startswith("22") or state.startswith("54"):
            # A data exception (e.g. JSON jsonb cannot hold: \u0000, a number
            # out of range) or a nesting limit: the request's fault.
            return json_error(400, "the body is not valid JSON for this endpoint")
        if is_unavailable(exc):
            logs.log(log, logging.WARNING, "database unavailable", route="webhook", **_error_fields(exc))
            return json_error(503, "the database is unavailable; retry later", {"Retry-After": "5"})
        _log_failure("callback failed", exc)
        return json_error(500, "internal error")

    # --- internal, health -----------------------------------------------

    async def internal(self, request: Request) -> Response:
        secret = self.config.internal_api_secret
        if not secret:
            return json_error(503, "INTERNAL_API_SECRET is not configured")
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        given = credentials.strip().encode("utf-8", "surrogateescape")
        # compare_digest first, always: the scheme check must not short-cut it.
        ok = hmac.compare_digest(given, secret.encode("utf-8"))
        if not (ok and scheme.lower() == "bearer"):
            logs.log(log, logging.WARNING, "internal: unauthorized")
            return json_error(401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
        if self.relay_pass is None:
            self.relay_pass = default_relay_pass(self)
        started = time.perf_counter()
        try:
            async with self.relay_lock:  # one pass at a time per process
                summary = await self.relay_pass()
        except Exception as exc:  # noqa: BLE001 - reported as INTERNAL, details in the log only
            if is_unavailable(exc):
                logs.log(log, logging.WARNING, "database unavailable", route="internal", **_error_fields(exc))
                return json_error(503, "the database is unavailable; retry later", {"Retry-After": "5"})
            _log_failure("relay pass failed", exc)
            return json_error(500, "the relay pass failed")
        doc = {"success": True, "processed": 0, "failed": 0, "errors": [], **summary}
        logs.log(
            log, logging.INFO, "internal: relay pass",
            processed=doc.get("processed"), failed=doc.get("failed"),
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return json_response(200, json.dumps(doc, default=str, ensure_ascii=False).encode("utf-8"))

    async def prometheus(self, request: Request) -> Response:
        """Prometheus text: this process's counters plus the queue gauges
        (refreshed from queue_stats() now; stale values if the DB is down)."""
        try:
            stats = await asyncio.wait_for(self.db(store.queue_stats, timeout=READY_TIMEOUT), READY_TIMEOUT)
            if stats:
                metrics.set_queue_gauges(stats)
        except Exception as exc:  # noqa: BLE001 - metrics must not fail the scrape
            logs.log(log, logging.WARNING, "metrics: queue stats unavailable", **_error_fields(exc))
        return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)

    async def healthz(self, request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Ready when the database answers and speaks this release's SQL API
        (``schema_compat()``): the database says, not the files on disk."""
        try:
            if self.pool is None:
                raise asyncpg.InterfaceError("the database pool is not open")

            async def ask() -> str | None:
                async with self.pool.acquire(timeout=READY_TIMEOUT) as con:
                    return await schema_problem(con)

            problem = await asyncio.wait_for(ask(), READY_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            reason = "database unreachable" if is_unavailable(exc) else "database error"
            logs.log(log, logging.WARNING, "not ready", reason=reason, **_error_fields(exc))
            return json_response(503, {"status": "unavailable", "reason": reason})
        if problem is not None:
            return json_response(503, {"status": "unavailable", "reason": problem})
        return json_response(200, {"status": "ok"})

    async def openapi(self, request: Request) -> Response:
        return json_response(200, self.openapi_doc, {"Cache-Control": "public, max-age=300"})

    # --- fallbacks ------------------------------------------------------

    async def http_exception(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        extra = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
        if request.url.path.startswith("/api/action"):
            response = html_response(status, pages.error_page(self.locale, status))
            response.headers.update(extra)
            return response
        messages = {404: "not found", 405: "method not allowed"}
        return json_error(status, messages.get(status, "request failed"), extra or None)

    async def server_error(self, request: Request, exc: Exception) -> Response:
        _log_failure("unhandled error", exc)
        if request.url.path.startswith("/api/action"):
            return html_response(500, pages.error_page(self.locale, 500))
        return json_error(500, "internal error")

    # --- lifespan -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.pool is None:
            self.pool = await open_pool(self.config)
            self.owns_pool = True
        await self.clinic_locale()
        realtime: Realtime | None = getattr(app.state, "realtime", None)
        if realtime is not None:
            await realtime.start(self.pool)
        try:
            yield
        finally:
            if realtime is not None:
                await realtime.stop()
            if self.transport is not None:
                with contextlib.suppress(Exception):
                    await self.transport.close()
                self.transport = None
            if self.owns_pool and self.pool is not None:
                pool, self.pool = self.pool, None
                try:
                    await asyncio.wait_for(pool.close(), 10)
                except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - closing anyway
                    pool.terminate()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def is_json_media_type(value: str | None) -> bool:
    """``application/json``, optionally with ``charset=utf-8``."""
    if not value:
        return False
    media, _, params = value.partition(";")
    if media.strip().lower() != "application/json":
        return False
    for param in params.split(";"):
        name, _, val = param.partition("=")
        if name.strip().lower() == "charset" and val.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as more than ``limit`` bytes arrived (the
    rest is never read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def open_pool(config: Config) -> Any:
    """The shim's asyncpg pool.  If the database is unreachable at start the
    shim still starts (``/readyz`` answers 503) with a pool that connects on
    first use; any other failure (bad credentials, bad URL) stops it."""
    if not config.database_url:
        raise ConfigError("DATABASE_URL is not set (see README: Configuration)")
    try:
        return await create_pool(config.database_url, public_url=config.public_url,
                                 min_size=POOL_MIN, max_size=POOL_MAX, application_name="barnum-shim")
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        logs.log(log, logging.WARNING, "database unreachable at start; serving, /readyz reports 503",
                 **_error_fields(exc))
        return await create_pool(config.database_url, public_url=config.public_url,
                                 min_size=0, max_size=POOL_MAX, application_name="barnum-shim")


def default_relay_pass(shim: _Shim) -> RelayPass:
    """One pass of :func:`listener.relay.run_once` over the shim's pool, with
    one keep-alive transport kept for the app's lifetime.  Imported on first
    use so the shim alone never loads the relay's HTTP client."""

    async def run() -> dict[str, Any]:
        relay: Any = importlib.import_module("listener.relay")
        if shim.transport is None:
            transport: Any = importlib.import_module("listener.transport")
            shim.transport = transport.Transport(concurrency=32)
        result = await relay.run_once(shim.pool, shim.transport, shim.config, relay.worker_name())
        return dict(result)

    return run


# ----------------------------------------------------------------- the app


def create_app(config: Config, pool: Any = None, relay_pass: RelayPass | None = None) -> Starlette:
    """The shim as an ASGI app.

    ``pool``: an asyncpg pool to use (the caller owns it); when None the app
    opens one from ``config.database_url`` at startup and closes it at
    shutdown.  ``relay_pass``: what ``POST /api/internal`` runs; when None a
    pass of :mod:`listener.relay` over the shim's pool.
    """
    if pool is None and not config.database_url:
        raise ConfigError("DATABASE_URL is not set (see README: Configuration)")
    if not config.webhook_secrets:
        log.warning("WEBHOOK_SECRET is not set: every callback will be rejected (401)")
    shim = _Shim(config=config, pool=pool, owns_pool=False, relay_pass=relay_pass)
    api = importlib.import_module("listener.api").Api(shim)
    shim.openapi_doc = openapi_bytes(*api.openapi())
    routes = [
        Route("/api/action", shim.action, methods=["GET", "POST"]),
        Route("/api/action/{kind:str}", _only_action_kinds(shim.action), methods=["GET", "POST"]),
        Route("/api/webhook", shim.webhook_endpoint(None), methods=["POST"]),
        *(Route(path, shim.webhook_endpoint(act), methods=["POST"]) for path, act in WEBHOOK_ALIASES.items()),
        # The management API (listener/api.py); imported here, as it builds on this module.
        *api.routes(),
        *importlib.import_module("listener.whatsapp").WhatsApp(shim).routes(),
        Route("/api/internal", shim.internal, methods=["POST"]),
        Route("/api/internal/process-events", shim.internal, methods=["POST"]),
        Route("/healthz", shim.healthz, methods=["GET"]),
        Route("/readyz", shim.readyz, methods=["GET"]),
        Route("/openapi.json", shim.openapi, methods=["GET"]),
        Route("/metrics", shim.prometheus, methods=["GET"]),
    ]
    # Socket.IO at /socket.io/ (listener/realtime.py), started by the lifespan.
    realtime = Realtime(config)
    app = Starlette(
        routes=routes,
        lifespan=shim.lifespan,
        exception_handlers={HTTPException: shim.http_exception, Exception: shim.server_error},
        middleware=[Middleware(SocketIOMiddleware, realtime=realtime)],
    )
    app.state.shim = shim
    app.state.realtime = realtime
    return app


def _only_action_kinds(
    endpoint: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        if request.path_params.get("kind") not in ACTION_TYPES:
            raise HTTPException(404)
        return await endpoint(request)

    return wrapped


# ----------------------------------------------------------------- serving


class ShimStartError(RuntimeError):
    """uvicorn could not start (address in use, app startup failed)."""


class ShimServer(uvicorn.Server):
    """uvicorn serving the shim: access log off (query strings hold tokens),
    no ``server`` header, uvloop + httptools when installed.

    ``handle_signals``: SIGINT/SIGTERM stop the server gracefully (and, unlike
    plain uvicorn, are not re-raised afterwards, so ``barnum shim`` exits 0).
    Pass False when the caller owns signals (``barnum run``) and stop it with
    :meth:`request_exit`.  ``on_ready`` is called once the socket listens.
    """

    def __init__(
        self,
        app: Starlette,
        host: str,
        port: int,
        *,
        handle_signals: bool = True,
        on_ready: Callable[[ShimServer], None] | None = None,
    ) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="auto",
            http="auto",
            # Socket.IO's websocket transport (wsproto comes with python-engineio).
            ws="wsproto",
            ws_max_size=64 * 1024,
            lifespan="on",
            access_log=False,
            log_config=None,
            server_header=False,
            timeout_graceful_shutdown=10,
        )
        super().__init__(config)
        self._handle_signals = handle_signals
        self._on_ready = on_ready

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return int(self.config.port)

    def request_exit(self) -> None:
        self.should_exit = True

    async def startup(self, sockets: Any = None) -> None:
        try:
            await super().startup(sockets=sockets)
        except SystemExit as exc:  # uvicorn exits on a bind error
            raise ShimStartError(f"cannot listen on {self.config.host}:{self.config.port}") from exc
        if self.started and self._on_ready is not None:
            self._on_ready(self)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if not self._handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


async def serve(
    app: Starlette,
    host: str,
    port: int,
    ready: asyncio.Event | None = None,
    *,
    stop: asyncio.Event | None = None,
    handle_signals: bool | None = None,
) -> None:
    """Serve ``app`` in the running event loop until stopped.

    ``ready`` is set once the socket listens.  ``stop``, when given, ends the
    server gracefully when set (and then signals are left to the caller
    unless ``handle_signals`` says otherwise) — the way ``barnum run`` shares
    one loop between relay and shim.  Raises :class:`ShimStartError` if it
    cannot listen.
    """
    if handle_signals is None:
        handle_signals = stop is None
    server = ShimServer(
        app, host, port, handle_signals=handle_signals,
        on_ready=(lambda _s: ready.set()) if ready is not None else None,
    )
    watcher: asyncio.Task[None] | None = None
    if stop is not None:
        async def watch() -> None:
            await stop.wait()
            server.request_exit()

        watcher = asyncio.create_task(watch())
    try:
        await server.serve()
        if not server.started:
            raise ShimStartError("the shim did not start: application startup failed (see the log)")
    finally:
        if watcher is not None:
            watcher.cancel()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``barnum shim`` options (defaults from BARNUM_HOST / BARNUM_PORT)."""
    parser.add_argument("--host", default=None, help="address to listen on (default: $BARNUM_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port to listen on (default: $BARNUM_PORT or 8000)")


async def _schema_problem_at_start(config: Config) -> str | None:
    """A reachable database whose SQL API this release does not speak stops
    the shim at start; an unreachable one does not (/readyz answers 503 until
    it is back)."""
    try:
        conn = await asyncio.wait_for(asyncpg.connect(config.database_url), READY_TIMEOUT)
    except Exception:  # noqa: BLE001 - unreachable now: start anyway
        return None
    try:
        return await schema_problem(conn)
    finally:
        await conn.close()


def main(args: argparse.Namespace, config: Config) -> int:
    """``barnum shim``: serve until SIGINT/SIGTERM; 0 on a clean stop, 1 if it
    could not start.  Raises ConfigError when DATABASE_URL or WEBHOOK_SECRET
    is missing."""
    config.require("DATABASE_URL", "WEBHOOK_SECRET")
    host: str = getattr(args, "host", None) or config.host
    arg_port: int | None = getattr(args, "port", None)
    port = arg_port if arg_port is not None else config.port
    logs.setup(config.log_level)
    problem = asyncio.run(_schema_problem_at_start(config))
    if problem is not None:
        print(f"barnum shim: {problem}", file=sys.stderr)
        return 2
    app = create_app(config)
    server = ShimServer(app, host, port)
    try:
        server.run()
    except ShimStartError as exc:
        print(f"barnum shim: {exc}", file=sys.stderr)
        return 1
    if not server.started:
        print("barnum shim: the application did not start (see the log above)", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------- OpenAPI


def _callback_schema(action: str, required: list[str], properties: dict[str, Any], title: str) -> dict[str, Any]:
    return {
        "type": "object",
        "title": title,
        "required": ["action", *required],
        "properties": {"action": {"type": "string", "const": action}, **properties},
        "additionalProperties": True,
    }


_UUID: Final = {"type": "string", "format": "uuid"}
_CALLBACK_SCHEMAS: Final[dict[str, dict[str, Any]]] = {
    "ConfirmCallback": _callback_schema(
        "confirm", ["appointmentId"],
        {"appointmentId": _UUID, "patientResponse": {"type": "string", "maxLength": 500}},
        "Appointment confirmed by the patient",
    ),
    "CancelCallback": _callback_schema(
        "cancel", ["appointmentId"],
        {"appointmentId": _UUID, "reason": {"type": "string", "maxLength": 500}},
        "Appointment cancelled by the patient",
    ),
    "RescheduleCallback": _callback_schema(
        "reschedule", ["appointmentId", "newDate", "newTime"],
        {
            "appointmentId": _UUID,
            "newDate": {"type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}$", "description": "clinic time zone"},
            "newTime": {"type": "string", "pattern": "^([01]\\d|2[0-3]):[0-5]\\d$", "description": "HH:mm, clinic time zone"},
        },
        "Appointment moved to a new local date and time",
    ),
    "NoShowRescheduleCallback": _callback_schema(
        "no_show_reschedule", ["appointmentId", "attempt"],
        {"appointmentId": _UUID, "attempt": {"type": "integer", "minimum": 1, "maximum": 100}},
        "The patient answered the no-show follow-up",
    ),
    "ReactivationCallback": _callback_schema(
        "reactivation", ["patientId", "workflowType"],
        {
            "patientId": _UUID,
            "workflowType": {"type": "string", "maxLength": 100},
            "status": {"type": "string", "maxLength": 100, "default": "completed"},
        },
        "Result of a reactivation campaign",
    ),
    "ReviewCallback": _callback_schema(
        "review", ["appointmentId", "reviewSubmitted"],
        {
            "appointmentId": _UUID,
            "reviewSubmitted": {"type": "boolean"},
            "rating": {"type": "integer", "minimum": 1, "maximum": 5, "description": "required when reviewSubmitted"},
        },
        "Result of a review request",
    ),
}
_SCHEMA_OF_ACTION: Final = {
    "confirm": "ConfirmCallback",
    "cancel": "CancelCallback",
    "reschedule": "RescheduleCallback",
    "no_show_reschedule": "NoShowRescheduleCallback",
    "reactivation": "ReactivationCallback",
    "review": "ReviewCallback",
}


def _error_ref(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _callback_operation(summary: str, schema: dict[str, Any], op_id: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": op_id,
            "summary": summary,
            "tags": ["callbacks"],
            "security": [{"standardWebhooks": []}, {"webhookSignature": []}],
            "parameters": [
                {"name": "webhook-id", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "Standard Webhooks message id; also the idempotency key"},
                {"name": "webhook-timestamp", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "Standard Webhooks: unix seconds, within 5 minutes of the server clock"},
                {"name": "webhook-signature", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "Standard Webhooks: `v1,<base64 HMAC-SHA256(secret, id.timestamp.body)>`"},
                {"name": "X-Webhook-Signature", "in": "header", "required": False,
                 "schema": {"type": "string"},
                 "description": "lowercase hex HMAC-SHA256(secret, `{X-Webhook-Timestamp}.{raw body}`), "
                                "`sha256=` prefix allowed; without X-Webhook-Timestamp over the raw body "
                                "alone (replayable; refused when WEBHOOK_REQUIRE_TIMESTAMP is on). "
                                "The idempotency key is derived from this signature"},
                {"name": "X-Webhook-Timestamp", "in": "header", "required": False,
                 "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"},
                 "description": "unix seconds covered by X-Webhook-Signature, within 5 minutes of the server clock"},
            ],
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {
                "200": {"description": "applied (or the stored response of an idempotent replay)",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Success"}}}},
                "400": _error_ref("malformed JSON, missing field, unknown action"),
                "401": _error_ref("missing, wrong or stale signature"),
                "404": _error_ref("unknown appointment or patient"),
                "409": _error_ref("illegal state, or idempotency key reused with another body"),
                "413": _error_ref("body over 64 KiB"),
                "415": _error_ref("Content-Type is not application/json"),
                "422": _error_ref("invalid value (rating outside 1–5, impossible date or time)"),
                "503": _error_ref("database unavailable; retry"),
            },
        }
    }


def _openapi() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/api/webhook": _callback_operation(
            "n8n callback; the action is in the body",
            {"oneOf": [{"$ref": f"#/components/schemas/{name}"} for name in _CALLBACK_SCHEMAS],
             "discriminator": {"propertyName": "action",
                               "mapping": {a: f"#/components/schemas/{n}" for a, n in _SCHEMA_OF_ACTION.items()}}},
            "callback",
        ),
    }
    for path, action in WEBHOOK_ALIASES.items():
        base = _CALLBACK_SCHEMAS[_SCHEMA_OF_ACTION[action]]
        alias_schema = {**base, "required": [r for r in base["required"] if r != "action"]}
        paths[path] = _callback_operation(
            f"n8n callback `{action}` (seed alias: the path implies the action)", alias_schema,
            "callback_" + action,
        )
    paths["/api/internal"] = {
        "post": {
            "operationId": "relayPass",
            "summary": "Run one relay pass in-process (for cron-driven deployments)",
            "tags": ["internal"],
            "security": [{"internalBearer": []}],
            "responses": {
                "200": {"description": "pass done",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RelayPass"}}}},
                "401": _error_ref("missing or wrong bearer token"),
                "503": _error_ref("INTERNAL_API_SECRET is not configured, or the database is unavailable"),
            },
        }
    }
    health = {"type": "object", "properties": {"status": {"type": "string"}, "reason": {"type": "string"}},
              "required": ["status"]}
    paths["/healthz"] = {"get": {"operationId": "healthz", "summary": "The process is up", "tags": ["health"],
                                 "responses": {"200": {"description": "up", "content": {
                                     "application/json": {"schema": health}}}}}}
    paths["/readyz"] = {"get": {
        "operationId": "readyz", "summary": "Database reachable and every migration applied", "tags": ["health"],
        "responses": {
            "200": {"description": "ready", "content": {"application/json": {"schema": health}}},
            "503": {"description": "database unreachable or migrations pending",
                    "content": {"application/json": {"schema": health}}},
        }}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Barnum shim",
            "version": "0.1.0",
            "description": "n8n callbacks, the internal relay trigger and health probes. "
            "Patients' action links (/api/action) answer HTML and are not described here.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                **_CALLBACK_SCHEMAS,
                "Success": {"type": "object", "required": ["success", "message", "data"], "properties": {
                    "success": {"const": True}, "message": {"type": "string"}, "data": {"type": "object"}}},
                "Error": {"type": "object", "required": ["success", "error"], "properties": {
                    "success": {"const": False},
                    "error": {"type": "object", "required": ["code", "message"], "properties": {
                        "code": {"type": "string", "enum": sorted(set(ERROR_CODES.values()))},
                        "message": {"type": "string"}}}}},
                "RelayPass": {"type": "object", "required": ["success", "processed", "failed", "errors"],
                              "properties": {"success": {"type": "boolean"}, "processed": {"type": "integer"},
                                             "failed": {"type": "integer"},
                                             "errors": {"type": "array", "items": {"type": "string"}}}},
            },
            "securitySchemes": {
                "webhookSignature": {"type": "apiKey", "in": "header", "name": "X-Webhook-Signature"},
                "standardWebhooks": {"type": "apiKey", "in": "header", "name": "webhook-signature"},
                "internalBearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def openapi_bytes(extra_paths: dict[str, Any], extra_schemas: dict[str, Any]) -> bytes:
    """The OpenAPI document with the management API's paths (listener/api.py)."""
    doc = _openapi()
    doc["paths"].update(extra_paths)
    doc["components"]["schemas"].update(extra_schemas)
    doc["components"]["securitySchemes"]["apiToken"] = {
        "type": "http", "scheme": "bearer", "description": "an API token from `barnum tokens create`"}
    doc["info"]["description"] = ("n8n callbacks, the webhook management API, the internal relay trigger and "
                                  "health probes. Patients' action links (/api/action) answer HTML and are not "
                                  "described here.")
    return json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8")

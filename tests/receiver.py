"""A webhook receiver for the relay tests: real HTTP on 127.0.0.1.

Runs an aiohttp server in a background thread with its own event loop, so
synchronous tests can poll what it received.  Every request is checked
against both signatures of SPEC §3 — ``webhook-signature`` with the
``standardwebhooks`` library and ``X-Webhook-Signature`` with plain ``hmac``
— using the keys configured for its path (a failed check answers 401).

Behaviour per path prefix is a :class:`Script`: a function of the attempt
number (1 for the first request carrying a given event id on that path)
returning a :class:`Reply` (status, delay, headers, body).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError


@dataclass(frozen=True)
class Reply:
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: str = '{"ok":true}'


Script = Callable[[int], Reply]


@dataclass
class Hit:
    path: str
    query: str
    event_id: str
    event_type: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    attempt: int
    hex_ok: bool
    std_ok: bool
    status: int = 0

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def std_secret(key: bytes) -> str:
    """A key in the ``whsec_`` form the standardwebhooks library takes."""
    return "whsec_" + base64.b64encode(key).decode()


class Receiver:
    def __init__(self, keys: list[bytes]) -> None:
        self.default_keys = keys
        self.path_keys: dict[str, list[bytes]] = {}
        self.scripts: dict[str, Script] = {}
        self.unsigned_prefixes: set[str] = set()
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        self._attempts: Counter[tuple[str, str]] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- configuration ---------------------------------------------------

    def on(self, prefix: str, script: Script | Reply) -> None:
        """Answer requests whose path starts with ``prefix`` with ``script``."""
        self.scripts[prefix] = script if callable(script) else (lambda _n, r=script: r)

    def unsigned(self, prefix: str) -> None:
        """Accept requests under ``prefix`` without signatures (transport tests)."""
        self.unsigned_prefixes.add(prefix)

    def keys_for(self, prefix: str, keys: list[bytes]) -> None:
        self.path_keys[prefix] = keys

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    # -- what arrived ----------------------------------------------------

    def snapshot(self, prefix: str = "") -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.path.startswith(prefix)]

    def count(self, prefix: str = "") -> int:
        return len(self.snapshot(prefix))

    def per_event(self, prefix: str = "") -> Counter[str]:
        return Counter(h.event_id for h in self.snapshot(prefix))

    def bad_signatures(self) -> list[Hit]:
        return [h for h in self.snapshot() if not (h.hex_ok and h.std_ok)]

    # -- server ----------------------------------------------------------

    def _match(self, table: dict[str, Any], path: str) -> Any:
        best = None
        for prefix in table:
            if path.startswith(prefix) and (best is None or len(prefix) > len(best)):
                best = prefix
        return table[best] if best is not None else None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.path
        headers = {k: v for k, v in request.headers.items()}
        keys = self._match(self.path_keys, path) or self.default_keys
        hex_ok = any(
            hmac.compare_digest(hmac.new(k, body, hashlib.sha256).hexdigest(),
                                request.headers.get("X-Webhook-Signature", ""))
            for k in keys
        )
        std_ok = False
        for k in keys:
            try:
                Webhook(k).verify(body, headers, json_parse=False)
                std_ok = True
                break
            except WebhookVerificationError:
                continue
        event_id = request.headers.get("X-Event-Id", "")
        with self._lock:
            self._attempts[(path, event_id)] += 1
            attempt = self._attempts[(path, event_id)]
            hit = Hit(path, request.query_string, event_id, request.headers.get("X-Event-Type", ""),
                      headers, body, time.time(), attempt, hex_ok, std_ok)
            self.hits.append(hit)
        if not (hex_ok and std_ok) and not any(path.startswith(p) for p in self.unsigned_prefixes):
            hit.status = 401
            return web.json_response({"error": "bad signature"}, status=401)
        script = self._match(self.scripts, path)
        reply = script(attempt) if script is not None else Reply()
        if reply.delay:
            await asyncio.sleep(reply.delay)  # wait-ok: simulates a slow receiver
        hit.status = reply.status
        return web.Response(status=reply.status, text=reply.body, headers=reply.headers,
                            content_type="application/json")

    def start(self) -> Receiver:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                app = web.Application()
                app.router.add_route("*", "/{tail:.*}", self._handle)
                self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
                loop.run_until_complete(self._runner.setup())
                site = web.TCPSite(self._runner, "127.0.0.1", 0)
                loop.run_until_complete(site.start())
                server = site._server
                assert server is not None and server.sockets
                self.port = server.sockets[0].getsockname()[1]
            except BaseException as exc:  # pragma: no cover
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="test-receiver", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

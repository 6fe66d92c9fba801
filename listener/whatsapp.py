"""The WhatsApp Cloud API webhook (SPEC-2 §B), mounted in the shim.

    GET  /whatsapp/webhook   Meta's subscription check: hub.mode=subscribe and
                             hub.verify_token == WHATSAPP_VERIFY_TOKEN → 200 with
                             hub.challenge as the body; anything else 403.
    POST /whatsapp/webhook   a notification: X-Hub-Signature-256 must be
                             ``sha256=<hex HMAC-SHA256(app secret, raw body)>``
                             for one of WHATSAPP_APP_SECRET's comma-separated
                             secrets, then ONE SQL call ``ingest_whatsapp(payload)``.

Meta delivers at least once, unordered, and retries a non-200 for days, so
the answer is 200 as soon as the notification is stored (duplicates and
unknown numbers included; SQL sorts them out) and 503 when the database is
away (Meta's retry then loses nothing).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Final

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from listener import logs, metrics, store
from listener.db import barnum_error
from listener.shim import (
    _log_failure,
    _Shim,
    _sqlstate,
    is_unavailable,
    json_error,
    json_response,
    read_limited,
)

log = logging.getLogger("barnum.whatsapp")

#: Meta's notifications are far smaller; a bigger body is refused unread.
MAX_BODY_BYTES: Final = 1024 * 1024


def parse_app_secrets(value: str | None) -> list[bytes]:
    """WHATSAPP_APP_SECRET: comma-separated app secrets (rotation), UTF-8 bytes each."""
    return [part.strip().encode("utf-8") for part in (value or "").split(",") if part.strip()]


def meta_signature_ok(secrets: list[bytes], body: bytes, header: str | None) -> bool:
    """``X-Hub-Signature-256`` against any secret, constant-time, on bytes; a
    header with non-ASCII characters is a failed check, not an error."""
    if not header or not secrets:
        return False
    given = header.strip()
    if given[:7].lower() != "sha256=":
        return False
    try:
        given_bytes = given[7:].lower().encode("latin-1")
    except UnicodeEncodeError:
        return False
    ok = False
    for secret in secrets:
        expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
        ok |= hmac.compare_digest(expected, given_bytes)
    return ok


class WhatsApp:
    """Handlers of /whatsapp/webhook over the shim's pool."""

    def __init__(self, shim: _Shim) -> None:
        self.shim = shim
        self.secrets = parse_app_secrets(shim.config.whatsapp_app_secret)
        self.verify_token = (shim.config.whatsapp_verify_token or "").encode("utf-8")
        if not self.secrets:
            log.warning("WHATSAPP_APP_SECRET is not set: every WhatsApp notification will be rejected (401)")

    def routes(self) -> list[Route]:
        return [
            Route("/whatsapp/webhook", self.verify, methods=["GET"]),
            Route("/whatsapp/webhook", self.notify, methods=["POST"]),
        ]

    async def verify(self, request: Request) -> Response:
        """Meta's subscription handshake."""
        params = request.query_params
        given = params.get("hub.verify_token", "").encode("utf-8", "surrogateescape")
        # compare_digest first, always: the other checks must not short-cut it.
        ok = hmac.compare_digest(given, self.verify_token)
        challenge = params.get("hub.challenge", "")
        if ok and self.verify_token and params.get("hub.mode") == "subscribe" and challenge:
            metrics.WHATSAPP_WEBHOOKS.labels(outcome="verified").inc()
            return Response(challenge.encode("utf-8"), 200, media_type="text/plain")
        metrics.WHATSAPP_WEBHOOKS.labels(outcome="verify_refused").inc()
        logs.log(log, logging.WARNING, "whatsapp verification refused")
        return Response(b"forbidden", 403, media_type="text/plain")

    async def notify(self, request: Request) -> Response:
        started = time.perf_counter()
        response, outcome = await self._notify(request)
        metrics.WHATSAPP_WEBHOOKS.labels(outcome=outcome).inc()
        logs.log(log, logging.INFO if response.status_code < 500 else logging.ERROR, "whatsapp webhook",
                 outcome=outcome, status=response.status_code,
                 ms=round((time.perf_counter() - started) * 1000, 2))
        return response

    async def _notify(self, request: Request) -> tuple[Response, str]:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > MAX_BODY_BYTES:
                    return json_error(413, f"the body is larger than {MAX_BODY_BYTES} bytes"), "too_large"
            except ValueError:
                return json_error(400, "invalid Content-Length"), "bad_request"
        try:
            body = await read_limited(request, MAX_BODY_BYTES)
        except ClientDisconnect:
            return json_error(400, "the client went away"), "bad_request"
        if body is None:
            return json_error(413, f"the body is larger than {MAX_BODY_BYTES} bytes"), "too_large"
        if not meta_signature_ok(self.secrets, body, request.headers.get("x-hub-signature-256")):
            metrics.SIGNATURE_FAILURES.inc()
            return json_error(401, "missing or invalid X-Hub-Signature-256"), "bad_signature"
        try:
            payload = body.decode("utf-8")
        except UnicodeDecodeError:
            return json_error(400, "the body is not valid JSON"), "bad_json"
        # JSON syntax is checked by the jsonb cast of the one SQL call (a
        # second parse here would cost the hot path; SQLSTATE 22 → 400).
        try:
            result = await self.shim.db(store.ingest_whatsapp, payload)
        except Exception as exc:  # noqa: BLE001 - mapped to a JSON error below
            return self._error(exc)
        return json_response(200, {"success": True, "data": result}), "stored"

    def _error(self, exc: BaseException) -> tuple[Response, str]:
        err = barnum_error(exc)
        if err is not None:
            return json_error(err.http_status, err.message), "refused"
        if _sqlstate(exc).startswith("22") or _sqlstate(exc).startswith("54"):
            return json_error(400, "the body is not valid JSON for a notification"), "bad_json"
        if is_unavailable(exc):
            logs.log(log, logging.WARNING, "database unavailable", route="whatsapp")
            return json_error(503, "the database is unavailable; retry later", {"Retry-After": "5"}), "unavailable"
        _log_failure("whatsapp ingest failed", exc)
        return json_error(500, "internal error"), "error"

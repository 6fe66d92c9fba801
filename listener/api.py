"""The webhook management REST API (SPEC-2 §A), mounted in the shim.

Seed routes, exactly::

    POST   /api/webhooks/register                 register or update (by phone number)
    GET    /api/webhooks/list                     the account's webhooks
    GET    /api/webhooks/{id}                     one webhook
    PATCH  /api/webhooks/{id}                     change fields
    DELETE /api/webhooks/{id}                     remove
    GET    /api/webhooks/{id}/events              delivery history (cursor pagination)
    POST   /api/webhooks/events/{event_id}/retry  retry one event's failed delivery
    POST   /api/webhooks/{id}/replay              re-send a time range

Each request is authenticated by ``Authorization: Bearer <token>`` and turned
into ONE SQL call that takes the token itself: authentication, scoping to the
token's account and validation are SQL's (``85_api.sql``).  Python checks
only what SQL cannot see: body size, media type and JSON syntax.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from listener import logs, metrics, store
from listener.db import barnum_error
from listener.shim import (
    MAX_BODY_BYTES,
    _log_failure,
    _reject_constant,
    _Shim,
    _sqlstate,
    is_json_media_type,
    is_unavailable,
    json_error,
    json_response,
    read_limited,
)

log = logging.getLogger("barnum.api")

#: Bearer challenge sent with every 401.
_CHALLENGE: Final = {"WWW-Authenticate": 'Bearer realm="barnum"'}

Handler = Callable[[Request], Awaitable[Response]]


def bearer(request: Request) -> str | None:
    """The token of ``Authorization: Bearer …`` (None when absent or another scheme)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


async def json_body(request: Request) -> dict[str, Any] | Response:
    """The request's JSON object, or the error response (413, 415, 400)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > MAX_BODY_BYTES:
                return json_error(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        except ValueError:
            return json_error(400, "invalid Content-Length")
    if not is_json_media_type(request.headers.get("content-type")):
        return json_error(415, "Content-Type must be application/json")
    try:
        body = await read_limited(request, MAX_BODY_BYTES)
    except ClientDisconnect:
        return json_error(400, "the client went away")
    if body is None:
        return json_error(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        doc = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return json_error(400, "the body is not valid JSON")
    if not isinstance(doc, dict):
        return json_error(400, "the body must be a JSON object")
    return doc


class Api:
    """Handlers of the management routes over the shim's pool."""

    def __init__(self, shim: _Shim) -> None:
        self.shim = shim

    def routes(self) -> list[Route]:
        # Fixed paths before /{id}: Starlette takes the first full match.
        return [
            Route("/api/webhooks/register", self._h("register", self.register), methods=["POST"]),
            Route("/api/webhooks/list", self._h("list", self.list), methods=["GET"]),
            Route("/api/webhooks/events/{event_id}/retry", self._h("retry", self.retry), methods=["POST"]),
            Route("/api/webhooks/{id}/events", self._h("events", self.events), methods=["GET"]),
            Route("/api/webhooks/{id}/replay", self._h("replay", self.replay), methods=["POST"]),
            Route("/api/webhooks/{id}", self._h("webhook", self.webhook), methods=["GET", "PATCH", "DELETE"]),
        ]

    def _h(self, route: str, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            response = await handler(request)
            metrics.API_REQUESTS.labels(route=route, method=request.method, status=str(response.status_code)).inc()
            logs.log(
                log,
                logging.INFO if response.status_code < 500 else logging.ERROR,
                "api",
                route=route,
                method=request.method,
                status=response.status_code,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )
            return response

        return endpoint

    async def call(self, call: Callable[..., Awaitable[str | None]], *args: Any, status: int = 200) -> Response:
        """One SQL call (a :mod:`listener.store` function); its document
        (or BN4xx) becomes the response."""
        try:
            text = await self.shim.db(call, *args)
        except Exception as exc:  # noqa: BLE001 - mapped to a JSON error below
            return self.error(exc)
        if not isinstance(text, str):
            log.error("management API call returned no document")
            return json_error(500, "internal error")
        return json_response(status, b'{"success": true, "data": ' + text.encode("utf-8") + b"}")

    def error(self, exc: BaseException) -> Response:
        err = barnum_error(exc)
        if err is not None:
            return json_error(err.http_status, err.message, _CHALLENGE if err.http_status == 401 else None)
        if _sqlstate(exc).startswith("22"):
            return json_error(400, "the request holds a value the database cannot store")
        if is_unavailable(exc):
            logs.log(log, logging.WARNING, "database unavailable", route="api")
            return json_error(503, "the database is unavailable; retry later", {"Retry-After": "5"})
        _log_failure("management API call failed", exc)
        return json_error(500, "internal error")

    # --- routes ---------------------------------------------------------

    async def register(self, request: Request) -> Response:
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        try:
            doc = await self.shim.db(store.api_register_webhook, bearer(request), body)
        except Exception as exc:  # noqa: BLE001 - mapped to a JSON error
            return self.error(exc)
        # 201 for a new webhook, 200 when the number's webhook was updated.
        return json_response(201 if doc.get("created") else 200, {"success": True, "data": doc})

    async def list(self, request: Request) -> Response:
        return await self.call(store.api_list_webhooks, bearer(request))

    async def webhook(self, request: Request) -> Response:
        token, webhook_id = bearer(request), request.path_params["id"]
        if request.method == "GET":
            return await self.call(store.api_get_webhook, token, webhook_id)
        if request.method == "DELETE":
            return await self.call(store.api_delete_webhook, token, webhook_id)
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        return await self.call(store.api_update_webhook, token, webhook_id, body)

    async def events(self, request: Request) -> Response:
        params = request.query_params
        unknown = sorted(set(params) - {"cursor", "limit"})
        if unknown:
            return json_error(400, f"unknown query parameter(s): {', '.join(unknown)} (allowed: cursor, limit)")
        limit_text = params.get("limit", "50")
        if not limit_text.isascii() or not limit_text.isdigit() or len(limit_text) > 6:
            return json_error(422, f"limit must be an integer between 1 and 200, got {limit_text[:20]!r}")
        return await self.call(store.api_webhook_events, bearer(request), request.path_params["id"],
                               params.get("cursor"), int(limit_text))

    async def retry(self, request: Request) -> Response:
        return await self.call(store.api_retry_event, bearer(request), request.path_params["event_id"])

    async def replay(self, request: Request) -> Response:
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        return await self.call(store.api_replay_webhook, bearer(request), request.path_params["id"], body)

    # --- OpenAPI ----------------------------------------------------------

    def openapi(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Paths and schemas of these routes for /openapi.json."""
        return _openapi_paths(), _OPENAPI_SCHEMAS


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _ok(description: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {
        "type": "object", "required": ["success", "data"],
        "properties": {"success": {"const": True}, "data": data}}}}}


def _err(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


_COMMON_ERRORS: Final = {
    "401": _err("missing, malformed, unknown or revoked API token"),
    "403": _err("the token lacks the scope (webhooks:read or webhooks:write)"),
    "503": _err("database unavailable; retry"),
}
_ID: Final = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
_BODY_ERRORS: Final = {
    "400": _err("malformed JSON, not an object, a missing or unknown field"),
    "413": _err("body over 64 KiB"),
    "415": _err("Content-Type is not application/json"),
    "422": _err("an invalid value (each message names the field)"),
}
_WEBHOOK_ONE: Final = {"type": "object", "properties": {"webhook": _ref("Webhook")}}

_OPENAPI_SCHEMAS: Final[dict[str, Any]] = {
    "Webhook": {"type": "object", "properties": {
        "id": {"type": "string", "format": "uuid"}, "phone_number": {"type": ["string", "null"]},
        "webhook_url": {"type": "string"}, "is_active": {"type": "boolean"},
        "status": {"enum": ["active", "inactive", "failed"]}, "failure_count": {"type": "integer"},
        "max_retries": {"type": "integer"}, "event_types": {"type": "array", "items": {"type": "string"}},
        "timeout_ms": {"type": "integer"}, "last_error": {"type": ["string", "null"]},
        "last_success_at": {"type": ["string", "null"]}, "last_attempt_at": {"type": ["string", "null"]},
        "metadata": {"type": "object"}, "created_at": {"type": "string"}, "updated_at": {"type": "string"},
        "secret": {"type": "string", "description": "whsec_…: only when created or rotated"}}},
    "WebhookRegistration": {"type": "object", "additionalProperties": False,
                            "required": ["phone_number", "webhook_url"], "properties": {
        "phone_number": {"type": "string", "pattern": "^\\+?[0-9]{7,15}$"},
        "webhook_url": {"type": "string", "description": "https:// (http only to a loopback host)"},
        "max_retries": {"type": "integer", "minimum": 0, "maximum": 10, "default": 3},
        "event_types": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 50},
        "metadata": {"type": "object"}}},
    "WebhookUpdate": {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
        "phone_number": {"type": "string"}, "webhook_url": {"type": "string"},
        "max_retries": {"type": "integer", "minimum": 0, "maximum": 10},
        "event_types": {"type": "array", "items": {"type": "string"}}, "metadata": {"type": "object"},
        "is_active": {"type": "boolean", "description": "true also resets the failure counter"},
        "rotate_secret": {"const": True}}},
    "Delivery": {"type": "object", "properties": {
        "event_id": {"type": "string"}, "event_type": {"type": "string"},
        "status": {"enum": ["pending", "processing", "sent", "dead_letter", "skipped"]},
        "attempt_count": {"type": "integer"}, "http_status": {"type": ["integer", "null"]},
        "response": {"type": ["string", "null"], "description": "first 1 KiB of the last answer"},
        "error": {"type": ["string", "null"]}, "next_retry_at": {"type": ["string", "null"]},
        "created_at": {"type": "string"}, "delivered_at": {"type": ["string", "null"]},
        "attempts": {"type": "array", "items": {"type": "object"}}}},
    "Replay": {"type": "object", "additionalProperties": False, "required": ["since"], "properties": {
        "since": {"type": "string", "format": "date-time"},
        "until": {"type": "string", "format": "date-time", "description": "default now; at most 31 days after since"}}},
}


def _op(op_id: str, summary: str, responses: dict[str, Any], *, params: list[Any] | None = None,
        body: str | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "tags": ["webhooks"],
                          "security": [{"apiToken": []}], "parameters": params or [],
                          "responses": {**responses, **_COMMON_ERRORS, **(_BODY_ERRORS if body else {})}}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    return op


def _openapi_paths() -> dict[str, Any]:
    not_found = {"404": _err("no such webhook in your account (another account's ids are 404 too)")}
    return {
        "/api/webhooks/register": {"post": _op(
            "registerWebhook", "Register a webhook for a phone number, or update that number's webhook",
            {"201": _ok("created (with its signing secret, shown once)", _WEBHOOK_ONE | {
                "properties": {"created": {"type": "boolean"}, "webhook": _ref("Webhook")}}),
             "200": _ok("the number's webhook updated and re-activated", _WEBHOOK_ONE)},
            body="WebhookRegistration")},
        "/api/webhooks/list": {"get": _op("listWebhooks", "The account's webhooks", {"200": _ok("the list", {
            "type": "object", "properties": {"webhooks": {"type": "array", "items": _ref("Webhook")}}})})},
        "/api/webhooks/{id}": {
            "get": _op("getWebhook", "One webhook", {"200": _ok("the webhook", _WEBHOOK_ONE), **not_found},
                       params=[_ID]),
            "patch": _op("updateWebhook", "Change fields (only those sent)",
                         {"200": _ok("the webhook", _WEBHOOK_ONE), **not_found,
                          "409": _err("another webhook of the account has that phone number")},
                         params=[_ID], body="WebhookUpdate"),
            "delete": _op("deleteWebhook", "Remove a webhook and its queued deliveries",
                          {"200": _ok("deleted", {"type": "object"}), **not_found}, params=[_ID]),
        },
        "/api/webhooks/{id}/events": {"get": _op(
            "webhookEvents", "Delivery history, newest first",
            {"200": _ok("a page", {"type": "object", "properties": {
                "events": {"type": "array", "items": _ref("Delivery")},
                "next_cursor": {"type": ["string", "null"]}}}), **not_found,
             "422": _err("a bad limit or cursor")},
            params=[_ID, {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                      "maximum": 200, "default": 50}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"},
                     "description": "next_cursor of the previous page"}])},
        "/api/webhooks/events/{event_id}/retry": {"post": _op(
            "retryEvent", "Send an event's failed delivery again (fresh attempts)",
            {"200": _ok("re-queued", {"type": "object"}),
             "404": _err("no such event for your webhooks"), "409": _err("nothing failed for good")},
            params=[{"name": "event_id", "in": "path", "required": True,
                     "schema": {"type": "string", "format": "uuid"}}])},
        "/api/webhooks/{id}/replay": {"post": _op(
            "replayWebhook", "Send again what the webhook missed in a time range",
            {"200": _ok("re-queued and created deliveries", {"type": "object"}), **not_found,
             "409": _err("the webhook is not active")},
            params=[_ID], body="Replay")},
    }

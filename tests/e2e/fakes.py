"""Loopback test doubles for the n8n end-to-end suite.

* :class:`FakeGraphAPI` — the WhatsApp Cloud API "send message" endpoint
  (``POST /{version}/{phone-number-id}/messages``): checks the bearer token,
  records every message and answers like Graph (``messages[0].id`` = a wamid).
* :class:`CallbackRecorder` — a transparent reverse proxy in front of the
  shim's ``/api/webhook``: forwards the exact bytes and headers, records what
  n8n sent and what the shim answered (so a test can wait for "the second
  delivery was answered" instead of sleeping).

Both are stdlib ``ThreadingHTTPServer`` on 127.0.0.1 with an ephemeral port.
"""

from __future__ import annotations

import itertools
import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

S = TypeVar("S", bound="_Server")


class _Server:
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name=type(self).__name__, daemon=True)
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self: S) -> S:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@dataclass
class SentMessage:
    """One message n8n sent (header names lower-cased)."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    wamid: str

    @property
    def text(self) -> str:
        """Everything a patient would read: body text, header, footer, button titles."""
        b = self.body
        if b.get("type") == "text":
            return str(b["text"]["body"])
        inter = b.get("interactive", {})
        parts = [inter.get("body", {}).get("text", ""), inter.get("footer", {}).get("text", "")]
        for button in inter.get("action", {}).get("buttons", []):
            parts.append(button.get("reply", {}).get("title", ""))
        return "\n".join(parts)

    @property
    def reply_ids(self) -> list[str]:
        """The ids of the reply buttons / list rows (what comes back in replies)."""
        action = self.body.get("interactive", {}).get("action", {})
        ids = [b["reply"]["id"] for b in action.get("buttons", [])]
        for section in action.get("sections", []):
            ids += [row["id"] for row in section.get("rows", [])]
        return ids


class _GraphHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _reply(self, status: int, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        fake: FakeGraphAPI = self.server.owner  # type: ignore[attr-defined]
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = self.path.strip("/").split("/")
        if len(parts) != 3 or parts[1] != fake.phone_number_id or parts[2] != "messages":
            self._reply(404, {"error": {"message": f"unknown path {self.path}", "code": 100}})
            return
        if self.headers.get("Authorization") != f"Bearer {fake.token}":
            with fake.lock:
                fake.unauthorized += 1
            self._reply(401, {"error": {"message": "Invalid OAuth access token", "code": 190}})
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._reply(400, {"error": {"message": "body is not JSON", "code": 100}})
            return
        scripted = fake.errors_for.get(str(body.get("to")))
        if scripted is not None:
            status, code, message = scripted
            self._reply(status, {"error": {"message": message, "type": "OAuthException", "code": code,
                                           "error_data": {"messaging_product": "whatsapp", "details": message},
                                           "fbtrace_id": "AbCdEf"}})
            return
        problems = fake.validate(body)
        if problems:
            with fake.lock:
                fake.invalid.append((body, problems))
            self._reply(400, {"error": {"message": "; ".join(problems), "code": 100}})
            return
        with fake.lock:
            wamid = f"wamid.FAKE{next(fake.counter):08d}"
            fake.messages.append(SentMessage(self.path, {k.lower(): v for k, v in self.headers.items()}, body, wamid))
        self._reply(200, {
            "messaging_product": "whatsapp",
            "contacts": [{"input": body.get("to"), "wa_id": body.get("to")}],
            "messages": [{"id": wamid}],
        })


class FakeGraphAPI(_Server):
    """``POST /<version>/<phone_number_id>/messages`` with ``Authorization: Bearer <token>``."""

    def __init__(self, phone_number_id: str = "1234567890", token: str = "test-graph-token") -> None:
        super().__init__(_GraphHandler)
        self.phone_number_id = phone_number_id
        self.token = token
        self.messages: list[SentMessage] = []
        self.invalid: list[tuple[dict[str, Any], list[str]]] = []
        self.unauthorized = 0
        self.counter = itertools.count(1)
        #: recipient → (HTTP status, Graph error code, message) answered instead of sending.
        self.errors_for: dict[str, tuple[int, int, str]] = {}

    @property
    def graph_base_url(self) -> str:
        """What n8n's WHATSAPP_GRAPH_BASE_URL is set to (version included)."""
        return f"{self.base_url}/v21.0"

    @staticmethod
    def validate(body: dict[str, Any]) -> list[str]:
        """The Cloud API's basic rules for a text / interactive message."""
        problems = []
        if body.get("messaging_product") != "whatsapp":
            problems.append("messaging_product must be whatsapp")
        if not str(body.get("to", "")).isdigit():
            problems.append("to must be digits")
        kind = body.get("type")
        if kind == "text":
            if not body.get("text", {}).get("body"):
                problems.append("text.body is required")
        elif kind == "interactive":
            inter = body.get("interactive", {})
            text = inter.get("body", {}).get("text", "")
            if not text or len(text) > 1024:
                problems.append("interactive.body.text must be 1–1024 characters")
            action = inter.get("action", {})
            if inter.get("type") == "button":
                buttons = action.get("buttons", [])
                if not 1 <= len(buttons) <= 3:
                    problems.append("1–3 reply buttons")
                for b in buttons:
                    if len(b.get("reply", {}).get("title", "")) > 20 or len(b.get("reply", {}).get("id", "")) > 256:
                        problems.append("button title ≤ 20, id ≤ 256")
            elif inter.get("type") == "list":
                rows = [r for s in action.get("sections", []) for r in s.get("rows", [])]
                if not action.get("button") or not 1 <= len(rows) <= 10:
                    problems.append("list needs a button and 1–10 rows")
                for r in rows:
                    if len(r.get("title", "")) > 24 or len(r.get("id", "")) > 200:
                        problems.append("row title ≤ 24, id ≤ 200")
            else:
                problems.append(f"unsupported interactive type {inter.get('type')!r}")
        elif kind == "template":
            tpl = body.get("template", {})
            if not tpl.get("name") or not tpl.get("language", {}).get("code"):
                problems.append("template needs a name and language.code")
            for comp in tpl.get("components", []):
                if comp.get("type") == "button":
                    if comp.get("sub_type") != "quick_reply" or not str(comp.get("index", "")).isdigit():
                        problems.append("template buttons: sub_type quick_reply and an index")
                    for p in comp.get("parameters", []):
                        if p.get("type") != "payload" or not p.get("payload") or len(p["payload"]) > 256:
                            problems.append("quick_reply parameters: a payload of 1–256 characters")
                elif comp.get("type") == "body":
                    if not all(p.get("type") == "text" and p.get("text") for p in comp.get("parameters", [])):
                        problems.append("body parameters: non-empty text")
                else:
                    problems.append(f"unsupported template component {comp.get('type')!r}")
        else:
            problems.append(f"unsupported type {kind!r}")
        return problems

    def snapshot(self) -> list[SentMessage]:
        with self.lock:
            return list(self.messages)


@dataclass
class Callback:
    """One callback n8n sent to Barnum (header names lower-cased) and the shim's answer."""

    headers: dict[str, str]
    body: bytes
    status: int
    response: bytes


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:  # noqa: N802
        rec: CallbackRecorder = self.server.owner  # type: ignore[attr-defined]
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        forward = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "connection", "content-length"}}
        req = urllib.request.Request(rec.target + self.path, data=raw, headers=forward, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:  # noqa: S310 - loopback only
                status, data, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            status, data, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
        with rec.lock:
            rec.callbacks.append(Callback({k.lower(): v for k, v in self.headers.items()}, raw, status, data))
        self.send_response(status)
        self.send_header("Content-Type", ctype or "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class CallbackRecorder(_Server):
    """Forwards POSTs to ``target`` (the shim) and records each exchange."""

    def __init__(self, target: str) -> None:
        super().__init__(_ProxyHandler)
        self.target = target.rstrip("/")
        self.callbacks: list[Callback] = []

    def snapshot(self) -> list[Callback]:
        with self.lock:
            return list(self.callbacks)


@dataclass
class Inbound:
    """Build WhatsApp Cloud API inbound notifications (as Meta POSTs them)."""

    phone_number_id: str
    display_phone: str = "351210000000"
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def notification(self, message: dict[str, Any], from_: str, name: str = "Patient") -> dict[str, Any]:
        return {
            "object": "whatsapp_business_account",
            "entry": [{
                "id": "WHATSAPP_BUSINESS_ACCOUNT_ID",
                "changes": [{
                    "field": "messages",
                    "value": {
                        "messaging_product": "whatsapp",
                        "metadata": {"display_phone_number": self.display_phone,
                                     "phone_number_id": self.phone_number_id},
                        "contacts": [{"profile": {"name": name}, "wa_id": from_}],
                        "messages": [message],
                    },
                }],
            }],
        }

    def button_reply(self, from_: str, reply_id: str, title: str, context_id: str, ts: int) -> dict[str, Any]:
        return {
            "from": from_,
            "id": f"wamid.INBOUND{next(self._ids):08d}",
            "timestamp": str(ts),
            "context": {"from": self.display_phone, "id": context_id},
            "type": "interactive",
            "interactive": {"type": "button_reply", "button_reply": {"id": reply_id, "title": title}},
        }

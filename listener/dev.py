"""``barnum dev``: the whole system on one machine, for trying it out.

An embedded PostgreSQL under ``./.barnum/`` (local server binaries when
present, else the ``pgserver`` package), migrations, a demo clinic with one
appointment, a demo endpoint served in-process that prints each outgoing
message as the patient would read it, and the relay + shim in one loop.
Ctrl-C stops everything, Postgres included; the next run reuses the data,
PostgreSQL's port (``./.barnum/port``, so the database URL stays the same)
and re-prints, with fresh links, the messages still awaiting an answer.
``--reset`` starts over; ``--print-url`` prints the database URL for psql.

``--whatsapp`` shows the native sender instead (no n8n): an in-process fake
of the WhatsApp Cloud API receives what the relay sends to an endpoint of
kind whatsapp_cloud, prints each message as the patient's phone shows it with
a "tap" link per button, and a tap posts the button reply, signed like Meta
does, to the shim's /whatsapp/webhook — appointment → message → tap →
confirmed, on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import html
import json
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import psycopg
from aiohttp import web

from listener import logs, migrate, relay, signing, store
from listener.config import Config, load
from listener.devdb import EmbeddedServer, LocalCluster, PgClusterError, dev_server, free_port
from listener.relay_cli import event_loop_runner
from listener.run import run_together

DB_NAME = "barnum"

# What the patient reads, per event type and locale.  The real wording lives
# in n8n's WhatsApp templates (integrations/n8n); this is the demo's preview.
# Specialty and professional are optional on an appointment, so the texts
# take them as phrases ({a_appt}, {appt}, {with_}) that read naturally
# whichever are missing (see _phrases): never "consulta de  com  a".
TEXTS: dict[str, dict[str, str]] = {
    "pt": {
        "appointment.pre_confirmed": "Olá {first}! Tem {a_appt}{with_} a {date} às {time}. Confirma?",
        "appointment.reminder": "Olá {first}! Lembrete: {appt} amanhã, {date} às {time}{with_}.",
        "appointment.no_show": "Olá {first}, sentimos a sua falta hoje. Quer marcar outra data?",
        "appointment.completed": "Obrigado pela visita, {first}! Pode avaliar a consulta de 1 a 5?",
        "appointment.confirmed": "Consulta confirmada: {date} às {time}{with_}. Até lá!",
        "appointment.cancelled": "A sua consulta de {date} às {time} foi cancelada.",
        "appointment.rescheduled": "A sua consulta passou para {date} às {time}{with_}. Confirma?",
        "appointment.reschedule_requested": "Recebemos o seu pedido de reagendamento; vamos contactá-lo.",
        "patient.reactivation": "Olá {first}! Já passou algum tempo desde a última visita. Quer marcar uma consulta?",
    },
    "en": {
        "appointment.pre_confirmed": "Hi {first}! You have {a_appt}{with_} on {date} at {time}. Can you confirm?",
        "appointment.reminder": "Hi {first}! Reminder: your {appt} tomorrow, {date} at {time}{with_}.",
        "appointment.no_show": "Hi {first}, we missed you today. Would you like another date?",
        "appointment.completed": "Thanks for visiting, {first}! Would you rate the appointment from 1 to 5?",
        "appointment.confirmed": "Appointment confirmed: {date} at {time}{with_}. See you then!",
        "appointment.cancelled": "Your appointment on {date} at {time} was cancelled.",
        "appointment.rescheduled": "Your appointment moved to {date} at {time}{with_}. Can you confirm?",
        "appointment.reschedule_requested": "We got your request to reschedule; we will contact you.",
        "patient.reactivation": "Hi {first}! It has been a while since your last visit. Would you like to book one?",
    },
}


def _phrases(locale: str, specialty: str, professional: str) -> dict[str, str]:
    """The appointment as phrases: with its specialty ("consulta de X") or
    without ("uma consulta"), " com Dr. Y" or nothing."""
    if locale == "en":
        appt = f"{specialty} appointment" if specialty else "appointment"
        article = "an" if appt[0].lower() in "aeiou" else "a"
        return {"appt": appt, "a_appt": f"{article} {appt}",
                "with_": f" with {professional}" if professional else ""}
    return {"appt": f"consulta de {specialty}" if specialty else "consulta",
            "a_appt": f"consulta de {specialty}" if specialty else "uma consulta",
            "with_": f" com {professional}" if professional else ""}


LINK_LABELS = {
    "pt": {"confirm": "✓ Confirmar", "cancel": "✗ Cancelar", "reschedule": "↻ Reagendar"},
    "en": {"confirm": "✓ Confirm", "cancel": "✗ Cancel", "reschedule": "↻ Reschedule"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reset", action="store_true", help="delete ./.barnum (database included) and start over")
    parser.add_argument("--host", default=None, help="shim address (default: $BARNUM_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="shim port (default: $BARNUM_PORT or 8000; a free one if taken)")
    parser.add_argument("--whatsapp", action="store_true",
                        help="without n8n: the relay sends WhatsApp Cloud API messages to a fake Graph API that "
                             "prints them with tap links; a tap posts the button reply to /whatsapp/webhook")
    parser.add_argument("--print-url", action="store_true",
                        help='print the demo database URL and exit: psql "$(barnum dev --print-url)"')


def render_message(payload: dict[str, Any], locale: str) -> str:
    """One outgoing message as the patient would read it: text + action links."""
    locale = locale if locale in TEXTS else "pt"
    texts = TEXTS[locale]
    appt = payload.get("appointment") or {}
    person = appt.get("patient") or payload.get("patient") or {}
    name = str(person.get("name") or "")
    fields = {
        "first": name.split(" ")[0] if name else "",
        "date": appt.get("date", ""),
        "time": appt.get("time", ""),
        **_phrases(locale,
                   str((appt.get("specialty") or {}).get("name") or "").strip(),
                   str((appt.get("professional") or {}).get("name") or "").strip()),
    }
    event_type = str(payload.get("event_type", ""))
    text = texts.get(event_type, event_type).format(**fields)
    lines = [f"📱 WhatsApp → {name} ({person.get('phone', '')})  [{event_type}]", f"   {text}"]
    labels = LINK_LABELS.get(locale, LINK_LABELS["pt"])
    links = payload.get("action_links") or {}
    for kind in sorted(links, key=lambda k: (list(labels).index(k) if k in labels else 99, k)):
        lines.append(f"   {labels.get(kind, kind)}: {links[kind]}")
    return "\n".join(lines)


class DemoEndpoint:
    """The demo's webhook receiver: verifies the signature like n8n would,
    then prints the message."""

    def __init__(self, keys: list[bytes], locale: str) -> None:
        self.keys = keys
        self.locale = locale
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not signing.verify_hex(self.keys, body, request.headers.get("X-Webhook-Signature")):
            print("📵 demo endpoint: rejected a message with a bad signature", flush=True)
            return web.json_response({"error": "bad signature"}, status=401)
        print("\n" + render_message(json.loads(body), self.locale) + "\n", flush=True)
        return web.json_response({"received": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/demo", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/demo"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


# ------------------------------------------------------------ --whatsapp

#: The dev clinic's WhatsApp number: the endpoint sends from it and taps come
#: back to it (whatsapp_number_add routes it to the default account).
DEV_PHONE_NUMBER_ID = "100000000000001"
DEV_DISPLAY_NUMBER = "351210000000"
GRAPH_VERSION = "v21.0"
#: The variable the relay reads the Graph API token from (set in-process).
DEV_TOKEN_ENV = "WHATSAPP_TOKEN"
WHATSAPP_ENDPOINT = "whatsapp"
WHATSAPP_EVENT_TYPES = ["appointment.*", "patient.reactivation", "message.send"]

#: Titles for a template's quick-reply buttons (their text lives in the
#: template at Meta, not in the request) and for re-printed requests.
BUTTON_TITLES = {
    "pt": {"confirm": "Confirmar", "cancel": "Cancelar", "reschedule": "Reagendar"},
    "en": {"confirm": "Confirm", "cancel": "Cancel", "reschedule": "Reschedule"},
}


class DevError(Exception):
    """The demo cannot set itself up; the message says what to do."""


@dataclass
class Choice:
    """One thing the patient can tap, and the message part Meta posts back."""

    title: str
    reply: dict[str, Any]


@dataclass
class PhoneMessage:
    wamid: str
    to: str
    kind: str
    text: str
    choices: list[Choice] = field(default_factory=list)


def _button_reply(reply_id: str, title: str) -> dict[str, Any]:
    return {"type": "interactive", "interactive": {"type": "button_reply",
                                                   "button_reply": {"id": reply_id, "title": title}}}


def phone_view(body: dict[str, Any], locale: str) -> tuple[str, list[Choice]]:
    """A Cloud API message body as the phone shows it: its text, and what can
    be tapped (reply buttons, list rows, a template's quick replies) with the
    reply each tap sends back, shaped as Meta's webhook delivers it."""
    kind = body.get("type")
    if kind == "text":
        return str((body.get("text") or {}).get("body", "")), []
    if kind == "interactive":
        inter = body.get("interactive") or {}
        header = inter.get("header") or {}
        parts = [str(header.get("text", "")) if header.get("type") == "text" else "",
                 str((inter.get("body") or {}).get("text", "")), str((inter.get("footer") or {}).get("text", ""))]
        action = inter.get("action") or {}
        choices = [_button_reply(str(b["reply"]["id"]), str(b["reply"].get("title", "")))
                   for b in action.get("buttons", []) if isinstance(b.get("reply"), dict) and "id" in b["reply"]]
        if inter.get("type") == "list":
            parts.append(f"[{action.get('button', 'Menu')}]")
            for section in action.get("sections", []):
                for row in section.get("rows", []):
                    reply = {"id": str(row.get("id", "")), "title": str(row.get("title", ""))}
                    if row.get("description"):
                        reply["description"] = str(row["description"])
                    choices.append({"type": "interactive",
                                    "interactive": {"type": "list_reply", "list_reply": reply}})
        text = "\n".join(p for p in parts if p)
        return text, [Choice(_reply_title(c), c) for c in choices]
    if kind == "template":
        tpl = body.get("template") or {}
        params: list[str] = []
        quick: list[Choice] = []
        titles = BUTTON_TITLES.get(locale, BUTTON_TITLES["pt"])
        for comp in tpl.get("components", []):
            if comp.get("type") == "body":
                params += [str(p.get("text", "")) for p in comp.get("parameters", [])]
            elif comp.get("type") == "button":
                for p in comp.get("parameters", []):
                    payload = str(p.get("payload", ""))
                    action = payload.split(":")[1] if payload.startswith("barnum:") and payload.count(":") >= 2 else ""
                    title = titles.get(action, f"button {int(comp.get('index', 0)) + 1}")
                    quick.append(Choice(title, {"type": "button", "button": {"payload": payload, "text": title}}))
        language = (tpl.get("language") or {}).get("code", "")
        return f"(template {tpl.get('name')}, {language}: {' · '.join(params)})", quick
    return f"({kind} message)", []


def _reply_title(reply: dict[str, Any]) -> str:
    inter = reply["interactive"]
    return str((inter.get("button_reply") or inter.get("list_reply") or {}).get("title", ""))


class FakeWhatsApp:
    """``barnum dev --whatsapp``'s stand-in for Meta: the Graph API's
    ``POST /<version>/<phone_number_id>/messages`` (bearer token checked,
    answered like Graph) printing each message as the patient's phone shows
    it, and ``GET /tap/<wamid>/<n>``: the patient taps button n, so the fake
    posts the reply to the shim's /whatsapp/webhook signed with the app
    secret, as Meta would."""

    def __init__(self, token: str, app_secret: str, locale: str) -> None:
        self.token = token
        self.app_secret = app_secret.encode()
        self.locale = locale
        self.phone_number_id = DEV_PHONE_NUMBER_ID
        self.messages: dict[str, PhoneMessage] = {}
        self.webhook_url = ""  # the shim's /whatsapp/webhook, set once its port is known
        self.base = ""
        self.runner: web.AppRunner | None = None
        self.session: aiohttp.ClientSession | None = None

    @property
    def graph_url(self) -> str:
        """The endpoint's Graph API base URL (version included)."""
        return f"{self.base}/{GRAPH_VERSION}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(f"/{GRAPH_VERSION}/{{pnid}}/messages", self.send)
        app.router.add_get("/tap/{wamid}/{n}", self.tap)
        app.router.add_get("/", self.phone)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.base = f"http://127.0.0.1:{port}"
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.runner is not None:
            await self.runner.cleanup()

    @staticmethod
    def _graph_error(status: int, code: int, message: str) -> web.Response:
        return web.json_response({"error": {"message": message, "type": "OAuthException", "code": code,
                                            "fbtrace_id": "DEV"}}, status=status)

    async def send(self, request: web.Request) -> web.Response:
        if request.match_info["pnid"] != self.phone_number_id:
            return self._graph_error(400, 100,
                                     f"Unsupported post request: no phone number {request.match_info['pnid']}")
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {self.token}".encode()):
            print("📵 fake WhatsApp: refused a message with a wrong access token", flush=True)
            return self._graph_error(401, 190, "Invalid OAuth access token")
        try:
            body = json.loads(await request.read())
        except ValueError:
            return self._graph_error(400, 100, "the body is not JSON")
        to = str(body.get("to", "")) if isinstance(body, dict) else ""
        if not isinstance(body, dict) or body.get("messaging_product") != "whatsapp" or not to.isdigit():
            return self._graph_error(400, 100, "messaging_product must be whatsapp and to the recipient's digits")
        text, choices = phone_view(body, self.locale)
        msg = self.remember(to, str(body.get("type")), text, choices)
        print("\n" + self.render(msg) + "\n", flush=True)
        return web.json_response({"messaging_product": "whatsapp", "contacts": [{"input": to, "wa_id": to}],
                                  "messages": [{"id": msg.wamid}]})

    def remember(self, to: str, kind: str, text: str, choices: list[Choice]) -> PhoneMessage:
        msg = PhoneMessage(f"wamid.DEV{secrets.token_hex(12).upper()}", to, kind, text, choices)
        self.messages[msg.wamid] = msg
        return msg

    def tap_url(self, msg: PhoneMessage, n: int) -> str:
        return f"{self.base}/tap/{msg.wamid}/{n}"

    def render(self, msg: PhoneMessage) -> str:
        lines = [f"📱 WhatsApp → +{msg.to}  [{msg.kind}]"]
        lines += [f"   {line}" for line in msg.text.splitlines()]
        for n, choice in enumerate(msg.choices, 1):
            lines.append(f"   ▸ {choice.title}: {self.tap_url(msg, n)}")
        return "\n".join(lines)

    def notification(self, msg: PhoneMessage, choice: Choice) -> dict[str, Any]:
        """The patient's tap as Meta's webhook notification."""
        inbound = {"context": {"from": DEV_DISPLAY_NUMBER, "id": msg.wamid}, "from": msg.to,
                   "id": f"wamid.DEVIN{secrets.token_hex(12).upper()}", "timestamp": str(int(time.time())),
                   **choice.reply}
        return {"object": "whatsapp_business_account", "entry": [{"id": "0", "changes": [{
            "field": "messages",
            "value": {"messaging_product": "whatsapp",
                      "metadata": {"display_phone_number": DEV_DISPLAY_NUMBER,
                                   "phone_number_id": self.phone_number_id},
                      "contacts": [{"profile": {"name": f"+{msg.to}"}, "wa_id": msg.to}],
                      "messages": [inbound]}}]}]}

    async def tap(self, request: web.Request) -> web.Response:
        msg = self.messages.get(request.match_info["wamid"])
        n = request.match_info["n"]
        if msg is None or not n.isdigit() or not 1 <= int(n) <= len(msg.choices):
            return _page(404, "No such button",
                         "<p>This fake phone does not know that message or button. Tap links last one run of "
                         "<code>barnum dev --whatsapp</code>: restarting re-prints what still awaits an "
                         "answer with new ones.</p>")
        choice = msg.choices[int(n) - 1]
        raw = json.dumps(self.notification(msg, choice)).encode()
        signature = "sha256=" + hmac.new(self.app_secret, raw, hashlib.sha256).hexdigest()
        assert self.session is not None
        try:
            async with self.session.post(self.webhook_url, data=raw, headers={
                    "Content-Type": "application/json", "X-Hub-Signature-256": signature}) as resp:
                status, answer = resp.status, await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            print(f"👆 tapped “{choice.title}” on +{msg.to}: the shim did not answer ({exc!r})", flush=True)
            return _page(502, "The shim did not answer", f"<p>POST {html.escape(self.webhook_url)}: "
                         f"{html.escape(repr(exc))}</p>")
        print(f"👆 tapped “{choice.title}” on +{msg.to} → POST /whatsapp/webhook: {status} {answer}",
              flush=True)
        try:
            shown = json.dumps(json.loads(answer), indent=2, ensure_ascii=False)
        except ValueError:
            shown = answer
        return _page(200, f"Tapped “{choice.title}”",
                     f"<p>The patient (+{html.escape(msg.to)}) tapped <b>{html.escape(choice.title)}</b>. "
                     f"As Meta would, the fake posted the signed button reply to "
                     f"<code>{html.escape(self.webhook_url)}</code>; Barnum answered "
                     f"<b>{status}</b>:</p><pre>{html.escape(shown)}</pre>"
                     f"<p><a href=\"/\">← the phone</a></p>")

    async def phone(self, request: web.Request) -> web.Response:
        """Every message of this run, newest first, with its tap links."""
        items = []
        for msg in reversed(list(self.messages.values())):
            taps = "".join(f'<li><a href="{html.escape(self.tap_url(msg, n))}">{html.escape(c.title)}</a></li>'
                           for n, c in enumerate(msg.choices, 1))
            items.append(f"<section><p><small>→ +{html.escape(msg.to)} [{html.escape(msg.kind)}]</small></p>"
                         f"<p>{html.escape(msg.text).replace(chr(10), '<br>')}</p><ul>{taps}</ul></section>")
        return _page(200, "Fake WhatsApp", "".join(items) or "<p>No message yet.</p>")


def _page(status: int, title: str, content: str) -> web.Response:
    doc = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>"
           f"<body style=\"font-family: sans-serif; max-width: 40em\"><h1>{html.escape(title)}</h1>{content}"
           "</body></html>")
    return web.Response(status=status, text=doc, content_type="text/html")


def reissued(payload: dict[str, Any], locale: str) -> tuple[str, str, list[Choice]]:
    """A re-issued confirmation request (fresh action links) as the phone
    would show it: recipient digits, text, buttons carrying the new tokens."""
    appt = payload.get("appointment") or {}
    person = appt.get("patient") or payload.get("patient") or {}
    to = "".join(ch for ch in str(person.get("phone", "")) if ch.isdigit())
    text = render_message(payload, locale).splitlines()[1].strip()
    titles = BUTTON_TITLES.get(locale, BUTTON_TITLES["pt"])
    links = payload.get("action_links") or {}
    choices = []
    for kind in sorted(links, key=lambda k: (list(titles).index(k) if k in titles else 99, k)):
        token = (parse_qs(urlsplit(str(links[kind])).query).get("token") or [""])[0]
        title = titles.get(kind, kind)
        choices.append(Choice(title, _button_reply(f"barnum:{kind}:{token}", title)))
    return to, text, choices


async def _endpoints(conn: asyncpg.Connection) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in await store.endpoint_list(conn)}


def _is_dev_sender(ep: dict[str, Any]) -> bool:
    return ep.get("kind") == "whatsapp_cloud" and str(ep.get("url", "")).endswith(
        f"/{DEV_PHONE_NUMBER_ID}/messages")


async def _use_fake_whatsapp(conn: asyncpg.Connection, graph_url: str) -> None:
    """Idempotently: the dev number routed to the default account, the
    endpoint ``whatsapp`` sending to this run's fake, the demo endpoint off
    (each message is printed once)."""
    numbers = await store.number_list(conn)
    if not any(n.get("phone_number_id") == DEV_PHONE_NUMBER_ID for n in numbers):
        await store.number_add(conn, DEV_PHONE_NUMBER_ID, "default", DEV_DISPLAY_NUMBER)
    endpoints = await _endpoints(conn)
    if endpoints.get("demo", {}).get("is_active"):
        await store.endpoint_set_active(conn, "demo", False)
    ep = endpoints.get(WHATSAPP_ENDPOINT)
    if ep is None:
        await store.endpoint_add_whatsapp(conn, WHATSAPP_ENDPOINT, DEV_PHONE_NUMBER_ID, DEV_TOKEN_ENV,
                                          graph_url, "default", WHATSAPP_EVENT_TYPES, {}, False)
        return
    if not _is_dev_sender(ep):
        raise DevError(f"an endpoint named {WHATSAPP_ENDPOINT!r} exists and is not the demo's WhatsApp sender; "
                       f"remove it (barnum endpoints remove {WHATSAPP_ENDPOINT}) or start over with --reset")
    # The fake listens on a new port each run: point the endpoint at it.
    await store.upsert_endpoint(conn, WHATSAPP_ENDPOINT,
                                f"{graph_url}/{DEV_PHONE_NUMBER_ID}/messages")
    if not ep.get("is_active"):
        await store.endpoint_set_active(conn, WHATSAPP_ENDPOINT, True)


async def _use_demo_endpoint(conn: asyncpg.Connection, url: str) -> None:
    """The default mode after a --whatsapp run: the demo endpoint on again,
    the (now unserved) fake WhatsApp sender off."""
    await store.upsert_endpoint(conn, "demo", url)
    endpoints = await _endpoints(conn)
    if not endpoints["demo"].get("is_active"):
        await store.endpoint_set_active(conn, "demo", True)
    ep = endpoints.get(WHATSAPP_ENDPOINT)
    if ep is not None and ep.get("is_active") and _is_dev_sender(ep):
        await store.endpoint_set_active(conn, WHATSAPP_ENDPOINT, False)


SECRET_NAMES = ("webhook_secret", "internal_api_secret",
                # --whatsapp: Meta's app secret and verify token, the Graph API token.
                "whatsapp_app_secret", "whatsapp_verify_token", "whatsapp_token")


def _secrets(base: Path) -> dict[str, str]:
    """The demo's own secrets, generated once and kept in ./.barnum (0600);
    a directory from an earlier version gets the ones it lacks."""
    path = base / "secrets.json"
    data: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = [name for name in SECRET_NAMES if name not in data]
    if missing:
        data.update({name: secrets.token_urlsafe(32) for name in missing})
        base.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps(data))
    return data


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        # As servers bind (PostgreSQL, uvicorn): a port whose last connections
        # linger in TIME_WAIT after a stop is free, one with a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _reset(project: Path) -> None:
    server = dev_server(project)
    if isinstance(server, LocalCluster):
        if server.is_running:
            server.stop()
        shutil.rmtree(server.data_dir.parent, ignore_errors=True)
    shutil.rmtree(project / ".barnum", ignore_errors=True)
    print("barnum dev: removed the demo database and secrets; starting over", flush=True)


def _saved_port(base: Path) -> int | None:
    try:
        return int((base / "port").read_text().strip())
    except (OSError, ValueError):
        return None


def _choose_pg_port(server: LocalCluster, saved: int | None) -> None:
    """Start on the port of the earlier runs when it is free, so the URL the
    user keeps in psql history or a .env stays right."""
    if saved is not None and not server.is_running and _port_free(server.host, saved):
        server.port = saved


def _remember(base: Path, server: LocalCluster | EmbeddedServer, saved: int | None, dsn: str) -> None:
    """Keep the port and URL for the next run and for --print-url."""
    base.mkdir(parents=True, exist_ok=True)
    if isinstance(server, LocalCluster):
        if saved is not None and server.port != saved:
            print(f"barnum dev: PostgreSQL's port {saved} (kept in .barnum/port) is taken; "
                  f"using {server.port} from now on — the database URL changed", flush=True)
        (base / "port").write_text(f"{server.port}\n")
    (base / "database_url").write_text(dsn + "\n")


def _print_url(base: Path) -> int:
    try:
        dsn = (base / "database_url").read_text().strip()
    except OSError:
        print("barnum dev: no demo database in this directory yet; run `barnum dev` first", file=sys.stderr)
        return 1
    print(dsn)
    try:
        psycopg.connect(dsn, connect_timeout=2).close()
    except psycopg.Error:
        print("barnum dev: (PostgreSQL is not running now: start `barnum dev` in another terminal)",
              file=sys.stderr)
    return 0


def _ensure_database(admin_dsn: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{DB_NAME}"')


def main(args: argparse.Namespace, env_config: Config | None = None) -> int:
    project = Path.cwd()
    base = project / ".barnum"
    if args.print_url:
        return _print_url(base)
    saved_port = _saved_port(base)  # kept across --reset too: same URL
    base_config = env_config or load()
    if base_config.log_level == "INFO" and "BARNUM_LOG_LEVEL" not in os.environ:
        level = "WARNING"  # keep the terminal for the messages
    else:
        level = base_config.log_level
    logs.setup(level)
    if args.reset:
        _reset(project)
    try:
        server: LocalCluster | EmbeddedServer = dev_server(project)
        print(f"barnum dev: starting PostgreSQL ({'local binaries' if isinstance(server, LocalCluster) else 'embedded pgserver'})…", flush=True)
        if isinstance(server, LocalCluster):
            _choose_pg_port(server, saved_port)
        server.start()
    except PgClusterError as exc:
        print(f"barnum dev: {exc}", file=sys.stderr)
        return 1
    try:
        _ensure_database(server.admin_dsn)
        dsn = server.dsn(DB_NAME)
        _remember(base, server, saved_port, dsn)
        report = migrate.migrate(dsn)
        print(f"barnum dev: {report.summary()}", flush=True)
        kept = _secrets(base)
        keys = base_config.webhook_secrets or signing.parse_secrets(kept["webhook_secret"])
        host = args.host or base_config.host
        port = args.port if args.port is not None else base_config.port
        if not _port_free(host, port):
            taken, port = port, free_port(host)
            print(f"barnum dev: port {taken} is taken, using {port}", flush=True)
        config = Config(
            database_url=dsn,
            webhook_secrets=keys,
            internal_api_secret=base_config.internal_api_secret or kept["internal_api_secret"],
            public_url=base_config.public_url or f"http://{host}:{port}",
            host=host,
            port=port,
            log_level=level,
            # --whatsapp: the fake signs taps with the kept app secret.
            whatsapp_app_secret=(kept["whatsapp_app_secret"] if args.whatsapp
                                 else base_config.whatsapp_app_secret or kept["whatsapp_app_secret"]),
            whatsapp_verify_token=(kept["whatsapp_verify_token"] if args.whatsapp
                                   else base_config.whatsapp_verify_token or kept["whatsapp_verify_token"]),
        )
        with event_loop_runner() as runner:
            return runner.run(_serve(config, dsn, kept["whatsapp_token"] if args.whatsapp else None))
    finally:
        server.stop()
        print("barnum dev: stopped (PostgreSQL too); run again to pick up where you left off", flush=True)


async def _serve(config: Config, dsn: str, whatsapp_token: str | None = None) -> int:
    """Run the demo; ``whatsapp_token`` set: the --whatsapp mode with it."""
    # Links rendered here must point at this run's shim, like the relay's.
    conn = await asyncpg.connect(dsn, server_settings={"barnum.public_base_url": config.public_url or ""})
    demo: DemoEndpoint | None = None
    fake: FakeWhatsApp | None = None
    shim_base = f"http://{config.host}:{config.port}"
    try:
        shim_conf = await store.shim_config(conn)
        locale = str(shim_conf.get("locale", "pt"))
        if whatsapp_token is None:
            demo = DemoEndpoint(config.webhook_secrets, locale)
            await demo.start()
            await _use_demo_endpoint(conn, demo.url)
        else:
            fake = FakeWhatsApp(whatsapp_token, config.whatsapp_app_secret or "", locale)
            await fake.start()
            reach = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
            fake.webhook_url = f"http://{reach}:{config.port}/whatsapp/webhook"
            # The relay reads the token from the environment at send time.
            os.environ[DEV_TOKEN_ENV] = whatsapp_token
            await _use_fake_whatsapp(conn, fake.graph_url)
        seeded = await store.demo_seed(conn)
        # The links printed in an earlier run are gone from the terminal, may
        # name an earlier shim port, and cannot be shown again (only their
        # hashes are stored): show what still awaits an answer, freshly linked.
        awaiting: list[dict[str, Any]] = [] if seeded else await store.reissue_awaiting_links(conn)
    except DevError as exc:
        print(f"barnum dev: {exc}", file=sys.stderr, flush=True)
        await _stop(demo, fake)
        return 1
    except BaseException:
        await _stop(demo, fake)
        raise
    finally:
        await conn.close()

    async def banner() -> None:
        base = shim_base
        if fake is not None:
            where = [
                f"  fake WhatsApp Cloud API: {fake.graph_url}/{DEV_PHONE_NUMBER_ID}/messages — the relay sends there"
                f" (endpoint {WHATSAPP_ENDPOINT}, bearer ${DEV_TOKEN_ENV}); each message is printed below",
                f"  the patient's phone: {fake.base}/   a tap link posts the signed button reply to"
                f" {fake.webhook_url}",
            ]
            hint = ("  open a ▸ tap link below in a browser; add appointments with psql to see more"
                    " (README: Without n8n)")
        else:
            assert demo is not None
            where = [f"  demo endpoint: {demo.url} (prints each message below)"]
            hint = ("  open a ✓/✗/↻ link below in a browser; add appointments with psql to see more"
                    " (README: barnum dev)")
        print("\n".join([
            "",
            "Barnum is running." + (" (WhatsApp mode: native sender, no n8n)" if fake is not None else ""),
            f"  shim (action links, callbacks): {base}   health: {base}/healthz   API: {base}/openapi.json",
            f"  database:  psql '{dsn}'   (later: psql \"$(barnum dev --print-url)\")",
            *where,
            "  " + ("seeded a demo clinic and one appointment in two days at 10:00: its message follows"
                    if seeded else "reusing the demo data from an earlier run"),
            hint,
            "  Ctrl-C stops everything.",
            "",
        ]), flush=True)
        if awaiting:
            earlier = ("the earlier tap links went with the earlier run" if fake is not None
                       else "the earlier links stay valid too")
            print(f"Still awaiting the patient's answer from an earlier run ({len(awaiting)}), with fresh links"
                  f" ({earlier}):\n", flush=True)
            for payload in awaiting:
                if fake is not None:
                    to, text, choices = reissued(payload, locale)
                    print(fake.render(fake.remember(to, "interactive", text, choices)) + "\n", flush=True)
                else:
                    print(render_message(payload, locale) + "\n", flush=True)

    options = relay.Options(sweep_interval=2.0, grace=5.0)
    try:
        return await run_together(config, options, config.host, config.port, on_ready=banner)
    finally:
        await _stop(demo, fake)


async def _stop(demo: DemoEndpoint | None, fake: FakeWhatsApp | None) -> None:
    if demo is not None:
        await demo.stop()
    if fake is not None:
        await fake.stop()

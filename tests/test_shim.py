"""The HTTP shim over real HTTP (uvicorn on a free loopback port) against a
real PostgreSQL (SPEC §4, issue 4).

Each test gets a fresh migrated database (``db_url``) and its own uvicorn,
run in a background thread with its own event loop; requests go through
``httpx`` over TCP.  No sleeps: startup and shutdown are signalled by events.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import TupleRow
from standardwebhooks import Webhook

from listener import logs, pages
from listener.config import Config, ConfigError, load
from listener.shim import MAX_BODY_BYTES, ShimServer, create_app
from tests.helpers import wait_until

Conn = psycopg.Connection[TupleRow]

SECRET = "n8n-shared-secret"
#: A second, Standard-Webhooks-style secret (whsec_ + base64) for rotation.
OLD_KEY = b"previous-secret-key-bytes-32byte"
OLD_SECRET = "whsec_" + base64.b64encode(OLD_KEY).decode()
INTERNAL = "internal-bearer-secret"
ACTION_HEADERS = (
    ("cache-control", "no-store"),
    ("referrer-policy", "no-referrer"),
    ("x-robots-tag", "noindex"),
    ("x-content-type-options", "nosniff"),
)


# ------------------------------------------------------------------ harness


def make_config(db_url: str, *, secret: str | None = f"{SECRET},{OLD_SECRET}",
                internal: str | None = INTERNAL) -> Config:
    env = {"DATABASE_URL": db_url}
    if secret:
        env["WEBHOOK_SECRET"] = secret
    if internal:
        env["INTERNAL_API_SECRET"] = internal
    return load(env)


@dataclass
class Running:
    url: str
    client: httpx.Client
    server: ShimServer


@contextmanager
def running_shim(config: Config, relay_pass: Callable[[], Awaitable[dict[str, Any]]] | None = None) -> Iterator[Running]:
    """uvicorn serving the shim on 127.0.0.1:<free port> in a thread."""
    app = create_app(config, relay_pass=relay_pass)
    ready = threading.Event()
    server = ShimServer(app, "127.0.0.1", 0, handle_signals=False, on_ready=lambda _s: ready.set())
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(server.serve())
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            failure.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="shim-under-test", daemon=True)
    thread.start()
    assert ready.wait(30), "shim did not start"
    if failure or not server.started:
        raise RuntimeError(f"shim failed to start: {failure}")
    url = f"http://127.0.0.1:{server.port}"
    client = httpx.Client(base_url=url, timeout=30)
    try:
        yield Running(url, client, server)
    finally:
        client.close()
        server.request_exit()
        thread.join(30)
        assert not thread.is_alive(), "shim did not stop"


@pytest.fixture
def shim(db_url: str) -> Iterator[Running]:
    with running_shim(make_config(db_url)) as running:
        yield running


@dataclass
class Appt:
    id: str
    patient_id: str


def seed(
    conn: Conn,
    *,
    patient: str = "João Silva",
    professional: str | None = "Dr. Maria Santos",
    specialty: str | None = "Medicina Dentária",
    starts_at: datetime | None = None,
    phone: str | None = "+351912345678",
) -> Appt:
    """A patient with one future appointment (triggers create its workflow and event)."""
    starts = starts_at or datetime.now(timezone.utc) + timedelta(days=3)
    row = conn.execute(
        """
        WITH p AS (INSERT INTO barnum.patients (name, phone) VALUES (%(patient)s, %(phone)s) RETURNING id),
             pr AS (INSERT INTO barnum.professionals (name) SELECT %(prof)s::text WHERE %(prof)s::text IS NOT NULL RETURNING id),
             sp AS (INSERT INTO barnum.specialties (name) SELECT %(spec)s::text WHERE %(spec)s::text IS NOT NULL RETURNING id)
        INSERT INTO barnum.appointments (patient_id, professional_id, specialty_id, starts_at)
        SELECT p.id, (SELECT id FROM pr), (SELECT id FROM sp), %(starts)s FROM p
        RETURNING id::text, patient_id::text
        """,
        {"patient": patient, "phone": phone, "prof": professional, "spec": specialty, "starts": starts},
    ).fetchone()
    assert row is not None
    return Appt(row[0], row[1])


def token(conn: Conn, action: str, appt: Appt) -> str:
    row = conn.execute(
        "SELECT barnum.generate_action_token(%s, %s, %s)", (action, appt.id, appt.patient_id)
    ).fetchone()
    assert row is not None
    return str(row[0])


def status_of(conn: Conn, appt: Appt) -> str:
    row = conn.execute("SELECT status::text FROM barnum.appointments WHERE id = %s", (appt.id,)).fetchone()
    assert row is not None
    return str(row[0])


def token_used(conn: Conn, tok: str) -> bool:
    row = conn.execute(
        "SELECT used_at IS NOT NULL FROM barnum.whatsapp_action_tokens WHERE token_hash = barnum.token_hash(%s)",
        (tok,),
    ).fetchone()
    assert row is not None
    return bool(row[0])


def snapshot(conn: Conn) -> Any:
    """Everything a request could change, as one comparable value."""
    row = conn.execute(
        """
        SELECT jsonb_build_object(
          'appointments', (SELECT jsonb_agg(jsonb_build_array(id, status, starts_at, cancel_reason) ORDER BY id)
                             FROM barnum.appointments),
          'workflows', (SELECT jsonb_agg(jsonb_build_array(id, status, response, metadata) ORDER BY id)
                          FROM barnum.whatsapp_workflows),
          'events', (SELECT count(*) FROM barnum.whatsapp_events),
          'tokens', (SELECT jsonb_agg(jsonb_build_array(id, used_at) ORDER BY id) FROM barnum.whatsapp_action_tokens),
          'callbacks', (SELECT count(*) FROM barnum.inbound_callbacks),
          'reschedules', (SELECT count(*) FROM barnum.reschedule_requests))
        """
    ).fetchone()
    assert row is not None
    return row[0]


def set_setting(conn: Conn, key: str, value: Any) -> None:
    conn.execute("SELECT barnum.set_setting(%s, %s::jsonb)", (key, json.dumps(value)))


def sign_hex(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signed(body: Any, *, secret: str = SECRET, prefix: str = "", key: str | None = None) -> dict[str, Any]:
    """httpx kwargs for a JSON POST signed with X-Webhook-Signature."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "X-Webhook-Signature": prefix + sign_hex(raw, secret)}
    if key:
        headers["X-Idempotency-Key"] = key
    return {"content": raw, "headers": headers}


def hex_timestamped(body: Any, *, secret: str = SECRET, ts: int | None = None,
                    sign_ts: int | None = None) -> dict[str, Any]:
    """httpx kwargs signed with the timestamped hex scheme (``{ts}.{body}``)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    stamp = int(time.time()) if ts is None else ts
    signed_stamp = stamp if sign_ts is None else sign_ts
    return {"content": raw, "headers": {
        "Content-Type": "application/json",
        "X-Webhook-Timestamp": str(stamp),
        "X-Webhook-Signature": "sha256=" + sign_hex(f"{signed_stamp}.".encode() + raw, secret)}}


def standard_signed(body: Any, *, secret: str = OLD_SECRET, msg_id: str | None = None,
                    at: datetime | None = None) -> dict[str, Any]:
    """httpx kwargs signed the Standard Webhooks way, by the reference library."""
    raw = json.dumps(body)
    msg = msg_id or f"msg_{uuid.uuid4().hex}"
    when = at or datetime.now(timezone.utc)
    signature = Webhook(secret).sign(msg, when, raw)
    return {
        "content": raw.encode(),
        "headers": {
            "Content-Type": "application/json",
            "webhook-id": msg,
            "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": signature,
        },
    }


def h1(page: str) -> str:
    match = re.search(r"<h1>(.*?)</h1>", page)
    assert match, page
    return match.group(1)


def assert_page_headers(response: httpx.Response) -> None:
    for name, value in ACTION_HEADERS:
        assert value in response.headers.get(name, ""), (name, response.headers)
    csp = response.headers["content-security-policy"]
    for directive in ("default-src 'none'", "form-action 'self'", "base-uri 'none'", "frame-ancestors 'none'"):
        assert directive in csp
    assert "unsafe" not in csp and "script-src" not in csp
    assert response.headers["content-type"].startswith("text/html")


def assert_friendly(response: httpx.Response) -> None:
    """An error page: ours, escaped, and never a trace or an internal detail."""
    body = response.text
    assert body.startswith("<!DOCTYPE html>")
    for leak in ("Traceback", "asyncpg", "BN4", "Error", "barnum.", "sqlstate", "line "):
        assert leak not in body, (leak, body)
    assert_page_headers(response)


# ------------------------------------------------------------------ action links


def test_get_shows_the_appointment_and_one_button_and_changes_nothing(shim: Running, db_conn: Conn) -> None:
    appt = seed(db_conn, starts_at=datetime(2027, 5, 14, 9, 30, tzinfo=timezone.utc))
    tok = token(db_conn, "confirm", appt)
    before = snapshot(db_conn)
    url = f"/api/action?type=confirm&token={tok}"

    first = shim.client.get(url)
    second = shim.client.get(url)

    assert first.status_code == second.status_code == 200
    page = first.text
    assert page.count("<button") == 1
    assert page.count("<form") == 1
    form = re.search(r'<form method="post" action="([^"]*)">', page)
    assert form and form.group(1) == f"?type=confirm&amp;token={tok}"
    # 09:30 UTC is 10:30 in Lisbon (summer time), rendered in Portuguese.
    assert "sexta-feira, 14 de maio de 2027" in page and "10:30" in page
    assert "Dr. Maria Santos" in page and "Medicina Dentária" in page
    assert "Olá, João." in page and "Silva" not in page  # first name only
    assert '<meta name="viewport"' in page
    assert "<script" not in page and "http" not in page.split("</style>")[1]  # no external asset
    assert_page_headers(first)
    # A GET (link preview, mail scanner) changed nothing; the token still works.
    assert snapshot(db_conn) == before
    assert not token_used(db_conn, tok)
    assert shim.client.head(url).status_code == 200
    assert snapshot(db_conn) == before
    # The form posts back to the same URL, and that acts.
    posted = shim.client.post(url)
    assert posted.status_code == 200 and status_of(db_conn, appt) == "confirmed"


def test_post_confirms_once_then_410(shim: Running, db_conn: Conn) -> None:
    appt = seed(db_conn)
    tok = token(db_conn, "confirm", appt)
    url = f"/api/action?type=confirm&token={tok}"

    done = shim.client.post(url)
    assert done.status_code == 200
    assert "✓" in done.text and h1(done.text) == "Consulta confirmada"
    assert_page_headers(done)
    assert status_of(db_conn, appt) == "confirmed"
    assert token_used(db_conn, tok)

    again = shim.client.post(url)
    assert again.status_code == 410
    assert h1(again.text) == "Link já utilizado"
    assert_friendly(again)
    assert shim.client.get(url).status_code == 410


def test_cancel_and_reschedule_results(shim: Running, db_conn: Conn) -> None:
    appt = seed(db_conn)
    cancel = shim.client.post(f"/api/action?type=cancel&token={token(db_conn, 'cancel', appt)}")
    assert cancel.status_code == 200 and "✗" in cancel.text and h1(cancel.text) == "Consulta cancelada"
    assert status_of(db_conn, appt) == "cancelled"

    other = seed(db_conn, patient="Ana")
    resched = shim.client.post(f"/api/action?type=reschedule&token={token(db_conn, 'reschedule', other)}")
    assert resched.status_code == 200
    assert "Vamos contactá-lo" in resched.text
    row = db_conn.execute(
        "SELECT count(*) FROM barnum.reschedule_requests WHERE appointment_id = %s AND status = 'open'", (other.id,)
    ).fetchone()
    assert row == (1,)
    assert status_of(db_conn, other) == "scheduled"


def test_one_click_setting_makes_get_act(shim: Running, db_conn: Conn) -> None:
    appt = seed(db_conn)
    tok = token(db_conn, "confirm", appt)
    set_setting(db_conn, "one_click_actions", True)
    url = f"/api/action?type=confirm&token={tok}"

    assert shim.client.head(url).status_code == 200  # HEAD never acts
    assert not token_used(db_conn, tok)

    first = shim.client.get(url)
    assert first.status_code == 200 and h1(first.text) == "Consulta confirmada"
    assert status_of(db_conn, appt) == "confirmed"
    assert shim.client.get(url).status_code == 410


def test_thirty_concurrent_posts_one_wins(shim: Running, db_conn: Conn) -> None:
    appt = seed(db_conn)
    tok = token(db_conn, "cancel", appt)
    url = f"{shim.url}/api/action?type=cancel&token={tok}"

    async def hammer() -> list[int]:
        limits = httpx.Limits(max_connections=30)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            responses = await asyncio.gather(*(client.post(url) for _ in range(30)))
        return [r.status_code for r in responses]

    codes = asyncio.run(hammer())
    assert sorted(codes) == [200] + [410] * 29
    assert status_of(db_conn, appt) == "cancelled"
    events = db_conn.execute(
        "SELECT count(*) FROM barnum.whatsapp_events WHERE entity_id = %s AND event_type = 'appointment.cancelled'",
        (appt.id,),
    ).fetchone()
    assert events == (1,)


def test_seed_alias_routes_for_action_links(shim: Running, db_conn: Conn) -> None:
    appt = seed(db_conn)
    tok = token(db_conn, "confirm", appt)
    page = shim.client.get(f"/api/action/confirm?token={tok}")
    assert page.status_code == 200
    assert f'action="?token={tok}"' in page.text
    assert shim.client.get(f"/api/action/cancel?token={tok}").status_code == 400
    assert shim.client.get(f"/api/action/confirm?type=cancel&token={tok}").status_code == 400
    assert shim.client.post(f"/api/action/confirm?token={tok}").status_code == 200
    assert status_of(db_conn, appt) == "confirmed"
    assert shim.client.post(f"/api/action/confirm?token={tok}").status_code == 410

    other = seed(db_conn, patient="Rui")
    assert shim.client.post(f"/api/action/reschedule?token={token(db_conn, 'reschedule', other)}").status_code == 200
    third = seed(db_conn, patient="Eva")
    assert shim.client.post(f"/api/action/cancel?token={token(db_conn, 'cancel', third)}").status_code == 200
    assert status_of(db_conn, third) == "cancelled"
    missing = shim.client.get(f"/api/action/delete?token={tok}")
    assert missing.status_code == 404
    assert_friendly(missing)


def test_error_pages(shim: Running, db_conn: Conn) -> None:
    appt = seed(db_conn)
    tok = token(db_conn, "confirm", appt)
    unknown = "A" * 43

    cases = {
        f"/api/action?type=confirm&token={unknown}": 404,  # well-formed, no such token
        "/api/action?type=confirm&token=not%20a%20token": 404,  # malformed
        "/api/action?type=confirm&token=" + "x" * 500: 404,
        "/api/action?type=confirm": 404,  # missing token
        f"/api/action?type=delete&token={tok}": 400,  # unknown type
        f"/api/action?token={tok}": 400,  # missing type
        f"/api/action?type=cancel&token={tok}": 400,  # token is for confirm
    }
    for url, expected in cases.items():
        for method in ("GET", "POST"):
            response = shim.client.request(method, url)
            assert response.status_code == expected, (method, url, response.status_code)
            assert_friendly(response)
    assert not token_used(db_conn, tok)

    # Expired → 410 "expired".
    db_conn.execute(
        "UPDATE barnum.whatsapp_action_tokens SET expires_at = now() - interval '1 minute' "
        "WHERE token_hash = barnum.token_hash(%s)", (tok,))
    expired = shim.client.get(f"/api/action?type=confirm&token={tok}")
    assert expired.status_code == 410 and h1(expired.text) == "Link expirado"
    assert_friendly(expired)

    # Illegal state → 409 (the appointment was cancelled meanwhile).
    other = seed(db_conn, patient="Rita")
    confirm = token(db_conn, "confirm", other)
    db_conn.execute("UPDATE barnum.appointments SET status = 'cancelled' WHERE id = %s", (other.id,))
    for method in ("GET", "POST"):
        conflict = shim.client.request(method, f"/api/action?type=confirm&token={confirm}")
        assert conflict.status_code == 409
        assert_friendly(conflict)
    assert not token_used(db_conn, confirm)


def test_pages_follow_the_clinic_locale(shim: Running, db_conn: Conn) -> None:
    set_setting(db_conn, "locale", "en")
    appt = seed(db_conn, patient="Mary Jones", starts_at=datetime(2027, 1, 9, 15, 0, tzinfo=timezone.utc))
    tok = token(db_conn, "cancel", appt)
    page = shim.client.get(f"/api/action?type=cancel&token={tok}")
    assert page.status_code == 200
    assert '<html lang="en">' in page.text
    assert "Saturday, 9 January 2027" in page.text and "15:00" in page.text
    assert "Hello, Mary." in page.text and "Cancel appointment" in page.text
    assert h1(shim.client.post(f"/api/action?type=cancel&token={tok}").text) == "Appointment cancelled"
    used = shim.client.post(f"/api/action?type=cancel&token={tok}")
    assert used.status_code == 410 and h1(used.text) == "Link already used"
    invalid = shim.client.get("/api/action?type=confirm&token=" + "B" * 43)
    assert invalid.status_code == 404 and h1(invalid.text) == "Invalid link"
    bad_type = shim.client.get(f"/api/action?type=nope&token={tok}")
    assert bad_type.status_code == 400 and '<html lang="en">' in bad_type.text


def test_names_are_escaped(shim: Running, db_conn: Conn) -> None:
    appt = seed(
        db_conn,
        patient='<script>alert("p")</script> Silva',
        professional="<img src=x onerror=alert(1)>",
        specialty='"><script>alert(2)</script>',
    )
    tok = token(db_conn, "confirm", appt)
    for response in (shim.client.get(f"/api/action?type=confirm&token={tok}"),
                     shim.client.post(f"/api/action?type=confirm&token={tok}")):
        assert response.status_code == 200
        page = response.text
        assert "<script" not in page and "<img" not in page
        assert "&lt;script&gt;alert(&quot;p&quot;)&lt;/script&gt;" in page
        assert "&lt;img src=x onerror=alert(1)&gt;" in page
        assert "&quot;&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in page


def test_database_failures_become_pages_without_details(db_url: str, db_conn: Conn) -> None:
    appt = seed(db_conn)
    tok = token(db_conn, "confirm", appt)
    with running_shim(make_config(db_url)) as running:
        db_conn.execute("ALTER FUNCTION barnum.peek_action(text) RENAME TO peek_action_gone")
        broken = running.client.get(f"/api/action?type=confirm&token={tok}")
        assert broken.status_code == 500
        assert_friendly(broken)
        db_conn.execute("ALTER FUNCTION barnum.peek_action_gone(text) RENAME TO peek_action")
        db_conn.execute("ALTER FUNCTION barnum.handle_callback(text, jsonb, text) RENAME TO hc_gone")
        cb = running.client.post("/api/webhook", **signed({"action": "confirm", "appointmentId": appt.id}))
        assert cb.status_code == 500
        assert cb.json() == {"success": False, "error": {"code": "INTERNAL", "message": "internal error"}}

    dead = make_config(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
    with running_shim(dead) as running:
        down = running.client.get(f"/api/action?type=confirm&token={tok}")
        assert down.status_code == 503
        assert_friendly(down)
        cb = running.client.post("/api/webhook", **signed({"action": "confirm", "appointmentId": appt.id}))
        assert cb.status_code == 503 and cb.json()["error"]["code"] == "UNAVAILABLE"


# ------------------------------------------------------------------ callbacks


def test_callback_with_hex_signature(shim: Running, db_conn: Conn) -> None:
    appt = seed(db_conn)
    response = shim.client.post("/api/webhook", **signed({"action": "confirm", "appointmentId": appt.id}))
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["success"] is True and doc["message"] == "Appointment confirmed successfully"
    assert doc["data"]["appointment"]["status"] == "confirmed"
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert status_of(db_conn, appt) == "confirmed"

    other = seed(db_conn, patient="Rui")
    prefixed = shim.client.post(
        "/api/webhook", **signed({"action": "cancel", "appointmentId": other.id, "reason": "sick"}, prefix="sha256=")
    )
    assert prefixed.status_code == 200
    row = db_conn.execute("SELECT status::text, cancel_reason FROM barnum.appointments WHERE id = %s",
                          (other.id,)).fetchone()
    assert row == ("cancelled", "sick")


def test_callback_with_standard_webhooks_signature(shim: Running, db_conn: Conn) -> None:
    appt = seed(db_conn)
    ok = shim.client.post("/api/webhook", **standard_signed({"action": "confirm", "appointmentId": appt.id}))
    assert ok.status_code == 200, ok.text
    assert status_of(db_conn, appt) == "confirmed"


def test_signature_failures_are_401_and_change_nothing(shim: Running, db_conn: Conn) -> None:
    appt = seed(db_conn)
    body = {"action": "cancel", "appointmentId": appt.id}
    raw = json.dumps(body).encode()
    before = snapshot(db_conn)
    stale = datetime.now(timezone.utc) - timedelta(minutes=6)
    future = datetime.now(timezone.utc) + timedelta(minutes=6)
    attempts: list[dict[str, Any]] = [
        {"content": raw, "headers": {"Content-Type": "application/json"}},  # no signature
        signed(body, secret="wrong-secret"),
        {"content": raw, "headers": {"Content-Type": "application/json", "X-Webhook-Signature": "zz" * 32}},
        {"content": raw, "headers": {"Content-Type": "application/json", "X-Webhook-Signature": ""}},
        # signature of another body
        {"content": raw, "headers": {"Content-Type": "application/json",
                                     "X-Webhook-Signature": sign_hex(raw + b" ")}},
        standard_signed(body, at=stale),
        standard_signed(body, at=future),
        standard_signed(body, secret="whsec_" + base64.b64encode(b"another-key").decode()),
    ]
    # A valid hex signature does not rescue an invalid Standard Webhooks one.
    mixed = standard_signed(body, at=stale)
    mixed["headers"]["X-Webhook-Signature"] = sign_hex(mixed["content"])
    attempts.append(mixed)
    # Standard Webhooks headers with a tampered id.
    tampered = standard_signed(body)
    tampered["headers"]["webhook-id"] = "msg_other"
    attempts.append(tampered)
    for kwargs in attempts:
        response = shim.client.post("/api/webhook", **kwargs)
        assert response.status_code == 401, (kwargs["headers"], response.text)
        assert response.json()["error"]["code"] == "UNAUTHORIZED"
    assert snapshot(db_conn) == before


def test_timestamped_hex_signature(shim: Running, db_conn: Conn) -> None:
    appt = seed(db_conn)
    body = {"action": "cancel", "appointmentId": appt.id}
    before = snapshot(db_conn)
    now = int(time.time())
    for kwargs in (
        hex_timestamped(body, ts=now - 6 * 60),               # stale
        hex_timestamped(body, ts=now + 6 * 60),               # future
        hex_timestamped(body, ts=now, sign_ts=now - 1),       # the header is not what was signed
        {"content": json.dumps(body).encode(), "headers": {   # body-only signature beside a timestamp
            "Content-Type": "application/json", "X-Webhook-Timestamp": str(now),
            "X-Webhook-Signature": sign_hex(json.dumps(body).encode())}},
    ):
        response = shim.client.post("/api/webhook", **kwargs)
        assert response.status_code == 401, kwargs["headers"]
    assert snapshot(db_conn) == before
    ok = shim.client.post("/api/webhook", **hex_timestamped(body))
    assert ok.status_code == 200, ok.text
    assert status_of(db_conn, appt) == "cancelled"


def test_a_replayed_body_only_callback_changes_nothing(shim: Running, db_conn: Conn) -> None:
    """Issue 12.1: a captured body-only signed cancel, replayed after the
    appointment was rescheduled, must not cancel it again."""
    appt = seed(db_conn)
    captured = signed({"action": "cancel", "appointmentId": appt.id, "reason": "sick"})
    first = shim.client.post("/api/webhook", **captured)
    assert first.status_code == 200 and status_of(db_conn, appt) == "cancelled"
    # The clinic books the patient again (an explicit reschedule of the cancelled appointment).
    db_conn.execute("UPDATE barnum.appointments SET status = 'scheduled', starts_at = starts_at + interval '7 days'"
                    " WHERE id = %s", (appt.id,))
    assert status_of(db_conn, appt) == "scheduled"
    before = snapshot(db_conn)
    for key in (None, "attacker-key-1"):
        replay = {"content": captured["content"], "headers": dict(captured["headers"])}
        if key:
            replay["headers"]["X-Idempotency-Key"] = key
        response = shim.client.post("/api/webhook", **replay)
        assert response.status_code == 200 and response.json() == first.json()
    assert status_of(db_conn, appt) == "scheduled"
    assert snapshot(db_conn) == before


def test_require_timestamp_refuses_body_only_signatures(db_url: str, db_conn: Conn) -> None:
    config = make_config(db_url)
    strict = Config(**{**config.__dict__, "webhook_require_timestamp": True})
    assert load({"WEBHOOK_REQUIRE_TIMESTAMP": "true"}).webhook_require_timestamp is True
    with pytest.raises(ConfigError, match="WEBHOOK_REQUIRE_TIMESTAMP"):
        load({"WEBHOOK_REQUIRE_TIMESTAMP": "sometimes"})
    with running_shim(strict) as running:
        appt = seed(db_conn)
        body = {"action": "confirm", "appointmentId": appt.id}
        before = snapshot(db_conn)
        refused = running.client.post("/api/webhook", **signed(body))
        assert refused.status_code == 401 and snapshot(db_conn) == before
        assert running.client.post("/api/webhook", **hex_timestamped(body)).status_code == 200
        other = seed(db_conn, patient="Ana")
        assert running.client.post(
            "/api/webhook", **standard_signed({"action": "confirm", "appointmentId": other.id})).status_code == 200


def _counter(name: str) -> float:
    from prometheus_client import REGISTRY
    value = REGISTRY.get_sample_value(name)
    return 0.0 if value is None else value


def test_malformed_signature_headers_are_401_not_500(
        shim: Running, db_conn: Conn, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 12.2: non-ASCII signature headers and a 400-digit timestamp."""
    caplog.set_level(logging.INFO)
    appt = seed(db_conn)
    raw = json.dumps({"action": "cancel", "appointmentId": appt.id}).encode()
    base = {b"Content-Type": b"application/json"}
    now = str(int(time.time())).encode()
    attempts: list[dict[bytes, bytes]] = [
        {b"X-Webhook-Signature": "é".encode("latin-1") * 64},
        {b"X-Webhook-Signature": "sha256=ñ".encode("utf-8")},
        {b"X-Webhook-Signature": b"\xff" * 64, b"X-Webhook-Timestamp": now},
        {b"webhook-id": b"msg_1", b"webhook-timestamp": now, b"webhook-signature": "v1,ü".encode("latin-1")},
        {b"webhook-id": "msg_é".encode("utf-8"), b"webhook-timestamp": now, b"webhook-signature": b"v1,AAAA"},
        {b"webhook-id": b"msg_1", b"webhook-timestamp": b"9" * 400, b"webhook-signature": b"v1,AAAA"},
        {b"webhook-id": b"msg_1", b"webhook-timestamp": b"-1", b"webhook-signature": b"v1,AAAA"},
        {b"webhook-id": b"msg_1", b"webhook-timestamp": b"1_700_000_000", b"webhook-signature": b"v1,AAAA"},
        {b"X-Webhook-Signature": b"00", b"X-Webhook-Timestamp": b"9" * 400},
    ]
    before = snapshot(db_conn)
    failures = _counter("barnum_signature_failures_total")
    for extra in attempts:
        response = shim.client.post("/api/webhook", content=raw, headers={**base, **extra})
        assert response.status_code == 401, (extra, response.text)
        assert response.json()["error"]["code"] == "UNAUTHORIZED"
    assert _counter("barnum_signature_failures_total") - failures == len(attempts)
    assert snapshot(db_conn) == before
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


def test_secret_rotation_accepts_every_listed_secret(db_url: str, db_conn: Conn) -> None:
    new = "rotated-secret-2027"
    with running_shim(make_config(db_url, secret=f"{new},{SECRET}")) as running:
        first = seed(db_conn)
        second = seed(db_conn, patient="Ana")
        assert running.client.post(
            "/api/webhook", **signed({"action": "confirm", "appointmentId": first.id}, secret=new)).status_code == 200
        assert running.client.post(
            "/api/webhook", **signed({"action": "confirm", "appointmentId": second.id})).status_code == 200
        third = seed(db_conn, patient="Eva")
        assert running.client.post(
            "/api/webhook",
            **signed({"action": "confirm", "appointmentId": third.id}, secret="retired")).status_code == 401


def test_idempotent_replay(shim: Running, db_conn: Conn) -> None:
    appt = seed(db_conn)
    body = {"action": "reschedule", "appointmentId": appt.id, "newDate": "2027-06-01", "newTime": "11:00"}

    def events() -> int:
        row = db_conn.execute(
            "SELECT count(*) FROM barnum.whatsapp_events WHERE entity_id = %s AND event_type = 'appointment.rescheduled'",
            (appt.id,)).fetchone()
        assert row is not None
        return int(row[0])

    kwargs = hex_timestamped(body)
    first = shim.client.post("/api/webhook", **kwargs)
    assert first.status_code == 200 and events() == 1
    # n8n's Retry On Fail resends the same signed request: the signature is the key.
    again = shim.client.post("/api/webhook", **kwargs)
    assert again.status_code == 200 and again.json() == first.json()
    assert events() == 1
    # An unsigned X-Idempotency-Key is not the key: a fresh one does not make a replay new.
    forged = {"content": kwargs["content"], "headers": {**kwargs["headers"], "X-Idempotency-Key": "fresh-key"}}
    assert shim.client.post("/api/webhook", **forged).json() == first.json()
    assert events() == 1

    # The same webhook-id (signed) with another body is a conflict, and changes nothing.
    std = standard_signed({**body, "newTime": "12:00"}, msg_id="msg_exec_1")
    assert shim.client.post("/api/webhook", **std).status_code == 200
    before = snapshot(db_conn)
    other = shim.client.post("/api/webhook", **standard_signed({**body, "newTime": "13:00"}, msg_id="msg_exec_1"))
    assert other.status_code == 409 and other.json()["error"]["code"] == "CONFLICT"
    assert snapshot(db_conn) == before

    # webhook-id is a key too (Standard Webhooks).
    second = seed(db_conn, patient="Rita")
    std = standard_signed({"action": "confirm", "appointmentId": second.id}, msg_id="msg_fixed")
    a = shim.client.post("/api/webhook", **std)
    b = shim.client.post("/api/webhook", **standard_signed(
        {"action": "confirm", "appointmentId": second.id}, msg_id="msg_fixed"))
    assert a.status_code == b.status_code == 200 and a.json() == b.json()
    rows = db_conn.execute("SELECT count(*) FROM barnum.inbound_callbacks WHERE idempotency_key = 'msg_fixed'").fetchone()
    assert rows == (1,)


def test_reschedule_in_the_clinic_time_zone_across_dst(shim: Running, db_conn: Conn) -> None:
    # Europe/Lisbon springs forward on 2027-03-28: 01:00 WET → 02:00 WEST.
    appt = seed(db_conn)

    def move(date: str, time_: str) -> httpx.Response:
        return shim.client.post("/api/webhook", **signed(
            {"action": "reschedule", "appointmentId": appt.id, "newDate": date, "newTime": time_}))

    def starts_at() -> datetime:
        row = db_conn.execute("SELECT starts_at FROM barnum.appointments WHERE id = %s", (appt.id,)).fetchone()
        assert row is not None
        return row[0]  # type: ignore[no-any-return]

    gap = move("2027-03-28", "01:30")
    assert gap.status_code == 422 and gap.json()["error"]["code"] == "UNPROCESSABLE"
    before = move("2027-03-27", "10:00")
    assert before.status_code == 200
    assert starts_at() == datetime(2027, 3, 27, 10, 0, tzinfo=timezone.utc)  # WET = UTC+0
    after = move("2027-03-28", "10:00")
    assert after.status_code == 200
    assert starts_at() == datetime(2027, 3, 28, 9, 0, tzinfo=timezone.utc)  # WEST = UTC+1
    assert after.json()["data"]["appointment"]["time"] == "10:00"
    assert move("2027-02-30", "10:00").status_code == 422  # no such date
    assert move("2027-03-28", "24:00").status_code == 422


def test_callback_status_codes(shim: Running, db_conn: Conn) -> None:
    appt = seed(db_conn)
    post = shim.client.post

    def code(response: httpx.Response) -> tuple[int, str]:
        return response.status_code, response.json()["error"]["code"]

    assert code(post("/api/webhook", **signed(b"{not json"))) == (400, "BAD_REQUEST")
    assert code(post("/api/webhook", **signed(b'{"action": "confirm", "x": "\xff"}'))) == (400, "BAD_REQUEST")
    assert code(post("/api/webhook", **signed(b"[1, 2]"))) == (400, "BAD_REQUEST")
    assert code(post("/api/webhook", **signed(b'{"action": "confirm", "n": NaN}'))) == (400, "BAD_REQUEST")
    assert code(post("/api/webhook", **signed(b'{"action": "confirm", "s": "\\u0000"}'))) == (400, "BAD_REQUEST")
    assert code(post("/api/webhook", **signed({"action": "confirm"}))) == (400, "BAD_REQUEST")  # missing field
    assert code(post("/api/webhook", **signed({"appointmentId": appt.id}))) == (400, "BAD_REQUEST")  # no action
    assert code(post("/api/webhook", **signed({"action": "delete", "appointmentId": appt.id}))) == (400, "BAD_REQUEST")
    assert code(post("/api/webhook", **signed(
        {"action": "confirm", "appointmentId": str(uuid.uuid4())}))) == (404, "NOT_FOUND")
    assert code(post("/api/webhook", **signed(
        {"action": "confirm", "appointmentId": "not-a-uuid"}))) == (422, "UNPROCESSABLE")
    db_conn.execute("UPDATE barnum.appointments SET status = 'completed' WHERE id = %s", (appt.id,))
    assert code(post("/api/webhook", **signed(
        {"action": "review", "appointmentId": appt.id, "reviewSubmitted": True, "rating": 6}))) == (422, "UNPROCESSABLE")
    assert code(post("/api/webhook", **signed(
        {"action": "cancel", "appointmentId": appt.id}))) == (409, "CONFLICT")

    # 415: not JSON (checked before the signature: unsigned is fine here).
    raw = json.dumps({"action": "confirm", "appointmentId": appt.id}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1", None):
        headers = {"X-Webhook-Signature": sign_hex(raw)}
        if ctype:
            headers["Content-Type"] = ctype
        assert code(post("/api/webhook", content=raw, headers=headers)) == (415, "UNSUPPORTED_MEDIA_TYPE")
    ok_charset = {"Content-Type": "application/json; charset=UTF-8", "X-Webhook-Signature": sign_hex(raw)}
    assert post("/api/webhook", content=raw, headers=ok_charset).status_code != 415

    # 413 by Content-Length, before anything else (even unsigned, even not JSON).
    big = b"{" + b" " * MAX_BODY_BYTES + b"}"
    assert code(post("/api/webhook", content=big, headers={"Content-Type": "text/plain"})) == (
        413, "PAYLOAD_TOO_LARGE")
    # Exactly the limit is accepted as far as size goes (then: signature).
    exact = b"{" + b" " * (MAX_BODY_BYTES - 2) + b"}"
    assert post("/api/webhook", content=exact, headers={"Content-Type": "application/json"}).status_code == 401

    # 405/404 for other methods and paths, in the same JSON shape.
    assert code(shim.client.get("/api/webhook")) == (405, "METHOD_NOT_ALLOWED")
    assert code(shim.client.get("/api/nothing")) == (404, "NOT_FOUND")


def test_413_is_enforced_while_streaming(shim: Running) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(40):  # 40 × 4 KiB = 160 KiB, no Content-Length
            sent += 4096
            yield b" " * 4096

    response = shim.client.post("/api/webhook", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"


async def test_the_body_is_not_read_past_the_limit(db_url: str) -> None:
    """At the ASGI level: an endless body stops being read just past 64 KiB."""
    app = create_app(make_config(db_url), pool=object())
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1024
        return {"type": "http.request", "body": b" " * 1024, "more_body": True}

    messages: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        messages.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/api/webhook", "raw_path": b"/api/webhook", "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    assert messages[0]["status"] == 413
    assert MAX_BODY_BYTES < received <= MAX_BODY_BYTES + 1024


def test_seed_alias_routes_for_callbacks(shim: Running, db_conn: Conn) -> None:
    post = shim.client.post
    a = seed(db_conn)
    assert post("/api/webhooks/appointments/confirm", **signed(
        {"appointmentId": a.id, "patientResponse": "SIM"})).status_code == 200
    assert status_of(db_conn, a) == "confirmed"

    b = seed(db_conn, patient="B")
    assert post("/api/webhooks/appointments/reschedule", **signed(
        {"appointmentId": b.id, "newDate": "2027-07-01", "newTime": "09:15"})).status_code == 200
    row = db_conn.execute("SELECT starts_at FROM barnum.appointments WHERE id = %s", (b.id,)).fetchone()
    assert row == (datetime(2027, 7, 1, 8, 15, tzinfo=timezone.utc),)

    c = seed(db_conn, patient="C")
    assert post("/api/webhooks/appointments/cancel", **signed(
        {"appointmentId": c.id, "reason": "travel"})).status_code == 200
    assert status_of(db_conn, c) == "cancelled"

    d = seed(db_conn, patient="D")
    db_conn.execute("UPDATE barnum.appointments SET status = 'no_show' WHERE id = %s", (d.id,))
    ns = post("/api/webhooks/appointments/no-show-reschedule", **signed({"appointmentId": d.id, "attempt": 1}))
    assert ns.status_code == 200, ns.text
    assert ns.json()["data"]["reschedule_request_id"]

    e = seed(db_conn, patient="E")
    re_ = post("/api/webhooks/reactivation/record", **signed(
        {"patientId": e.patient_id, "workflowType": "reactivation_30d", "status": "completed"}))
    assert re_.status_code == 200, re_.text
    assert re_.json()["message"] == "Reactivation recorded"

    f = seed(db_conn, patient="F")
    db_conn.execute("UPDATE barnum.appointments SET status = 'completed' WHERE id = %s", (f.id,))
    rv = post("/api/webhooks/reviews/record", **signed({"appointmentId": f.id, "reviewSubmitted": True, "rating": 5}))
    assert rv.status_code == 200, rv.text
    assert rv.json()["data"]["rating"] == 5

    # The path's action wins; a contradicting body action is refused.
    g = seed(db_conn, patient="G")
    clash = post("/api/webhooks/appointments/confirm", **signed({"action": "cancel", "appointmentId": g.id}))
    assert clash.status_code == 400
    assert status_of(db_conn, g) == "scheduled"
    # Aliases check signatures too.
    assert post("/api/webhooks/appointments/cancel", content=json.dumps({"appointmentId": g.id}),
                headers={"Content-Type": "application/json"}).status_code == 401


# ------------------------------------------------------------------ internal, health


def test_internal_requires_the_bearer_secret(db_url: str) -> None:
    calls: list[int] = []

    async def fake_pass() -> dict[str, Any]:
        calls.append(1)
        return {"success": True, "processed": 3, "failed": 1, "errors": ["Event x moved to dead_letter"]}

    with running_shim(make_config(db_url), relay_pass=fake_pass) as running:
        post = running.client.post
        assert post("/api/internal").status_code == 401
        assert post("/api/internal", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post("/api/internal", headers={"Authorization": f"Basic {INTERNAL}"}).status_code == 401
        assert post("/api/internal", headers={"Authorization": f"Bearer {INTERNAL}x"}).status_code == 401
        denied = post("/api/internal", headers={"Authorization": INTERNAL})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "UNAUTHORIZED"
        assert calls == []
        ok = post("/api/internal", headers={"Authorization": f"Bearer {INTERNAL}"})
        assert ok.status_code == 200
        assert ok.json() == {"success": True, "processed": 3, "failed": 1, "errors": ["Event x moved to dead_letter"]}
        assert post("/api/internal/process-events", headers={"Authorization": f"bearer {INTERNAL}"}).status_code == 200
        assert len(calls) == 2

    with running_shim(make_config(db_url, internal=None), relay_pass=fake_pass) as running:
        unset = running.client.post("/api/internal", headers={"Authorization": "Bearer x"})
        assert unset.status_code == 503


class _Receiver(http.server.BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length", "0"))
        _Receiver.bodies.append(self.rfile.read(length))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def test_internal_runs_a_real_relay_pass(db_url: str, db_conn: Conn) -> None:
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.bodies = []
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        db_conn.execute("INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('test', %s)",
                        (f"http://127.0.0.1:{receiver.server_address[1]}/hook",))
        seed(db_conn)
        with running_shim(make_config(db_url)) as running:
            done = running.client.post("/api/internal", headers={"Authorization": f"Bearer {INTERNAL}"})
            assert done.status_code == 200, done.text
            doc = done.json()
            assert doc["success"] is True and doc["processed"] >= 1 and doc["failed"] == 0
        assert any(b"appointment.pre_confirmed" in body for body in _Receiver.bodies)
    finally:
        receiver.shutdown()
        receiver.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_health_and_readiness(shim: Running, db_conn: Conn) -> None:
    assert shim.client.get("/healthz").json() == {"status": "ok"}
    ready = shim.client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ok"}
    # The database says whether it speaks this release's SQL API, not the files on disk.
    db_conn.execute("DELETE FROM barnum.schema_migrations WHERE version = '0001'")
    assert shim.client.get("/readyz").status_code == 200
    db_conn.execute("CREATE OR REPLACE FUNCTION barnum.schema_compat() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$")
    old = shim.client.get("/readyz")
    assert old.status_code == 503 and "level 1, this release needs 2" in old.json()["reason"]
    db_conn.execute("CREATE OR REPLACE FUNCTION barnum.schema_compat() RETURNS int LANGUAGE sql AS $$ SELECT 3 $$")
    newer = shim.client.get("/readyz")
    assert newer.status_code == 503 and "newer than this release" in newer.json()["reason"]
    db_conn.execute("DROP FUNCTION barnum.schema_compat()")
    first = shim.client.get("/readyz")
    assert first.status_code == 503 and "level 1" in first.json()["reason"], "the first release had no schema_compat"


def test_readiness_fails_when_the_database_is_down() -> None:
    dead = make_config(f"postgresql://postgres@127.0.0.1:{free_port()}/barnum")
    with running_shim(dead) as running:  # starts anyway: probes must answer
        assert running.client.get("/healthz").status_code == 200
        started = time.monotonic()
        down = running.client.get("/readyz")
        assert down.status_code == 503
        assert down.json() == {"status": "unavailable", "reason": "database unreachable"}
        assert time.monotonic() - started < 5


def test_openapi_document(shim: Running) -> None:
    response = shim.client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    for path in ("/api/webhook", "/api/webhooks/appointments/confirm", "/api/webhooks/appointments/cancel",
                 "/api/webhooks/appointments/reschedule", "/api/webhooks/appointments/no-show-reschedule",
                 "/api/webhooks/reactivation/record", "/api/webhooks/reviews/record",
                 "/api/internal", "/healthz", "/readyz"):
        assert path in paths, path
    body = paths["/api/webhook"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert len(body["oneOf"]) == 6
    schemas = doc["components"]["schemas"]
    assert schemas["ReviewCallback"]["properties"]["rating"] == {
        "type": "integer", "minimum": 1, "maximum": 5, "description": "required when reviewSubmitted"}
    assert set(paths["/api/webhook"]["post"]["responses"]) >= {"200", "400", "401", "404", "409", "413", "415", "422"}


def test_logs_hold_no_token_secret_or_body(shim: Running, db_conn: Conn, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    appt = seed(db_conn, patient="Secretname Person")
    tok = token(db_conn, "confirm", appt)
    shim.client.get(f"/api/action?type=confirm&token={tok}")
    shim.client.post(f"/api/action?type=confirm&token={tok}")
    shim.client.post(f"/api/action?type=confirm&token={tok}")
    shim.client.post("/api/webhook", **signed({"action": "cancel", "appointmentId": appt.id, "reason": "BODYMARK"}))
    shim.client.post("/api/webhook", **signed(b'{"action": "cancel", "reason": "BODYMARK2"', key="k"))
    shim.client.post("/api/internal", headers={"Authorization": "Bearer guess-" + INTERNAL})
    formatter = logs.JsonFormatter()
    # The server's loggers (the test's own HTTP client logs its URLs).
    lines = [formatter.format(r) for r in caplog.records if r.name.startswith(("barnum", "uvicorn", "starlette"))]
    text = "\n".join(lines)
    assert any('"action link"' in line for line in lines) and any('"callback"' in line for line in lines)
    for secret in (tok, SECRET, OLD_SECRET, INTERNAL, "BODYMARK", "Secretname"):
        assert secret not in text


def test_page_renderer_escapes_and_localises() -> None:
    appointment = {"date": "2027-03-28", "time": "10:00", "patient": {"name": "<b>x</b>"},
                   "professional": {"name": None}, "specialty": "not a dict"}
    page = pages.action_page("en", "reschedule", appointment, '?token=a"b')
    assert "Sunday, 28 March 2027" in page and 'action="?token=a&quot;b"' in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "Professional" not in page
    assert pages.normalize_locale("EN-gb") == "en" and pages.normalize_locale(None) == "pt"
    assert pages.format_date("pt", "garbage") == "garbage"
    for status in (400, 404, 405, 409, 410, 500, 503, 418):
        assert pages.error_page("pt", status).startswith("<!DOCTYPE html>")


# ------------------------------------------------------------------ serving hooks


def test_serve_shares_a_loop_and_stops_on_an_event(db_url: str) -> None:
    """``serve()`` as ``barnum run`` uses it: in the caller's loop, stopped by an event."""
    from listener.shim import serve

    port = free_port()

    async def scenario() -> tuple[int, int]:
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(serve(create_app(make_config(db_url)), "127.0.0.1", port, ready, stop=stop))
        await asyncio.wait_for(ready.wait(), 30)
        async with httpx.AsyncClient() as client:
            health = await client.get(f"http://127.0.0.1:{port}/healthz")
            ready_ = await client.get(f"http://127.0.0.1:{port}/readyz")
        stop.set()
        await asyncio.wait_for(task, 30)
        return health.status_code, ready_.status_code

    assert asyncio.run(scenario()) == (200, 200)


def _shim_process(db_url: str, port: int) -> subprocess.Popen[str]:
    code = ("import argparse, sys; from listener import config, shim; "
            f"sys.exit(shim.main(argparse.Namespace(host='127.0.0.1', port={port}), config.load()))")
    env = {**os.environ, "DATABASE_URL": db_url, "WEBHOOK_SECRET": SECRET, "BARNUM_LOG_LEVEL": "INFO"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parent.parent))


def test_main_serves_until_sigterm_then_exits_0(db_url: str) -> None:
    port = free_port()
    proc = _shim_process(db_url, port)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, proc.communicate()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=30, message="barnum shim to answer /healthz")
        tok_page = httpx.get(f"http://127.0.0.1:{port}/api/action?type=confirm&token={'Z' * 43}")
        assert tok_page.status_code == 404
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert lines and all("ts" in line and "level" in line for line in lines)  # JSON lines only
    assert "Z" * 43 not in stderr  # no access log with the query string


def test_main_exits_1_when_the_port_is_taken(db_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = _shim_process(db_url, taken.getsockname()[1])
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "barnum shim: cannot listen on 127.0.0.1" in stderr

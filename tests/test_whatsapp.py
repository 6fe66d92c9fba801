"""The WhatsApp Cloud API webhook (SPEC-2 §B) over real HTTP against a real
PostgreSQL, with payloads shaped like Meta's documented webhook examples
(https://developers.facebook.com/docs/whatsapp/cloud-api/webhooks/payload-examples)
signed the way Meta signs them (X-Hub-Signature-256 over the raw body)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import TupleRow

from listener.config import Config
from tests.test_shim import Running, make_config, running_shim

Conn = psycopg.Connection[TupleRow]

APP_SECRET = "meta-app-secret"
OLD_APP_SECRET = "meta-app-secret-before-rotation"
VERIFY_TOKEN = "verify-me-please"
PNID = "106540352242922"
DISPLAY = "15550783881"


def meta_config(db_url: str) -> Config:
    base = make_config(db_url)
    return Config(**{**base.__dict__, "whatsapp_app_secret": f"{APP_SECRET},{OLD_APP_SECRET}",
                     "whatsapp_verify_token": VERIFY_TOKEN})


@pytest.fixture
def wa(db_url: str, db_conn: Conn) -> Iterator[Running]:
    db_conn.execute("SELECT barnum.whatsapp_number_add(%s, 'default', %s)", (PNID, DISPLAY))
    db_conn.execute("INSERT INTO barnum.webhook_endpoints (name, url, event_types)"
                    " VALUES ('n8n', 'https://n8n.example/in', '{*}')")
    with running_shim(meta_config(db_url)) as running:
        yield running


def notification(value: dict[str, Any], pnid: str = PNID) -> dict[str, Any]:
    """Meta's envelope: object, entry[].changes[] with field "messages"."""
    return {"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [{
        "value": {"messaging_product": "whatsapp",
                  "metadata": {"display_phone_number": DISPLAY, "phone_number_id": pnid}, **value},
        "field": "messages"}]}]}


def text_message(wamid: str, body: str, wa_id: str = "351911000001", name: str = "Sheena Nelson") -> dict[str, Any]:
    return {"contacts": [{"profile": {"name": name}, "wa_id": wa_id}],
            "messages": [{"from": wa_id, "id": wamid, "timestamp": "1749416383", "text": {"body": body},
                          "type": "text"}]}


def signed(doc: Any, secret: str = APP_SECRET) -> dict[str, Any]:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    sig = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    return {"content": raw, "headers": {"Content-Type": "application/json", "X-Hub-Signature-256": sig}}


def count(conn: Conn, sql: str, *args: Any) -> int:
    row = conn.execute(sql, args).fetchone()
    assert row is not None
    return int(row[0])


def stored(conn: Conn) -> tuple[int, int, int, int]:
    return (count(conn, "SELECT count(*) FROM barnum.messages"), count(conn, "SELECT count(*) FROM barnum.contacts"),
            count(conn, "SELECT count(*) FROM barnum.whatsapp_events"),
            count(conn, "SELECT count(*) FROM barnum.unrouted_webhooks"))


# ------------------------------------------------------------------ verification


def test_subscription_handshake(wa: Running) -> None:
    ok = wa.client.get("/whatsapp/webhook", params={"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN,
                                                    "hub.challenge": "1158201444"})
    assert ok.status_code == 200 and ok.text == "1158201444"
    for params in ({"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
                   {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"},
                   {"hub.mode": "subscribe", "hub.challenge": "1"},
                   {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN}):
        assert wa.client.get("/whatsapp/webhook", params=params).status_code == 403, params


def test_without_a_verify_token_nothing_verifies(db_url: str) -> None:
    with running_shim(make_config(db_url)) as running:
        response = running.client.get("/whatsapp/webhook", params={
            "hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "1"})
        assert response.status_code == 403


# ------------------------------------------------------------------ notifications


def test_a_text_message_is_stored_and_announced(wa: Running, db_conn: Conn) -> None:
    response = wa.client.post("/whatsapp/webhook", **signed(notification(text_message("wamid.A1", "Olá"))))
    assert response.status_code == 200, response.text
    assert response.json()["data"]["messages"] == 1
    assert db_conn.execute("SELECT direction, type, content FROM barnum.messages WHERE wa_message_id = 'wamid.A1'"
                           ).fetchone() == ("inbound", "text", "Olá")
    row = db_conn.execute("SELECT data FROM barnum.whatsapp_events WHERE event_type = 'message.received'").fetchone()
    assert row is not None
    assert {k: row[0][k] for k in ("message_id", "from", "to", "type", "content")} == {
        "message_id": "wamid.A1", "from": "351911000001", "to": DISPLAY, "type": "text", "content": "Olá"}
    # The old app secret still verifies (rotation).
    again = wa.client.post("/whatsapp/webhook", **signed(notification(text_message("wamid.A2", "2ª")), OLD_APP_SECRET))
    assert again.status_code == 200


def test_bad_signatures_are_401_and_store_nothing(wa: Running, db_conn: Conn) -> None:
    doc = notification(text_message("wamid.B1", "hi"))
    raw = json.dumps(doc).encode()
    before = stored(db_conn)
    for headers in (
        {},
        {"X-Hub-Signature-256": "sha256=" + "0" * 64},
        {"X-Hub-Signature-256": hmac.new(APP_SECRET.encode(), raw, hashlib.sha256).hexdigest()},  # no prefix
        {"X-Hub-Signature-256": "sha256=" + hmac.new(b"another", raw, hashlib.sha256).hexdigest()},
        {"X-Hub-Signature-256": "sha1=" + hmac.new(APP_SECRET.encode(), raw, hashlib.sha1).hexdigest()},
        {"X-Hub-Signature-256": "sha256=" + hmac.new(APP_SECRET.encode(), raw + b" ", hashlib.sha256).hexdigest()},
    ):
        response = wa.client.post("/whatsapp/webhook", content=raw,
                                  headers={"Content-Type": "application/json", **headers})
        assert response.status_code == 401, headers
    non_ascii = wa.client.post("/whatsapp/webhook", content=raw, headers={
        b"Content-Type": b"application/json", b"X-Hub-Signature-256": "sha256=é".encode("latin-1") * 8})
    assert non_ascii.status_code == 401
    assert stored(db_conn) == before


def test_bad_json_and_oversized_bodies(wa: Running, db_conn: Conn) -> None:
    before = stored(db_conn)
    assert wa.client.post("/whatsapp/webhook", **signed(b"{not json")).status_code == 400
    assert wa.client.post("/whatsapp/webhook", **signed(b"[1, 2]")).status_code == 400
    assert wa.client.post("/whatsapp/webhook", **signed(b'{"object": "page", "entry": []}')).status_code == 400
    assert wa.client.post("/whatsapp/webhook", **signed(b'{"object": "x", "s": "\\u0000"}')).status_code == 400
    big = b'{"object": "whatsapp_business_account", "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    declared = wa.client.post("/whatsapp/webhook", **signed(big))
    assert declared.status_code == 413

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    streamed = wa.client.post("/whatsapp/webhook", content=chunks(), headers=signed(big)["headers"])
    assert streamed.status_code == 413, "a chunked body is cut off while reading"
    assert stored(db_conn) == before


def test_unknown_number_is_kept_and_still_200(wa: Running, db_conn: Conn) -> None:
    response = wa.client.post("/whatsapp/webhook", **signed(notification(text_message("wamid.U1", "hi"), "999")))
    assert response.status_code == 200 and response.json()["data"]["unrouted"] == 1
    assert count(db_conn, "SELECT count(*) FROM barnum.unrouted_webhooks WHERE phone_number_id = '999'") == 1
    assert count(db_conn, "SELECT count(*) FROM barnum.messages") == 0


def test_statuses_never_regress(wa: Running, db_conn: Conn) -> None:
    def status(state: str, ts: str, **extra: Any) -> httpx.Response:
        return wa.client.post("/whatsapp/webhook", **signed(notification({"statuses": [{
            "id": "wamid.S1", "status": state, "timestamp": ts, "recipient_id": "351911000001", **extra}]})))

    assert status("sent", "1749416400").status_code == 200
    assert status("read", "1749416460").json()["data"]["statuses"] == 1
    assert status("delivered", "1749416430").json()["data"]["stale_statuses"] == 1
    assert db_conn.execute("SELECT status FROM barnum.messages WHERE wa_message_id = 'wamid.S1'").fetchone() == ("read",)
    assert count(db_conn, "SELECT count(*) FROM barnum.whatsapp_events WHERE event_type = 'message.status'") == 2


def test_a_redelivery_storm_stores_one_message_and_one_event(wa: Running, db_conn: Conn) -> None:
    kwargs = signed(notification(text_message("wamid.STORM", "só uma vez")))

    async def storm() -> list[int]:
        async with httpx.AsyncClient(base_url=wa.url, timeout=30,
                                     limits=httpx.Limits(max_connections=50)) as client:
            responses = await asyncio.gather(*(client.post("/whatsapp/webhook", **kwargs) for _ in range(50)))
        return [r.status_code for r in responses]

    assert asyncio.run(storm()) == [200] * 50
    assert count(db_conn, "SELECT count(*) FROM barnum.messages WHERE wa_message_id = 'wamid.STORM'") == 1
    assert count(db_conn, "SELECT count(*) FROM barnum.whatsapp_events WHERE event_type = 'message.received'") == 1
    assert count(db_conn, "SELECT count(*) FROM barnum.contacts") == 1


def test_a_patients_reply_confirms_their_appointment(wa: Running, db_conn: Conn) -> None:
    patient = str(uuid.uuid4())
    db_conn.execute("INSERT INTO barnum.patients (id, name, phone) VALUES (%s, 'Ana', '+351933000003')", (patient,))
    appt = db_conn.execute("INSERT INTO barnum.appointments (patient_id, starts_at) VALUES"
                           " (%s, now() + interval '3 days') RETURNING id", (patient,)).fetchone()
    assert appt is not None
    response = wa.client.post("/whatsapp/webhook", **signed(notification(
        text_message("wamid.R1", "Sim!", wa_id="351933000003", name="Ana"))))
    assert response.status_code == 200 and response.json()["data"]["acted"] == 1
    assert db_conn.execute("SELECT status::text FROM barnum.appointments WHERE id = %s", appt).fetchone() == ("confirmed",)
    # A button carrying an action token acts like the link; once.
    token = db_conn.execute("SELECT barnum.generate_action_token('cancel', %s, %s)", (appt[0], patient)).fetchone()
    assert token is not None
    button = {"contacts": [{"profile": {"name": "Ana"}, "wa_id": "351933000003"}],
              "messages": [{"context": {"from": DISPLAY, "id": "wamid.OUT"}, "from": "351933000003",
                            "id": "wamid.R2", "timestamp": "1749416500", "type": "button",
                            "button": {"payload": f"barnum:cancel:{token[0]}", "text": "Cancelar"}}]}
    assert wa.client.post("/whatsapp/webhook", **signed(notification(button))).json()["data"]["acted"] == 1
    assert db_conn.execute("SELECT status::text FROM barnum.appointments WHERE id = %s", appt).fetchone() == ("cancelled",)


def test_cli_routes_numbers(db_url: str, db_conn: Conn) -> None:
    from tests.test_admin import barnum

    added = barnum("numbers", "add", PNID, "--display", "+1 555-078-3881", url=db_url)
    assert added.returncode == 0 and PNID in added.stdout
    assert barnum("numbers", "add", PNID, url=db_url).returncode == 2, "routed already"
    bad = barnum("numbers", "add", "12ab", url=db_url)
    assert bad.returncode == 2 and "phone_number_id" in bad.stderr
    listed = json.loads(barnum("numbers", "list", "--json", url=db_url).stdout)
    assert listed == [{"phone_number_id": PNID, "account": "default", "display_phone_number": DISPLAY,
                       "created_at": listed[0]["created_at"]}]
    assert barnum("numbers", "remove", PNID, url=db_url).returncode == 0
    gone = barnum("numbers", "remove", PNID, url=db_url)
    assert gone.returncode == 2 and "not routed" in gone.stderr

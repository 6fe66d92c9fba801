"""The native WhatsApp sender (SPEC-2 §E): an endpoint of kind whatsapp_cloud
sends appointment events and flow messages straight to a fake Graph API that
validates the Cloud API request shapes, over real HTTP; the wamid goes on the
outbound message; Graph errors map to retry or final; the loop closes when the
patient taps a button (a signed /whatsapp/webhook notification)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow

from tests.e2e.fakes import FakeGraphAPI
from tests.test_admin import BARNUM, barnum
from tests.test_shim import running_shim
from tests.test_whatsapp import DISPLAY, PNID, meta_config, notification, signed

Conn = psycopg.Connection[TupleRow]
TOKEN = "test-graph-token"
SENDER_PNID = "1234567890"


@dataclass
class World:
    url: str
    conn: Conn
    graph: FakeGraphAPI

    def relay_once(self, token: str | None = TOKEN) -> dict[str, Any]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "WHATSAPP_"))}
        env.update({"DATABASE_URL": self.url, "WEBHOOK_SECRET": "relay-secret-for-tests"})
        if token is not None:
            env["WHATSAPP_TOKEN"] = token
        done = subprocess.run([str(BARNUM), "relay", "--once"], env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def book(self, phone: str = "+351911000001", name: str = "Ana Costa", *, days: int = 3) -> tuple[str, str]:
        patient = str(uuid.uuid4())
        self.conn.execute("INSERT INTO barnum.patients (id, name, phone) VALUES (%s, %s, %s)", (patient, name, phone))
        row = self.conn.execute("INSERT INTO barnum.appointments (patient_id, starts_at) VALUES"
                                " (%s, now() + make_interval(days => %s)) RETURNING id", (patient, days)).fetchone()
        assert row is not None
        return patient, str(row[0])

    def delivery(self, event_type: str) -> tuple[Any, ...]:
        row = self.conn.execute(
            "SELECT d.status, d.attempts, d.last_error FROM barnum.webhook_deliveries d"
            " JOIN barnum.whatsapp_events e ON e.id = d.event_id WHERE e.event_type = %s"
            " ORDER BY d.id DESC LIMIT 1", (event_type,)).fetchone()
        assert row is not None
        return tuple(row)


@pytest.fixture
def world(db_url: str, db_conn: Conn) -> Iterator[World]:
    graph = FakeGraphAPI(phone_number_id=SENDER_PNID, token=TOKEN).start()
    try:
        added = barnum("endpoints", "add-whatsapp", "whatsapp", "--phone-number-id", SENDER_PNID,
                       "--graph-url", graph.graph_base_url, url=db_url)
        assert added.returncode == 0, added.stderr
        yield World(db_url, db_conn, graph)
    finally:
        graph.stop()


def test_an_appointment_request_is_an_interactive_message_whose_buttons_act(world: World) -> None:
    patient, appt = world.book()
    summary = world.relay_once()
    assert summary["delivered"] == 1, summary
    [msg] = world.graph.snapshot()
    assert msg.headers["authorization"] == f"Bearer {TOKEN}" and msg.path == f"/v21.0/{SENDER_PNID}/messages"
    assert msg.body["to"] == "351911000001" and msg.body["type"] == "interactive"
    assert "Olá Ana! Tem uma consulta" in msg.text, msg.text
    ids = msg.reply_ids
    assert [i.split(":")[1] for i in ids] == ["confirm", "cancel", "reschedule"]
    assert all(i.startswith("barnum:") and len(i.split(":")[2]) >= 43 for i in ids)
    assert not world.graph.invalid
    # The wamid is on an outbound message row, so status webhooks find it.
    assert world.conn.execute("SELECT direction, status FROM barnum.messages WHERE wa_message_id = %s",
                              (msg.wamid,)).fetchone() == ("outbound", "pending")

    # The patient taps "Confirmar": Meta posts the button reply to Barnum.
    world.conn.execute("SELECT barnum.whatsapp_number_add(%s, 'default', %s)", (PNID, DISPLAY))
    with running_shim(meta_config(world.url)) as shim:
        tap = {"contacts": [{"profile": {"name": "Ana Costa"}, "wa_id": "351911000001"}],
               "messages": [{"context": {"from": DISPLAY, "id": msg.wamid}, "from": "351911000001",
                             "id": "wamid.TAP1", "timestamp": "1749416500", "type": "interactive",
                             "interactive": {"type": "button_reply",
                                             "button_reply": {"id": ids[0], "title": "Confirmar"}}}]}
        response = shim.client.post("/whatsapp/webhook", **signed(notification(tap)))
        assert response.status_code == 200 and response.json()["data"]["acted"] == 1
        delivered = shim.client.post("/whatsapp/webhook", **signed(notification({"statuses": [
            {"id": msg.wamid, "status": "read", "timestamp": "1749416600", "recipient_id": "351911000001"}]})))
        assert delivered.json()["data"]["statuses"] == 1
    assert world.conn.execute("SELECT status::text FROM barnum.appointments WHERE id = %s", (appt,)).fetchone() == (
        "confirmed",)
    assert world.conn.execute("SELECT status FROM barnum.messages WHERE wa_message_id = %s",
                              (msg.wamid,)).fetchone() == ("read",)
    # The confirmation itself goes out as a text message.
    world.relay_once()
    last = world.graph.snapshot()[-1]
    assert last.body["type"] == "text" and "está confirmada" in last.text


def test_a_template_is_used_when_configured(world: World, db_url: str) -> None:
    added = barnum("endpoints", "add-whatsapp", "templated", "--phone-number-id", SENDER_PNID,
                   "--graph-url", world.graph.graph_base_url, "--events", "appointment.pre_confirmed",
                   "--template", "appointment.pre_confirmed=booking_request:pt_PT", url=db_url)
    assert added.returncode == 0, added.stderr
    world.conn.execute("UPDATE barnum.webhook_endpoints SET is_active = false WHERE name = 'whatsapp'")
    world.book()
    world.relay_once()
    [msg] = world.graph.snapshot()
    assert msg.body["type"] == "template" and not world.graph.invalid
    tpl = msg.body["template"]
    assert tpl["name"] == "booking_request" and tpl["language"] == {"code": "pt_PT"}
    params = [p["text"] for p in tpl["components"][0]["parameters"]]
    assert params[0] == "Ana" and params[3] == "-"
    payloads = [c["parameters"][0]["payload"] for c in tpl["components"][1:]]
    assert [p.split(":")[1] for p in payloads] == ["confirm", "cancel", "reschedule"]


def test_flow_messages_are_sent_and_get_their_wamid(world: World) -> None:
    world.conn.execute("SELECT barnum.whatsapp_number_add(%s, 'default', %s)", (PNID, DISPLAY))
    world.conn.execute("SELECT barnum.flow_import('default', %s::jsonb)", (json.dumps({
        "name": "hi", "trigger": "default", "definition": {"start": "a", "nodes": {
            "a": {"type": "buttons", "text": "Como posso ajudar?",
                  "buttons": [{"id": "book", "title": "Marcar", "next": "b"}]},
            "b": {"type": "end", "text": "Até já"}}}}),))
    with running_shim(meta_config(world.url)) as shim:
        hello = {"contacts": [{"profile": {"name": "Rui"}, "wa_id": "351977000007"}],
                 "messages": [{"from": "351977000007", "id": "wamid.HI", "timestamp": "1749416500", "type": "text",
                               "text": {"body": "olá"}}]}
        assert shim.client.post("/whatsapp/webhook", **signed(notification(hello))).json()["data"]["flows"] == 1
    world.relay_once()
    [msg] = world.graph.snapshot()
    assert msg.body["interactive"]["action"]["buttons"][0]["reply"]["id"] == "book" and not world.graph.invalid
    assert world.conn.execute("SELECT content FROM barnum.messages WHERE wa_message_id = %s",
                              (msg.wamid,)).fetchone() == ("Como posso ajudar?",)


@pytest.mark.parametrize("status,code,message,expect_status,error_part", [
    (400, 131047, "Re-engagement message", "dead_letter", "send a template"),
    (400, 131026, "Message undeliverable", "dead_letter", "cannot receive WhatsApp"),
    (429, 130429, "Rate limit hit", "pending", "130429"),
    (400, 80007, "Rate limit issues", "pending", "80007"),
    (500, 1, "An unknown error occurred", "pending", "Graph API error 1"),
])
def test_graph_errors_map_to_retry_or_final(world: World, status: int, code: int, message: str,
                                            expect_status: str, error_part: str) -> None:
    world.graph.errors_for["351911000001"] = (status, code, message)
    world.book()
    world.relay_once()
    state, attempts, error = world.delivery("appointment.pre_confirmed")
    assert (state, attempts) == (expect_status, 1), error
    assert error_part in error


def test_an_expired_token_switches_the_endpoint_off_and_status_says_so(world: World, db_url: str) -> None:
    world.book()
    world.relay_once(token="an-expired-token")
    state, _, error = world.delivery("appointment.pre_confirmed")
    assert state == "dead_letter" and "190" in error
    row = world.conn.execute("SELECT status, metadata ->> 'disabled_reason' FROM barnum.webhook_endpoints"
                             " WHERE name = 'whatsapp'").fetchone()
    assert row is not None and row[0] == "failed" and "WHATSAPP_TOKEN" in row[1]
    status = barnum("status", url=db_url)
    assert status.returncode == 0
    assert "! endpoint whatsapp is failed: the WhatsApp access token expired" in status.stdout


def test_a_missing_token_is_a_clear_final_error(world: World) -> None:
    world.book()
    world.relay_once(token=None)
    state, _, error = world.delivery("appointment.pre_confirmed")
    assert state == "dead_letter" and "WHATSAPP_TOKEN is not set" in error
    assert world.graph.snapshot() == []


def test_cli_refuses_bad_whatsapp_endpoints(db_url: str) -> None:
    for args, fragment in (
        (["--phone-number-id", "12ab"], "phone_number_id"),
        (["--phone-number-id", "1", "--token-env", "lower"], "environment variable"),
        (["--phone-number-id", "1", "--graph-url", "http://graph.example/v21.0"], "--allow-http"),
        (["--phone-number-id", "1", "--template", "appointment.nope=x"], "template"),
        (["--phone-number-id", "1", "--template", "broken"], "--template"),
    ):
        done = barnum("endpoints", "add-whatsapp", "wa", *args, url=db_url)
        assert done.returncode == 2 and fragment in done.stderr, (args, done.stderr)

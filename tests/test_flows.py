"""Keyword flows end to end (SPEC-2 §C): a flow imported with the CLI, driven
by signed WhatsApp notifications over real HTTP, its outbound messages
delivered by the relay to a receiver as message.send events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow

from tests.receiver import Receiver
from tests.test_admin import barnum
from tests.test_shim import INTERNAL, Running, running_shim
from tests.test_whatsapp import DISPLAY, PNID, meta_config, notification, signed, text_message

Conn = psycopg.Connection[TupleRow]
EXAMPLE = Path(__file__).resolve().parent.parent / "integrations" / "flows" / "booking.json"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([]).start()
    r.unsigned("/")
    yield r
    r.stop()


@pytest.fixture
def shop(db_url: str, db_conn: Conn, receiver: Receiver) -> Iterator[Running]:
    db_conn.execute("SELECT barnum.whatsapp_number_add(%s, 'default', %s)", (PNID, DISPLAY))
    db_conn.execute("INSERT INTO barnum.webhook_endpoints (name, url, event_types) VALUES ('sender', %s, '{message.send}')",
                    (receiver.url("/send"),))
    imported = barnum("flows", "import", str(EXAMPLE), url=db_url)
    assert imported.returncode == 0, imported.stderr
    with running_shim(meta_config(db_url)) as running:
        yield running


def relay_pass(shim: Running) -> None:
    response = shim.client.post("/api/internal", headers={"Authorization": f"Bearer {INTERNAL}"})
    assert response.status_code == 200, response.text


def sent_texts(receiver: Receiver) -> list[str]:
    """What was sent, in the conversation's order (the relay delivers a batch
    concurrently; each message.send carries its sequence in the session)."""
    return [h.json["content"] for h in sorted(receiver.snapshot("/send"), key=lambda h: h.json["sequence"])]


def session(conn: Conn) -> tuple[Any, ...]:
    row = conn.execute("SELECT status, current_node_id, context FROM barnum.flow_sessions").fetchone()
    assert row is not None
    return tuple(row)


def test_an_inbound_message_walks_a_two_step_flow(shop: Running, db_conn: Conn, receiver: Receiver) -> None:
    def post(value: dict[str, Any]) -> dict[str, Any]:
        response = shop.client.post("/whatsapp/webhook", **signed(notification(value)))
        assert response.status_code == 200, response.text
        return response.json()["data"]  # type: ignore[no-any-return]

    assert post(text_message("wamid.W1", "Olá, queria MARCAR uma consulta", name="Rui"))["flows"] == 1
    relay_pass(shop)
    assert sent_texts(receiver) == ["Olá Rui!", "Quer marcar uma consulta?"]
    buttons = next(h.json for h in receiver.snapshot("/send") if h.json["sequence"] == 2)
    assert buttons["event_type"] == "message.send" and buttons["to"] == "351911000001"
    assert buttons["whatsapp"]["interactive"]["action"]["buttons"][0]["reply"] == {"id": "yes", "title": "Sim"}
    assert session(db_conn)[:2] == ("Active", "menu")

    post({"messages": [{"from": "351911000001", "id": "wamid.W2", "timestamp": "1749416390", "type": "interactive",
                        "interactive": {"type": "button_reply", "button_reply": {"id": "yes", "title": "Sim"}}}]})
    post(text_message("wamid.W3", "sexta de manhã", name="Rui"))
    relay_pass(shop)
    assert sent_texts(receiver)[2:] == ["Para quando? (por exemplo: sexta de manhã)",
                                        "Obrigado! Um colaborador vai confirmar a hora consigo."]
    assert session(db_conn) == ("Paused", "staff", {"last_choice": "yes", "when": "sexta de manhã"})
    handoff = db_conn.execute("SELECT data FROM barnum.whatsapp_events WHERE event_type = 'session.handoff'").fetchone()
    assert handoff is not None and handoff[0]["context"]["when"] == "sexta de manhã"
    # Every inbound message is kept, attached to the session.
    assert db_conn.execute("SELECT count(*) FROM barnum.messages WHERE direction = 'inbound' AND session_id IS NOT NULL"
                           ).fetchone() == (3,)


def test_cli_flows(db_url: str, tmp_path: Path) -> None:
    assert barnum("flows", "import", str(EXAMPLE), url=db_url).returncode == 0
    listed = json.loads(barnum("flows", "list", "--json", url=db_url).stdout)
    assert [(f["name"], f["status"], f["nodes"]) for f in listed] == [("booking", "Active", 5)]
    assert "Inactive" in barnum("flows", "disable", "booking", url=db_url).stdout
    assert "Active" in barnum("flows", "enable", "booking", url=db_url).stdout

    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "trigger": "y", "definition": {"start": "a", "nodes": {"a": {"type": "message", '
                   '"text": "hi", "next": "b"}, "b": {"type": "message", "text": "again", "next": "a"}}}}')
    refused = barnum("flows", "import", str(bad), url=db_url)
    assert refused.returncode == 2 and "loop" in refused.stderr
    bad.write_text("{not json")
    notjson = barnum("flows", "import", str(bad), url=db_url)
    assert notjson.returncode == 2 and "not JSON" in notjson.stderr
    missing = barnum("flows", "import", str(tmp_path / "nope.json"), url=db_url)
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    unknown = barnum("flows", "disable", "nope", url=db_url)
    assert unknown.returncode == 2 and "no flow named" in unknown.stderr
    assert [f["name"] for f in json.loads(barnum("flows", "list", "--json", url=db_url).stdout)] == ["booking"]

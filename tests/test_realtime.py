"""The realtime endpoint (SPEC-2 §D): a real python-socketio AsyncClient over
loopback against a running shim and a real PostgreSQL — connect and token
auth, rooms per conversation and account, the events the seed's frontend
listens to (fed by LISTEN/NOTIFY), reconnecting the LISTEN connection, CORS.

No sleeps: every wait is a condition with a deadline.  "Receives nothing" is
shown by order: events are emitted in commit order, so once an event that
was committed later has arrived, an earlier one that was due would have too.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest
import socketio
from prometheus_client import REGISTRY
from psycopg.rows import TupleRow

from listener.config import Config, ConfigError, load
from listener.realtime import Realtime, bearer_token, contact_of
from tests.helpers import async_wait_until, wait_until
from tests.test_shim import Running, running_shim
from tests.test_whatsapp import PNID, meta_config, notification, signed, text_message

Conn = psycopg.Connection[TupleRow]

ACME_PNID = "200000000000001"
EVENTS = ("message:new", "message:status", "typing:start", "typing:stop", "session:updated")
FLOW_DEFINITION = '{"start": "a", "nodes": {"a": {"type": "end"}}}'


# ------------------------------------------------------------------ harness


def create_token(conn: Conn, account: str = "default", scopes: str = "{conversations:read}") -> str:
    row = conn.execute("SELECT barnum.api_token_create(%s, 'frontend', %s::text[]) ->> 'token'",
                       (account, scopes)).fetchone()
    assert row is not None
    return str(row[0])


def realtime_of(running: Running) -> Realtime:
    app: Any = running.server.config.app
    rt = app.state.realtime
    assert isinstance(rt, Realtime)
    return rt


@contextmanager
def realtime_shim(db_url: str, db_conn: Conn, config: Config | None = None) -> Iterator[Running]:
    """A shim receiving WhatsApp for two accounts, its LISTEN connection up."""
    db_conn.execute("SELECT barnum.account_add('acme')")
    db_conn.execute("SELECT barnum.whatsapp_number_add(%s, 'default', '15550783881')", (PNID,))
    db_conn.execute("SELECT barnum.whatsapp_number_add(%s, 'acme', '15550000002')", (ACME_PNID,))
    with running_shim(config or meta_config(db_url)) as running:
        wait_until(lambda: realtime_of(running).listening, message="the LISTEN connection")
        yield running


@pytest.fixture
def rt(db_url: str, db_conn: Conn) -> Iterator[Running]:
    with realtime_shim(db_url, db_conn) as running:
        yield running


def inbound(running: Running, wamid: str, body: str, wa_id: str = "351911000001", pnid: str = PNID) -> None:
    response = running.client.post("/whatsapp/webhook",
                                   **signed(notification(text_message(wamid, body, wa_id), pnid)))
    assert response.status_code == 200, response.text


def status_update(running: Running, wamid: str, state: str, ts: str) -> None:
    response = running.client.post("/whatsapp/webhook", **signed(notification({"statuses": [{
        "id": wamid, "status": state, "timestamp": ts, "recipient_id": "351911000001"}]})))
    assert response.status_code == 200, response.text


def contact_id(conn: Conn, wa_id: str = "351911000001") -> str:
    row = conn.execute("SELECT id::text FROM barnum.contacts WHERE wa_id = %s", (wa_id,)).fetchone()
    assert row is not None
    return str(row[0])


class Probe:
    """A Socket.IO client that records every event it receives."""

    def __init__(self) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: list[tuple[str, Any]] = []
        self.errors: list[Any] = []
        for name in EVENTS:
            self.sio.on(name, self._recorder(name))
        self.sio.on("connect_error", self._on_error)

    def _recorder(self, name: str) -> Any:
        async def record(data: Any = None) -> None:
            self.events.append((name, data))
        return record

    async def _on_error(self, data: Any = None) -> None:
        self.errors.append(data)

    async def next(self, name: str, timeout: float = 10.0, **match: Any) -> Any:
        """The first recorded ``name`` event whose data has the ``match`` items."""
        def found() -> Any:
            for event, data in self.events:
                if event == name and isinstance(data, dict) and all(data.get(k) == v for k, v in match.items()):
                    return data
            return None

        return await async_wait_until(found, timeout, message=f"{name} {match}")

    def names(self) -> list[str]:
        return [event for event, _ in self.events]


@asynccontextmanager
async def connected(running: Running, token: str | None, *, transports: list[str] | None = None,
                    headers: dict[str, str] | None = None) -> AsyncIterator[Probe]:
    probe = Probe()
    await probe.sio.connect(running.url, auth={"token": token} if token is not None else None,
                            headers=headers or {}, transports=transports or ["websocket"], wait_timeout=10)
    try:
        yield probe
    finally:
        await probe.sio.disconnect()


async def refused(running: Running, **kwargs: Any) -> Any:
    probe = Probe()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await probe.sio.connect(running.url, transports=["websocket"], wait_timeout=10, **kwargs)
    assert not probe.sio.connected
    assert probe.errors, "connect_error was not reported"
    return probe.errors[0]


# ------------------------------------------------------------------ connect


async def test_a_token_with_conversations_read_connects(rt: Running, db_conn: Conn) -> None:
    token = create_token(db_conn)
    async with connected(rt, token) as probe:
        assert probe.sio.connected
    # The header the API uses works too (socket.io-client's extraHeaders).
    async with connected(rt, None, headers={"Authorization": f"Bearer {token}"}) as probe:
        assert probe.sio.connected
    # And the seed's default: long-polling first, then the websocket upgrade.
    async with connected(rt, token, transports=["polling", "websocket"]) as probe:
        assert probe.sio.connected
        assert await async_wait_until(lambda: probe.sio.transport() == "websocket", message="the upgrade")


async def test_connections_without_a_good_token_are_refused(rt: Running, db_conn: Conn) -> None:
    hooks_only = create_token(db_conn, scopes="{webhooks:read}")
    revoked = create_token(db_conn)
    db_conn.execute("SELECT barnum.api_token_revoke(id::text) FROM barnum.api_tokens"
                    " WHERE token_hash = barnum.token_hash(%s)", (revoked,))
    assert (await refused(rt))["data"] == {"code": "UNAUTHORIZED"}
    assert (await refused(rt, auth={"token": "not-a-token"}))["data"] == {"code": "UNAUTHORIZED"}
    assert (await refused(rt, auth={"token": "bnt_" + "x" * 43}))["data"] == {"code": "UNAUTHORIZED"}
    assert (await refused(rt, auth={"token": revoked}))["data"] == {"code": "UNAUTHORIZED"}
    assert (await refused(rt, headers={"Authorization": "Basic abc"}))["data"] == {"code": "UNAUTHORIZED"}
    forbidden = await refused(rt, auth={"token": hooks_only})
    assert forbidden["data"] == {"code": "FORBIDDEN"} and "conversations:read" in forbidden["message"]
    assert realtime_of(rt).clients == {}


# ------------------------------------------------------------------ events


async def test_an_inbound_message_reaches_its_conversation(rt: Running, db_conn: Conn) -> None:
    token = create_token(db_conn)
    inbound(rt, "wamid.RT-A1", "first")  # creates the contact
    contact = contact_id(db_conn)
    async with connected(rt, token, transports=["polling", "websocket"]) as probe:
        assert await probe.sio.call("join:conversation", contact, timeout=10) is True
        inbound(rt, "wamid.RT-A2", "Olá, quero marcar")
        data = await probe.next("message:new")
        assert data["contactId"] == contact
        message = data["message"]
        assert {k: message[k] for k in ("waMessageId", "direction", "type", "content", "status", "contactId")} == {
            "waMessageId": "wamid.RT-A2", "direction": "inbound", "type": "text",
            "content": "Olá, quero marcar", "status": "received", "contactId": contact}
        row = db_conn.execute("SELECT id::text FROM barnum.messages WHERE wa_message_id = 'wamid.RT-A2'").fetchone()
        assert row is not None and message["id"] == row[0]
        assert probe.names() == ["message:new"], "the message before the join was announced"


async def test_another_accounts_conversation_cannot_be_joined(rt: Running, db_conn: Conn) -> None:
    token = create_token(db_conn)
    inbound(rt, "wamid.RT-B1", "mine")
    inbound(rt, "wamid.RT-B2", "theirs", wa_id="351922000002", pnid=ACME_PNID)
    mine, theirs = contact_id(db_conn), contact_id(db_conn, "351922000002")
    async with connected(rt, token) as probe:
        for other in (theirs, str(uuid.uuid4()), "not-an-id", "' OR 1=1 --", 42, None):
            assert await probe.sio.call("join:conversation", other, timeout=10) is False, other
        assert await probe.sio.call("join:conversation", mine, timeout=10) is True
        inbound(rt, "wamid.RT-B3", "for acme", wa_id="351922000002", pnid=ACME_PNID)
        db_conn.execute("SELECT barnum.notify_typing(%s, true)", (theirs,))
        inbound(rt, "wamid.RT-B4", "for us")
        data = await probe.next("message:new")
        assert data["message"]["content"] == "for us"
        assert probe.names() == ["message:new"], "another account's events arrived"
        assert realtime_of(rt).watched == {mine: 1}

    # A revoked token joins nothing more, and its socket is closed.
    async with connected(rt, token) as probe:
        db_conn.execute("SELECT barnum.api_token_revoke(id::text) FROM barnum.api_tokens"
                        " WHERE token_hash = barnum.token_hash(%s)", (token,))
        await probe.sio.emit("join:conversation", mine)
        await async_wait_until(lambda: not probe.sio.connected, message="the revoked socket closed")
    assert realtime_of(rt).watched == {}


async def test_leaving_a_conversation_stops_its_events(rt: Running, db_conn: Conn) -> None:
    token = create_token(db_conn)
    inbound(rt, "wamid.RT-L1", "one")
    inbound(rt, "wamid.RT-L2", "two", wa_id="351911000003")
    first, second = contact_id(db_conn), contact_id(db_conn, "351911000003")
    async with connected(rt, token) as probe:
        assert await probe.sio.call("join:conversation", first.upper(), timeout=10) is True
        assert await probe.sio.call("join:conversation", second, timeout=10) is True
        assert await probe.sio.call("leave:conversation", first, timeout=10) is True
        db_conn.execute("SELECT barnum.notify_typing(%s, true)", (first,))
        db_conn.execute("SELECT barnum.notify_typing(%s, true)", (second,))
        assert (await probe.next("typing:start"))["contactId"] == second
        assert probe.names() == ["typing:start"]
        db_conn.execute("SELECT barnum.notify_typing(%s, false)", (second,))
        assert await probe.next("typing:stop", contactId=second)
    await async_wait_until(lambda: not realtime_of(rt).watched and not realtime_of(rt).clients,
                           message="the disconnect forgotten")


async def test_status_updates_arrive_in_order(rt: Running, db_conn: Conn) -> None:
    token = create_token(db_conn)
    inbound(rt, "wamid.RT-S0", "hello")
    contact = contact_id(db_conn)
    async with connected(rt, token) as probe:
        assert await probe.sio.call("join:conversation", contact, timeout=10) is True
        # A message n8n sent becomes known with its first status (message:new) …
        status_update(rt, "wamid.RT-S1", "sent", "1749416400")
        new = await probe.next("message:new")
        assert new["message"]["waMessageId"] == "wamid.RT-S1" and new["message"]["direction"] == "outbound"
        # … then each forward step is a message:status, a stale one is none.
        status_update(rt, "wamid.RT-S1", "delivered", "1749416430")
        status_update(rt, "wamid.RT-S1", "sent", "1749416401")
        status_update(rt, "wamid.RT-S1", "read", "1749416460")
        await probe.next("message:status", status="read")
        statuses = [d for e, d in probe.events if e == "message:status"]
        assert [s["status"] for s in statuses] == ["sent", "delivered", "read"]
        assert statuses[-1]["messageId"] == new["message"]["id"]
        assert statuses[-1]["waMessageId"] == "wamid.RT-S1" and statuses[-1]["contactId"] == contact


async def test_session_updates_arrive(rt: Running, db_conn: Conn) -> None:
    token = create_token(db_conn)
    inbound(rt, "wamid.RT-F0", "hello")
    contact = contact_id(db_conn)
    async with connected(rt, token) as probe:
        assert await probe.sio.call("join:conversation", contact, timeout=10) is True
        row = db_conn.execute(
            """WITH f AS (INSERT INTO barnum.flows (account_id, name, trigger, definition)
                          SELECT account_id, 'hello', 'oi', %s::jsonb FROM barnum.contacts WHERE id = %s
                          RETURNING account_id, id)
               INSERT INTO barnum.flow_sessions (account_id, contact_id, flow_id)
               SELECT account_id, %s, id FROM f RETURNING id::text""",
            (FLOW_DEFINITION, contact, contact)).fetchone()
        assert row is not None
        session = row[0]
        assert await probe.next("session:updated", status="Active") == {
            "sessionId": session, "status": "Active", "contactId": contact, "flowId": await_flow(db_conn, session)}
        db_conn.execute("UPDATE barnum.flow_sessions SET current_node_id = 'a' WHERE id = %s", (session,))
        db_conn.execute("UPDATE barnum.flow_sessions SET status = 'Completed' WHERE id = %s", (session,))
        await probe.next("session:updated", status="Completed")
        assert probe.names() == ["session:updated", "session:updated"]


def await_flow(conn: Conn, session: str) -> str:
    row = conn.execute("SELECT flow_id::text FROM barnum.flow_sessions WHERE id = %s", (session,)).fetchone()
    assert row is not None
    return str(row[0])


async def test_the_triggers_notify_ids_only(db_url: str, db_conn: Conn) -> None:
    """What reaches LISTEN barnum_realtime, at commit, for each change."""
    db_conn.execute("SELECT barnum.whatsapp_number_add(%s, 'default', '15550783881')", (PNID,))
    conn = await asyncpg.connect(db_url)
    got: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener("barnum_realtime", lambda *args: got.put_nowait(args[3]))
    try:
        # Nobody watching: no NOTIFY at all (NOTIFY serialises commits).
        db_conn.execute("SELECT barnum.ingest_whatsapp(%s::jsonb)",
                        (psycopg.types.json.Json(notification(text_message("wamid.T0", "unwatched"))),))
        db_conn.execute("SELECT barnum.notify_typing(gen_random_uuid(), true)")
        db_conn.execute("SELECT pg_notify('barnum_realtime', 'marker-0')")
        assert await asyncio.wait_for(got.get(), 10) == "marker-0", "nothing before the marker"
        # A shim watching a conversation registers: from then on, ids at commit.
        db_conn.execute("SELECT barnum.realtime_listening('test-shim', '1 minute')")
        db_conn.execute("SELECT barnum.ingest_whatsapp(%s::jsonb)",
                        (psycopg.types.json.Json(notification(text_message("wamid.T1", "x" * 60000))),))
        contact = contact_id(db_conn)
        row = db_conn.execute("SELECT id::text FROM barnum.messages WHERE wa_message_id = 'wamid.T1'").fetchone()
        assert row is not None
        msg = row[0]
        assert await asyncio.wait_for(got.get(), 10) == f"message:{msg}:{contact}"
        db_conn.execute("UPDATE barnum.messages SET status = status WHERE id = %s", (msg,))
        db_conn.execute("UPDATE barnum.messages SET content = 'y' WHERE id = %s", (msg,))
        db_conn.execute("UPDATE barnum.messages SET status = 'read' WHERE id = %s", (msg,))
        assert await asyncio.wait_for(got.get(), 10) == f"status:{msg}:{contact}:read"
        db_conn.execute("SELECT barnum.notify_typing(%s, false)", (contact,))
        assert await asyncio.wait_for(got.get(), 10) == f"typing:{contact}:stop"
        # One transaction: delivered at its commit, in order.
        with db_conn.transaction():
            db_conn.execute("SELECT barnum.notify_typing(%s, true)", (contact,))
            db_conn.execute("UPDATE barnum.messages SET status = 'failed' WHERE id = %s", (msg,))
            db_conn.execute("UPDATE barnum.messages SET status = 'read' WHERE id = %s", (msg,))
        assert [await asyncio.wait_for(got.get(), 10) for _ in range(3)] == [
            f"typing:{contact}:start", f"status:{msg}:{contact}:failed", f"status:{msg}:{contact}:read"]
        # A rolled-back change announces nothing.
        with pytest.raises(psycopg.errors.RaiseException), db_conn.transaction():
            db_conn.execute("SELECT barnum.notify_typing(%s, true)", (contact,))
            db_conn.execute("DO $$ BEGIN RAISE EXCEPTION 'rollback'; END $$")
        db_conn.execute("SELECT pg_notify('barnum_realtime', 'marker')")
        assert await asyncio.wait_for(got.get(), 10) == "marker"
        # The shim leaves: quiet again.
        db_conn.execute("SELECT barnum.realtime_quiet('test-shim')")
        db_conn.execute("UPDATE barnum.messages SET status = 'failed' WHERE id = %s", (msg,))
        db_conn.execute("SELECT pg_notify('barnum_realtime', 'marker-2')")
        assert await asyncio.wait_for(got.get(), 10) == "marker-2"
    finally:
        await conn.close()


async def test_the_listen_connection_comes_back(rt: Running, db_conn: Conn) -> None:
    token = create_token(db_conn)
    inbound(rt, "wamid.RT-R1", "before")
    contact = contact_id(db_conn)
    realtime = realtime_of(rt)
    async with connected(rt, token) as probe:
        assert await probe.sio.call("join:conversation", contact, timeout=10) is True
        row = db_conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                              " WHERE application_name = 'barnum-shim-realtime'").fetchone()
        assert row == (True,)

        def relistening() -> bool:
            found = db_conn.execute("SELECT count(*) FROM pg_stat_activity"
                                    " WHERE application_name = 'barnum-shim-realtime'").fetchone()
            return realtime.listening and found == (1,)

        wait_until(relistening, message="the LISTEN connection re-opened")
        inbound(rt, "wamid.RT-R2", "after")
        assert (await probe.next("message:new"))["message"]["content"] == "after"


def notifications(outcome: str) -> float:
    value = REGISTRY.get_sample_value("barnum_realtime_notifications_total", {"outcome": outcome})
    return value or 0.0


async def test_nobody_watching_costs_no_query(rt: Running, db_conn: Conn) -> None:
    """With no conversation open anywhere the triggers send no NOTIFY at all
    (barnum.realtime_listeners is empty); once one is watched, its
    notifications are queued — and one no socket here watches is dropped on
    arrival, without a query."""
    token = create_token(db_conn)
    unwatched, queued = notifications("unwatched"), notifications("queued")
    inbound(rt, "wamid.RT-N1", "nobody looks")
    db_conn.execute("SELECT pg_notify('barnum_realtime', 'marker')")  # arrives after anything N1 sent
    wait_until(lambda: notifications("unwatched") > unwatched, message="the marker")
    assert notifications("unwatched") == unwatched + 1, "the message itself sent no NOTIFY"
    assert notifications("queued") == queued
    assert rt.client.get("/healthz").status_code == 200
    async with connected(rt, token) as probe:
        assert await probe.sio.call("join:conversation", contact_id(db_conn), timeout=10) is True
        inbound(rt, "wamid.RT-N2", "now someone does")
        await probe.next("message:new")
        assert notifications("queued") == queued + 1
        before = notifications("unwatched")
        inbound(rt, "wamid.RT-N3", "another contact", wa_id="351922000002")
        wait_until(lambda: notifications("unwatched") > before, message="the other contact's notification")
        assert notifications("queued") == queued + 1, "a conversation nobody here watches costs no query"


# ------------------------------------------------------------------ CORS


def test_cors_allows_only_the_configured_origins(db_url: str, db_conn: Conn) -> None:
    base = meta_config(db_url)
    config = Config(**{**base.__dict__, "cors_origins": ("http://localhost:3000",)})
    with realtime_shim(db_url, db_conn, config) as running:
        handshake = {"EIO": "4", "transport": "polling"}
        ok = running.client.get("/socket.io/", params=handshake, headers={"Origin": "http://localhost:3000"})
        assert ok.status_code == 200, ok.text
        assert ok.headers.get("access-control-allow-origin") == "http://localhost:3000"
        bad = running.client.get("/socket.io/", params=handshake, headers={"Origin": "http://evil.example"})
        assert bad.status_code == 400
        assert "access-control-allow-origin" not in bad.headers
        # No Origin (a server-side client): no CORS involved, served.
        assert running.client.get("/socket.io/", params=handshake).status_code == 200


def test_without_cors_origins_only_the_same_origin_is_served(db_url: str, db_conn: Conn) -> None:
    with realtime_shim(db_url, db_conn) as running:
        handshake = {"EIO": "4", "transport": "polling"}
        other = running.client.get("/socket.io/", params=handshake, headers={"Origin": "http://localhost:3000"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        same = running.url  # http://127.0.0.1:PORT, the Host httpx sends
        ok = running.client.get("/socket.io/", params=handshake, headers={"Origin": same})
        assert ok.status_code == 200 and ok.headers.get("access-control-allow-origin") == same
        # Everything else is the shim as before.
        assert running.client.get("/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{running.url}/socket.ionot", timeout=10).status_code == 404


# ------------------------------------------------------------------ units


def test_cors_origins_configuration() -> None:
    assert load({}).cors_origins == ()
    assert load({"BARNUM_CORS_ORIGINS": " http://localhost:3000, https://App.example.com/ ,"}).cors_origins == (
        "http://localhost:3000", "https://app.example.com")
    assert load({"BARNUM_CORS_ORIGINS": "*"}).cors_origins == ("*",)
    for bad in ("localhost:3000", "https://app.example.com/path", "ftp://x.example", "https://a b"):
        with pytest.raises(ConfigError, match="BARNUM_CORS_ORIGINS"):
            load({"BARNUM_CORS_ORIGINS": bad})


def test_payload_and_token_parsing() -> None:
    c, m = str(uuid.uuid4()), str(uuid.uuid4())
    assert contact_of(f"message:{m}:{c}") == c
    assert contact_of(f"status:{m}:{c}:read") == c
    assert contact_of(f"session:{m}:{c}:Completed") == c
    assert contact_of(f"typing:{c}:start") == c
    assert contact_of("marker") is None and contact_of("message:x") is None
    tok = "bnt_" + "a" * 43
    assert bearer_token({"token": tok}, {}) == tok
    assert bearer_token({"token": f"Bearer {tok}"}, {}) == tok
    assert bearer_token(None, {"HTTP_AUTHORIZATION": f"Bearer {tok}"}) == tok
    assert bearer_token({}, {"HTTP_AUTHORIZATION": f"Basic {tok}"}) is None
    assert bearer_token(None, {}) is None

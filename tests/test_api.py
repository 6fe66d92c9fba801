"""The webhook management REST API (SPEC-2 §A) over real HTTP against a real
PostgreSQL: every route, two accounts kept apart, bad input for each field.

Deliveries are produced by the shim's own ``POST /api/internal`` (one relay
pass in-process) to a receiver on 127.0.0.1, so the events history, retry,
replay and the receiver's ``webhook-delivery: abort`` are real too.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import TupleRow

from tests.receiver import Receiver, Reply
from tests.test_shim import INTERNAL, Running, make_config, running_shim

Conn = psycopg.Connection[TupleRow]


@dataclass
class World:
    shim: Running
    conn: Conn
    receiver: Receiver
    tokens: dict[str, str]

    def call(self, who: str | None, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if who is not None:
            headers["Authorization"] = f"Bearer {self.tokens[who]}"
        return self.shim.client.request(method, path, headers=headers, **kwargs)

    def relay_pass(self) -> dict[str, Any]:
        response = self.shim.client.post("/api/internal", headers={"Authorization": f"Bearer {INTERNAL}"})
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def endpoints(self) -> list[tuple[Any, ...]]:
        return self.conn.execute("SELECT * FROM barnum.webhook_endpoints ORDER BY id").fetchall()

    def emit(self, account: str, n: int = 1) -> list[str]:
        rows = self.conn.execute(
            """INSERT INTO barnum.whatsapp_events (event_type, entity_type, entity_id, account_id, data)
               SELECT 'endpoint.disabled', 'endpoint', gen_random_uuid(), a.id, '{"test": true}'
                 FROM barnum.accounts a, generate_series(1, %s) WHERE a.name = %s RETURNING id""",
            (n, account)).fetchall()
        return [str(r[0]) for r in rows]


def token(conn: Conn, account: str, name: str = "ci", scopes: list[str] | None = None) -> str:
    row = conn.execute("SELECT barnum.api_token_create(%s, %s, %s)", (account, name, scopes)).fetchone()
    assert row is not None
    return str(row[0]["token"])


@pytest.fixture
def world(db_url: str, db_conn: Conn) -> Iterator[World]:
    for account in ("acme", "globex"):
        db_conn.execute("SELECT barnum.account_add(%s)", (account,))
    tokens = {"acme": token(db_conn, "acme"), "globex": token(db_conn, "globex"),
              "acme-ro": token(db_conn, "acme", "dashboard", ["webhooks:read"])}
    receiver = Receiver([]).start()
    receiver.unsigned("/")
    try:
        with running_shim(make_config(db_url)) as shim:
            yield World(shim, db_conn, receiver, tokens)
    finally:
        receiver.stop()


def register(world: World, who: str, phone: str, path: str = "/hook", **extra: Any) -> httpx.Response:
    return world.call(who, "POST", "/api/webhooks/register",
                      json={"phone_number": phone, "webhook_url": world.receiver.url(path), **extra})


def error_of(response: httpx.Response) -> tuple[int, str]:
    doc = response.json()
    assert doc["success"] is False and doc["error"]["message"], doc
    return response.status_code, doc["error"]["code"]


# ------------------------------------------------------------------ CRUD


def test_register_list_get_update_delete(world: World) -> None:
    created = register(world, "acme", "+351911111111", metadata={"team": "ops"})
    assert created.status_code == 201, created.text
    hook = created.json()["data"]["webhook"]
    assert hook["phone_number"] == "351911111111" and hook["max_retries"] == 3 and hook["timeout_ms"] == 10000
    assert hook["status"] == "active" and hook["secret"].startswith("whsec_")
    assert created.headers["content-type"] == "application/json"

    again = register(world, "acme", "351911111111", path="/v2", max_retries=5)
    assert again.status_code == 200
    updated = again.json()["data"]["webhook"]
    assert updated["id"] == hook["id"] and updated["webhook_url"].endswith("/v2") and updated["max_retries"] == 5
    assert "secret" not in updated and updated["metadata"] == {"team": "ops"}

    listed = world.call("acme", "GET", "/api/webhooks/list")
    assert listed.status_code == 200
    assert [w["id"] for w in listed.json()["data"]["webhooks"]] == [hook["id"]]

    got = world.call("acme-ro", "GET", f"/api/webhooks/{hook['id']}")
    assert got.status_code == 200 and got.json()["data"]["webhook"]["webhook_url"].endswith("/v2")

    patched = world.call("acme", "PATCH", f"/api/webhooks/{hook['id']}", json={"is_active": False})
    assert patched.status_code == 200 and patched.json()["data"]["webhook"]["status"] == "inactive"
    rotated = world.call("acme", "PATCH", f"/api/webhooks/{hook['id']}", json={"rotate_secret": True})
    assert rotated.json()["data"]["webhook"]["secret"] not in (None, hook["secret"])

    deleted = world.call("acme", "DELETE", f"/api/webhooks/{hook['id']}")
    assert deleted.status_code == 200 and deleted.json()["data"] == {"deleted": True, "id": hook["id"]}
    assert error_of(world.call("acme", "GET", f"/api/webhooks/{hook['id']}")) == (404, "NOT_FOUND")


# ------------------------------------------------------------------ auth


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Basic dXNlcjpwYXNz", "Bearer garbage",
    "Bearer bnt_" + "A" * 43, "bearer bnt_" + "B" * 43, "Bearer bnt_" + "é" * 43,
])
def test_missing_or_bad_tokens_are_401(world: World, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization.encode("utf-8")}
    before = world.endpoints()
    for method, path, body in (("GET", "/api/webhooks/list", None),
                               ("POST", "/api/webhooks/register", {"phone_number": "351900000000",
                                                                  "webhook_url": "https://x.example/h"})):
        response = world.shim.client.request(method, path, headers=headers, json=body)
        assert error_of(response) == (401, "UNAUTHORIZED"), (authorization, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert world.endpoints() == before


def test_revoked_token_and_missing_scope(world: World) -> None:
    assert register(world, "acme", "351911111111").status_code == 201
    refused = register(world, "acme-ro", "351922222222")
    assert error_of(refused) == (403, "FORBIDDEN")
    assert "webhooks:write" in refused.json()["error"]["message"]
    world.conn.execute("UPDATE barnum.api_tokens SET revoked_at = now() WHERE name = 'ci'")
    assert error_of(world.call("acme", "GET", "/api/webhooks/list")) == (401, "UNAUTHORIZED")
    assert error_of(world.call("globex", "GET", "/api/webhooks/list")) == (401, "UNAUTHORIZED")


# ------------------------------------------------------------------ isolation


def test_two_accounts_never_see_each_other(world: World) -> None:
    mine = register(world, "acme", "351911111111").json()["data"]["webhook"]
    theirs = register(world, "globex", "351911111111").json()["data"]["webhook"]
    assert mine["id"] != theirs["id"], "the same number in two accounts is two webhooks"
    [event] = world.emit("globex")
    world.relay_pass()
    before = world.endpoints()
    other = theirs["id"]
    nobody = str(uuid.uuid4())
    for method, template, body in (
        ("GET", "/api/webhooks/{}", None),
        ("PATCH", "/api/webhooks/{}", {"is_active": False}),
        ("DELETE", "/api/webhooks/{}", None),
        ("GET", "/api/webhooks/{}/events", None),
        ("POST", "/api/webhooks/{}/replay", {"since": "2020-01-01T00:00:00Z"}),
        ("POST", "/api/webhooks/events/{}/retry", None),
    ):
        target = event if "events/{}" in template else other
        response = world.call("acme", method, template.format(target), json=body)
        assert error_of(response) == (404, "NOT_FOUND"), (method, template, response.text)
        # Indistinguishable from an id that exists nowhere: existence is not revealed.
        missing = world.call("acme", method, template.format(nobody), json=body)
        assert response.text.replace(target, "ID") == missing.text.replace(nobody, "ID")
    assert world.endpoints() == before
    listed = world.call("acme", "GET", "/api/webhooks/list").json()["data"]["webhooks"]
    assert [w["id"] for w in listed] == [mine["id"]]
    assert [h.event_id for h in world.receiver.snapshot()] == [event], "globex's event reached only globex's webhook"


# ------------------------------------------------------------------ bad input


BAD_REGISTRATIONS: list[tuple[str, Any, int]] = [
    ("no phone_number", {"webhook_url": "https://a.example/h"}, 400),
    ("no webhook_url", {"phone_number": "351933333333"}, 400),
    ("unknown field", {"phone_number": "351933333333", "webhook_url": "https://a.example/h", "url": "x"}, 400),
    ("phone too short", {"phone_number": "123", "webhook_url": "https://a.example/h"}, 422),
    ("phone with letters", {"phone_number": "35193333333a", "webhook_url": "https://a.example/h"}, 422),
    ("phone as number", {"phone_number": 351933333333, "webhook_url": "https://a.example/h"}, 422),
    ("http to a public host", {"phone_number": "351933333333", "webhook_url": "http://a.example/h"}, 422),
    ("userinfo posing as loopback", {"phone_number": "351933333333", "webhook_url": "http://x?@127.0.0.1/"}, 422),
    ("fragment trick", {"phone_number": "351933333333", "webhook_url": "http://evil#@localhost/"}, 422),
    ("not a URL", {"phone_number": "351933333333", "webhook_url": "hooks.example"}, 422),
    ("URL not a string", {"phone_number": "351933333333", "webhook_url": ["https://a.example"]}, 422),
    ("max_retries negative", {"phone_number": "351933333333", "webhook_url": "https://a.example/h", "max_retries": -1}, 422),
    ("max_retries too big", {"phone_number": "351933333333", "webhook_url": "https://a.example/h", "max_retries": 99}, 422),
    ("max_retries a string", {"phone_number": "351933333333", "webhook_url": "https://a.example/h", "max_retries": "3"}, 422),
    ("metadata a list", {"phone_number": "351933333333", "webhook_url": "https://a.example/h", "metadata": []}, 422),
    ("event_types a string", {"phone_number": "351933333333", "webhook_url": "https://a.example/h",
                              "event_types": "message.*"}, 422),
    ("unknown event type", {"phone_number": "351933333333", "webhook_url": "https://a.example/h",
                            "event_types": ["nonsense"]}, 422),
]


@pytest.mark.parametrize("label,body,status", BAD_REGISTRATIONS, ids=[b[0] for b in BAD_REGISTRATIONS])
def test_bad_registrations_are_precise_and_change_nothing(world: World, label: str, body: Any, status: int) -> None:
    before = world.endpoints()
    response = world.call("acme", "POST", "/api/webhooks/register", json=body)
    assert response.status_code == status, (label, response.text)
    assert response.json()["success"] is False and response.json()["error"]["message"]
    assert world.endpoints() == before


def test_malformed_requests(world: World) -> None:
    hook = register(world, "acme", "351911111111").json()["data"]["webhook"]
    before = world.endpoints()
    post = world.call
    assert error_of(post("acme", "POST", "/api/webhooks/register", content=b"{nope",
                         headers={"Content-Type": "application/json"})) == (400, "BAD_REQUEST")
    assert error_of(post("acme", "POST", "/api/webhooks/register", content=b"[]",
                         headers={"Content-Type": "application/json"})) == (400, "BAD_REQUEST")
    assert error_of(post("acme", "POST", "/api/webhooks/register", content=b"{}",
                         headers={"Content-Type": "text/plain"})) == (415, "UNSUPPORTED_MEDIA_TYPE")
    assert error_of(post("acme", "POST", "/api/webhooks/register", content=b"{" + b" " * 70_000 + b"}",
                         headers={"Content-Type": "application/json"})) == (413, "PAYLOAD_TOO_LARGE")
    assert error_of(post("acme", "PATCH", f"/api/webhooks/{hook['id']}", json={})) == (400, "BAD_REQUEST")
    assert error_of(post("acme", "PATCH", f"/api/webhooks/{hook['id']}", json={"is_active": "no"})) == (422, "UNPROCESSABLE")
    assert error_of(post("acme", "PATCH", f"/api/webhooks/{hook['id']}", json={"colour": "red"})) == (400, "BAD_REQUEST")
    assert error_of(post("acme", "GET", "/api/webhooks/not-a-uuid")) == (404, "NOT_FOUND")
    assert error_of(post("acme", "GET", f"/api/webhooks/{hook['id']}/events?limit=0")) == (422, "UNPROCESSABLE")
    assert error_of(post("acme", "GET", f"/api/webhooks/{hook['id']}/events?limit=ten")) == (422, "UNPROCESSABLE")
    assert error_of(post("acme", "GET", f"/api/webhooks/{hook['id']}/events?cursor=x")) == (422, "UNPROCESSABLE")
    assert error_of(post("acme", "GET", f"/api/webhooks/{hook['id']}/events?page=2")) == (400, "BAD_REQUEST")
    assert error_of(post("acme", "POST", f"/api/webhooks/{hook['id']}/replay",
                         json={"since": "last week"})) == (422, "UNPROCESSABLE")
    assert error_of(post("acme", "POST", "/api/webhooks/events/not-a-uuid/retry")) == (404, "NOT_FOUND")
    assert error_of(post("acme", "PUT", f"/api/webhooks/{hook['id']}", json={})) == (405, "METHOD_NOT_ALLOWED")
    assert world.endpoints() == before


# ------------------------------------------------------------------ history, retry, replay, health


def test_events_history_retry_and_replay(world: World) -> None:
    hook = register(world, "acme", "351911111111", path="/flaky", max_retries=0).json()["data"]["webhook"]
    world.receiver.on("/flaky", Reply(500, body="down for maintenance"))
    events = world.emit("acme", 3)
    world.relay_pass()
    page = world.call("acme", "GET", f"/api/webhooks/{hook['id']}/events?limit=2")
    assert page.status_code == 200
    data = page.json()["data"]
    assert len(data["events"]) == 2 and data["next_cursor"]
    first = data["events"][0]
    assert first["status"] == "dead_letter" and first["http_status"] == 500
    assert first["response"] == "down for maintenance" and first["attempt_count"] == 1
    assert first["attempts"][0]["http_status"] == 500
    rest = world.call("acme", "GET", f"/api/webhooks/{hook['id']}/events?limit=2&cursor={data['next_cursor']}")
    assert [e["event_id"] for e in rest.json()["data"]["events"]] == [events[0]]
    assert rest.json()["data"]["next_cursor"] is None
    assert sorted(e["event_id"] for e in data["events"] + rest.json()["data"]["events"]) == sorted(events)

    world.receiver.on("/flaky", Reply(200))
    retried = world.call("acme", "POST", f"/api/webhooks/events/{events[0]}/retry")
    assert retried.status_code == 200 and retried.json()["data"]["retried"] == 1
    assert error_of(world.call("acme", "POST", f"/api/webhooks/events/{events[0]}/retry")) == (409, "CONFLICT")
    world.relay_pass()
    replay = world.call("acme", "POST", f"/api/webhooks/{hook['id']}/replay",
                        json={"since": "2000-01-01T00:00:00Z"})
    assert error_of(replay) == (422, "UNPROCESSABLE"), "more than 31 days"
    row = world.conn.execute("SELECT min(created_at) - interval '1 minute' FROM barnum.whatsapp_events").fetchone()
    assert row is not None
    replay = world.call("acme", "POST", f"/api/webhooks/{hook['id']}/replay", json={"since": row[0].isoformat()})
    assert replay.status_code == 200 and replay.json()["data"]["requeued"] == 2
    world.relay_pass()
    statuses = [e["status"] for e in world.call("acme", "GET", f"/api/webhooks/{hook['id']}/events").json()["data"]["events"]]
    assert statuses == ["sent", "sent", "sent"]


def test_receiver_abort_stops_retries_and_410_disables(world: World) -> None:
    other = register(world, "acme", "351922222222", path="/other").json()["data"]["webhook"]
    hook = register(world, "acme", "351911111111", path="/abort").json()["data"]["webhook"]
    world.receiver.on("/abort", Reply(503, headers={"webhook-delivery": "abort"}))
    world.receiver.on("/other", Reply(200))
    world.emit("acme")
    world.relay_pass()
    history = world.call("acme", "GET", f"/api/webhooks/{hook['id']}/events").json()["data"]["events"]
    assert history[0]["status"] == "dead_letter" and history[0]["attempt_count"] == 1, "a 503 with abort is final"
    assert "abort" in history[0]["error"]

    world.receiver.on("/abort", Reply(410))
    world.emit("acme")
    world.relay_pass()
    got = world.call("acme", "GET", f"/api/webhooks/{hook['id']}").json()["data"]["webhook"]
    assert got["status"] == "failed" and got["is_active"] is False
    # The account's other webhook hears about it.
    world.relay_pass()
    notices = [h for h in world.receiver.snapshot("/other") if h.event_type == "endpoint.disabled"
               and h.json.get("data", {}).get("endpoint_id") == hook["id"]]
    assert len(notices) == 1 and notices[0].json["data"]["reason"] == "the receiver answered 410 Gone"
    # Enabling again resets it.
    enabled = world.call("acme", "PATCH", f"/api/webhooks/{hook['id']}", json={"is_active": True})
    assert enabled.json()["data"]["webhook"]["status"] == "active"
    assert enabled.json()["data"]["webhook"]["failure_count"] == 0
    assert other["id"] != hook["id"]


def test_deliveries_are_signed_with_the_webhooks_own_secret(world: World) -> None:
    hook = register(world, "acme", "351911111111", path="/signed").json()["data"]["webhook"]
    key = base64.b64decode(hook["secret"].removeprefix("whsec_"))
    world.receiver.keys_for("/signed", [key])
    world.emit("acme")
    world.relay_pass()
    [hit] = world.receiver.snapshot("/signed")
    assert hit.std_ok and hit.hex_ok, "verifies with the secret the API returned"
    assert json.loads(hit.body)["event_type"] == "endpoint.disabled"


# ------------------------------------------------------------------ CLI: accounts and tokens


def test_cli_accounts_and_tokens_end_to_end(db_url: str, db_conn: Conn) -> None:
    from tests.test_admin import barnum

    added = barnum("accounts", "add", "initech", url=db_url)
    assert added.returncode == 0 and "barnum tokens create --account initech" in added.stdout
    dup = barnum("accounts", "add", "initech", url=db_url)
    assert dup.returncode == 2 and "exists already" in dup.stderr
    missing = barnum("tokens", "create", "--account", "nobody", "--name", "ci", url=db_url)
    assert missing.returncode == 2 and "barnum accounts add" in missing.stderr
    bad_scope = barnum("tokens", "create", "--account", "initech", "--name", "ci", "--scopes", "admin", url=db_url)
    assert bad_scope.returncode == 2 and "webhooks:read" in bad_scope.stderr

    created = barnum("tokens", "create", "--account", "initech", "--name", "ci", url=db_url)
    assert created.returncode == 0, created.stderr
    plain = created.stdout.strip()
    assert plain.startswith("bnt_") and "cannot be shown again" in created.stderr
    listed = barnum("tokens", "list", "--json", url=db_url)
    assert listed.returncode == 0 and plain not in listed.stdout
    [row] = [t for t in json.loads(listed.stdout) if t["account"] == "initech"]

    with running_shim(make_config(db_url)) as shim:
        auth = {"Authorization": f"Bearer {plain}"}
        assert shim.client.get("/api/webhooks/list", headers=auth).status_code == 200
        revoked = barnum("tokens", "revoke", row["id"], url=db_url)
        assert revoked.returncode == 0 and "revoked" in revoked.stdout
        assert shim.client.get("/api/webhooks/list", headers=auth).status_code == 401
    unknown = barnum("tokens", "revoke", "not-an-id", url=db_url)
    assert unknown.returncode == 2 and "no token" in unknown.stderr
    accounts = barnum("accounts", "list", "--json", url=db_url)
    assert {a["name"] for a in json.loads(accounts.stdout)} >= {"default", "initech"}


def test_openapi_describes_the_management_api(world: World) -> None:
    doc = world.shim.client.get("/openapi.json").json()
    for path, method in (("/api/webhooks/register", "post"), ("/api/webhooks/list", "get"),
                         ("/api/webhooks/{id}", "patch"), ("/api/webhooks/{id}/events", "get"),
                         ("/api/webhooks/events/{event_id}/retry", "post"), ("/api/webhooks/{id}/replay", "post")):
        op = doc["paths"][path][method]
        assert op["security"] == [{"apiToken": []}] and "401" in op["responses"], path
    assert doc["components"]["securitySchemes"]["apiToken"]["scheme"] == "bearer"
    assert "/api/webhook" in doc["paths"], "the callbacks are still described"

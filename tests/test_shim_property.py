"""Property test of the callback endpoint (issue 4): whatever arrives at
``/api/webhook`` — random bytes, random JSON, random headers and signatures,
and correctly signed random objects with random actions and fields — the
shim never answers 5xx, and a rejected (non-2xx) request changes nothing.

In-process (``httpx.ASGITransport``) for speed, against a real database.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import string
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from listener.db import create_pool
from listener.shim import CALLBACK_ACTIONS, WEBHOOK_ALIASES, create_app
from tests.test_shim import OLD_KEY, SECRET, Conn, make_config, seed, snapshot


@dataclass
class World:
    runner: asyncio.Runner
    client: httpx.AsyncClient
    conn: Conn
    ids: list[str]


@pytest.fixture
def world(db_url: str, db_conn: Conn) -> Iterator[World]:
    future = datetime.now(timezone.utc) + timedelta(days=5)
    scheduled = seed(db_conn, starts_at=future)
    no_show = seed(db_conn, patient="Nuno", starts_at=future)
    completed = seed(db_conn, patient="Carla", starts_at=future)
    db_conn.execute("UPDATE barnum.appointments SET status = 'no_show' WHERE id = %s", (no_show.id,))
    db_conn.execute("UPDATE barnum.appointments SET status = 'completed' WHERE id = %s", (completed.id,))
    ids = [scheduled.id, no_show.id, completed.id, scheduled.patient_id, completed.patient_id]

    runner = asyncio.Runner()
    pool = runner.run(create_pool(db_url, min_size=1, max_size=2))
    app = create_app(make_config(db_url), pool=pool)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shim.test")
    try:
        yield World(runner, client, db_conn, ids)
    finally:
        runner.run(client.aclose())
        runner.run(pool.close())
        runner.close()


# ------------------------------------------------------------------ strategies

HEADER_TEXT = st.text(alphabet=string.ascii_letters + string.digits + " -_=,.;:/+", max_size=40)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)

FIELDS = ("appointmentId", "patientId", "patientResponse", "reason", "newDate", "newTime", "attempt",
          "workflowType", "status", "reviewSubmitted", "rating")


def field_values(ids: list[str]) -> st.SearchStrategy[Any]:
    return st.one_of(
        json_values,
        st.sampled_from(ids),
        st.uuids().map(str),
        st.sampled_from(["2027-03-28", "2027-02-30", "2027-13-01", "1999-01-01", "2027-3-1", "9999-12-31",
                         "0000-01-01", "10:00", "01:30", "24:00", "23:59", "9:00"]),
        st.integers(min_value=-3, max_value=8),
        st.booleans(),
    )


def callback_objects(ids: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    values = field_values(ids)
    return st.fixed_dictionaries(
        {},
        optional={
            "action": st.sampled_from([*CALLBACK_ACTIONS, "", "CONFIRM", "delete"]) | json_values,
            **{name: values for name in FIELDS},
        },
    )


@st.composite
def plausible_callbacks(draw: st.DrawFn, ids: list[str]) -> dict[str, Any]:
    """Mostly well-formed callbacks for the seeded entities, each field
    sometimes dropped or replaced by a random value."""
    scheduled, no_show, completed, patient_a, patient_b = ids
    appointment = st.sampled_from([scheduled, no_show, completed])
    templates: dict[str, dict[str, st.SearchStrategy[Any]]] = {
        "confirm": {"appointmentId": appointment, "patientResponse": st.text(max_size=10)},
        "cancel": {"appointmentId": appointment, "reason": st.text(max_size=10)},
        "reschedule": {"appointmentId": appointment,
                       "newDate": st.dates(min_value=date(2027, 1, 1), max_value=date(2028, 12, 31)).map(str),
                       "newTime": st.times().map(lambda t: t.strftime("%H:%M"))},
        "no_show_reschedule": {"appointmentId": appointment, "attempt": st.integers(0, 4)},
        "reactivation": {"patientId": st.sampled_from([patient_a, patient_b]), "workflowType": st.text(max_size=10),
                         "status": st.sampled_from(["completed", "declined"])},
        "review": {"appointmentId": appointment, "reviewSubmitted": st.booleans(), "rating": st.integers(0, 6)},
    }
    action = draw(st.sampled_from(CALLBACK_ACTIONS))
    body: dict[str, Any] = {"action": action}
    for name, values in templates[action].items():
        fate = draw(st.sampled_from(["keep"] * 8 + ["drop", "random"]))
        if fate == "keep":
            body[name] = draw(values)
        elif fate == "random":
            body[name] = draw(field_values(ids))
    return body


ALIAS_OF = {action: path for path, action in WEBHOOK_ALIASES.items()}

EDGE_BODIES = [
    b"", b"null", b"{}", b"[]", b'"text"', b"{", b'{"a": NaN}', b'{"a": Infinity}', b'{"s": "\\u0000"}',
    b'{"s": "\\ud800"}', b'{"n": 1e999999}', b'{"n": -1e-999999}', b"[" * 3000 + b"]" * 3000,
    b"\xef\xbb\xbf{}", b'{"action": "confirm"}\x00', b'{"action": "confirm", "appointmentId": null}',
    b'{"action": "review", "appointmentId": "00000000-0000-0000-0000-000000000000", "reviewSubmitted": true}',
    json.dumps({"action": "confirm", "n": 10 ** 40}).encode(), b'{"action":"confirm","a":' + b"9" * 5000 + b"}",
]


@st.composite
def requests(draw: st.DrawFn, ids: list[str]) -> dict[str, Any]:
    path = draw(st.sampled_from(["/api/webhook"] * 3 + list(WEBHOOK_ALIASES)))
    kind = draw(st.sampled_from(["bytes", "json", "object", "object", "plausible", "plausible", "plausible", "edge"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=200))
    elif kind == "json":
        body = json.dumps(draw(json_values)).encode()
    elif kind == "object":
        body = json.dumps(draw(callback_objects(ids)), ensure_ascii=draw(st.booleans())).encode()
    elif kind == "plausible":
        obj = draw(plausible_callbacks(ids))
        if draw(st.booleans()):  # the seed's per-action path, action implied
            path = ALIAS_OF[obj.pop("action")]
        body = json.dumps(obj).encode()
    else:
        body = draw(st.sampled_from(EDGE_BODIES))

    headers: dict[str, str] = {}
    ctype = draw(st.sampled_from([
        *["application/json"] * 12, "application/json; charset=utf-8", "APPLICATION/JSON",
        "text/plain", "application/json; charset=latin-1", None, "multipart/form-data", "random",
    ]))
    if ctype == "random":
        ctype = draw(HEADER_TEXT)
    if ctype is not None:
        headers["Content-Type"] = ctype

    signature = draw(st.sampled_from(
        ["hex"] * 6 + ["hex_prefix", "standard", "standard", "standard", "none", "garbage", "wrong_secret",
                       "stale", "future"]))
    msg_id = draw(st.sampled_from(["msg_1", "msg_2"]) | st.uuids().map(str) | HEADER_TEXT.filter(str.strip))
    now = int(time.time())
    if signature in ("hex", "hex_prefix", "wrong_secret"):
        key = b"wrong" if signature == "wrong_secret" else SECRET.encode()
        digest = hmac.new(key, body, hashlib.sha256).hexdigest()
        headers["X-Webhook-Signature"] = ("sha256=" if signature == "hex_prefix" else "") + digest
    elif signature in ("standard", "stale", "future"):
        ts = now + {"standard": 0, "stale": -400, "future": 400}[signature]
        mac = hmac.new(OLD_KEY, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
        headers.update({"webhook-id": msg_id, "webhook-timestamp": str(ts),
                        "webhook-signature": "v1," + base64.b64encode(mac).decode()})
    elif signature == "garbage":
        headers["X-Webhook-Signature"] = draw(HEADER_TEXT)
        if draw(st.booleans()):
            headers.update({"webhook-id": msg_id, "webhook-timestamp": draw(HEADER_TEXT),
                            "webhook-signature": draw(HEADER_TEXT)})

    idem = draw(st.sampled_from([None, None, None, "k1", "k2", "random", "long"]))
    if idem == "random":
        idem = draw(HEADER_TEXT)
    elif idem == "long":
        idem = draw(st.text(alphabet="ab", min_size=250, max_size=260))
    if idem is not None:
        headers["X-Idempotency-Key"] = idem
    return {"path": path, "content": body, "headers": headers}


# ------------------------------------------------------------------ the property


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_random_callbacks_never_5xx_and_rejections_change_nothing(world: World, data: st.DataObject) -> None:
    request = data.draw(requests(world.ids))
    before = snapshot(world.conn)
    response = world.runner.run(
        world.client.post(request["path"], content=request["content"], headers=request["headers"]))
    message = response.json().get("error", {}).get("message", "") if response.status_code >= 300 else ""
    event(f"HTTP {response.status_code} {message[:30]}")
    assert response.status_code < 500, (response.status_code, response.text)
    doc = response.json()
    if 200 <= response.status_code < 300:
        assert doc["success"] is True and "message" in doc and "data" in doc
    else:
        assert doc["success"] is False and doc["error"]["code"] and doc["error"]["message"]
        assert snapshot(world.conn) == before, (response.status_code, doc)


def test_a_signed_valid_callback_is_accepted(world: World) -> None:
    """Guard against a vacuous property: the generator's signing is right."""
    body = json.dumps({"action": "confirm", "appointmentId": world.ids[0], "nonce": uuid.uuid4().hex}).encode()
    headers = {"Content-Type": "application/json",
               "X-Webhook-Signature": hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()}
    response = world.runner.run(world.client.post("/api/webhook", content=body, headers=headers))
    assert response.status_code == 200, response.text

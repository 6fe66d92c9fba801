"""The shipped n8n workflows (integrations/n8n): structure and logic, offline.

No n8n is needed (the real-n8n proof is scripts/e2e-n8n). What runs here:

* both JSON files parse, hold the required nodes, connections that name
  existing nodes, node types/versions that n8n 2.8.4 has (checked against the
  installed n8n's node list when scripts/e2e-n8n has put one in the cache);
* the JSON files are what ``integrations/n8n/build.py`` makes from ``src/*.js``;
* the Code nodes' JavaScript, extracted from the JSON and run by ``node`` in
  a small harness that mimics n8n's Code node, agrees with listener.signing on
  shared vectors (valid, wrong, rotated, whsec_, stale, tampered…), and the
  reply handler's Standard Webhooks signatures are accepted by
  ``listener.signing.verify_callback``;
* every per-type WhatsApp message expression, evaluated like n8n does, gives a
  Cloud API message with the appointment, the professional and the links.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from listener.signing import (
    hex_signature,
    outbound_headers,
    parse_secrets,
    verify_callback,
    verify_hex,
    verify_standard,
)
from tests.e2e.fakes import FakeGraphAPI, SentMessage

REPO = Path(__file__).resolve().parent.parent
N8N_DIR = REPO / "integrations" / "n8n"
N8N_VERSION = "2.8.4"

#: Node types (and typeVersions) of n8n 2.8.4's n8n-nodes-base that the
#: workflows may use — from its dist/types/nodes.json.
KNOWN_NODE_TYPES: dict[str, set[float]] = {
    "n8n-nodes-base.webhook": {1, 1.1, 2, 2.1},
    "n8n-nodes-base.code": {1, 2},
    "n8n-nodes-base.if": {1, 2, 2.1, 2.2, 2.3},
    "n8n-nodes-base.switch": {1, 2, 3, 3.1, 3.2, 3.3, 3.4},
    "n8n-nodes-base.httpRequest": {1, 2, 3, 4, 4.1, 4.2, 4.3, 4.4},
    "n8n-nodes-base.respondToWebhook": {1, 1.1, 1.2, 1.3, 1.4, 1.5},
    "n8n-nodes-base.noOp": {1},
    "n8n-nodes-base.stickyNote": {1},
}

EVENT_TYPES = [
    "appointment.pre_confirmed", "appointment.reminder", "appointment.no_show", "appointment.completed",
    "appointment.confirmed", "appointment.cancelled", "appointment.rescheduled", "patient.reactivation",
]

# ----------------------------------------------------------------- harness

HARNESS = r"""
// Runs n8n Code-node JavaScript and n8n expressions the way n8n does, enough
// for these tests: $input.all()/first(), $env, require, global "helpers"
// (task-runner style) with getBinaryDataBuffer; "={{ … }}" expressions.
const AsyncFunction = Object.getPrototypeOf(async function () {}).constructor;
const crypto = require('crypto');

function inputOf(items) {
  return { all: () => items, first: () => items[0], last: () => items[items.length - 1], item: items[0] };
}

async function runCode(job) {
  const items = job.items;
  let helpers;
  if (job.helpers) {
    helpers = {
      getBinaryDataBuffer: async (index, prop) => Buffer.from(items[index].binary[prop].data, 'base64'),
    };
  }
  const staticData = job.staticData || {};
  const $getWorkflowStaticData = (kind) => staticData;
  const $ = (name) => inputOf((job.nodes || {})[name] || []);
  const fn = new AsyncFunction('$input', '$env', 'require', 'helpers', 'items', '$getWorkflowStaticData', '$',
                               job.code);
  const result = await fn.call({}, inputOf(items), job.env || {}, require, helpers, items,
                               $getWorkflowStaticData, $);
  return job.staticData ? { result, staticData } : result;
}

function evalExpr(expr, $json, $env) {
  return new Function('$json', '$env', '"use strict"; return (' + expr + ');')($json, $env);
}

function evalParam(value, $json, $env) {
  if (typeof value !== 'string' || !value.startsWith('=')) return value;
  const tpl = value.slice(1);
  const whole = /^\{\{([\s\S]*)\}\}$/.exec(tpl.trim());
  if (whole && !whole[1].includes('}}')) return evalExpr(whole[1], $json, $env);
  return tpl.replace(/\{\{([\s\S]*?)\}\}/g, (_, e) => String(evalExpr(e, $json, $env)));
}

async function main() {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  const jobs = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  const out = [];
  for (const job of jobs) {
    try {
      if (job.kind === 'code') out.push({ ok: true, value: await runCode(job) });
      else out.push({ ok: true, value: evalParam(job.value, job.json, job.env || {}) });
    } catch (e) {
      out.push({ ok: false, error: String(e && e.stack || e) });
    }
  }
  process.stdout.write(JSON.stringify(out));
}
main();
"""


@pytest.fixture(scope="module")
def node_bin() -> str:
    found = shutil.which("node")
    if not found:
        pytest.fail("`node` (Node.js >= 18) is required to test the n8n Code nodes' JavaScript; "
                    "install nodejs (apt-get install nodejs) and re-run", pytrace=False)
    return found


@pytest.fixture(scope="module")
def run_jobs(node_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    harness = tmp_path_factory.mktemp("n8n") / "harness.js"
    harness.write_text(HARNESS, encoding="utf-8")

    def run(jobs: list[dict[str, Any]]) -> list[Any]:
        proc = subprocess.run([node_bin, str(harness)], input=json.dumps(jobs).encode(),
                              capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        results = json.loads(proc.stdout)
        for job, res in zip(jobs, results):
            assert res["ok"], f"{job.get('label', job['kind'])}: {res['error']}"
        return [r["value"] for r in results]

    return run


# ----------------------------------------------------------------- loading


def load(name: str) -> dict[str, Any]:
    doc = json.loads((N8N_DIR / name).read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def nodes_by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in doc["nodes"]}


def one(doc: dict[str, Any], node_type: str, **params: Any) -> dict[str, Any]:
    found = [n for n in doc["nodes"] if n["type"] == node_type
             and all(n["parameters"].get(k) == v for k, v in params.items())]
    assert len(found) == 1, f"expected one {node_type} {params}, found {[n['name'] for n in found]}"
    node: dict[str, Any] = found[0]
    return node


def targets(doc: dict[str, Any], source: str, output: int = 0) -> list[str]:
    outputs = doc["connections"].get(source, {}).get("main", [])
    return [c["node"] for c in outputs[output]] if output < len(outputs) else []


def code_of(doc: dict[str, Any], name: str) -> str:
    node = nodes_by_name(doc)[name]
    assert node["type"] == "n8n-nodes-base.code"
    return str(node["parameters"]["jsCode"])


@pytest.fixture(scope="module")
def sender() -> dict[str, Any]:
    return load("event-sender.json")


@pytest.fixture(scope="module")
def replies() -> dict[str, Any]:
    return load("reply-handler.json")


# ----------------------------------------------------------------- structure


@pytest.mark.parametrize("name", ["event-sender.json", "reply-handler.json"])
def test_workflow_is_well_formed(name: str) -> None:
    doc = load(name)
    assert doc["name"] and doc["nodes"] and isinstance(doc["connections"], dict)
    names = [n["name"] for n in doc["nodes"]]
    assert len(names) == len(set(names)), "node names must be unique"
    ids = [n["id"] for n in doc["nodes"]]
    assert len(ids) == len(set(ids)), "node ids must be unique"
    for node in doc["nodes"]:
        assert node["type"] in KNOWN_NODE_TYPES, f"{node['name']}: unknown node type {node['type']}"
        assert node["typeVersion"] in KNOWN_NODE_TYPES[node["type"]], f"{node['name']}: typeVersion"
        assert isinstance(node["parameters"], dict)
        assert len(node["position"]) == 2
    for source, kinds in doc["connections"].items():
        assert source in names, f"connection from unknown node {source}"
        for outputs in kinds.values():
            for output in outputs:
                for c in output:
                    assert c["node"] in names, f"connection to unknown node {c['node']}"
    # Every node but the triggers is reachable from a trigger.
    reached = {n["name"] for n in doc["nodes"] if n["type"] == "n8n-nodes-base.webhook"}
    frontier = list(reached)
    while frontier:
        for kind in doc["connections"].get(frontier.pop(), {}).values():
            for output in kind:
                for c in output:
                    if c["node"] not in reached:
                        reached.add(c["node"])
                        frontier.append(c["node"])
    assert reached == set(names), f"unreachable nodes: {set(names) - reached}"


def _installed_nodes_json() -> Path | None:
    base = os.environ.get("BARNUM_N8N_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "barnum" / f"n8n-{N8N_VERSION}")
    path = Path(base) / "node_modules" / "n8n-nodes-base" / "dist" / "types" / "nodes.json"
    return path if path.is_file() else None


def test_node_types_exist_in_installed_n8n() -> None:
    path = _installed_nodes_json()
    if path is None:
        pytest.skip("no n8n 2.8.4 in the cache (scripts/e2e-n8n --install-only puts one there); "
                    "checked against the built-in list instead")
    versions: dict[str, set[float]] = {}
    for desc in json.loads(path.read_text(encoding="utf-8")):
        v = desc.get("version", 1)
        versions.setdefault("n8n-nodes-base." + desc["name"], set()).update(v if isinstance(v, list) else [v])
    for name in ("event-sender.json", "reply-handler.json"):
        for node in load(name)["nodes"]:
            assert node["type"] in versions, f"{name}: {node['type']} is not in n8n's node list"
            assert node["typeVersion"] in versions[node["type"]], \
                f"{name}: {node['type']} has no version {node['typeVersion']} ({sorted(versions[node['type']])})"


def test_json_matches_sources() -> None:
    proc = subprocess.run([sys.executable, str(N8N_DIR / "build.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_event_sender_shape(sender: dict[str, Any]) -> None:
    hook = one(sender, "n8n-nodes-base.webhook")
    params = hook["parameters"]
    assert params["httpMethod"] == "POST" and params["path"] == "barnum-events"
    assert params["options"].get("rawBody") is True, "the signature is over the raw body"
    assert params["responseMode"] == "responseNode"
    assert targets(sender, hook["name"]) == ["Verify signature"]
    assert targets(sender, "Verify signature") == ["Signature valid?"]
    assert targets(sender, "Signature valid?", 0) == ["Skip duplicates"]
    assert targets(sender, "Signature valid?", 1) == ["Reject (401)"]
    assert targets(sender, "Skip duplicates") == ["New event?"]
    assert targets(sender, "New event?", 0) == ["Prepare message fields"]
    assert targets(sender, "New event?", 1) == ["Already sent (200)"]
    assert targets(sender, "Prepare message fields") == ["Route by event type"]
    assert nodes_by_name(sender)["Reject (401)"]["parameters"]["options"]["responseCode"] == 401
    assert targets(sender, "Reject (401)") == [], "a rejected event goes no further"
    switch = one(sender, "n8n-nodes-base.switch")
    rules = switch["parameters"]["rules"]["values"]
    routed = [r["conditions"]["conditions"][0]["rightValue"] for r in rules]
    assert routed == EVENT_TYPES
    for i, event_type in enumerate(EVENT_TYPES):
        (http_name,) = targets(sender, switch["name"], i)
        http = nodes_by_name(sender)[http_name]
        assert http["type"] == "n8n-nodes-base.httpRequest", event_type
        p = http["parameters"]
        assert p["method"] == "POST"
        assert p["url"] == "={{ $env.WHATSAPP_GRAPH_BASE_URL }}/{{ $env.WHATSAPP_PHONE_NUMBER_ID }}/messages"
        assert {"name": "Authorization", "value": "=Bearer {{ $env.WHATSAPP_TOKEN }}"} in \
            p["headerParameters"]["parameters"]
        body = p["jsonBody"]
        assert body.startswith("={{") and body.endswith("}}") and "}}" not in body[3:-2], \
            f"{http_name}: '}}}}' inside the expression would end it early"
        assert targets(sender, http_name) == ["Remember sent event"]
    assert targets(sender, "Remember sent event") == ["Sent (200)"]
    assert targets(sender, switch["name"], len(EVENT_TYPES)) == ["Ignored (200)"]


def test_reply_handler_shape(replies: dict[str, Any]) -> None:
    post = one(replies, "n8n-nodes-base.webhook", httpMethod="POST")
    assert post["parameters"]["options"].get("rawBody") is True
    assert post["parameters"]["responseMode"] == "onReceived", "answer WhatsApp at once"
    assert targets(replies, post["name"]) == ["Map replies to callbacks"]
    (http_name,) = targets(replies, "Map replies to callbacks")
    p = nodes_by_name(replies)[http_name]["parameters"]
    assert p["url"] == "={{ $env.BARNUM_BASE_URL }}/api/webhook"
    assert p["contentType"] == "raw" and p["rawContentType"] == "application/json"
    assert p["body"] == "={{ $json.body }}", "send the exact string that was signed"
    headers = {h["name"]: h["value"] for h in p["headerParameters"]["parameters"]}
    assert headers == {"webhook-id": "={{ $json.webhookId }}", "webhook-timestamp": "={{ $json.timestamp }}",
                       "webhook-signature": "={{ $json.signature }}"}, "Standard Webhooks, the documented default"
    get = one(replies, "n8n-nodes-base.webhook", httpMethod="GET")
    assert get["parameters"]["path"] == post["parameters"]["path"]


# ----------------------------------------------------------------- signature vectors


def _item(body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = {}
    return {
        "json": {"headers": lower, "params": {}, "query": {}, "body": parsed},
        "binary": {"data": {"data": base64.b64encode(body).decode(), "mimeType": "application/json"}},
    }


def _python_accepts(env_secret: str, body: bytes, headers: dict[str, str], now: float) -> bool:
    keys = parse_secrets(env_secret)
    h = {k.lower(): v for k, v in headers.items()}
    if not verify_hex(keys, body, h.get("x-webhook-signature")):
        return False
    try:
        ts = int(h.get("webhook-timestamp", ""))
    except ValueError:
        return False
    if abs(now - ts) > 300:
        return False
    return verify_standard(keys, body, h.get("webhook-id"), h.get("webhook-timestamp"),
                           h.get("webhook-signature"), now=now)


def _vectors() -> list[tuple[str, str, bytes, dict[str, str], bool]]:
    """(label, BARNUM_WEBHOOK_SECRET, body, headers, expected)."""
    now = int(time.time())
    eid = str(uuid.uuid4())
    body = json.dumps({"event_id": eid, "event_type": "appointment.pre_confirmed",
                       "appointment": {"patient": {"name": "João Ñúñez"}}}, ensure_ascii=False).encode()
    raw_key = os.urandom(24)
    whsec = "whsec_" + base64.b64encode(raw_key).decode()

    def hdrs(key: bytes, ts: int = now, b: bytes = body) -> dict[str, str]:
        return outbound_headers(key, b, event_id=eid, event_type="appointment.pre_confirmed",
                                idempotency_key=f"{eid}-{now}", timestamp=ts)

    def only_hex(h: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in h.items() if k not in ("webhook-signature",)}

    good = hdrs(b"s3cret")
    tampered = body.replace("João".encode(), "Joao".encode())
    mixed = dict(good, **{"webhook-signature": hdrs(b"other")["webhook-signature"]})
    return [
        ("valid", "s3cret", body, good, True),
        ("hex only: webhook-signature stripped", "s3cret", body, only_hex(good), False),
        ("valid, sha256= prefix, upper case", "s3cret", body,
         dict(good, **{"X-Webhook-Signature": "sha256=" + good["X-Webhook-Signature"].upper()}), True),
        ("wrong secret", "s3cret", body, hdrs(b"not-the-secret"), False),
        ("no signature", "s3cret", body, {k: v for k, v in good.items() if k != "X-Webhook-Signature"}, False),
        ("tampered body", "s3cret", tampered, good, False),
        ("rotation: signed with the old secret", "new-secret,s3cret", body, good, True),
        ("rotation: signed with the new secret", "new-secret, s3cret", body, hdrs(b"new-secret"), True),
        ("rotation over: old secret dropped", "new-secret", body, good, False),
        ("whsec_: decoded bytes are the key", whsec, body, hdrs(raw_key), True),
        ("whsec_: the literal string is not the key", whsec, body, hdrs(whsec.encode()), False),
        ("whsec_ in a rotation list", f"plain,{whsec}", body, hdrs(raw_key), True),
        ("stale timestamp (10 min)", "s3cret", body, hdrs(b"s3cret", ts=now - 600), False),
        ("stale timestamp (301 s)", "s3cret", body, hdrs(b"s3cret", ts=now - 301), False),
        ("timestamp 4 min old", "s3cret", body, hdrs(b"s3cret", ts=now - 240), True),
        ("future timestamp (10 min)", "s3cret", body, hdrs(b"s3cret", ts=now + 600), False),
        ("missing timestamp", "s3cret", body, {k: v for k, v in good.items() if k != "webhook-timestamp"}, False),
        ("replay: fresh timestamp, webhook-signature stripped", "s3cret", body,
         dict(only_hex(hdrs(b"s3cret", ts=now - 900)), **{"webhook-timestamp": str(now)}), False),
        ("fresh timestamp swapped in (standard sig binds it)", "s3cret", body,
         dict(hdrs(b"s3cret", ts=now - 600), **{"webhook-timestamp": str(now)}), False),
        ("valid hex, wrong standard signature", "s3cret", body, mixed, False),
    ]


def test_verify_signature_matches_listener_signing(sender: dict[str, Any], run_jobs: Any) -> None:
    code = code_of(sender, "Verify signature")
    vectors = _vectors()
    jobs = []
    for i, (label, secret, body, headers, _) in enumerate(vectors):
        jobs.append({"kind": "code", "label": label, "code": code, "items": [_item(body, headers)],
                     "env": {"BARNUM_WEBHOOK_SECRET": secret}, "helpers": i % 2 == 0})
    results = run_jobs(jobs)
    now = time.time()
    for (label, secret, body, headers, expected), result in zip(vectors, results):
        assert _python_accepts(secret, body, headers, now) is expected, f"python disagrees with vector {label!r}"
        assert len(result) == 1, label
        out = result[0]["json"]
        assert out["verified"] is expected, f"{label}: n8n code says {out}"
        if expected:
            assert out["event"] == json.loads(body) and out["event_type"] == "appointment.pre_confirmed"
        else:
            assert out["reason"] and "event" not in out


def test_verify_signature_without_secret_fails_loudly(sender: dict[str, Any], node_bin: str,
                                                      run_jobs: Any) -> None:
    body = b'{"event_type":"x"}'
    with pytest.raises(AssertionError, match="holds no secret"):
        run_jobs([{"kind": "code", "code": code_of(sender, "Verify signature"),
                   "items": [_item(body, {})], "env": {}}])


# ----------------------------------------------------------------- messages

APPT = "0b0c8e7e-3a4b-4b7e-9d47-1f2e3d4c5b6a"
PATIENT = "8d5f6a1c-2b3c-4d5e-8f90-123456789abc"


def _payload(event_type: str) -> dict[str, Any]:
    base = "http://127.0.0.1:8000/api/action"
    links = {
        "appointment.pre_confirmed": ["confirm", "cancel", "reschedule"],
        "appointment.reminder": ["confirm", "cancel", "reschedule"],
        "appointment.rescheduled": ["confirm", "cancel", "reschedule"],
        "appointment.confirmed": ["cancel", "reschedule"],
        "appointment.no_show": ["reschedule"],
    }.get(event_type, [])
    doc: dict[str, Any] = {
        "event_id": str(uuid.uuid4()), "event_type": event_type, "entity_id": APPT,
        "created_at": "2026-01-28T10:00:00Z", "workflow_id": str(uuid.uuid4()),
        "action_links": {t: f"{base}?type={t}&token=TOK{t.upper()}_abc-123" for t in links},
    }
    if event_type == "patient.reactivation":
        doc["entity_id"] = PATIENT
        doc["patient"] = {"id": PATIENT, "name": "Ana \"Quote\" O'Neil", "phone": "+351912345678",
                          "last_visit_date": "2025-10-01"}
    else:
        doc["appointment"] = {
            "id": APPT, "date": "2026-02-01", "time": "10:30", "status": "scheduled",
            "patient": {"id": PATIENT, "name": "Ana \"Quote\" O'Neil", "phone": "+351912345678"},
            "professional": {"name": "Dr. Maria Santos"}, "specialty": {"name": "Medicina Dentária"},
        }
    return doc


def test_every_event_type_becomes_a_cloud_api_message(sender: dict[str, Any], run_jobs: Any) -> None:
    env = {"WHATSAPP_GRAPH_BASE_URL": "http://127.0.0.1:9/v21.0", "WHATSAPP_PHONE_NUMBER_ID": "555",
           "WHATSAPP_TOKEN": "tok", "BARNUM_WEBHOOK_SECRET": "s3cret"}
    by_name = nodes_by_name(sender)
    switch = one(sender, "n8n-nodes-base.switch")
    rules = switch["parameters"]["rules"]["values"]
    payloads = [_payload(t) for t in EVENT_TYPES + ["appointment.reschedule_requested"]]
    verified = run_jobs([{"kind": "code", "code": code_of(sender, "Verify signature"), "env": env,
                          "items": [_item(body, outbound_headers(b"s3cret", body, event_id=p["event_id"],
                                                                 event_type=p["event_type"], idempotency_key="k"))]}
                         for p in payloads for body in [json.dumps(p).encode()]])
    prepared = run_jobs([{"kind": "code", "code": code_of(sender, "Prepare message fields"), "env": env,
                          "items": v} for v in verified])
    jobs: list[dict[str, Any]] = []
    routes: list[tuple[dict[str, Any], str]] = []
    for payload, items in zip(payloads, prepared):
        item = items[0]["json"]
        outputs = [i for i, r in enumerate(rules)
                   if r["conditions"]["conditions"][0]["rightValue"] == item["event_type"]]
        output = outputs[0] if outputs else len(rules)  # the fallback output
        (target,) = targets(sender, switch["name"], output)
        routes.append((payload, target))
        node = by_name[target]
        if node["type"] != "n8n-nodes-base.httpRequest":
            continue
        p = node["parameters"]
        auth = next(h["value"] for h in p["headerParameters"]["parameters"] if h["name"] == "Authorization")
        for value in (p["url"], auth, p["jsonBody"]):
            jobs.append({"kind": "expr", "label": f"{target}: {value[:40]}", "value": value, "json": item,
                         "env": env})
    values = iter(run_jobs(jobs))
    for payload, target in routes:
        if payload["event_type"] == "appointment.reschedule_requested":
            assert target == "Ignored (200)"
            continue
        url, auth, body_text = next(values), next(values), next(values)
        assert url == "http://127.0.0.1:9/v21.0/555/messages"
        assert auth == "Bearer tok"
        message = json.loads(body_text)
        assert FakeGraphAPI.validate(message) == [], (target, message)
        assert message["to"] == "351912345678"
        sent = SentMessage("/", {}, message, "wamid")
        text = sent.text
        assert "Ana" in text, target
        if payload["event_type"] != "patient.reactivation":
            assert "01/02/2026" in text and "10:30" in text and "Dr. Maria Santos" in text, (target, text)
        for link in payload["action_links"].values():
            assert link in text, (target, link)
        ref = PATIENT if payload["event_type"] == "patient.reactivation" else APPT
        for rid in sent.reply_ids:
            assert ref in rid, (target, rid)


# ----------------------------------------------------------------- reply handler

SECRET = "cb-secret"
APP_SECRET = "meta-app-secret"


def _notification(*messages: dict[str, Any], statuses: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    value: dict[str, Any] = {"messaging_product": "whatsapp",
                             "metadata": {"display_phone_number": "351210000000", "phone_number_id": "555"}}
    if messages:
        value["contacts"] = [{"profile": {"name": "Ana"}, "wa_id": "351912345678"}]
        value["messages"] = list(messages)
    if statuses:
        value["statuses"] = statuses
    return {"object": "whatsapp_business_account",
            "entry": [{"id": "WABA", "changes": [{"field": "messages", "value": value}]}]}


def _msg(mid: str, kind: str, **fields: Any) -> dict[str, Any]:
    return {"from": "351912345678", "id": mid, "timestamp": "1769940000",
            "context": {"from": "351210000000", "id": "wamid.OUT1"}, "type": kind, **fields}


def _button(mid: str, rid: str, title: str) -> dict[str, Any]:
    return _msg(mid, "interactive", interactive={"type": "button_reply", "button_reply": {"id": rid, "title": title}})


def _meta_item(doc: dict[str, Any], app_secret: str | None = APP_SECRET) -> dict[str, Any]:
    body = json.dumps(doc, ensure_ascii=False).encode()
    headers = {"content-type": "application/json"}
    if app_secret is not None:
        headers["x-hub-signature-256"] = "sha256=" + hex_signature(app_secret.encode(), body)
    return _item(body, headers)


def _map(replies: dict[str, Any], run_jobs: Any, items: list[dict[str, Any]],
         env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    environment = {"BARNUM_WEBHOOK_SECRET": SECRET, "WHATSAPP_APP_SECRET": APP_SECRET, **(env or {})}
    (out,) = run_jobs([{"kind": "code", "code": code_of(replies, "Map replies to callbacks"), "items": items,
                        "env": environment, "helpers": True}])
    return [o["json"] for o in out]


REPLY_CASES: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
    ("SIM button", _button("wamid.A1", f"confirm:{APPT}", "SIM"),
     {"action": "confirm", "appointmentId": APPT, "patientResponse": "SIM"}),
    ("NÃO button", _button("wamid.A2", f"cancel:{APPT}", "NÃO"),
     {"action": "cancel", "appointmentId": APPT, "reason": 'patient replied "NÃO" on WhatsApp'}),
    ("template quick reply, generic ref + 'Não'",
     _msg("wamid.A3", "button", button={"payload": f"appt:{APPT}", "text": "Não"}),
     {"action": "cancel", "appointmentId": APPT, "reason": 'patient replied "Não" on WhatsApp'}),
    ("template quick reply, generic ref + '1'",
     _msg("wamid.A4", "button", button={"payload": f"appt:{APPT}", "text": "1"}),
     {"action": "confirm", "appointmentId": APPT, "patientResponse": "1"}),
    ("template quick reply, generic ref + 'CANCELAR'",
     _msg("wamid.A5", "button", button={"payload": f"appt:{APPT}", "text": "CANCELAR"}),
     {"action": "cancel", "appointmentId": APPT, "reason": 'patient replied "CANCELAR" on WhatsApp'}),
    ("generic ref + unknown word", _msg("wamid.A6", "button", button={"payload": f"appt:{APPT}", "text": "talvez"}),
     None),
    ("review list row", _msg("wamid.A7", "interactive", interactive={
        "type": "list_reply", "list_reply": {"id": f"review:{APPT}:4", "title": "4 - Muito boa"}}),
     {"action": "review", "appointmentId": APPT, "reviewSubmitted": True, "rating": 4}),
    ("review declined", _msg("wamid.A8", "interactive", interactive={
        "type": "list_reply", "list_reply": {"id": f"review:{APPT}:no", "title": "Prefiro não avaliar"}}),
     {"action": "review", "appointmentId": APPT, "reviewSubmitted": False}),
    ("review out of range", _msg("wamid.A9", "interactive", interactive={
        "type": "list_reply", "list_reply": {"id": f"review:{APPT}:9", "title": "9"}}), None),
    ("no-show reschedule", _button("wamid.B1", f"no_show_reschedule:{APPT}", "Quero remarcar"),
     {"action": "no_show_reschedule", "appointmentId": APPT, "attempt": 1}),
    ("reactivation", _button("wamid.B2", f"reactivation:{PATIENT}", "Quero marcar"),
     {"action": "reactivation", "patientId": PATIENT, "workflowType": "reactivation", "status": "interested"}),
    ("plain text SIM (no id: not mapped)", _msg("wamid.B3", "text", text={"body": "SIM"}), None),
    ("plain text 2 (no id: not mapped)", _msg("wamid.B4", "text", text={"body": "2"}), None),
    ("unknown button id", _button("wamid.B5", "something-else", "SIM"), None),
]


@pytest.fixture(scope="module")
def mapped_cases(replies: dict[str, Any], run_jobs: Any) -> dict[str, list[dict[str, Any]]]:
    """Every REPLY_CASES message through the Code node, in one node process."""
    env = {"BARNUM_WEBHOOK_SECRET": SECRET, "WHATSAPP_APP_SECRET": APP_SECRET}
    code = code_of(replies, "Map replies to callbacks")
    results = run_jobs([{"kind": "code", "code": code, "env": env, "helpers": i % 2 == 0,
                         "items": [_meta_item(_notification(message))]}
                        for i, (_, message, _) in enumerate(REPLY_CASES)])
    return {label: [o["json"] for o in out] for (label, _, _), out in zip(REPLY_CASES, results)}


@pytest.mark.parametrize("label,message,expected", REPLY_CASES, ids=[c[0] for c in REPLY_CASES])
def test_reply_mapping(mapped_cases: dict[str, list[dict[str, Any]]], label: str, message: dict[str, Any],
                       expected: dict[str, Any] | None) -> None:
    out = mapped_cases[label]
    if expected is None:
        assert out == []
        return
    assert len(out) == 1
    (cb,) = out
    assert json.loads(cb["body"]) == expected
    assert cb["messageId"] == cb["webhookId"] == message["id"] and cb["action"] == expected["action"]
    assert _reply_verifies(parse_secrets(SECRET), cb)


def test_reply_signatures_follow_rotation_and_whsec(replies: dict[str, Any], run_jobs: Any) -> None:
    raw_key = os.urandom(32)
    whsec = "whsec_" + base64.b64encode(raw_key).decode()
    msg = _button("wamid.R1", f"cancel:{APPT}", "NÃO")
    (cb,) = _map(replies, run_jobs, [_meta_item(_notification(msg))],
                 env={"BARNUM_WEBHOOK_SECRET": f"{whsec},old-secret"})
    assert _reply_verifies([raw_key], cb), "signs with the first secret's decoded bytes"
    assert not _reply_verifies([b"old-secret"], cb)
    assert _reply_verifies(parse_secrets(f"old-secret,{whsec}"), cb), "Barnum accepts any of its list"
    # The timestamp is signed: the same signature under another timestamp fails.
    assert not _reply_verifies([raw_key], {**cb, "timestamp": str(int(cb["timestamp"]) - 1)})


def _reply_verifies(keys: list[bytes], cb: dict[str, Any]) -> bool:
    """Barnum's own check of a reply-handler callback (Standard Webhooks headers)."""
    headers = {"webhook-id": cb["webhookId"], "webhook-timestamp": cb["timestamp"], "webhook-signature": cb["signature"]}
    verdict = verify_callback(keys, cb["body"].encode("utf-8"), headers, require_timestamp=True)
    return verdict.ok and verdict.idempotency_key == cb["webhookId"]


def test_reply_is_deterministic_for_redeliveries(replies: dict[str, Any], run_jobs: Any) -> None:
    doc = _notification(_button("wamid.D1", f"cancel:{APPT}", "NÃO"), _button("wamid.D2", f"confirm:{APPT}", "SIM"))
    first = _map(replies, run_jobs, [_meta_item(doc)])
    again = _map(replies, run_jobs, [_meta_item(doc)])
    # Same bodies and webhook-ids (Barnum's idempotency key); only the signed timestamp is fresh.
    assert [(c["body"], c["webhookId"]) for c in first] == [(c["body"], c["webhookId"]) for c in again]
    assert [c["webhookId"] for c in first] == ["wamid.D1", "wamid.D2"]


def test_reply_requires_metas_signature(replies: dict[str, Any], run_jobs: Any) -> None:
    doc = _notification(_button("wamid.S1", f"confirm:{APPT}", "SIM"))
    assert _map(replies, run_jobs, [_meta_item(doc, app_secret="forged")]) == []
    assert _map(replies, run_jobs, [_meta_item(doc, app_secret=None)]) == []
    # No app secret configured: nothing is accepted unless explicitly allowed.
    assert _map(replies, run_jobs, [_meta_item(doc, app_secret=None)], env={"WHATSAPP_APP_SECRET": ""}) == []
    allowed = _map(replies, run_jobs, [_meta_item(doc, app_secret=None)],
                   env={"WHATSAPP_APP_SECRET": "", "WHATSAPP_ALLOW_UNSIGNED": "true"})
    assert [c["action"] for c in allowed] == ["confirm"]


def test_status_notifications_are_ignored(replies: dict[str, Any], run_jobs: Any) -> None:
    doc = _notification(statuses=[{"id": "wamid.OUT1", "status": "read", "timestamp": "1769940000",
                                   "recipient_id": "351912345678"}])
    assert _map(replies, run_jobs, [_meta_item(doc)]) == []


def test_subscription_handshake(replies: dict[str, Any], run_jobs: Any) -> None:
    code = code_of(replies, "Check verify token")

    def job(query: dict[str, Any], token: str) -> dict[str, Any]:
        return {"kind": "code", "code": code, "env": {"WHATSAPP_VERIFY_TOKEN": token},
                "items": [{"json": {"headers": {}, "params": {}, "query": query, "body": {}}}]}

    good = {"hub.mode": "subscribe", "hub.verify_token": "vt", "hub.challenge": "12345"}
    results = run_jobs([job(good, "vt"), job(dict(good, **{"hub.verify_token": "no"}), "vt"), job(good, ""),
                        job({"hub": {"mode": "subscribe", "verify_token": "vt", "challenge": "9"}}, "vt")])
    assert [r[0]["json"] for r in results] == [
        {"ok": True, "challenge": "12345"}, {"ok": False, "challenge": ""}, {"ok": False, "challenge": ""},
        {"ok": True, "challenge": "9"}]


# ----------------------------------------------------------------- duplicates


def test_redelivered_event_is_not_sent_twice(sender: dict[str, Any], run_jobs: Any) -> None:
    skip = code_of(sender, "Skip duplicates")
    remember = code_of(sender, "Remember sent event")
    now = int(time.time())
    old_id, new_id = str(uuid.uuid4()), str(uuid.uuid4())
    event = {"verified": True, "event_type": "appointment.confirmed",
             "event": {"event_id": new_id, "event_type": "appointment.confirmed"}}
    graph_answer = [{"json": {"messages": [{"id": "wamid.X"}]}}]
    first, remembered, again = run_jobs([
        {"kind": "code", "code": skip, "items": [{"json": event}], "staticData": {}},
        {"kind": "code", "code": remember, "items": graph_answer,
         "nodes": {"Prepare message fields": [{"json": {"event_id": new_id}}]},
         "staticData": {"sentEvents": {old_id: now - 3 * 24 * 3600, "recent": now - 60}}},
        {"kind": "code", "code": skip, "items": [{"json": event}],
         "staticData": {"sentEvents": {new_id: now}}},
    ])
    assert first["result"][0]["json"]["duplicate"] is False
    assert remembered["result"] == graph_answer, "passes the Graph API answer through"
    kept = remembered["staticData"]["sentEvents"]
    assert set(kept) == {new_id, "recent"}, "remembers the new id, forgets ids older than two days"
    assert again["result"][0]["json"]["duplicate"] is True

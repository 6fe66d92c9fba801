#!/usr/bin/env python3
"""Generate the importable n8n workflows of this folder.

    python integrations/n8n/build.py          # rewrite event-sender.json, reply-handler.json
    python integrations/n8n/build.py --check  # exit 1 if they are out of date

The Code nodes' JavaScript lives in ``src/*.js`` (readable, diffable, tested
by tests/test_n8n_workflows.py); this script embeds it into the workflow JSON
that users import. Edit the sources or this file, then rebuild; the test
suite fails when the JSON files and their sources disagree.

Node types and parameter names are those of n8n 2.8.4's ``n8n-nodes-base``
(Webhook 2.1, Code 2, If 2.2, Switch 3.2, HTTP Request 4.2, Respond to
Webhook 1.1); the e2e suite (scripts/e2e-n8n) runs them in a real n8n.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"

EVENT_PATH = "barnum-events"
REPLY_PATH = "whatsapp-inbound"

Node = dict[str, Any]

_NS = uuid.UUID("5b1e7c1a-2f0d-4d38-9a4e-6b8f3e2c9d10")


def uid(name: str) -> str:
    """A fixed UUID per name: re-importing updates nodes/webhooks instead of adding new ones."""
    return str(uuid.uuid5(_NS, name))


def js(name: str) -> str:
    return (SRC / name).read_text(encoding="utf-8")


def webhook(name: str, node_id: str, webhook_id: str, path: str, method: str, response_mode: str,
            pos: list[int], raw_body: bool) -> Node:
    options: dict[str, Any] = {"rawBody": True} if raw_body else {}
    return {
        "parameters": {"httpMethod": method, "path": path, "responseMode": response_mode, "options": options},
        "id": uid(node_id),
        "name": name,
        "type": "n8n-nodes-base.webhook",
        "typeVersion": 2.1,
        "position": pos,
        "webhookId": webhook_id,
    }


def code(name: str, node_id: str, source: str, pos: list[int]) -> Node:
    return {
        "parameters": {"mode": "runOnceForAllItems", "language": "javaScript", "jsCode": js(source)},
        "id": uid(node_id),
        "name": name,
        "type": "n8n-nodes-base.code",
        "typeVersion": 2,
        "position": pos,
    }


def if_true(name: str, node_id: str, left: str, pos: list[int]) -> Node:
    return {
        "parameters": {
            "conditions": {
                "options": {"caseSensitive": True, "leftValue": "", "typeValidation": "strict", "version": 2},
                "conditions": [{
                    "id": f"{node_id}-c1",
                    "leftValue": left,
                    "rightValue": "",
                    "operator": {"type": "boolean", "operation": "true", "singleValue": True},
                }],
                "combinator": "and",
            },
            "options": {},
        },
        "id": uid(node_id),
        "name": name,
        "type": "n8n-nodes-base.if",
        "typeVersion": 2.2,
        "position": pos,
    }


def respond(name: str, node_id: str, status: int, body: str, pos: list[int], kind: str = "json") -> Node:
    return {
        "parameters": {"respondWith": kind, "responseBody": body, "options": {"responseCode": status}},
        "id": uid(node_id),
        "name": name,
        "type": "n8n-nodes-base.respondToWebhook",
        "typeVersion": 1.1,
        "position": pos,
    }


def http_request(name: str, node_id: str, url: str, headers: list[tuple[str, str]], pos: list[int], *,
                 json_body: str | None = None, raw_body: str | None = None,
                 timeout_ms: int = 10000, max_tries: int = 3) -> Node:
    params: dict[str, Any] = {
        "method": "POST",
        "url": url,
        "authentication": "none",
        "sendHeaders": True,
        "specifyHeaders": "keypair",
        "headerParameters": {"parameters": [{"name": k, "value": v} for k, v in headers]},
        "sendBody": True,
    }
    if json_body is not None:
        params.update({"contentType": "json", "specifyBody": "json", "jsonBody": json_body})
    else:
        params.update({"contentType": "raw", "rawContentType": "application/json", "body": raw_body})
    params["options"] = {"timeout": timeout_ms}
    return {
        "parameters": params,
        "id": uid(node_id),
        "name": name,
        "type": "n8n-nodes-base.httpRequest",
        "typeVersion": 4.2,
        "position": pos,
        "retryOnFail": True,
        "maxTries": max_tries,
        "waitBetweenTries": 1000,
    }


def main_connections(pairs: list[tuple[str, list[list[str]]]]) -> dict[str, Any]:
    """``[(from, [[to…] for each output])]`` → n8n's connections object."""
    return {
        src: {"main": [[{"node": dst, "type": "main", "index": 0} for dst in output] for output in outputs]}
        for src, outputs in pairs
    }


# ------------------------------------------------------------------ event sender

# Each message is a JavaScript expression over the "Prepare message fields"
# item ($json.to, .name, .date, .time, .withWhom, .specialty, .linkLines, …).
# Reply-button ids carry the appointment/patient id; the reply handler maps
# them back to Barnum callbacks ("confirm:<uuid>", …).  Keep "}}" out of the
# expressions (n8n ends an expression there): always write "} }".
HEAD = "messaging_product: 'whatsapp', recipient_type: 'individual', to: $json.to"


def text_message(text: str) -> str:
    return "={{ JSON.stringify({ " + HEAD + ", type: 'text', text: { preview_url: false, body: " + text + " } }) }}"


def buttons_message(text: str, buttons: list[tuple[str, str]]) -> str:
    rendered = ", ".join(
        "{ type: 'reply', reply: { id: " + bid + ", title: '" + title + "' } }" for bid, title in buttons
    )
    return (
        "={{ JSON.stringify({ " + HEAD + ", type: 'interactive', interactive: { type: 'button', "
        "body: { text: " + text + " }, action: { buttons: [ " + rendered + " ] } } }) }}"
    )


def list_message(text: str, button: str, rows: list[tuple[str, str]]) -> str:
    rendered = ", ".join("{ id: " + rid + ", title: '" + title + "' }" for rid, title in rows)
    return (
        "={{ JSON.stringify({ " + HEAD + ", type: 'interactive', interactive: { type: 'list', "
        "body: { text: " + text + " }, action: { button: '" + button + "', sections: [ { title: 'Avaliação', "
        "rows: [ " + rendered + " ] } ] } } }) }}"
    )


WHEN = "$json.date + ' às ' + $json.time + $json.withWhom"
YES_NO = [("'confirm:' + $json.appointmentId", "SIM"), ("'cancel:' + $json.appointmentId", "NÃO")]

MESSAGES: list[tuple[str, str, str]] = [
    # (event type, node name, jsonBody expression)
    ("appointment.pre_confirmed", "WhatsApp: pre-confirmation", buttons_message(
        "'Olá ' + $json.firstName + '! A sua consulta' + $json.specialty + ' está marcada para ' + " + WHEN
        + " + '.\\n\\nConfirma a sua presença? Responda SIM ou NÃO, ou use os links:\\n' + $json.linkLines",
        YES_NO)),
    ("appointment.reminder", "WhatsApp: reminder", buttons_message(
        "'Lembrete: ' + $json.firstName + ', a sua consulta' + $json.specialty + ' é ' + " + WHEN
        + " + '.\\n\\nVem? Responda SIM ou NÃO, ou use os links:\\n' + $json.linkLines",
        YES_NO)),
    ("appointment.no_show", "WhatsApp: no-show follow-up", buttons_message(
        "'Olá ' + $json.firstName + ', sentimos a sua falta na consulta de ' + " + WHEN
        + " + '.\\n\\nQuer marcar uma nova data?\\n' + $json.linkLines",
        [("'no_show_reschedule:' + $json.appointmentId", "Quero remarcar")])),
    ("appointment.completed", "WhatsApp: review request", list_message(
        "'Obrigado pela sua visita, ' + $json.firstName + '! Como avalia a consulta de ' + " + WHEN + " + '?'",
        "Avaliar",
        [("'review:' + $json.appointmentId + ':5'", "5 - Excelente"),
         ("'review:' + $json.appointmentId + ':4'", "4 - Muito boa"),
         ("'review:' + $json.appointmentId + ':3'", "3 - Razoável"),
         ("'review:' + $json.appointmentId + ':2'", "2 - Fraca"),
         ("'review:' + $json.appointmentId + ':1'", "1 - Má"),
         ("'review:' + $json.appointmentId + ':no'", "Prefiro não avaliar")])),
    ("appointment.confirmed", "WhatsApp: confirmed", text_message(
        "'Obrigado, ' + $json.firstName + '! A sua consulta de ' + " + WHEN
        + " + ' está confirmada.\\n\\nSe precisar de alterar:\\n' + $json.linkLines")),
    ("appointment.cancelled", "WhatsApp: cancelled", text_message(
        "$json.firstName + ', a sua consulta de ' + " + WHEN
        + " + ' foi cancelada. Para marcar outra, responda a esta mensagem ou contacte a clínica.'")),
    ("appointment.rescheduled", "WhatsApp: rescheduled", buttons_message(
        "$json.firstName + ', a sua consulta' + $json.specialty + ' passou para ' + " + WHEN
        + " + '.\\n\\nConfirma a nova data? Responda SIM ou NÃO, ou use os links:\\n' + $json.linkLines",
        YES_NO)),
    ("patient.reactivation", "WhatsApp: reactivation", buttons_message(
        "'Olá ' + $json.firstName + '! Já passou algum tempo desde a sua última visita' + $json.lastVisit"
        " + '. Quer marcar uma nova consulta?'",
        [("'reactivation:' + $json.patientId", "Quero marcar")])),
]

GRAPH_URL = "={{ $env.WHATSAPP_GRAPH_BASE_URL }}/{{ $env.WHATSAPP_PHONE_NUMBER_ID }}/messages"
GRAPH_HEADERS = [("Authorization", "=Bearer {{ $env.WHATSAPP_TOKEN }}")]


def event_sender() -> dict[str, Any]:
    rules = []
    for index, (event_type, _, _) in enumerate(MESSAGES):
        rules.append({
            "conditions": {
                "options": {"caseSensitive": True, "leftValue": "", "typeValidation": "strict", "version": 2},
                "conditions": [{
                    "id": f"route-{index}",
                    "leftValue": "={{ $json.event_type }}",
                    "rightValue": event_type,
                    "operator": {"type": "string", "operation": "equals"},
                }],
                "combinator": "and",
            },
            "renameOutput": True,
            "outputKey": event_type,
        })
    switch: Node = {
        "parameters": {
            "rules": {"values": rules},
            "options": {"fallbackOutput": "extra", "renameFallbackOutput": "other"},
        },
        "id": uid("es-switch"),
        "name": "Route by event type",
        "type": "n8n-nodes-base.switch",
        "typeVersion": 3.2,
        "position": [1380, 300],
    }
    # 2 tries × 4 s + 1 s stays under the relay's default 10 s timeout, so a
    # slow Graph API does not make Barnum deliver the event a second time.
    senders = [
        http_request(name, f"es-send-{i}", GRAPH_URL, GRAPH_HEADERS, [1620, 20 + 110 * i], json_body=body,
                     timeout_ms=4000, max_tries=2)
        for i, (_, name, body) in enumerate(MESSAGES)
    ]
    nodes: list[Node] = [
        webhook("Barnum event", "es-webhook", uid("webhook-1"), EVENT_PATH, "POST",
                "responseNode", [0, 300], raw_body=True),
        code("Verify signature", "es-verify", "verify-event.js", [240, 300]),
        if_true("Signature valid?", "es-valid", "={{ $json.verified }}", [480, 300]),
        respond("Reject (401)", "es-reject", 401,
                "={{ JSON.stringify({ ok: false, error: $json.reason }) }}", [700, 480]),
        code("Skip duplicates", "es-dedupe", "skip-duplicates.js", [700, 200]),
        if_true("New event?", "es-new", "={{ !$json.duplicate }}", [920, 200]),
        respond("Already sent (200)", "es-duplicate", 200,
                "={{ JSON.stringify({ ok: true, duplicate: true, event_id: $json.event.event_id }) }}",
                [1140, 420]),
        code("Prepare message fields", "es-prepare", "prepare-message.js", [1140, 200]),
        switch,
        *senders,
        code("Remember sent event", "es-remember", "remember-sent.js", [1860, 300]),
        respond("Sent (200)", "es-sent", 200,
                "={{ JSON.stringify({ ok: true, whatsapp_message_id: ($json.messages && $json.messages[0] "
                "? $json.messages[0].id : null) }) }}", [2080, 300]),
        respond("Ignored (200)", "es-ignored", 200,
                "={{ JSON.stringify({ ok: true, ignored: $json.event_type }) }}", [1620, 20 + 110 * len(MESSAGES)]),
    ]
    connections = main_connections([
        ("Barnum event", [["Verify signature"]]),
        ("Verify signature", [["Signature valid?"]]),
        ("Signature valid?", [["Skip duplicates"], ["Reject (401)"]]),
        ("Skip duplicates", [["New event?"]]),
        ("New event?", [["Prepare message fields"], ["Already sent (200)"]]),
        ("Prepare message fields", [["Route by event type"]]),
        ("Route by event type", [[name] for _, name, _ in MESSAGES] + [["Ignored (200)"]]),
        *[(name, [["Remember sent event"]]) for _, name, _ in MESSAGES],
        ("Remember sent event", [["Sent (200)"]]),
    ])
    return workflow("BarnumEventSendr", "Barnum: event sender (WhatsApp)", nodes, connections)


# ------------------------------------------------------------------ reply handler

def reply_handler() -> dict[str, Any]:
    callback = http_request(
        "POST callback to Barnum", "rh-callback", "={{ $env.BARNUM_BASE_URL }}/api/webhook",
        [("webhook-id", "={{ $json.webhookId }}"), ("webhook-timestamp", "={{ $json.timestamp }}"),
         ("webhook-signature", "={{ $json.signature }}")],
        [720, 200], raw_body="={{ $json.body }}")
    nodes: list[Node] = [
        webhook("WhatsApp notification", "rh-webhook", uid("webhook-2"), REPLY_PATH,
                "POST", "onReceived", [0, 200], raw_body=True),
        code("Map replies to callbacks", "rh-map", "map-replies.js", [360, 200]),
        callback,
        webhook("WhatsApp verification (GET)", "rh-verify-webhook", uid("webhook-3"),
                REPLY_PATH, "GET", "responseNode", [0, 520], raw_body=False),
        code("Check verify token", "rh-verify", "verify-subscription.js", [240, 520]),
        if_true("Token matches?", "rh-verify-ok", "={{ $json.ok }}", [480, 520]),
        respond("Answer challenge", "rh-challenge", 200, "={{ $json.challenge }}", [720, 440], kind="text"),
        respond("Refuse (403)", "rh-refuse", 403, "forbidden", [720, 600], kind="text"),
    ]
    connections = main_connections([
        ("WhatsApp notification", [["Map replies to callbacks"]]),
        ("Map replies to callbacks", [["POST callback to Barnum"]]),
        ("WhatsApp verification (GET)", [["Check verify token"]]),
        ("Check verify token", [["Token matches?"]]),
        ("Token matches?", [["Answer challenge"], ["Refuse (403)"]]),
    ])
    return workflow("BarnumReplyHndlr", "Barnum: WhatsApp reply handler", nodes, connections)


def workflow(wf_id: str, name: str, nodes: list[Node], connections: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": wf_id,
        "name": name,
        "active": False,
        "nodes": nodes,
        "connections": connections,
        "settings": {"executionOrder": "v1", "saveDataSuccessExecution": "none"},
        "pinData": {},
        "meta": {"templateCredsSetupCompleted": True},
        "tags": [],
    }


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


OUTPUTS = {"event-sender.json": event_sender, "reply-handler.json": reply_handler}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for filename, build in OUTPUTS.items():
        text = render(build())
        path = HERE / filename
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(filename)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)} (run python integrations/n8n/build.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Barnum ↔ real n8n 2.8.4 ↔ fake WhatsApp, end to end (issue 6).

  a. appointment INSERT → relay → n8n verifies the signature → the fake Graph
     API receives a message with working action links → POST the confirm link
     → appointment confirmed (and n8n sends the "confirmed" notification);
  b. an inbound WhatsApp reply "NÃO" (the cancel button of the pre-confirmation)
     → n8n reply handler → signed callback → appointment cancelled; the same
     notification delivered again → answered from the idempotency record,
     applied once;
  c. an event signed with a wrong secret (or stale) POSTed straight to n8n →
     401 and nothing sent; a valid event right after → exactly that one sent,
     once, even when delivered twice.

Each loop's wall time is printed and summarised at the end.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import pytest

from listener.signing import hex_signature, outbound_headers, verify_callback
from tests.e2e.conftest import Stack, http, log
from tests.e2e.fakes import SentMessage
from tests.helpers import wait_until

TIMINGS: dict[str, float] = {}
pytest._barnum_e2e_timings = TIMINGS  # type: ignore[attr-defined]  # read by conftest's terminal summary

LINK = re.compile(r"(Confirmar|Cancelar|Remarcar): (\S+)")


def timed(name: str, started: float) -> None:
    TIMINGS[name] = time.monotonic() - started
    log(f"{name}: {TIMINGS[name] * 1000:.0f} ms")


def new_patient(stack: Stack, name: str) -> tuple[str, str]:
    phone = "+3519" + str(uuid.uuid4().int)[:8]
    (row,) = stack.sql("INSERT INTO barnum.patients (name, phone) VALUES (%s, %s) RETURNING id", name, phone)
    return str(row[0]), phone


def book(stack: Stack, clinic: dict[str, str], patient_id: str) -> str:
    (row,) = stack.sql(
        "INSERT INTO barnum.appointments (patient_id, professional_id, specialty_id, starts_at) "
        "VALUES (%s, %s, %s, date_trunc('hour', now()) + interval '3 days 10 hours') RETURNING id",
        patient_id, clinic["professional_id"], clinic["specialty_id"])
    return str(row[0])


def status_of(stack: Stack, appointment_id: str) -> str:
    (row,) = stack.sql("SELECT status::text FROM barnum.appointments WHERE id = %s", appointment_id)
    return str(row[0])


def message_for(stack: Stack, ref: str, kind: str | None = None, contains: str | None = None) -> SentMessage | None:
    """The first message the fake Graph API got whose reply ids / text mention ``ref``."""
    stack.check_alive()
    for m in stack.graph.snapshot():
        if ref not in json.dumps(m.body):
            continue
        if kind is not None and m.body.get("type") != kind:
            continue
        if contains is not None and contains not in m.text:
            continue
        return m
    return None


def wait_message(stack: Stack, ref: str, message: str, kind: str | None = None,
                 contains: str | None = None, timeout: float = 30) -> SentMessage:
    found = wait_until(lambda: message_for(stack, ref, kind, contains), timeout=timeout, interval=0.02,
                       message=message)
    assert found is not None
    return found


def local_date_time(stack: Stack, appointment_id: str) -> tuple[str, str]:
    (row,) = stack.sql(
        "SELECT to_char(starts_at AT TIME ZONE 'Europe/Lisbon', 'DD/MM/YYYY'), "
        "to_char(starts_at AT TIME ZONE 'Europe/Lisbon', 'HH24:MI') FROM barnum.appointments WHERE id = %s",
        appointment_id)
    return str(row[0]), str(row[1])


def test_a_insert_to_whatsapp_to_confirm_link(stack: Stack, clinic: dict[str, str]) -> None:
    patient_id, phone = new_patient(stack, "João Silva")
    started = time.monotonic()
    appointment_id = book(stack, clinic, patient_id)

    msg = wait_message(stack, appointment_id, "the pre-confirmation at the fake Graph API")
    timed("a1. INSERT → relay → n8n → WhatsApp message", started)

    assert msg.body["to"] == phone.lstrip("+")
    assert msg.headers.get("authorization") == f"Bearer {stack.graph.token}"
    date, hhmm = local_date_time(stack, appointment_id)
    text = msg.text
    assert "João" in text and date in text and hhmm in text and "Dr. Maria Santos" in text, text
    assert sorted(msg.reply_ids) == sorted([f"confirm:{appointment_id}", f"cancel:{appointment_id}"])
    links = dict(LINK.findall(text))
    assert set(links) == {"Confirmar", "Cancelar", "Remarcar"}, text
    for url in links.values():
        assert url.startswith(f"{stack.shim_url}/api/action?type="), url

    # A GET (what a link preview does) shows the page and changes nothing.
    t = time.monotonic()
    status, page = http("GET", links["Confirmar"])
    assert status == 200 and b"<form" in page.lower(), page[:300]
    assert status_of(stack, appointment_id) == "scheduled"
    # The patient taps the button: POST the same URL.
    status, page = http("POST", links["Confirmar"], body=b"", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200, page[:500]
    assert status_of(stack, appointment_id) == "confirmed"
    timed("a2. POST confirm link → confirmed", t)
    timed("a.  loop total: INSERT → … → confirmed", started)

    # The link is single-use.
    status, _ = http("POST", links["Confirmar"], body=b"")
    assert status == 410

    # Barnum's follow-up event reaches the patient too.
    t = time.monotonic()
    confirmed = wait_message(stack, phone.lstrip("+"), "the 'confirmed' notification", kind="text",
                             contains="está confirmada")
    assert date in confirmed.text and "Cancelar: " in confirmed.text
    timed("a3. confirmed event → WhatsApp notification", t)


def test_b_reply_no_cancels_once(stack: Stack, clinic: dict[str, str]) -> None:
    patient_id, phone = new_patient(stack, "Ana Costa")
    appointment_id = book(stack, clinic, patient_id)
    pre = wait_message(stack, appointment_id, "the pre-confirmation at the fake Graph API")
    (cancel_id,) = [rid for rid in pre.reply_ids if rid.startswith("cancel:")]
    title = next(b["reply"]["title"] for b in pre.body["interactive"]["action"]["buttons"]
                 if b["reply"]["id"] == cancel_id)
    assert title == "NÃO"

    # The patient taps "NÃO": WhatsApp POSTs this notification to n8n.
    reply = stack.inbound.button_reply(phone.lstrip("+"), cancel_id, title, context_id=pre.wamid, ts=int(time.time()))
    body = json.dumps(stack.inbound.notification(reply, phone.lstrip("+"), "Ana Costa"), ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json",
               "X-Hub-Signature-256": "sha256=" + hex_signature(stack.app_secret.encode(), body)}

    def callbacks() -> list[Any]:
        stack.check_alive()
        return [c for c in stack.recorder.snapshot() if c.headers.get("webhook-id") == reply["id"]]

    started = time.monotonic()
    status, _ = http("POST", stack.inbound_url, body=body, headers=headers)
    assert status == 200
    wait_until(lambda: status_of(stack, appointment_id) == "cancelled", timeout=30, interval=0.02,
               message="the appointment cancelled by the reply")
    timed("b1. WhatsApp reply NÃO → n8n → callback → cancelled", started)

    (first,) = wait_until(callbacks, timeout=10, message="the recorded callback")
    assert first.status == 200, first.response
    sent = json.loads(first.body)
    assert sent["action"] == "cancel" and sent["appointmentId"] == appointment_id
    verdict = verify_callback([stack.signing_key], first.body, first.headers, require_timestamp=True)
    assert verdict.scheme == "standard" and verdict.idempotency_key == reply["id"], \
        "n8n signs the exact bytes it sends, the Standard Webhooks way, with the first secret"
    (reason,) = stack.sql("SELECT cancel_reason FROM barnum.appointments WHERE id = %s", appointment_id)
    assert "NÃO" in reason[0]

    # WhatsApp delivers the same notification again.
    t = time.monotonic()
    status, _ = http("POST", stack.inbound_url, body=body, headers=headers)
    assert status == 200
    both = wait_until(lambda: (lambda cs: cs if len(cs) >= 2 else [])(callbacks()), timeout=30,
                      message="the second callback answered")
    timed("b2. same reply redelivered → replayed answer", t)
    assert both[1].body == both[0].body, "the redelivery produces the same bytes"
    assert both[1].status == 200 and json.loads(both[1].response) == json.loads(both[0].response)
    assert status_of(stack, appointment_id) == "cancelled"
    (n_cancel_events,) = stack.sql(
        "SELECT count(*) FROM barnum.whatsapp_events WHERE entity_id = %s AND event_type = 'appointment.cancelled'",
        appointment_id)
    assert n_cancel_events[0] == 1, "applied once: one cancellation event"
    (n_keys,) = stack.sql("SELECT count(*) FROM barnum.inbound_callbacks WHERE idempotency_key = %s", reply["id"])
    assert n_keys[0] == 1

    # And the patient hears about the cancellation.
    wait_message(stack, phone.lstrip("+"), "the 'cancelled' notification", kind="text", contains="foi cancelada")
    timed("b.  loop total (incl. redelivery and notification)", started)


def _event(phone: str, name: str) -> dict[str, Any]:
    appt = str(uuid.uuid4())
    return {
        "event_id": str(uuid.uuid4()), "event_type": "appointment.confirmed", "entity_id": appt,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "workflow_id": None,
        "appointment": {"id": appt, "date": "2031-05-06", "time": "09:15", "status": "confirmed",
                        "patient": {"id": str(uuid.uuid4()), "name": name, "phone": phone},
                        "professional": {"name": "Dr. Rui"}, "specialty": {"name": "Clínica Geral"}},
        "action_links": {},
    }


def _post_event(stack: Stack, event: dict[str, Any], key: bytes, ts: int | None = None) -> tuple[int, bytes]:
    body = json.dumps(event, ensure_ascii=False).encode()
    headers = outbound_headers(key, body, event_id=event["event_id"], event_type=event["event_type"],
                               idempotency_key=f"{event['event_id']}-0", timestamp=ts)
    return http("POST", stack.events_url, body=body, headers=headers)


def test_c_wrong_secret_sends_nothing(stack: Stack) -> None:
    bad_phone, stale_phone, good_phone = "+351930000001", "+351930000002", "+351930000003"
    started = time.monotonic()
    status, answer = _post_event(stack, _event(bad_phone, "Wrong Secret"), b"not-the-secret")
    assert status == 401, answer
    # Right secret, but a timestamp 10 minutes old (a replay): refused too.
    status, answer = _post_event(stack, _event(stale_phone, "Stale"), stack.signing_key, ts=int(time.time()) - 600)
    assert status == 401, answer
    timed("c1. bad / stale signature → 401", started)

    # Positive control: a correctly signed event right after is sent…
    t = time.monotonic()
    good = _event(good_phone, "Right Secret")
    status, answer = _post_event(stack, good, stack.signing_key)
    assert status == 200, answer
    wait_message(stack, good_phone.lstrip("+"), "the valid event's message")
    timed("c2. valid event → WhatsApp message", t)
    # Barnum redelivers an event (at least once): n8n answers 200 and sends nothing.
    status, answer = _post_event(stack, good, stack.signing_key)
    assert status == 200 and json.loads(answer).get("duplicate") is True, answer
    # …and only it: the refused ones never reached the Graph API.
    sent_to = {m.body["to"] for m in stack.graph.snapshot()}
    assert bad_phone.lstrip("+") not in sent_to and stale_phone.lstrip("+") not in sent_to
    assert len([m for m in stack.graph.snapshot() if m.body["to"] == good_phone.lstrip("+")]) == 1
    timed("c.  loop total", started)

"""``GET /metrics`` on the shim: Prometheus text that parses and moves when
work happens (action links, callbacks, signature failures, queue gauges)."""

from __future__ import annotations

import hashlib
import hmac
import json

from pathlib import Path

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from tests.test_shim import SECRET, Running, seed, shim  # noqa: F401  (fixture)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snap: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return snap.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(shim: Running) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = shim.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return samples(r.text)


def test_metrics_parse_and_move(shim: Running, db_conn: psycopg.Connection) -> None:  # noqa: F811
    before = scrape(shim)
    appt = seed(db_conn)
    token = db_conn.execute("SELECT barnum.generate_action_token('confirm', %s, %s)",
                            (appt.id, appt.patient_id)).fetchone()[0]  # type: ignore[index]

    assert shim.client.post(f"/api/action?type=confirm&token={token}").status_code == 200
    assert shim.client.post(f"/api/action?type=confirm&token={token}").status_code == 410
    body = json.dumps({"action": "cancel", "appointmentId": appt.id}).encode()
    bad = shim.client.post("/api/webhook", content=body, headers={
        "Content-Type": "application/json", "X-Webhook-Signature": "00" * 32})
    assert bad.status_code == 401
    good = shim.client.post("/api/webhook", content=body, headers={
        "Content-Type": "application/json",
        "X-Webhook-Signature": hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()})
    assert good.status_code == 200

    after = scrape(shim)
    name = "barnum_action_requests_total"
    assert value(after, name, type="confirm", method="POST", status="200") == \
        value(before, name, type="confirm", method="POST", status="200") + 1
    assert value(after, name, type="confirm", method="POST", status="410") == \
        value(before, name, type="confirm", method="POST", status="410") + 1
    assert value(after, "barnum_signature_failures_total") == value(before, "barnum_signature_failures_total") + 1
    cb = "barnum_callbacks_total"
    assert sum(v for (n, lab), v in after.items() if n == cb and ("status", "200") in lab) == \
        sum(v for (n, lab), v in before.items() if n == cb and ("status", "200") in lab) + 1

    # Queue gauges come from queue_stats(): the seeded appointment's events
    # wait for an endpoint that does not exist (skipped) — add one and the
    # next events are pending.
    db_conn.execute("INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('m', 'http://127.0.0.1:9/x')")
    seed(db_conn, patient="Ana")
    pending = db_conn.execute(
        "SELECT count(*) FROM barnum.webhook_deliveries WHERE status = 'pending'").fetchone()[0]  # type: ignore[index]
    gauges = scrape(shim)
    assert pending >= 1
    assert value(gauges, "barnum_queue_deliveries", state="pending") == pending
    assert ("barnum_queue_oldest_due_age_seconds", ()) in gauges


def test_relay_metrics_port(db_conn: psycopg.Connection, tmp_path: Path, db_url: str) -> None:
    """``barnum relay --metrics-port``: deliveries, their duration and the
    queue gauges, refreshed on every sweep."""
    import httpx

    from listener.pgcluster import free_port
    from tests.helpers import wait_until
    from tests.receiver import Receiver
    from tests.test_relay import SECRET as RELAY_SECRET
    from tests.test_relay import RelayProcess, add_appointments, add_endpoint, all_sent

    receiver = Receiver([RELAY_SECRET.encode()]).start()
    port = free_port()
    relay = RelayProcess(db_url, tmp_path, ["--sweep-interval", "0.5", "--metrics-port", str(port)], {})
    try:
        relay.wait_ready()
        add_endpoint(db_conn, "m", receiver.url("/ok"))
        add_appointments(db_conn, 3)
        wait_until(lambda: all_sent(db_conn, 3), timeout=20, message="delivered")

        def delivered() -> float:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except httpx.HTTPError:
                return -1.0
            return value(samples(text), "barnum_deliveries_total", outcome="delivered")

        wait_until(lambda: delivered() == 3, timeout=10, message="barnum_deliveries_total moves")
        snap = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
        assert value(snap, "barnum_delivery_duration_seconds_count") == 3
        assert ("barnum_queue_deliveries", (("state", "pending"),)) in snap
    finally:
        relay.stop()
        receiver.stop()

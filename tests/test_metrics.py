"""``GET /metrics`` on the shim: Prometheus text that parses and moves when
work happens (action links, callbacks, signature failures, queue gauges)."""

from __future__ import annotations

import hashlib
import hmac
import json

from pathlib import Path

import psycopg
import pytest
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

    from tests.pgcluster import free_port
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


def _per_child_delivered(metrics_dir: Path, pid: int, tmp_path: Path) -> float:
    """One child's ``barnum_deliveries_total{outcome="delivered"}``, read from
    its own multiprocess file alone."""
    import shutil

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    alone = tmp_path / f"child-{pid}"
    alone.mkdir()
    for f in metrics_dir.glob(f"counter_{pid}.db"):
        shutil.copy2(f, alone / f.name)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(alone))
    return value(samples(generate_latest(registry).decode()), "barnum_deliveries_total", outcome="delivered")


def test_relay_processes_metrics_port_sums_the_children(
        db_conn: psycopg.Connection, tmp_path: Path, db_url: str) -> None:
    """``barnum relay --processes 2 --metrics-port P``: the supervisor serves
    the sum of both children's counters (prometheus multiprocess mode) and
    removes its metrics directory when it stops."""
    import signal

    import httpx

    from tests.pgcluster import free_port
    from tests.helpers import wait_until
    from tests.receiver import Receiver, Reply
    from tests.test_relay import SECRET as RELAY_SECRET
    from tests.test_relay import RelayProcess, add_appointments, add_endpoint, all_sent

    receiver = Receiver([RELAY_SECRET.encode()]).start()
    # Slow replies and a window of one delivery per child: while one child
    # waits on its request the other claims, so both deliver.
    receiver.on("/slow", Reply(200, delay=0.3))
    port = free_port()
    relay = RelayProcess(db_url, tmp_path, [
        "--processes", "2", "--batch", "1", "--batches-in-flight", "1", "--concurrency", "1",
        "--sweep-interval", "0.5", "--metrics-port", str(port)], {})
    try:
        relay.wait_ready(processes=2)
        [started] = relay.logged("relay supervisor started")
        metrics_dir = Path(started["metrics_dir"])
        children = started["children"]
        assert len(children) == 2 and metrics_dir.is_dir()
        add_endpoint(db_conn, "m", receiver.url("/slow"))
        add_appointments(db_conn, 6)
        wait_until(lambda: all_sent(db_conn, 6), timeout=30, message="delivered")

        def scrape_port() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            try:
                return samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
            except httpx.HTTPError:
                return {}

        wait_until(lambda: value(scrape_port(), "barnum_deliveries_total", outcome="delivered") == 6,
                   timeout=10, message="barnum_deliveries_total sums both children")
        per_child = [_per_child_delivered(metrics_dir, pid, tmp_path) for pid in children]
        assert all(n > 0 for n in per_child) and sum(per_child) == 6, per_child
        snap = scrape_port()
        assert value(snap, "barnum_delivery_duration_seconds_count") == 6
        # The children refresh the queue gauges on their sweeps.
        wait_until(lambda: ("barnum_queue_deliveries", (("state", "pending"),)) in scrape_port(),
                   timeout=10, message="queue gauges")

        relay.signal(signal.SIGTERM)
        assert relay.wait(timeout=30) == 0, relay.stderr[-2000:]
        assert len(relay.logged("relay stopped")) == 2
        assert not metrics_dir.exists()
    finally:
        relay.stop()
        receiver.stop()


def test_run_metrics_port_serves_metrics(db_conn: psycopg.Connection, tmp_path: Path, db_url: str) -> None:
    """``barnum run --metrics-port P`` serves the relay's metrics (it used to
    accept the flag and ignore it)."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from tests.pgcluster import free_port
    from tests.helpers import wait_until
    from tests.receiver import Receiver
    from tests.test_relay import REPO_ROOT
    from tests.test_relay import SECRET as RELAY_SECRET
    from tests.test_relay import add_appointments, add_endpoint, all_sent

    receiver = Receiver([RELAY_SECRET.encode()]).start()
    port, shim_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("N8N_WEBHOOK_URL", "N8N_WEBHOOK_BASE_URL", "LISTEN_DATABASE_URL", "BARNUM_PUBLIC_URL")}
    env.update({"DATABASE_URL": db_url, "WEBHOOK_SECRET": RELAY_SECRET, "BARNUM_LOG_LEVEL": "INFO"})
    err = tmp_path / "run.err"
    with open(err, "wb") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "listener.cli", "run", "--port", str(shim_port), "--sweep-interval", "0.5",
             "--metrics-port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err_file)

    def scrape_port() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        if proc.poll() is not None:
            raise AssertionError(f"barnum run exited {proc.returncode}: {err.read_text()[-2000:]}")
        try:
            return samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
        except httpx.HTTPError:
            return {}

    try:
        wait_until(lambda: "relay started" in err.read_text(), timeout=20, message="barnum run started")
        add_endpoint(db_conn, "m", receiver.url("/ok"))
        add_appointments(db_conn, 3)
        wait_until(lambda: all_sent(db_conn, 3), timeout=20, message="delivered")
        wait_until(lambda: value(scrape_port(), "barnum_deliveries_total", outcome="delivered") == 3,
                   timeout=10, message="barnum_deliveries_total on --metrics-port")
        wait_until(lambda: ("barnum_queue_deliveries", (("state", "pending"),)) in scrape_port(),
                   timeout=10, message="queue gauges refreshed by the sweep")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, err.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        receiver.stop()


def test_run_refuses_relay_only_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """``barnum run --once`` / ``--processes N`` are usage errors naming the
    flag and what to run instead — never silently ignored."""

    from listener import cli

    for argv, advice in ((["run", "--once"], "barnum relay --once"),
                         (["run", "--processes", "2"], "barnum relay --processes N")):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"{argv[1]} is not supported by `barnum run`" in err
        assert advice in err

"""The relay against a real PostgreSQL and real HTTP over loopback (issue 3).

The relay runs as a subprocess (``python -m listener.relay``) exactly as in
production, except for the in-process ``run_once`` test.  The receiver
(tests/receiver.py) verifies both signatures of every request and answers
per path.  Nothing here sleeps to synchronise: every wait is a condition
with a deadline (``wait_until``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest

from listener.transport import Transport, is_retryable, parse_retry_after, redact_url
from tests.helpers import wait_until
from tests.receiver import Receiver, Reply

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "relay-test-secret"

pytestmark = pytest.mark.timeout(90)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([SECRET.encode()]).start()
    yield r
    r.stop()


class RelayProcess:
    """``python -m listener.relay`` with its stdout/stderr in files."""

    def __init__(self, db_url: str, workdir: Path, args: list[str], env: dict[str, str]) -> None:
        self.name = f"relay-{uuid.uuid4().hex[:6]}"
        self.out_path = workdir / f"{self.name}.out"
        self.err_path = workdir / f"{self.name}.err"
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("N8N_WEBHOOK_URL", "N8N_WEBHOOK_BASE_URL", "LISTEN_DATABASE_URL",
                                 "BARNUM_PUBLIC_URL")}
        full_env.update({"DATABASE_URL": db_url, "WEBHOOK_SECRET": SECRET,
                         "BARNUM_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"})
        full_env.update(env)
        for key in [k for k, v in full_env.items() if v is None]:
            del full_env[key]
        self.args = args
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "listener.relay", *args],
                cwd=REPO_ROOT, env=full_env, stdout=out, stderr=err,
            )

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.stderr.splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append({"msg": "(not json)", "raw": line})
        return lines

    def logged(self, msg: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("msg") == msg]

    def wait_ready(self, timeout: float = 20.0, processes: int = 1) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited with {self.proc.returncode}: {self.stderr[-2000:]}")
            return len(self.logged("relay started")) >= processes

        wait_until(ready, timeout=timeout, message="relay started")

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout=timeout)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def start_relay(db_url: str, tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    started: list[RelayProcess] = []

    def start(*args: str, ready: bool = True, env: dict[str, str] | None = None) -> RelayProcess:
        relay = RelayProcess(db_url, tmp_path, list(args), env or {})
        started.append(relay)
        if ready and "--once" not in args:
            processes = int(args[args.index("--processes") + 1]) if "--processes" in args else 1
            relay.wait_ready(processes=processes)
        return relay

    yield start
    for relay in started:
        relay.stop()


def run_once(db_url: str, *args: str, env: dict[str, str] | None = None,
             timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("N8N_WEBHOOK_URL", "N8N_WEBHOOK_BASE_URL", "LISTEN_DATABASE_URL")}
    full_env.update({"DATABASE_URL": db_url, "WEBHOOK_SECRET": SECRET, "BARNUM_LOG_LEVEL": "INFO"})
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "listener.relay", "--once", *args], cwd=REPO_ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- data


Conn = psycopg.Connection[Any]


def add_endpoint(conn: Conn, name: str, url: str, *, secret: str | None = None,
                 event_types: list[str] | None = None, timeout_ms: int | None = None,
                 max_attempts: int | None = None) -> str:
    row = conn.execute(
        """INSERT INTO barnum.webhook_endpoints (name, url, secret, event_types, timeout_ms, max_attempts)
           VALUES (%s, %s, %s, coalesce(%s, '{*}'::text[]), coalesce(%s, 10000), %s) RETURNING id""",
        (name, url, secret, event_types, timeout_ms, max_attempts),
    ).fetchone()
    assert row is not None
    return str(row[0])


def add_patient(conn: Conn, name: str = "João Silva", phone: str = "+351912345678") -> str:
    row = conn.execute("INSERT INTO barnum.patients (name, phone) VALUES (%s, %s) RETURNING id",
                       (name, phone)).fetchone()
    assert row is not None
    return str(row[0])


def add_appointments(conn: Conn, n: int = 1, patient: str | None = None) -> list[str]:
    """``n`` appointments in 3 days, in one statement (one NOTIFY); their event ids."""
    patient = patient or add_patient(conn)
    appts = conn.execute(
        """INSERT INTO barnum.appointments (patient_id, starts_at)
           SELECT %s, now() + interval '3 days' + g * interval '1 minute'
             FROM generate_series(1, %s) g RETURNING id""",
        (patient, n),
    ).fetchall()
    rows = conn.execute(
        """SELECT e.id FROM barnum.whatsapp_events e
            WHERE e.entity_id = ANY(%s) AND e.event_type = 'appointment.pre_confirmed'""",
        ([a[0] for a in appts],),
    ).fetchall()
    assert len(rows) == n
    return [str(r[0]) for r in rows]


def set_setting(conn: Conn, key: str, value: Any) -> None:
    conn.execute("UPDATE barnum.settings SET value = %s::jsonb WHERE key = %s", (json.dumps(value), key))


def deliveries(conn: Conn, where: str = "true", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    cur = conn.execute(
        f"""SELECT d.id, d.event_id::text, d.endpoint_id::text, d.status, d.attempts, d.last_http_status,
                   d.last_error, d.locked_by
              FROM barnum.webhook_deliveries d WHERE {where} ORDER BY d.id""", params)
    cols = [c.name for c in cur.description or []]
    return [dict(zip(cols, row)) for row in cur.fetchall()]


def attempts(conn: Conn, delivery_id: int) -> list[dict[str, Any]]:
    cur = conn.execute(
        """SELECT attempt, http_status, error, response_body, duration_ms
             FROM barnum.webhook_attempts WHERE delivery_id = %s ORDER BY id""", (delivery_id,))
    cols = [c.name for c in cur.description or []]
    return [dict(zip(cols, row)) for row in cur.fetchall()]


def statuses(conn: Conn) -> dict[str, int]:
    return dict(conn.execute(
        "SELECT status, count(*)::int FROM barnum.webhook_deliveries GROUP BY status").fetchall())


def all_sent(conn: Conn, n: int) -> bool:
    return statuses(conn).get("sent", 0) == n


def assert_log_hygiene(relay_log: str, *forbidden: str) -> None:
    for needle in (SECRET, "token=", *forbidden):
        assert needle not in relay_log, f"{needle!r} leaked into the relay's log"
    for line in relay_log.splitlines():
        json.loads(line)  # one JSON object per line


# ---------------------------------------------------------------- wake-ups


def test_notify_wakes_the_relay_without_a_sweep(db_conn: Conn, receiver: Receiver,
                                                start_relay: Callable[..., RelayProcess]) -> None:
    add_endpoint(db_conn, "hooks", receiver.url("/hooks"))
    relay = start_relay("--sweep-interval", "3600")
    patient = add_patient(db_conn)
    add_appointments(db_conn, 1, patient)
    wait_until(lambda: all_sent(db_conn, 1), message="a first delivery")
    # The relay is past its start-up sweep and idle: no sweep for an hour,
    # nothing due for a timer.  Only the notification can wake it now.
    t0 = time.time()
    [event_id] = add_appointments(db_conn, 1, patient)
    wait_until(lambda: receiver.count() == 2, timeout=5, message="delivery woken by NOTIFY")
    hit = receiver.snapshot()[1]
    assert hit.received_at - t0 < 2.0
    assert hit.hex_ok and hit.std_ok
    assert hit.event_id == event_id == hit.headers["webhook-id"]
    assert hit.event_type == "appointment.pre_confirmed"
    assert hit.headers["Content-Type"] == "application/json"
    created = db_conn.execute("SELECT extract(epoch FROM created_at)::bigint FROM barnum.whatsapp_events "
                              "WHERE id = %s", (event_id,)).fetchone()
    assert created is not None
    assert hit.headers["X-Idempotency-Key"] == f"{event_id}-{created[0]}"
    body = hit.json
    assert body["event_id"] == event_id and body["event_type"] == "appointment.pre_confirmed"
    assert set(body["action_links"]) == {"confirm", "cancel", "reschedule"}
    wait_until(lambda: all_sent(db_conn, 2), message="delivery recorded as sent")
    [d] = deliveries(db_conn, "d.event_id = %s", (event_id,))
    assert d["attempts"] == 1 and d["last_http_status"] == 200 and d["locked_by"] is None
    ev = db_conn.execute("SELECT status FROM barnum.whatsapp_events WHERE id = %s", (event_id,)).fetchone()
    assert ev == ("sent",)
    wait_until(lambda: len(relay.logged("delivery")) == 2, message="delivery log lines")
    [line] = [x for x in relay.logged("delivery") if x["event_id"] == event_id]
    assert line["event_id"] == event_id and line["status"] == "delivered"
    assert line["attempt"] == 1 and line["endpoint_id"] == d["endpoint_id"] and "duration_ms" in line
    assert_log_hygiene(relay.stderr, body["appointment"]["patient"]["phone"])


def idle_relay_with_a_no_show_queued(db_conn: Conn, receiver: Receiver, start_relay: Callable[..., RelayProcess],
                                     delay: str) -> tuple[RelayProcess, str, str, float]:
    """A relay (no sweep for an hour) idle after a first delivery, then a
    no-show event due ``delay`` from now: (relay, patient, its event id, due)."""
    set_setting(db_conn, "no_show_delay", delay)
    add_endpoint(db_conn, "hooks", receiver.url("/hooks"))
    relay = start_relay("--sweep-interval", "3600")
    patient = add_patient(db_conn)
    add_appointments(db_conn, 1, patient)
    wait_until(lambda: all_sent(db_conn, 1), message="a first delivery: the relay is idle now")
    # One transaction: an appointment (its pre_confirmed event is due now,
    # so the commit notifies) turns into a no-show, whose event is due later
    # and notifies nobody.  The relay wakes for the first, skips it (the
    # appointment is no longer live), and arms its timer at next_due_at();
    # with the sweep an hour away only that timer can send the no-show.
    with db_conn.transaction():
        appt = db_conn.execute(
            "INSERT INTO barnum.appointments (patient_id, starts_at) VALUES (%s, now() + interval '1 day') "
            "RETURNING id", (patient,)).fetchone()
        assert appt is not None
        db_conn.execute("UPDATE barnum.appointments SET status = 'no_show' WHERE id = %s", (appt[0],))
    row = db_conn.execute(
        "SELECT id::text, extract(epoch FROM scheduled_for)::float8 FROM barnum.whatsapp_events "
        "WHERE event_type = 'appointment.no_show'").fetchone()
    assert row is not None
    return relay, patient, row[0], row[1]


def test_delayed_event_goes_out_at_its_due_time_via_the_timer(
        db_conn: Conn, receiver: Receiver, start_relay: Callable[..., RelayProcess]) -> None:
    relay, _, event_id, due = idle_relay_with_a_no_show_queued(db_conn, receiver, start_relay, "2 seconds")
    wait_until(lambda: receiver.count() >= 2, timeout=8, message="the delayed no-show event")
    hit = receiver.snapshot()[1]
    assert hit.event_id == event_id and hit.event_type == "appointment.no_show"
    assert due - 0.05 <= hit.received_at <= due + 2.5, (hit.received_at - due)
    pre = deliveries(db_conn, "d.event_id <> %s AND d.status <> 'sent'", (event_id,))
    assert [(d["status"], d["last_error"]) for d in pre] == [("skipped", "appointment is no_show")]
    assert relay.proc.poll() is None


def test_sparse_events_are_each_woken_and_the_timer_survives_them(
        db_conn: Conn, receiver: Receiver, start_relay: Callable[..., RelayProcess]) -> None:
    # Sparse traffic: each event is one one-row claim, after which the relay
    # keeps its waiter registration and its timer without calling relay_idle.
    # Each event must still be woken by its own NOTIFY (the sweep is an hour
    # away), and a delayed event armed before them must go out on time.
    relay, patient, no_show_id, due = idle_relay_with_a_no_show_queued(db_conn, receiver, start_relay, "3 seconds")
    wait_until(lambda: db_conn.execute(
        "SELECT count(*) FROM barnum.webhook_deliveries WHERE status = 'skipped'").fetchone() == (1,),
        message="the relay woke for the skipped pre-confirmation and armed its timer")
    sparse: list[str] = []
    for n in range(4):
        t0 = time.time()
        [event_id] = add_appointments(db_conn, 1, patient)
        sparse.append(event_id)
        wait_until(lambda: receiver.count() == 2 + n, timeout=5, message=f"sparse event {n + 1} woken by NOTIFY")
        hit = receiver.snapshot()[-1]
        assert hit.event_id == event_id
        assert hit.received_at - t0 < 2.0, hit.received_at - t0
    assert time.time() < due, "the sparse events went out before the delayed one was due"
    wait_until(lambda: receiver.count() == 6, timeout=8, message="the delayed no-show event")
    hit = receiver.snapshot()[-1]
    assert hit.event_id == no_show_id and hit.event_type == "appointment.no_show"
    assert due - 0.05 <= hit.received_at <= due + 2.5, (hit.received_at - due)
    assert relay.proc.poll() is None


# ---------------------------------------------------------------- retries


def test_retry_then_success(db_conn: Conn, receiver: Receiver,
                            start_relay: Callable[..., RelayProcess]) -> None:
    set_setting(db_conn, "backoff_base_seconds", 1)
    receiver.on("/flaky", lambda n: Reply(500, body="oops") if n == 1 else Reply(200))
    add_endpoint(db_conn, "flaky", receiver.url("/flaky"))
    start_relay("--sweep-interval", "3600")
    [event_id] = add_appointments(db_conn, 1)
    wait_until(lambda: all_sent(db_conn, 1), timeout=30, message="delivered on the second attempt")
    hits = receiver.snapshot("/flaky")
    assert [h.attempt for h in hits] == [1, 2] and all(h.event_id == event_id for h in hits)
    assert hits[1].received_at - hits[0].received_at >= 0.75  # 1 s base backoff, -20 % jitter
    [d] = deliveries(db_conn)
    assert d["attempts"] == 2 and d["last_error"] is None
    audit = attempts(db_conn, d["id"])
    assert [(a["attempt"], a["http_status"]) for a in audit] == [(1, 500), (2, 200)]
    assert audit[0]["response_body"] == "oops"


def test_client_error_is_dead_letter_after_one_attempt(db_url: str, db_conn: Conn, receiver: Receiver) -> None:
    receiver.on("/reject", Reply(422, body='{"error":"unknown template"}'))
    add_endpoint(db_conn, "reject", receiver.url("/reject"))
    [event_id] = add_appointments(db_conn, 1)
    done = run_once(db_url)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["claimed"], summary["delivered"], summary["dead"], summary["retried"]) == (1, 0, 1, 0)
    [d] = deliveries(db_conn)
    assert (d["status"], d["attempts"], d["last_http_status"]) == ("dead_letter", 1, 422)
    [a] = attempts(db_conn, d["id"])
    assert a["http_status"] == 422 and a["response_body"] == '{"error":"unknown template"}'
    ev = db_conn.execute("SELECT e.status, w.status FROM barnum.whatsapp_events e "
                         "JOIN barnum.whatsapp_workflows w ON w.id = e.workflow_id WHERE e.id = %s",
                         (event_id,)).fetchone()
    assert ev == ("dead_letter", "failed")
    # Nothing is due any more: a second pass sends nothing.
    again = run_once(db_url)
    assert json.loads(again.stdout)["claimed"] == 0 and receiver.count() == 1


def test_timeout_is_retried(db_conn: Conn, receiver: Receiver,
                            start_relay: Callable[..., RelayProcess]) -> None:
    set_setting(db_conn, "backoff_base_seconds", 1)
    receiver.on("/slow", lambda n: Reply(200, delay=3.0) if n == 1 else Reply(200))
    add_endpoint(db_conn, "slow", receiver.url("/slow"), timeout_ms=300)
    start_relay("--sweep-interval", "3600")
    add_appointments(db_conn, 1)
    wait_until(lambda: all_sent(db_conn, 1), timeout=30, message="delivered after a timeout")
    [d] = deliveries(db_conn)
    audit = attempts(db_conn, d["id"])
    assert len(audit) == 2 and d["attempts"] == 2
    assert audit[0]["http_status"] is None and audit[0]["error"] == "timeout after 300 ms"
    assert 250 <= audit[0]["duration_ms"] <= 2000
    assert audit[1]["http_status"] == 200


def test_retry_after_is_honoured(db_conn: Conn, receiver: Receiver,
                                 start_relay: Callable[..., RelayProcess]) -> None:
    set_setting(db_conn, "backoff_base_seconds", 1)
    receiver.on("/busy", lambda n: Reply(429, headers={"Retry-After": "3"}) if n == 1 else Reply(200))
    add_endpoint(db_conn, "busy", receiver.url("/busy"))
    start_relay("--sweep-interval", "3600")
    add_appointments(db_conn, 1)
    wait_until(lambda: all_sent(db_conn, 1), timeout=30, message="delivered after Retry-After")
    first, second = receiver.snapshot("/busy")
    assert second.received_at - first.received_at >= 3.0  # backoff alone would be ~1 s
    assert second.received_at - first.received_at < 30.0  # …and the timer, not the hour-long sweep, fired


# ---------------------------------------------------------------- signing and routing


def test_secret_rotation_signs_with_the_first_secret(db_url: str, db_conn: Conn, receiver: Receiver) -> None:
    receiver.keys_for("/rotated", [b"new-secret"])  # the receiver only knows the new one
    add_endpoint(db_conn, "rotated", receiver.url("/rotated"))
    add_appointments(db_conn, 2)
    done = run_once(db_url, env={"WEBHOOK_SECRET": "new-secret,old-secret"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["delivered"] == 2
    hits = receiver.snapshot("/rotated")
    assert len(hits) == 2 and not receiver.bad_signatures()
    assert "new-secret" not in done.stderr and "old-secret" not in done.stderr


def test_per_endpoint_secret_overrides_webhook_secret(db_url: str, db_conn: Conn, receiver: Receiver) -> None:
    key = os.urandom(24)
    own = "whsec_" + base64.b64encode(key).decode()
    receiver.keys_for("/own", [key])
    add_endpoint(db_conn, "own", receiver.url("/own"), secret=own)
    add_endpoint(db_conn, "shared", receiver.url("/shared"))
    add_appointments(db_conn, 1)
    done = run_once(db_url)
    assert done.returncode == 0, done.stderr
    assert receiver.count("/own") == 1 and receiver.count("/shared") == 1
    assert not receiver.bad_signatures()
    hit = receiver.snapshot("/own")[0]
    assert hit.headers["X-Webhook-Signature"] == hmac.new(key, hit.body, hashlib.sha256).hexdigest()
    assert hit.headers["X-Webhook-Signature"] != hmac.new(SECRET.encode(), hit.body, hashlib.sha256).hexdigest()
    assert own not in done.stderr


def test_event_type_placeholder_in_url(db_conn: Conn, receiver: Receiver,
                                       start_relay: Callable[..., RelayProcess]) -> None:
    add_endpoint(db_conn, "typed", receiver.url("/hooks/{event_type}?key=sekrit-query-value"))
    relay = start_relay("--sweep-interval", "3600")
    add_appointments(db_conn, 1)
    wait_until(lambda: all_sent(db_conn, 1), message="delivery")
    [hit] = receiver.snapshot()
    assert hit.path == "/hooks/appointment.pre_confirmed"
    assert hit.query == "key=sekrit-query-value"
    assert_log_hygiene(relay.stderr, "sekrit-query-value")


def test_fan_out_to_two_endpoints(db_url: str, db_conn: Conn, receiver: Receiver) -> None:
    a = add_endpoint(db_conn, "a", receiver.url("/a"))
    b = add_endpoint(db_conn, "b", receiver.url("/b"), event_types=["appointment.*"])
    add_endpoint(db_conn, "patients-only", receiver.url("/c"), event_types=["patient.*"])
    events = add_appointments(db_conn, 3)
    done = run_once(db_url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["delivered"] == 6
    assert receiver.per_event("/a") == {e: 1 for e in events}
    assert receiver.per_event("/b") == {e: 1 for e in events}
    assert receiver.count("/c") == 0
    rows = deliveries(db_conn)
    assert sorted({r["endpoint_id"] for r in rows}) == sorted({a, b})
    assert all(r["status"] == "sent" for r in rows)


# ---------------------------------------------------------------- crashes and signals


def test_sigkill_mid_batch_then_restart_delivers_every_event(
        db_conn: Conn, receiver: Receiver, start_relay: Callable[..., RelayProcess]) -> None:
    receiver.on("/work", Reply(200, delay=0.05))
    add_endpoint(db_conn, "work", receiver.url("/work"))
    args = ("--concurrency", "4", "--batch", "20", "--lease", "2", "--sweep-interval", "3600")
    first = start_relay(*args)
    events = add_appointments(db_conn, 120)
    wait_until(lambda: receiver.count() >= 10, message="some deliveries before the kill")
    first.signal(signal.SIGKILL)
    first.wait()
    assert statuses(db_conn).get("processing", 0) > 0  # claimed rows left behind
    start_relay(*args)
    wait_until(lambda: all_sent(db_conn, 120), timeout=30, message="every delivery sent after restart")
    counts = receiver.per_event("/work")
    assert set(counts) == set(events)
    duplicated = [e for e, n in counts.items() if n > 1]
    assert all(n <= 2 for n in counts.values())
    assert len(duplicated) <= 2 * 20  # at most the batches in flight at the kill
    lost = db_conn.execute("SELECT count(*) FROM barnum.webhook_attempts WHERE error LIKE 'lease expired%'"
                           ).fetchone()
    assert lost is not None and lost[0] > 0
    assert not receiver.bad_signatures()


def test_sigterm_finishes_in_flight_work_and_exits_zero(
        db_conn: Conn, receiver: Receiver, start_relay: Callable[..., RelayProcess]) -> None:
    receiver.on("/work", Reply(200, delay=0.3))
    add_endpoint(db_conn, "work", receiver.url("/work"))
    relay = start_relay("--concurrency", "4", "--batch", "10", "--sweep-interval", "3600")
    add_appointments(db_conn, 40)
    wait_until(lambda: receiver.count() >= 4, message="requests in flight")
    relay.signal(signal.SIGTERM)
    assert relay.wait(timeout=15) == 0, relay.stderr[-2000:]
    st = statuses(db_conn)
    assert st.get("processing", 0) == 0, st
    received = set(receiver.per_event())
    sent = {d["event_id"] for d in deliveries(db_conn, "d.status = 'sent'")}
    assert received == sent and len(sent) >= 4  # every started request finished and was recorded
    released = deliveries(db_conn, "d.status = 'pending'")
    assert len(released) == 40 - len(sent) and all(d["attempts"] == 0 for d in released)
    assert relay.logged("relay stopped")


def test_sigterm_after_grace_releases_what_is_still_in_flight(
        db_conn: Conn, receiver: Receiver, start_relay: Callable[..., RelayProcess]) -> None:
    receiver.on("/stuck", Reply(200, delay=30))
    add_endpoint(db_conn, "stuck", receiver.url("/stuck"))
    relay = start_relay("--grace", "0.5", "--sweep-interval", "3600")
    add_appointments(db_conn, 1)
    wait_until(lambda: receiver.count() == 1, message="request in flight")
    started = time.monotonic()
    relay.signal(signal.SIGTERM)
    assert relay.wait(timeout=15) == 0, relay.stderr[-2000:]
    assert time.monotonic() - started < 5
    [d] = deliveries(db_conn)
    assert (d["status"], d["attempts"], d["locked_by"]) == ("pending", 0, None)
    assert relay.logged("released unfinished deliveries")


def test_a_slow_request_does_not_hold_back_later_events(
        db_conn: Conn, receiver: Receiver, start_relay: Callable[..., RelayProcess]) -> None:
    # The first request ever hangs for 20 s (the endpoint waits 30 s); the
    # relay must keep claiming and delivering newer events meanwhile.
    calls: list[int] = []

    def script(attempt: int) -> Reply:
        calls.append(attempt)
        return Reply(200, delay=20.0) if len(calls) == 1 else Reply(200)

    receiver.on("/hooks", script)
    add_endpoint(db_conn, "hooks", receiver.url("/hooks"), timeout_ms=30000)
    start_relay("--sweep-interval", "3600", "--grace", "0.5")
    patient = add_patient(db_conn)
    [slow] = add_appointments(db_conn, 1, patient)
    wait_until(lambda: receiver.count() == 1, message="the slow request in flight")
    later = add_appointments(db_conn, 3, patient)
    # (The deadline is shorter than the slow request: a relay that waited
    # for it would fail here.)
    wait_until(lambda: len(deliveries(db_conn, "d.status = 'sent'")) == 3, timeout=15,
               message="later events delivered while the slow one hangs")
    assert {d["event_id"] for d in deliveries(db_conn, "d.status = 'sent'")} == set(later)
    [held] = deliveries(db_conn, "d.event_id = %s", (slow,))
    assert held["status"] == "processing" and held["attempts"] == 1


def test_two_relays_never_deliver_a_claimed_row_twice(
        db_conn: Conn, receiver: Receiver, start_relay: Callable[..., RelayProcess]) -> None:
    receiver.on("/work", Reply(200, delay=0.005))
    add_endpoint(db_conn, "work", receiver.url("/work"))
    args = ("--concurrency", "8", "--batch", "10", "--sweep-interval", "3600")
    one, two = start_relay(*args), start_relay(*args)
    events = add_appointments(db_conn, 300)
    wait_until(lambda: all_sent(db_conn, 300), timeout=30, message="all 300 delivered")
    counts = receiver.per_event("/work")
    assert set(counts) == set(events)
    assert max(counts.values()) == 1, [e for e, n in counts.items() if n > 1][:5]
    wait_until(lambda: len(one.logged("delivery")) + len(two.logged("delivery")) == 300,
               message="delivery logs")
    assert one.logged("delivery") and two.logged("delivery")  # both did work


def test_processes_2_runs_two_relays_and_stops_both(
        db_conn: Conn, receiver: Receiver, start_relay: Callable[..., RelayProcess]) -> None:
    receiver.on("/work", Reply(200, delay=0.01))
    add_endpoint(db_conn, "work", receiver.url("/work"))
    relay = start_relay("--processes", "2", "--concurrency", "4", "--batch", "5", "--sweep-interval", "3600")
    workers = {line["worker"] for line in relay.logged("relay started")}
    assert len(workers) == 2 and len({w.split(":")[1] for w in workers}) == 2  # two pids
    events = add_appointments(db_conn, 60)
    wait_until(lambda: all_sent(db_conn, 60), timeout=30, message="all delivered")
    assert receiver.per_event("/work") == {e: 1 for e in events}
    relay.signal(signal.SIGTERM)
    assert relay.wait(timeout=20) == 0, relay.stderr[-2000:]
    wait_until(lambda: len(relay.logged("relay stopped")) == 2, message="both relays stopped")
    assert statuses(db_conn).get("processing", 0) == 0


def test_database_restart_while_running(pg_cluster: Any, db_url: str, db_conn: Conn, receiver: Receiver,
                                        start_relay: Callable[..., RelayProcess]) -> None:
    if not getattr(pg_cluster, "can_restart", False):
        pytest.skip("this PostgreSQL server cannot be restarted by the tests")
    add_endpoint(db_conn, "hooks", receiver.url("/hooks"))
    patient = add_patient(db_conn)
    relay = start_relay("--sweep-interval", "0.5")
    add_appointments(db_conn, 1, patient)
    wait_until(lambda: receiver.count() == 1, message="delivery before the restart")
    pg_cluster.restart()
    with psycopg.connect(db_url, autocommit=True) as conn:
        add_appointments(conn, 2, patient)
        wait_until(lambda: receiver.count() == 3, timeout=30, message="deliveries after the restart")
        wait_until(lambda: all_sent(conn, 3), timeout=15, message="recorded after the restart")
    assert relay.proc.poll() is None  # the same process, never restarted
    wait_until(lambda: relay.logged("LISTEN connection restored"), message="listener reconnected")


# ---------------------------------------------------------------- --once, config, in-process


def test_once_prints_a_summary_and_ensures_the_n8n_endpoint(db_url: str, db_conn: Conn, receiver: Receiver) -> None:
    receiver.on("/reject", Reply(400))
    receiver.on("/down", Reply(503))
    add_endpoint(db_conn, "reject", receiver.url("/reject"))
    add_endpoint(db_conn, "down", receiver.url("/down"))
    n8n = {"N8N_WEBHOOK_URL": receiver.url("/n8n")}
    first = run_once(db_url, env=n8n)  # creates the n8n endpoint; nothing due yet
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["claimed"] == 0
    add_appointments(db_conn, 3)
    done = run_once(db_url, env=n8n)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["success"] is True
    assert (summary["claimed"], summary["delivered"], summary["retried"], summary["dead"]) == (9, 3, 3, 3)
    assert summary["skipped"] == 0 and isinstance(summary["duration"], float)
    assert len(summary["errors"]) == 6
    assert receiver.count("/n8n") == 3
    # The operator disables n8n; a new URL re-points it but never re-enables it.
    db_conn.execute("UPDATE barnum.webhook_endpoints SET is_active = false WHERE name = 'n8n'")
    again = run_once(db_url, env={"N8N_WEBHOOK_URL": receiver.url("/n8n-v2")})
    assert again.returncode == 0, again.stderr
    row = db_conn.execute("SELECT url, is_active FROM barnum.webhook_endpoints WHERE name = 'n8n'").fetchone()
    assert row == (receiver.url("/n8n-v2"), False)


@pytest.mark.parametrize("missing", ["DATABASE_URL", "WEBHOOK_SECRET"])
def test_missing_configuration_exits_2_with_one_line(db_url: str, missing: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "WEBHOOK_SECRET")}
    env.update({"DATABASE_URL": db_url, "WEBHOOK_SECRET": SECRET})
    del env[missing]
    done = subprocess.run([sys.executable, "-m", "listener.relay"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and missing in lines[0], done.stderr


async def test_run_once_in_process_returns_the_seed_summary(db_url: str, db_conn: Conn,
                                                           receiver: Receiver) -> None:
    from listener.config import load
    from listener.db import create_pool
    from listener.relay import run_once as relay_run_once
    from listener.relay import worker_name

    receiver.on("/down", Reply(500))
    add_endpoint(db_conn, "ok", receiver.url("/ok"))
    add_endpoint(db_conn, "down", receiver.url("/down"))
    add_appointments(db_conn, 2)
    config = load({"DATABASE_URL": db_url, "WEBHOOK_SECRET": SECRET})
    pool = await create_pool(db_url, min_size=1, max_size=3)
    try:
        async with Transport(8) as transport:
            summary = await relay_run_once(pool, transport, config, worker_name())
    finally:
        await pool.close()
    assert summary["success"] is True and summary["processed"] == 2 and summary["failed"] == 2
    assert len(summary["errors"]) == 2 and all("HTTP 500" in e for e in summary["errors"])
    assert set(summary) == {"success", "processed", "failed", "errors"}


# ---------------------------------------------------------------- transport


def test_retry_after_parsing() -> None:
    now = datetime(2026, 1, 28, 10, 0, 0, tzinfo=timezone.utc).timestamp()
    assert parse_retry_after("120", now=now) == 120.0
    assert parse_retry_after(" 0 ", now=now) == 0.0
    assert parse_retry_after("Wed, 28 Jan 2026 10:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 28 Jan 2026 09:00:00 GMT", now=now) == 0.0  # in the past
    assert parse_retry_after("99999999", now=now) == 86400.0
    for junk in (None, "", "soon", "-5", "1.5"):
        assert parse_retry_after(junk, now=now) is None


def test_classification() -> None:
    assert all(is_retryable(s) for s in (408, 425, 429, 500, 502, 503, 504, 599))
    assert not any(is_retryable(s) for s in (400, 401, 403, 404, 409, 410, 413, 422, 301))
    assert is_retryable(None, "timeout after 10000 ms")
    assert is_retryable(None, "ClientConnectorError: Cannot connect")
    assert not is_retryable(None, "invalid request: InvalidURL: x")
    assert redact_url("https://u:p@h.example:8443/p/a?token=x#f") == "https://h.example:8443/p/a"


async def test_transport_keeps_4_kib_and_reports_connection_errors(receiver: Receiver) -> None:
    receiver.on("/big", Reply(502, body="x" * 10000, headers={"Retry-After": "7"}))
    receiver.unsigned("/big")
    async with Transport(4) as transport:
        big = await transport.post(receiver.url("/big"), b"{}", {"Content-Type": "application/json"}, 2000)
        assert big.status == 502 and big.retryable and not big.ok
        assert big.body == "x" * 4096 and big.retry_after == 7.0
        refused = await transport.post("http://127.0.0.1:9/x?token=abc", b"{}", {}, 2000)
        assert refused.status is None and refused.retryable and refused.error
        assert "token=abc" not in refused.error
        bad = await transport.post("http://[bad/x?token=abc", b"{}", {}, 2000)
        assert bad.status is None and not bad.retryable and "token=abc" not in (bad.error or "")

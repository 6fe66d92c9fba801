"""NOTIFY only while a relay waits (SPEC §2.4, issue 7): a busy system pays
no commit-serialising NOTIFY; an idle relay is woken for due and delayed work."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg


def _listener(db_url: str) -> psycopg.Connection:
    conn = psycopg.connect(db_url, autocommit=True)
    conn.execute("LISTEN barnum_events")
    return conn


def _notified(conn: psycopg.Connection, timeout: float) -> bool:
    # Waiting on the socket with a deadline, not sleeping: returns at once
    # when a notification arrives.
    for _ in conn.notifies(timeout=timeout, stop_after=1):
        return True
    return False


def _book(db_conn: psycopg.Connection, starts_in: timedelta = timedelta(days=3)) -> None:
    db_conn.execute(
        """WITH p AS (INSERT INTO barnum.patients (name, phone) VALUES ('Ana', '+351911111111') RETURNING id)
           INSERT INTO barnum.appointments (patient_id, starts_at) SELECT id, %s FROM p""",
        (datetime.now(timezone.utc) + starts_in,))


def test_no_notify_while_no_relay_waits(db_url: str, db_conn: psycopg.Connection) -> None:
    db_conn.execute("INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('e', 'http://127.0.0.1:9/x')")
    listen = _listener(db_url)
    try:
        _book(db_conn)
        assert not _notified(listen, 0.5), "nobody waits: the insert must not NOTIFY"
        assert db_conn.execute(
            "SELECT count(*) FROM barnum.webhook_deliveries WHERE status = 'pending'").fetchone() == (1,)
    finally:
        listen.close()


def test_an_idle_relay_is_notified(db_url: str, db_conn: psycopg.Connection) -> None:
    db_conn.execute("INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('e', 'http://127.0.0.1:9/x')")
    listen = _listener(db_url)
    try:
        db_conn.execute("SELECT barnum.relay_idle('relay-1', '30 seconds')")
        _book(db_conn)
        assert _notified(listen, 10), "a waiting relay must be woken"
    finally:
        listen.close()


def test_a_delayed_event_wakes_an_idle_relay_for_its_timer(db_url: str, db_conn: psycopg.Connection) -> None:
    db_conn.execute("INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('e', 'http://127.0.0.1:9/x')")
    _book(db_conn)
    appt = db_conn.execute("SELECT id FROM barnum.appointments").fetchone()[0]  # type: ignore[index]
    listen = _listener(db_url)
    try:
        db_conn.execute("SELECT barnum.relay_idle('relay-1', '30 seconds')")
        db_conn.execute("UPDATE barnum.appointments SET status = 'no_show' WHERE id = %s", (appt,))
        assert _notified(listen, 10), "delayed work notifies a waiting relay so it re-reads next_due_at()"
        due = db_conn.execute("SELECT barnum.next_due_at()").fetchone()[0]  # type: ignore[index]
        assert due is not None
    finally:
        listen.close()


def test_a_lapsed_registration_stops_notifications(db_url: str, db_conn: psycopg.Connection) -> None:
    db_conn.execute("INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('e', 'http://127.0.0.1:9/x')")
    # A relay that died while waiting: its registration has expired.
    db_conn.execute("INSERT INTO barnum.relay_waiters VALUES ('dead', now() - interval '1 second')")
    listen = _listener(db_url)
    try:
        _book(db_conn)
        assert not _notified(listen, 0.5)
    finally:
        listen.close()

"""Operator commands (``barnum endpoints | dlq | status | settings``), end to end.

Every test runs the installed ``barnum`` script as a subprocess against a fresh
migrated database (``db_url``) and checks the database through ``db_conn``.

Error convention checked everywhere: exit status 2, exactly one non-empty line
on stderr starting with ``barnum ``, and the database left exactly as it was
(a snapshot of every table the commands touch, compared before and after).

Speed: a fresh database costs most of a second, so each test covers one
command's whole story; error cases, which must not change anything, run as
concurrent subprocesses and the snapshot is compared once afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow

BARNUM = Path(sys.executable).parent / "barnum"

SECRET = "s3cr3t-Never-Print-Me-0123456789"

DEFAULT_SETTINGS: dict[str, Any] = {
    "public_base_url": "http://127.0.0.1:8000",
    "timezone": "Europe/Lisbon",
    "locale": "pt",
    "token_ttl": "7 days",
    "no_show_delay": "1 hour",
    "review_delay": "2 hours",
    "reminder_lead": "24 hours",
    "reactivation_after": "30 days",
    "max_attempts": 4,
    "backoff_base_seconds": 5,
    "backoff_max_seconds": 3600,
    "retention": "90 days",
    "one_click_actions": False,
    "endpoint_failure_threshold": 20,
    "endpoint_disable_after": "5 days",
}

Conn = psycopg.Connection[TupleRow]
Result = subprocess.CompletedProcess[str]


# ------------------------------------------------------------------ running barnum


def _env(url: str | None, extra_env: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BARNUM_LOG_LEVEL")}
    if url is not None:
        env["DATABASE_URL"] = url
    env.update(extra_env or {})
    return env


def barnum(*args: str, url: str | None, extra_env: dict[str, str] | None = None) -> Result:
    """Run ``barnum ARGS`` with DATABASE_URL=url (unset when None)."""
    return subprocess.run(
        [str(BARNUM), *args], env=_env(url, extra_env),
        capture_output=True, text=True, timeout=30, check=False,
    )


def barnum_all(
    argvs: Sequence[Sequence[str]], *, url: str | None, extra_env: dict[str, str] | None = None
) -> list[Result]:
    """Run several independent ``barnum`` commands concurrently; results in order."""
    env = _env(url, extra_env)
    procs = [
        (argv, subprocess.Popen([str(BARNUM), *argv], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for argv in argvs
    ]
    results = []
    for argv, proc in procs:
        out, err = proc.communicate(timeout=30)
        results.append(subprocess.CompletedProcess([str(BARNUM), *argv], proc.returncode, out, err))
    return results


def ok(result: Result) -> str:
    """Assert success with nothing on stderr; return stdout."""
    assert result.returncode == 0, (
        f"{result.args[1:]}: exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}")
    assert result.stderr == "", f"{result.args[1:]}: {result.stderr}"
    return result.stdout


def input_error(result: Result, *fragments: str) -> str:
    """Assert the exit-2 convention (one non-empty ``barnum …`` line on stderr,
    nothing on stdout); every fragment must appear in it (case-insensitive)."""
    what = result.args[1:]
    assert result.returncode == 2, (
        f"{what}: exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}")
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"{what}: expected one stderr line, got {lines!r}"
    line = lines[0]
    assert line.strip(), f"{what}: stderr line is blank"
    assert line.startswith("barnum "), f"{what}: {line!r}"
    assert result.stdout == "", f"{what}: printed {result.stdout!r} on stdout"
    for fragment in fragments:
        assert fragment.lower() in line.lower(), f"{what}: {fragment!r} not in {line!r}"
    return line


def all_input_errors(
    conn: Conn, cases: Sequence[tuple[Sequence[str], Sequence[str]]], *, url: str | None,
    extra_env: dict[str, str] | None = None,
) -> list[str]:
    """Run ``(argv, fragments)`` cases concurrently; each must be an input
    error, and the database must be unchanged afterwards."""
    before = snapshot(conn)
    results = barnum_all([argv for argv, _ in cases], url=url, extra_env=extra_env)
    lines = [input_error(r, *fragments) for r, (_, fragments) in zip(results, cases)]
    assert snapshot(conn) == before
    return lines


# ------------------------------------------------------------------ database helpers

SNAPSHOT_QUERIES = {
    "settings": "SELECT key, value, updated_at FROM barnum.settings ORDER BY key",
    "endpoints": "SELECT * FROM barnum.webhook_endpoints ORDER BY name",
    "deliveries": "SELECT * FROM barnum.webhook_deliveries ORDER BY id",
    "events": "SELECT * FROM barnum.whatsapp_events ORDER BY id",
    "workflows": "SELECT * FROM barnum.whatsapp_workflows ORDER BY id",
    "attempts": "SELECT * FROM barnum.webhook_attempts ORDER BY id",
}


def snapshot(conn: Conn) -> dict[str, list[tuple[Any, ...]]]:
    return {name: conn.execute(q).fetchall() for name, q in SNAPSHOT_QUERIES.items()}


def endpoint_names(conn: Conn) -> list[str]:
    return [r[0] for r in conn.execute("SELECT name FROM barnum.webhook_endpoints ORDER BY name")]


def settings_now(conn: Conn) -> dict[str, Any]:
    return dict(conn.execute("SELECT key, value FROM barnum.settings").fetchall())


def insert_endpoint(conn: Conn, name: str = "hook", url: str = "https://hooks.example/in") -> None:
    conn.execute("INSERT INTO barnum.webhook_endpoints (name, url) VALUES (%s, %s)", (name, url))


def make_event(conn: Conn, *, dead: bool) -> str:
    """A patient + an appointment tomorrow → the trigger queues an event and a
    delivery per active endpoint; ``dead`` turns those into dead letters."""
    patient = conn.execute(
        "INSERT INTO barnum.patients (name, phone) VALUES ('Ana', '+351912345678') RETURNING id"
    ).fetchone()
    assert patient is not None
    appt = conn.execute(
        "INSERT INTO barnum.appointments (patient_id, starts_at)"
        " VALUES (%s, now() + interval '1 day') RETURNING id",
        (patient[0],),
    ).fetchone()
    assert appt is not None
    ev = conn.execute(
        "SELECT id::text FROM barnum.whatsapp_events WHERE entity_id = %s", (appt[0],)
    ).fetchone()
    assert ev is not None, "the appointment trigger created no event"
    event_id = str(ev[0])
    assert deliveries_of(conn, event_id), "no delivery was queued"
    if dead:
        conn.execute(
            "UPDATE barnum.webhook_deliveries SET status = 'dead_letter', attempts = 4, last_error = 'HTTP 400'"
            " WHERE event_id = %s",
            (event_id,),
        )
        conn.execute("SELECT barnum.refresh_events(array[%s::uuid])", (event_id,))
        assert event_status(conn, event_id) == "dead_letter"
    return event_id


def deliveries_of(conn: Conn, event_id: str) -> list[tuple[str, int]]:
    return [
        (r[0], r[1])
        for r in conn.execute(
            "SELECT status, attempts FROM barnum.webhook_deliveries WHERE event_id = %s ORDER BY id",
            (event_id,),
        )
    ]


def event_status(conn: Conn, event_id: str) -> str:
    row = conn.execute("SELECT status FROM barnum.whatsapp_events WHERE id = %s", (event_id,)).fetchone()
    assert row is not None
    return str(row[0])


# ------------------------------------------------------------------ endpoints


def test_endpoints_add_and_list_never_print_the_secret(db_url: str, db_conn: Conn) -> None:
    empty_human, empty_json = barnum_all([["endpoints", "list"], ["endpoints", "list", "--json"]], url=db_url)
    assert "no endpoints" in ok(empty_human)
    assert json.loads(ok(empty_json)) == []

    url = "https://n8n.example/webhook/{event_type}"
    out = ok(barnum("endpoints", "add", "n8n", url, "--secret", SECRET,
                    "--events", "appointment.*, patient.*", "--max-attempts", "7", url=db_url))
    assert "n8n" in out and url in out
    assert SECRET not in out

    row = db_conn.execute(
        "SELECT url, secret, event_types, is_active, max_attempts, timeout_ms"
        " FROM barnum.webhook_endpoints WHERE name = 'n8n'"
    ).fetchone()
    assert row == (url, SECRET, ["appointment.*", "patient.*"], True, 7, 10000)

    human_r, json_r = barnum_all([["endpoints", "list"], ["endpoints", "list", "--json"]], url=db_url)
    human = ok(human_r)
    assert "n8n" in human and url in human and "appointment.*,patient.*" in human
    assert SECRET not in human

    raw = ok(json_r)
    assert SECRET not in raw
    doc = json.loads(raw)
    assert isinstance(doc, list) and len(doc) == 1
    (ep,) = doc
    assert ep["name"] == "n8n" and ep["url"] == url
    assert ep["has_secret"] is True
    assert ep["is_active"] is True
    assert ep["event_types"] == ["appointment.*", "patient.*"]
    assert ep["max_attempts"] == 7 and ep["timeout_ms"] == 10000
    assert "secret" not in ep


def test_database_url_option(db_url: str, db_conn: Conn) -> None:
    # --database-url alone (no DATABASE_URL in the environment) ...
    ok(barnum("endpoints", "--database-url", db_url, "add", "a", "https://a.example/", url=None))
    # ... and it wins over a broken DATABASE_URL in the environment.
    bogus = "postgresql://nobody@127.0.0.1:1/nothing"
    ok(barnum("endpoints", "--database-url", db_url, "add", "b", "https://b.example/", url=bogus))
    assert endpoint_names(db_conn) == ["a", "b"]
    doc = json.loads(ok(barnum("status", "--database-url", db_url, "--json", url=None)))
    assert [e["name"] for e in doc["endpoints"]] == ["a", "b"]


def test_endpoints_add_validation(db_url: str, db_conn: Conn) -> None:
    add = ["endpoints", "add"]
    all_input_errors(db_conn, [
        # URL rules
        ([*add, "bad", "ftp://files.example/hook"], ["barnum endpoints add:", "URL"]),
        ([*add, "bad", "ftp://files.example/hook", "--allow-http"], ["barnum endpoints add:", "URL"]),
        # plain http elsewhere: the message names the way out, flag included
        ([*add, "bad", "http://example.com/hook"],
         ["barnum endpoints add:", "example.com", "use https://", "pass --allow-http"]),
        ([*add, "bad", "http://127.0.0.1.evil.example/"], ["barnum endpoints add:", "--allow-http"]),
        # a userinfo is refused whatever --allow-http says: it hides the real host
        ([*add, "bad", "http://127.0.0.1@evil.example/"], ["barnum endpoints add:", "user name or password"]),
        # a bad name is reported as such, even with an http URL
        ([*add, "no spaces", "http://example.com/hook"], ["barnum endpoints add:", "name"]),
        ([*add, "bad", "not a url"], ["barnum endpoints add:", "URL"]),
        ([*add, "bad", ""], ["barnum endpoints add:", "URL"]),
        # other fields
        ([*add, "no spaces", "https://x.example/"], ["barnum endpoints add:", "name"]),
        ([*add, "x", "https://x.example/", "--secret", "short-secret"], ["--secret:", "16 characters"]),
        ([*add, "x", "https://x.example/", "--events", "Not A Pattern"], ["--events"]),
        ([*add, "x", "https://x.example/", "--max-attempts", "0"], ["--max-attempts:", "between 1 and 100"]),
        ([*add, "x", "https://x.example/", "--timeout-ms", "5"], ["--timeout-ms:", "between 100 and 300000"]),
        # event patterns must match a known event type (a typo would
        # otherwise subscribe to nothing, silently)
        ([*add, "x", "https://x.example/", "--events", "nonsense"],
         ["--events:", "'nonsense'", "no known event type", "appointment.pre_confirmed", "patient.reactivation"]),
        ([*add, "x", "https://x.example/", "--events", "appointment.*,apointment.*"],
         ["--events:", "'apointment.*'"]),
        ([*add, "x", "https://x.example/", "--events", "patient.no_show"], ["--events:", "'patient.no_show'"]),
    ], url=db_url)
    assert endpoint_names(db_conn) == []

    # http is fine to loopback, and anywhere with --allow-http.
    allowed = {
        "ip": "http://127.0.0.1:9000/hook",
        "name": "http://localhost/hook",
        "v6": "http://[::1]:8080/hook",
        "forced": "http://example.com/hook",
    }
    results = barnum_all(
        [["endpoints", "add", name, u] + (["--allow-http"] if name == "forced" else [])
         for name, u in allowed.items()],
        url=db_url)
    for r in results:
        ok(r)
    assert dict(db_conn.execute("SELECT name, url FROM barnum.webhook_endpoints").fetchall()) == allowed

    # A name is unique; the existing endpoint is left alone.
    all_input_errors(db_conn, [
        (["endpoints", "add", "ip", "https://other.example/"], ["barnum endpoints add:", "'ip'", "exists"]),
    ], url=db_url)
    row = db_conn.execute("SELECT url FROM barnum.webhook_endpoints WHERE name = 'ip'").fetchone()
    assert row == ("http://127.0.0.1:9000/hook",)


def test_endpoints_enable_disable(db_url: str, db_conn: Conn) -> None:
    insert_endpoint(db_conn, "hook")
    insert_endpoint(db_conn, "other")

    def active(name: str = "hook") -> bool:
        row = db_conn.execute(
            "SELECT is_active FROM barnum.webhook_endpoints WHERE name = %s", (name,)).fetchone()
        assert row is not None
        return bool(row[0])

    assert ok(barnum("endpoints", "disable", "hook", url=db_url)).strip() == "endpoint hook disabled"
    assert active() is False and active("other") is True
    doc = json.loads(ok(barnum("endpoints", "list", "--json", url=db_url)))
    assert {e["name"]: e["is_active"] for e in doc} == {"hook": False, "other": True}
    ok(barnum("endpoints", "disable", "hook", url=db_url))  # idempotent
    assert active() is False
    assert ok(barnum("endpoints", "enable", "hook", url=db_url)).strip() == "endpoint hook enabled"
    assert active() is True

    all_input_errors(db_conn, [
        (["endpoints", action, "ghost"], [f"barnum endpoints {action}:", "ghost"])
        for action in ("enable", "disable", "remove")
    ], url=db_url)


def test_endpoints_remove(db_url: str, db_conn: Conn) -> None:
    # Idle endpoint: removed at once.
    insert_endpoint(db_conn, "idle")
    out = ok(barnum("endpoints", "remove", "idle", url=db_url))
    assert out.strip() == "removed endpoint idle"
    assert endpoint_names(db_conn) == []

    # Queued work: refused without --force, nothing changes.
    insert_endpoint(db_conn, "hook")
    queued = make_event(db_conn, dead=False)
    assert deliveries_of(db_conn, queued) == [("pending", 0)]
    all_input_errors(db_conn, [
        (["endpoints", "remove", "hook"],
         ["barnum endpoints remove:", "'hook'", "1 queued delivery", "pass --force to also drop"]),
    ], url=db_url)
    assert endpoint_names(db_conn) == ["hook"]

    out = ok(barnum("endpoints", "remove", "hook", "--force", url=db_url))
    assert "dropped 1 queued" in out
    assert endpoint_names(db_conn) == []
    assert deliveries_of(db_conn, queued) == []

    # Only dead letters: nothing queued, so no --force needed.
    insert_endpoint(db_conn, "deadish")
    dead = make_event(db_conn, dead=True)
    assert ok(barnum("endpoints", "remove", "deadish", url=db_url)).strip() == "removed endpoint deadish"
    assert endpoint_names(db_conn) == []
    assert deliveries_of(db_conn, dead) == []


# ------------------------------------------------------------------ dlq


def test_dlq_list(db_url: str, db_conn: Conn) -> None:
    empty_human, empty_json = barnum_all([["dlq", "list"], ["dlq", "list", "--json"]], url=db_url)
    assert ok(empty_human).strip() == "no dead letters"
    assert json.loads(ok(empty_json)) == []

    insert_endpoint(db_conn, "hook")
    newest_first = [make_event(db_conn, dead=True) for _ in range(3)][::-1]
    make_event(db_conn, dead=False)  # pending: not a dead letter

    human_r, json_r, limited_r = barnum_all(
        [["dlq", "list"], ["dlq", "list", "--json"], ["dlq", "list", "--json", "--limit", "2"]], url=db_url)
    human = ok(human_r)
    for event_id in newest_first:
        assert event_id in human
    assert "hook" in human and "HTTP 400" in human and "appointment.pre_confirmed" in human

    doc = json.loads(ok(json_r))
    assert sorted(r["event_id"] for r in doc) == sorted(newest_first)
    for row in doc:
        assert row["endpoint"] == "hook"
        assert row["attempts"] == 4
        assert row["last_error"] == "HTTP 400"
        assert row["event_type"] == "appointment.pre_confirmed"
    assert len(json.loads(ok(limited_r))) == 2

    all_input_errors(db_conn, [
        (["dlq", "list", "--limit", "0"], ["barnum dlq list:", "--limit:", "between 1 and 10000"]),
        (["dlq", "list", "--limit", "10001"], ["barnum dlq list:", "--limit:"]),
    ], url=db_url)


def test_dlq_retry_one_event(db_url: str, db_conn: Conn) -> None:
    insert_endpoint(db_conn, "hook")
    target = make_event(db_conn, dead=True)
    other = make_event(db_conn, dead=True)

    # Neither --event nor --all; an event that does not exist.
    ghost = str(uuid.uuid4())
    all_input_errors(db_conn, [
        (["dlq", "retry"], ["barnum dlq retry:", "--event", "--all"]),
        (["dlq", "retry", "--event", ghost], ["barnum dlq retry:", ghost, "not found"]),
    ], url=db_url)

    assert ok(barnum("dlq", "retry", "--event", target, url=db_url)).strip() == "re-queued 1 dead deliveries"
    assert deliveries_of(db_conn, target) == [("pending", 0)]
    assert event_status(db_conn, target) == "pending"
    # the other dead letter is untouched
    assert deliveries_of(db_conn, other) == [("dead_letter", 4)]
    assert event_status(db_conn, other) == "dead_letter"

    listed, again = barnum_all([["dlq", "list", "--json"], ["dlq", "retry", "--event", target]], url=db_url)
    assert [r["event_id"] for r in json.loads(ok(listed))] == [other]
    assert "re-queued 0" in ok(again)  # no longer dead: nothing to re-queue
    assert deliveries_of(db_conn, target) == [("pending", 0)]


def test_dlq_retry_all(db_url: str, db_conn: Conn) -> None:
    insert_endpoint(db_conn, "hook")
    insert_endpoint(db_conn, "second")
    a = make_event(db_conn, dead=True)
    b = make_event(db_conn, dead=True)
    assert ok(barnum("dlq", "retry", "--all", url=db_url)).strip() == "re-queued 4 dead deliveries"
    for ev in (a, b):
        assert deliveries_of(db_conn, ev) == [("pending", 0), ("pending", 0)]
        assert event_status(db_conn, ev) == "pending"
    listed, again = barnum_all([["dlq", "list", "--json"], ["dlq", "retry", "--all"]], url=db_url)
    assert json.loads(ok(listed)) == []
    assert "re-queued 0" in ok(again)


# ------------------------------------------------------------------ status


def test_status(db_url: str, db_conn: Conn) -> None:
    human_r, json_r = barnum_all([["status"], ["status", "--json"]], url=db_url)
    human = ok(human_r)
    assert "queue: 0 pending (0 due now), 0 processing, 0 dead letters" in human
    assert "deliveries: none" in human and "no endpoints" in human
    doc = json.loads(ok(json_r))
    assert doc["queue"]["pending"] == 0 and doc["queue"]["dead_letter"] == 0
    assert doc["deliveries_by_status"] == {} and doc["events_by_status"] == {}
    assert doc["endpoints"] == []

    insert_endpoint(db_conn, "hook")
    make_event(db_conn, dead=True)
    make_event(db_conn, dead=False)

    human_r, json_r = barnum_all([["status"], ["status", "--json"]], url=db_url)
    human = ok(human_r)
    assert "queue: 1 pending (1 due now), 0 processing, 1 dead letters" in human
    assert "deliveries: dead_letter 1, pending 1" in human
    assert "events:     dead_letter 1, pending 1" in human
    assert "hook" in human and "https://hooks.example/in" in human

    doc = json.loads(ok(json_r))
    assert {"queue", "deliveries_by_status", "events_by_status", "endpoints"} <= doc.keys()
    assert doc["queue"]["pending"] == 1
    assert doc["queue"]["due"] == 1
    assert doc["queue"]["processing"] == 0
    assert doc["queue"]["dead_letter"] == 1
    assert doc["deliveries_by_status"] == {"pending": 1, "dead_letter": 1}
    assert doc["events_by_status"] == {"pending": 1, "dead_letter": 1}
    (ep,) = doc["endpoints"]
    assert ep["name"] == "hook" and ep["is_active"] is True
    assert ep["pending"] == 1 and ep["dead_letter"] == 1
    assert ep["attempts_last_hour"] == 0 and ep["success_rate_last_hour"] is None


# ------------------------------------------------------------------ settings


def test_settings_get(db_url: str, db_conn: Conn) -> None:
    everything, locale, attempts = barnum_all(
        [["settings", "get"], ["settings", "get", "locale"], ["settings", "get", "max_attempts"]], url=db_url)
    shown = {}
    for line in ok(everything).splitlines():
        key, value = line.split(None, 1)
        shown[key] = json.loads(value)
    assert shown == DEFAULT_SETTINGS
    assert ok(locale).strip() == '"pt"'
    assert ok(attempts).strip() == "4"

    all_input_errors(db_conn, [(["settings", "get", "nosuch"], ["barnum settings get:", "nosuch"])], url=db_url)


def test_settings_set(db_url: str, db_conn: Conn) -> None:
    changes = {  # key: (argument as typed, value stored)
        "locale": ("en", "en"),
        "token_ttl": ("2 hours", "2 hours"),
        "reminder_lead": ('"3 days"', "3 days"),  # an explicit JSON string works too
        "max_attempts": ("10", 10),
        "one_click_actions": ("true", True),
        "timezone": ("America/New_York", "America/New_York"),
        "public_base_url": ("https://clinic.example", "https://clinic.example"),
    }
    results = barnum_all([["settings", "set", k, arg] for k, (arg, _) in changes.items()], url=db_url)
    for key, r in zip(changes, results):
        assert ok(r).startswith(f"{key} = ")
    expected = DEFAULT_SETTINGS | {k: stored for k, (_, stored) in changes.items()}
    assert settings_now(db_conn) == expected

    shown = {}
    for line in ok(barnum("settings", "get", url=db_url)).splitlines():
        key, value = line.split(None, 1)
        shown[key] = json.loads(value)
    assert shown == expected


def test_settings_set_rejects_bad_values(db_url: str, db_conn: Conn) -> None:
    cases = [
        ("locale", "fr", ["locale", '"pt" or "en"']),
        ("token_ttl", "banana", ["token_ttl", "banana"]),
        ("token_ttl", "-1 hour", ["token_ttl", "positive"]),
        ("max_attempts", "0", ["max_attempts", "between 1 and 100"]),
        ("max_attempts", "2.5", ["max_attempts"]),
        ("one_click_actions", "yes", ["one_click_actions"]),
        ("timezone", "Mars/Olympus", ["timezone"]),
        ("public_base_url", "ftp://clinic.example", ["public_base_url"]),
        ("nosuch", "1", ["nosuch"]),
    ]
    all_input_errors(db_conn, [
        (["settings", "set", key, value], ["barnum settings set:", *fragments]) for key, value, fragments in cases
    ], url=db_url)
    assert settings_now(db_conn) == DEFAULT_SETTINGS


# ------------------------------------------------------------------ configuration


def test_missing_database_url(db_conn: Conn) -> None:
    commands = [
        ["status", "--json"],
        ["endpoints", "add", "x", "https://x.example/"],
        ["dlq", "retry", "--all"],
        ["settings", "set", "locale", "en"],
    ]
    cases = [(argv, [f"barnum {argv[0]}:", "DATABASE_URL"]) for argv in commands]
    all_input_errors(db_conn, cases, url=None)  # unset
    all_input_errors(db_conn, cases[:2], url="")  # set but empty


# ------------------------------------------------------------------ non-BN errors
#
# Input the driver or jsonb rejects before any SQL function runs (not a UUID,
# an int outside int4, NaN) is still the user's input: one line, exit 2.  An
# unreachable database is one line too (exit 1).


def test_bad_input_is_one_line_exit_2(db_url: str, db_conn: Conn) -> None:
    # One database for all keeps this cheap.  Each message names the flag
    # and the value, never "None" (the driver's own errors have no message).
    cases: list[tuple[list[str], list[str]]] = [
        (["dlq", "retry", "--event", "123"], ["--event must be an event id (UUID", "got '123'"]),
        (["dlq", "retry", "--event", "not-a-uuid"], ["--event", "'not-a-uuid'"]),
        (["endpoints", "add", "x", "https://x.example/", "--timeout-ms", "99999999999"],
         ["--timeout-ms:", "99999999999", "out of range"]),
        (["endpoints", "add", "x", "https://x.example/", "--max-attempts", "-99999999999"],
         ["--max-attempts:", "out of range"]),
        (["dlq", "list", "--limit", "99999999999"], ["--limit:", "99999999999"]),
        (["settings", "set", "max_attempts", "NaN"], ["max_attempts"]),  # 22P02 from jsonb
    ]
    results = barnum_all([argv for argv, _ in cases], url=db_url)
    failures = []
    for (argv, fragments), r in zip(cases, results):
        try:
            line = input_error(r, f"barnum {argv[0]} {argv[1]}:", *fragments)
            assert "none" not in line.lower().split(), f"{argv}: {line!r}"
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0])
    assert not failures, "\n".join(failures)


def test_endpoint_add_checks_event_types_in_sql(db_conn: Conn) -> None:
    # The rule lives in SQL, so callers other than the CLI get it too; the
    # list of known types is one function.
    known = db_conn.execute("SELECT barnum.known_event_types()").fetchone()
    assert known is not None and "appointment.pre_confirmed" in known[0] and "patient.reactivation" in known[0]
    for patterns in (["nonsense"], ["appointment.*", "apointment.*"], ["*.nothing"], []):
        with pytest.raises(psycopg.Error) as info:
            db_conn.execute("SELECT barnum.endpoint_add('x', 'https://x.example/', NULL, %s::text[])",
                            (patterns,))
        assert info.value.sqlstate == "BN422"
        assert info.value.diag.message_detail is not None
        assert json.loads(info.value.diag.message_detail)["field"] == "event_types"
    for patterns in (["*"], ["appointment.*"], ["patient.reactivation", "appointment.?o_show"], ["*.reminder"]):
        db_conn.execute("SELECT barnum.endpoint_add(%s, 'https://x.example/', NULL, %s::text[])",
                        (f"ok{len(endpoint_names(db_conn))}", patterns))
    assert len(endpoint_names(db_conn)) == 4


def test_unreachable_database_is_one_line() -> None:
    r = barnum("status", url="postgresql://nobody@127.0.0.1:1/nothing")
    assert r.returncode in (1, 2)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("barnum status:"), lines


def test_forced_remove_does_not_strand_events(db_url: str, db_conn: Conn) -> None:
    # The DELETE cascades the deliveries away; the event must not stay
    # 'pending' forever (retention would never purge it).
    insert_endpoint(db_conn, "hook")
    event_id = make_event(db_conn, dead=False)
    ok(barnum("endpoints", "remove", "hook", "--force", url=db_url))
    assert deliveries_of(db_conn, event_id) == []
    assert event_status(db_conn, event_id) != "pending"


# ------------------------------------------------------------------ production roles (README)


def test_production_roles_as_the_readme_says() -> None:
    """The README's production recipe, statement by statement, in a private
    cluster (roles are cluster-wide, so the shared one cannot show a cluster
    without them): migrating needs CREATEROLE unless a DBA created
    barnum_relay/barnum_shim first; login roles get them with IN ROLE and
    can call their functions, not read tables."""
    from listener import migrate
    from tests.pgcluster import LocalCluster, PgClusterError

    try:
        cluster = LocalCluster()
    except PgClusterError as exc:
        pytest.skip(f"needs local PostgreSQL server binaries: {exc}")
    cluster.start()
    try:
        with psycopg.connect(cluster.admin_dsn, autocommit=True) as su:
            for sql in [
                # no CREATEROLE: only works once the roles exist
                "CREATE ROLE plain_owner LOGIN PASSWORD 'pw'",
                "CREATE DATABASE early OWNER plain_owner",
                # the usual way: the migrating role may create roles
                "CREATE ROLE barnum_owner LOGIN PASSWORD 'pw' CREATEROLE",
                "CREATE DATABASE clinic OWNER barnum_owner",
                "CREATE DATABASE later OWNER plain_owner",
            ]:
                su.execute(sql)

        def as_user(user: str, db: str) -> str:
            return cluster.dsn(db).replace("postgres@", f"{user}:pw@", 1)

        with pytest.raises(migrate.MigrationError, match="permission denied to create role"):
            migrate.migrate(as_user("plain_owner", "early"))

        migrate.migrate(as_user("barnum_owner", "clinic"))  # creates the NOLOGIN roles
        with psycopg.connect(as_user("barnum_owner", "clinic"), autocommit=True) as owner:
            owner.execute("CREATE ROLE relay_login LOGIN PASSWORD 'pw' IN ROLE barnum_relay")
            owner.execute("CREATE ROLE shim_login LOGIN PASSWORD 'pw' IN ROLE barnum_shim")
            owner.execute("CREATE ROLE run_login LOGIN PASSWORD 'pw' IN ROLE barnum_relay, barnum_shim")
            owner.execute("INSERT INTO barnum.patients (name, phone) VALUES ('Ana', '+351912345678')")
        # With the roles there (as a DBA would have made them), no CREATEROLE is needed.
        migrate.migrate(as_user("plain_owner", "later"))

        with psycopg.connect(as_user("relay_login", "clinic"), autocommit=True) as relay:
            relay.execute("SELECT * FROM barnum.claim_deliveries_text('w', 10)")
            relay.execute("SELECT barnum.tick()")
            relay.execute("SELECT barnum.next_due_at()")
            relay.execute("SELECT barnum.ensure_endpoint('n8n', 'https://n8n.example/hook')")
            relay.execute("LISTEN barnum_events")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                relay.execute("SELECT barnum.shim_config()")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                relay.execute("SELECT count(*) FROM barnum.patients")
        with psycopg.connect(as_user("shim_login", "clinic"), autocommit=True) as shim:
            shim.execute("SELECT barnum.shim_config()")
            shim.execute("SELECT barnum.migrations_current(ARRAY['0001'])")
            with pytest.raises(psycopg.Error) as info:
                shim.execute("SELECT barnum.peek_action('no-such-token-0123456789')")
            assert info.value.sqlstate == "BN404"  # reached the function: not a privilege error
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                shim.execute("SELECT * FROM barnum.claim_deliveries_text('w', 10)")
        with psycopg.connect(as_user("run_login", "clinic"), autocommit=True) as both:
            both.execute("SELECT * FROM barnum.claim_deliveries_text('w', 10)")
            both.execute("SELECT barnum.shim_config()")
    finally:
        cluster.stop()

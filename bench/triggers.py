"""The cost of Barnum's triggers (issue 7 §2): appointment inserts/s with
Barnum's triggers vs the same table without them, and the wake-up bound.

    .venv/bin/python bench/triggers.py                 # everything, 3 rounds, 15 s runs
    .venv/bin/python bench/triggers.py --rounds 1 --seconds 5 --no-record   # quick look
    .venv/bin/python bench/triggers.py --skip-bound    # throughput only
    .venv/bin/python bench/triggers.py --sql FILE      # try a SQL change (applied to the template)

Throughput: pgbench (C client, ``-M prepared``, one single-row INSERT per
transaction, ``-c N -j N``, ``--seconds`` each) against a private
PostgreSQL 15 with fsync / synchronous_commit / full_page_writes on.  Each run
gets a fresh database cloned from a migrated template (one active webhook
endpoint, 100 reachable patients; each insert picks a random patient, so the
FK's KEY SHARE locks do not pile onto one row) and a CHECKPOINT first.

* ``plain`` — ``barnum.plain_appointments``: ``LIKE barnum.appointments
  INCLUDING ALL`` (same columns, defaults, CHECKs and indexes) plus the same
  three foreign keys (patients, professionals, specialties); no triggers.
* ``barnum (a) nobody waiting`` — ``barnum.appointments`` with its triggers
  (workflow + event + fan-out into one delivery); ``relay_waiters`` empty, so
  no NOTIFY.
* ``barnum (b) relay idle`` — a row in ``barnum.relay_waiters`` valid all
  run: every insert NOTIFYs (the old "outbox row + pg_notify per transaction"
  design), and a LISTENing connection consumes the notifications.
* ``barnum (c) relay draining`` — a real relay (``python -m listener.relay``)
  delivering to a loopback receiver while pgbench inserts.  It shares the
  two cores with PostgreSQL and pgbench, so this measures CPU competition as
  well as locking.

In every Barnum run a passive LISTEN connection counts the notifications
sent (how many inserts paid for a NOTIFY).  Rounds interleave scenarios;
medians of ``--rounds`` are reported.

Bound ("no event stranded longer than one sweep"): a real relay with
``--sweep-interval 2``; 4 producer threads (psycopg, one appointment per
transaction) record the wall time right after COMMIT returns; the receiver
records receipt; commit-to-receipt delay per event: p50/p99/max and how many
exceeded 0.1 s / 1 s / the sweep interval.  Three traffic shapes: ``steady``
(random gaps 0–20 ms per producer), ``sparse`` (0–400 ms: the relay goes idle
between most events, the case where a missed wake-up would strand an event),
``flat-out`` (no gaps: the backlog's queueing delay, not stranding) and
``forced-miss`` (20 events 0.5–3 s apart, each producing transaction also
deletes the relay's ``relay_waiters`` row, forcing the accepted race — no
NOTIFY while the relay is idle — so only the sweep can find the event: the
delay must stay within one sweep interval).
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import psycopg  # noqa: E402

SCENARIOS = ["plain", "a", "b", "c"]
LABEL = {"plain": "plain table (no triggers)", "a": "Barnum (a) nobody waiting → no NOTIFY",
         "b": "Barnum (b) relay idle all run → NOTIFY every insert",
         "c": "Barnum (c) real relay draining"}

INSERT_SQL = """\\set n random(1, 100)
INSERT INTO barnum.{table} (patient_id, professional_id, specialty_id, starts_at)
VALUES (('00000000-0000-0000-0000-' || lpad(:n::text, 12, '0'))::uuid,
        '{prof}'::uuid, '{spec}'::uuid, now() + interval '2 days');
"""

PLAIN_DDL = """
CREATE TABLE barnum.plain_appointments (LIKE barnum.appointments INCLUDING ALL);
ALTER TABLE barnum.plain_appointments
    ADD FOREIGN KEY (patient_id) REFERENCES barnum.patients (id),
    ADD FOREIGN KEY (professional_id) REFERENCES barnum.professionals (id),
    ADD FOREIGN KEY (specialty_id) REFERENCES barnum.specialties (id);
"""


# Trial SQL changes (``--variants``): each is applied to its own copy of the
# migrated template; scenario (a) is then measured on it beside the others.
# Nothing here touches db/: these are proposals measured on bench databases.
VARIANTS: dict[str, str] = {
    "base": "",
    # The AFTER INSERT trigger without its pinned search_path (still
    # SECURITY DEFINER): on PostgreSQL 15 switching search_path per call
    # costs a GUC save/restore and a namespace-path recomputation.
    "no-set-path": "ALTER FUNCTION barnum.pre_confirmation_trg() RESET search_path;",
    # Fan-out done inline by emit_event (one row: no transition table, no
    # statement-level trigger, no NOT EXISTS re-scan), same rules: one
    # delivery per matching active endpoint, else skipped + workflow
    # cancelled, NOTIFY only while a relay waits.
    "inline-fanout": """
CREATE OR REPLACE FUNCTION barnum.emit_event(
    p_event_type text, p_entity_type text, p_entity_id uuid,
    p_workflow_id uuid, p_scheduled_for timestamptz)
RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    v_id uuid;
    v_at timestamptz := coalesce(p_scheduled_for, barnum.clock());
BEGIN
    INSERT INTO barnum.whatsapp_events (event_type, entity_type, entity_id, workflow_id, scheduled_for, max_retries)
    VALUES (p_event_type, p_entity_type, p_entity_id, p_workflow_id, v_at, barnum.setting_int('max_attempts') - 1)
    RETURNING id INTO v_id;
    INSERT INTO barnum.webhook_deliveries (event_id, endpoint_id, next_attempt_at)
    SELECT v_id, ep.id, v_at
      FROM barnum.webhook_endpoints ep
     WHERE ep.is_active AND ('*' = ANY (ep.event_types) OR p_event_type = ANY (ep.event_types)
                             OR barnum.glob_match(ep.event_types, p_event_type));
    IF NOT FOUND THEN
        UPDATE barnum.whatsapp_events
           SET status = 'skipped', last_error = 'no active endpoint', processed_at = now()
         WHERE id = v_id;
        UPDATE barnum.whatsapp_workflows w
           SET status = 'cancelled', metadata = w.metadata || '{"reason": "no active endpoint"}'
         WHERE w.id = p_workflow_id AND w.status = 'pending';
    ELSIF EXISTS (SELECT 1 FROM barnum.relay_waiters WHERE until > now()) THEN
        PERFORM barnum.wake_relays();
    END IF;
    RETURN v_id;
END
$$;
DROP TRIGGER trg_events_fanout ON barnum.whatsapp_events;
""",
    # Reference floor, not a proposal: the trigger inserts only an outbox
    # row (no workflow, no delivery, no fan-out, no NOTIFY).
    "outbox-only": """
CREATE OR REPLACE FUNCTION barnum.pre_confirmation_trg() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO barnum.whatsapp_events (event_type, entity_type, entity_id)
    VALUES ('appointment.pre_confirmed', 'appointment', NEW.id);
    RETURN NULL;
END
$$;
DROP TRIGGER trg_events_fanout ON barnum.whatsapp_events;
""",
}
VARIANTS["lean"] = VARIANTS["no-set-path"] + VARIANTS["inline-fanout"]
# Issue 17, upper bounds (not proposals as they stand): what the foreign-key
# checks of the booking's own rows cost.  Each check locks the parent row
# FOR KEY SHARE: a WAL record per check, and on a row every booking shares
# (the account, the endpoint) a new MultiXact whenever two bookings overlap.
VARIANTS["no-hot-fk"] = """
ALTER TABLE barnum.whatsapp_events DROP CONSTRAINT whatsapp_events_account_id_fkey;
ALTER TABLE barnum.webhook_deliveries DROP CONSTRAINT webhook_deliveries_endpoint_id_fkey;
"""
VARIANTS["no-outbox-fk"] = VARIANTS["no-hot-fk"] + """
ALTER TABLE barnum.whatsapp_workflows DROP CONSTRAINT whatsapp_workflows_appointment_id_fkey;
ALTER TABLE barnum.whatsapp_workflows DROP CONSTRAINT whatsapp_workflows_patient_id_fkey;
ALTER TABLE barnum.whatsapp_events DROP CONSTRAINT whatsapp_events_workflow_id_fkey;
ALTER TABLE barnum.webhook_deliveries DROP CONSTRAINT webhook_deliveries_event_id_fkey;
"""
# (Issue 17's trial variants "emit-plpgsql" — emit_event in PL/pgSQL — and
# "one-trigger" — the insert trigger's workflow without an ON CONFLICT
# arbiter — measured ahead of the old code and are the code in db/functions
# now, so the no-FK variants above apply on top of them, as measured.)


class Listener(threading.Thread):
    """LISTEN barnum_events and count notifications until stopped."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute("LISTEN barnum_events")
        self.count = 0
        self.stop_flag = False

    def run(self) -> None:
        while not self.stop_flag:
            for _ in self.conn.notifies(timeout=0.2):
                self.count += 1

    def stop(self) -> int:
        self.stop_flag = True
        self.join(5)
        self.conn.close()
        return self.count


def pgbench(db: C.Database, dbname: str, script: Path, clients: int, seconds: float) -> dict[str, Any]:
    srv = db.server
    argv = [str(C.PGBIN / "pgbench"), "-n", "-M", "prepared", "-c", str(clients), "-j", str(clients),
            "-T", str(int(seconds)), "-f", str(script), "-h", srv.host, "-p", str(srv.port), "-U", srv.user,
            dbname]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"pgbench failed:\n{out.stdout}\n{out.stderr}")
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
    n = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    lat = re.search(r"latency average = ([0-9.]+) ms", out.stdout)
    fails = re.search(r"number of failed transactions: (\d+)", out.stdout)
    if not m or not n:
        raise RuntimeError(f"cannot parse pgbench output:\n{out.stdout}")
    return {"tps": float(m.group(1)), "tx": int(n.group(1)), "lat_ms": float(lat.group(1)) if lat else None,
            "failed": int(fails.group(1)) if fails else 0}


def one_run(db: C.Database, rx: C.Receiver, scenario: str, clients: int, seconds: float,
            work: Path, guard: C.Guard, template: str | None = None) -> dict[str, Any]:
    name = db.fresh("trg", template)
    dsn = db.dsn(name)
    relay = None
    listener = None
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            C.seed_clinic(conn, rx.base)
            conn.execute(PLAIN_DDL)
            if scenario == "b":
                conn.execute("INSERT INTO barnum.relay_waiters (worker, until) "
                             "VALUES ('bench-idle-relay', now() + interval '1 day')")
            conn.execute("CHECKPOINT")
        script = work / f"{'plain' if scenario == 'plain' else 'barnum'}.sql"
        script.write_text(INSERT_SQL.format(table="plain_appointments" if scenario == "plain" else "appointments",
                                            prof=C.PROF_ID, spec=C.SPEC_ID))
        if scenario != "plain":
            listener = Listener(dsn)
            listener.start()
        rx.reset()
        relay_cpu = 0.0
        if scenario == "c":
            log_path = work / f"relay-{name}.log"
            relay = C.start_relay(dsn, log_path)
            C.wait_relay_started(log_path, relay)
            time.sleep(0.3)
        load = guard.load
        pg0 = db.pg_cpu()
        r = pgbench(db, name, script, clients, seconds)
        time.sleep(0.5)  # let the postmaster reap pgbench's backends (their CPU moves to cutime)
        r["pg_cpu_s"] = db.pg_cpu() - pg0
        if relay is not None:
            relay_cpu = C.tree_cpu(relay.pid)
            # Let it finish the backlog so the run can be checked, bounded.
            with psycopg.connect(dsn, autocommit=True) as conn:
                total = conn.execute("SELECT count(*) FROM barnum.webhook_deliveries").fetchone()[0]  # type: ignore[index]
            r["delivered_during"] = rx.count()
            r["delivered_total"] = C.wait_count(rx, total, 120)
            r["deliveries"] = total
        r["relay_cpu_s"] = relay_cpu
        r["notifies"] = listener.stop() if listener is not None else 0
        listener = None
        r["load"] = load
        with psycopg.connect(dsn, autocommit=True) as conn:
            if scenario != "plain":
                row = conn.execute("SELECT (SELECT count(*) FROM barnum.appointments), "
                                   "(SELECT count(*) FROM barnum.whatsapp_events), "
                                   "(SELECT count(*) FROM barnum.webhook_deliveries)").fetchone()
                r["rows"] = row
        return r
    finally:
        if listener is not None:
            listener.stop()
        if relay is not None:
            C.stop_process(relay)
        db.drop(name)


# ------------------------------------------------------------------ the bound


def bound_run(db: C.Database, rx: C.Receiver, shape: str, seconds: float, max_events: int, sweep: float,
              work: Path, guard: C.Guard) -> dict[str, Any]:
    if shape == "forced-miss":
        return forced_miss_run(db, rx, sweep, work, guard)
    gaps = {"steady": 0.020, "sparse": 0.400, "flat-out": 0.0}[shape]
    name = db.fresh("bound")
    dsn = db.dsn(name)
    relay = None
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            C.seed_clinic(conn, rx.base)
            conn.execute("CHECKPOINT")
        rx.reset()
        log_path = work / f"relay-{name}.log"
        relay = C.start_relay(dsn, log_path, sweep_interval=sweep)
        C.wait_relay_started(log_path, relay)
        time.sleep(0.5)
        load = guard.load
        listener = Listener(dsn)
        listener.start()
        commits: dict[str, float] = {}
        lock = threading.Lock()
        per_thread = max_events // 4
        t_end = time.monotonic() + seconds

        def producer(k: int) -> None:
            rnd = random.Random(k)
            with psycopg.connect(dsn, autocommit=True) as conn:
                for i in range(per_thread):
                    if time.monotonic() > t_end:
                        break
                    n = rnd.randint(1, 100)
                    row = conn.execute(
                        "INSERT INTO barnum.appointments (patient_id, professional_id, specialty_id, starts_at) "
                        "VALUES (%s, %s, %s, now() + interval '2 days') RETURNING id",
                        (C.patient_uuid(n), C.PROF_ID, C.SPEC_ID)).fetchone()
                    t = time.time()
                    with lock:
                        commits[str(row[0])] = t  # type: ignore[index]
                    if gaps:
                        time.sleep(rnd.uniform(0, gaps))

        threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        produce_s = time.monotonic() - t0
        n = len(commits)
        got = C.wait_count(rx, n, 120)
        notifies = listener.stop()
        with psycopg.connect(dsn, autocommit=True) as conn:
            mapping = {str(a): str(b) for a, b in conn.execute(
                "SELECT id::text, entity_id::text FROM barnum.whatsapp_events").fetchall()}
        stats = rx.stats()
        first: dict[str, float] = {}
        for ev, t in stats["hits"]:
            first.setdefault(ev, t)
        delays = sorted((t - commits[mapping[e]]) * 1000.0 for e, t in first.items()
                        if e in mapping and mapping[e] in commits)
        return {"shape": shape, "events": n, "received": got, "rate": n / produce_s,
                "p50": C.pct(delays, 50), "p99": C.pct(delays, 99), "max": delays[-1] if delays else float("nan"),
                "over_100ms": sum(d > 100 for d in delays), "over_1s": sum(d > 1000 for d in delays),
                "over_sweep": sum(d > sweep * 1000 for d in delays), "notifies": notifies, "load": load,
                "missing": n - len(delays), "bad_sig": stats["bad"]}
    finally:
        if relay is not None:
            C.stop_process(relay)
        db.drop(name)


def breakdown(db: C.Database, rx: C.Receiver, n: int = 3000, template: str | None = None) -> list[tuple[str, int, float, float]]:
    """Where an appointment insert's time goes: one session, ``n`` single-row
    inserts (autocommit), ``track_functions = all``; per function: calls,
    total and self milliseconds per insert (pg_stat_user_functions).  FK
    checks, index and heap inserts show up as self time of the function
    whose statement caused them (the appointment's own under "(statement)")."""
    name = db.fresh("brk", template)
    dsn = db.dsn(name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            C.seed_clinic(conn, rx.base)
            conn.execute(PLAIN_DDL)
            conn.execute("SET track_functions = 'all'")
            q = ("INSERT INTO barnum.{} (patient_id, professional_id, specialty_id, starts_at) "
                 "VALUES (%s, %s, %s, now() + interval '2 days')")
            out: list[tuple[str, int, float, float]] = []
            for table in ("plain_appointments", "appointments"):
                for i in range(200):  # warm-up
                    conn.execute(q.format(table), (C.patient_uuid(1 + i % 100), C.PROF_ID, C.SPEC_ID))
                conn.execute("SELECT pg_stat_force_next_flush()")
                conn.execute("SELECT 1")
                conn.execute("SELECT pg_stat_reset()")
                t = time.perf_counter()
                for i in range(n):
                    conn.execute(q.format(table), (C.patient_uuid(1 + i % 100), C.PROF_ID, C.SPEC_ID))
                wall = (time.perf_counter() - t) * 1000 / n
                out.append((f"{table}: whole insert + commit, client wall", n, wall, wall))
                if table == "appointments":
                    time.sleep(0.7)  # stats are flushed at most every 0.5 s in PG 15
                    conn.execute("SELECT pg_stat_force_next_flush()")
                    for fn, calls, total, self_ in conn.execute(
                            "SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions "
                            "WHERE schemaname = 'barnum' ORDER BY total_time DESC").fetchall():
                        out.append((fn, int(calls), float(total) / n, float(self_) / n))
            return out
    finally:
        db.drop(name)


def forced_miss_run(db: C.Database, rx: C.Receiver, sweep: float, work: Path, guard: C.Guard,
                    n: int = 20) -> dict[str, Any]:
    """The race the design accepts, forced: each producing transaction also
    deletes the waiting relay's registration (as if the relay had been busy
    when the trigger looked), so its commit sends no NOTIFY while the relay
    sits idle.  Only the sweep (or a later event's NOTIFY — none here: events
    are 0.5–3 s apart) can find the event: the delay must stay ≤ one sweep."""
    name = db.fresh("miss")
    dsn = db.dsn(name)
    relay = None
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            C.seed_clinic(conn, rx.base)
        rx.reset()
        log_path = work / f"relay-{name}.log"
        relay = C.start_relay(dsn, log_path, sweep_interval=sweep)
        C.wait_relay_started(log_path, relay)
        time.sleep(1.0)
        listener = Listener(dsn)
        listener.start()
        commits: dict[str, float] = {}
        rnd = random.Random(7)
        t0 = time.monotonic()
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(n):
                time.sleep(rnd.uniform(0.5, 3.0))
                with conn.transaction():
                    conn.execute("DELETE FROM barnum.relay_waiters")
                    row = conn.execute(
                        "INSERT INTO barnum.appointments (patient_id, professional_id, specialty_id, starts_at) "
                        "VALUES (%s, %s, %s, now() + interval '2 days') RETURNING id",
                        (C.patient_uuid(1 + i), C.PROF_ID, C.SPEC_ID)).fetchone()
                commits[str(row[0])] = time.time()  # type: ignore[index]
        produce_s = time.monotonic() - t0
        got = C.wait_count(rx, n, 3 * sweep + 10)
        notifies = listener.stop()
        with psycopg.connect(dsn, autocommit=True) as conn:
            mapping = {str(a): str(b) for a, b in conn.execute(
                "SELECT id::text, entity_id::text FROM barnum.whatsapp_events").fetchall()}
        stats = rx.stats()
        first: dict[str, float] = {}
        for ev, t in stats["hits"]:
            first.setdefault(ev, t)
        delays = sorted((t - commits[mapping[e]]) * 1000.0 for e, t in first.items()
                        if e in mapping and mapping[e] in commits)
        return {"shape": "forced-miss", "events": n, "received": got, "rate": n / produce_s,
                "p50": C.pct(delays, 50), "p99": C.pct(delays, 99), "max": delays[-1] if delays else float("nan"),
                "over_100ms": sum(d > 100 for d in delays), "over_1s": sum(d > 1000 for d in delays),
                "over_sweep": sum(d > sweep * 1000 for d in delays), "notifies": notifies, "load": guard.load,
                "missing": n - len(delays), "bad_sig": stats["bad"]}
    finally:
        if relay is not None:
            C.stop_process(relay)
        db.drop(name)


# ------------------------------------------------------------------ main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--clients", default="1,4")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--skip-bound", action="store_true")
    p.add_argument("--bound-only", action="store_true")
    p.add_argument("--sweep", type=float, default=2.0, help="relay --sweep-interval in the bound test")
    p.add_argument("--bound-seconds", type=float, default=15.0)
    p.add_argument("--bound-events", type=int, default=6000)
    p.add_argument("--bound-shapes", default="steady,sparse,flat-out,forced-miss")
    p.add_argument("--sql", action="append", default=[], metavar="FILE",
                   help="extra SQL applied to the template after migrating")
    p.add_argument("--variants", default="",
                   help=f"comma-separated trial SQL changes measured as extra scenario-(a) runs: {', '.join(VARIANTS)}")
    p.add_argument("--breakdown", action="store_true",
                   help="only: per-function time of an appointment insert (track_functions), base and variants")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    command = " ".join([".venv/bin/python bench/triggers.py", *sys.argv[1:]])
    if args.breakdown:
        return breakdown_main(args, command)
    clients = [int(x) for x in args.clients.split(",")]
    scenarios = [s for s in args.scenarios.split(",") if s]
    work = C.workdir("triggers")
    print("waiting for a quiet box…", C.wait_quiet(), flush=True)
    db = C.Database(extra_sql=args.sql)
    variants = [v for v in args.variants.split(",") if v]
    templates = {v: db.make_template(f"tpl_{v.replace('-', '_')}", VARIANTS[v]) for v in variants}
    for v in variants:
        LABEL[f"a:{v}"] = f"Barnum (a), variant `{v}`"
    scenarios += [f"a:{v}" for v in variants]
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    bound: list[dict[str, Any]] = []
    try:
        with C.receiver_process() as rx:
            if not args.bound_only:
                for rnd in range(args.rounds):
                    for c in clients:
                        for s in scenarios:
                            base_s, _, variant = s.partition(":")
                            r = C.guarded(one_run, db, rx, base_s, c, args.seconds, work,
                                          template=templates.get(variant))
                            results.setdefault((s, c), []).append(r)
                            extra = ""
                            if s == "c":
                                extra = (f", delivered during run {r['delivered_during']}/{r['deliveries']}, "
                                         f"relay CPU {r['relay_cpu_s']:.1f} s")
                            print(f"round {rnd + 1} {c} client(s) {s:5}: {r['tps']:8.0f} inserts/s "
                                  f"(lat {r['lat_ms']} ms, failed {r['failed']}, NOTIFYs {r['notifies']}, "
                                  f"PG CPU {r['pg_cpu_s']:.1f} s{extra}; load {r['load']})", flush=True)
            if not args.skip_bound:
                for shape in args.bound_shapes.split(","):
                    secs = args.bound_seconds * (2 if shape == "sparse" else 1)
                    b = C.guarded(bound_run, db, rx, shape, secs, args.bound_events, args.sweep, work)
                    bound.append(b)
                    print(f"bound {shape}: {b['events']} events at {b['rate']:.0f}/s, received {b['received']}; "
                          f"commit→receipt p50 {b['p50']:.1f} ms, p99 {b['p99']:.1f} ms, max {b['max']:.1f} ms; "
                          f">100 ms {b['over_100ms']}, >1 s {b['over_1s']}, >sweep {b['over_sweep']}; "
                          f"NOTIFYs {b['notifies']}; load {b['load']}", flush=True)
    finally:
        db.close()
    if not args.no_record:
        record(command, args, db, clients, scenarios, results, bound)
    return 0


def breakdown_main(args: argparse.Namespace, command: str) -> int:
    print("waiting for a quiet box…", C.wait_quiet(), flush=True)
    db = C.Database(extra_sql=args.sql)
    variants = ["base"] + [v for v in args.variants.split(",") if v and v != "base"]
    templates = {v: db.make_template(f"tpl_{v.replace('-', '_')}", VARIANTS[v]) for v in variants if v != "base"}
    tables: dict[str, list[tuple[str, int, float, float]]] = {}
    loads = {}
    try:
        with C.receiver_process() as rx:
            for v in variants:
                def run(guard: C.Guard, v: str = v) -> list[tuple[str, int, float, float]]:
                    loads[v] = guard.load
                    return breakdown(db, rx, template=templates.get(v))
                tables[v] = C.guarded(run)
    finally:
        db.close()
    lines = [f"\n## Triggers: where an insert's time goes — {C.now_utc()} — `{command}`\n",
             f"{C.box_line(db)}. One session, 3,000 single-row autocommit inserts after 200 warm-up, "
             "`track_functions = all`; ms per appointment insert. A function's self time includes the "
             "statements it runs (heap + index inserts, FK checks, trigger queueing); total includes the "
             "functions it calls. Variants: see bench/triggers.py VARIANTS.\n"]
    for v, rows in tables.items():
        lines += [f"Variant `{v}` (load avg before: {loads.get(v)}):", "",
                  "| function | calls per insert | total ms | self ms |", "|---|---:|---:|---:|"]
        for fn, calls, total, self_ in rows:
            per = calls / 3000 if not fn.endswith("client wall") else 1
            lines.append(f"| {fn} | {per:.2f} | {total:.3f} | {self_:.3f} |")
        lines.append("")
        for fn, calls, total, self_ in rows:
            print(f"{v:14} {fn:55} {total:7.3f} {self_:7.3f}")
    if not args.no_record:
        C.append_results("\n".join(lines))
    return 0


def record(command: str, args: argparse.Namespace, db: C.Database, clients: list[int], scenarios: list[str],
           results: dict[tuple[str, int], list[dict[str, Any]]], bound: list[dict[str, Any]]) -> None:
    lines = [f"\n## Triggers — {C.now_utc()} — `{command}`\n",
             f"{C.box_line(db)}. pgbench -M prepared, one single-row INSERT per transaction, "
             f"{args.seconds:g} s per run, fresh database + CHECKPOINT per run, one active webhook endpoint, "
             "100 patients (random per insert). Plain table = `LIKE barnum.appointments INCLUDING ALL` "
             "(same columns, defaults, CHECKs, indexes) **with the same three foreign keys**, no triggers. "
             f"Median of {args.rounds} interleaved rounds"
             + (f"; extra SQL: {', '.join(args.sql)}" if args.sql else "")
             + (f"; trial SQL variants (defined in bench/triggers.py VARIANTS): {', '.join(variants)}"
                if (variants := [s.partition(':')[2] for s in scenarios if ':' in s]) else "") + ".\n"]
    if results:
        lines += ["| scenario | clients | inserts/s (median) | runs | × plain | NOTIFYs per insert | "
                  "PG CPU ms/insert | load avg (1/5/15) per run |",
                  "|---|---:|---:|---|---:|---:|---:|---|"]
        for c in clients:
            plain = C.median([r["tps"] for r in results.get(("plain", c), [])])
            for s in scenarios:
                rs = results.get((s, c), [])
                if not rs:
                    continue
                med = C.median([r["tps"] for r in rs])
                notif = C.median([r["notifies"] / max(1, r["tx"]) for r in rs])
                cpu = C.median([r["pg_cpu_s"] * 1000 / max(1, r["tx"]) for r in rs])
                ratio = med / plain if plain == plain and plain > 0 else float("nan")
                lines.append(f"| {LABEL[s]} | {c} | **{med:,.0f}** | {', '.join(format(r['tps'], ',.0f') for r in rs)} | "
                             f"{ratio:.2f}× | {notif:.2f} | {cpu:.2f} | {'; '.join(r['load'] for r in rs)} |")
        if any(s == "c" for s in scenarios):
            rs = [r for c in clients for r in results.get(("c", c), [])]
            lines.append("")
            lines.append("Scenario (c): deliveries made while pgbench ran / inserted, per run: "
                         + ", ".join(f"{r['delivered_during']}/{r['deliveries']}" for r in rs)
                         + "; all delivered afterwards: "
                         + ("yes" if all(r["delivered_total"] >= r["deliveries"] for r in rs) else "**no**") + ".")
    if bound:
        lines += ["", f"Wake-up bound: real relay `--sweep-interval {args.sweep:g}`, 4 producer threads "
                  "(psycopg, one appointment per transaction), delay = receipt at the receiver − wall time "
                  "right after COMMIT returned.", "",
                  "| traffic | events | rate/s | p50 ms | p99 ms | **max ms** | >100 ms | >1 s | > sweep | "
                  "NOTIFYs | missing | load avg |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for b in bound:
            lines.append(f"| {b['shape']} | {b['events']} | {b['rate']:.0f} | {b['p50']:.1f} | {b['p99']:.1f} | "
                         f"**{b['max']:.1f}** | {b['over_100ms']} | {b['over_1s']} | {b['over_sweep']} | "
                         f"{b['notifies']} | {b['missing']} | {b['load']} |")
    C.append_results("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

"""Relay benchmark (issue 3): throughput and commit-to-receipt latency.

    .venv/bin/python bench/relay.py                      # both, defaults below
    .venv/bin/python bench/relay.py --mode throughput --processes 2 --runs 5
    BENCH_DATABASE_URL=postgresql://… .venv/bin/python bench/relay.py

(1) Throughput: N due events (default 20,000 appointments inserted in one
    statement → 20,000 ``appointment.pre_confirmed`` events, each rendered
    with three freshly minted action tokens at claim time), then one relay
    (``python -m listener.relay``, ``--processes`` of them) delivers them to a
    fast loopback receiver (uvicorn + uvloop + httptools in its own process).
    deliveries/s = N / (last receipt − first receipt); "end to end" also
    counts start-up and the last ``record_attempts``.
(2) Latency: one appointment per transaction at ``--rate``/s for
    ``--duration`` s while the relay runs; latency = receipt time at the
    receiver − wall time right after the producer's COMMIT returned, per
    event → p50/p95/p99/max; and split into commit → claim transaction
    starts (its tokens' created_at) → POST starts (from the audit row) →
    receipt, to see which stage a tail comes from.

PostgreSQL: ``BENCH_DATABASE_URL`` (a server we may create databases on), or
a private cluster from local binaries (``tests.pgcluster.LocalCluster``)
with durability on (fsync, synchronous_commit, full_page_writes), like the
measurements in ``shared/perf-notes.md``.  Every run gets a fresh database
cloned from a migrated template.

Besides rates it reports CPU time per 1,000 deliveries of each party (relay
process tree, the PostgreSQL cluster, the receiver) — on a shared, loaded box
that is the figure that says what bounds throughput — and the load average
before each run.  ``--sql FILE`` applies extra SQL to the template after
migrating, to measure a proposed SQL change (e.g. ``bench/sql/*.sql``).

Prints the numbers and appends a markdown table (with this exact command) to
``bench/RESULTS.md`` unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
# The receiver (no signature check here, as in this bench's earlier runs),
# loopback helpers and CPU accounting are shared with the other benches.
from _common import Receiver, get_json, loadavg, proc_cpu, receiver_process, tree_cpu  # noqa: E402

SECRET = "bench-secret"
TEMPLATE = "barnum_bench_template"


# ------------------------------------------------------------------ database


class Database:
    """Where the bench databases live."""

    def __init__(self, extra_sql: list[str] | None = None) -> None:
        self.cluster: Any = None
        self.extra_sql = extra_sql or []
        url = os.environ.get("BENCH_DATABASE_URL")
        if url:
            from tests.pgcluster import ExternalServer

            self.server: Any = ExternalServer(url)
            self.kind = "BENCH_DATABASE_URL"
        else:
            from tests.pgcluster import LocalCluster

            self.server = LocalCluster(extra_settings={
                "fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",
                "max_connections": "200"})
            self.kind = "private cluster (fsync on)"
        self.server.start()
        self.postmaster: int | None = None
        pid_getter = getattr(self.server, "_postmaster_pid", None)
        if callable(pid_getter):
            self.postmaster = pid_getter()
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            self.version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        self._make_template()

    def _make_template(self) -> None:
        from listener.migrate import migrate

        self.drop(TEMPLATE)
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(TEMPLATE)))
        migrate(self.server.dsn(TEMPLATE), ROOT)
        for extra in self.extra_sql:
            with psycopg.connect(self.server.dsn(TEMPLATE), autocommit=True) as conn:
                conn.execute(Path(extra).read_text().encode())

    def fresh(self) -> str:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE)))
        return str(self.server.dsn(name))

    def drop(self, name: str) -> None:
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def close(self) -> None:
        try:
            self.drop(TEMPLATE)
        finally:
            self.server.stop()


def setup_endpoint(conn: psycopg.Connection[Any], base: str) -> str:
    conn.execute("INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('bench', %s)", (base + "/hook",))
    pid = conn.execute(
        "INSERT INTO barnum.patients (name, phone) VALUES ('João Silva', '+351912345678') RETURNING id"
    ).fetchone()
    assert pid is not None
    prof = conn.execute("INSERT INTO barnum.professionals (name) VALUES ('Dr. Maria Santos') RETURNING id"
                        ).fetchone()
    spec = conn.execute("INSERT INTO barnum.specialties (name) VALUES ('Medicina Dentária') RETURNING id"
                        ).fetchone()
    assert prof is not None and spec is not None
    conn.execute("SELECT set_config('bench.prof', %s, false), set_config('bench.spec', %s, false)",
                 (str(prof[0]), str(spec[0])))
    return str(pid[0])


# ------------------------------------------------------------------ relay


def start_relay(dsn: str, args: argparse.Namespace, log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("N8N_", "LISTEN_DATABASE"))}
    env.update({"DATABASE_URL": dsn, "WEBHOOK_SECRET": SECRET,
                "BARNUM_LOG_LEVEL": args.log_level})
    argv = [sys.executable, "-m", "listener.relay", "--concurrency", str(args.concurrency),
            "--batch", str(args.batch), "--batches-in-flight", str(args.batches_in_flight),
            "--processes", str(args.processes)]
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stderr=log, stdout=subprocess.DEVNULL)


def wait_started(log_path: Path, processes: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text() if log_path.exists() else ""
        if text.count('"relay started"') >= processes:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"relay did not start:\n{text[-3000:]}")
        time.sleep(0.02)


def stop_relay(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ scenarios


def throughput_run(db: Database, rx: Receiver, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    base = rx.base
    dsn = db.fresh()
    with psycopg.connect(dsn, autocommit=True) as conn:
        patient = setup_endpoint(conn, base)
        t = time.monotonic()
        conn.execute(
            """INSERT INTO barnum.appointments (patient_id, professional_id, specialty_id, starts_at)
               SELECT %s, current_setting('bench.prof')::uuid, current_setting('bench.spec')::uuid,
                      now() + interval '2 days' + g * interval '1 minute'
                 FROM generate_series(1, %s) g""", (patient, args.events))
        insert_s = time.monotonic() - t
        get_json(base + "/reset")
        log_path = workdir / f"relay-{uuid.uuid4().hex[:6]}.log"
        pg0 = tree_cpu(db.postmaster) if db.postmaster else 0.0
        rc0 = proc_cpu(rx.pid)
        load0 = loadavg()
        started = time.monotonic()
        proc = start_relay(dsn, args, log_path)
        relay_cpu = 0.0
        try:
            deadline = time.monotonic() + 600
            while True:
                row = conn.execute("SELECT count(*) FILTER (WHERE status = 'sent'), count(*) "
                                   "FROM barnum.webhook_deliveries").fetchone()
                assert row is not None
                if row[0] >= args.events:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"relay stopped early:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.05)
            end_to_end = time.monotonic() - started
            relay_cpu = tree_cpu(proc.pid)
            pg_cpu = (tree_cpu(db.postmaster) - pg0) if db.postmaster else float("nan")
            recv_cpu = proc_cpu(rx.pid) - rc0
        finally:
            stop_relay(proc)
        stats = get_json(base + "/stats")
        times = sorted(t for _, t in stats["hits"])
        ids = [e for e, _ in stats["hits"]]
        dup = len(ids) - len(set(ids))
        span = times[-1] - times[0]
        k = args.events / 1000.0
        return {"deliveries_per_s": (len(times) - 1) / span if span > 0 else float("inf"),
                "end_to_end_per_s": args.events / end_to_end, "received": len(times), "duplicates": dup,
                "insert_s": insert_s, "relay_cpu_ms_per_1k": relay_cpu * 1000 / k,
                "pg_cpu_ms_per_1k": pg_cpu * 1000 / k, "receiver_cpu_ms_per_1k": recv_cpu * 1000 / k,
                "load": load0}


def latency_run(db: Database, rx: Receiver, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    base = rx.base
    dsn = db.fresh()
    with psycopg.connect(dsn, autocommit=True) as conn:
        patient = setup_endpoint(conn, base)
        get_json(base + "/reset")
        log_path = workdir / f"relay-{uuid.uuid4().hex[:6]}.log"
        proc = start_relay(dsn, args, log_path)
        try:
            wait_started(log_path, args.processes, proc)
            time.sleep(0.5)  # let the start-up sweep and first drain settle
            load0 = loadavg()
            commits: dict[str, float] = {}
            n = int(args.rate * args.duration)
            interval = 1.0 / args.rate
            t0 = time.monotonic() + 0.05
            for i in range(n):
                pause = t0 + i * interval - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                row = conn.execute(
                    """INSERT INTO barnum.appointments (patient_id, professional_id, specialty_id, starts_at)
                       VALUES (%s, current_setting('bench.prof')::uuid, current_setting('bench.spec')::uuid,
                               now() + interval '2 days') RETURNING id""", (patient,)).fetchone()
                commits[str(row[0])] = time.time()  # type: ignore[index]
            deadline = time.monotonic() + 30
            while get_json(base + "/stats")["count"] < n and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop_relay(proc)
        mapping: dict[str, str] = {str(a): str(b) for a, b in conn.execute(
            "SELECT id::text, entity_id::text FROM barnum.whatsapp_events").fetchall()}
        # Where each event's time went: its first claim's transaction start
        # (now() of the claim = its tokens' created_at) and its first POST's
        # start (record_attempts writes started_at = record time − duration).
        marks: dict[str, tuple[float, float]] = {
            str(e): (float(c), float(s)) for e, c, s in conn.execute(
                """SELECT e.id::text,
                          extract(epoch FROM (SELECT min(t.created_at) FROM barnum.whatsapp_action_tokens t
                                               WHERE t.appointment_id = e.entity_id)),
                          extract(epoch FROM (SELECT min(a.started_at) FROM barnum.webhook_attempts a
                                                JOIN barnum.webhook_deliveries d ON d.id = a.delivery_id
                                               WHERE d.event_id = e.id))
                     FROM barnum.whatsapp_events e""").fetchall() if c is not None and s is not None}
    stats = get_json(base + "/stats")
    received: dict[str, float] = {}
    for event_id, t in stats["hits"]:
        received.setdefault(event_id, t)
    lat = sorted((t - commits[mapping[e]]) * 1000.0 for e, t in received.items()
                 if e in mapping and mapping[e] in commits)
    if len(lat) < n:
        print(f"warning: {n - len(lat)} of {n} events not received", file=sys.stderr)
    split: dict[str, list[float]] = {"commit → claim starts": [], "claim starts → POST starts": [],
                                     "POST starts → receipt": []}
    for e, t in received.items():
        if e in mapping and mapping[e] in commits and e in marks:
            claim0, post0 = marks[e]
            split["commit → claim starts"].append((claim0 - commits[mapping[e]]) * 1000.0)
            split["claim starts → POST starts"].append((post0 - claim0) * 1000.0)
            split["POST starts → receipt"].append((t - post0) * 1000.0)

    def pct(values: list[float], p: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))] if values else float("nan")

    return {"events": float(len(lat)), "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99),
            "max_ms": lat[-1], "mean_ms": statistics.fmean(lat), "load": load0,
            "split": {k: (pct(v, 50), pct(v, 95), pct(v, 99)) for k, v in split.items()}}


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["both", "throughput", "latency"], default="both")
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3, help="throughput runs (median reported)")
    parser.add_argument("--rate", type=float, default=100.0, help="latency: events per second")
    parser.add_argument("--duration", type=float, default=20.0, help="latency: seconds")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--batches-in-flight", type=int, default=2)
    parser.add_argument("--log-level", default="INFO", help="relay BARNUM_LOG_LEVEL (INFO logs every delivery)")
    parser.add_argument("--sql", action="append", default=[], metavar="FILE",
                        help="extra SQL applied to the template after migrating (try a SQL change)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    command = " ".join(["python bench/relay.py", *sys.argv[1:]])
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"barnum-bench-{uuid.uuid4().hex[:6]}"
    workdir.mkdir(parents=True)
    db = Database(args.sql)
    results: dict[str, Any] = {}
    try:
        with receiver_process(verify=False) as rx:
            if args.mode in ("both", "throughput"):
                runs = []
                for i in range(args.runs):
                    r = throughput_run(db, rx, args, workdir)
                    runs.append(r)
                    print(f"throughput run {i + 1}: {r['deliveries_per_s']:.0f} deliveries/s "
                          f"(end to end {r['end_to_end_per_s']:.0f}/s, {r['received']} received, "
                          f"{r['duplicates']} duplicates; CPU ms per 1k deliveries: relay "
                          f"{r['relay_cpu_ms_per_1k']:.0f}, postgres {r['pg_cpu_ms_per_1k']:.0f}, "
                          f"receiver {r['receiver_cpu_ms_per_1k']:.0f}; load avg before {r['load']})",
                          flush=True)
                results["throughput"] = runs
            if args.mode in ("both", "latency"):
                r = latency_run(db, rx, args, workdir)
                print(f"latency: {r['events']:.0f} events at {args.rate:g}/s: p50 {r['p50_ms']:.2f} ms, "
                      f"p95 {r['p95_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.2f} ms",
                      flush=True)
                for stage, (p50, p95, p99) in r["split"].items():
                    print(f"   {stage:28} p50 {p50:6.2f}  p95 {p95:6.2f}  p99 {p99:6.2f} ms", flush=True)
                results["latency"] = r
    finally:
        db.close()
    if not args.no_record:
        record(command, args, db, results)
    return 0


def record(command: str, args: argparse.Namespace, db: Database, results: dict[str, Any]) -> None:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## Relay — {when} — `{command}`\n",
        f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}, "
        f"PostgreSQL {db.version} ({db.kind}); relay: --processes {args.processes} "
        f"--concurrency {args.concurrency} --batch {args.batch} --batches-in-flight {args.batches_in_flight}, "
        f"log level {args.log_level}; receiver: uvicorn + uvloop + httptools (separate process)"
        + (f"; extra SQL: {', '.join(args.sql)}" if args.sql else "") + ".\n",
        "| measure | result |",
        "|---|---|",
    ]
    if "throughput" in results:
        rates = [r["deliveries_per_s"] for r in results["throughput"]]
        e2e = [r["end_to_end_per_s"] for r in results["throughput"]]
        lines.append(f"| throughput, {args.events} events (median of {len(rates)}) | "
                     f"**{statistics.median(rates):,.0f} deliveries/s** "
                     f"(runs: {', '.join(f'{x:,.0f}' for x in rates)}) |")
        lines.append(f"| … end to end incl. start-up and last record | {statistics.median(e2e):,.0f}/s |")
        med = {k: statistics.median(r[k] for r in results["throughput"])
               for k in ("relay_cpu_ms_per_1k", "pg_cpu_ms_per_1k", "receiver_cpu_ms_per_1k")}
        lines.append(f"| CPU per 1,000 deliveries (median): relay / PostgreSQL / receiver | "
                     f"{med['relay_cpu_ms_per_1k']:.0f} / {med['pg_cpu_ms_per_1k']:.0f} / "
                     f"{med['receiver_cpu_ms_per_1k']:.0f} ms |")
        lines.append(f"| load average before each run (shared box) | "
                     f"{', '.join(r['load'] for r in results['throughput'])} |")
    if "latency" in results:
        r = results["latency"]
        lines.append(f"| latency, {r['events']:.0f} events at {args.rate:g}/s, one per transaction | "
                     f"**p50 {r['p50_ms']:.2f} ms, p95 {r['p95_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms** "
                     f"(max {r['max_ms']:.2f} ms; load average before: {r['load']}) |")
        for stage, (p50, p95, p99) in r["split"].items():
            lines.append(f"| … {stage} (p50 / p95 / p99) | {p50:.2f} / {p95:.2f} / {p99:.2f} ms |")
        lines.append("| … (claim starts = the claim transaction's now(), its tokens' created_at; POST starts = "
                     "record time − duration, so a record made late adds its delay to the middle stage and takes it from the last) | |")
    path = ROOT / "bench" / "RESULTS.md"
    if not path.exists():
        path.write_text("# Relay benchmark results\n\nAppended by `bench/relay.py` "
                        "(see its docstring for what is measured).\n")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {path}")


if __name__ == "__main__":
    sys.exit(main())

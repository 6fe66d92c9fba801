"""Shim benchmark (issue 4): action-link POSTs and signed callbacks per second.

    .venv/bin/python bench/shim.py                                  # both scenarios, 3 runs each
    .venv/bin/python bench/shim.py --scenario callbacks --requests 20000 --runs 5
    BENCH_DATABASE_URL=postgresql://… .venv/bin/python bench/shim.py

One shim process (``listener.shim.main``: one uvicorn worker, uvloop +
httptools, an asyncpg pool, JSON log lines at ``--log-level``, default INFO
as in production, written to a file) and one load-generator process (aiohttp,
``--concurrency`` requests in flight over keep-alive connections) on loopback.

* ``actions``: ``POST /api/action?type=confirm&token=…`` — each request uses
  its own freshly minted token, so each one is a real ``perform_action``
  (token lock, appointment → confirmed, workflow completed, follow-up event
  with its outbox delivery row for the configured endpoint and NOTIFY), one
  transaction per request.
* ``callbacks``: ``POST /api/webhook`` with an HMAC-signed (``X-Webhook-Signature``)
  ``confirm`` callback, one appointment per request, each with its own
  ``X-Idempotency-Key`` — signature check, JSON check, one ``handle_callback``.

Every run gets a fresh database cloned from a migrated template and seeded
with one active webhook endpoint and requests + warm-up appointments; the first ``--warmup`` requests are
not timed.  CPU seconds of the shim process and of the whole PostgreSQL
cluster (private cluster only) are sampled around the timed phase and
reported per request: on a 2-core box they show where the ceiling is.
Afterwards the bench checks that every request answered 200 and
that every appointment was confirmed exactly once.

PostgreSQL: ``BENCH_DATABASE_URL`` (a server we may create databases on), or a
private cluster from local binaries (``tests.pgcluster.LocalCluster``) with
durability on (fsync, synchronous_commit, full_page_writes).

Prints the numbers and appends a markdown table (with this exact command) to
``bench/RESULTS.md`` unless ``--no-record``.  Not run by the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = "bench-secret"
TEMPLATE = "barnum_shim_bench_template"
TARGET_RPS = 1500
TARGET_P99_MS = 20.0


# ------------------------------------------------------------------ the shim process


def serve(port: int) -> int:
    """``--serve PORT``: the shim exactly as ``barnum shim`` runs it."""
    from listener import config as cfg
    from listener import shim

    args = argparse.Namespace(host="127.0.0.1", port=port)
    return shim.main(args, cfg.load())


# ------------------------------------------------------------------ the load generator


def load(work_file: str, url: str, concurrency: int, warmup: int) -> int:
    """``--load FILE``: replay the requests of FILE; print one JSON result line."""
    import aiohttp

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    with open(work_file, encoding="utf-8") as f:
        work = [json.loads(line) for line in f]

    async def phase(items: list[dict[str, Any]], session: aiohttp.ClientSession) -> tuple[list[float], dict[int, int]]:
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        it = iter(items)

        async def worker() -> None:
            for item in it:
                headers = item.get("h") or {}
                data = item["b"].encode() if "b" in item else None
                started = time.perf_counter()
                async with session.request(item.get("m", "POST"), url + item["u"], data=data,
                                           headers=headers) as resp:
                    await resp.read()
                    status = resp.status
                latencies.append(time.perf_counter() - started)
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, statuses

    async def main() -> dict[str, Any]:
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
            _, warm_statuses = await phase(work[:warmup], session)
            # Handshake: the bench samples CPU counters between warm-up and the timed phase.
            print("WARM", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            started = time.perf_counter()
            latencies, statuses = await phase(work[warmup:], session)
            elapsed = time.perf_counter() - started
        latencies.sort()

        def pct(p: float) -> float:
            return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

        return {
            "requests": len(latencies),
            "elapsed": elapsed,
            "rps": len(latencies) / elapsed,
            "p50": pct(0.50),
            "p90": pct(0.90),
            "p99": pct(0.99),
            "max": latencies[-1] * 1000,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "warmup_statuses": {str(k): v for k, v in sorted(warm_statuses.items())},
        }

    print(json.dumps(asyncio.run(main())), flush=True)
    return 0


# ------------------------------------------------------------------ database


class Database:
    """A PostgreSQL server and a migrated template database on it."""

    def __init__(self) -> None:
        import psycopg
        from psycopg import sql

        from listener.migrate import migrate

        self.server: Any
        url = os.environ.get("BENCH_DATABASE_URL")
        if url:
            from tests.pgcluster import ExternalServer

            self.server = ExternalServer(url)
            self.kind = "BENCH_DATABASE_URL"
        else:
            from tests.pgcluster import LocalCluster

            self.server = LocalCluster(extra_settings={
                "fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",
                "max_connections": "200"})
            self.kind = "private cluster (fsync on)"
        self.server.start()
        self._sql = sql
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            self.version = str(version[0]) if version else "?"
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TEMPLATE)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
        migrate(self.server.dsn(TEMPLATE), ROOT)

    @contextmanager
    def fresh(self) -> Iterator[str]:
        import psycopg

        name = f"shim_bench_{uuid.uuid4().hex[:12]}"
        sql = self._sql
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(TEMPLATE)))
        try:
            yield self.server.dsn(name)
        finally:
            with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def cpu_seconds(self) -> float | None:
        """CPU seconds of the whole private cluster (postmaster and children);
        None for an external server."""
        data_dir = getattr(self.server, "data_dir", None)
        if data_dir is None:
            return None
        try:
            postmaster = int((Path(data_dir) / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        total = process_cpu(postmaster)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid == postmaster:
                    total += process_cpu(int(entry.name))
        return total

    def close(self) -> None:
        with psycopg_admin(self.server.admin_dsn) as conn:
            conn.execute(self._sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(self._sql.Identifier(TEMPLATE)))
        if self.kind != "BENCH_DATABASE_URL":
            self.server.stop()


@contextmanager
def psycopg_admin(dsn: str) -> Iterator[Any]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


def seed(dsn: str, count: int) -> list[tuple[str, str]]:
    """``count`` future appointments (one patient each); their (id, patient_id)."""
    with psycopg_admin(dsn) as conn:
        # An active endpoint, as in production: every follow-up event gets its
        # delivery row and wakes the relays (none runs during the bench).
        conn.execute("INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('n8n', 'http://127.0.0.1:9/hook')")
        rows = conn.execute(
            """
            WITH pr AS (INSERT INTO barnum.professionals (name) VALUES ('Dr. Maria Santos') RETURNING id),
                 sp AS (INSERT INTO barnum.specialties (name) VALUES ('Medicina Dentária') RETURNING id),
                 p AS (INSERT INTO barnum.patients (name, phone)
                       SELECT 'Patient ' || g, '+3519' || lpad(g::text, 8, '0') FROM generate_series(1, %s) g
                       RETURNING id)
            INSERT INTO barnum.appointments (patient_id, professional_id, specialty_id, starts_at)
            SELECT p.id, (SELECT id FROM pr), (SELECT id FROM sp),
                   now() + interval '3 days' + (row_number() OVER ()) * interval '1 minute'
              FROM p
            RETURNING id::text, patient_id::text
            """,
            (count,),
        ).fetchall()
        conn.execute("VACUUM ANALYZE")
    return [(r[0], r[1]) for r in rows]


def action_work(dsn: str, appointments: list[tuple[str, str]]) -> list[dict[str, Any]]:
    with psycopg_admin(dsn) as conn:
        rows = conn.execute(
            "SELECT barnum.generate_action_token('confirm', a.id, a.patient_id) "
            "FROM barnum.appointments a ORDER BY a.starts_at").fetchall()
        conn.execute("VACUUM ANALYZE barnum.whatsapp_action_tokens")
    return [{"u": f"/api/action?type=confirm&token={r[0]}"} for r in rows]


def callback_work(appointments: list[tuple[str, str]]) -> list[dict[str, Any]]:
    work = []
    for appointment_id, _ in appointments:
        body = json.dumps({"action": "confirm", "appointmentId": appointment_id, "patientResponse": "SIM"})
        signature = hmac.new(SECRET.encode(), body.encode(), hashlib.sha256).hexdigest()
        work.append({"u": "/api/webhook", "b": body, "h": {
            "Content-Type": "application/json", "X-Webhook-Signature": signature,
            "X-Idempotency-Key": f"bench-{uuid.uuid4()}"}})
    return work


def confirmed_count(dsn: str) -> int:
    with psycopg_admin(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM barnum.appointments WHERE status = 'confirmed'").fetchone()
    return int(row[0]) if row else 0


# ------------------------------------------------------------------ one run


def process_cpu(pid: int) -> float:
    """user + system CPU seconds of one process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the shim exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)  # bench start-up poll, deadline-bounded
    raise RuntimeError("the shim did not become ready")


def run_once(db: Database, scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    with db.fresh() as dsn:
        total = args.requests + args.warmup
        appointments = seed(dsn, total)
        work = action_work(dsn, appointments) if scenario == "actions" else callback_work(appointments)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "DATABASE_URL": dsn, "WEBHOOK_SECRET": SECRET,
               "BARNUM_LOG_LEVEL": args.log_level, "PYTHONPATH": str(ROOT)}
        with tempfile.TemporaryDirectory(prefix="shim-bench-") as tmp:
            work_file = Path(tmp) / "work.jsonl"
            work_file.write_text("".join(json.dumps(item) + "\n" for item in work), encoding="utf-8")
            log_path = Path(tmp) / "shim.log"
            with open(log_path, "wb") as log_file:
                shim = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], env=env,
                                        stdout=log_file, stderr=log_file)
                try:
                    wait_healthy(url, shim)
                    loader = subprocess.Popen(
                        [sys.executable, __file__, "--load", str(work_file), "--url", url,
                         "--concurrency", str(args.concurrency), "--warmup", str(args.warmup)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                    assert loader.stdin is not None and loader.stdout is not None
                    if loader.stdout.readline().strip() != "WARM":
                        raise RuntimeError("load generator failed during warm-up")
                    shim_cpu, pg_cpu = process_cpu(shim.pid), db.cpu_seconds()
                    loader.stdin.write("GO\n")
                    loader.stdin.flush()
                    line = loader.stdout.readline()
                    shim_cpu, pg_cpu = process_cpu(shim.pid) - shim_cpu, sub(db.cpu_seconds(), pg_cpu)
                    if loader.wait() != 0 or not line:
                        raise RuntimeError("load generator failed")
                    result: dict[str, Any] = json.loads(line)
                    result["shim_cpu_ms"] = shim_cpu * 1000 / result["requests"]
                    result["pg_cpu_ms"] = pg_cpu * 1000 / result["requests"] if pg_cpu is not None else None
                finally:
                    shim.send_signal(signal.SIGTERM)
                    try:
                        shim.wait(30)
                    except subprocess.TimeoutExpired:
                        shim.kill()
                        shim.wait()
            result["log_lines"] = sum(1 for _ in open(log_path, "rb"))
        result["confirmed"] = confirmed_count(dsn)
        result["expected_confirmed"] = total
        return result


# ------------------------------------------------------------------ report


def record(command: str, args: argparse.Namespace, db: Database, runs: dict[str, list[dict[str, Any]]]) -> None:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip() or "?"
    except OSError:
        commit = "?"
    lines = [
        f"\n## Shim — {when} — `{command}`\n",
        f"\nOne uvicorn worker (uvloop + httptools), aiohttp load generator with {args.concurrency} in flight, "
        f"{args.requests} timed requests per run after {args.warmup} warm-up; log level {args.log_level}; "
        f"PostgreSQL {db.version} ({db.kind}); {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"commit {commit}. Target ≥ {TARGET_RPS} req/s, p99 ≤ {TARGET_P99_MS:.0f} ms.\n",
        "\n| scenario | run | req/s | p50 ms | p90 ms | p99 ms | max ms | shim CPU ms/req | PG CPU ms/req "
        "| statuses | confirmed |",
        "\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for scenario, results in runs.items():
        for i, r in enumerate(results, 1):
            lines.append(
                f"\n| {scenario} | {i} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p90']:.2f} | {r['p99']:.2f} | "
                f"{r['max']:.1f} | {r['shim_cpu_ms']:.3f} | {fmt(r['pg_cpu_ms'])} | {r['statuses']} | "
                f"{r['confirmed']}/{r['expected_confirmed']} |")
        med = median_of(results)
        lines.append(
            f"\n| **{scenario} median** | | **{med['rps']:.0f}** | **{med['p50']:.2f}** | {med['p90']:.2f} | "
            f"**{med['p99']:.2f}** | | {med['shim_cpu_ms']:.3f} | {fmt(med['pg_cpu_ms'])} | | |")
    path = ROOT / "bench" / "RESULTS.md"
    if not path.exists():
        path.write_text("# Benchmark results\n\nAppended by the scripts in `bench/` (see each one's docstring).\n")
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(lines) + "\n")


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def median_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    med: dict[str, Any] = {key: statistics.median(r[key] for r in results)
                           for key in ("rps", "p50", "p90", "p99", "shim_cpu_ms")}
    pg = [r["pg_cpu_ms"] for r in results if r.get("pg_cpu_ms") is not None]
    med["pg_cpu_ms"] = statistics.median(pg) if pg else None
    return med


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["actions", "callbacks", "both"], default="both")
    parser.add_argument("--requests", type=int, default=20000, help="timed requests per run")
    parser.add_argument("--warmup", type=int, default=1000, help="untimed requests first")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--log-level", default="INFO", help="the shim's BARNUM_LOG_LEVEL")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--load", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        return serve(args.serve)
    if args.load is not None:
        return load(args.load, args.url, args.concurrency, args.warmup)

    command = " ".join([".venv/bin/python", "bench/shim.py", *sys.argv[1:]])
    scenarios = ["actions", "callbacks"] if args.scenario == "both" else [args.scenario]
    db = Database()
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in scenarios}
    ok = True
    try:
        for i in range(args.runs):
            for scenario in scenarios:
                r = run_once(db, scenario, args)
                runs[scenario].append(r)
                good = r["statuses"] == {"200": r["requests"]} and r["confirmed"] == r["expected_confirmed"]
                ok &= good
                print(f"{scenario:9} run {i + 1}: {r['rps']:7.0f} req/s  p50 {r['p50']:6.2f} ms  "
                      f"p90 {r['p90']:6.2f} ms  p99 {r['p99']:6.2f} ms  max {r['max']:7.1f} ms  "
                      f"shim CPU {r['shim_cpu_ms']:.3f} ms/req  PG CPU {fmt(r['pg_cpu_ms'])} ms/req  "
                      f"statuses {r['statuses']}  confirmed {r['confirmed']}/{r['expected_confirmed']}"
                      f"{'' if good else '  <-- NOT ALL OK'}", flush=True)
    finally:
        db.close()
    for scenario, results in runs.items():
        med = median_of(results)
        verdict = "meets" if med["rps"] >= TARGET_RPS and med["p99"] <= TARGET_P99_MS else "misses"
        print(f"{scenario:9} median: {med['rps']:.0f} req/s, p50 {med['p50']:.2f} ms, p99 {med['p99']:.2f} ms, "
              f"shim CPU {med['shim_cpu_ms']:.3f} ms/req, PG CPU {fmt(med['pg_cpu_ms'])} ms/req "
              f"({verdict} the target ≥ {TARGET_RPS} req/s, p99 ≤ {TARGET_P99_MS:.0f} ms)")
    if not args.no_record:
        record(command, args, db, runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

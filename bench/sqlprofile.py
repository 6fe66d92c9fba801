"""Where the SQL time of one unit of work goes (issue 17), per statement and
per function, from ``pg_stat_statements`` (``track = all``) and
``pg_stat_user_functions`` (``track_functions = all``) on a private cluster.

    .venv/bin/python bench/sqlprofile.py --work claim --batch 1      # one-row claims + records (the latency path)
    .venv/bin/python bench/sqlprofile.py --work claim --batch 200    # the throughput path
    .venv/bin/python bench/sqlprofile.py --work action               # perform_action('confirm')
    .venv/bin/python bench/sqlprofile.py --work claim --sql trial.sql   # the same after a trial SQL change

* ``claim``: ``--events`` appointments inserted first (one webhook endpoint),
  then one session loops ``claim_deliveries_v2(…, --batch)`` + one
  ``record_attempts`` (all delivered) until nothing is due — the relay's
  SQL without its HTTP.
* ``action``: ``--events`` appointments, a confirm token minted for each
  (``generate_action_token``), 200 actions as warm-up, then one
  ``perform_action(token, 'confirm')`` per transaction.

Times are per delivery (claim) or per action: the client's wall time for
the call (round trip and commit included), each function's total and self
time, and the statements' execution times (planning excluded) — the gap
between a function's self time and its statements is mostly planning.

Prints the tables and appends them to ``bench/RESULTS.md`` unless
``--no-record``.  Not run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import psycopg  # noqa: E402

SETTINGS = {"track_functions": "all", "shared_preload_libraries": "pg_stat_statements",
            "pg_stat_statements.track": "all"}


def seed(conn: psycopg.Connection[Any], n: int) -> None:
    C.seed_clinic(conn, "http://127.0.0.1:9/hook")
    conn.execute(
        """INSERT INTO barnum.appointments (patient_id, professional_id, specialty_id, starts_at)
           SELECT ('00000000-0000-0000-0000-' || lpad((1 + g %% 100)::text, 12, '0'))::uuid, %s, %s,
                  now() + interval '3 days' FROM generate_series(1, %s) g""", (C.PROF_ID, C.SPEC_ID, n))
    conn.execute("VACUUM ANALYZE")


def run_claim(conn: psycopg.Connection[Any], batch: int) -> tuple[int, dict[str, float]]:
    n, claim_s, record_s = 0, 0.0, 0.0
    while True:
        t = time.perf_counter()
        rows = conn.execute("SELECT delivery_id, attempt FROM barnum.claim_deliveries_v2('bench', %s, '60 seconds')",
                            (batch,)).fetchall()
        claim_s += time.perf_counter() - t
        if not rows:
            break
        n += len(rows)
        doc = json.dumps([{"delivery_id": d, "attempt": a, "ok": True, "retryable": False, "http_status": 200,
                           "duration_ms": 1, "error": None, "response_body": "ok", "retry_after_seconds": None}
                          for d, a in rows])
        t = time.perf_counter()
        conn.execute("SELECT barnum.record_attempts(%s::jsonb)", (doc,))
        record_s += time.perf_counter() - t
    return n, {"claim call, client wall": claim_s * 1000 / n, "record call, client wall": record_s * 1000 / n}


def run_action(conn: psycopg.Connection[Any], n: int) -> tuple[int, dict[str, float]]:
    tokens = [r[0] for r in conn.execute(
        """SELECT barnum.generate_action_token('confirm', a.id, a.patient_id,
                  (SELECT w.id FROM barnum.whatsapp_workflows w WHERE w.appointment_id = a.id LIMIT 1))
             FROM barnum.appointments a""").fetchall()]
    for t in tokens[:200]:
        conn.execute("SELECT barnum.perform_action(%s, 'confirm')", (t,))
    conn.execute("SELECT pg_stat_reset(); SELECT pg_stat_statements_reset()")
    times = []
    for t in tokens[200:]:
        s = time.perf_counter()
        conn.execute("SELECT barnum.perform_action(%s, 'confirm')", (t,))
        times.append(time.perf_counter() - s)
    return len(times), {"perform_action call, client wall": statistics.fmean(times) * 1000}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", choices=["claim", "action"], default="claim")
    p.add_argument("--batch", type=int, default=1, help="claim: rows per claim")
    p.add_argument("--events", type=int, default=3000)
    p.add_argument("--sql", action="append", default=[], metavar="FILE", help="trial SQL applied after migrating")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    command = " ".join([".venv/bin/python bench/sqlprofile.py", *sys.argv[1:]])
    print("waiting for a quiet box…", C.wait_quiet(), flush=True)
    db = C.Database(extra_settings=SETTINGS, extra_sql=args.sql)
    try:
        name = db.fresh("prof")
        with psycopg.connect(db.dsn(name), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            seed(conn, args.events + (200 if args.work == "action" else 0))
            conn.execute("SELECT pg_stat_reset(); SELECT pg_stat_statements_reset()")
            load = C.loadavg()
            n, walls = run_claim(conn, args.batch) if args.work == "claim" else run_action(conn, args.events)
            time.sleep(0.7)  # the statistics collector's flush interval is 500 ms
            funcs = conn.execute(
                """SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions
                    WHERE calls > 0 AND funcname NOT LIKE 'pg_stat%%' ORDER BY total_time DESC LIMIT %s""",
                (args.top,)).fetchall()
            stmts = conn.execute(
                """SELECT calls, total_exec_time, left(regexp_replace(query, '\\s+', ' ', 'g'), 90)
                     FROM pg_stat_statements WHERE query NOT LIKE '%%pg_stat%%'
                    ORDER BY total_exec_time DESC LIMIT %s""", (args.top,)).fetchall()
    finally:
        db.close()
    unit = "delivery" if args.work == "claim" else "action"
    what = (f"claim_deliveries_v2(…, {args.batch}) + record_attempts, {n} deliveries" if args.work == "claim"
            else f"perform_action('confirm'), {n} actions after 200 warm-up")
    lines = [f"\n## SQL profile — {C.now_utc()} — `{command}`\n",
             f"{C.box_line(db)}. {what}; one session, autocommit; ms per {unit}. Load before: {load}."
             + (f" Trial SQL: {', '.join(args.sql)}." if args.sql else "") + "\n",
             "| call (client wall) | ms |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in walls.items()]
    lines += ["", f"| function | calls per {unit} | total ms | self ms |", "|---|---:|---:|---:|"]
    lines += [f"| {f} | {c / n:.2f} | {t / n:.3f} | {s / n:.3f} |" for f, c, t, s in funcs]
    lines += ["", f"| statement (execution only) | calls per {unit} | ms |", "|---|---:|---:|"]
    lines += [f"| `{q.replace('|', '/')}` | {c / n:.2f} | {t / n:.3f} |" for c, t, q in stmts]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        C.append_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scale (issue 7 §3): claim latency and tick() time with a big outbox, and a
retention purge of millions of old rows under concurrent claims.

    .venv/bin/python bench/scale.py                          # 10M events, purge 5M
    .venv/bin/python bench/scale.py --events 2000000 --purge 1000000 --no-record   # smaller
    .venv/bin/python bench/scale.py --sql FILE               # try a SQL change (applied to the template)

Private PostgreSQL 15, fsync / synchronous_commit / full_page_writes on, plus
bulk-load friendly settings (printed and recorded: shared_buffers 512MB,
max_wal_size 8GB, checkpoint_timeout 30min, maintenance_work_mem 512MB).

Outbox built with INSERT … SELECT generate_series in chunks of 1M, triggers
(fan-out included) and FK checks off (``session_replication_role =
replica``), then VACUUM ANALYZE:

* history: ``--events`` − ``--live`` events, one delivery each (one
  endpoint), 97 % sent / 2 % skipped / 1 % dead_letter, one
  ``webhook_attempts`` row per sent or dead delivery, created 2 s apart
  ending ~9 days ago (ids and timestamps increase with the row number, as in
  a real outbox);
* live: ``--live`` real appointments (100 patients) with their
  pre_confirmation workflow, pending event and pending delivery due now.

Measured on the big outbox and on a small one (the same live rows, no
history): ``claim_deliveries_text(…, 50)`` latency over ``--claims`` calls
(each followed, untimed, by ``record_attempts`` all-ok and a reset of those
rows to pending/due so the due set stays the same size), ``tick()`` with
nothing to purge, ``next_due_at()`` and ``queue_stats()``; the plans of the
due-row selection and of tick()'s statements via auto_explain (ANALYZE,
BUFFERS, nested statements — the plans the functions really use).

Purge: ``retention`` set so the oldest ``--purge`` events qualify; tick()
is called back to back until they are gone (each call purges ``p_batch`` =
250 events — tick()'s default — their deliveries and attempts by cascade) while a second
connection claims + records + recycles continuously.  Reported: purge
duration and rate, tick() p50/p99/max, claim p50/p99/max before and during
the purge and the longest claim stall (target ≤ 100 ms).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import psycopg  # noqa: E402

SETTINGS = {"shared_buffers": "512MB", "max_wal_size": "8GB", "checkpoint_timeout": "30min",
            "maintenance_work_mem": "512MB"}
STEP_S = 2  # seconds between two history events
CHUNK = 1_000_000

CLAIM = "SELECT delivery_id, attempt FROM barnum.claim_deliveries_text(%s, %s, '60 seconds')"
RECORD = "SELECT barnum.record_attempts(%s::jsonb)"
# attempts back to 0 too, or the fifth claim of a row would dead-letter it.
RECYCLE = ("UPDATE barnum.webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = now() "
           "WHERE id = ANY(%s)")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ build


def build(db: C.Database, name: str, history: int, live: int) -> dict[str, Any]:
    dsn = db.dsn(name)
    t0 = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        C.seed_clinic(conn, "http://127.0.0.1:9/unused")
        ep = conn.execute("SELECT id FROM barnum.webhook_endpoints").fetchone()[0]  # type: ignore[index]
        conn.execute("CREATE TABLE public.bench_meta AS SELECT now() - make_interval(secs => %s) AS base",
                     (history * STEP_S + 9 * 86400,))
        conn.execute("SET session_replication_role = replica")
        for lo in range(1, history + 1, CHUNK):
            hi = min(history, lo + CHUNK - 1)
            t = time.monotonic()
            with conn.transaction():
                conn.execute(
                    """INSERT INTO barnum.whatsapp_events
                         (id, event_type, entity_type, entity_id, status, retry_count, max_retries, last_error,
                          scheduled_for, processed_at, created_at, updated_at)
                       SELECT lpad(to_hex(g), 32, '0')::uuid, 'appointment.pre_confirmed', 'appointment',
                              ('f' || lpad(to_hex(g), 31, '0'))::uuid,
                              CASE WHEN g %% 100 = 0 THEN 'dead_letter' WHEN g %% 100 < 3 THEN 'skipped' ELSE 'sent' END,
                              0, 3, CASE WHEN g %% 100 = 0 THEN 'HTTP 404' END,
                              m.base + g * interval '2 s', m.base + g * interval '2 s' + interval '1 s',
                              m.base + g * interval '2 s', m.base + g * interval '2 s' + interval '1 s'
                         FROM generate_series(%s::bigint, %s::bigint) g, public.bench_meta m""", (lo, hi))
                conn.execute(
                    """INSERT INTO barnum.webhook_deliveries
                         (id, event_id, endpoint_id, status, attempts, next_attempt_at, last_http_status,
                          last_error, delivered_at, created_at)
                       OVERRIDING SYSTEM VALUE
                       SELECT g, lpad(to_hex(g), 32, '0')::uuid, %s,
                              CASE WHEN g %% 100 = 0 THEN 'dead_letter' WHEN g %% 100 < 3 THEN 'skipped' ELSE 'sent' END,
                              CASE WHEN g %% 100 BETWEEN 1 AND 2 THEN 0 ELSE 1 END,
                              m.base + g * interval '2 s',
                              CASE WHEN g %% 100 = 0 THEN 404 WHEN g %% 100 < 3 THEN NULL ELSE 200 END,
                              CASE WHEN g %% 100 = 0 THEN 'HTTP 404' WHEN g %% 100 < 3 THEN 'appointment is cancelled' END,
                              CASE WHEN g %% 100 >= 3 THEN m.base + g * interval '2 s' + interval '1 s' END,
                              m.base + g * interval '2 s'
                         FROM generate_series(%s::bigint, %s::bigint) g, public.bench_meta m""", (ep, lo, hi))
                conn.execute(
                    """INSERT INTO barnum.webhook_attempts
                         (id, delivery_id, attempt, started_at, duration_ms, http_status, response_body)
                       OVERRIDING SYSTEM VALUE
                       SELECT g, g, 1, m.base + g * interval '2 s' + interval '0.5 s', 3,
                              CASE WHEN g %% 100 = 0 THEN 404 ELSE 200 END, '{"ok":true}'
                         FROM generate_series(%s::bigint, %s::bigint) g, public.bench_meta m
                        WHERE g %% 100 NOT BETWEEN 1 AND 2""", (lo, hi))
            log(f"history rows {hi:,}/{history:,} ({time.monotonic() - t:.0f} s for this chunk)")
        with conn.transaction():
            conn.execute(
                """INSERT INTO barnum.appointments (id, patient_id, professional_id, specialty_id, starts_at)
                   SELECT ('e' || lpad(to_hex(g), 31, '0'))::uuid,
                          ('00000000-0000-0000-0000-' || lpad((1 + g %% 100)::text, 12, '0'))::uuid,
                          %s, %s, now() + interval '2 days' + g * interval '1 s'
                     FROM generate_series(1, %s) g""", (C.PROF_ID, C.SPEC_ID, live))
            conn.execute(
                """INSERT INTO barnum.whatsapp_workflows (id, workflow_type, appointment_id, patient_id, metadata)
                   SELECT ('d' || lpad(to_hex(g), 31, '0'))::uuid, 'pre_confirmation', a.id, a.patient_id,
                          jsonb_build_object('starts_at', a.starts_at)
                     FROM generate_series(1, %s) g
                     JOIN barnum.appointments a ON a.id = ('e' || lpad(to_hex(g), 31, '0'))::uuid""", (live,))
            conn.execute(
                """INSERT INTO barnum.whatsapp_events (id, event_type, entity_type, entity_id, workflow_id)
                   SELECT lpad(to_hex(%s + g), 32, '0')::uuid, 'appointment.pre_confirmed', 'appointment',
                          ('e' || lpad(to_hex(g), 31, '0'))::uuid, ('d' || lpad(to_hex(g), 31, '0'))::uuid
                     FROM generate_series(1, %s) g""", (history, live))
            conn.execute(
                """INSERT INTO barnum.webhook_deliveries (id, event_id, endpoint_id, next_attempt_at)
                   OVERRIDING SYSTEM VALUE
                   SELECT %s + g, lpad(to_hex(%s + g), 32, '0')::uuid, %s, now() - interval '1 minute'
                     FROM generate_series(1, %s) g""", (history, history, ep, live))
        conn.execute("RESET session_replication_role")
        conn.execute("SELECT setval(pg_get_serial_sequence('barnum.webhook_deliveries', 'id'), %s)",
                     (history + live,))
        conn.execute("SELECT setval(pg_get_serial_sequence('barnum.webhook_attempts', 'id'), %s)",
                     (max(history, 1),))
        # Nothing qualifies for the retention purge until the purge phase.
        conn.execute("UPDATE barnum.settings SET value = '\"36500 days\"' WHERE key = 'retention'")
        load_s = time.monotonic() - t0
        log(f"loaded in {load_s:.0f} s; VACUUM ANALYZE…")
        t = time.monotonic()
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
        vac_s = time.monotonic() - t
        sizes = conn.execute(
            """SELECT (SELECT count(*) FROM barnum.whatsapp_events),
                      (SELECT count(*) FROM barnum.webhook_deliveries),
                      (SELECT count(*) FROM barnum.webhook_attempts),
                      pg_size_pretty(pg_database_size(current_database()))""").fetchone()
    assert sizes is not None
    log(f"built: events {sizes[0]:,}, deliveries {sizes[1]:,}, attempts {sizes[2]:,}, "
        f"database {sizes[3]} (load {load_s:.0f} s, vacuum {vac_s:.0f} s)")
    return {"events": sizes[0], "deliveries": sizes[1], "attempts": sizes[2], "size": sizes[3],
            "load_s": load_s, "vacuum_s": vac_s}


# ------------------------------------------------------------------ measurements


def claim_once(conn: psycopg.Connection[Any], worker: str, limit: int = 50) -> tuple[float, int]:
    """One timed claim; then (untimed) record all ok and recycle the rows to due."""
    t = time.perf_counter()
    rows = conn.execute(CLAIM, (worker, limit)).fetchall()
    dt = (time.perf_counter() - t) * 1000
    if rows:
        doc = json.dumps([{"delivery_id": r[0], "attempt": r[1], "ok": True, "http_status": 200,
                           "duration_ms": 1} for r in rows])
        conn.execute(RECORD, (doc,))
        conn.execute(RECYCLE, ([r[0] for r in rows],))
    return dt, len(rows)


def timed(conn: psycopg.Connection[Any], query: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        conn.execute(query).fetchall()
        out.append((time.perf_counter() - t) * 1000)
    return out


def summarize(xs: list[float]) -> dict[str, float]:
    return {"p50": C.pct(xs, 50), "p99": C.pct(xs, 99), "max": max(xs) if xs else float("nan"), "n": len(xs)}


def measure(db: C.Database, name: str, claims: int, guard: C.Guard) -> dict[str, Any]:
    dsn = db.dsn(name)
    load = guard.load
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(10):  # warm-up
            claim_once(conn, "bench-scale")
        lat = []
        rows = []
        for _ in range(claims):
            dt, n = claim_once(conn, "bench-scale")
            lat.append(dt)
            rows.append(n)
        tick = timed(conn, "SELECT barnum.tick()", 50)
        due = timed(conn, "SELECT barnum.next_due_at()", 200)
        stats = timed(conn, "SELECT barnum.queue_stats()", 50)
    return {"claim": summarize(lat), "claim_rows": sum(rows) / max(1, len(rows)), "tick": summarize(tick),
            "next_due_at": summarize(due), "queue_stats": summarize(stats), "load": load}


def explain(db: C.Database, name: str, out: Path) -> list[str]:
    """auto_explain (ANALYZE, BUFFERS, nested statements) of one claim and one
    tick(); full plans to ``out``; returns the key lines."""
    dsn = db.dsn(name)
    notices: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        # The tokens table only holds what the measurement's claims minted:
        # give the planner its real size (autovacuum would, a bit later).
        conn.execute("ANALYZE barnum.whatsapp_action_tokens")
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("LOAD 'auto_explain'")
        for k, v in {"auto_explain.log_min_duration": "0", "auto_explain.log_analyze": "on",
                     "auto_explain.log_buffers": "on", "auto_explain.log_nested_statements": "on",
                     "auto_explain.log_level": "notice", "auto_explain.log_timing": "on"}.items():
            conn.execute(f"SET {k} = '{v}'")
        notices.append("=== claim_deliveries_text(…, 50) ===")
        conn.execute(CLAIM, ("bench-explain", 50)).fetchall()
        notices.append("=== tick() ===")
        conn.execute("SELECT barnum.tick()").fetchall()
        conn.execute("SET auto_explain.log_min_duration = -1")
        conn.execute("UPDATE barnum.webhook_deliveries SET status = 'pending', next_attempt_at = now() "
                     "WHERE status = 'processing' AND locked_by = 'bench-explain'")
        # The purge's victim selection as it runs when millions qualify.
        notices.append("=== retention purge victims, as tick() runs it, with the purge's retention ===")
        cutoff = conn.execute("SELECT (now() - min(created_at) - interval '1 day')::text FROM barnum.whatsapp_events").fetchone()[0]  # type: ignore[index]
        plan = conn.execute(
            """EXPLAIN (ANALYZE, BUFFERS)
               SELECT e.id FROM barnum.whatsapp_events e
                WHERE e.status IN ('sent', 'skipped', 'dead_letter') AND e.created_at < now() - %s::interval
                ORDER BY e.created_at LIMIT 250 FOR UPDATE SKIP LOCKED""", (cutoff,)).fetchall()
        notices.append("\n".join(r[0] for r in plan))
    text = "\n\n".join(notices)
    out.write_text(text)
    return key_lines(text)


SMALL_TABLES = ("patients", "professionals", "specialties", "settings", "webhook_endpoints", "relay_waiters",
                "inbound_callbacks")


def key_lines(text: str) -> list[str]:
    """The scan nodes of each statement in an auto_explain dump, one entry per
    distinct (section, statement, scan); single-row FK probes and scans of
    tiny tables (settings, endpoints, …) are left out."""
    blocks: list[str] = []
    for line in text.splitlines():
        if line.startswith(("=== ", "duration: ")) or not blocks:
            blocks.append(line)
        else:
            blocks[-1] += "\n" + line
    keys: list[str] = []
    seen: dict[str, int] = {}
    section = ""
    for block in blocks:
        if block.startswith("==="):
            head, _, block = block.partition("\n")
            section = head.strip().strip("= ")
            if not block.strip():
                continue
        m = re.search(r"duration: ([0-9.]+ ms)", block)
        dur = m.group(1) if m else "?"
        query = re.search(r"Query Text: (.*)", block)
        q = re.sub(r"\s+", " ", (query.group(1) if query else "EXPLAIN").strip())[:70]
        if q.startswith(("SELECT 1 FROM ONLY", "SELECT value FROM barnum.settings")):
            continue
        nodes: list[str] = []
        last = False
        for line in block.splitlines():
            st = line.strip().lstrip("->").strip()
            if re.match(r"(Index Scan|Index Only Scan|Bitmap Index Scan|Seq Scan|Bitmap Heap Scan)", st):
                rel = re.search(r" on (\w+)", st)
                if rel and rel.group(1) in SMALL_TABLES:
                    last = False
                    continue
                nodes.append(re.sub(r"\s*\(cost=[^)]*\)", "", st))
                last = True
                continue
            if last and st.startswith("Buffers:"):
                nodes[-1] += f"  [{st}]"
            if st.startswith("Execution Time"):
                m = re.search(r"([0-9.]+ ms)", st)
                dur = m.group(1) if m else dur
            if not st.startswith(("Index Cond", "Filter", "Rows Removed", "Heap Fetches", "Recheck", "Sort")):
                last = False
        if not nodes:
            continue
        sig = section + "|" + q + "|" + "|".join(re.sub(r"\(actual.*", "", n) for n in nodes)
        if sig in seen:
            seen[sig] += 1
            continue
        seen[sig] = 1
        keys.append(f"[{section}] {q}  ({dur})")
        keys += [f"      {n}" for n in nodes]
    return keys


# ------------------------------------------------------------------ purge


def purge(db: C.Database, name: str, upto: int, batch: int, max_seconds: float,
          baseline_s: float = 20.0) -> dict[str, Any]:
    """Purge until the oldest ``upto`` history events are gone, tick(p_batch = batch)
    back to back, while a claimer claims continuously; a sampler reads the
    claimer's wait event from pg_stat_activity every ~10 ms."""
    from collections import Counter

    dsn = db.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Retention such that the oldest `upto` history events qualify.
        cutoff_age = conn.execute(
            """SELECT (now() - (m.base + %s * interval '2 s') + interval '1 s')::text FROM public.bench_meta m""",
            (upto,)).fetchone()[0]  # type: ignore[index]
        expected = conn.execute(
            """SELECT count(*) FROM barnum.whatsapp_events
                WHERE status IN ('sent', 'skipped', 'dead_letter') AND created_at < now() - %s::interval""",
            (cutoff_age,)).fetchone()[0]  # type: ignore[index]
        outbox = conn.execute("SELECT count(*) FROM barnum.whatsapp_events").fetchone()[0]  # type: ignore[index]
    guard = C.Guard()
    guard.__enter__()
    load = guard.load
    claims: list[tuple[float, float, int]] = []  # (start wall, ms, rows)
    samples: list[tuple[float, str]] = []
    stop = threading.Event()
    claimer_pid: list[int] = []

    def claimer() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            claimer_pid.append(int(conn.execute("SELECT pg_backend_pid()").fetchone()[0]))  # type: ignore[index]
            while not stop.is_set():
                t = time.time()
                dt, n = claim_once(conn, "bench-purge")
                claims.append((t, dt, n))

    def sampler() -> None:
        while not claimer_pid and not stop.is_set():
            time.sleep(0.01)
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute(
                    "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU (no wait event)') "
                    "FROM pg_stat_activity WHERE pid = %s AND state = 'active'", (claimer_pid[0],)).fetchone()
                if row:
                    samples.append((time.time(), str(row[0])))
                time.sleep(0.01)

    threads = [threading.Thread(target=claimer, daemon=True), threading.Thread(target=sampler, daemon=True)]
    for th in threads:
        th.start()
    time.sleep(baseline_s)  # baseline: claims without the purge
    base_end = time.time()
    ticks: list[float] = []
    purged = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE barnum.settings SET value = to_jsonb(%s::text) WHERE key = 'retention'",
                     (str(cutoff_age),))
        t0 = time.monotonic()
        purge_start = time.time()
        while time.monotonic() - t0 < max_seconds:
            t = time.perf_counter()
            res = conn.execute("SELECT barnum.tick(%s)", (batch,)).fetchone()[0]  # type: ignore[index]
            ticks.append((time.perf_counter() - t) * 1000)
            n = int(res.get("events_purged", 0))
            purged += n
            if n == 0 and "skipped" not in res:
                break
            if len(ticks) % max(1, 500_000 // batch) == 0:
                log(f"purged {purged:,}/{expected:,} in {time.monotonic() - t0:.0f} s (p_batch {batch})")
        purge_s = time.monotonic() - t0
        purge_end = time.time()
        left = conn.execute("SELECT count(*) FROM barnum.whatsapp_events WHERE created_at < now() - %s::interval",
                            (cutoff_age,)).fetchone()[0]  # type: ignore[index]
    time.sleep(3)
    stop.set()
    for th in threads:
        th.join(30)
    guard.__exit__()
    before = [ms for (t, ms, n) in claims if t < base_end]
    during = [ms for (t, ms, n) in claims if purge_start <= t <= purge_end]
    worst = max(((ms, t - purge_start) for (t, ms, n) in claims if purge_start <= t <= purge_end), default=(0, 0))

    def tally(pred: Any) -> list[tuple[str, float]]:
        c = Counter(ev for (t, ev) in samples if pred(t))
        total = sum(c.values()) or 1
        return [(ev, 100.0 * k / total) for ev, k in c.most_common(5)]

    slow_windows = [(t, t + ms / 1000) for (t, ms, n) in claims if purge_start <= t <= purge_end and ms > 100]
    return {"expected": expected, "purged": purged, "left": left, "purge_s": purge_s, "batch": batch,
            "outbox_before": outbox,
            "rate": purged / purge_s if purge_s else float("nan"), "ticks": summarize(ticks),
            "claims_before": summarize(before), "claims_during": summarize(during),
            "worst_at_s": worst[1], "load": load,
            "over_100": sum(ms > 100 for ms in during), "over_50": sum(ms > 50 for ms in during),
            "retention": str(cutoff_age), "contaminated": guard.contaminated,
            "waits_before": tally(lambda t: t < base_end),
            "waits_during": tally(lambda t: purge_start <= t <= purge_end),
            "waits_slow": tally(lambda t: any(a <= t <= b for a, b in slow_windows))}


# ------------------------------------------------------------------ trial: tick's workflow expiry


EXPIRY_NOW = """
EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)
UPDATE barnum.whatsapp_workflows w SET status = 'expired'
  FROM barnum.appointments ap
 WHERE w.status = 'sent' AND ap.id = w.appointment_id AND ap.starts_at < now()
   AND w.workflow_type IN ('pre_confirmation', 'reminder')"""
# tick()'s statement since migration 0002 (db/functions/90_tick.sql).
EXPIRY_TICK = """
EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)
UPDATE barnum.whatsapp_workflows w SET status = 'expired', updated_at = now()
 WHERE w.id IN (SELECT y.id FROM barnum.whatsapp_workflows y
                 WHERE y.status = 'sent' AND y.expires_at IS NOT NULL AND y.expires_at < now()
                 ORDER BY y.expires_at
                 LIMIT 250)"""


def explain_time(conn: psycopg.Connection[Any], q: str, n: int = 20) -> tuple[float, str]:
    """Median execution time (ms) of ``q`` — an EXPLAIN (ANALYZE, FORMAT JSON)
    statement — over ``n`` rolled-back runs, and the scans of its plan."""
    times, plan = [], ""
    for _ in range(n):
        with conn.transaction():
            doc = conn.execute(q).fetchone()[0][0]  # type: ignore[index]
            times.append(float(doc["Execution Time"]))
            seen = []
            stack = [doc["Plan"]]
            while stack:
                x = stack.pop()
                if "Relation Name" in x:
                    seen.append(f"{x['Node Type']} {x.get('Index Name', '')} on {x['Relation Name']}".replace("  ", " "))
                stack.extend(x.get("Plans", []))
            plan = "; ".join(seen)
            raise psycopg.Rollback()
    return C.pct(times, 50), plan


def trial_expiry(db: C.Database, past: int, upcoming: int, guard: C.Guard) -> dict[str, Any]:
    """tick()'s expiry of sent pre_confirmation/reminder workflows: the first
    release's join on appointments vs the ``expires_at`` column of migration
    0002 (set by open_workflow, kept after the workflow closes)."""
    name = db.fresh("expiry")
    dsn = db.dsn(name)

    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            C.seed_clinic(conn, "http://127.0.0.1:9/unused")
            conn.execute("SET session_replication_role = replica")
            conn.execute(
                """INSERT INTO barnum.appointments (id, patient_id, starts_at, status)
                   SELECT ('e' || lpad(to_hex(g), 31, '0'))::uuid,
                          ('00000000-0000-0000-0000-' || lpad((1 + g %% 100)::text, 12, '0'))::uuid,
                          CASE WHEN g <= %s THEN now() - g * interval '1 minute' ELSE now() + (g - %s) * interval '1 minute' END,
                          CASE WHEN g <= %s THEN 'completed' ELSE 'scheduled' END::barnum.appointment_status
                     FROM generate_series(1, %s) g""", (past, past, past, past + upcoming))
            conn.execute(
                """INSERT INTO barnum.whatsapp_workflows
                       (workflow_type, appointment_id, patient_id, status, metadata, expires_at)
                   SELECT 'pre_confirmation', a.id, a.patient_id,
                          CASE WHEN a.status = 'completed' THEN 'completed' ELSE 'pending' END,
                          jsonb_build_object('starts_at', a.starts_at), a.starts_at
                     FROM barnum.appointments a""")
            conn.execute("RESET session_replication_role")
            conn.execute("VACUUM ANALYZE")
            # Stats taken while the upcoming workflows were still pending; then they are sent
            # (what claims + record_attempts do all day long).
            conn.execute("UPDATE barnum.whatsapp_workflows SET status = 'sent' WHERE status = 'pending'")
            stale = explain_time(conn, EXPIRY_NOW)
            conn.execute("ANALYZE barnum.whatsapp_workflows")
            fresh = explain_time(conn, EXPIRY_NOW)
            proposed = explain_time(conn, EXPIRY_TICK)
        return {"past": past, "upcoming": upcoming, "stale": stale, "fresh": fresh, "proposed": proposed,
                "load": guard.load}
    finally:
        db.drop(name)


# ------------------------------------------------------------------ trial: a paused endpoint's backlog

# The due-row selection and next_due_at()'s pending part before migration 0003
# (one index on next_attempt_at for every endpoint; the active-endpoint test
# a filter per row), for the "before" column.
DUE_BEFORE_0003 = """
EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)
SELECT d.id FROM barnum.webhook_deliveries d
 WHERE d.status = 'pending' AND d.next_attempt_at <= now()
   AND EXISTS (SELECT 1 FROM barnum.webhook_endpoints ep WHERE ep.id = d.endpoint_id AND ep.is_active)
 ORDER BY d.next_attempt_at LIMIT 50
   FOR UPDATE SKIP LOCKED"""
NEXT_BEFORE_0003 = """
EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)
SELECT d.next_attempt_at FROM barnum.webhook_deliveries d
 WHERE d.status = 'pending'
   AND EXISTS (SELECT 1 FROM barnum.webhook_endpoints ep WHERE ep.id = d.endpoint_id AND ep.is_active)
 ORDER BY d.next_attempt_at LIMIT 1"""
# The same two as shipped (db/functions/60_relay.sql).
DUE_0003 = """
EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)
SELECT q.id FROM barnum.webhook_endpoints ep
 CROSS JOIN LATERAL (
    SELECT d.id, d.next_attempt_at FROM barnum.webhook_deliveries d
     WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND d.next_attempt_at <= now()
     ORDER BY d.next_attempt_at LIMIT 50
     FOR UPDATE SKIP LOCKED) q
 WHERE ep.is_active
 ORDER BY q.next_attempt_at LIMIT 50"""
NEXT_0003 = """
EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)
SELECT min(q.next_attempt_at) FROM barnum.webhook_endpoints ep
 CROSS JOIN LATERAL (
    SELECT d.next_attempt_at FROM barnum.webhook_deliveries d
     WHERE d.endpoint_id = ep.id AND d.status = 'pending'
     ORDER BY d.next_attempt_at LIMIT 1) q
 WHERE ep.is_active"""


def trial_paused(db: C.Database, paused: int, live: int, claims: int, guard: C.Guard) -> dict[str, Any]:
    """Claims while a disabled endpoint holds ``paused`` due deliveries, older
    than the ``live`` ones of the active endpoint: migration 0003's per-endpoint
    queue vs the first release's single due index."""
    name = db.fresh("paused")
    dsn = db.dsn(name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            C.seed_clinic(conn, "http://127.0.0.1:9/unused")
            conn.execute(
                """INSERT INTO barnum.appointments (patient_id, starts_at)
                   SELECT ('00000000-0000-0000-0000-' || lpad((1 + g %% 100)::text, 12, '0'))::uuid,
                          now() + interval '3 days' + g * interval '1 minute'
                     FROM generate_series(1, %s) g""", (live,))
            ep = conn.execute("""INSERT INTO barnum.webhook_endpoints (name, url, is_active)
                                 VALUES ('paused', 'http://127.0.0.1:9/paused', false) RETURNING id""").fetchone()
            assert ep is not None
            # The backlog: events that queued up for the endpoint before it was
            # paused (event rows themselves do not matter to these statements).
            conn.execute("SET session_replication_role = replica")
            conn.execute(
                """INSERT INTO barnum.webhook_deliveries (event_id, endpoint_id, next_attempt_at)
                   SELECT gen_random_uuid(), %s, now() - interval '2 days' + g * interval '10 ms'
                     FROM generate_series(1, %s) g""", (ep[0], paused))
            conn.execute("RESET session_replication_role")
            conn.execute("VACUUM ANALYZE")
            for _ in range(10):
                claim_once(conn, "bench-paused")
            lat = [claim_once(conn, "bench-paused")[0] for _ in range(claims)]
            due_next = timed(conn, "SELECT barnum.next_due_at()", 200)
            shipped = {"due": explain_time(conn, DUE_0003), "next": explain_time(conn, NEXT_0003)}
            conn.execute("CREATE INDEX webhook_deliveries_due_idx ON barnum.webhook_deliveries (next_attempt_at) "
                         "WHERE status = 'pending'")
            conn.execute("ANALYZE barnum.webhook_deliveries")
            before = {"due": explain_time(conn, DUE_BEFORE_0003, 5), "next": explain_time(conn, NEXT_BEFORE_0003, 5)}
        return {"paused": paused, "live": live, "claim": summarize(lat), "next_due_at": summarize(due_next),
                "shipped": shipped, "before": before, "load": guard.load}
    finally:
        db.drop(name)


# ------------------------------------------------------------------ main


def in_private_cluster(trial: Any, *args: Any) -> tuple[C.Database, dict[str, Any]]:
    """Run one trial (guarded against other benchmarks) in a private cluster, stopped after."""
    db = C.Database(extra_settings=SETTINGS)
    try:
        return db, C.guarded(trial, db, *args)
    finally:
        db.close()


def run_trial_paused(args: argparse.Namespace, command: str) -> int:
    log(f"waiting for a quiet box… {C.wait_quiet()}")
    db, r = in_private_cluster(trial_paused, args.trial_paused, args.live, args.claims)
    rows = [("claim_deliveries_text(…, 50), as shipped (incl. rendering, tokens, commit)",
             f"{r['claim']['p50']:.1f} / {r['claim']['p99']:.1f} / {r['claim']['max']:.1f}", "", "–"),
            ("next_due_at(), as shipped", f"{r['next_due_at']['p50']:.2f} / {r['next_due_at']['p99']:.2f} / "
             f"{r['next_due_at']['max']:.2f}", "", "–"),
            ("due-row selection (LIMIT 50, FOR UPDATE SKIP LOCKED)", f"{r['shipped']['due'][0]:.2f}",
             r["shipped"]["due"][1], f"{r['before']['due'][0]:.1f} — {r['before']['due'][1]}"),
            ("next_due_at()'s pending part", f"{r['shipped']['next'][0]:.2f}", r["shipped"]["next"][1],
             f"{r['before']['next'][0]:.1f} — {r['before']['next'][1]}")]
    for what, ms, plan, before in rows:
        print(f"{what}: {ms} ms {plan} (before 0003: {before})")
    if not args.no_record:
        C.append_results("\n".join([
            f"\n## Scale: a paused endpoint's backlog — {C.now_utc()} — `{command}`\n",
            f"{C.box_line(db)}. A disabled endpoint holds {r['paused']:,} due pending deliveries, all older "
            f"than the {r['live']:,} live ones of the active endpoint (real bookings, recycled to due after "
            f"each claim). As shipped = migration 0003 (index on (endpoint_id, next_attempt_at) WHERE pending; "
            "claim and next_due_at read each active endpoint's queue). Before = the first release's single "
            "index on next_attempt_at and its statements (bench/scale.py DUE_BEFORE_0003 / NEXT_BEFORE_0003), "
            f"EXPLAIN ANALYZE, rolled back, median. Load avg before: {r['load']}.\n",
            "| what | as shipped: ms (p50 / p99 / max, or median) | plan | before 0003: ms — plan |",
            "|---|---:|---|---|",
            *[f"| {what} | {ms} | {plan} | {before} |" for what, ms, plan, before in rows]]))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=10_000_000, help="outbox events in total (big outbox)")
    p.add_argument("--live", type=int, default=20_000, help="live appointments with a pending due delivery")
    p.add_argument("--small-history", type=int, default=10_000, help="history events of the small outbox")
    p.add_argument("--purge", type=int, default=5_000_000, help="old events the retention purge removes")
    p.add_argument("--tick-batches", default="250",
                   help="comma-separated tick(p_batch) values: the purge is split into equal phases, one per value")
    p.add_argument("--claims", type=int, default=200)
    p.add_argument("--purge-max-seconds", type=float, default=3600)
    p.add_argument("--skip-small", action="store_true")
    p.add_argument("--skip-purge", action="store_true")
    p.add_argument("--sql", action="append", default=[], metavar="FILE")
    p.add_argument("--trial-expiry", action="store_true",
                   help="only: tick()'s workflow-expiry statement, first release vs expires_at (migration 0002)")
    p.add_argument("--past", type=int, default=1_000_000, help="trial-expiry: past (completed) appointments")
    p.add_argument("--upcoming", type=int, default=20_000, help="trial-expiry: upcoming appointments with a sent workflow")
    p.add_argument("--trial-paused", type=int, default=0, metavar="N",
                   help="only: claims while a disabled endpoint holds N due deliveries (migration 0003 vs before)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    command = " ".join([".venv/bin/python bench/scale.py", *sys.argv[1:]])
    if args.trial_expiry:
        db, r = in_private_cluster(trial_expiry, args.past, args.upcoming)
        for k in ("stale", "fresh", "proposed"):
            print(f"{k}: {r[k][0]:.2f} ms — {r[k][1]}")
        if not args.no_record:
            C.append_results("\n".join([
                f"\n## Scale: tick()'s workflow expiry — {C.now_utc()} — `{command}`\n",
                f"{C.box_line(db)}. {args.past:,} past completed appointments (with their completed "
                f"pre_confirmation workflows) and {args.upcoming:,} upcoming ones whose pre_confirmation "
                "workflow is `sent`; the first UPDATE of tick()'s expiry step (nothing is due to expire), "
                "EXPLAIN ANALYZE, median of 20, rolled back. First release: the UPDATE joining appointments "
                "(bench/scale.py EXPIRY_NOW). Migration 0002: `whatsapp_workflows.expires_at` = the "
                "appointment's starts_at, set by open_workflow and kept after the workflow closes (every "
                "workflow here has one), partial index WHERE status = 'sent', the UPDATE in bounded "
                "batches walking it (bench/scale.py EXPIRY_TICK = tick()'s statement). "
                f"Load avg before: {r['load']}.\n",
                "| form | ms | plan (scans) |", "|---|---:|---|",
                f"| first release, statistics taken before the workflows were sent | {r['stale'][0]:.2f} | {r['stale'][1]} |",
                f"| first release, fresh statistics | {r['fresh'][0]:.2f} | {r['fresh'][1]} |",
                f"| migration 0002: `expires_at` + partial index, batch of 250 | **{r['proposed'][0]:.2f}** | "
                f"{r['proposed'][1]} |"]))
        return 0
    if args.trial_paused:
        return run_trial_paused(args, command)
    work = C.workdir("scale")
    log(f"waiting for a quiet box… {C.wait_quiet()}")
    db = C.Database(extra_settings=SETTINGS, extra_sql=args.sql)
    res: dict[str, Any] = {}
    try:
        if not args.skip_small:
            small = db.fresh("small")
            res["small_build"] = build(db, small, args.small_history, args.live)
            res["small"] = C.guarded(measure, db, small, args.claims)
            res["small_explain"] = explain(db, small, work / "explain-small.txt")
            log(f"small: {fmt(res['small'])}")
            db.drop(small)
        big = db.fresh("big")
        res["big_build"] = build(db, big, args.events - args.live, args.live)
        res["big"] = C.guarded(measure, db, big, args.claims)
        log(f"big: {fmt(res['big'])}")
        res["big_explain"] = explain(db, big, work / "explain-big.txt")
        for line in res["big_explain"]:
            print("  " + line)
        log(f"full plans in {work}")
        if not args.skip_purge:
            batches = [int(x) for x in args.tick_batches.split(",") if x]
            res["purge"] = []
            for i, b in enumerate(batches):
                upto = args.purge * (i + 1) // len(batches)
                r = purge(db, big, upto, b, args.purge_max_seconds)
                res["purge"].append(r)
                log(f"purge (p_batch {b}): {r['purged']:,} of {r['expected']:,} events in {r['purge_s']:.0f} s "
                    f"({r['rate']:,.0f}/s, left {r['left']}); tick p50 {r['ticks']['p50']:.1f} ms, "
                    f"p99 {r['ticks']['p99']:.1f}, max {r['ticks']['max']:.1f}; claims before: "
                    f"p50 {r['claims_before']['p50']:.1f} p99 {r['claims_before']['p99']:.1f} "
                    f"max {r['claims_before']['max']:.1f}; during: p50 {r['claims_during']['p50']:.1f} "
                    f"p99 {r['claims_during']['p99']:.1f} max {r['claims_during']['max']:.1f} ms "
                    f"({r['over_100']} over 100 ms); waits during {r['waits_during']}; "
                    f"in claims > 100 ms {r['waits_slow']}")
    finally:
        db.close()
    if not args.no_record:
        record(command, args, db, res)
    return 0


def fmt(m: dict[str, Any]) -> str:
    return (f"claim(50) p50 {m['claim']['p50']:.1f} ms, p99 {m['claim']['p99']:.1f}, max {m['claim']['max']:.1f} "
            f"({m['claim_rows']:.0f} rows/claim); tick p50 {m['tick']['p50']:.1f} ms, p99 {m['tick']['p99']:.1f}; "
            f"next_due_at p50 {m['next_due_at']['p50']:.2f} ms; queue_stats p50 {m['queue_stats']['p50']:.1f} ms; "
            f"load {m['load']}")


def record(command: str, args: argparse.Namespace, db: C.Database, res: dict[str, Any]) -> None:
    lines = [f"\n## Scale — {C.now_utc()} — `{command}`\n",
             f"{C.box_line(db)}; server settings: "
             + ", ".join(f"{k}={v}" for k, v in SETTINGS.items())
             + (f"; extra SQL: {', '.join(args.sql)}" if args.sql else "") + ". "
             "Outbox bulk-loaded (INSERT … SELECT generate_series, 1M-row chunks, triggers/FK checks off), then "
             "VACUUM ANALYZE; history 97 % sent / 2 % skipped / 1 % dead, one attempt row per sent/dead "
             f"delivery; {args.live:,} live appointments with a pending due delivery. Claims: batch 50, "
             "each followed (untimed) by record_attempts all-ok and a reset of the rows to due.\n"]
    b = res.get("big_build", {})
    s = res.get("small_build", {})
    lines += ["| outbox | events | deliveries | attempts | DB size | build |", "|---|---:|---:|---:|---|---|"]
    for label, x in (("small", s), ("big", b)):
        if x:
            lines.append(f"| {label} | {x['events']:,} | {x['deliveries']:,} | {x['attempts']:,} | {x['size']} | "
                         f"load {x['load_s']:.0f} s + VACUUM ANALYZE {x['vacuum_s']:.0f} s |")
    lines += ["", "| call | small outbox p50 / p99 / max ms | big outbox p50 / p99 / max ms |", "|---|---|---|"]
    for key, label in (("claim", f"claim_deliveries_text(…, 50), {args.claims} calls"),
                       ("tick", "tick(), nothing to purge, 50 calls"),
                       ("next_due_at", "next_due_at(), 200 calls"), ("queue_stats", "queue_stats(), 50 calls")):
        cells = []
        for which in ("small", "big"):
            m = res.get(which)
            cells.append(f"{m[key]['p50']:.2f} / {m[key]['p99']:.2f} / {m[key]['max']:.2f}" if m else "–")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    lines.append(f"\nLoad average before: small {res.get('small', {}).get('load', '–')}, "
                 f"big {res.get('big', {}).get('load', '–')}.")
    if res.get("big_explain"):
        lines += ["", "Plans on the big outbox (auto_explain, ANALYZE + BUFFERS, the statements inside the "
                  "functions; key lines: statement | node):", "", "```"]
        lines += res["big_explain"]
        lines += ["```"]
    purges = res.get("purge") or []
    if purges:
        def waits(ws: list[tuple[str, float]]) -> str:
            return ", ".join(f"{ev} {pc:.0f} %" for ev, pc in ws) or "–"
        lines += ["", "Retention purge: `retention` set so the oldest history events qualify; tick(p_batch) called "
                  "back to back (p_batch events per call, their deliveries and attempts by ON DELETE CASCADE) while "
                  "one connection claims 50 + records + recycles continuously (20 s of claims first, as the "
                  "baseline). The claimer's wait event is sampled from pg_stat_activity every ~10 ms.", "",
                  "| measure | " + " | ".join(f"phase {i + 1}: tick(p_batch = {r['batch']})" for i, r in enumerate(purges)) + " |",
                  "|---|" + "---|" * len(purges)]

        def row(label: str, f: Any) -> None:
            lines.append(f"| {label} | " + " | ".join(f(r) for r in purges) + " |")
        row("outbox events at the start", lambda r: f"{r['outbox_before']:,}")
        row("events purged (cascade: deliveries + attempts)", lambda r: f"{r['purged']:,} of {r['expected']:,} (left {r['left']:,})")
        row("purge duration", lambda r: f"**{r['purge_s']:.0f} s** ({r['rate']:,.0f} events/s)")
        row("tick() p50 / p99 / max", lambda r: f"{r['ticks']['p50']:.1f} / {r['ticks']['p99']:.1f} / {r['ticks']['max']:.1f} ms ({r['ticks']['n']} calls)")
        row("claim before the purge p50 / p99 / max", lambda r: f"{r['claims_before']['p50']:.1f} / {r['claims_before']['p99']:.1f} / {r['claims_before']['max']:.1f} ms")
        row("claim during the purge p50 / p99 / **max = longest stall**", lambda r: f"{r['claims_during']['p50']:.1f} / {r['claims_during']['p99']:.1f} / **{r['claims_during']['max']:.1f} ms**")
        row("claims during: count, > 50 ms, > 100 ms", lambda r: f"{r['claims_during']['n']}, {r['over_50']}, {r['over_100']} (worst at +{r['worst_at_s']:.0f} s)")
        row("claimer wait events before", lambda r: waits(r["waits_before"]))
        row("claimer wait events during", lambda r: waits(r["waits_during"]))
        row("… within claims > 100 ms", lambda r: waits(r["waits_slow"]))
        row("load average before", lambda r: r["load"] + (" — **another benchmark ran**" if r.get("contaminated") else ""))
    C.append_results("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

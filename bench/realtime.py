"""Realtime latency (SPEC-2 §D): commit of a message row → ``message:new``
received by a Socket.IO client.  Target: p99 ≤ 50 ms.

    .venv/bin/python bench/realtime.py                          # 3 runs of 200 messages at 50/s
    .venv/bin/python bench/realtime.py --messages 1000 --rate 200 --clients 20 --runs 1
    .venv/bin/python bench/realtime.py --runs 1 --no-record     # quick look

One shim process exactly as ``barnum shim`` runs it (uvicorn, uvloop +
httptools, websocket transport via wsproto, log level WARNING) against a
private PostgreSQL 15 (fsync on).  ``--clients`` python-socketio
AsyncClients (websocket transport) connect with a ``conversations:read``
token and join one contact's conversation.  A producer in the same process
(asyncpg, autocommit) inserts one ``barnum.messages`` row per transaction at
a steady ``--rate`` (absolute schedule, no drift) and notes the time its
INSERT returned (= committed); each client notes when ``message:new`` for
that row arrived.  Latency per (message, client) = arrival − commit: trigger
NOTIFY, the shim's LISTEN connection, one ``realtime_events`` call per burst,
Socket.IO framing, the websocket and the client's decoding.  The first
``--warmup`` messages are not counted.

Prints the numbers and appends a table with this exact command to
``bench/RESULTS.md`` unless ``--no-record``.  Not run by the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET_P99_MS = 50.0


def serve(port: int) -> int:
    """``--serve PORT``: the shim exactly as ``barnum shim`` runs it."""
    from listener import config as cfg
    from listener import shim

    return shim.main(argparse.Namespace(host="127.0.0.1", port=port), cfg.load())


def start_shim(dsn: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": dsn, "WEBHOOK_SECRET": C.SECRET, "BARNUM_LOG_LEVEL": "WARNING"}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the shim exited ({proc.returncode}); see {log}")
        time.sleep(0.05)  # wait-ok: start-up poll with a deadline
    proc.terminate()
    raise RuntimeError("the shim did not become ready")


def seed(dsn: str) -> tuple[str, str, str]:
    """(account id, contact id, token)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            """WITH a AS (SELECT id FROM barnum.accounts WHERE name = 'default')
               INSERT INTO barnum.contacts (account_id, wa_id, name) SELECT id, '351911000001', 'Bench' FROM a
               RETURNING account_id::text, id::text""").fetchone()
        tok = conn.execute("SELECT barnum.api_token_create('default', 'bench', '{conversations:read}') ->> 'token'"
                           ).fetchone()
    assert row is not None and tok is not None
    return row[0], row[1], tok[0]


async def run_once(dsn: str, url: str, account: str, contact: str, token: str, args: argparse.Namespace,
                   ) -> dict[str, Any]:
    import asyncpg
    import socketio

    arrivals: list[dict[str, float]] = [{} for _ in range(args.clients)]
    clients = []
    for i in range(args.clients):
        sio = socketio.AsyncClient(reconnection=False)

        def handler(seen: dict[str, float]) -> Any:
            async def on_new(data: Any) -> None:
                seen[data["message"]["id"]] = time.perf_counter()
            return on_new

        sio.on("message:new", handler(arrivals[i]))
        await sio.connect(url, auth={"token": token}, transports=["websocket"], wait_timeout=10)
        assert await sio.call("join:conversation", contact, timeout=10) is True
        clients.append(sio)

    conn = await asyncpg.connect(dsn)
    commits: dict[str, float] = {}
    order: list[str] = []
    total = args.warmup + args.messages
    gap = 1.0 / args.rate
    start = time.perf_counter()
    for n in range(total):
        due = start + n * gap
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # the producer's schedule, not a synchronisation
        mid = await conn.fetchval(
            "INSERT INTO barnum.messages (account_id, contact_id, direction, type, content, status)"
            " VALUES ($1, $2, 'outbound', 'text', $3, 'pending') RETURNING id::text",
            account, contact, f"bench message {n}")
        commits[mid] = time.perf_counter()
        order.append(mid)
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline and any(len(a) < total for a in arrivals):
        await asyncio.sleep(0.01)  # wait-ok: bounded wait for the last arrivals
    await conn.close()
    for sio in clients:
        await sio.disconnect()

    timed = order[args.warmup:]
    lat = [(a[m] - commits[m]) * 1000 for a in arrivals for m in timed if m in a]
    missing = sum(1 for a in arrivals for m in order if m not in a)
    return {"lat": lat, "missing": missing, "expected": len(timed) * args.clients}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--rate", type=float, default=50.0, help="messages per second (default 50)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--clients", type=int, default=1, help="sockets in the conversation (default 1)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        return serve(args.serve)

    command = "python bench/realtime.py" + "".join(f" {a}" for a in sys.argv[1:])
    print("waiting for a quiet box…", C.wait_quiet(), flush=True)
    db = C.Database()
    rows: list[dict[str, Any]] = []
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "barnum-bench-realtime-shim.log"
    try:
        for run in range(1, args.runs + 1):
            name = db.fresh("rt")
            dsn = db.dsn(name)
            account, contact, token = seed(dsn)
            port = C.free_port()
            load = C.loadavg()
            shim = start_shim(dsn, port, log)
            try:
                import psycopg

                with psycopg.connect(dsn, autocommit=True) as conn:  # LISTEN up before the first insert
                    deadline = time.monotonic() + 30
                    while conn.execute("SELECT count(*) FROM pg_stat_activity"
                                       " WHERE application_name = 'barnum-shim-realtime'").fetchone() != (1,):
                        if time.monotonic() > deadline:
                            raise RuntimeError("the shim's LISTEN connection did not open")
                        time.sleep(0.05)  # wait-ok: start-up poll with a deadline
                result = asyncio.run(run_once(dsn, f"http://127.0.0.1:{port}", account, contact, token, args))
            finally:
                shim.terminate()
                shim.wait(30)
                db.drop(name)
            lat = result["lat"]
            row = {"run": run, "n": len(lat), "missing": result["missing"], "load": load,
                   "p50": C.pct(lat, 50), "p95": C.pct(lat, 95), "p99": C.pct(lat, 99), "max": max(lat)}
            rows.append(row)
            print(f"run {run}: {len(lat)}/{result['expected']} arrivals, p50 {row['p50']:.2f} ms, "
                  f"p95 {row['p95']:.2f} ms, p99 {row['p99']:.2f} ms, max {row['max']:.2f} ms, "
                  f"missing {row['missing']} (load {load})", flush=True)
        box = C.box_line(db)
    finally:
        db.close()

    med = {k: C.median([r[k] for r in rows]) for k in ("p50", "p95", "p99", "max")}
    verdict = "met" if med["p99"] <= TARGET_P99_MS else "missed"
    lines = [
        f"\n## Realtime — {C.now_utc()} — `{command}`\n",
        f"{box}. One shim process (uvicorn + uvloop + httptools, websocket transport via wsproto, log level "
        f"WARNING); {args.clients} python-socketio AsyncClient(s) (websocket) in one conversation; "
        f"{args.messages} messages (after {args.warmup} warm-up) inserted one per transaction at "
        f"{args.rate:g}/s; latency = `message:new` arrival − INSERT's commit returning. "
        f"Target p99 ≤ {TARGET_P99_MS:g} ms: **{verdict}** (median p99 {med['p99']:.2f} ms).\n",
        "| run | arrivals | missing | p50 ms | p95 ms | p99 ms | max ms | load before |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['run']} | {r['n']} | {r['missing']} | {r['p50']:.2f} | {r['p95']:.2f} | "
                     f"{r['p99']:.2f} | {r['max']:.2f} | {r['load']} |")
    lines.append(f"| **median** | | | **{med['p50']:.2f}** | {med['p95']:.2f} | **{med['p99']:.2f}** | "
                 f"{med['max']:.2f} | |")
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        C.append_results(text)
    return 0 if all(r["missing"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

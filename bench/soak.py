"""Reliability soak (issue 7 §4): relay kills, a PostgreSQL restart, a flaky
receiver and concurrent action-link POSTs, then an audit of every delivery.

    .venv/bin/python bench/soak.py                 # ~10 minutes + drain
    .venv/bin/python bench/soak.py --minutes 2     # a short run

Everything runs on loopback and is stopped at the end (also on Ctrl-C or an
exception; child processes get SIGKILL if this process dies):

* a private PostgreSQL cluster (``tests.pgcluster.LocalCluster``, fsync
  on), one fresh migrated database; settings ``max_attempts`` 8,
  ``backoff_base_seconds`` 1, ``backoff_max_seconds`` 5, ``no_show_delay`` and
  ``review_delay`` '5 seconds';
* a receiver (uvicorn + uvloop + httptools, its own process) for two webhook
  endpoints (``soak-a``: every event, secret = the relays' WEBHOOK_SECRET;
  ``soak-b``: ``appointment.pre_confirmed`` and ``appointment.c*``, its own
  ``whsec_`` secret), both with ``timeout_ms`` 1000.  Per request it checks
  both signatures (hex ``X-Webhook-Signature`` and Standard Webhooks), then:
  events of a patient named "Reject …" → 400 (must end as dead letters);
  otherwise 5 % sleep 1.5 s (a timeout for the relay) then 503, 30 % → a
  random 500/502/503, the rest → 200.  A given event+endpoint is failed at
  most ``--fail-cap`` (4) times, so with 8 attempts every ordinary delivery
  must end delivered: any other dead letter is a finding.  It records, per
  event+endpoint, requests, 200s, failures and the first request's time;
* two shims (``barnum shim``) for the action links;
* two to four relays (``python -m listener.relay --sweep-interval 2``);
  every 20–40 s a random one is SIGKILLed and a new one started; the target
  count is re-drawn in [2, 4] each time (an extra relay is stopped with
  SIGTERM — it must exit 0);
* a producer: ``--rate`` appointment inserts/s (one transaction each), plus
  status changes (confirm / cancel / no_show / completed / reschedule) at
  ``--changes`` per s on recent appointments;
* every 5–15 s, 100 concurrent ``POST /api/action?type=confirm&token=…``
  (aiohttp, split over the two shims) with one token minted by
  ``barnum.generate_action_token('confirm', …)`` for a live appointment;
* once, at ~45 % of the run, ``LocalCluster.restart()`` (fast shutdown).

Then producers and chaos stop, the relays drain (bounded by
``--drain-timeout``) until no delivery is pending or processing, the relays
get SIGTERM, and the audit compares the database with what the receiver got.
Prints a table and appends it (with this exact command) to
``bench/RESULTS.md`` unless ``--no-record``.  Exit status 1 when a
must-be-zero figure is not zero.

Before starting, waits (polling every 15 s, at most 20 minutes) until no other
benchmark (``bench/(triggers|scale|compare|relay).py``) runs on this box.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fnmatch
import hashlib
import hmac
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from _common import asgi_lifespan, free_port, get_json, loadavg  # noqa: E402

PYTHON = str(ROOT / ".venv" / "bin" / "python")
BARNUM = str(ROOT / ".venv" / "bin" / "barnum")
WEBHOOK_SECRET = "soak-secret-current,soak-secret-previous"
SIGNING_KEY_A = b"soak-secret-current"
KEY_B = b"soak endpoint b key \x00\x01\x02"
SECRET_B = "whsec_" + base64.b64encode(KEY_B).decode()
ENDPOINT_B_TYPES = ["appointment.pre_confirmed", "appointment.c*"]
OTHER_BENCHES = r"bench/(triggers|scale|compare|relay)\.py"
BATCH = 50
BATCHES_IN_FLIGHT = 2


# ====================================================================== receiver


def receiver_app(p_5xx: float, p_timeout: float, sleep_s: float, fail_cap: int, seed: int) -> Any:
    """ASGI app for /hook/a and /hook/b; GET /stats returns what it saw."""
    rng = random.Random(seed)
    keys = {"a": SIGNING_KEY_A, "b": KEY_B}
    # key "a|<event id>" → [requests, ok, 5xx, timeouts, rejects, bad_sig, first_seen, first_ok]
    rec: dict[str, list[Any]] = {}
    counters: Counter[str] = Counter()

    async def respond(send: Any, status: int, body: bytes = b"{}") -> None:
        with contextlib.suppress(Exception):  # the client may be gone (timeout)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})

    def signature_ok(key: bytes, headers: dict[bytes, bytes], body: bytes) -> bool:
        hexsig = headers.get(b"x-webhook-signature", b"").decode()
        if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).hexdigest(), hexsig):
            return False
        msg_id = headers.get(b"webhook-id", b"").decode()
        ts = headers.get(b"webhook-timestamp", b"").decode()
        want = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
        got = [s.split(",", 1)[1] for s in headers.get(b"webhook-signature", b"").decode().split() if "," in s]
        return any(hmac.compare_digest(want, g) for g in got) and msg_id == headers.get(b"x-event-id", b"").decode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await asgi_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] == "GET":
            body = json.dumps({"keys": rec, "counters": counters}).encode()
            await respond(send, 200, body)
            return
        chunks = []
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        now = time.time()
        counters["requests"] += 1
        ep = scope["path"].rstrip("/").rsplit("/", 1)[-1]
        headers = dict(scope["headers"])
        event_id = headers.get(b"x-event-id", b"").decode()
        if ep not in keys or not event_id:
            counters["malformed"] += 1
            await respond(send, 404)
            return
        r = rec.get(f"{ep}|{event_id}")
        if r is None:
            r = rec[f"{ep}|{event_id}"] = [0, 0, 0, 0, 0, 0, now, None]
        r[0] += 1
        if not signature_ok(keys[ep], headers, body):
            r[5] += 1
            counters["bad_signature"] += 1
            await respond(send, 401)
            return
        try:
            doc = json.loads(body)
            name = (((doc.get("appointment") or {}).get("patient") or {}).get("name")
                    or (doc.get("patient") or {}).get("name") or "")
        except (ValueError, AttributeError):
            counters["bad_json"] += 1
            name = ""
        if name.startswith("Reject"):
            r[4] += 1
            counters["400"] += 1
            await respond(send, 400, b'{"error":"rejected on purpose"}')
            return
        roll = rng.random()
        if r[2] + r[3] < fail_cap and roll < p_timeout:
            r[3] += 1
            counters["timeouts"] += 1
            await asyncio.sleep(sleep_s)
            await respond(send, 503)
            return
        if r[2] + r[3] < fail_cap and roll < p_timeout + p_5xx:
            r[2] += 1
            counters["5xx"] += 1
            await respond(send, rng.choice((500, 502, 503)))
            return
        r[1] += 1
        counters["200"] += 1
        if r[7] is None:
            r[7] = now
        await respond(send, 200, b'{"ok":true}')

    return app


def serve_receiver(port: int, args: argparse.Namespace) -> None:
    import uvicorn

    app = receiver_app(args.p_5xx, args.p_timeout, args.timeout_ms / 1000.0 + 0.5, args.fail_cap, args.seed)
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=30)


# ====================================================================== processes


def _die_with_parent() -> None:
    """In a child: SIGKILL when the soak process dies, whatever the cause."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
    os.setpgrp()  # a Ctrl-C in the terminal reaches only us; we stop the children


@dataclass
class Proc:
    kind: str
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    started: float
    fate: str | None = None  # "killed" (SIGKILL by us), "stopped" (SIGTERM by us)
    ended: float | None = None
    exit_code: int | None = None

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


class Procs:
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.all: list[Proc] = []
        self.counter = Counter[str]()

    def spawn(self, kind: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Proc:
        self.counter[kind] += 1
        name = f"{kind}-{self.counter[kind]}"
        log = self.workdir / f"{name}.log"
        env = dict(self.env)
        env.update(extra_env or {})
        with open(log, "ab") as fh:
            popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        p = Proc(kind, name, popen, log, time.time())
        self.all.append(p)
        return p

    def live(self, kind: str) -> list[Proc]:
        return [p for p in self.all if p.kind == kind and p.alive and p.fate is None]

    def stop_all(self) -> None:
        """SIGTERM everything still running, then SIGKILL what is left."""
        running = [p for p in self.all if p.alive]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in running:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()


# ====================================================================== database


class Db:
    """One async connection that reconnects after a server restart."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        if self.conn is None or self.conn.closed:
            self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, connect_timeout=3)
        return self.conn

    async def q(self, query: str, params: Any = (), *, retry: bool = True) -> list[Any]:
        for attempt in range(2):
            try:
                conn = await self._connect()
                cur = await conn.execute(query, params)
                return await cur.fetchall() if cur.description else []
            except (psycopg.OperationalError, psycopg.InterfaceError):
                await self.close()
                if not retry or attempt:
                    raise
                await asyncio.sleep(0.2)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()
            self.conn = None


def provision(workdir: Path) -> tuple[Any, str, str]:
    """A private cluster with durability on, and a migrated database."""
    from listener.migrate import migrate
    from tests.pgcluster import LocalCluster

    cluster = LocalCluster(extra_settings={"fsync": "on", "synchronous_commit": "on",
                                           "full_page_writes": "on", "max_connections": "200"})
    cluster.start()
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("barnum_soak")))
    dsn = cluster.dsn("barnum_soak")
    migrate(dsn, ROOT)
    return cluster, dsn, str(version)


def seed(dsn: str, base: str, args: argparse.Namespace) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for key, value in {"max_attempts": 8, "backoff_base_seconds": 1, "backoff_max_seconds": 5,
                           "no_show_delay": "5 seconds", "review_delay": "5 seconds"}.items():
            conn.execute("UPDATE barnum.settings SET value = %s::jsonb, updated_at = now() WHERE key = %s",
                         (json.dumps(value), key))
        conn.execute("INSERT INTO barnum.webhook_endpoints (name, url, timeout_ms) VALUES ('soak-a', %s, %s)",
                     (base + "/hook/a", args.timeout_ms))
        conn.execute("INSERT INTO barnum.webhook_endpoints (name, url, secret, event_types, timeout_ms) "
                     "VALUES ('soak-b', %s, %s, %s, %s)",
                     (base + "/hook/b", SECRET_B, ENDPOINT_B_TYPES, args.timeout_ms))
        endpoints = {name: str(i) for i, name in conn.execute("SELECT id, name FROM barnum.webhook_endpoints")}
        prof = [r[0] for r in conn.execute(
            "INSERT INTO barnum.professionals (name) VALUES ('Dr. Maria Santos'), ('Dr. Rui Costa') RETURNING id")]
        spec = [r[0] for r in conn.execute(
            "INSERT INTO barnum.specialties (name) VALUES ('Medicina Dentária'), ('Ortodontia') RETURNING id")]

        def patients(names: list[str], phone: bool, opt_out: bool) -> list[Any]:
            out = []
            for i, n in enumerate(names):
                out.append(conn.execute(
                    "INSERT INTO barnum.patients (name, phone, whatsapp_opt_out) VALUES (%s, %s, %s) RETURNING id",
                    (n, f"+3519{random.randrange(10**7, 10**8)}" if phone else None, opt_out)).fetchone()[0])  # type: ignore[index]
            return out

        normal = patients([f"Paciente {i:03d} Silva" for i in range(300)], True, False)
        reject = patients([f"Reject {i} Teste" for i in range(6)], True, False)
        blocked = patients([f"Opt Out {i}" for i in range(4)], True, True) + patients(["Sem Telefone"], False, False)
    return {"endpoints": endpoints, "prof": prof, "spec": spec, "normal": normal, "reject": reject,
            "blocked": blocked}


# ====================================================================== the soak


@dataclass
class State:
    t0: float = 0.0
    stop_load: bool = False
    inserts: int = 0
    insert_errors: int = 0
    changes: Counter[str] = field(default_factory=Counter)
    change_illegal: int = 0
    change_errors: int = 0
    recent: list[Any] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)
    graceful: list[Proc] = field(default_factory=list)
    crashes: list[dict[str, Any]] = field(default_factory=list)
    pg_restarts: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stop_event: asyncio.Event | None = None

    async def nap(self, seconds: float) -> bool:
        """Sleep, cut short when the load phase ends; True when it has ended."""
        if self.stop_event is None:
            self.stop_event = asyncio.Event()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), seconds)
        return self.stop_load


def relay_argv(args: argparse.Namespace) -> list[str]:
    return [PYTHON, "-m", "listener.relay", "--sweep-interval", "2", "--lease", str(args.lease),
            "--batch", str(BATCH), "--batches-in-flight", str(BATCHES_IN_FLIGHT)]


def elapsed(st: State) -> str:
    return f"[{time.time() - st.t0:6.1f}s]"


async def producer(db: Db, seeds: dict[str, Any], args: argparse.Namespace, st: State) -> None:
    """Inserts at --rate/s and status changes at --changes/s, paced, never bursting."""
    interval = 1.0 / args.rate
    change_every = max(1, round(args.rate / args.changes)) if args.changes > 0 else 0
    rng = random.Random(args.seed + 1)
    next_at = time.monotonic()
    i = 0
    while not st.stop_load:
        now = time.monotonic()
        if next_at > now:
            await asyncio.sleep(next_at - now)
        else:
            next_at = now  # behind: do not burst to catch up
        next_at += interval
        i += 1
        roll = rng.random()
        patient = (rng.choice(seeds["reject"]) if roll < 0.02 else
                   rng.choice(seeds["blocked"]) if roll < 0.04 else rng.choice(seeds["normal"]))
        # starts_at either within 20 h (tick() sends a reminder at once) or
        # 48–96 h out: none crosses the 24 h reminder line during the run.
        minutes = rng.randint(60, 1200) if rng.random() < 0.5 else rng.randint(2880, 5760)
        try:
            rows = await db.q(
                "INSERT INTO barnum.appointments (patient_id, professional_id, specialty_id, starts_at) "
                "VALUES (%s, %s, %s, now() + %s * interval '1 minute') RETURNING id",
                (patient, rng.choice(seeds["prof"]), rng.choice(seeds["spec"]), minutes), retry=False)
            st.inserts += 1
            st.recent.append(rows[0][0])
            if len(st.recent) > 3000:
                del st.recent[:1000]
        except psycopg.Error:
            st.insert_errors += 1
            await asyncio.sleep(0.2)
            continue
        if change_every and i % change_every == 0 and len(st.recent) > 50:
            appt = rng.choice(st.recent[:-20])  # not the very newest: let some events go out first
            kind = rng.choices(["confirmed", "cancelled", "no_show", "completed", "reschedule"],
                               weights=[40, 25, 15, 15, 5])[0]
            query = ("UPDATE barnum.appointments SET starts_at = starts_at + interval '1 day' WHERE id = %s"
                     if kind == "reschedule" else
                     "UPDATE barnum.appointments SET status = %s::barnum.appointment_status WHERE id = %s")
            params = (appt,) if kind == "reschedule" else (kind, appt)
            try:
                await db.q(query, params, retry=False)
                st.changes[kind] += 1
            except psycopg.Error as exc:
                if (exc.sqlstate or "").startswith("BN"):
                    st.change_illegal += 1
                else:
                    st.change_errors += 1


async def storm(db: Db, shims: list[str], st: State, rng: random.Random, label: str = "") -> None:
    """One fresh confirm token for a live appointment, 100 concurrent POSTs."""
    import aiohttp

    try:
        rows = await db.q(
            "SELECT a.id, a.patient_id FROM barnum.appointments a JOIN barnum.patients p ON p.id = a.patient_id "
            " WHERE a.status IN ('scheduled', 'pre_confirmed') AND p.name LIKE 'Paciente%%' "
            " ORDER BY a.created_at DESC LIMIT 300")
        if not rows:
            return
        appt, patient = rng.choice(rows)
        token = (await db.q("SELECT barnum.generate_action_token('confirm', %s, %s)", (appt, patient)))[0][0]
    except psycopg.Error as exc:
        st.notes.append(f"token storm skipped at {time.time() - st.t0:.0f}s: {type(exc).__name__}")
        return
    statuses: Counter[str] = Counter()

    async def post(session: aiohttp.ClientSession, url: str) -> None:
        try:
            async with session.post(url) as resp:
                await resp.read()
                statuses[str(resp.status)] += 1
        except Exception as exc:  # noqa: BLE001
            statuses[type(exc).__name__] += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        urls = [f"{shims[k % len(shims)]}/api/action?type=confirm&token={token}" for k in range(100)]
        t = time.time()
        await asyncio.gather(*(post(session, u) for u in urls))
    st.tokens.append({"at": t - st.t0, "appointment": str(appt), "statuses": dict(statuses),
                      "ok": statuses.get("200", 0), "label": label})
    print(f"{elapsed(st)} token storm{' ' + label if label else ''}: 100 POSTs → {dict(statuses)}", flush=True)


async def token_storms(db: Db, shims: list[str], args: argparse.Namespace, st: State) -> None:
    rng = random.Random(args.seed + 2)
    while not await st.nap(rng.uniform(5, 15)):
        await storm(db, shims, st, rng)


async def chaos(procs: Procs, args: argparse.Namespace, st: State) -> None:
    """Every 20–40 s SIGKILL a random relay and start another; re-draw the count."""
    rng = random.Random(args.seed + 3)
    while not await st.nap(rng.uniform(args.kill_min, args.kill_max)):
        live = procs.live("relay")
        victim_name = "-"
        if live:
            victim = rng.choice(live)
            victim_name = victim.name
            victim.fate = "killed"
            with contextlib.suppress(ProcessLookupError):
                victim.popen.send_signal(signal.SIGKILL)
            victim.popen.wait()
            victim.ended = time.time()
            st.kills.append({"at": victim.ended - st.t0, "relay": victim.name})
        target = rng.randint(args.relays_min, args.relays_max)
        started = []
        while len(procs.live("relay")) < target:
            started.append(procs.spawn("relay", relay_argv(args)).name)
        stopped = []
        live = procs.live("relay")
        while len(live) > target:
            extra = live.pop(rng.randrange(len(live)))
            extra.fate = "stopped"
            extra.popen.send_signal(signal.SIGTERM)
            st.graceful.append(extra)
            stopped.append(extra.name)
        print(f"{elapsed(st)} SIGKILL {victim_name}; started {started or '-'}; "
              f"SIGTERM {stopped or '-'}; relays now {len(procs.live('relay'))}", flush=True)


async def pg_restart(cluster: Any, db: Db, shims: list[str], args: argparse.Namespace, st: State) -> None:
    if await st.nap(args.minutes * 60 * 0.45):
        return
    loop = asyncio.get_running_loop()
    t = time.time()
    print(f"{elapsed(st)} restarting PostgreSQL (fast shutdown)…", flush=True)
    await loop.run_in_executor(None, cluster.restart)
    done = time.time()
    entry: dict[str, Any] = {"at": t - st.t0, "start": t, "end": done, "seconds": done - t}
    # At once, before anything else touches the shims' pools: a storm on the
    # shims' (now stale) pooled connections.
    await storm(db, shims, st, random.Random(args.seed + 4), "right after the PG restart")
    # The shims must become ready again by themselves.
    ready: dict[str, float | None] = {}
    for base in shims:
        ready[base] = None
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                await loop.run_in_executor(None, get_json, base + "/readyz")
                ready[base] = time.time() - done
                break
            except Exception:  # noqa: BLE001
                await asyncio.sleep(0.2)
    entry["shim_ready_after"] = ready
    st.pg_restarts.append(entry)
    print(f"{elapsed(st)} PostgreSQL back after {done - t:.1f}s; shims ready after "
          f"{', '.join('never' if v is None else f'{v:.1f}s' for v in ready.values())}", flush=True)


async def monitor(procs: Procs, args: argparse.Namespace, st: State) -> None:
    """Notice relays/shims/receiver that die on their own; restart relays."""
    while True:
        await asyncio.sleep(0.5)
        for p in procs.all:
            if p.fate is None and not p.alive and p.ended is None:
                p.ended = time.time()
                p.exit_code = p.popen.returncode
                tail = p.log.read_text(errors="replace")[-2000:] if p.log.exists() else ""
                st.crashes.append({"at": p.ended - st.t0, "proc": p.name, "exit_code": p.exit_code, "tail": tail})
                print(f"{elapsed(st)} !! {p.name} exited on its own (code {p.exit_code})", flush=True)
                if p.kind == "relay" and not st.stop_load:
                    procs.spawn("relay", relay_argv(args))
            if p.fate == "stopped" and not p.alive and p.ended is None:
                p.ended = time.time()
                p.exit_code = p.popen.returncode


async def sampler(db: Db, procs: Procs, st: State) -> None:
    while True:
        await asyncio.sleep(10)
        try:
            row = (await db.q(
                "SELECT (SELECT count(*) FROM barnum.whatsapp_events), "
                "count(*) FILTER (WHERE status = 'pending'), "
                "count(*) FILTER (WHERE status = 'pending' AND next_attempt_at <= now()), "
                "count(*) FILTER (WHERE status = 'processing'), count(*) FILTER (WHERE status = 'sent'), "
                "count(*) FILTER (WHERE status = 'dead_letter') FROM barnum.webhook_deliveries"))[0]
        except psycopg.Error as exc:
            print(f"{elapsed(st)} (sample failed: {type(exc).__name__})", flush=True)
            continue
        s = dict(zip(["events", "pending", "due", "processing", "sent", "dead"], row))
        s["at"] = time.time() - st.t0
        s["relays"] = len(procs.live("relay"))
        st.samples.append(s)
        print(f"{elapsed(st)} events {s['events']}, sent {s['sent']}, pending {s['pending']} (due {s['due']}), "
              f"processing {s['processing']}, dead {s['dead']}, relays {s['relays']}, "
              f"inserts {st.inserts} (+{st.insert_errors} failed), load {loadavg()}", flush=True)


async def drain(db: Db, args: argparse.Namespace, st: State) -> tuple[float, bool]:
    t = time.time()
    last_print = 0.0
    while time.time() - t < args.drain_timeout:
        try:
            pending, processing = (await db.q(
                "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'processing') "
                "FROM barnum.webhook_deliveries"))[0]
        except psycopg.Error:
            await asyncio.sleep(1)
            continue
        if pending == 0 and processing == 0:
            return time.time() - t, True
        if time.time() - last_print > 10:
            print(f"{elapsed(st)} draining: {pending} pending, {processing} processing", flush=True)
            last_print = time.time()
        await asyncio.sleep(0.5)
    return time.time() - t, False


async def run_soak(args: argparse.Namespace, cluster: Any, dsn: str, procs: Procs, base: str,
                   shims: list[str], seeds: dict[str, Any], st: State) -> dict[str, Any]:
    for _ in range(args.relays_min + 1):
        procs.spawn("relay", relay_argv(args))
    db_prod, db_tok, db_samp = Db(dsn), Db(dsn), Db(dsn)
    st.t0 = time.time()
    st.stop_event = asyncio.Event()
    print(f"soak: {args.minutes:g} min, {args.rate:g} inserts/s + {args.changes:g} changes/s, "
          f"relays {args.relays_min}–{args.relays_max}, load {loadavg()}", flush=True)
    background = [asyncio.create_task(monitor(procs, args, st)), asyncio.create_task(sampler(db_samp, procs, st))]
    load = [asyncio.create_task(producer(db_prod, seeds, args, st)),
            asyncio.create_task(token_storms(db_tok, shims, args, st)),
            asyncio.create_task(chaos(procs, args, st)),
            asyncio.create_task(pg_restart(cluster, Db(dsn), shims, args, st))]
    try:
        await asyncio.sleep(args.minutes * 60)
        st.stop_load = True
        st.stop_event.set()
        print(f"{elapsed(st)} load stopped; draining", flush=True)
        # A storm or a restart in progress finishes; the rest stop at once.
        await asyncio.wait(load, timeout=90)
        for task in load:
            task.cancel()
        await asyncio.gather(*load, return_exceptions=True)
        for task in load:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        load_end = time.time()
        drain_s, drained = await drain(db_samp, args, st)
    finally:
        for task in background + load:
            task.cancel()
        await asyncio.gather(*background, *load, return_exceptions=True)
        for db in (db_prod, db_tok):
            await db.close()
    # Stop the relays gracefully: each must exit 0.
    final_relays = procs.live("relay")
    for p in final_relays:
        p.fate = "stopped"
        p.popen.send_signal(signal.SIGTERM)
        st.graceful.append(p)
    for p in st.graceful:
        try:
            p.exit_code = p.popen.wait(40)
        except subprocess.TimeoutExpired:
            p.exit_code = None
        p.ended = p.ended or time.time()
    await db_samp.close()
    return {"load_end": load_end, "drain_s": drain_s, "drained": drained, "end": time.time()}


# ====================================================================== audit


def parse_ts(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def relay_logs(procs: Procs, st: State) -> dict[str, Any]:
    """Per relay: deliveries logged, warnings/errors by message; recovery after the PG restart."""
    out: dict[str, Any] = {"warnings": Counter(), "errors": Counter(), "tracebacks": 0, "not_recovered": []}
    restart = st.pg_restarts[0] if st.pg_restarts else None
    for p in procs.all:
        if p.kind != "relay":
            continue
        deliveries_after = 0
        for line in p.log.read_text(errors="replace").splitlines():
            if "Traceback" in line:
                out["tracebacks"] += 1
            if not line.startswith("{"):
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            level, msg = doc.get("level"), doc.get("msg", "")
            if level == "warning":
                out["warnings"][msg] += 1
            elif level in ("error", "critical"):
                out["errors"][f"{msg}: {str(doc.get('error', ''))[:120]}"] += 1
            if restart and msg == "delivery" and parse_ts(doc["ts"]) > restart["end"]:
                deliveries_after += 1
        if restart and p.started < restart["start"] and (p.ended or time.time()) > restart["end"] + 30 \
                and deliveries_after == 0:
            out["not_recovered"].append(p.name)
    return out


def audit(dsn: str, stats: dict[str, Any], seeds: dict[str, Any], st: State, procs: Procs) -> dict[str, Any]:
    ep_name = {v: k for k, v in seeds["endpoints"].items()}
    short = {"soak-a": "a", "soak-b": "b"}
    rec: dict[str, list[Any]] = stats["keys"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        events = conn.execute(
            "SELECT e.id::text, e.event_type, e.status, extract(epoch FROM greatest(e.created_at, e.scheduled_for)), "
            "       coalesce(p.name, p2.name), e.last_error "
            "  FROM barnum.whatsapp_events e "
            "  LEFT JOIN barnum.appointments a ON e.entity_type = 'appointment' AND a.id = e.entity_id "
            "  LEFT JOIN barnum.patients p ON p.id = a.patient_id "
            "  LEFT JOIN barnum.patients p2 ON e.entity_type = 'patient' AND p2.id = e.entity_id").fetchall()
        deliveries = conn.execute(
            "SELECT id, event_id::text, endpoint_id::text, status, attempts, last_http_status, last_error "
            "  FROM barnum.webhook_deliveries").fetchall()
        expiries = conn.execute(
            "SELECT delivery_id, error FROM barnum.webhook_attempts WHERE error LIKE 'lease expired%'").fetchall()
        lease_expired = {r[0] for r in expiries}
        client_errors = {r[0] for r in conn.execute(
            "SELECT DISTINCT delivery_id FROM barnum.webhook_attempts "
            " WHERE http_status IS NULL AND error IS NOT NULL AND error NOT LIKE 'lease expired%'")}
        attempts_total = conn.execute("SELECT count(*) FROM barnum.webhook_attempts").fetchone()[0]  # type: ignore[index]
        blocked_events = conn.execute(
            "SELECT count(*) FROM barnum.whatsapp_events e JOIN barnum.appointments a "
            "  ON e.entity_type = 'appointment' AND a.id = e.entity_id "
            " WHERE a.patient_id = ANY (%s)", (seeds["blocked"],)).fetchone()[0]  # type: ignore[index]
        queue = conn.execute("SELECT barnum.queue_stats()::text").fetchone()[0]  # type: ignore[index]
    ev = {e[0]: e for e in events}
    # Whose lease expired: a relay we SIGKILLed, one we stopped with SIGTERM
    # (should have released), or one that was alive (lost its lease while working).
    fate_by_pid = {p.popen.pid: (p.fate or "alive") for p in procs.all if p.kind == "relay"}
    expiry_by_fate: Counter[str] = Counter()
    for _, err in expiries:
        m = re.search(r":(\d+):[0-9a-f]+\)", err or "")
        expiry_by_fate[fate_by_pid.get(int(m.group(1)), "unknown") if m else "unparsed"] += 1
    by_status = Counter(d[3] for d in deliveries)
    events_by_type = Counter(e[1] for e in events)

    # Fan-out: each pending-at-creation event has one delivery per matching endpoint.
    have: dict[str, set[str]] = defaultdict(set)
    for d in deliveries:
        have[d[1]].add(ep_name[d[2]])
    fanout_wrong = []
    for e in events:
        want = {"soak-a"} | ({"soak-b"} if any(fnmatch.fnmatchcase(e[1], pat) for pat in ENDPOINT_B_TYPES) else set())
        if e[0] not in have and e[2] == "skipped":
            continue  # skipped at creation (no endpoint) — not expected here, counted below
        if have[e[0]] != want:
            fanout_wrong.append((e[0], e[1], sorted(have[e[0]]), sorted(want)))

    lost_sent, pending_left, processing_left, dead_deliberate, dead_other = [], [], [], [], []
    reject_not_dead, ok_not_sent = [], []
    dup_explained = Counter[str]()
    dup_unexplained = []
    duplicates = 0
    seen_keys = set()
    latencies: list[tuple[float, str, int]] = []
    for d_id, event_id, endpoint_id, status, attempts, http, err in deliveries:
        key = f"{short[ep_name[endpoint_id]]}|{event_id}"
        seen_keys.add(key)
        r = rec.get(key)
        ok = r[1] if r else 0
        patient = ev[event_id][4] or ""
        if r:
            latencies.append((r[6] - float(ev[event_id][3]), key, d_id))
        if status == "sent" and ok == 0:
            lost_sent.append((d_id, key, attempts, http, err))
        if status == "pending":
            pending_left.append((d_id, key, attempts, err))
        if status == "processing":
            processing_left.append((d_id, key, attempts))
        if status == "dead_letter":
            if patient.startswith("Reject") and http == 400:
                dead_deliberate.append(d_id)
            else:
                dead_other.append((d_id, key, ev[event_id][1], patient, attempts, http, err))
        if patient.startswith("Reject") and status not in ("dead_letter", "skipped"):
            reject_not_dead.append((d_id, key, status))
        if ok and status != "sent":
            ok_not_sent.append((d_id, key, status, err, d_id in lease_expired))
        if ok > 1:
            duplicates += ok - 1
            if d_id in lease_expired:
                dup_explained["lease expired (relay killed / record lost)"] += ok - 1
            elif d_id in client_errors:
                dup_explained["relay-side timeout/connection error on a 200"] += ok - 1
            else:
                dup_unexplained.append((d_id, key, ok, attempts))
    unknown_at_receiver = [k for k in rec if k not in seen_keys]
    delivered = sum(1 for k, r in rec.items() if r[1] > 0 and k in seen_keys)
    lat = sorted(x[0] for x in latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] if lat else float("nan")

    slow = [x for x in latencies if x[0] > 10]
    slow_unexplained = [x for x in slow if x[2] not in lease_expired]
    tokens_multi = [t for t in st.tokens if t["ok"] > 1]
    return {
        "events": len(events), "events_by_type": dict(events_by_type),
        "events_by_status": dict(Counter(e[2] for e in events)),
        "deliveries": len(deliveries), "deliveries_by_status": dict(by_status),
        "attempts": attempts_total, "receiver": stats["counters"],
        "delivered": delivered, "duplicates": duplicates, "dup_explained": dict(dup_explained),
        "dup_unexplained": dup_unexplained, "lost_sent": lost_sent, "pending_left": pending_left,
        "processing_left": processing_left, "dead_deliberate": len(dead_deliberate), "dead_other": dead_other,
        "reject_not_dead": reject_not_dead, "ok_not_sent": ok_not_sent, "fanout_wrong": fanout_wrong,
        "unknown_at_receiver": unknown_at_receiver, "blocked_events": blocked_events,
        "bad_signatures": stats["counters"].get("bad_signature", 0),
        "lease_expired_deliveries": len(lease_expired), "expiry_by_fate": dict(expiry_by_fate),
        "latency": {"p50": pct(50), "p99": pct(99), "max": lat[-1] if lat else float("nan"),
                    "over_10s": len(slow), "over_10s_without_lease_expiry": len(slow_unexplained),
                    "worst_unexplained": sorted(slow_unexplained, reverse=True)[:5]},
        "tokens": len(st.tokens), "tokens_multi": tokens_multi,
        "tokens_one": sum(1 for t in st.tokens if t["ok"] == 1),
        "tokens_zero": [t for t in st.tokens if t["ok"] == 0],
        "token_statuses": dict(sum((Counter(t["statuses"]) for t in st.tokens), Counter())),
        "queue_stats": queue,
    }


# ====================================================================== report


def table(a: dict[str, Any], st: State, run: dict[str, Any], logs: dict[str, Any], procs: Procs,
          args: argparse.Namespace, wall: float) -> tuple[list[tuple[str, str]], list[str]]:
    graceful_bad = [(p.name, p.exit_code) for p in st.graceful if p.exit_code != 0]
    receiver = a["receiver"]
    requests = max(1, receiver.get("requests", 0))
    rows = [
        ("events created", f"{a['events']:,} ({', '.join(f'{k} {v}' for k, v in sorted(a['events_by_type'].items()))})"),
        ("deliveries created", f"{a['deliveries']:,} ({', '.join(f'{k} {v}' for k, v in sorted(a['deliveries_by_status'].items()))})"),
        ("webhook_attempts rows (recorded attempts + lease-expiry rows) / requests at the receiver",
         f"{a['attempts']:,} / {receiver.get('requests', 0):,}: 200 {receiver.get('200', 0):,}, "
         f"5xx {receiver.get('5xx', 0):,} ({100 * receiver.get('5xx', 0) / requests:.0f} %), "
         f"timeouts {receiver.get('timeouts', 0):,} ({100 * receiver.get('timeouts', 0) / requests:.0f} %), "
         f"400 (Reject) {receiver.get('400', 0):,}"),
        ("delivered (distinct event+endpoint with a 200 at the receiver)", f"{a['delivered']:,}"),
        ("duplicates (200s beyond the first per event+endpoint)",
         f"{a['duplicates']} ({'; '.join(f'{k}: {v}' for k, v in a['dup_explained'].items()) or 'none'}; "
         f"unexplained: {len(a['dup_unexplained'])}); bound: in-flight at kills ≤ "
         f"{(len(st.kills) + len(st.pg_restarts) * args.relays_max) * BATCH * BATCHES_IN_FLIGHT}"),
        ("dead letters", f"{a['dead_deliberate'] + len(a['dead_other'])} (deliberate 400s: {a['dead_deliberate']}; "
                         f"**other: {len(a['dead_other'])}**)"),
        ("tokens with more than one 200 (100 concurrent POSTs each)",
         f"**{len(a['tokens_multi'])}** of {a['tokens']} tokens (exactly one 200: {a['tokens_one']}, none: "
         f"{len(a['tokens_zero'])}; responses: {', '.join(f'{k} {v}' for k, v in sorted(a['token_statuses'].items()))})"),
        ("stuck 'processing' rows after drain", f"**{len(a['processing_left'])}**"),
        ("lost (sent in DB but never received / pending after drain)",
         f"**{len(a['lost_sent'])} / {len(a['pending_left'])}**"),
        ("other checks: fan-out mismatches, bad signatures, unknown event ids at receiver, "
         "events of opted-out/no-phone patients, Reject deliveries not dead, 200 received but not 'sent'",
         f"{len(a['fanout_wrong'])}, {a['bad_signatures']}, {len(a['unknown_at_receiver'])}, {a['blocked_events']}, "
         f"{len(a['reject_not_dead'])}, {len(a['ok_not_sent'])} ("
         f"{sum(1 for x in a['ok_not_sent'] if x[4])} after a lease expiry)"),
        ("first-request latency (receipt − due time) p50 / p99 / max",
         f"{a['latency']['p50'] * 1000:.0f} ms / {a['latency']['p99'] * 1000:.0f} ms / {a['latency']['max']:.1f} s "
         f"({a['latency']['over_10s']} over 10 s, {a['latency']['over_10s_without_lease_expiry']} of them "
         f"without a lease expiry)"),
        ("lease expiries (reclaimed claims) by the holder's fate",
         ", ".join(f"{k}: {v}" for k, v in sorted(a["expiry_by_fate"].items())) or "none"),
        ("relay kills (SIGKILL) / graceful stops (SIGTERM, exit ≠ 0) / crashes on their own",
         f"{len(st.kills)} / {len(st.graceful)} ({len(graceful_bad)}) / {len(st.crashes)}"),
        ("relays started in total; relays that did not deliver after the PG restart",
         f"{procs.counter['relay']}; {len(logs['not_recovered'])}"),
        ("PG restarts", f"{len(st.pg_restarts)}" + (
            f" (at {st.pg_restarts[0]['at']:.0f} s, down {st.pg_restarts[0]['seconds']:.1f} s; shims ready after "
            + ", ".join("never" if v is None else f"{v:.1f} s" for v in st.pg_restarts[0]["shim_ready_after"].values())
            + ")" if st.pg_restarts else "")),
        ("producer", f"{st.inserts:,} inserts ({st.insert_errors} failed), status changes "
                     f"{sum(st.changes.values())} ({', '.join(f'{k} {v}' for k, v in st.changes.items())}; "
                     f"{st.change_illegal} refused as illegal, {st.change_errors} failed)"),
        ("drain", f"{run['drain_s']:.1f} s ({'complete' if run['drained'] else 'TIMED OUT'})"),
        ("wall time", f"{wall / 60:.1f} min (load {args.minutes:g} min)"),
    ]
    problems = []
    if a["lost_sent"]:
        problems.append(f"lost: {len(a['lost_sent'])} deliveries 'sent' in DB never got a 200 at the receiver, "
                        f"e.g. {a['lost_sent'][:5]}")
    if a["pending_left"]:
        problems.append(f"{len(a['pending_left'])} deliveries still pending after the drain, e.g. {a['pending_left'][:5]}")
    if a["processing_left"]:
        problems.append(f"{len(a['processing_left'])} deliveries stuck 'processing', e.g. {a['processing_left'][:5]}")
    if a["dead_other"]:
        problems.append(f"{len(a['dead_other'])} dead letters that are not deliberate 400s, e.g. {a['dead_other'][:5]}")
    if a["tokens_multi"]:
        problems.append(f"tokens with more than one 200: {a['tokens_multi']}")
    if a["reject_not_dead"]:
        problems.append(f"Reject deliveries not dead: {a['reject_not_dead'][:5]}")
    if a["fanout_wrong"]:
        problems.append(f"fan-out mismatches: {a['fanout_wrong'][:5]}")
    if a["bad_signatures"]:
        problems.append(f"{a['bad_signatures']} requests with a bad signature")
    if a["unknown_at_receiver"]:
        problems.append(f"event ids unknown to the DB at the receiver: {a['unknown_at_receiver'][:5]}")
    if a["blocked_events"]:
        problems.append(f"{a['blocked_events']} events for opted-out / no-phone patients")
    if a["dup_unexplained"]:
        problems.append(f"duplicates with no lease expiry or client-side error: {a['dup_unexplained'][:5]}")
    unexplained_expiry = {k: v for k, v in a["expiry_by_fate"].items() if k != "killed"}
    if unexplained_expiry:
        problems.append(f"leases that expired on relays we did not SIGKILL: {unexplained_expiry}")
    odd = [x for x in a["ok_not_sent"] if not x[4]]
    if odd:
        problems.append(f"deliveries answered 200 but not 'sent' in DB, with no lease expiry: {odd[:5]}")
    if graceful_bad:
        problems.append(f"relays that did not exit 0 on SIGTERM: {graceful_bad}")
    if st.crashes:
        problems.append("processes that exited on their own: " + "; ".join(
            f"{c['proc']} (code {c['exit_code']}) at {c['at']:.0f}s" for c in st.crashes))
    if logs["not_recovered"]:
        problems.append(f"relays alive across the PG restart that delivered nothing afterwards: {logs['not_recovered']}")
    if st.pg_restarts and any(v is None for v in st.pg_restarts[0]["shim_ready_after"].values()):
        problems.append("a shim did not become ready within 60 s of the PG restart")
    if not run["drained"]:
        problems.append("the drain timed out")
    return rows, problems


def record(command: str, rows: list[tuple[str, str]], problems: list[str], extra: list[str],
           args: argparse.Namespace, version: str) -> None:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## Soak — {when} — `{command}`\n",
        f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}, "
        f"PostgreSQL {version} (private cluster, fsync on). {args.rate:g} appointment inserts/s + "
        f"{args.changes:g} status changes/s; 100-way concurrent POSTs on one fresh confirm token every 5–15 s "
        f"(two shims); {args.relays_min}–{args.relays_max} relays (`--sweep-interval 2 --lease {args.lease:g} "
        f"--batch {BATCH}`), one SIGKILLed every {args.kill_min:g}–{args.kill_max:g} s; one PostgreSQL fast "
        f"restart at ~45 %; receiver: {args.p_5xx * 100:.0f} % 5xx, {args.p_timeout * 100:.0f} % timeouts "
        f"(endpoint timeout_ms {args.timeout_ms}), at most {args.fail_cap} failures per event+endpoint, 400 for "
        f"patients named \"Reject …\"; settings max_attempts 8, backoff 1–5 s, no_show/review delay 5 s.\n",
        "| measure | result |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        *extra,
        ("**Verdict: all must-be-zero figures are zero.**" if not problems else
         "**Findings:**\n" + "\n".join(f"- {p}" for p in problems)),
    ]
    path = ROOT / "bench" / "RESULTS.md"
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {path}")


# ====================================================================== main


def wait_for_other_benches(max_wait: float = 20 * 60) -> str:
    t = time.monotonic()
    while True:
        out = subprocess.run(["pgrep", "-f", OTHER_BENCHES], capture_output=True, text=True).stdout.split()
        if not out:
            waited = time.monotonic() - t
            return f"waited {waited / 60:.1f} min for other benchmarks to finish" if waited > 1 else \
                "no other benchmark was running"
        if time.monotonic() - t > max_wait:
            return f"other benchmarks still running after {max_wait / 60:.0f} min of waiting (pids {out}); ran anyway"
        print(f"waiting for other benchmarks (pids {' '.join(out)}); load {loadavg()}", flush=True)
        time.sleep(15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve-receiver", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load phase (default 10)")
    parser.add_argument("--rate", type=float, default=25.0, help="appointment inserts per second (default 25)")
    parser.add_argument("--changes", type=float, default=5.0, help="status changes per second (default 5)")
    parser.add_argument("--relays-min", type=int, default=2)
    parser.add_argument("--relays-max", type=int, default=4)
    parser.add_argument("--kill-min", type=float, default=20.0, help="seconds between relay kills, low end")
    parser.add_argument("--kill-max", type=float, default=40.0, help="seconds between relay kills, high end")
    parser.add_argument("--lease", type=float, default=60.0, help="relay --lease (default 60, the relay's default)")
    parser.add_argument("--timeout-ms", type=int, default=1000, help="endpoints' timeout_ms (default 1000)")
    parser.add_argument("--p-5xx", type=float, default=0.30)
    parser.add_argument("--p-timeout", type=float, default=0.05)
    parser.add_argument("--fail-cap", type=int, default=4, help="most failures the receiver gives one event+endpoint")
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-wait", action="store_true", help="do not wait for other benchmarks")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    if args.serve_receiver is not None:
        serve_receiver(args.serve_receiver, args)
        return 0
    command = " ".join([".venv/bin/python bench/soak.py", *sys.argv[1:]])
    wait_note = "not waited (--no-wait)" if args.no_wait else wait_for_other_benches()
    load_before = Path("/proc/loadavg").read_text().strip()
    print(f"{wait_note}; load average before: {load_before}; seed {args.seed}", flush=True)

    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"barnum-soak-{uuid.uuid4().hex[:6]}"
    workdir.mkdir(parents=True)
    t_wall = time.time()
    cluster = None
    procs: Procs | None = None
    st = State()
    try:
        cluster, dsn, version = provision(workdir)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("N8N_", "LISTEN_DATABASE", "BARNUM_"))}
        env.update({"DATABASE_URL": dsn, "WEBHOOK_SECRET": WEBHOOK_SECRET, "BARNUM_LOG_LEVEL": "INFO",
                    "PYTHONUNBUFFERED": "1"})
        procs = Procs(workdir, env)
        rport = free_port()
        procs.spawn("receiver", [PYTHON, str(Path(__file__).resolve()), "--serve-receiver", str(rport),
                                 "--p-5xx", str(args.p_5xx), "--p-timeout", str(args.p_timeout),
                                 "--timeout-ms", str(args.timeout_ms), "--fail-cap", str(args.fail_cap),
                                 "--seed", str(args.seed)])
        base = f"http://127.0.0.1:{rport}"
        shims = []
        for _ in range(2):
            port = free_port()
            procs.spawn("shim", [BARNUM, "shim", "--port", str(port)])
            shims.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        for url in [base + "/stats", *(s + "/readyz" for s in shims)]:
            while True:
                try:
                    get_json(url)
                    break
                except Exception:  # noqa: BLE001
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{url} did not come up; logs in {workdir}") from None
                    time.sleep(0.1)
        seeds = seed(dsn, base, args)
        run = asyncio.run(run_soak(args, cluster, dsn, procs, base, shims, seeds, st))
        stats = get_json(base + "/stats")
        a = audit(dsn, stats, seeds, st, procs)
        logs = relay_logs(procs, st)
    finally:
        if procs is not None:
            procs.stop_all()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.stop()
    wall = time.time() - t_wall
    rows, problems = table(a, st, run, logs, procs, args, wall)
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v.replace('**', '')}")
    extra = [f"Load average before: {load_before} ({wait_note}); seed {args.seed}; logs in {workdir}.",
             "Relay log warnings: " + (", ".join(f"{m} ×{n}" for m, n in logs["warnings"].most_common(8)) or "none")
             + "; errors: " + (", ".join(f"{m} ×{n}" for m, n in logs["errors"].most_common(8)) or "none")
             + f"; tracebacks: {logs['tracebacks']}.", ""]
    print()
    print("\n".join(extra))
    if problems:
        print("FINDINGS:")
        for p in problems:
            print(" -", p)
    else:
        print("Verdict: all must-be-zero figures are zero.")
    with open(workdir / "audit.json", "w") as f:
        json.dump({"audit": a, "kills": st.kills, "pg_restarts": st.pg_restarts, "tokens": st.tokens,
                   "crashes": st.crashes, "samples": st.samples, "notes": st.notes,
                   "graceful": [(p.name, p.exit_code) for p in st.graceful]}, f, default=str, indent=1)
    if not args.no_record:
        record(command, rows, problems, extra, args, version)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

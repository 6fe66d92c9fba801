"""Shared helpers of the benches (triggers, scale, compare, relay, soak).

A private PostgreSQL 15 (fsync on) with a migrated template database, a
loopback receiver process (uvicorn + uvloop + httptools) that verifies the
hex HMAC-SHA256 ``X-Webhook-Signature`` of every POST and remembers
(event id, receipt time), a relay launcher, CPU/load helpers, a "wait until
no other benchmark is loading the box" guard, and the RESULTS.md appender.

bench/relay.py and bench/soak.py use its receiver plumbing too (the relay
bench's receiver does not verify signatures, so its numbers stay comparable
with its earlier runs).
"""

from __future__ import annotations

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

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

SECRET = "bench-secret"
PGBIN = Path("/usr/lib/postgresql/15/bin")
RESULTS = ROOT / "bench" / "RESULTS.md"

# Fixed ids so pgbench scripts can name rows without lookups.
PROF_ID = "00000000-0000-0000-0000-00000000a001"
SPEC_ID = "00000000-0000-0000-0000-00000000b001"


def patient_uuid(n: int) -> str:
    return f"00000000-0000-0000-0000-{n:012d}"


# ------------------------------------------------------------------ the box


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def load1() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return float("nan")


def _candidates(patterns: tuple[str, ...]) -> dict[int, str]:
    me = os.getpid()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # Only python processes running those scripts (not a shell, grep or
        # `timeout` whose command line merely mentions them).
        if "python" not in cmd.split(" ", 1)[0]:
            continue
        if any(p in cmd for p in patterns):
            found[int(entry.name)] = cmd[:100]
    return found


def _others_running(patterns: tuple[str, ...], sample: float = 1.5) -> list[str]:
    """Other benchmarks that are actually loading the box.

    A benchmark that is itself only waiting for us (bench/soak.py waits for
    bench/(triggers|scale|compare|relay).py) has no child processes and burns
    no CPU: it does not count, or the two would wait for each other forever.
    """
    cands = _candidates(patterns)
    if not cands:
        return []
    before = {pid: proc_cpu(pid) for pid in cands}
    time.sleep(sample)
    active = []
    for pid, cmd in cands.items():
        busy = proc_cpu(pid) - before[pid] > 0.05
        if busy or children_of(pid):
            active.append(f"{pid}: {cmd}")
    return active


def wait_quiet(max_wait: float = 1800.0, patterns: tuple[str, ...] = ("bench/relay.py", "bench/soak.py",
                                                                        "bench/shim.py")) -> str:
    """Block while another benchmark (relay bench, soak) loads the box; return the load average.

    ``BENCH_NO_WAIT=1`` skips the wait (functional smoke tests only: such
    numbers must not be recorded)."""
    if os.environ.get("BENCH_NO_WAIT") == "1":
        return loadavg() + " (no wait)"
    t0 = time.monotonic()
    announced = False
    while True:
        others = _others_running(patterns)
        if not others:
            if announced:
                time.sleep(5)  # let the load settle a little
            return loadavg()
        if not announced:
            print(f"waiting for other benchmarks to finish: {others}", flush=True)
            announced = True
        if time.monotonic() - t0 > max_wait:
            print(f"warning: still running after {max_wait:.0f} s, measuring anyway: {others}", flush=True)
            return loadavg() + " (other bench running!)"
        time.sleep(5)


class Guard:
    """Watches for another benchmark starting while a timed run is under way.

    ``with Guard() as g: ...`` waits for a quiet box first (``g.load`` is the
    load average then); ``g.contaminated`` tells whether another benchmark
    ran at any moment of the block (polled every second), so the caller can
    throw the run away and repeat it.
    """

    def __init__(self) -> None:
        import threading

        self.load = ""
        self.contaminated = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        if os.environ.get("BENCH_NO_WAIT") == "1":
            return
        while not self._stop.wait(1.0):
            if _others_running(("bench/relay.py", "bench/soak.py", "bench/shim.py")):
                self.contaminated = True

    def __enter__(self) -> Guard:
        self.load = wait_quiet()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def guarded(fn: Any, *args: Any, tries: int = 4, **kwargs: Any) -> Any:
    """Run ``fn`` (which must accept ``guard=``) until no other benchmark overlapped it."""
    for attempt in range(tries):
        with Guard() as g:
            result = fn(*args, guard=g, **kwargs)
        if not g.contaminated:
            return result
        print(f"another benchmark overlapped this run; repeating it (attempt {attempt + 2})", flush=True)
    if isinstance(result, dict):
        result["contaminated"] = True
    return result


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu(pid: int, *, with_children: bool = False) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + ((cutime + cstime) if with_children else 0)) / _TICK


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def tree_cpu(pid: int) -> float:
    return proc_cpu(pid, with_children=True) + sum(proc_cpu(c, with_children=True) for c in children_of(pid))


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "?"
    except OSError:
        return "?"


def box_line(db: Database) -> str:
    return (f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}, "
            f"PostgreSQL {db.version} ({db.kind}), commit {git_commit()}")


def append_results(text: str) -> None:
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n")
    with open(RESULTS, "a") as f:
        f.write(text.rstrip("\n") + "\n")
    print(f"appended to {RESULTS}")


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ------------------------------------------------------------------ database

DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on", "max_connections": "200"}


class Database:
    """A private cluster from local binaries (fsync on) with a migrated template."""

    def __init__(self, extra_settings: dict[str, str] | None = None, extra_sql: list[str] | None = None,
                 template: str | None = None) -> None:
        from tests.pgcluster import LocalCluster

        self.server = LocalCluster(extra_settings={**DURABLE, **(extra_settings or {})})
        self.kind = "private cluster, fsync on"
        self.server.start()
        self.postmaster: int | None = self.server._postmaster_pid()
        self.template = template or f"bench_tpl_{uuid.uuid4().hex[:6]}"
        self.extra_sql = extra_sql or []
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            self.version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(self.template)))
        from listener.migrate import migrate

        migrate(self.server.dsn(self.template), ROOT)
        for extra in self.extra_sql:
            with psycopg.connect(self.server.dsn(self.template), autocommit=True) as conn:
                conn.execute(Path(extra).read_text().encode())

    @property
    def admin_dsn(self) -> str:
        return str(self.server.admin_dsn)

    def dsn(self, name: str) -> str:
        return str(self.server.dsn(name))

    def fresh(self, prefix: str = "bench", template: str | None = None) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template or self.template)))
        return name

    def make_template(self, name: str, sql_text: str) -> str:
        """A second template: the migrated one plus ``sql_text`` (a trial SQL change)."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(self.template)))
        with psycopg.connect(self.dsn(name), autocommit=True) as conn:
            conn.execute(sql_text.encode())
        return name

    def drop(self, name: str) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def pg_cpu(self) -> float:
        return tree_cpu(self.postmaster) if self.postmaster else float("nan")

    def close(self) -> None:
        self.server.stop()


def seed_clinic(conn: psycopg.Connection[Any], base_url: str | None, patients: int = 100) -> None:
    """One webhook endpoint (if base_url), ``patients`` reachable patients with
    fixed ids, one professional and one specialty with fixed ids."""
    if base_url is not None:
        conn.execute("INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('bench', %s)", (base_url + "/hook",))
    conn.execute(
        """INSERT INTO barnum.patients (id, name, phone)
           SELECT ('00000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid,
                  'Patient ' || g, '+3519' || lpad(g::text, 8, '0')
             FROM generate_series(1, %s) g""", (patients,))
    conn.execute("INSERT INTO barnum.professionals (id, name) VALUES (%s, 'Dr. Maria Santos')", (PROF_ID,))
    conn.execute("INSERT INTO barnum.specialties (id, name) VALUES (%s, 'Medicina Dentária')", (SPEC_ID,))


# ------------------------------------------------------------------ receiver


async def asgi_lifespan(receive: Any, send: Any) -> None:
    """Answer uvicorn's lifespan messages (the receivers keep no state to set up)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def receiver_app(secret: str | None) -> Any:
    """200 to every POST whose hex HMAC-SHA256 ``X-Webhook-Signature`` is
    right (401 otherwise; ``secret`` None: no check); remembers (X-Event-Id,
    receipt time)."""
    key = secret.encode() if secret is not None else None
    received: list[tuple[str, float]] = []
    bad = [0]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await asgi_lifespan(receive, send)
            return
        if scope["method"] == "GET":
            if scope["path"] == "/reset":
                received.clear()
                bad[0] = 0
                body = b"{}"
            elif scope["path"] == "/count":
                body = json.dumps({"count": len(received), "bad": bad[0]}).encode()
            else:
                body = json.dumps({"count": len(received), "bad": bad[0], "hits": received}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        now = time.time()
        raw = b"".join(chunks)
        event_id = ""
        signature = b""
        for name, value in scope["headers"]:
            if name == b"x-event-id":
                event_id = value.decode()
            elif name == b"x-webhook-signature":
                signature = value
        if key is not None and not hmac.compare_digest(hmac.new(key, raw, hashlib.sha256).hexdigest().encode(),
                                                       signature):
            bad[0] += 1
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b"bad signature"})
            return
        received.append((event_id, now))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"ok":true}'})

    return app


def serve_receiver(port: int, secret: str | None = SECRET) -> None:
    import uvicorn

    uvicorn.run(receiver_app(secret), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False, lifespan="on")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


class Receiver:
    def __init__(self, base: str, pid: int) -> None:
        self.base = base
        self.pid = pid
        self.url = base + "/hook"

    def reset(self) -> None:
        get_json(self.base + "/reset")

    def count(self) -> int:
        return int(get_json(self.base + "/count")["count"])

    def stats(self) -> dict[str, Any]:
        return dict(get_json(self.base + "/stats"))

    def cpu(self) -> float:
        return proc_cpu(self.pid)


@contextmanager
def receiver_process(verify: bool = True) -> Iterator[Receiver]:
    """The receiver in its own process; ``verify`` False skips the signature check."""
    port = free_port()
    secret = "_common.SECRET" if verify else "None"
    proc = subprocess.Popen([sys.executable, "-c",
                             f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
                             f"import _common; _common.serve_receiver({port}, {secret})"])
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                get_json(base + "/count")
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("receiver did not start")
                time.sleep(0.05)
        yield Receiver(base, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_count(rx: Receiver, n: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    c = rx.count()
    while c < n and time.monotonic() < deadline:
        time.sleep(0.05)
        c = rx.count()
    return c


# ------------------------------------------------------------------ relay


def start_relay(dsn: str, log_path: Path, *, batch: int = 200, concurrency: int = 32, processes: int = 1,
                batches_in_flight: int = 2, sweep_interval: float = 5.0, log_level: str = "INFO",
                worker_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("N8N_", "LISTEN_DATABASE"))}
    env.update({"DATABASE_URL": dsn, "WEBHOOK_SECRET": SECRET, "BARNUM_LOG_LEVEL": log_level})
    env.update(worker_env or {})
    argv = [sys.executable, "-m", "listener.relay", "--concurrency", str(concurrency), "--batch", str(batch),
            "--batches-in-flight", str(batches_in_flight), "--processes", str(processes),
            "--sweep-interval", str(sweep_interval)]
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stderr=log, stdout=subprocess.DEVNULL)


def wait_relay_started(log_path: Path, proc: subprocess.Popen[bytes], processes: int = 1,
                       timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text() if log_path.exists() else ""
        if text.count('"relay started"') >= processes:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"relay did not start:\n{text[-3000:]}")
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def workdir(name: str) -> Path:
    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"barnum-{name}-{uuid.uuid4().hex[:6]}"
    d.mkdir(parents=True)
    return d

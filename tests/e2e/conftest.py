"""The whole stack on loopback, for the real-n8n end-to-end suite (issue 6).

Run through ``scripts/e2e-n8n`` (which installs n8n 2.8.4 outside the repo
first). One :class:`Stack` per session:

  PostgreSQL (tests/conftest.py's pg_cluster) + a fresh migrated database
  fake WhatsApp Graph API ........ records what n8n sends
  shim ........................... ``barnum shim`` (or its module fallback)
  callback recorder .............. proxy n8n → shim that records the exchanges
  n8n 2.8.4 ...................... both shipped workflows imported + published
  relay .......................... ``barnum relay`` with N8N_WEBHOOK_URL → n8n

Every process runs in its own process group and is stopped (SIGTERM, then
SIGKILL) in ``finally``; everything listens on 127.0.0.1 only. Waits are
polls with deadlines (tests/helpers.py), never bare sleeps.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from listener.migrate import migrate
from tests.pgcluster import PgServer, free_port
from tests.conftest import create_database, drop_database
from tests.e2e.fakes import CallbackRecorder, FakeGraphAPI, Inbound
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
N8N_VERSION = "2.8.4"
WORKFLOWS = {  # file → (workflow id in the file, webhook path)
    "event-sender.json": ("BarnumEventSendr", "barnum-events"),
    "reply-handler.json": ("BarnumReplyHndlr", "whatsapp-inbound"),
}


def n8n_dir() -> Path:
    base = os.environ.get("BARNUM_N8N_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "barnum" / f"n8n-{N8N_VERSION}")
    return Path(base)


def log(message: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------ processes


class Proc:
    """A child in its own process group, output to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path, cwd: Path = REPO) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 20.0) -> int | None:
        pgid = self.popen.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            log(f"{self.name} did not stop within {grace}s: SIGKILL")
        # Children (n8n's task runner, uvicorn workers…) go with the group.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        code = self.popen.wait(10)
        self._log.close()
        return code


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 15.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback only
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def probe(method: str, url: str, **kw: Any) -> tuple[int, bytes] | None:
    try:
        return http(method, url, **kw)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


# ------------------------------------------------------------------ the stack


@dataclass
class Stack:
    db_url: str
    graph: FakeGraphAPI
    recorder: CallbackRecorder
    inbound: Inbound
    shim_url: str
    n8n_url: str
    secret: str  # WEBHOOK_SECRET of Barnum == BARNUM_WEBHOOK_SECRET of n8n
    signing_key: bytes
    app_secret: str
    verify_token: str
    procs: dict[str, Proc]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def events_url(self) -> str:
        return f"{self.n8n_url}/webhook/{WORKFLOWS['event-sender.json'][1]}"

    @property
    def inbound_url(self) -> str:
        return f"{self.n8n_url}/webhook/{WORKFLOWS['reply-handler.json'][1]}"

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            cur = conn.execute(query, args)
            return cur.fetchall() if cur.description else []

    def check_alive(self) -> None:
        for proc in self.procs.values():
            assert proc.alive(), f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}"


def _n8n_env(home: Path, port: int, broker_port: int, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("N8N_", "DB_"))}
    env.update({
        "N8N_USER_FOLDER": str(home),
        "N8N_PORT": str(port),
        "N8N_LISTEN_ADDRESS": "127.0.0.1",
        "N8N_HOST": "127.0.0.1",
        "WEBHOOK_URL": f"http://127.0.0.1:{port}/",
        "DB_TYPE": "sqlite",
        "N8N_DIAGNOSTICS_ENABLED": "false",
        "N8N_PERSONALIZATION_ENABLED": "false",
        "N8N_VERSION_NOTIFICATIONS_ENABLED": "false",
        "N8N_TEMPLATES_ENABLED": "false",
        "N8N_SECURE_COOKIE": "false",
        "N8N_RUNNERS_BROKER_PORT": str(broker_port),
        "N8N_RUNNERS_BROKER_LISTEN_ADDRESS": "127.0.0.1",
        "N8N_BLOCK_ENV_ACCESS_IN_NODE": "false",
        "NODE_FUNCTION_ALLOW_BUILTIN": "crypto",
        "N8N_LOG_LEVEL": "info",
        **extra,
    })
    return env


def _n8n_cli(n8n: Path, env: dict[str, str], logdir: Path, name: str, *args: str) -> None:
    with open(logdir / f"{name}.log", "wb") as out:
        proc = subprocess.run(["node", str(n8n), *args], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True, timeout=180)
    if proc.returncode != 0:
        raise AssertionError(f"n8n {' '.join(args)} failed ({proc.returncode}):\n"
                             + (logdir / f"{name}.log").read_text(errors="replace")[-3000:])


@pytest.fixture(scope="session", autouse=True)
def _sigterm_cleans_up() -> Iterator[None]:
    """SIGTERM (CI timeout, kill) unwinds like Ctrl-C, so the stack's finally runs."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def stack(pg_cluster: PgServer) -> Iterator[Stack]:
    n8n = n8n_dir() / "node_modules" / "n8n" / "bin" / "n8n"
    if not n8n.exists():
        pytest.fail(f"n8n {N8N_VERSION} is not installed at {n8n_dir()}: run scripts/e2e-n8n "
                    "(it installs it first)", pytrace=False)
    if not shutil.which("node"):
        pytest.fail("node is required to run n8n", pytrace=False)

    workdir = Path(tempfile.mkdtemp(prefix="barnum-e2e-"))
    logdir = workdir / "logs"
    logdir.mkdir()
    log(f"work directory {workdir}")
    procs: dict[str, Proc] = {}
    servers: list[Any] = []
    dbname = f"e2e_{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    ok = False
    try:
        # PostgreSQL + schema
        db_url = create_database(pg_cluster, dbname, "template0")
        migrate(db_url, REPO)
        log(f"database {dbname} migrated ({time.monotonic() - started:.1f}s)")

        raw_key = os.urandom(32)
        secret = "whsec_" + base64.b64encode(raw_key).decode() + ",previous-secret"
        app_secret = "meta-app-secret-" + uuid.uuid4().hex
        verify_token = "verify-" + uuid.uuid4().hex

        graph = FakeGraphAPI(phone_number_id="109876543210", token="graph-token-" + uuid.uuid4().hex).start()
        servers.append(graph)

        # shim
        shim_port = free_port()
        base_env = {k: v for k, v in os.environ.items()
                    if k not in ("N8N_WEBHOOK_URL", "N8N_WEBHOOK_BASE_URL", "BARNUM_PUBLIC_URL")}
        shim_env = dict(base_env, DATABASE_URL=db_url, WEBHOOK_SECRET=secret, BARNUM_HOST="127.0.0.1",
                        BARNUM_PORT=str(shim_port), BARNUM_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
        procs["shim"] = Proc("shim", [sys.executable, "-m", "tests.e2e.launch", "shim"], shim_env, logdir)
        shim_url = f"http://127.0.0.1:{shim_port}"

        recorder = CallbackRecorder(shim_url).start()
        servers.append(recorder)

        # n8n: import + publish while stopped, then start
        n8n_port, broker_port = free_port(), free_port()
        n8n_env = _n8n_env(workdir / "n8n", n8n_port, broker_port, {
            "BARNUM_WEBHOOK_SECRET": secret,
            "BARNUM_BASE_URL": recorder.base_url,
            "WHATSAPP_GRAPH_BASE_URL": graph.graph_base_url,
            "WHATSAPP_PHONE_NUMBER_ID": graph.phone_number_id,
            "WHATSAPP_TOKEN": graph.token,
            "WHATSAPP_APP_SECRET": app_secret,
            "WHATSAPP_VERIFY_TOKEN": verify_token,
        })
        t = time.monotonic()
        to_import = workdir / "workflows"
        to_import.mkdir()
        for filename in WORKFLOWS:
            shutil.copy(REPO / "integrations" / "n8n" / filename, to_import / filename)
        _n8n_cli(n8n, n8n_env, logdir, "import", "import:workflow", "--separate", f"--input={to_import}")
        for wf_id, _ in WORKFLOWS.values():
            _n8n_cli(n8n, n8n_env, logdir, f"publish-{wf_id}", "publish:workflow", f"--id={wf_id}")
        log(f"workflows imported and published ({time.monotonic() - t:.1f}s)")
        t = time.monotonic()
        procs["n8n"] = Proc("n8n", ["node", str(n8n), "start"], n8n_env, logdir)
        n8n_url = f"http://127.0.0.1:{n8n_port}"

        def shim_ready() -> bool:
            procs["shim"].alive() or pytest.fail(f"shim exited:\n{procs['shim'].tail()}", pytrace=False)
            res = probe("GET", f"{shim_url}/readyz", timeout=2)
            return res is not None and res[0] == 200

        wait_until(shim_ready, timeout=30, interval=0.1, message="shim /readyz")

        def events_hook_registered() -> bool:
            procs["n8n"].alive() or pytest.fail(f"n8n exited:\n{procs['n8n'].tail()}", pytrace=False)
            res = probe("GET", f"{n8n_url}/webhook/barnum-events", timeout=2)
            return res is not None and b"not registered for GET" in res[1]

        def reply_hook_registered() -> bool:
            query = f"hub.mode=subscribe&hub.verify_token={verify_token}&hub.challenge=4242"
            res = probe("GET", f"{n8n_url}/webhook/whatsapp-inbound?{query}", timeout=5)
            return res is not None and res[0] == 200 and res[1].strip() == b"4242"

        wait_until(events_hook_registered, timeout=120, interval=0.25, message="n8n event-sender webhook")
        wait_until(reply_hook_registered, timeout=60, interval=0.25, message="n8n reply-handler webhook")
        log(f"n8n up, both webhooks registered ({time.monotonic() - t:.1f}s after start)")

        # relay (last: the n8n endpoint is there to receive)
        relay_env = dict(base_env, DATABASE_URL=db_url, WEBHOOK_SECRET=secret,
                         N8N_WEBHOOK_URL=f"{n8n_url}/webhook/barnum-events", BARNUM_PUBLIC_URL=shim_url,
                         BARNUM_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
        procs["relay"] = Proc("relay", [sys.executable, "-m", "tests.e2e.launch", "relay"], relay_env, logdir)

        stack = Stack(db_url=db_url, graph=graph, recorder=recorder,
                      inbound=Inbound(phone_number_id=graph.phone_number_id), shim_url=shim_url,
                      n8n_url=n8n_url, secret=secret, signing_key=raw_key, app_secret=app_secret,
                      verify_token=verify_token, procs=procs)

        def endpoint_registered() -> bool:
            stack.check_alive()
            return bool(stack.sql("SELECT 1 FROM barnum.webhook_endpoints WHERE name = 'n8n' AND is_active"))

        wait_until(endpoint_registered, timeout=30, interval=0.1, message="relay registering the n8n endpoint")
        stack.timings["stack start"] = time.monotonic() - started
        log(f"stack up in {stack.timings['stack start']:.1f}s")
        yield stack
        ok = True
        stack.check_alive()
        assert graph.unauthorized == 0, "n8n called the Graph API with a wrong token"
        assert graph.invalid == [], f"n8n sent invalid Cloud API messages: {graph.invalid}"
    finally:
        for name in ("relay", "n8n", "shim"):
            if name in procs:
                code = procs[name].stop()
                log(f"stopped {name} (exit {code})")
        for server in servers:
            server.stop()
        try:
            if pg_cluster.is_running:
                drop_database(pg_cluster, dbname)
        except Exception as exc:  # noqa: BLE001 - cleanup must go on
            log(f"could not drop {dbname}: {exc}")
        if ok and not os.environ.get("BARNUM_E2E_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs kept in {logdir}")


@pytest.fixture(scope="session")
def clinic(stack: Stack) -> dict[str, str]:
    """A professional and a specialty to book with."""
    (prof,) = stack.sql("INSERT INTO barnum.professionals (name) VALUES ('Dr. Maria Santos') RETURNING id")
    (spec,) = stack.sql("INSERT INTO barnum.specialties (name) VALUES ('Medicina Dentária') RETURNING id")
    return {"professional_id": str(prof[0]), "specialty_id": str(spec[0])}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    timings = getattr(pytest, "_barnum_e2e_timings", None)
    if timings:
        terminalreporter.section("n8n end-to-end wall times")
        for name, seconds in timings.items():
            terminalreporter.write_line(f"{name:<58} {seconds * 1000:9.0f} ms")

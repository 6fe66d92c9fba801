"""The PostgreSQL server of ``barnum dev``: provisioned once, kept across runs.

:func:`dev_server` picks it: local server binaries (``initdb``/``pg_ctl`` on
``PATH`` or under ``/usr/lib/postgresql/*/bin``, highest version first) run a
persistent cluster in ``<project>/.barnum/pgdata`` (:class:`LocalCluster`;
``barnum dev`` keeps its port across runs), else the embedded ``pgserver``
package (:class:`EmbeddedServer`, ``pip install 'barnum[embedded]'``).

PostgreSQL refuses to run ``initdb``/``pg_ctl`` as root, so when we are root
every server command runs through ``runuser -u postgres --`` and the cluster's
directory is owned by ``postgres`` (with every parent directory traversable).

The test suite's throwaway servers (a temporary cluster, ``TEST_DATABASE_URL``,
testcontainers) build on this module in ``tests/pgcluster.py``.  Only the
standard library and psycopg are used here.
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import logging
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import psycopg

log = logging.getLogger("barnum.devdb")

MIN_MAJOR = 15
_SERVER_USER = "postgres"
# A Unix socket path must fit in sun_path (108 bytes with the terminator).
_MAX_SOCKET_DIR_LEN = 80


class PgClusterError(RuntimeError):
    """No PostgreSQL could be provisioned, or the server failed to start/stop."""


# --------------------------------------------------------------------- helpers


def make_url(params: dict[str, str]) -> str:
    """Build a ``postgresql://`` URL from libpq connection parameters.

    URLs (not ``key=value`` strings) are what both psycopg and asyncpg accept.
    """
    user = params.get("user", "")
    password = params.get("password", "")
    host = params.get("host", "")
    port = params.get("port", "")
    dbname = params.get("dbname", "")
    netloc = ""
    if user:
        netloc = urllib.parse.quote(user, safe="")
        if password:
            netloc += ":" + urllib.parse.quote(password, safe="")
        netloc += "@"
    if host and not host.startswith("/") and "," not in host:
        netloc += f"[{host}]" if ":" in host else host
        if port:
            netloc += f":{port}"
    extra = {
        k: v
        for k, v in params.items()
        if k not in ("user", "password", "dbname") and v != ""
        and not (k in ("host", "port") and host and not host.startswith("/") and "," not in host)
    }
    url = f"postgresql://{netloc}/{urllib.parse.quote(dbname, safe='')}"
    if extra:
        url += "?" + urllib.parse.urlencode(extra)
    return url


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_connection(
    dsn: str,
    timeout: float = 60.0,
    *,
    alive: Callable[[], bool] | None = None,
    on_fail: Callable[[], str] | None = None,
) -> None:
    """Poll until a connection to ``dsn`` succeeds, or fail at the deadline.

    ``alive`` (optional) is checked between attempts: when it returns False the
    server died and we fail at once instead of waiting out the deadline.
    ``on_fail`` supplies extra text (e.g. the server log) for the error.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.Error as exc:
            last = exc
        dead = alive is not None and not alive()
        if dead or time.monotonic() >= deadline:
            what = "exited during start-up" if dead else f"not ready after {timeout:.0f}s"
            detail = on_fail() if on_fail is not None else ""
            raise PgClusterError(
                f"PostgreSQL {what}: {str(last).strip()}" + (f"\n{detail}" if detail else "")
            )
        time.sleep(0.05)  # poll interval of a deadline-bounded wait


def find_bindir() -> tuple[Path, int]:
    """Directory holding ``initdb``/``pg_ctl``/``postgres`` and its major version.

    ``PATH`` first, then the highest ``/usr/lib/postgresql/*/bin``.
    """
    candidates: list[Path] = []
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    versioned = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        m = re.search(r"/postgresql/(\d+)(?:\.\d+)?/bin$", d)
        if m:
            versioned.append((int(m.group(1)), Path(d)))
    candidates.extend(p for _, p in sorted(versioned, reverse=True))
    found: list[tuple[Path, int]] = []
    for bindir in candidates:
        if not all((bindir / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            continue
        major = _major_version(bindir)
        if major is not None:
            found.append((bindir, major))
    good = [f for f in found if f[1] >= MIN_MAJOR]
    if good:
        return good[0]
    if found:
        raise PgClusterError(
            f"PostgreSQL {MIN_MAJOR}+ is required; found only version(s) "
            + ", ".join(f"{m} in {b}" for b, m in found)
        )
    raise PgClusterError(
        "no PostgreSQL server binaries found (initdb/pg_ctl on PATH or under "
        "/usr/lib/postgresql/*/bin); install e.g. `postgresql-15`"
    )


def _major_version(bindir: Path) -> int | None:
    try:
        out = subprocess.run(
            [str(bindir / "pg_ctl"), "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(m.group(1)) if m else None


def _is_root() -> bool:
    return os.geteuid() == 0


def _traversable_by(path: Path, uid: int, gids: set[int]) -> bool:
    """Can user ``uid`` (groups ``gids``) search ``path`` and all its parents?"""
    for p in [path, *path.parents]:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue  # will be created by us, with a traversable mode
        mode = st.st_mode
        if st.st_uid == uid:
            ok = bool(mode & stat.S_IXUSR)
        elif st.st_gid in gids:
            ok = bool(mode & stat.S_IXGRP)
        else:
            ok = bool(mode & stat.S_IXOTH)
        if not ok:
            return False
    return True


def _server_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(_SERVER_USER)
    except KeyError:
        raise PgClusterError(
            "running as root, and PostgreSQL refuses to run as root, but there is no "
            f"'{_SERVER_USER}' user to run it as (install the postgresql package, or "
            "run as an unprivileged user)"
        ) from None


def _user_gids(pw: pwd.struct_passwd) -> set[int]:
    return set(os.getgrouplist(pw.pw_name, pw.pw_gid))


# --------------------------------------------------------------------- servers


class LocalCluster:
    """A PostgreSQL cluster we run from local binaries, on 127.0.0.1 only,
    in ``data_dir`` (created by ``initdb`` on the first start, then reused).

    ``LocalCluster.persistent(dir)`` is ``barnum dev``'s; the tests' throwaway
    cluster in a temporary directory subclasses this (``tests/pgcluster.py``).
    """

    can_restart = True
    host = "127.0.0.1"

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        bindir: Path | None = None,
        extra_settings: dict[str, str] | None = None,
    ) -> None:
        if bindir is None:
            bindir, self.major = find_bindir()
        else:
            self.major = _major_version(bindir) or 0
        self.bindir = bindir
        self._as_root = _is_root()
        self._pw = _server_user() if self._as_root else None
        self.data_dir = data_dir.absolute()
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(self.host)
        self.settings: dict[str, str] = {
            "listen_addresses": self.host,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        if extra_settings:
            self.settings.update(extra_settings)
        self.user = _SERVER_USER
        self._atexit_registered = False
        self._log_offset = 0
        self.note: str | None = None

    # -- construction ---------------------------------------------------------

    @classmethod
    def persistent(cls, project_dir: Path, *, port: int | None = None) -> LocalCluster:
        """The cluster of ``barnum dev``: ``<project>/.barnum/pgdata``, reused.

        When root, ``postgres`` must own the data directory and be able to
        traverse its parents; if it cannot reach ``<project>/.barnum`` (e.g. the
        project lives under ``/root``) the data directory goes to
        ``/var/tmp/barnum-<hash of the project path>/pgdata`` instead, and
        :attr:`note` says so.
        """
        project_dir = project_dir.resolve()
        base = project_dir / ".barnum"
        note = None
        if _is_root():
            pw = _server_user()
            if not _traversable_by(base, pw.pw_uid, _user_gids(pw)):
                digest = hashlib.sha256(str(project_dir).encode()).hexdigest()[:12]
                fallback = Path("/var/tmp") / f"barnum-{digest}"
                note = (
                    f"the '{_SERVER_USER}' user cannot reach {base}; "
                    f"keeping the database in {fallback / 'pgdata'} instead"
                )
                base = fallback
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, os.stat(base).st_mode | 0o755)
        data_dir = base / "pgdata"
        running_port = _running_port(data_dir)
        cluster = cls(data_dir, port=port or running_port)
        cluster.note = note
        if note:
            log.warning("%s", note)
        return cluster

    # -- properties -----------------------------------------------------------

    @property
    def admin_dsn(self) -> str:
        return self.dsn("postgres")

    def dsn(self, dbname: str = "postgres") -> str:
        return make_url(
            {"host": self.host, "port": str(self.port), "user": self.user, "dbname": dbname}
        )

    @property
    def is_running(self) -> bool:
        return self._postmaster_pid() is not None

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / "postgres.log"

    # -- lifecycle ------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """initdb if needed, start the server and wait until it accepts connections."""
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        if self.is_running:
            # A persistent cluster left running by an earlier `barnum dev`.
            self.port = _running_port(self.data_dir) or self.port
            wait_for_connection(self.admin_dsn, timeout)
            return
        self._prepare_log()
        for attempt in range(5):
            try:
                self._start_once(timeout)
                break
            except PgClusterError:
                if self._fixed_port or attempt == 4 or not self._port_taken():
                    raise
                self.port = free_port(self.host)  # lost a race for the port; retry
        if not self._atexit_registered:
            atexit.register(self._atexit_stop)
            self._atexit_registered = True

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``); the data stays."""
        if self.is_running:
            self._pg_ctl("stop", "-m", "fast", "-w", "-t", "60")

    def restart(self, timeout: float = 60.0) -> None:
        """Fast-stop then start again on the same port and data directory.

        Every client connection is dropped; tests use this to simulate a
        database restart.
        """
        if self.is_running:
            self._pg_ctl("stop", "-m", "fast", "-w", "-t", "60")
        self._prepare_log()
        self._start_once(timeout)

    # -- internals ------------------------------------------------------------

    def _cmd(self, *argv: str) -> list[str]:
        if self._as_root:
            return ["runuser", "-u", self.user, "--", *argv]
        return list(argv)

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self._cmd(*argv),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            cwd="/",
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
        )
        if proc.returncode != 0:
            raise PgClusterError(
                f"{' '.join(argv[:2])} failed (exit {proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}{self._log_tail()}"
            )
        return proc

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), *args)

    def _initdb(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if self._pw is not None:
            if not self.data_dir.exists():
                self.data_dir.mkdir(mode=0o700)
            os.chown(self.data_dir, self._pw.pw_uid, self._pw.pw_gid)
        locale = "C.UTF-8" if _has_c_utf8() else "C"
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.data_dir),
            "--no-sync", "-A", "trust", "-U", self.user,
            "--encoding", "UTF8", f"--locale={locale}",
        )

    def _prepare_log(self) -> None:
        lf = self.log_file
        if not lf.exists():
            lf.touch()
        self._log_offset = lf.stat().st_size
        if self._pw is not None:
            os.chown(lf, self._pw.pw_uid, self._pw.pw_gid)

    def _socket_dir(self) -> str:
        if len(str(self.data_dir)) <= _MAX_SOCKET_DIR_LEN:
            return str(self.data_dir)
        return "/tmp"

    def _start_once(self, timeout: float) -> None:
        settings = {**self.settings, "port": str(self.port),
                    "unix_socket_directories": self._socket_dir()}
        opts = " ".join(f"-c {k}={_quote_opt(v)}" for k, v in settings.items())
        self._pg_ctl("start", "-W", "-l", str(self.log_file), "-o", opts)
        wait_for_connection(
            self.admin_dsn, timeout, alive=self._alive_or_starting, on_fail=self._log_tail
        )

    def _alive_or_starting(self) -> bool:
        # The pid file appears a moment after pg_ctl returns; only a pid file
        # naming a dead process (or none at all, after a while) means "died".
        pidfile = self.data_dir / "postmaster.pid"
        if not pidfile.exists():
            return not self._log_has_fatal()
        return self._postmaster_pid() is not None

    def _log_has_fatal(self) -> bool:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return False
        return bool(re.search(r"(FATAL|PANIC):\s+(?!the database system is starting up)", text)) \
            and "database system is ready" not in text

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            pid = int(first.strip())
        except (OSError, IndexError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, owned by someone else
        return pid

    def _port_taken(self) -> bool:
        return "could not bind" in self._log_tail() or "already in use" in self._log_tail()

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        tail = text.splitlines()[-lines:]
        return ("--- server log (tail) ---\n" + "\n".join(tail)) if tail else ""

    def _atexit_stop(self) -> None:
        try:
            self.stop()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            log.exception("stopping PostgreSQL at exit failed")


def _quote_opt(value: str) -> str:
    # pg_ctl passes -o through a shell; keep values simple and quote the rest.
    if re.fullmatch(r"[A-Za-z0-9_./:-]+", value):
        return value
    return "'" + value.replace("'", "'\"'\"'") + "'"


def _has_c_utf8() -> bool:
    try:
        out = subprocess.run(["locale", "-a"], capture_output=True, text=True).stdout
    except OSError:
        return False
    return any(line.strip().lower() in ("c.utf8", "c.utf-8") for line in out.splitlines())


def _running_port(data_dir: Path) -> int | None:
    """Port of a live postmaster on ``data_dir`` (line 4 of postmaster.pid)."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        os.kill(pid, 0)
    except PermissionError:
        return port
    except (OSError, IndexError, ValueError):
        return None
    return port


class EmbeddedServer:
    """PostgreSQL from the ``pgserver`` wheel (``pip install 'barnum[embedded]'``).

    ``barnum dev``'s fallback when no local server binaries exist.  It works
    as root (pgserver runs the server as its own ``pgserver`` user) and as a
    normal user; the data directory is ``<project>/.barnum/pgserver``.
    """

    can_restart = False

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: Any = None

    @staticmethod
    def available() -> bool:
        import importlib.util

        return importlib.util.find_spec("pgserver") is not None

    @property
    def is_running(self) -> bool:
        return self._server is not None

    @property
    def admin_dsn(self) -> str:
        return self.dsn("postgres")

    def dsn(self, dbname: str = "postgres") -> str:
        if self._server is None:
            raise PgClusterError("the embedded server is not started")
        return str(self._server.get_uri(dbname))

    def start(self) -> None:
        import importlib

        pgserver: Any = importlib.import_module("pgserver")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # cleanup_mode='stop': the server stops when this process lets go.
        self._server = pgserver.get_server(self.data_dir, cleanup_mode="stop")

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    def restart(self) -> None:
        raise PgClusterError("the embedded server cannot be restarted in place")


def dev_server(project_dir: Path) -> LocalCluster | EmbeddedServer:
    """The server of ``barnum dev``: local binaries when present (data in
    ``.barnum/pgdata``), else the embedded ``pgserver`` package."""
    try:
        find_bindir()
        return LocalCluster.persistent(project_dir)
    except PgClusterError as exc:
        if EmbeddedServer.available():
            return EmbeddedServer(project_dir.resolve() / ".barnum" / "pgserver")
        raise PgClusterError(
            f"{exc}; no local PostgreSQL server binaries and the embedded one is not installed: "
            "install PostgreSQL 15+ (apt-get install postgresql) or run "
            "`.venv/bin/pip install -e '.[embedded]'`"
        ) from None

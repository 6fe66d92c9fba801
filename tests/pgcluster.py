"""Throwaway PostgreSQL servers for the test suite (and bench/).

Three ways to get a server, tried in this order by :func:`provision`:

1. an existing server named by a URL (``TEST_DATABASE_URL``) — shared, so
   never restarted or stopped by us (:class:`ExternalServer`);
2. local server binaries: a private cluster in a temporary directory, removed
   when stopped (:class:`LocalCluster`, built on ``barnum dev``'s cluster in
   :mod:`listener.devdb`, which runs the server commands through
   ``runuser -u postgres --`` when we are root);
3. a Docker container via ``testcontainers`` when a Docker engine is reachable
   (:class:`ContainerServer`; the package is imported lazily and is not a
   dependency).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Protocol

import psycopg
from psycopg.conninfo import conninfo_to_dict

from listener import devdb
from listener.devdb import PgClusterError, free_port, make_url, wait_for_connection

__all__ = ["ContainerServer", "ExternalServer", "LocalCluster", "PgClusterError", "PgServer",
           "free_port", "make_url", "provision", "with_dbname"]


class PgServer(Protocol):
    """What the tests rely on, whatever the backend."""

    @property
    def can_restart(self) -> bool: ...

    @property
    def is_running(self) -> bool: ...

    @property
    def admin_dsn(self) -> str: ...

    def dsn(self, dbname: str = "postgres") -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def restart(self) -> None: ...


def with_dbname(dsn: str, dbname: str) -> str:
    """Return ``dsn`` (URL or ``key=value``) as a URL naming database ``dbname``."""
    params = {k: v for k, v in conninfo_to_dict(dsn).items() if v is not None}
    params["dbname"] = dbname
    return make_url({k: str(v) for k, v in params.items()})


class ExternalServer:
    """An already-running server named by a URL; shared, so never restarted."""

    can_restart = False

    def __init__(self, url: str) -> None:
        self._url = url

    @property
    def is_running(self) -> bool:
        try:
            with psycopg.connect(self._url, connect_timeout=2):
                return True
        except psycopg.Error:
            return False

    @property
    def admin_dsn(self) -> str:
        return self._url

    def dsn(self, dbname: str = "postgres") -> str:
        return with_dbname(self._url, dbname)

    def start(self) -> None:
        wait_for_connection(self._url, timeout=30.0)

    def stop(self) -> None:
        pass  # not ours

    def restart(self) -> None:
        raise PgClusterError("the server named by the database URL is shared; not restarting it")


class LocalCluster(devdb.LocalCluster):
    """A throwaway cluster in a fresh temporary directory (removed by
    :meth:`stop` / :meth:`cleanup`); fsync off unless ``extra_settings`` say."""

    def __init__(self, *, port: int | None = None, bindir: Path | None = None,
                 extra_settings: dict[str, str] | None = None) -> None:
        as_root = devdb._is_root()
        pw = devdb._server_user() if as_root else None
        parent = "/tmp" if as_root and os.path.isdir("/tmp") else None
        tmpdir = Path(tempfile.mkdtemp(prefix="barnum-pg-", dir=parent))
        os.chmod(tmpdir, 0o755)
        if pw is not None:
            os.chown(tmpdir, pw.pw_uid, pw.pw_gid)
        super().__init__(tmpdir / "data", port=port, bindir=bindir, extra_settings=extra_settings)
        self._tmpdir: Path | None = tmpdir

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        super().stop()
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the temporary directory of a stopped cluster."""
        if self._tmpdir is not None and not self.is_running:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ContainerServer:
    """PostgreSQL in Docker via ``testcontainers`` (imported lazily)."""

    can_restart = False

    def __init__(self, image: str = "postgres:15-alpine") -> None:
        try:
            from testcontainers.postgres import PostgresContainer
        except ImportError as exc:
            raise PgClusterError("testcontainers is not installed") from exc
        self._container = PostgresContainer(image)
        self._url: str | None = None

    @staticmethod
    def docker_available() -> bool:
        host = os.environ.get("DOCKER_HOST", "")
        if host.startswith("tcp://") or host.startswith("ssh://"):
            return True
        sock = host[len("unix://"):] if host.startswith("unix://") else "/var/run/docker.sock"
        if not os.path.exists(sock):
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(sock)
            return True
        except OSError:
            return False

    @property
    def is_running(self) -> bool:
        return self._url is not None

    @property
    def admin_dsn(self) -> str:
        return self.dsn("postgres")

    def dsn(self, dbname: str = "postgres") -> str:
        if self._url is None:
            raise PgClusterError("container not started")
        return with_dbname(self._url, dbname)

    def start(self) -> None:
        self._container.start()
        raw = str(self._container.get_connection_url())
        self._url = re.sub(r"^postgresql\+\w+://", "postgresql://", raw)
        wait_for_connection(self._url, timeout=60.0)

    def stop(self) -> None:
        if self._url is not None:
            self._container.stop()
            self._url = None

    def restart(self) -> None:
        raise PgClusterError("restarting a testcontainers server is not supported")


def provision(url: str | None = None) -> PgServer:
    """The first available server: ``url``, local binaries, then Docker.

    The result is not started yet; call ``start()`` (a no-op wait for ``url``).
    """
    if url:
        return ExternalServer(url)
    errors: list[str] = []
    try:
        return LocalCluster()
    except PgClusterError as exc:
        errors.append(f"local binaries: {exc}")
    if ContainerServer.docker_available():
        try:
            return ContainerServer()
        except PgClusterError as exc:
            errors.append(f"testcontainers: {exc}")
    else:
        errors.append("testcontainers: no Docker engine reachable")
    raise PgClusterError(
        "no PostgreSQL available. Set TEST_DATABASE_URL to a server you can create "
        "databases on, install PostgreSQL 15+ server binaries, or run Docker.\n  "
        + "\n  ".join(errors)
    )

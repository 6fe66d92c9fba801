"""Shared fixtures: one PostgreSQL per test session, one fresh database per test.

Where the server comes from (first that works):
  1. ``TEST_DATABASE_URL`` — an existing server we may create databases on
     (shared: ``pg_cluster.can_restart`` is False);
  2. local server binaries (initdb/pg_ctl; via ``runuser -u postgres`` as root)
     — a private throwaway cluster on 127.0.0.1, stopped at session end;
  3. Docker via testcontainers.

Fixtures:
  pg_cluster    session   .admin_dsn, .dsn(dbname), .can_restart, .restart()
  template_db   session   name of database ``barnum_template``, migrated from db/
  db_url        function  URL of a fresh clone of the template (dropped after)
  db_conn       function  autocommit psycopg connection to ``db_url``
  empty_db_url  function  URL of a fresh, empty database (from template0)
  make_db       function  factory: make_db(template=None) -> URL of another fresh DB
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import TupleRow

from listener.migrate import MigrationError, migrate
from tests.pgcluster import PgServer, provision

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DB = "barnum_template"


def _admin(server: PgServer) -> psycopg.Connection[TupleRow]:
    return psycopg.connect(server.admin_dsn, autocommit=True)


def create_database(server: PgServer, name: str, template: str | None) -> str:
    with _admin(server) as conn:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query = query + sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(query)
    return server.dsn(name)


def drop_database(server: PgServer, name: str) -> None:
    with _admin(server) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgServer]:
    server = provision(os.environ.get("TEST_DATABASE_URL") or None)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def template_db(pg_cluster: PgServer) -> Iterator[str]:
    drop_database(pg_cluster, TEMPLATE_DB)
    create_database(pg_cluster, TEMPLATE_DB, "template0")
    try:
        migrate(pg_cluster.dsn(TEMPLATE_DB), REPO_ROOT)
    except MigrationError as exc:
        pytest.fail(f"migrating {TEMPLATE_DB} from {REPO_ROOT / 'db'} failed: {exc}", pytrace=False)
    yield TEMPLATE_DB
    if pg_cluster.is_running:
        drop_database(pg_cluster, TEMPLATE_DB)


@pytest.fixture
def make_db(pg_cluster: PgServer) -> Iterator[Callable[..., str]]:
    """``make_db(template="barnum_template" | "template0" | None) -> url``; dropped at teardown."""
    names: list[str] = []

    def make(template: str | None = "template0") -> str:
        name = f"t_{uuid.uuid4().hex}"
        names.append(name)
        return create_database(pg_cluster, name, template)

    yield make
    if pg_cluster.is_running:
        for name in names:
            drop_database(pg_cluster, name)


@pytest.fixture
def db_url(template_db: str, make_db: Callable[..., str]) -> str:
    """A fresh database cloned from the migrated template."""
    return make_db(template_db)


@pytest.fixture
def empty_db_url(make_db: Callable[..., str]) -> str:
    """A fresh database with nothing in it (cloned from template0)."""
    return make_db("template0")


@pytest.fixture
def db_conn(db_url: str) -> Iterator[psycopg.Connection[TupleRow]]:
    conn = psycopg.connect(db_url, autocommit=True)
    try:
        yield conn
    finally:
        conn.close()

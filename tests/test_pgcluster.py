"""The PostgreSQL provisioning used by the tests and ``barnum dev``."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.pgcluster import PgServer, make_url, with_dbname


def test_with_dbname_keeps_every_other_parameter() -> None:
    url = with_dbname("postgresql://u%40x:p%2Fw@db.example:6543/app?sslmode=require", "t_1")
    assert conninfo_to_dict(url) == {
        "user": "u@x", "password": "p/w", "host": "db.example", "port": "6543",
        "dbname": "t_1", "sslmode": "require",
    }
    kv = with_dbname("host=/var/run/postgresql user=me dbname=app", "other")
    assert conninfo_to_dict(kv) == {"host": "/var/run/postgresql", "user": "me", "dbname": "other"}
    assert make_url({"host": "127.0.0.1", "port": "5", "user": "postgres", "dbname": "d"}) == (
        "postgresql://postgres@127.0.0.1:5/d"
    )


def test_restart_drops_connections_and_keeps_data(
    pg_cluster: PgServer, db_url: str
) -> None:
    if not pg_cluster.can_restart:
        pytest.skip("TEST_DATABASE_URL names a shared server, which the tests must not restart")
    conn = psycopg.connect(db_url, autocommit=True)
    conn.execute("CREATE TABLE survivor (id int)")
    before = pg_cluster.admin_dsn

    pg_cluster.restart()

    assert pg_cluster.is_running
    assert pg_cluster.admin_dsn == before  # same host and port
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    with psycopg.connect(db_url) as fresh:
        assert fresh.execute("SELECT to_regclass('survivor')::text").fetchone() == ("survivor",)

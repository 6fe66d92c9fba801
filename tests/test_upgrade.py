"""Upgrading a database of the previous release gives what a fresh install
gives, and keeps its rows working (issue 13: accounts arrive in 0004).

The previous release's ``db/`` is taken from git (the last commit before
migration 0004), applied to an empty database, given some data, then this
checkout's ``barnum migrate`` runs over it.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import io
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from listener import migrate
from tests.catalog import catalog

ROOT = Path(__file__).resolve().parent.parent

def previous_release(tmp_path: Path) -> Path:
    """The ``db/`` of the last commit before migration 0004, as a project root."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.fail("git and a git checkout are needed to fetch the previous release's db/", pytrace=False)
    first = subprocess.run(
        ["git", "-C", str(ROOT), "log", "--diff-filter=A", "--format=%H", "--", "db/migrations/0004_accounts.sql"],
        capture_output=True, text=True, check=True).stdout.split()
    ref = f"{first[-1]}^" if first else "HEAD"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref, "db"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp_path / "old", filter="data")
    assert not (tmp_path / "old" / "db" / "migrations" / "0004_accounts.sql").exists()
    return tmp_path / "old"


def test_upgrade_equals_fresh_install_and_keeps_rows_working(
        tmp_path: Path, make_db: Callable[..., str]) -> None:
    old_root = previous_release(tmp_path)
    upgraded = make_db()
    migrate.migrate(upgraded, old_root)
    with psycopg.connect(upgraded, autocommit=True) as conn:
        conn.execute("INSERT INTO barnum.webhook_endpoints (name, url, event_types) VALUES"
                     " ('n8n', 'https://n8n.example/hook', '{appointment.*}'),"
                     " ('paused', 'https://paused.example/hook', '{*}')")
        conn.execute("UPDATE barnum.webhook_endpoints SET is_active = false WHERE name = 'paused'")
        conn.execute("INSERT INTO barnum.patients (id, name, phone) VALUES"
                     " ('11111111-0000-0000-0000-000000000001', 'Ana', '+351911111111')")
        conn.execute("INSERT INTO barnum.appointments (patient_id, starts_at) VALUES"
                     " ('11111111-0000-0000-0000-000000000001', now() + interval '3 days')")

    migrate.migrate(upgraded)  # this checkout: 0004 and the new functions

    fresh = make_db()
    migrate.migrate(fresh)
    old, new = catalog(upgraded), catalog(fresh)
    assert old == new, "\n".join(sorted({f"upgraded only: {x}" for x in set(old) - set(new)}
                                        | {f"fresh only: {x}" for x in set(new) - set(old)}))

    with psycopg.connect(upgraded, autocommit=True) as conn:
        rows = conn.execute("SELECT ep.name, ep.status, ep.is_active, a.name FROM barnum.webhook_endpoints ep"
                            " JOIN barnum.accounts a ON a.id = ep.account_id ORDER BY 1").fetchall()
        assert rows == [("n8n", "active", True, "default"), ("paused", "inactive", False, "default")]
        # The old booking's delivery is claimed and recorded by the new functions.
        claimed = conn.execute("SELECT delivery_id, attempt FROM barnum.claim_deliveries('w', 10)").fetchall()
        assert len(claimed) == 1
        (delivery_id, attempt), = claimed
        conn.execute("SELECT barnum.record_attempts(%s::jsonb)",
                     (f'[{{"delivery_id": {delivery_id}, "attempt": {attempt}, "ok": true, "http_status": 200}}]',))
        assert conn.execute("SELECT status FROM barnum.webhook_deliveries WHERE id = %s",
                            (delivery_id,)).fetchone() == ("sent",)
        assert conn.execute("SELECT last_success_at IS NOT NULL FROM barnum.webhook_endpoints"
                            " WHERE name = 'n8n'").fetchone() == (True,)
        # A new booking still fans out (to the default account's endpoint).
        conn.execute("INSERT INTO barnum.appointments (patient_id, starts_at) VALUES"
                     " ('11111111-0000-0000-0000-000000000001', now() + interval '5 days')")
        assert conn.execute("SELECT count(*) FROM barnum.webhook_deliveries WHERE status = 'pending'").fetchone() == (1,)

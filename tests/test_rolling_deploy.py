"""Safe rolling deploys (issue 18): a relay of the previous release keeps
delivering while this release's SQL is deployed under it (the claim's new
shape is a new function, claim_deliveries_v2, beside the old one), a relay of
this release then takes over, and relay and shim refuse to start against a
database whose SQL API they do not speak.

The previous release's ``db/`` and ``listener/`` come from git (the last commit
before migration 0004, as in tests/test_upgrade.py); its relay runs from that
tree with this venv's packages.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import psycopg
import pytest

from listener import migrate
from tests.helpers import wait_until
from tests.receiver import Receiver
from tests.test_upgrade import previous_release

ROOT = Path(__file__).resolve().parent.parent
SECRET = "rolling-deploy-secret"


def previous_listener(tmp_path: Path) -> Path:
    """The previous release's ``listener`` package, unpacked beside its db/."""
    old = previous_release(tmp_path)
    ref = subprocess.run(["git", "-C", str(ROOT), "log", "--diff-filter=A", "--format=%H", "--",
                          "db/migrations/0004_accounts.sql"], capture_output=True, text=True, check=True).stdout.split()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", f"{ref[-1]}^", "listener"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(old, filter="data")
    return old


def relay(code_root: Path, db_url: str, out: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("N8N_", "BARNUM_PUBLIC", "LISTEN_DATABASE"))}
    env.update({"DATABASE_URL": db_url, "WEBHOOK_SECRET": SECRET, "PYTHONPATH": str(code_root),
                "PYTHONUNBUFFERED": "1"})
    with open(out, "wb") as sink:
        return subprocess.Popen([sys.executable, "-m", "listener.relay", "--sweep-interval", "1", *args],
                                cwd=code_root, env=env, stdout=sink, stderr=subprocess.STDOUT)


def book(conn: psycopg.Connection[tuple[object, ...]], n: int) -> None:
    conn.execute("""
        WITH p AS (INSERT INTO barnum.patients (name, phone)
                   SELECT 'Patient ' || g, '+3519' || lpad(g::text, 8, '0') FROM generate_series(1, %s) g
                   RETURNING id)
        INSERT INTO barnum.appointments (patient_id, starts_at) SELECT id, now() + interval '5 days' FROM p""", (n,))


def test_a_running_relay_of_the_previous_release_survives_the_deploy(
        tmp_path: Path, make_db: object) -> None:
    old_code = previous_listener(tmp_path)
    assert (old_code / "listener" / "relay.py").exists()
    url = make_db()  # type: ignore[operator]
    migrate.migrate(url, old_code)  # the previous release's schema
    receiver = Receiver([SECRET.encode()]).start()
    old_log = tmp_path / "old-relay.log"
    old_relay = None
    new_relay = None
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('n8n', %s)",
                         (receiver.url("/hook"),))
            book(conn, 20)
            old_relay = relay(old_code, url, old_log)
            wait_until(lambda: receiver.count("/hook") >= 20, timeout=60, message="the old relay's first deliveries")

            # Deploy this release's SQL under the running relay, and keep booking.
            report = migrate.migrate(url)
            assert report.applied_migrations and report.applied_functions
            book(conn, 30)
            wait_until(lambda: receiver.count("/hook") >= 50, timeout=60,
                       message="the old relay delivering after the deploy")
            assert old_relay.poll() is None, old_log.read_text()[-2000:]

            # Then this release's relay takes over.
            old_relay.terminate()
            assert old_relay.wait(30) == 0
            new_relay = relay(ROOT, url, tmp_path / "new-relay.log")
            book(conn, 10)
            wait_until(lambda: receiver.count("/hook") >= 60, timeout=60, message="the new relay's deliveries")
            def statuses() -> list[tuple[object, ...]]:
                return conn.execute("SELECT status, count(*) FROM barnum.webhook_deliveries GROUP BY 1").fetchall()

            wait_until(lambda: statuses() == [("sent", 60)], timeout=30, message="every delivery recorded as sent")
        log = old_log.read_text()
        assert "Traceback" not in log and '"level": "ERROR"' not in log, log[-3000:]
        assert receiver.bad_signatures() == []
        assert sorted(receiver.per_event("/hook").values()) == [1] * 60, "each event once"
    finally:
        for proc in (old_relay, new_relay):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        receiver.stop()


def test_relay_and_shim_refuse_a_schema_they_do_not_speak(tmp_path: Path, make_db: object) -> None:
    old_code = previous_release(tmp_path)
    url = make_db()  # type: ignore[operator]
    migrate.migrate(url, old_code)  # the previous release: no schema_compat()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("N8N_", "LISTEN_DATABASE"))}
    env.update({"DATABASE_URL": url, "WEBHOOK_SECRET": SECRET})
    barnum = Path(sys.executable).parent / "barnum"
    for argv in (["relay", "--once"], ["shim", "--port", "0"]):
        done = subprocess.run([str(barnum), *argv], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (argv, done.stdout, done.stderr)
        assert "compatibility level 1, this release needs 2" in done.stderr
        assert "run barnum migrate" in done.stderr
    not_migrated = make_db()  # type: ignore[operator]
    env["DATABASE_URL"] = not_migrated
    done = subprocess.run([str(barnum), "relay", "--once"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not migrated" in done.stderr


@pytest.fixture(autouse=True)
def _git_checkout() -> None:
    if not (ROOT / ".git").exists():
        pytest.fail("these tests need the git checkout (the previous release comes from its history)",
                    pytrace=False)

"""The migration runner (SPEC §2.1), against small fake migration trees.

Each test builds its own ``db/migrations`` + ``db/functions`` under tmp_path and
migrates an empty database; only ``test_repo_db_migrates`` uses the real db/.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from listener.migrate import MigrateReport, MigrationError, migrate, pending_versions, status

REPO_ROOT = Path(__file__).resolve().parent.parent

M1 = """
CREATE TABLE barnum.things (id int PRIMARY KEY, label text NOT NULL);
INSERT INTO barnum.things VALUES (1, 'one hundred %');
CREATE TABLE barnum.fn_log (seq bigserial PRIMARY KEY, file text NOT NULL);
"""
M2 = """
-- a second migration with a DO block and dollar quotes
DO $$
BEGIN
    INSERT INTO barnum.things VALUES (2, 'two; with a semicolon');
END
$$;
"""
F10 = """
CREATE OR REPLACE FUNCTION barnum.one() RETURNS int
LANGUAGE plpgsql AS $$
BEGIN
    RETURN 1;  -- ; inside a body
END
$$;
INSERT INTO barnum.fn_log (file) VALUES ('10_a');
"""
F20 = """
CREATE OR REPLACE FUNCTION barnum.two() RETURNS int
LANGUAGE sql AS $$ SELECT barnum.one() + 1 $$;
INSERT INTO barnum.fn_log (file) VALUES ('20_b');
"""


def write_tree(
    root: Path,
    migrations: dict[str, str] | None = None,
    functions: dict[str, str] | None = None,
) -> Path:
    (root / "db" / "migrations").mkdir(parents=True, exist_ok=True)
    (root / "db" / "functions").mkdir(parents=True, exist_ok=True)
    for name, text in (migrations or {}).items():
        (root / "db" / "migrations" / name).write_text(text)
    for name, text in (functions or {}).items():
        (root / "db" / "functions" / name).write_text(text)
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_tree(
        tmp_path,
        {"0001_init.sql": M1, "0002_more.sql": M2},
        {"10_a.sql": F10, "20_b.sql": F20},
    )


def q(url: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query.encode()).fetchall()


def fn_log(url: str) -> list[object]:
    return [r[0] for r in q(url, "SELECT file FROM barnum.fn_log ORDER BY seq")]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "listener.cli", *args],
        capture_output=True, text=True, env=full_env, cwd=REPO_ROOT, timeout=60,
    )


def test_fresh_apply_records_everything(empty_db_url: str, root: Path) -> None:
    report = migrate(empty_db_url, root)
    assert report.applied_migrations == ["0001_init.sql", "0002_more.sql"]
    assert report.applied_functions == ["10_a.sql", "20_b.sql"]
    assert not report.noop

    rows = q(empty_db_url, "SELECT version, name, checksum FROM barnum.schema_migrations ORDER BY 1")
    assert rows == [
        ("0001", "init", hashlib.sha256(M1.encode()).hexdigest()),
        ("0002", "more", hashlib.sha256(M2.encode()).hexdigest()),
    ]
    assert q(empty_db_url, "SELECT label FROM barnum.things ORDER BY id") == [
        ("one hundred %",), ("two; with a semicolon",)
    ]
    assert q(empty_db_url, "SELECT barnum.two()") == [(2,)]
    funcs = q(empty_db_url, "SELECT name, checksum FROM barnum.schema_functions ORDER BY 1")
    assert funcs == [
        ("10_a.sql", hashlib.sha256(F10.encode()).hexdigest()),
        ("20_b.sql", hashlib.sha256(F20.encode()).hexdigest()),
    ]
    assert pending_versions(empty_db_url, root) == []


def test_second_run_is_a_noop(empty_db_url: str, root: Path) -> None:
    migrate(empty_db_url, root)
    before = fn_log(empty_db_url)
    report = migrate(empty_db_url, root)
    assert report.noop
    assert report.applied_migrations == [] and report.applied_functions == []
    assert report.summary().startswith("nothing to do")
    assert fn_log(empty_db_url) == before


def test_changed_applied_migration_is_refused_and_nothing_applied(
    empty_db_url: str, root: Path
) -> None:
    migrate(empty_db_url, root)
    log_before = fn_log(empty_db_url)
    (root / "db/migrations/0001_init.sql").write_text(M1 + "\n-- edited\n")
    write_tree(root, {"0003_new.sql": "CREATE TABLE barnum.newer (id int);"},
               {"10_a.sql": F10 + "\n-- changed too\n"})

    with pytest.raises(MigrationError, match="0001_init.sql"):
        migrate(empty_db_url, root)

    assert q(empty_db_url, "SELECT to_regclass('barnum.newer')") == [(None,)]
    assert q(empty_db_url, "SELECT count(*) FROM barnum.schema_migrations") == [(2,)]
    assert fn_log(empty_db_url) == log_before


def test_vanished_applied_migration_is_an_error(empty_db_url: str, root: Path) -> None:
    migrate(empty_db_url, root)
    (root / "db/migrations/0002_more.sql").unlink()
    with pytest.raises(MigrationError, match="0002_more.sql"):
        migrate(empty_db_url, root)


def test_function_change_reapplies_every_function_file_in_order(
    empty_db_url: str, root: Path
) -> None:
    migrate(empty_db_url, root)
    assert fn_log(empty_db_url) == ["10_a", "20_b"]

    # Only the later file changes: everything is re-applied, in name order.
    (root / "db/functions/20_b.sql").write_text(F20.replace("+ 1", "+ 2"))
    report = migrate(empty_db_url, root)
    assert report.applied_migrations == []
    assert report.applied_functions == ["10_a.sql", "20_b.sql"]
    assert fn_log(empty_db_url) == ["10_a", "20_b", "10_a", "20_b"]
    assert q(empty_db_url, "SELECT barnum.two()") == [(3,)]

    # A new function file also re-applies all of them.
    write_tree(root, functions={"30_c.sql": "INSERT INTO barnum.fn_log (file) VALUES ('30_c');"})
    report = migrate(empty_db_url, root)
    assert report.applied_functions == ["10_a.sql", "20_b.sql", "30_c.sql"]

    # So does a newly applied migration, even with no function file changed.
    write_tree(root, {"0003_x.sql": "CREATE TABLE barnum.x (id int);"})
    report = migrate(empty_db_url, root)
    assert report.applied_migrations == ["0003_x.sql"]
    assert report.applied_functions == ["10_a.sql", "20_b.sql", "30_c.sql"]
    assert migrate(empty_db_url, root).noop

    # A removed function file is forgotten (its objects stay).
    (root / "db/functions/30_c.sql").unlink()
    report = migrate(empty_db_url, root)
    assert report.removed_functions == ["30_c.sql"]
    assert migrate(empty_db_url, root).noop


def test_failing_migration_rolls_back_and_names_file_and_line(
    empty_db_url: str, root: Path
) -> None:
    migrate(empty_db_url, root)
    write_tree(root, {
        "0003_bad.sql": "CREATE TABLE barnum.half (id int);\nSELECT 1;\nSELECT no_such_column;\n",
        "0004_after.sql": "CREATE TABLE barnum.after (id int);",
    })
    with pytest.raises(MigrationError) as info:
        migrate(empty_db_url, root)
    message = str(info.value)
    assert "0003_bad.sql" in message
    assert "line 3" in message
    assert "no_such_column" in message
    # The failing file's transaction rolled back; later files were not run.
    assert q(empty_db_url, "SELECT to_regclass('barnum.half'), to_regclass('barnum.after')") == [
        (None, None)
    ]
    assert pending_versions(empty_db_url, root) == ["0003", "0004"]


def test_session_settings_do_not_leak_between_files(empty_db_url: str, root: Path) -> None:
    write_tree(root, {
        "0003_set.sql": "SET search_path = barnum;\nCREATE TABLE in_barnum (id int);",
        "0004_plain.sql": "CREATE TABLE in_public (id int);",
    })
    migrate(empty_db_url, root)
    assert q(empty_db_url, "SELECT to_regclass('barnum.in_barnum') IS NOT NULL, "
                           "to_regclass('public.in_public') IS NOT NULL") == [(True, True)]


def test_failing_function_file_is_retried_next_run(empty_db_url: str, root: Path) -> None:
    write_tree(root, functions={"15_bad.sql": "SELECT barnum.nope();"})
    with pytest.raises(MigrationError, match="15_bad.sql"):
        migrate(empty_db_url, root)
    # Migrations committed; the functions are still due.
    assert pending_versions(empty_db_url, root) == []
    (root / "db/functions/15_bad.sql").write_text("SELECT barnum.one();")
    report = migrate(empty_db_url, root)
    assert report.applied_functions == ["10_a.sql", "15_bad.sql", "20_b.sql"]
    assert migrate(empty_db_url, root).noop


def test_concurrent_runs_apply_each_file_once(empty_db_url: str, root: Path) -> None:
    n = 4
    barrier = threading.Barrier(n)
    reports: list[MigrateReport] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            barrier.wait(timeout=30)
            report = migrate(empty_db_url, root)
            with lock:
                reports.append(report)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(reports) == n
    assert sum(1 for r in reports if not r.noop) == 1
    assert q(empty_db_url, "SELECT version, count(*) FROM barnum.schema_migrations GROUP BY 1 ORDER BY 1") == [
        ("0001", 1), ("0002", 1)
    ]
    assert q(empty_db_url, "SELECT count(*) FROM barnum.things") == [(2,)]
    assert fn_log(empty_db_url) == ["10_a", "20_b"]


def test_bad_file_names_are_refused(empty_db_url: str, root: Path) -> None:
    write_tree(root, {"0002_dup.sql": "SELECT 1;"})
    with pytest.raises(MigrationError, match="0002"):
        migrate(empty_db_url, root)
    (root / "db/migrations/0002_dup.sql").unlink()
    write_tree(root, {"schema.sql": "SELECT 1;"})
    with pytest.raises(MigrationError, match="schema.sql"):
        migrate(empty_db_url, root)


def test_status_lists_pending_then_applied(empty_db_url: str, root: Path) -> None:
    assert status(empty_db_url, root) == [
        ("migration", "0001_init.sql", "pending"),
        ("migration", "0002_more.sql", "pending"),
        ("function", "10_a.sql", "pending"),
        ("function", "20_b.sql", "pending"),
    ]
    migrate(empty_db_url, root)
    assert {s for _, _, s in status(empty_db_url, root)} == {"applied"}
    (root / "db/migrations/0001_init.sql").write_text("-- edited")
    write_tree(root, {"0003_new.sql": "SELECT 1;"})
    assert status(empty_db_url, root)[:3] == [
        ("migration", "0001_init.sql", "changed"),
        ("migration", "0002_more.sql", "applied"),
        ("migration", "0003_new.sql", "pending"),
    ]


# ------------------------------------------------------------------ CLI


def test_cli_status_and_migrate(empty_db_url: str, root: Path) -> None:
    env = {"DATABASE_URL": empty_db_url}
    before = run_cli("migrate", "--status", "--root", str(root), env=env)
    assert before.returncode == 0, before.stderr
    lines = before.stdout.splitlines()
    assert lines[0].split() == ["KIND", "FILE", "STATE"]
    assert lines[1].split() == ["migration", "0001_init.sql", "pending"]
    assert lines[3].split() == ["function", "10_a.sql", "pending"]
    assert lines[-1] == "0 applied, 4 not applied"

    done = run_cli("migrate", "--root", str(root), env=env)
    assert done.returncode == 0, done.stderr
    assert "applying migration 0001_init.sql" in done.stdout
    assert done.stdout.splitlines()[-1] == (
        "barnum migrate: applied 2 migration(s), re-applied 2 function file(s)"
    )

    again = run_cli("migrate", "--root", str(root), "--database-url", empty_db_url)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == (
        "barnum migrate: nothing to do: 2 migration(s) and 2 function file(s) up to date"
    )

    after = run_cli("migrate", "--status", "--root", str(root), env=env)
    assert after.returncode == 0, after.stderr
    assert [line.split()[-1] for line in after.stdout.splitlines()[1:-1]] == ["applied"] * 4


def test_cli_missing_database_url_exits_2_with_one_line() -> None:
    result = run_cli("migrate")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "DATABASE_URL" in lines[0]


def test_cli_migration_error_exits_1_with_one_line(empty_db_url: str, root: Path) -> None:
    write_tree(root, {"0003_bad.sql": "SELECT 1;\nSELEC oops;\n"})
    result = run_cli("migrate", "--root", str(root), env={"DATABASE_URL": empty_db_url})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("barnum migrate: ")
    assert "0003_bad.sql" in lines[0] and "line 2" in lines[0]


def test_cli_unreachable_database_exits_1(root: Path) -> None:
    url = "postgresql://nobody@127.0.0.1:1/nothing?connect_timeout=2"
    result = run_cli("migrate", "--root", str(root), env={"DATABASE_URL": url})
    assert result.returncode == 1
    assert result.stderr.startswith("barnum migrate: cannot connect to the database")
    assert len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ the real db/


def test_repo_db_migrates_on_a_fresh_database_and_reruns_as_noop(empty_db_url: str) -> None:
    first = migrate(empty_db_url, REPO_ROOT)
    assert first.applied_migrations, "db/migrations holds no migration"
    assert pending_versions(empty_db_url, REPO_ROOT) == []
    second = migrate(empty_db_url, REPO_ROOT)
    assert second.noop, second.summary()
    assert {s for _, _, s in status(empty_db_url, REPO_ROOT)} == {"applied"}


# ------------------------------------------------------------------ safe deploys (issue 18)


def test_function_files_apply_all_or_nothing_within_the_lock_timeout(empty_db_url: str, root: Path) -> None:
    write_tree(root, {"0003_t.sql": "CREATE TABLE barnum.busy (id int);"},
               {"30_trg.sql": "CREATE OR REPLACE FUNCTION barnum.t() RETURNS trigger LANGUAGE plpgsql AS "
                              "$$ BEGIN RETURN NEW; END $$;\n"
                              "CREATE OR REPLACE TRIGGER trg_busy BEFORE INSERT ON barnum.busy "
                              "FOR EACH ROW EXECUTE FUNCTION barnum.t();"})
    migrate(empty_db_url, root)
    before = q(empty_db_url, "SELECT name, checksum FROM barnum.schema_functions ORDER BY name")
    # A new version of an earlier file, and a trigger that needs the table's lock.
    (root / "db/functions/20_b.sql").write_text(F20.replace("+ 1", "+ 5"))
    with psycopg.connect(empty_db_url) as holder:
        holder.execute("LOCK TABLE barnum.busy IN ACCESS EXCLUSIVE MODE")  # a long transaction
        started = time.monotonic()
        with pytest.raises(MigrationError) as info:
            migrate(empty_db_url, root, lock_timeout=0.3)
        assert time.monotonic() - started < 10, "the lock timeout bounds the wait"
        holder.rollback()
    message = str(info.value)
    assert "30_trg.sql" in message and "lock within 0.3 s" in message and "nothing" in message
    # All or nothing: the earlier file's new version did not stay behind.
    assert q(empty_db_url, "SELECT barnum.two()") == [(2,)]
    assert q(empty_db_url, "SELECT name, checksum FROM barnum.schema_functions ORDER BY name") == before
    # With the lock free, the same run goes through.
    assert migrate(empty_db_url, root).applied_functions == ["10_a.sql", "20_b.sql", "30_trg.sql"]
    assert q(empty_db_url, "SELECT barnum.two()") == [(6,)]


def test_a_no_transaction_migration_can_build_an_index_concurrently(empty_db_url: str, root: Path) -> None:
    migrate(empty_db_url, root)
    write_tree(root, {"0003_idx.sql": "-- barnum:no-transaction\n"
                                      "-- a big table: build the index without blocking writes\n"
                                      "CREATE TABLE IF NOT EXISTS barnum.big (id int);\n"
                                      "CREATE INDEX CONCURRENTLY IF NOT EXISTS big_id_idx\n"
                                      "    ON barnum.big (id);\n"})
    report = migrate(empty_db_url, root)
    assert report.applied_migrations == ["0003_idx.sql"]
    assert q(empty_db_url, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'barnum.big_id_idx'::regclass") == [(True,)]
    assert migrate(empty_db_url, root).noop
    # In a transaction the same file would fail: CONCURRENTLY cannot run inside one.
    write_tree(root, {"0004_bad.sql": "CREATE INDEX CONCURRENTLY big_id2_idx ON barnum.big (id);"})
    with pytest.raises(MigrationError, match="0004_bad.sql"):
        migrate(empty_db_url, root)


def test_cli_lock_timeout_flag_is_checked(empty_db_url: str) -> None:
    done = run_cli("migrate", "--lock-timeout", "0", env={"DATABASE_URL": empty_db_url})
    assert done.returncode == 2 and "--lock-timeout" in done.stderr


def test_functions_no_file_defines_are_dropped_after_the_grace(empty_db_url: str, root: Path) -> None:
    write_tree(root, functions={"30_extra.sql": "CREATE OR REPLACE FUNCTION barnum.old_api() RETURNS int "
                                                "LANGUAGE sql AS $$ SELECT 1 $$;\n"
                                                "CREATE OR REPLACE FUNCTION barnum.kept_api() RETURNS int "
                                                "LANGUAGE sql AS $$ SELECT 2 $$;"})
    migrate(empty_db_url, root)
    # The next release drops old_api from its file: old code may still call it.
    (root / "db/functions/30_extra.sql").write_text(
        "CREATE OR REPLACE FUNCTION barnum.kept_api() RETURNS int LANGUAGE sql AS $$ SELECT 2 $$;")
    report = migrate(empty_db_url, root)
    assert report.orphaned_functions == ["barnum.old_api()"] and report.dropped_functions == []
    assert "old code may still call them" in report.summary()
    assert q(empty_db_url, "SELECT barnum.old_api()") == [(1,)], "kept during the grace"
    # After the grace (here: asked for at once) it is dropped; kept_api stays.
    report = migrate(empty_db_url, root, drop_removed_now=True)
    assert report.dropped_functions == ["barnum.old_api()"]
    assert q(empty_db_url, "SELECT to_regprocedure('barnum.old_api()') IS NULL, barnum.kept_api()") == [(True, 2)]
    assert migrate(empty_db_url, root).noop
    # Removing a whole file orphans what it defined too.
    (root / "db/functions/30_extra.sql").unlink()
    assert migrate(empty_db_url, root).orphaned_functions == ["barnum.kept_api()"]


def test_unchanged_triggers_take_no_lock_on_a_busy_table(empty_db_url: str) -> None:
    """Re-applying the repo's function files while a transaction writes to
    patients: the unchanged triggers are skipped (ensure_trigger), so the run
    needs no lock that waits for that writer."""
    migrate(empty_db_url)
    with psycopg.connect(empty_db_url) as writer:
        writer.execute("INSERT INTO barnum.patients (name) VALUES ('busy')")  # holds ROW EXCLUSIVE, open
        with psycopg.connect(empty_db_url, autocommit=True) as other:  # force a full re-apply
            other.execute("UPDATE barnum.schema_functions SET checksum = NULL")
        report = migrate(empty_db_url, lock_timeout=1.0)
        assert "20_appointments.sql" in report.applied_functions
        writer.rollback()
    # A changed trigger is replaced (and then needs its lock).
    comments = q(empty_db_url, "SELECT obj_description(t.oid, 'pg_trigger') FROM pg_trigger t "
                               "WHERE t.tgname = 'trg_patients_touch'")
    assert comments and str(comments[0][0]).startswith("barnum:")

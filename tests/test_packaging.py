"""An installed wheel carries ``db/`` (migrations + function files) and its
``barnum migrate`` applies them from outside any checkout; finding no
migration files is an error, never "nothing to do" / "ready"."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import psycopg
import pytest

from listener import db, migrate

REPO_ROOT = Path(__file__).resolve().parent.parent
DB = REPO_ROOT / "db"


def _sql_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.sql"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel offline from a copy of the sources (setuptools leaves
    build/ behind; keep it out of the checkout)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        if (REPO_ROOT / name).exists():
            shutil.copy2(REPO_ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO_ROOT / "listener", src / "listener", ignore=ignore)
    shutil.copytree(DB, src / "db", ignore=ignore)
    out = base / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--no-index", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = list(out.glob("barnum-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_every_migration_and_function_file(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for kind in ("migrations", "functions"):
            expected = _sql_names(DB / kind)
            assert expected
            shipped = sorted(n.rsplit("/", 1)[1] for n in names
                             if n.startswith(f"listener/_db/{kind}/") and n.endswith(".sql"))
            assert shipped == expected, kind
            for name in expected:
                assert zf.read(f"listener/_db/{kind}/{name}") == (DB / kind / name).read_bytes()
    assert not any(n.startswith("listener/_db/tests/") for n in names)
    assert "barnum-0.1.0.dist-info/entry_points.txt" in names


def test_wheel_ships_every_module_and_no_test_code(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    modules = sorted(p.name for p in (REPO_ROOT / "listener").glob("*.py"))
    assert {"devdb.py", "store.py", "relay.py", "relay_cli.py", "supervisor.py"} <= set(modules)
    assert [m for m in modules if f"listener/{m}" not in names] == []
    # The throwaway test servers stay in the repository (tests/pgcluster.py).
    assert not any(n.startswith("tests/") or n.endswith("/pgcluster.py") for n in names)


def test_installed_barnum_migrates_from_outside_the_checkout(
    wheel: Path, empty_db_url: str, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-index", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=120,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)

    # The installed copy is the one imported (not the editable checkout),
    # and it finds its db/ inside itself — the path /readyz relies on too.
    probe = subprocess.run(
        [sys.executable, "-c",
         "import listener.migrate as m, listener.db as d; "
         "print(m.__file__); print(m.db_dir()); print(','.join(d.migration_versions()))"],
        capture_output=True, text=True, env=env, cwd=elsewhere, timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    module_file, db_dir, versions = probe.stdout.split("\n")[:3]
    assert Path(module_file).is_relative_to(site)
    assert Path(db_dir) == site / "listener" / "_db"
    expected = [name.split("_", 1)[0] for name in _sql_names(DB / "migrations")]
    assert versions.split(",") == expected

    barnum = site / "bin" / "barnum"
    assert barnum.exists()
    done = subprocess.run(
        [str(barnum), "migrate", "--database-url", empty_db_url],
        capture_output=True, text=True, env=env, cwd=elsewhere, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"applied {len(expected)} migration(s)" in done.stdout
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        applied = [r[0] for r in conn.execute(
            "SELECT version FROM barnum.schema_migrations ORDER BY version").fetchall()]
        functions = [r[0] for r in conn.execute(
            "SELECT name FROM barnum.schema_functions WHERE checksum IS NOT NULL ORDER BY name").fetchall()]
    assert applied == expected
    assert functions == _sql_names(DB / "functions")

    again = subprocess.run(
        [str(barnum), "migrate", "--status", "--database-url", empty_db_url],
        capture_output=True, text=True, env=env, cwd=elsewhere, timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert f"{len(expected) + len(functions)} applied, 0 not applied" in again.stdout


def test_no_db_found_is_an_error_not_zero_migrations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(migrate, "checkout_db_dir", lambda: None)
    monkeypatch.setattr(migrate, "packaged_db_dir", lambda: None)
    with pytest.raises(migrate.MigrationError, match="cannot find db/migrations"):
        migrate.db_dir()
    with pytest.raises(migrate.MigrationError, match="cannot find db/migrations"):
        db.migration_versions()
    # An explicit project directory still works, and an empty one is refused.
    (tmp_path / "db" / "migrations").mkdir(parents=True)
    with pytest.raises(migrate.MigrationError, match="no migration files"):
        db.migration_versions(tmp_path)
    assert migrate.db_dir(REPO_ROOT) == DB

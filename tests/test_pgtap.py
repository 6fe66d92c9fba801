"""Run the pgTAP suite (db/tests/*.sql) with pg_prove against a migrated database.

Each pgTAP file wraps itself in BEGIN … ROLLBACK, so one fresh clone of the
migrated template serves the whole suite.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "db" / "tests"

_ENV_FOR = {
    "host": "PGHOST",
    "port": "PGPORT",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "dbname": "PGDATABASE",
    "sslmode": "PGSSLMODE",
}


def pgtap_database(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pgtap")
        except psycopg.errors.FeatureNotSupported as exc:
            pytest.fail(f"the pgtap extension is not installed on the server: {exc}", pytrace=False)
        except psycopg.errors.UndefinedFile as exc:
            pytest.fail(
                "the pgtap extension is not installed on the server "
                f"(apt-get install postgresql-15-pgtap): {exc}",
                pytrace=False,
            )
    return url


def run_pg_prove(url: str, target: Path, cwd: Path) -> tuple[int, str, int]:
    """Run pg_prove on ``target``; return (exit status, output, number of tests)."""
    pg_prove = shutil.which("pg_prove")
    if pg_prove is None:
        pytest.fail(
            "pg_prove not found (apt-get install libtap-parser-sourcehandler-pgtap-perl)",
            pytrace=False,
        )
    params = {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({_ENV_FOR[k]: v for k, v in params.items() if k in _ENV_FOR})
    argv = [pg_prove, "--nocolor", "--failures", "--ext", ".sql", "-r"]
    for flag, key in (("-h", "host"), ("-p", "port"), ("-U", "user"), ("-d", "dbname")):
        if params.get(key):
            argv += [flag, params[key]]
    argv.append(str(target.relative_to(cwd) if target.is_relative_to(cwd) else target))
    proc = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=540
    )
    output = proc.stdout + proc.stderr
    counts = re.findall(r"Files=\d+, Tests=(\d+)", output)
    return proc.returncode, output, int(counts[-1]) if counts else 0


def check(url: str, target: Path, cwd: Path) -> int:
    code, output, tests = run_pg_prove(url, target, cwd)
    summary = [line for line in output.splitlines() if re.match(r"(Files=|Result:|All tests)", line)]
    print(f"\npg_prove {target}:\n" + "\n".join(summary or output.splitlines()[-5:]))
    if code != 0:
        pytest.fail(f"pg_prove exited {code}:\n{output}", pytrace=False)
    assert tests > 0, f"pg_prove ran no tests:\n{output}"
    return tests


def test_pg_prove_harness(tmp_path: Path, make_db: Callable[..., str]) -> None:
    """The harness itself: a passing file passes and a failing one is reported."""
    url = pgtap_database(make_db("template0"))
    suite = tmp_path / "db" / "tests"
    suite.mkdir(parents=True)
    (suite / "ok.sql").write_text(
        "BEGIN;\nSELECT plan(2);\nSELECT ok(true, 'true');\n"
        "SELECT is(1 + 1, 2, 'sum');\nSELECT * FROM finish();\nROLLBACK;\n"
    )
    assert check(url, suite, tmp_path) == 2

    (suite / "bad.sql").write_text(
        "BEGIN;\nSELECT plan(1);\nSELECT is(1, 2, 'deliberately wrong');\n"
        "SELECT * FROM finish();\nROLLBACK;\n"
    )
    code, output, _ = run_pg_prove(url, suite, tmp_path)
    assert code != 0
    assert "deliberately wrong" in output


@pytest.mark.timeout(600)
def test_pgtap_suite(db_url: str) -> None:
    url = pgtap_database(db_url)
    check(url, TESTS_DIR, REPO_ROOT)

"""Every function a role may call is documented in the catalog, and
docs/sql-api.md is what scripts/sql_api_docs.py makes of it (issue 18)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("sql_api_docs", ROOT / "scripts" / "sql_api_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_granted_function_has_a_comment(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        rows = _generator().rows(conn)
    assert len(rows) > 20
    missing = [f"{role}: {name}({args})" for role, name, args, _, comment in rows if not (comment or "").strip()]
    assert missing == [], "add COMMENT ON FUNCTION in db/functions/98_api_docs.sql"


def test_docs_sql_api_md_is_current(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        wanted = _generator().render(conn)
    committed = (ROOT / "docs" / "sql-api.md").read_text(encoding="utf-8")
    assert committed == wanted, "regenerate: .venv/bin/python scripts/sql_api_docs.py $DATABASE_URL > docs/sql-api.md"

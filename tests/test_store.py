"""listener/store.py is the data-access layer: the only sender of listener.queries."""

from __future__ import annotations

import re
from pathlib import Path

from listener import queries

LISTENER = Path(__file__).resolve().parent.parent / "listener"


def _statement_names() -> set[str]:
    return {name for name, value in vars(queries).items() if name.isupper() and isinstance(value, str)}


def test_only_store_sends_queries() -> None:
    users = sorted(path.name for path in LISTENER.glob("*.py")
                   if path.name not in ("queries.py", "store.py")
                   and re.search(r"\bqueries\.[A-Z_]+\b|from listener\.queries import|import queries\b",
                                 path.read_text(encoding="utf-8")))
    assert users == [], f"call listener.store instead of listener.queries in: {users}"


def test_every_statement_has_a_store_function() -> None:
    used = set(re.findall(r"\bqueries\.([A-Z_][A-Z0-9_]*)\b", (LISTENER / "store.py").read_text(encoding="utf-8")))
    assert _statement_names(), "no statements found in listener.queries"
    assert _statement_names() - used == set()
    assert used - _statement_names() == set()

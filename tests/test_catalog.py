"""A fresh install's catalog is the committed snapshot (issue 18): any change
to tables, columns, constraints, indexes, function signatures, triggers,
policies or grants shows up as a reviewed diff of tests/snapshots/catalog.txt.

Regenerate after an intended change:  BARNUM_UPDATE_SNAPSHOT=1 ./scripts/test tests/test_catalog.py
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from tests.catalog import catalog

SNAPSHOT = Path(__file__).resolve().parent / "snapshots" / "catalog.txt"


def test_fresh_install_matches_the_committed_catalog(db_url: str) -> None:
    lines = [f"{kind}\t{text}" for kind, text in catalog(db_url, bodies=False)]
    current = "\n".join(lines) + "\n"
    if os.environ.get("BARNUM_UPDATE_SNAPSHOT") == "1":
        SNAPSHOT.write_text(current, encoding="utf-8")
    committed = SNAPSHOT.read_text(encoding="utf-8")
    diff = "".join(difflib.unified_diff(committed.splitlines(True), current.splitlines(True),
                                        "tests/snapshots/catalog.txt", "fresh install"))
    assert diff == "", "the catalog changed (regenerate with BARNUM_UPDATE_SNAPSHOT=1 if intended):\n" + diff

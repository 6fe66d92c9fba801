"""asyncpg plumbing shared by the relay and the shim.

Statements themselves live in ``listener.queries`` and are sent by
``listener.store``; this module only opens pools and turns Barnum's SQLSTATE
``BN4xx`` errors into a small value type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

#: HTTP status for each Barnum SQLSTATE (SPEC §2.6).
HTTP_STATUS = {"BN400": 400, "BN401": 401, "BN403": 403, "BN404": 404, "BN409": 409, "BN410": 410, "BN422": 422}


@dataclass(frozen=True)
class BarnumError:
    """A business error raised by SQL: code ``BN4xx``, message, optional detail."""

    code: str
    message: str
    detail: dict[str, object]

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 400)


def barnum_error(exc: BaseException) -> BarnumError | None:
    """The BarnumError carried by an asyncpg exception, or None if it is not one."""
    if not isinstance(exc, asyncpg.PostgresError):
        return None
    code = getattr(exc, "sqlstate", None) or ""
    if not code.startswith("BN"):
        return None
    detail: dict[str, object] = {}
    raw = getattr(exc, "detail", None)
    if raw:
        try:
            parsed = json.loads(raw)
            if isinstance(parsed, dict):
                detail = parsed
        except ValueError:
            pass
    return BarnumError(code, getattr(exc, "message", str(exc)), detail)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook: nothing to undo.  asyncpg's default reset sends
    ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every
    release — a second round trip per request (measured: ~3,000 → ~6,200
    trivial calls/s).  Barnum's statements are single function calls that
    leave no session state; asyncpg still rolls back a transaction left open
    before this hook runs."""


async def create_pool(
    dsn: str,
    *,
    public_url: str | None = None,
    min_size: int = 1,
    max_size: int = 10,
    application_name: str = "barnum",
) -> asyncpg.Pool:
    """A pool whose sessions carry ``barnum.public_base_url`` when
    ``BARNUM_PUBLIC_URL`` overrides the setting (SQL renders the links)."""
    settings = {"application_name": application_name}
    if public_url:
        settings["barnum.public_base_url"] = public_url
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, server_settings=settings,
        # Statements are few and fixed; caching their plans is the point.
        statement_cache_size=100,
        reset=_keep_session,
    )
    assert pool is not None
    return pool


def migration_versions(root: Path | None = None) -> list[str]:
    """Versions of the migration files (``0001`` of ``0001_schema.sql``) —
    the checkout's ``db/`` or the copy shipped in the wheel (see
    :func:`listener.migrate.db_dir`).  Finding none raises
    :class:`listener.migrate.MigrationError`: an empty list would make
    ``/readyz`` call any database migrated."""
    from listener.migrate import disk_versions

    return disk_versions(root)


#: The SQL API level this code speaks (``barnum.schema_compat()``, 10_core.sql).
SCHEMA_COMPAT = 2


async def schema_problem(conn: Any) -> str | None:
    """Why this code cannot work with the database's SQL API, or None.

    Level 1 (the first release) has no ``schema_compat()``; a database not
    migrated at all has no schema barnum."""
    from listener import store

    try:
        level = await store.schema_compat(conn)
    except asyncpg.UndefinedFunctionError:
        level = 1
    except asyncpg.InvalidSchemaNameError:
        return "the database is not migrated (no schema barnum): run barnum migrate"
    if level == SCHEMA_COMPAT:
        return None
    if level < SCHEMA_COMPAT:
        return (f"the database's SQL API is at compatibility level {level}, this release needs {SCHEMA_COMPAT}: "
                "run barnum migrate of this release first")
    return (f"the database's SQL API is at compatibility level {level}, newer than this release's "
            f"{SCHEMA_COMPAT}: deploy the matching release")

"""The migration runner behind ``barnum migrate`` (SPEC §2.1).

* ``db/migrations/NNNN_name.sql`` — versioned, forward-only; each applied once,
  in name order, in its own transaction, and recorded with its sha256 in
  ``barnum.schema_migrations``.  An applied file whose checksum changed (or
  whose file vanished) is an error and nothing is applied.
* ``db/functions/NN_name.sql`` — repeatable (``CREATE OR REPLACE``), tracked in
  ``barnum.schema_functions``.  When any migration was applied or any function
  file is new or changed, *every* function file is re-applied in name order,
  all in ONE transaction: later files may depend on earlier ones (the last
  one holds the grants), a migration may have dropped what they created, and
  a failure part-way must not leave a mix of old and new functions.
* Every transaction runs with ``lock_timeout`` (``--lock-timeout``, default
  5 s): on a live database a DDL statement waiting behind a long transaction
  would otherwise queue every other query on that table behind itself.  A
  timeout changes nothing and says so; run again.
* A migration whose first line is ``-- barnum:no-transaction`` runs outside a
  transaction, one statement at a time (for ``CREATE INDEX CONCURRENTLY``):
  its statements end with ``;`` at the end of a line and hold no ``$$`` body.
* A session-level advisory lock serialises concurrent runs; a second run with
  nothing changed is a no-op.

Each file's text is sent as one simple-protocol query (psycopg does so when no
parameters are given), so files may hold many statements and ``$$`` bodies.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

#: Key of the session-level advisory lock held for a whole run ("barnum-m").
LOCK_KEY = 0x6261726E756D2D6D

_MIGRATION_RE = re.compile(r"^(\d+)_([A-Za-z0-9][A-Za-z0-9_.-]*)\.sql$")
_FUNCTION_RE = re.compile(r"^(\d+)_([A-Za-z0-9][A-Za-z0-9_.-]*)\.sql$")

_BOOKKEEPING = """
CREATE SCHEMA IF NOT EXISTS barnum;
CREATE TABLE IF NOT EXISTS barnum.schema_migrations (
    version    text PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS barnum.schema_functions (
    name       text PRIMARY KEY,
    checksum   text,
    applied_at timestamptz
);
-- Functions no function file defines any more, kept for a grace period so
-- code of the previous release still running can call them (rolling deploy).
CREATE TABLE IF NOT EXISTS barnum.schema_orphans (
    signature  text PRIMARY KEY,
    first_seen timestamptz NOT NULL DEFAULT now()
);
"""

_SESSION_RESET = "RESET ALL; SET client_min_messages = warning"

Kind = Literal["migration", "function"]
State = Literal["applied", "pending", "changed", "missing"]
Progress = Callable[[Kind, str], None]
Connection = psycopg.Connection[TupleRow]


class MigrationError(Exception):
    """A migration run refused to proceed or a file failed; the message names the file."""


@dataclass(frozen=True)
class SqlFile:
    kind: Kind
    version: str  # "0001" for migrations, the file name for function files
    name: str  # "schema" for 0001_schema.sql; the file name for function files
    path: Path
    checksum: str

    @property
    def filename(self) -> str:
        return self.path.name

    def text(self) -> str:
        return self.path.read_text(encoding="utf-8")


@dataclass
class MigrateReport:
    applied_migrations: list[str] = field(default_factory=list)
    applied_functions: list[str] = field(default_factory=list)
    removed_functions: list[str] = field(default_factory=list)
    #: Functions no file defines any more (kept for the grace period) and
    #: those dropped once it had passed.
    orphaned_functions: list[str] = field(default_factory=list)
    dropped_functions: list[str] = field(default_factory=list)
    migrations_total: int = 0
    functions_total: int = 0

    @property
    def noop(self) -> bool:
        return not (self.applied_migrations or self.applied_functions or self.removed_functions
                    or self.dropped_functions)

    def summary(self) -> str:
        if self.noop:
            return (
                f"nothing to do: {self.migrations_total} migration(s) and "
                f"{self.functions_total} function file(s) up to date"
            )
        parts = [
            f"applied {len(self.applied_migrations)} migration(s)",
            f"re-applied {len(self.applied_functions)} function file(s)",
        ]
        if self.removed_functions:
            parts.append(f"forgot {len(self.removed_functions)} removed function file(s)")
        if self.orphaned_functions:
            parts.append(f"{len(self.orphaned_functions)} function(s) no file defines any more, kept for "
                         f"{ORPHAN_GRACE} (old code may still call them): " + ", ".join(self.orphaned_functions))
        if self.dropped_functions:
            parts.append("dropped " + ", ".join(self.dropped_functions))
        return ", ".join(parts)


# ------------------------------------------------------------------ files


#: Where a built wheel carries ``db/migrations`` and ``db/functions``: the
#: package data directory ``listener/_db`` (see pyproject.toml).
PACKAGED_DB = "_db"


def packaged_db_dir() -> Path | None:
    """The ``db/`` copy shipped inside the installed package, if there is one."""
    try:
        data = resources.files("listener").joinpath(PACKAGED_DB)
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        return None
    path = Path(str(data))
    return path if (path / "migrations").is_dir() else None


def checkout_db_dir() -> Path | None:
    """``db/`` of the checkout this package is imported from (editable install,
    ``python -m listener`` from the repo), if it is one."""
    path = Path(__file__).resolve().parent.parent / "db"
    return path if (path / "migrations").is_dir() else None


def db_dir(root: Path | None = None) -> Path:
    """The directory holding ``migrations/`` and ``functions/``.

    ``root`` (``barnum migrate --root``): ``root/db``.  Otherwise the checkout
    this package lives in, else the copy shipped in the wheel — never the
    current directory, whose ``db/`` may belong to another version.  Finding
    neither is an error, not "no migrations": ``/readyz`` would call an
    unmigrated database ready.
    """
    if root is not None:
        return root / "db"
    found = checkout_db_dir() or packaged_db_dir()
    if found is None:
        raise MigrationError(
            "cannot find db/migrations: not in a checkout and not shipped with the installed "
            "package (reinstall barnum, or pass --root PROJECT_DIR)"
        )
    return found


def _checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def migration_files(root: Path | None = None) -> list[SqlFile]:
    """``db/migrations/*.sql`` in name order; malformed or duplicate versions
    are errors, and so is finding none (see :func:`db_dir`)."""
    directory = db_dir(root) / "migrations"
    if not directory.is_dir():
        raise MigrationError(f"no migrations directory at {directory}")
    files: list[SqlFile] = []
    seen: dict[str, str] = {}
    for path in sorted(directory.glob("*.sql"), key=lambda p: p.name):
        m = _MIGRATION_RE.match(path.name)
        if m is None:
            raise MigrationError(
                f"{path.name}: migration file names must look like NNNN_name.sql"
            )
        version = m.group(1)
        if version in seen:
            raise MigrationError(
                f"{path.name}: version {version} is also used by {seen[version]}"
            )
        seen[version] = path.name
        files.append(SqlFile("migration", version, m.group(2), path, _checksum(path)))
    if not files:
        raise MigrationError(f"no migration files in {directory}")
    return files


def function_files(root: Path | None = None) -> list[SqlFile]:
    """``db/functions/*.sql`` in name order (an absent directory means none)."""
    directory = db_dir(root) / "functions"
    if not directory.is_dir():
        return []
    files: list[SqlFile] = []
    for path in sorted(directory.glob("*.sql"), key=lambda p: p.name):
        if _FUNCTION_RE.match(path.name) is None:
            raise MigrationError(
                f"{path.name}: function file names must look like NN_name.sql"
            )
        files.append(SqlFile("function", path.name, path.name, path, _checksum(path)))
    return files


def disk_versions(root: Path | None = None) -> list[str]:
    """Versions of the migration files on disk, e.g. ``["0001", "0002"]``."""
    return [f.version for f in migration_files(root)]


# ------------------------------------------------------------------ database


def _connect(dsn: str) -> Connection:
    try:
        conn = psycopg.connect(dsn, autocommit=True)
    except psycopg.Error as exc:
        raise MigrationError(f"cannot connect to the database: {_one_line(str(exc))}") from exc
    conn.execute(_SESSION_RESET)
    return conn


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _describe_error(f: SqlFile, text: str, exc: psycopg.Error) -> str:
    diag = exc.diag
    message = diag.message_primary or str(exc).splitlines()[0]
    where = ""
    position = diag.statement_position
    if position:
        try:
            line = text[: int(position) - 1].count("\n") + 1
            where = f" (line {line})"
        except ValueError:
            pass
    extra = []
    if diag.message_detail:
        extra.append(f"DETAIL: {diag.message_detail}")
    if diag.context:
        extra.append(f"CONTEXT: {diag.context.strip().splitlines()[0]}")
    tail = ("; " + "; ".join(extra)) if extra else ""
    return f"{f.kind} {f.filename} failed{where}: {message}{tail}"


def _table_exists(conn: Connection, name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])


def _applied_migrations(conn: Connection) -> dict[str, tuple[str, str]]:
    if not _table_exists(conn, "barnum.schema_migrations"):
        return {}
    rows = conn.execute("SELECT version, name, checksum FROM barnum.schema_migrations").fetchall()
    return {str(v): (str(n), str(c)) for v, n, c in rows}


def _applied_functions(conn: Connection) -> dict[str, str | None]:
    if not _table_exists(conn, "barnum.schema_functions"):
        return {}
    rows = conn.execute("SELECT name, checksum FROM barnum.schema_functions").fetchall()
    return {str(n): (None if c is None else str(c)) for n, c in rows}


def _check_applied(
    files: list[SqlFile], applied: dict[str, tuple[str, str]]
) -> list[SqlFile]:
    """Refuse changed or vanished applied migrations; return the pending files."""
    on_disk = {f.version: f for f in files}
    changed = [
        f.filename for f in files if f.version in applied and applied[f.version][1] != f.checksum
    ]
    if changed:
        raise MigrationError(
            "applied migration(s) changed on disk: "
            + ", ".join(changed)
            + " — never edit an applied migration; add a new one"
        )
    vanished = sorted(v for v in applied if v not in on_disk)
    if vanished:
        raise MigrationError(
            "applied migration(s) missing from db/migrations: "
            + ", ".join(f"{v}_{applied[v][0]}.sql" for v in vanished)
        )
    return [f for f in files if f.version not in applied]


#: How long a function no file defines any more is kept before it is dropped.
ORPHAN_GRACE = "1 day"

#: Functions of schema barnum that this transaction's function files did not
#: (re)create: CREATE OR REPLACE writes a new catalog row even when nothing
#: changed, so their rows are older.  Extension members are not ours.
_ORPHANS = """
SELECT p.oid::regprocedure::text FROM pg_proc p
 WHERE p.pronamespace = 'barnum'::regnamespace
   AND p.xmin <> pg_current_xact_id()::xid
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                                               AND d.deptype = 'e')
 ORDER BY 1
"""

#: Default of ``--lock-timeout`` (seconds).
LOCK_TIMEOUT = 5.0

NO_TRANSACTION_MARK = "-- barnum:no-transaction"


def _lock_timeout_sql(seconds: float) -> bytes:
    return f"SET LOCAL lock_timeout = '{max(1, int(seconds * 1000))}ms'".encode()


def _error(f: SqlFile, text: str, exc: psycopg.Error, lock_timeout: float) -> MigrationError:
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return MigrationError(
            f"{f.kind} {f.filename}: could not take a lock within {lock_timeout:g} s (a transaction still "
            "uses the table); nothing of this run was changed — run barnum migrate again, or give it "
            "longer with --lock-timeout")
    return MigrationError(_describe_error(f, text, exc))


def _apply(conn: Connection, f: SqlFile, record: sql.Composed, lock_timeout: float = LOCK_TIMEOUT) -> None:
    """Run one migration and its bookkeeping in one transaction (or, marked
    ``-- barnum:no-transaction``, statement by statement)."""
    text = f.text()
    if text.lstrip().startswith(NO_TRANSACTION_MARK):
        _apply_outside_transaction(conn, f, text, record, lock_timeout)
        return
    try:
        with conn.transaction():
            conn.execute(_lock_timeout_sql(lock_timeout))
            # No parameters: psycopg sends this with the simple query protocol,
            # so the file may contain many statements.
            conn.execute(text.encode("utf-8"), prepare=False)
            conn.execute(record)
    except psycopg.Error as exc:
        raise _error(f, text, exc, lock_timeout) from exc
    finally:
        # A plain SET in a file outlives its transaction; don't let it leak
        # into the next file (the advisory lock is not a setting: it stays).
        if not conn.closed and not conn.broken:
            conn.execute(_SESSION_RESET)


def _statements(text: str) -> list[str]:
    """The statements of a no-transaction migration: each ends with ';' at
    the end of a line (no $$ bodies in such files)."""
    out: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if not current and (not line.strip() or line.strip().startswith("--")):
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            out.append("\n".join(current))
            current = []
    if any(line.strip() and not line.strip().startswith("--") for line in current):
        out.append("\n".join(current))
    return out


def _apply_outside_transaction(
    conn: Connection, f: SqlFile, text: str, record: sql.Composed, lock_timeout: float
) -> None:
    """Each statement on its own (autocommit); recorded once all succeeded,
    so a failure leaves the file pending (write it to be re-runnable: IF NOT
    EXISTS, DROP INDEX CONCURRENTLY IF EXISTS of an invalid leftover)."""
    statements = _statements(text)
    if not statements:
        raise MigrationError(f"migration {f.filename}: no statement after {NO_TRANSACTION_MARK}")
    try:
        # The connection is in autocommit mode: each statement commits alone.
        conn.execute(f"SET lock_timeout = '{max(1, int(lock_timeout * 1000))}ms'".encode())
        for statement in statements:
            conn.execute(statement.encode("utf-8"), prepare=False)
        with conn.transaction():
            conn.execute(record)
    except psycopg.Error as exc:
        raise _error(f, text, exc, lock_timeout) from exc
    finally:
        if not conn.closed and not conn.broken:
            conn.execute(_SESSION_RESET)


def _apply_functions(
    conn: Connection, functions: list[SqlFile], lock_timeout: float, progress: Progress | None
) -> list[str]:
    """Every function file and its bookkeeping in ONE transaction: all new,
    or (on any error, a lock timeout included) all as before."""
    applied: list[str] = []
    current: SqlFile | None = None
    text = ""
    try:
        with conn.transaction():
            for f in functions:
                current, text = f, f.text()
                if progress is not None:
                    progress("function", f.filename)
                # Settings a file makes (SET …) end with the file.
                conn.execute(_SESSION_RESET.encode() + b"; " + _lock_timeout_sql(lock_timeout))
                conn.execute(text.encode("utf-8"), prepare=False)
                conn.execute(sql.SQL(
                    "INSERT INTO barnum.schema_functions (name, checksum, applied_at) "
                    "VALUES ({0}, {1}, now()) ON CONFLICT (name) DO UPDATE "
                    "SET checksum = EXCLUDED.checksum, applied_at = EXCLUDED.applied_at"
                ).format(sql.Literal(f.name), sql.Literal(f.checksum)))
                applied.append(f.filename)
            orphans = [r[0] for r in conn.execute(_ORPHANS).fetchall()]
            conn.execute("DELETE FROM barnum.schema_orphans WHERE NOT signature = ANY(%s)", (orphans,))
            conn.execute("INSERT INTO barnum.schema_orphans (signature) SELECT unnest(%s::text[]) "
                         "ON CONFLICT DO NOTHING", (orphans,))
    except psycopg.Error as exc:
        assert current is not None
        raise _error(current, text, exc, lock_timeout) from exc
    finally:
        if not conn.closed and not conn.broken:
            conn.execute(_SESSION_RESET)
    return applied


def _drop_orphans(conn: Connection, now: bool) -> tuple[list[str], list[str]]:
    """Drop the functions orphaned for longer than ORPHAN_GRACE (``now``: all
    of them); one still needed by another object (a trigger, a view) stays.
    Returns (still kept, dropped)."""
    due = [r[0] for r in conn.execute(
        "SELECT signature FROM barnum.schema_orphans WHERE %s OR first_seen < now() - %s::interval ORDER BY 1",
        (now, ORPHAN_GRACE)).fetchall()]
    dropped: list[str] = []
    for signature in due:
        try:
            with conn.transaction():
                if conn.execute("SELECT to_regprocedure(%s)", (signature,)).fetchone() != (None,):
                    conn.execute(sql.SQL("DROP FUNCTION {}").format(sql.SQL(signature)))
                conn.execute("DELETE FROM barnum.schema_orphans WHERE signature = %s", (signature,))
            dropped.append(signature)
        except psycopg.errors.DependentObjectsStillExist:
            continue
    kept = [r[0] for r in conn.execute("SELECT signature FROM barnum.schema_orphans ORDER BY 1").fetchall()]
    return kept, dropped


def migrate(
    dsn: str, root: Path | None = None, *, progress: Progress | None = None, lock_timeout: float = LOCK_TIMEOUT,
    drop_removed_now: bool = False,
) -> MigrateReport:
    """Apply pending migrations, then (re-)apply function files; see module doc."""
    migrations = migration_files(root)
    functions = function_files(root)
    report = MigrateReport(migrations_total=len(migrations), functions_total=len(functions))
    with _connect(dsn) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            conn.execute(_BOOKKEEPING)
            pending = _check_applied(migrations, _applied_migrations(conn))
            for f in pending:
                if progress is not None:
                    progress("migration", f.filename)
                _apply(conn, f, sql.SQL(
                    "INSERT INTO barnum.schema_migrations (version, name, checksum) "
                    "VALUES ({}, {}, {}); "
                    # Functions must be re-applied after any schema change; mark
                    # them stale in the same transaction so a failure between
                    # here and there is repaired by the next run.
                    "UPDATE barnum.schema_functions SET checksum = NULL"
                ).format(sql.Literal(f.version), sql.Literal(f.name), sql.Literal(f.checksum)), lock_timeout)
                report.applied_migrations.append(f.filename)

            recorded = _applied_functions(conn)
            stale = bool(report.applied_migrations) or any(
                recorded.get(f.name) != f.checksum for f in functions
            ) or bool(set(recorded) - {f.name for f in functions})
            if stale:
                report.applied_functions.extend(_apply_functions(conn, functions, lock_timeout, progress))
            gone = sorted(set(recorded) - {f.name for f in functions})
            if gone:
                conn.execute(
                    "DELETE FROM barnum.schema_functions WHERE name = ANY(%s)", (gone,)
                )
                report.removed_functions.extend(gone)
            report.orphaned_functions, report.dropped_functions = _drop_orphans(conn, drop_removed_now)
        finally:
            if not conn.closed and not conn.broken:
                conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    return report


def status(dsn: str, root: Path | None = None) -> list[tuple[Kind, str, State]]:
    """``(kind, file, state)`` for every migration and function file, read-only.

    States: ``applied``; ``pending`` (not applied yet, or a function file whose
    re-application is due); ``changed`` (an applied migration edited on disk —
    ``migrate`` will refuse); ``missing`` (recorded, but the file is gone).
    """
    migrations = migration_files(root)
    functions = function_files(root)
    rows: list[tuple[Kind, str, State]] = []
    with _connect(dsn) as conn:
        applied = _applied_migrations(conn)
        recorded = _applied_functions(conn)
    on_disk = {f.version for f in migrations}
    for f in migrations:
        if f.version not in applied:
            rows.append(("migration", f.filename, "pending"))
        elif applied[f.version][1] != f.checksum:
            rows.append(("migration", f.filename, "changed"))
        else:
            rows.append(("migration", f.filename, "applied"))
    for v in sorted(set(applied) - on_disk):
        rows.append(("migration", f"{v}_{applied[v][0]}.sql", "missing"))
    any_pending = any(state != "applied" for _, _, state in rows)
    stale = any_pending or any(recorded.get(f.name) != f.checksum for f in functions)
    for f in functions:
        if recorded.get(f.name) == f.checksum and not stale:
            rows.append(("function", f.filename, "applied"))
        else:
            # Any change re-applies every function file, so all are due.
            rows.append(("function", f.filename, "pending"))
    return rows


def pending_versions(dsn: str, root: Path | None = None) -> list[str]:
    """Versions on disk not yet recorded as applied (empty = migrations current)."""
    versions = disk_versions(root)
    with _connect(dsn) as conn:
        applied = _applied_migrations(conn)
    return [v for v in versions if v not in applied]

"""The ``barnum`` command line (SPEC §6).

Each subcommand is a :class:`Command`: a ``configure`` function adding its
arguments to its sub-parser and a ``run`` function returning the exit status.
Adding one is a local edit: write the two functions and add an entry to
:data:`COMMANDS`.

Conventions: a missing required setting (e.g. ``DATABASE_URL``) raises
:class:`ConfigError` → one line on stderr and exit 2; a runtime failure a
command reports itself (one line ``barnum <cmd>: <message>``) and returns 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from listener import admin
from listener.config import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


@dataclass(frozen=True)
class Command:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------ helpers


def require_env(name: str, value: str | None = None) -> str:
    """``value`` if given, else the environment variable ``name``; missing → ConfigError."""
    result = value if value else os.environ.get(name, "")
    if not result:
        raise ConfigError(f"{name} is not set (required)")
    return result


def add_database_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        metavar="URL",
        default=None,
        help="PostgreSQL URL (default: $DATABASE_URL)",
    )


def database_url(args: argparse.Namespace) -> str:
    url: str | None = getattr(args, "database_url", None)
    if url:
        return url
    try:
        return require_env("DATABASE_URL")
    except ConfigError:
        raise ConfigError("DATABASE_URL is not set (or pass --database-url URL)") from None


def fail(command: str, message: str) -> int:
    """Report a runtime failure on one line and return the failure status."""
    flat = " ".join(message.split())
    print(f"barnum {command}: {flat}", file=sys.stderr)
    return EXIT_FAILURE


def setup_logging() -> None:
    """JSON log lines at ``BARNUM_LOG_LEVEL`` (default INFO)."""
    from listener import config, logs

    logs.setup(config.load().log_level)


# ------------------------------------------------------------------ migrate


def _lock_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 3600 seconds, got {text}")
    return value


def _configure_migrate(p: argparse.ArgumentParser) -> None:
    add_database_url(p)
    p.add_argument("--status", action="store_true", help="list applied / pending files and exit")
    p.add_argument(
        "--root",
        type=Path,
        default=None,
        help="project directory holding db/ (default: this checkout)",
    )
    p.add_argument(
        "--lock-timeout",
        type=_lock_seconds,
        default=5.0,
        metavar="SECONDS",
        help="give up (changing nothing) when a lock is not granted within this time (default: 5)",
    )
    p.add_argument(
        "--drop-removed-now",
        action="store_true",
        help="drop functions no file defines any more at once, not after the 1-day grace",
    )


def _run_migrate(args: argparse.Namespace) -> int:
    from listener import migrate as m

    url = database_url(args)
    root: Path | None = args.root
    try:
        if args.status:
            rows = m.status(url, root)
            width = max([len(f) for _, f, _ in rows] + [4])
            print(f"{'KIND':<9}  {'FILE':<{width}}  STATE")
            for kind, filename, state in rows:
                print(f"{kind:<9}  {filename:<{width}}  {state}")
            pending = sum(1 for *_, s in rows if s != "applied")
            print(f"{len(rows) - pending} applied, {pending} not applied")
            return EXIT_OK

        def progress(kind: str, filename: str) -> None:
            print(f"applying {kind} {filename}", flush=True)

        report = m.migrate(url, root, progress=progress, lock_timeout=args.lock_timeout,
                           drop_removed_now=args.drop_removed_now)
    except m.MigrationError as exc:
        return fail("migrate", str(exc))
    print(f"barnum migrate: {report.summary()}")
    return EXIT_OK


# ------------------------------------------------------------------ operator tools


def _admin_command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]) -> Command:
    def _configure(p: argparse.ArgumentParser) -> None:
        add_database_url(p)
        configure(p)

    def _run(args: argparse.Namespace) -> int:
        return admin.run(name, database_url(args), args)

    return Command(help=help, configure=_configure, run=_run)


# ------------------------------------------------------------------ long-running parts


def _service(module: str, help: str) -> Command:
    """relay / shim / run / dev: their module's add_arguments + main(args, config)."""
    import importlib

    def _configure(p: argparse.ArgumentParser) -> None:
        importlib.import_module(f"listener.{module}").add_arguments(p)

    def _run(args: argparse.Namespace) -> int:
        from listener import config

        mod = importlib.import_module(f"listener.{module}")
        code: int = mod.main(args, config.load())
        return code

    return Command(help=help, configure=_configure, run=_run)


# ------------------------------------------------------------------ registry

COMMANDS: dict[str, Command] = {
    "migrate": Command(
        help="apply database migrations and function files",
        configure=_configure_migrate,
        run=_run_migrate,
    ),
    "relay": _service("relay_cli", "deliver the outbox to webhook endpoints (LISTEN/NOTIFY + sweep)"),
    "shim": _service("shim", "serve action links and n8n callbacks (uvicorn)"),
    "run": _service("run", "relay + shim in one process"),
    "dev": _service("dev", "try it: embedded Postgres, demo clinic, relay + shim, messages printed"),
    "endpoints": _admin_command("endpoints", "manage webhook endpoints (add|list|enable|disable|remove)",
                                admin.configure_endpoints),
    "dlq": _admin_command("dlq", "list or retry dead letters", admin.configure_dlq),
    "accounts": _admin_command("accounts", "accounts of the management API (add|list)", admin.configure_accounts),
    "numbers": _admin_command("numbers", "WhatsApp numbers routed to accounts (add|list|remove)",
                              admin.configure_numbers),
    "flows": _admin_command("flows", "keyword flows (import|list|enable|disable)", admin.configure_flows),
    "tokens": _admin_command("tokens", "API tokens of the management API (create|list|revoke)",
                             admin.configure_tokens),
    "status": _admin_command("status", "queue depth, dead letters, per-endpoint success rate",
                             admin.configure_status),
    "settings": _admin_command("settings", "show or change settings (validated)", admin.configure_settings),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="barnum",
        description="Clinic appointment messaging: logic in PostgreSQL, a relay and a shim beside it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging()
        return COMMANDS[args.command].run(args)
    except ConfigError as exc:
        print(f"barnum {args.command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

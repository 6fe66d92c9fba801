"""Operator commands: ``barnum endpoints | dlq | status | settings``.

Every command is one call of an SQL function (``listener.queries``); rules
such as URL validation or setting types live in SQL.  A ``BN4xx`` error is
printed on one line and the command exits 2 — nothing was changed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from listener import queries
from listener.db import barnum_error

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INPUT = 2

Handler = Callable[[asyncpg.Connection, argparse.Namespace], Awaitable[int]]


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain aligned text table (no dependency needed for this)."""
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _emit(doc: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    print(json.dumps(doc, indent=2, default=str) if as_json else render(doc))


# ------------------------------------------------------------------ endpoints


async def _endpoints(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    action = args.endpoints_action
    if action == "list":
        rows = json.loads(await conn.fetchval(queries.ENDPOINT_LIST))
        _emit(rows, args.json, lambda r: _table(
            [dict(x, event_types=",".join(x["event_types"])) for x in r],
            ["name", "url", "is_active", "event_types", "has_secret", "max_attempts", "timeout_ms"])
            if r else "no endpoints (add one: barnum endpoints add NAME URL)")
        return EXIT_OK
    if action == "add":
        types = [t.strip() for t in args.events.split(",") if t.strip()]
        doc = json.loads(await conn.fetchval(
            queries.ENDPOINT_ADD, args.name, args.url, args.secret, types,
            args.max_attempts, args.timeout_ms, args.allow_http))
        print(f"added endpoint {doc['name']} → {doc['url']}")
        return EXIT_OK
    if action in ("enable", "disable"):
        doc = json.loads(await conn.fetchval(queries.ENDPOINT_SET_ACTIVE, args.name, action == "enable"))
        print(f"endpoint {doc['name']} {'enabled' if doc['is_active'] else 'disabled'}")
        return EXIT_OK
    doc = json.loads(await conn.fetchval(queries.ENDPOINT_REMOVE, args.name, args.force))
    print(f"removed endpoint {doc['name']}"
          + (f" (dropped {doc['dropped_queued']} queued deliveries)" if doc["dropped_queued"] else ""))
    return EXIT_OK


def configure_endpoints(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="endpoints_action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="list webhook endpoints")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    add = sub.add_parser("add", help="add a webhook endpoint")
    add.add_argument("name")
    add.add_argument("url", help="https URL ({event_type} is replaced per event); http only for loopback")
    add.add_argument("--secret", default=None, help="per-endpoint HMAC secret (default: WEBHOOK_SECRET)")
    add.add_argument("--events", default="*", help="comma-separated glob patterns (default: *)")
    add.add_argument("--max-attempts", type=int, default=None)
    add.add_argument("--timeout-ms", type=int, default=10000)
    add.add_argument("--allow-http", action="store_true", help="allow plain http to a non-loopback host")
    for name in ("enable", "disable"):
        sp = sub.add_parser(name, help=f"{name} an endpoint")
        sp.add_argument("name")
    rm = sub.add_parser("remove", help="remove an endpoint")
    rm.add_argument("name")
    rm.add_argument("--force", action="store_true", help="also drop its queued deliveries")


# ------------------------------------------------------------------ dlq


async def _dlq(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    if args.dlq_action == "list":
        rows = json.loads(await conn.fetchval(queries.DLQ_LIST, args.limit))
        _emit(rows, args.json, lambda r: _table(
            r, ["event_id", "event_type", "endpoint", "attempts", "last_http_status", "last_error", "created_at"])
            if r else "no dead letters")
        return EXIT_OK
    if not args.all and not args.event:
        print("barnum dlq retry: say which: --event ID or --all", file=sys.stderr)
        return EXIT_INPUT
    n = await conn.fetchval(queries.DLQ_RETRY, None if args.all else args.event)
    print(f"re-queued {n} dead deliveries")
    return EXIT_OK


def configure_dlq(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="dlq_action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="list dead letters, newest first")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true")
    rt = sub.add_parser("retry", help="re-queue dead letters")
    g = rt.add_mutually_exclusive_group()
    g.add_argument("--event", metavar="ID", help="only this event's deliveries")
    g.add_argument("--all", action="store_true", help="every dead letter")


# ------------------------------------------------------------------ status


def _render_status(doc: dict[str, Any]) -> str:
    q = doc["queue"]
    lines = [
        f"queue: {q['pending']} pending ({q['due']} due now), {q['processing']} processing, "
        f"{q['dead_letter']} dead letters; oldest due {q['oldest_due_age_seconds']:.1f} s ago",
        "deliveries: " + (", ".join(f"{k} {v}" for k, v in sorted(doc["deliveries_by_status"].items())) or "none"),
        "events:     " + (", ".join(f"{k} {v}" for k, v in sorted(doc["events_by_status"].items())) or "none"),
        "",
    ]
    eps = [dict(e, success_rate_last_hour=(
        "-" if e["success_rate_last_hour"] is None else f"{100 * float(e['success_rate_last_hour']):.1f}%"))
        for e in doc["endpoints"]]
    lines.append(_table(eps, ["name", "is_active", "pending", "dead_letter",
                              "attempts_last_hour", "success_rate_last_hour", "url"])
                 if eps else "no endpoints")
    return "\n".join(lines)


async def _status(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    doc = json.loads(await conn.fetchval(queries.STATUS_REPORT))
    _emit(doc, args.json, _render_status)
    return EXIT_OK


def configure_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


# ------------------------------------------------------------------ settings


async def _settings(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    if args.settings_action == "get":
        doc = json.loads(await conn.fetchval(queries.SETTINGS_GET))
        if args.key:
            if args.key not in doc:
                print(f"barnum settings: unknown setting {args.key!r} (known: {', '.join(sorted(doc))})",
                      file=sys.stderr)
                return EXIT_INPUT
            print(json.dumps(doc[args.key]))
            return EXIT_OK
        width = max(len(k) for k in doc)
        print("\n".join(f"{k:<{width}}  {json.dumps(v)}" for k, v in sorted(doc.items())))
        return EXIT_OK
    raw = args.value

    def no_constants(name: str) -> Any:
        raise ValueError(name)  # NaN/Infinity are not JSON, jsonb rejects them

    try:
        value = json.loads(raw, parse_constant=no_constants)
    except ValueError:
        value = raw  # a bare word is a string: `settings set locale en`
    stored = await conn.fetchval(queries.SETTINGS_SET, args.key, json.dumps(value))
    print(f"{args.key} = {stored}")
    return EXIT_OK


def configure_settings(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="settings_action", metavar="ACTION", required=True)
    g = sub.add_parser("get", help="show all settings, or one")
    g.add_argument("key", nargs="?")
    s = sub.add_parser("set", help="set one setting (validated)")
    s.add_argument("key")
    s.add_argument("value", help='JSON value, or a bare string: 2 hours, en, true, 5')


# ------------------------------------------------------------------ runner

HANDLERS: dict[str, Handler] = {
    "endpoints": _endpoints,
    "dlq": _dlq,
    "status": _status,
    "settings": _settings,
}


def run(command: str, url: str, args: argparse.Namespace) -> int:
    """Run one operator command against ``url``; BN4xx → one line, exit 2."""

    async def go() -> int:
        conn = await asyncpg.connect(url)
        try:
            return await HANDLERS[command](conn, args)
        finally:
            await conn.close()

    try:
        return asyncio.run(go())
    except asyncpg.PostgresError as exc:
        err = barnum_error(exc)
        if err is not None:
            message = err.message
        elif (getattr(exc, "sqlstate", "") or "").startswith("22"):  # data exception: bad input
            message = f"invalid value: {getattr(exc, 'message', exc)}"
        else:
            print(f"barnum {command}: database error: {' '.join(str(exc).split())}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"barnum {command}: {message}", file=sys.stderr)
        return EXIT_INPUT
    except (asyncpg.DataError, OverflowError, ValueError) as exc:
        # Rejected by the driver before it reached the database (e.g. an id
        # that is not a UUID, a number out of range): still the user's input.
        print(f"barnum {command}: invalid value: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_INPUT
    except (OSError, asyncpg.InterfaceError) as exc:
        print(f"barnum {command}: cannot reach the database: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_FAILURE

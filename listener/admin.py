"""Operator commands: ``barnum endpoints | dlq | status | settings``.

Every command is one call of an SQL function (``listener.store``); rules
such as URL validation or setting types live in SQL.  A ``BN4xx`` error is
printed on one line and the command exits 2 — nothing was changed.

Errors name the flag to change: a rule about one argument says which in the
error's DETAIL (``{"field": "timeout_ms"}``) and :data:`FLAGS` maps it to the
option; input the driver cannot even send (not a UUID, beyond a 32-bit
integer) is refused here, before any SQL runs (:class:`UsageError`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from listener import store
from listener.db import BarnumError, barnum_error

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INPUT = 2

Handler = Callable[[asyncpg.Connection, argparse.Namespace], Awaitable[int]]

#: The option behind each SQL argument a rule names in DETAIL {"field": …}.
FLAGS = {
    "max_attempts": "--max-attempts",
    "timeout_ms": "--timeout-ms",
    "secret": "--secret",
    "event_types": "--events",
    "limit": "--limit",
}

INT4_MIN, INT4_MAX = -(2**31), 2**31 - 1


class UsageError(Exception):
    """Input refused by the command itself; the message names the flag."""


def _event_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise UsageError(f"--event must be an event id (UUID, as `barnum dlq list` shows), got {value!r}") from None


def _int4(flag: str, value: int | None) -> int | None:
    # The SQL functions take int; beyond it the driver refuses before they run.
    if value is not None and not INT4_MIN <= value <= INT4_MAX:
        raise UsageError(f"{flag}: {value} is out of range")
    return value


def _plural(n: object, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _explain(args: argparse.Namespace, err: BarnumError) -> str:
    """A SQL rule's message, pointed at the flag that carries the bad value."""
    field = err.detail.get("field")
    if field == "force":
        n = err.detail.get("queued")
        return (f"endpoint {args.name!r} has {_plural(n, 'queued delivery', 'queued deliveries')}; "
                f"pass --force to also drop {'its queued delivery' if n == 1 else f'its {n} queued deliveries'}, "
                f"or disable it instead (barnum endpoints disable {args.name})")
    if field == "event_types" and "pattern" in err.detail:
        known = err.detail.get("known")
        listed = ", ".join(str(k) for k in known) if isinstance(known, list) else "?"
        return (f"--events: {err.detail['pattern']!r} matches no known event type "
                f"(known: {listed}; globs such as appointment.* or * are fine)")
    flag = FLAGS.get(str(field)) if field is not None else None
    return f"{flag}: {err.message}" if flag else err.message


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
        rows = await store.endpoint_list(conn)
        _emit(rows, args.json, lambda r: _table(
            [dict(x, event_types=",".join(x["event_types"])) for x in r],
            ["name", "url", "status", "event_types", "has_secret", "max_attempts", "timeout_ms"])
            if r else "no endpoints (add one: barnum endpoints add NAME URL)")
        return EXIT_OK
    if action == "add":
        types = [t.strip() for t in args.events.split(",") if t.strip()]
        max_attempts = _int4("--max-attempts", args.max_attempts)
        timeout_ms = _int4("--timeout-ms", args.timeout_ms)
        try:
            doc = await store.endpoint_add(conn, args.name, args.url, args.secret, types,
                                           max_attempts, timeout_ms, args.allow_http)
        except asyncpg.PostgresError as exc:
            err = barnum_error(exc)
            if err is not None and not args.allow_http and await _only_http_refused(conn, args.url, err):
                raise UsageError(
                    f"{args.url}: plain http is only allowed to this machine (localhost, 127.0.0.1, [::1]);"
                    " use https:// or pass --allow-http") from None
            raise
        print(f"added endpoint {doc['name']} → {doc['url']}")
        return EXIT_OK
    if action == "add-whatsapp":
        templates: dict[str, dict[str, str]] = {}
        for spec in args.template:
            event, _, rest = spec.partition("=")
            name, _, language = rest.partition(":")
            if not event or not name:
                raise UsageError(f"--template must be EVENT=NAME[:LANG], got {spec!r}")
            templates[event.strip()] = {"name": name.strip(), "language": language.strip() or "pt_PT"}
        try:
            doc = await store.endpoint_add_whatsapp(
                conn, args.name, args.phone_number_id, args.token_env, args.graph_url,
                args.account, [t.strip() for t in args.events.split(",") if t.strip()], templates,
                args.allow_http)
        except asyncpg.PostgresError as exc:
            err = barnum_error(exc)
            url = f"{args.graph_url.rstrip('/')}/{args.phone_number_id}/messages"
            if err is not None and not args.allow_http and await _only_http_refused(conn, url, err):
                raise UsageError(f"{args.graph_url}: plain http is only allowed to this machine; "
                                 "use https:// or pass --allow-http") from None
            raise
        print(f"added WhatsApp sender {doc['name']} → {doc['url']} (token from ${doc['token_env']})")
        return EXIT_OK
    if action in ("enable", "disable"):
        doc = await store.endpoint_set_active(conn, args.name, action == "enable")
        print(f"endpoint {doc['name']} {'enabled' if doc['is_active'] else 'disabled'}")
        return EXIT_OK
    doc = await store.endpoint_remove(conn, args.name, args.force)
    print(f"removed endpoint {doc['name']}"
          + (f" (dropped {doc['dropped_queued']} queued deliveries)" if doc["dropped_queued"] else ""))
    return EXIT_OK


async def _only_http_refused(conn: asyncpg.Connection, url: str, err: BarnumError) -> bool:
    """Was ``err`` the URL rule refusing plain http?  Asked of the rule itself:
    it raises this very error without allow_http and passes with it — so the
    message SQL gives other callers is compared, never parsed."""
    try:
        await store.check_receiver_url(conn, url, False)
        return False
    except asyncpg.PostgresError as exc:
        same = barnum_error(exc)
        if same is None:
            raise
        if (same.code, same.message) != (err.code, err.message):
            return False
    try:
        await store.check_receiver_url(conn, url, True)
        return True
    except asyncpg.PostgresError as exc:
        if barnum_error(exc) is None:
            raise
        return False


def configure_endpoints(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="endpoints_action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="list webhook endpoints")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    add = sub.add_parser("add", help="add a webhook endpoint")
    add.add_argument("name")
    add.add_argument("url", help="https URL ({event_type} is replaced per event); http only for loopback")
    add.add_argument("--secret", default=None, help="per-endpoint HMAC secret (default: WEBHOOK_SECRET)")
    add.add_argument("--events", default="*",
                     help="comma-separated event types or globs: appointment.*, patient.reactivation, … (default: *)")
    add.add_argument("--max-attempts", type=int, default=None)
    add.add_argument("--timeout-ms", type=int, default=10000)
    add.add_argument("--allow-http", action="store_true", help="allow plain http to a non-loopback host")
    wa = sub.add_parser("add-whatsapp", help="add a native WhatsApp sender (Graph API, no n8n)")
    wa.add_argument("name")
    wa.add_argument("--phone-number-id", required=True, help="the sending number's phone_number_id (Meta)")
    wa.add_argument("--token-env", default="WHATSAPP_TOKEN",
                    help="the relay's environment variable holding the access token (default: WHATSAPP_TOKEN)")
    wa.add_argument("--graph-url", default="https://graph.facebook.com/v21.0", help="Graph API base URL")
    wa.add_argument("--account", default="default")
    wa.add_argument("--events", default="appointment.*,patient.reactivation,message.send",
                    help="what it sends (default: appointment.*,patient.reactivation,message.send)")
    wa.add_argument("--template", action="append", default=[], metavar="EVENT=NAME[:LANG]",
                    help="an approved template for an event type, e.g. appointment.reminder=reminder_v2:pt_PT")
    wa.add_argument("--allow-http", action="store_true", help="allow a plain-http Graph URL (tests)")
    for name in ("enable", "disable"):
        sp = sub.add_parser(name, help=f"{name} an endpoint")
        sp.add_argument("name")
    rm = sub.add_parser("remove", help="remove an endpoint")
    rm.add_argument("name")
    rm.add_argument("--force", action="store_true", help="also drop its queued deliveries")


# ------------------------------------------------------------------ dlq


async def _dlq(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    if args.dlq_action == "list":
        rows = await store.dlq_list(conn, _int4("--limit", args.limit))
        _emit(rows, args.json, lambda r: _table(
            r, ["event_id", "event_type", "endpoint", "attempts", "last_http_status", "last_error", "created_at"])
            if r else "no dead letters")
        return EXIT_OK
    if not args.all and args.event is None:
        raise UsageError("say which: --event ID or --all")
    n = await store.dlq_retry(conn, None if args.all else _event_id(args.event))
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


# ------------------------------------------------------------------ accounts, API tokens


async def _accounts(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    if args.accounts_action == "add":
        doc = await store.account_add(conn, args.name)
        print(f"added account {doc['name']} ({doc['id']}); give it an API token: "
              f"barnum tokens create --account {doc['name']} --name NAME")
        return EXIT_OK
    rows = await store.account_list(conn)
    _emit(rows, args.json, lambda r: _table(r, ["name", "id", "endpoints", "active_tokens", "created_at"]))
    return EXIT_OK


def configure_accounts(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="accounts_action", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="add an account (a client of the management API)")
    add.add_argument("name", help="1–64 of A-Z a-z 0-9 _ . -")
    ls = sub.add_parser("list", help="list accounts")
    ls.add_argument("--json", action="store_true")


async def _tokens(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    action = args.tokens_action
    if action == "create":
        scopes = [x.strip() for x in args.scopes.split(",") if x.strip()] if args.scopes else None
        doc = await store.token_create(conn, args.account, args.name, scopes)
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            # The only time the plain token exists: only its SHA-256 is stored.
            print(doc["token"])
            print(f"token {doc['id']} for account {doc['account']} ({','.join(doc['scopes'])}); "
                  "store it now, it cannot be shown again", file=sys.stderr)
        return EXIT_OK
    if action == "list":
        rows = await store.token_list(conn, args.account)
        _emit(rows, args.json, lambda r: _table(
            [dict(x, scopes=",".join(x["scopes"])) for x in r],
            ["id", "account", "name", "scopes", "created_at", "last_used_at", "revoked_at"])
            if r else "no API tokens (create one: barnum tokens create --account NAME --name NAME)")
        return EXIT_OK
    doc = await store.token_revoke(conn, args.id)
    print(f"revoked token {doc['id']} ({doc['name']}, account {doc['account']})")
    return EXIT_OK


def configure_tokens(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokens_action", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="create an API token (printed once)")
    create.add_argument("--account", required=True, help="the account it acts for (barnum accounts list)")
    create.add_argument("--name", required=True, help="what it is for, e.g. the client's system")
    create.add_argument("--scopes", help="comma-separated: webhooks:read,webhooks:write (default both)")
    create.add_argument("--json", action="store_true", help="print the token and its description as JSON")
    ls = sub.add_parser("list", help="list API tokens (never the tokens themselves)")
    ls.add_argument("--account", help="only this account's")
    ls.add_argument("--json", action="store_true")
    rv = sub.add_parser("revoke", help="revoke a token: it stops working at once")
    rv.add_argument("id", help="the token's id (barnum tokens list)")


# ------------------------------------------------------------------ WhatsApp numbers


async def _numbers(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    action = args.numbers_action
    if action == "add":
        doc = await store.number_add(conn, args.phone_number_id, args.account, args.display)
        print(f"routing phone_number_id {doc['phone_number_id']} to account {doc['account']}")
        return EXIT_OK
    if action == "list":
        rows = await store.number_list(conn)
        _emit(rows, args.json, lambda r: _table(r, ["phone_number_id", "account", "display_phone_number", "created_at"])
              if r else "no WhatsApp numbers (route one: barnum numbers add PHONE_NUMBER_ID --account NAME)")
        return EXIT_OK
    doc = await store.number_remove(conn, args.phone_number_id)
    print(f"removed phone_number_id {doc['removed']}")
    return EXIT_OK


def configure_numbers(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="numbers_action", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="route a WhatsApp number's webhooks to an account")
    add.add_argument("phone_number_id", help="the number's phone_number_id in Meta's WhatsApp Manager")
    add.add_argument("--account", default="default", help="the account that owns it (default: default)")
    add.add_argument("--display", help="the number as people dial it, e.g. +1 555 078 3881")
    ls = sub.add_parser("list", help="list routed numbers")
    ls.add_argument("--json", action="store_true")
    rm = sub.add_parser("remove", help="stop routing a number (its notifications become unrouted)")
    rm.add_argument("phone_number_id")


# ------------------------------------------------------------------ flows


async def _flows(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    action = args.flows_action
    if action == "import":
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror or exc}") from None
        try:
            json.loads(text)
        except ValueError as exc:
            raise UsageError(f"{args.file} is not JSON: {exc}") from None
        rows = await store.flow_import(conn, args.account, text)
        for row in rows:
            print(f"imported flow {row['name']} (trigger {row['trigger']!r}, {row['nodes']} nodes, {row['status']})")
        return EXIT_OK
    if action == "list":
        rows = await store.flow_list(conn, args.account)
        _emit(rows, args.json, lambda r: _table(
            [dict(x, sessions=",".join(f"{k}:{v}" for k, v in (x["sessions"] or {}).items())) for x in r],
            ["account", "name", "trigger", "status", "nodes", "sessions", "updated_at"])
            if r else "no flows (import one: barnum flows import FILE.json)")
        return EXIT_OK
    doc = await store.flow_set_status(conn, args.account, args.name,
                                      "Active" if action == "enable" else "Inactive")
    print(f"flow {doc['name']} is {doc['status']}")
    return EXIT_OK


def configure_flows(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="flows_action", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="create or replace flows from a JSON file (a flow or an array)")
    imp.add_argument("file", help="JSON: {name, trigger, status?, definition} or a list of them")
    imp.add_argument("--account", default="default", help="the account the flows belong to (default: default)")
    ls = sub.add_parser("list", help="list flows with their sessions by status")
    ls.add_argument("--account", help="only this account's")
    ls.add_argument("--json", action="store_true")
    for name in ("enable", "disable"):
        sp = sub.add_parser(name, help=f"{name} a flow (new triggers only; open sessions go on)")
        sp.add_argument("name")
        sp.add_argument("--account", default="default")


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
    lines.append(_table(eps, ["name", "status", "pending", "dead_letter",
                              "attempts_last_hour", "success_rate_last_hour", "url"])
                 if eps else "no endpoints")
    # An endpoint switched off by its failures says why, one line each.
    lines += [f"! endpoint {e['name']} is {e['status']}: {e['disabled_reason']}"
              for e in doc["endpoints"] if e.get("status") == "failed" and e.get("disabled_reason")]
    return "\n".join(lines)


async def _status(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    doc = await store.status_report(conn)
    _emit(doc, args.json, _render_status)
    return EXIT_OK


def configure_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


# ------------------------------------------------------------------ settings


async def _settings(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    if args.settings_action == "get":
        doc = await store.get_settings(conn)
        if args.key:
            if args.key not in doc:
                raise UsageError(f"unknown setting {args.key!r} (known: {', '.join(sorted(doc))})")
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
    stored = await store.set_setting(conn, args.key, value)
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
    "accounts": _accounts,
    "numbers": _numbers,
    "flows": _flows,
    "tokens": _tokens,
    "status": _status,
    "settings": _settings,
}


def run(command: str, url: str, args: argparse.Namespace) -> int:
    """Run one operator command against ``url``; bad input → one line, exit 2."""
    action = getattr(args, f"{command}_action", None)
    who = f"barnum {command}" + (f" {action}" if action else "")

    async def go() -> int:
        conn = await asyncpg.connect(url)
        try:
            return await HANDLERS[command](conn, args)
        finally:
            await conn.close()

    def say(message: object) -> None:
        print(f"{who}: {' '.join(str(message).split())}", file=sys.stderr)

    try:
        return asyncio.run(go())
    except UsageError as exc:
        say(exc)
        return EXIT_INPUT
    except asyncpg.PostgresError as exc:
        err = barnum_error(exc)
        if err is not None:
            say(_explain(args, err))
        elif (getattr(exc, "sqlstate", "") or "").startswith("22"):  # data exception: bad input
            # A server-side message, or the driver's own (which has no
            # .message but says which argument and why in str()).
            say(f"invalid value: {getattr(exc, 'message', None) or exc}")
        else:
            say(f"database error: {exc}")
            return EXIT_FAILURE
        return EXIT_INPUT
    except (OverflowError, ValueError) as exc:
        say(f"invalid value: {exc}")
        return EXIT_INPUT
    except (OSError, asyncpg.InterfaceError) as exc:
        say(f"cannot reach the database: {exc}")
        return EXIT_FAILURE

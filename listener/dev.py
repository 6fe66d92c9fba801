"""``barnum dev``: the whole system on one machine, for trying it out.

An embedded PostgreSQL under ``./.barnum/`` (local server binaries when
present, else the ``pgserver`` package), migrations, a demo clinic with one
appointment, a demo endpoint served in-process that prints each outgoing
message as the patient would read it, and the relay + shim in one loop.
Ctrl-C stops everything, Postgres included; the next run reuses the data,
PostgreSQL's port (``./.barnum/port``, so the database URL stays the same)
and re-prints, with fresh links, the messages still awaiting an answer.
``--reset`` starts over; ``--print-url`` prints the database URL for psql.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
from aiohttp import web

from listener import logs, migrate, queries, relay, signing
from listener.config import Config, load
from listener.pgcluster import EmbeddedServer, LocalCluster, PgClusterError, dev_server, free_port
from listener.run import event_loop_runner, run_together

DB_NAME = "barnum"

# What the patient reads, per event type and locale.  The real wording lives
# in n8n's WhatsApp templates (integrations/n8n); this is the demo's preview.
# Specialty and professional are optional on an appointment, so the texts
# take them as phrases ({a_appt}, {appt}, {with_}) that read naturally
# whichever are missing (see _phrases): never "consulta de  com  a".
TEXTS: dict[str, dict[str, str]] = {
    "pt": {
        "appointment.pre_confirmed": "Olá {first}! Tem {a_appt}{with_} a {date} às {time}. Confirma?",
        "appointment.reminder": "Olá {first}! Lembrete: {appt} amanhã, {date} às {time}{with_}.",
        "appointment.no_show": "Olá {first}, sentimos a sua falta hoje. Quer marcar outra data?",
        "appointment.completed": "Obrigado pela visita, {first}! Pode avaliar a consulta de 1 a 5?",
        "appointment.confirmed": "Consulta confirmada: {date} às {time}{with_}. Até lá!",
        "appointment.cancelled": "A sua consulta de {date} às {time} foi cancelada.",
        "appointment.rescheduled": "A sua consulta passou para {date} às {time}{with_}. Confirma?",
        "appointment.reschedule_requested": "Recebemos o seu pedido de reagendamento; vamos contactá-lo.",
        "patient.reactivation": "Olá {first}! Já passou algum tempo desde a última visita. Quer marcar uma consulta?",
    },
    "en": {
        "appointment.pre_confirmed": "Hi {first}! You have {a_appt}{with_} on {date} at {time}. Can you confirm?",
        "appointment.reminder": "Hi {first}! Reminder: your {appt} tomorrow, {date} at {time}{with_}.",
        "appointment.no_show": "Hi {first}, we missed you today. Would you like another date?",
        "appointment.completed": "Thanks for visiting, {first}! Would you rate the appointment from 1 to 5?",
        "appointment.confirmed": "Appointment confirmed: {date} at {time}{with_}. See you then!",
        "appointment.cancelled": "Your appointment on {date} at {time} was cancelled.",
        "appointment.rescheduled": "Your appointment moved to {date} at {time}{with_}. Can you confirm?",
        "appointment.reschedule_requested": "We got your request to reschedule; we will contact you.",
        "patient.reactivation": "Hi {first}! It has been a while since your last visit. Would you like to book one?",
    },
}


def _phrases(locale: str, specialty: str, professional: str) -> dict[str, str]:
    """The appointment as phrases: with its specialty ("consulta de X") or
    without ("uma consulta"), " com Dr. Y" or nothing."""
    if locale == "en":
        appt = f"{specialty} appointment" if specialty else "appointment"
        article = "an" if appt[0].lower() in "aeiou" else "a"
        return {"appt": appt, "a_appt": f"{article} {appt}",
                "with_": f" with {professional}" if professional else ""}
    return {"appt": f"consulta de {specialty}" if specialty else "consulta",
            "a_appt": f"consulta de {specialty}" if specialty else "uma consulta",
            "with_": f" com {professional}" if professional else ""}


LINK_LABELS = {
    "pt": {"confirm": "✓ Confirmar", "cancel": "✗ Cancelar", "reschedule": "↻ Reagendar"},
    "en": {"confirm": "✓ Confirm", "cancel": "✗ Cancel", "reschedule": "↻ Reschedule"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reset", action="store_true", help="delete ./.barnum (database included) and start over")
    parser.add_argument("--host", default=None, help="shim address (default: $BARNUM_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="shim port (default: $BARNUM_PORT or 8000; a free one if taken)")
    parser.add_argument("--print-url", action="store_true",
                        help='print the demo database URL and exit: psql "$(barnum dev --print-url)"')


def render_message(payload: dict[str, Any], locale: str) -> str:
    """One outgoing message as the patient would read it: text + action links."""
    locale = locale if locale in TEXTS else "pt"
    texts = TEXTS[locale]
    appt = payload.get("appointment") or {}
    person = appt.get("patient") or payload.get("patient") or {}
    name = str(person.get("name") or "")
    fields = {
        "first": name.split(" ")[0] if name else "",
        "date": appt.get("date", ""),
        "time": appt.get("time", ""),
        **_phrases(locale,
                   str((appt.get("specialty") or {}).get("name") or "").strip(),
                   str((appt.get("professional") or {}).get("name") or "").strip()),
    }
    event_type = str(payload.get("event_type", ""))
    text = texts.get(event_type, event_type).format(**fields)
    lines = [f"📱 WhatsApp → {name} ({person.get('phone', '')})  [{event_type}]", f"   {text}"]
    labels = LINK_LABELS.get(locale, LINK_LABELS["pt"])
    links = payload.get("action_links") or {}
    for kind in sorted(links, key=lambda k: (list(labels).index(k) if k in labels else 99, k)):
        lines.append(f"   {labels.get(kind, kind)}: {links[kind]}")
    return "\n".join(lines)


class DemoEndpoint:
    """The demo's webhook receiver: verifies the signature like n8n would,
    then prints the message."""

    def __init__(self, keys: list[bytes], locale: str) -> None:
        self.keys = keys
        self.locale = locale
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not signing.verify_hex(self.keys, body, request.headers.get("X-Webhook-Signature")):
            print("📵 demo endpoint: rejected a message with a bad signature", flush=True)
            return web.json_response({"error": "bad signature"}, status=401)
        print("\n" + render_message(json.loads(body), self.locale) + "\n", flush=True)
        return web.json_response({"received": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/demo", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/demo"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _secrets(base: Path) -> dict[str, str]:
    """The demo's own secrets, generated once and kept in ./.barnum (0600)."""
    path = base / "secrets.json"
    if path.exists():
        data: dict[str, str] = json.loads(path.read_text())
        return data
    data = {"webhook_secret": secrets.token_urlsafe(32), "internal_api_secret": secrets.token_urlsafe(32)}
    base.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps(data))
    return data


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        # As servers bind (PostgreSQL, uvicorn): a port whose last connections
        # linger in TIME_WAIT after a stop is free, one with a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _reset(project: Path) -> None:
    server = dev_server(project)
    if isinstance(server, LocalCluster):
        if server.is_running:
            server.stop()
        shutil.rmtree(server.data_dir.parent, ignore_errors=True)
    shutil.rmtree(project / ".barnum", ignore_errors=True)
    print("barnum dev: removed the demo database and secrets; starting over", flush=True)


def _saved_port(base: Path) -> int | None:
    try:
        return int((base / "port").read_text().strip())
    except (OSError, ValueError):
        return None


def _choose_pg_port(server: LocalCluster, saved: int | None) -> None:
    """Start on the port of the earlier runs when it is free, so the URL the
    user keeps in psql history or a .env stays right."""
    if saved is not None and not server.is_running and _port_free(server.host, saved):
        server.port = saved


def _remember(base: Path, server: LocalCluster | EmbeddedServer, saved: int | None, dsn: str) -> None:
    """Keep the port and URL for the next run and for --print-url."""
    base.mkdir(parents=True, exist_ok=True)
    if isinstance(server, LocalCluster):
        if saved is not None and server.port != saved:
            print(f"barnum dev: PostgreSQL's port {saved} (kept in .barnum/port) is taken; "
                  f"using {server.port} from now on — the database URL changed", flush=True)
        (base / "port").write_text(f"{server.port}\n")
    (base / "database_url").write_text(dsn + "\n")


def _print_url(base: Path) -> int:
    try:
        dsn = (base / "database_url").read_text().strip()
    except OSError:
        print("barnum dev: no demo database in this directory yet; run `barnum dev` first", file=sys.stderr)
        return 1
    print(dsn)
    try:
        psycopg.connect(dsn, connect_timeout=2).close()
    except psycopg.Error:
        print("barnum dev: (PostgreSQL is not running now: start `barnum dev` in another terminal)",
              file=sys.stderr)
    return 0


def _ensure_database(admin_dsn: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{DB_NAME}"')


def main(args: argparse.Namespace, env_config: Config | None = None) -> int:
    project = Path.cwd()
    base = project / ".barnum"
    if args.print_url:
        return _print_url(base)
    saved_port = _saved_port(base)  # kept across --reset too: same URL
    base_config = env_config or load()
    if base_config.log_level == "INFO" and "BARNUM_LOG_LEVEL" not in os.environ:
        level = "WARNING"  # keep the terminal for the messages
    else:
        level = base_config.log_level
    logs.setup(level)
    if args.reset:
        _reset(project)
    try:
        server: LocalCluster | EmbeddedServer = dev_server(project)
        print(f"barnum dev: starting PostgreSQL ({'local binaries' if isinstance(server, LocalCluster) else 'embedded pgserver'})…", flush=True)
        if isinstance(server, LocalCluster):
            _choose_pg_port(server, saved_port)
        server.start()
    except PgClusterError as exc:
        print(f"barnum dev: {exc}", file=sys.stderr)
        return 1
    try:
        _ensure_database(server.admin_dsn)
        dsn = server.dsn(DB_NAME)
        _remember(base, server, saved_port, dsn)
        report = migrate.migrate(dsn)
        print(f"barnum dev: {report.summary()}", flush=True)
        kept = _secrets(base)
        keys = base_config.webhook_secrets or signing.parse_secrets(kept["webhook_secret"])
        host = args.host or base_config.host
        port = args.port if args.port is not None else base_config.port
        if not _port_free(host, port):
            taken, port = port, free_port(host)
            print(f"barnum dev: port {taken} is taken, using {port}", flush=True)
        config = Config(
            database_url=dsn,
            webhook_secrets=keys,
            internal_api_secret=base_config.internal_api_secret or kept["internal_api_secret"],
            public_url=base_config.public_url or f"http://{host}:{port}",
            host=host,
            port=port,
            log_level=level,
        )
        with event_loop_runner() as runner:
            return runner.run(_serve(config, dsn))
    finally:
        server.stop()
        print("barnum dev: stopped (PostgreSQL too); run again to pick up where you left off", flush=True)


async def _serve(config: Config, dsn: str) -> int:
    # Links rendered here must point at this run's shim, like the relay's.
    conn = await asyncpg.connect(dsn, server_settings={"barnum.public_base_url": config.public_url or ""})
    try:
        shim_conf = json.loads(await conn.fetchval(queries.SHIM_CONFIG))
        locale = str(shim_conf.get("locale", "pt"))
        demo = DemoEndpoint(config.webhook_secrets, locale)
        await demo.start()
        await conn.fetchval(queries.UPSERT_ENDPOINT, "demo", demo.url)
        seeded = await conn.fetchval(queries.DEMO_SEED)
        # The links printed in an earlier run are gone from the terminal, may
        # name an earlier shim port, and cannot be shown again (only their
        # hashes are stored): show what still awaits an answer, freshly linked.
        awaiting: list[dict[str, Any]] = [] if seeded else json.loads(
            await conn.fetchval(queries.REISSUE_AWAITING_LINKS))
    finally:
        await conn.close()

    async def banner() -> None:
        base = f"http://{config.host}:{config.port}"
        print("\n".join([
            "",
            "Barnum is running.",
            f"  shim (action links, callbacks): {base}   health: {base}/healthz   API: {base}/openapi.json",
            f"  database:  psql '{dsn}'   (later: psql \"$(barnum dev --print-url)\")",
            f"  demo endpoint: {demo.url} (prints each message below)",
            "  " + ("seeded a demo clinic and one appointment in two days at 10:00: its message follows"
                    if seeded else "reusing the demo data from an earlier run"),
            "  open a ✓/✗/↻ link below in a browser; add appointments with psql to see more (README: barnum dev)",
            "  Ctrl-C stops everything.",
            "",
        ]), flush=True)
        if awaiting:
            print(f"Still awaiting the patient's answer from an earlier run ({len(awaiting)}), with fresh links"
                  " (the earlier links stay valid too):\n", flush=True)
            for payload in awaiting:
                print(render_message(payload, locale) + "\n", flush=True)

    options = relay.Options(sweep_interval=2.0, grace=5.0)
    try:
        return await run_together(config, options, config.host, config.port, on_ready=banner)
    finally:
        await demo.stop()

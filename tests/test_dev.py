"""``barnum dev`` end to end: a subprocess in a fresh directory, as a new user
would run it — message printed with links, the confirm link works, Ctrl-C
stops everything, the next run reuses the data (and PostgreSQL's port, and
re-prints what still awaits an answer with fresh links), ``--reset`` starts
over; ``--whatsapp`` closes the loop without n8n (message sent to the fake
Graph API, a tap posts the signed button reply, the appointment is
confirmed); plus the demo's message wording."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from listener.dev import phone_view, reissued, render_message
from tests.helpers import wait_until
from tests.pgcluster import free_port

BARNUM = str(Path(sys.executable).parent / "barnum")
CONFIRM = re.compile(r"(http://127\.0\.0\.1:\d+/api/action\?type=confirm&token=[A-Za-z0-9_-]+)")
DSN = re.compile(r"psql '([^']+)'")
REPRINTED = re.compile(r"Still awaiting[^\n]*\n[\s\S]*?" + CONFIRM.pattern)
TAP = re.compile(r"▸ Confirmar: (http://127\.0\.0\.1:\d+/tap/(wamid\.DEV[A-F0-9]+)/\d+)")


def pg_port(dsn: str) -> int:
    m = re.search(r"@127\.0\.0\.1:(\d+)/", dsn)
    assert m, dsn
    return int(m.group(1))


def relay_started(dsn: str) -> None:
    """The relay (and with it the handling of Ctrl-C) starts just after the
    banner; its first connection shows it is up."""
    def connected() -> bool:
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'barnum-relay'").fetchone()
        return row is not None and row[0] > 0

    wait_until(connected, timeout=30)


def print_url(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run([BARNUM, "dev", "--print-url"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=30, check=False)


class DevProcess:
    """``barnum dev`` running in ``cwd``; its output collected line by line."""

    def __init__(self, cwd: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("DATABASE_URL", "WEBHOOK_SECRET", "BARNUM_PORT", "BARNUM_LOG_LEVEL")}
        self.port = free_port()
        self.proc = subprocess.Popen(
            [BARNUM, "dev", "--port", str(self.port), *args], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = pattern.search("\n".join(self.lines))
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"{pattern.pattern!r} not in output:\n" + "\n".join(self.lines))
                self._cond.wait(min(left, 0.5))

    def interrupt(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    # Like a fresh clone: an empty directory the user runs `barnum dev` in.
    d = tmp_path / "clinic"
    d.mkdir()
    yield d
    # As root the cluster may live in /var/tmp/barnum-<hash of the project
    # path> (when postgres cannot reach the project): don't leave it behind.
    fallback = Path("/var/tmp") / f"barnum-{hashlib.sha256(str(d.resolve()).encode()).hexdigest()[:12]}"
    for data in (d / ".barnum" / "pgdata", fallback / "pgdata"):
        _stop_postmaster(data)
    shutil.rmtree(fallback, ignore_errors=True)


def _stop_postmaster(data: Path) -> None:
    """A PostgreSQL a killed `barnum dev` left running in ``data``: stop it
    (SIGQUIT, immediate shutdown) and wait for it to go."""
    try:
        pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, signal.SIGQUIT)
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.05)  # wait-ok: polling a process's exit with a deadline


def test_dev_prints_the_message_and_its_link_confirms(project: Path) -> None:
    dev = DevProcess(project)
    try:
        link = dev.wait_for(CONFIRM).group(1)
        dsn = dev.wait_for(DSN).group(1)
        assert "appointment.pre_confirmed" in dev.output
        assert "João Silva" in dev.output
        assert f"127.0.0.1:{dev.port}" in link

        page = httpx.get(link, timeout=10)
        assert page.status_code == 200
        with psycopg.connect(dsn) as conn:
            status = conn.execute("SELECT status::text FROM barnum.appointments").fetchone()
        assert status == ("scheduled",), "a GET must not act"

        done = httpx.post(link, timeout=10)
        assert done.status_code == 200
        with psycopg.connect(dsn) as conn:
            status = conn.execute("SELECT status::text FROM barnum.appointments").fetchone()
        assert status == ("confirmed",)
        # The confirmation itself goes out as a message too.
        dev.wait_for(re.compile(r"\[appointment\.confirmed\]"))

        assert dev.interrupt() == 0
    finally:
        dev.kill()
    assert "stopped" in dev.output
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=3).close()  # Postgres stopped with it


def test_dev_reuses_its_data_and_reset_starts_over(project: Path) -> None:
    assert print_url(project).returncode == 1  # nothing here yet: says so

    first = DevProcess(project)
    try:
        old_link = first.wait_for(CONFIRM).group(1)
        dsn = first.wait_for(DSN).group(1)

        def delivered() -> bool:
            with psycopg.connect(dsn) as conn:
                row = conn.execute("SELECT status FROM barnum.whatsapp_workflows").fetchone()
            return row == ("sent",)

        wait_until(delivered, timeout=30)
        assert first.interrupt() == 0
    finally:
        first.kill()
    # The URL for psql, also while stopped (it stays the same across runs).
    shown = print_url(project)
    assert shown.returncode == 0 and shown.stdout.strip() == dsn
    assert "not running" in shown.stderr
    assert (project / ".barnum" / "port").read_text().strip() == str(pg_port(dsn))

    again = DevProcess(project)
    try:
        again.wait_for(re.compile(r"reusing the demo data"))
        dsn2 = again.wait_for(DSN).group(1)
        assert dsn2 == dsn, "PostgreSQL's port changed between runs"
        assert print_url(project).stdout.strip() == dsn
        # The unanswered confirmation request is shown again, with a fresh
        # link (the old one was minted in the first run, only its hash kept).
        fresh = again.wait_for(REPRINTED).group(1)
        assert fresh != old_link
        assert f"127.0.0.1:{again.port}" in fresh
        assert "João Silva" in again.output.split("Still awaiting", 1)[1]
        with psycopg.connect(dsn2) as conn:
            assert conn.execute("SELECT count(*) FROM barnum.appointments").fetchone() == (1,)
        assert httpx.post(fresh, timeout=10).status_code == 200
        with psycopg.connect(dsn2) as conn:
            assert conn.execute("SELECT status::text FROM barnum.appointments").fetchone() == ("confirmed",)
        relay_started(dsn2)
        assert again.interrupt() == 0
    finally:
        again.kill()

    # Answered: nothing left to re-print on the next start.
    third = DevProcess(project)
    try:
        third.wait_for(re.compile(r"reusing the demo data"))
        third.wait_for(re.compile(r"Ctrl-C stops everything"))
        relay_started(dsn)
        assert third.interrupt() == 0
    finally:
        third.kill()
    assert "Still awaiting" not in third.output

    # --reset starts over, on the same port when free; taken → another, said so.
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
        squatter.bind(("127.0.0.1", pg_port(dsn)))
        squatter.listen()
        fresh_run = DevProcess(project, "--reset")
        try:
            fresh_run.wait_for(re.compile(r"starting over"))
            fresh_run.wait_for(re.compile(rf"port {pg_port(dsn)} \(kept in \.barnum/port\) is taken"))
            fresh_run.wait_for(re.compile(r"seeded a demo clinic"))
            dsn3 = fresh_run.wait_for(DSN).group(1)
            fresh_run.wait_for(CONFIRM)
            assert fresh_run.interrupt() == 0
        finally:
            fresh_run.kill()
    assert pg_port(dsn3) != pg_port(dsn)
    assert (project / ".barnum" / "port").read_text().strip() == str(pg_port(dsn3))


def test_dev_whatsapp_closes_the_loop_without_n8n(project: Path) -> None:
    dev = DevProcess(project, "--whatsapp")
    try:
        tap_link, wamid = dev.wait_for(TAP).groups()
        dsn = dev.wait_for(DSN).group(1)
        request = dev.output.split("📱 WhatsApp → +351912345678  [interactive]", 1)[1]
        assert "Olá João!" in request and "Confirma?" in request
        assert "▸ Cancelar:" in request and "▸ Reagendar:" in request
        assert "/demo" not in dev.output, "the webhook demo endpoint must not print the message too"

        def recorded() -> bool:
            # The relay sent it natively: once it records Graph's answer, the
            # fake's wamid is on the outbound message.
            with psycopg.connect(dsn) as conn:
                return conn.execute("SELECT direction FROM barnum.messages WHERE wa_message_id = %s",
                                    (wamid,)).fetchone() == ("outbound",)

        wait_until(recorded, timeout=30)
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT status::text FROM barnum.appointments").fetchone() == ("scheduled",)

        page = httpx.get(tap_link, timeout=10)  # the patient taps "Confirmar"
        assert page.status_code == 200
        assert "Barnum answered <b>200</b>" in page.text and "&quot;acted&quot;: 1" in page.text

        def confirmed() -> bool:
            with psycopg.connect(dsn) as conn:
                return conn.execute("SELECT status::text FROM barnum.appointments").fetchone() == ("confirmed",)

        wait_until(confirmed, timeout=30)
        dev.wait_for(re.compile(r"tapped “Confirmar” on \+351912345678 → POST /whatsapp/webhook: 200"))
        # The confirmation goes out as a WhatsApp text, printed too.
        dev.wait_for(re.compile(r"\[text\]\n\s+Obrigado, João! [^\n]* está confirmada\."))
        # An unknown tap is a 404 page, and nothing was posted for it.
        assert httpx.get(tap_link.rsplit("/", 1)[0] + "/9", timeout=10).status_code == 404
        assert dev.interrupt() == 0
    finally:
        dev.kill()
    assert "stopped" in dev.output


def with_names(event_type: str, specialty: str | None, professional: str | None) -> dict[str, Any]:
    """A payload as the relay renders it, specialty/professional possibly NULL."""
    return {
        "event_type": event_type,
        "appointment": {"date": "2026-11-26", "time": "10:00",
                        "patient": {"name": "Ana Costa", "phone": "+351911111111"},
                        "professional": {"name": professional}, "specialty": {"name": specialty}},
        "action_links": {"confirm": "http://127.0.0.1:8000/api/action?type=confirm&token=x"},
    }


@pytest.mark.parametrize(("locale", "specialty", "professional", "text"), [
    ("pt", None, None, "Olá Ana! Tem uma consulta a 2026-11-26 às 10:00. Confirma?"),
    ("pt", "Ortopedia", None, "Olá Ana! Tem consulta de Ortopedia a 2026-11-26 às 10:00. Confirma?"),
    ("pt", None, "Dr. Rui", "Olá Ana! Tem uma consulta com Dr. Rui a 2026-11-26 às 10:00. Confirma?"),
    ("pt", "Ortopedia", "Dr. Rui",
     "Olá Ana! Tem consulta de Ortopedia com Dr. Rui a 2026-11-26 às 10:00. Confirma?"),
    ("en", None, None, "Hi Ana! You have an appointment on 2026-11-26 at 10:00. Can you confirm?"),
    ("en", "Dentistry", None, "Hi Ana! You have a Dentistry appointment on 2026-11-26 at 10:00. Can you confirm?"),
    ("en", None, "Dr. Rui", "Hi Ana! You have an appointment with Dr. Rui on 2026-11-26 at 10:00. Can you confirm?"),
])
def test_demo_message_reads_well_without_specialty_or_professional(
        locale: str, specialty: str | None, professional: str | None, text: str) -> None:
    lines = render_message(with_names("appointment.pre_confirmed", specialty, professional), locale).splitlines()
    assert lines[1].strip() == text


@pytest.mark.parametrize("locale", ["pt", "en"])
@pytest.mark.parametrize("event_type", ["appointment.reminder", "appointment.confirmed", "appointment.rescheduled"])
def test_demo_messages_have_no_holes(locale: str, event_type: str) -> None:
    text = render_message(with_names(event_type, None, None), locale).splitlines()[1]
    assert "  " not in text.strip() and " ." not in text and " ," not in text, text
    assert "2026-11-26" in text and "10:00" in text


def test_the_fake_phone_taps_lists_and_template_quick_replies_as_meta_posts_them() -> None:
    listed = {"messaging_product": "whatsapp", "to": "351911111111", "type": "interactive", "interactive": {
        "type": "list", "body": {"text": "Escolha"}, "action": {"button": "Opções", "sections": [
            {"title": "A", "rows": [{"id": "r1", "title": "Manhã", "description": "9h–12h"},
                                    {"id": "r2", "title": "Tarde"}]}]}}}
    text, choices = phone_view(listed, "pt")
    assert text == "Escolha\n[Opções]" and [c.title for c in choices] == ["Manhã", "Tarde"]
    assert choices[0].reply == {"type": "interactive", "interactive": {
        "type": "list_reply", "list_reply": {"id": "r1", "title": "Manhã", "description": "9h–12h"}}}

    templated = {"messaging_product": "whatsapp", "to": "351911111111", "type": "template", "template": {
        "name": "booking_request", "language": {"code": "pt_PT"}, "components": [
            {"type": "body", "parameters": [{"type": "text", "text": "Ana"}, {"type": "text", "text": "2026-11-26"}]},
            {"type": "button", "sub_type": "quick_reply", "index": "0",
             "parameters": [{"type": "payload", "payload": "barnum:confirm:abc"}]},
            {"type": "button", "sub_type": "quick_reply", "index": "1",
             "parameters": [{"type": "payload", "payload": "other"}]}]}}
    text, choices = phone_view(templated, "en")
    assert "booking_request" in text and "Ana · 2026-11-26" in text
    assert [c.title for c in choices] == ["Confirm", "button 2"]
    # A template's quick reply comes back as a message of type "button".
    assert choices[0].reply == {"type": "button", "button": {"payload": "barnum:confirm:abc", "text": "Confirm"}}


def test_a_reissued_request_becomes_buttons_carrying_the_fresh_tokens() -> None:
    payload = with_names("appointment.pre_confirmed", None, None)
    payload["action_links"] = {"cancel": "http://127.0.0.1:8000/api/action?type=cancel&token=tokcancel",
                               "confirm": "http://127.0.0.1:8000/api/action?type=confirm&token=tokconfirm"}
    to, text, choices = reissued(payload, "pt")
    assert to == "351911111111" and text == "Olá Ana! Tem uma consulta a 2026-11-26 às 10:00. Confirma?"
    assert [(c.title, c.reply["interactive"]["button_reply"]["id"]) for c in choices] == [
        ("Confirmar", "barnum:confirm:tokconfirm"), ("Cancelar", "barnum:cancel:tokcancel")]

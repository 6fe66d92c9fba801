"""``barnum dev`` end to end: a subprocess in a fresh directory, as a new user
would run it — message printed with links, the confirm link works, Ctrl-C
stops everything, the next run reuses the data, ``--reset`` starts over."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from listener.pgcluster import free_port

BARNUM = str(Path(sys.executable).parent / "barnum")
CONFIRM = re.compile(r"(http://127\.0\.0\.1:\d+/api/action\?type=confirm&token=[A-Za-z0-9_-]+)")
DSN = re.compile(r"psql '([^']+)'")


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
def project(tmp_path: Path) -> Path:
    # Like a fresh clone: an empty directory the user runs `barnum dev` in.
    d = tmp_path / "clinic"
    d.mkdir()
    return d


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
    first = DevProcess(project)
    try:
        first.wait_for(CONFIRM)
        dsn = first.wait_for(DSN).group(1)
        assert first.interrupt() == 0
    finally:
        first.kill()

    again = DevProcess(project)
    try:
        again.wait_for(re.compile(r"reusing the demo data"))
        dsn2 = again.wait_for(DSN).group(1)
        with psycopg.connect(dsn2) as conn:
            assert conn.execute("SELECT count(*) FROM barnum.appointments").fetchone() == (1,)
        assert again.interrupt() == 0
    finally:
        again.kill()
    assert dsn.rsplit("/", 1)[1] == dsn2.rsplit("/", 1)[1]

    fresh = DevProcess(project, "--reset")
    try:
        fresh.wait_for(re.compile(r"starting over"))
        fresh.wait_for(re.compile(r"seeded a demo clinic"))
        fresh.wait_for(CONFIRM)
        assert fresh.interrupt() == 0
    finally:
        fresh.kill()

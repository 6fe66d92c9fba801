"""socket.io-client 4.x (node) against Barnum's realtime endpoint (SPEC-2 §D).

Run through ``scripts/e2e-socketio`` (it installs socket.io-client@4 outside
the repo and sets SOCKETIO_CLIENT_DIR); not part of the regular test command.
A shim on loopback against a fresh migrated database; the node client
(tests/e2e/socketio_client.cjs) connects exactly as the seed's frontend does —
``io(URL, {auth: {token}})``, default transports — joins a conversation, and
must receive ``message:new`` for a signed inbound WhatsApp notification.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow

from tests.test_realtime import contact_id, create_token, inbound, realtime_shim

HERE = Path(__file__).resolve().parent


def test_socketio_client_receives_message_new(db_url: str, db_conn: psycopg.Connection[TupleRow]) -> None:
    client_dir = os.environ.get("SOCKETIO_CLIENT_DIR")
    if not client_dir or not (Path(client_dir) / "node_modules" / "socket.io-client").is_dir():
        pytest.fail("socket.io-client is not installed: run scripts/e2e-socketio", pytrace=False)
    token = create_token(db_conn)
    with realtime_shim(db_url, db_conn) as running:
        inbound(running, "wamid.E2E-1", "first")  # the contact
        contact = contact_id(db_conn)
        proc = subprocess.Popen(["node", str(HERE / "socketio_client.cjs"), running.url, token, contact],
                                env={**os.environ, "SOCKETIO_CLIENT_DIR": client_dir},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue[dict[str, Any]] = queue.Queue()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                print("node:", line.rstrip(), flush=True)
                lines.put(json.loads(line))

        threading.Thread(target=read, daemon=True).start()
        try:
            def step(name: str) -> dict[str, Any]:
                while True:
                    doc = lines.get(timeout=60)
                    assert doc["step"] != "error", doc
                    if doc["step"] == name:
                        return doc

            refused = step("refused")
            assert refused["data"] == {"code": "UNAUTHORIZED"}
            step("joined")
            inbound(running, "wamid.E2E-2", "Olá do WhatsApp")
            got = step("message:new")
            assert got["data"]["contactId"] == contact
            assert got["data"]["message"]["content"] == "Olá do WhatsApp"
            assert got["data"]["message"]["waMessageId"] == "wamid.E2E-2"
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            if proc.stderr is not None:
                err = proc.stderr.read()
                if err:
                    print("node stderr:", err)

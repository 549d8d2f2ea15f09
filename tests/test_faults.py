"""Faults a real deployment meets: the server killed, the database stopped. Nothing seen is lost."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from tests.live import Browserless, close_worker_connections, serving
from tests.test_live_server import open_terminal, read_until, terminal_socket, ws_url

ON_POSTGRES = os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://"))
needs_postgres = pytest.mark.skipif(not ON_POSTGRES, reason="stops the real PostgreSQL server")


@pytest.fixture(scope="module")
def hybrid_server(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("hybrid"), TERMSYS_STORAGE_MODE="HYBRID") as server:
        yield server


@pytest.fixture
def hybrid_client(hybrid_server):
    client = Browserless(hybrid_server)
    client.login()
    return client


@contextlib.contextmanager
def postgres_stopped():
    """Stop the local PostgreSQL cluster; always start it again."""
    version = sorted(os.listdir("/etc/postgresql"))[0]
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]
    subprocess.run([*command, "stop", "-m", "fast"], check=True, capture_output=True, timeout=60)
    try:
        yield
    finally:
        subprocess.run([*command, "start"], check=True, capture_output=True, timeout=60)
        for _ in range(100):
            if subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"]).returncode == 0:
                break
            time.sleep(0.1)
        close_worker_connections()


def wait_for(predicate, timeout: float = 30, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def numbers(text: bytes, prefix: bytes) -> list[int]:
    return [int(n) for n in re.findall(prefix + rb"(\d+)\r\n", text)]


def test_sigkill_loses_nothing_a_client_saw_in_hybrid_mode(hybrid_server, hybrid_client):
    body = open_terminal(hybrid_client, "crash")
    url = ws_url(hybrid_server, body["connectionUrl"])
    headers = hybrid_client.ws_headers()
    with ws_connect(
        url, origin=hybrid_server.url, additional_headers=headers, open_timeout=10
    ) as ws:
        ws.send(b"for i in $(seq 1 200); do echo seen-$i; done\r")
        seen, _ = read_until(ws, b"seen-200\r\n")
        hybrid_server.kill()  # at once, no shutdown code: only the journal has it
    hybrid_server.start()

    stored = wait_for(
        lambda: (
            (o := hybrid_server.stored_output(body["session"]["id"])) and b"seen-200\r\n" in o and o
        )
    )
    assert stored[: len(seen)] == seen
    assert numbers(stored, b"seen-") == list(range(1, 201))
    with ws_connect(
        url, origin=hybrid_server.url, additional_headers=headers, open_timeout=10
    ) as ws:
        replay, controls = read_until(ws, b"seen-200\r\n")
        assert controls[0]["state"] == "exited"
        assert numbers(replay, b"seen-") == list(range(1, 201))


@needs_postgres
def test_hybrid_terminal_keeps_working_while_postgres_is_down(hybrid_server, hybrid_client):
    body = open_terminal(hybrid_client, "pgdown")
    session_id = body["session"]["id"]
    url = ws_url(hybrid_server, body["connectionUrl"])
    with ws_connect(
        url,
        origin=hybrid_server.url,
        additional_headers=hybrid_client.ws_headers(),
        open_timeout=10,
    ) as ws:
        ws.send(b"for i in $(seq 1 40); do echo tick-$i; sleep 0.05; done\r")
        read_until(ws, b"tick-5\r\n")
        with postgres_stopped():
            read_until(ws, b"tick-40\r\n", timeout=30)
            ws.send(b"echo typed-$((20+1))-while-down\r")
            read_until(ws, b"typed-21-while-down\r\n")
            assert hybrid_server.process.poll() is None
        ws.send(b"echo after-$((1+1))\r")
        read_until(ws, b"after-2\r\n")

    stored = wait_for(
        lambda: (o := hybrid_server.stored_output(session_id)) and b"after-2\r\n" in o and o
    )
    assert numbers(stored, b"tick-") == list(range(1, 41))
    assert stored.count(b"typed-21-while-down\r\n") == 1
    assert stored.count(b"after-2\r\n") == 1


@needs_postgres
def test_database_mode_reports_a_down_database_and_saves_everything_after(
    live_termsys, live_client
):
    body = open_terminal(live_client, "dbdown")
    session_id = body["session"]["id"]
    with terminal_socket(live_termsys, live_client, body) as ws:
        read_until(ws, b"#")
        with postgres_stopped():
            ws.send(b"echo during-$((3+4))\r")
            _, controls = read_until(ws, b"during-7\r\n")
            deadline = time.monotonic() + 10
            while not any(c.get("code") == "storage_unavailable" for c in controls):
                frame = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
                if isinstance(frame, str):
                    controls.append(json.loads(frame))
            message = next(c for c in controls if c.get("code") == "storage_unavailable")["message"]
            assert "database is unavailable" in message
            status, error = live_client.api("GET", "/api/terminal/list")
            assert status == 503 and error["error"]["code"] == "database_unavailable"
        ws.send(b"echo back-$((4+4))\r")
        read_until(ws, b"back-8\r\n")
    stored = wait_for(
        lambda: (o := live_termsys.stored_output(session_id)) and b"back-8\r\n" in o and o
    )
    assert stored.count(b"during-7\r\n") == 1 and stored.count(b"back-8\r\n") == 1


def test_a_corrupt_journal_is_reported_and_intact_records_are_kept(tmp_path, settings, caplog):
    """Garbage in a journal segment loses only the damaged record, and start-up says so."""
    from sessions_app.storage.journal import Journal

    journal = Journal(tmp_path, fsync="NEVER")
    for i in range(5):
        journal.append("output", "session_x", {"offset": i}, f"rec-{i}".encode())
    journal.close()
    segment = next(Path(tmp_path).glob("journal-*.tsj"))
    raw = bytearray(segment.read_bytes())
    raw[raw.index(b"rec-2")] ^= 0xFF  # one flipped byte in the third record
    raw += b"\xa5\x5a garbage that is not a record"
    segment.write_bytes(bytes(raw))

    reopened = Journal(tmp_path, fsync="NEVER")
    records = list(reopened.replay())
    assert [r.data for r in records] == [b"rec-0", b"rec-1", b"rec-3", b"rec-4"]
    assert reopened.problems and segment.name in reopened.problems[0]
    reopened.close()


def _sqlite_error(message: str, code: int) -> Exception:
    import sqlite3

    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code
    return error


DATABASE_ERRORS = [
    # (what the driver raised, whether it is the database being unavailable)
    pytest.param(lambda: _sqlite_error("database is locked", 5), True, id="sqlite-busy"),
    pytest.param(lambda: _sqlite_error("disk I/O error", 10), True, id="sqlite-ioerr"),
    pytest.param(lambda: _sqlite_error("unable to open database file", 14), True, id="sqlite-open"),
    pytest.param(lambda: _sqlite_error("fts5: syntax error near", 1), False, id="sqlite-fts5"),
    pytest.param(lambda: _sqlite_error("no such column: x", 1), False, id="sqlite-sql"),
    pytest.param(
        lambda: __import__("psycopg").OperationalError("connection refused"), True, id="pg-down"
    ),
    pytest.param(
        lambda: __import__("psycopg").errors.AdminShutdown("terminating connection"),
        True,
        id="pg-shutdown",
    ),
    pytest.param(
        lambda: __import__("psycopg").errors.TooManyConnections("too many clients"),
        True,
        id="pg-full",
    ),
    pytest.param(
        lambda: __import__("psycopg").errors.LockNotAvailable("could not obtain lock"),
        False,
        id="pg-lock",
    ),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("driver_error", "outage"), DATABASE_ERRORS)
def test_only_a_database_that_cannot_be_used_is_reported_as_unavailable(
    driver_error, outage, monkeypatch
):
    """A stopped or busy database is a 503 ("try again shortly"); an SQL statement the database
    refused is a bug of ours, a 500 with a traceback in the log, not an outage."""
    from django.db import OperationalError
    from django.test import Client

    from sessions_app import selectors
    from tests.factories import UserFactory

    cause = driver_error()
    error = OperationalError(*cause.args)
    error.__cause__ = cause

    def fail(**kwargs):
        raise error

    monkeypatch.setattr(selectors, "project_list", fail)
    client = Client()
    client.force_login(UserFactory())
    response = client.get("/api/projects")
    body = response.json()
    if outage:
        assert response.status_code == 503
        assert body["error"]["code"] == "database_unavailable"
    else:
        assert response.status_code == 500
        assert body["error"]["code"] == "internal_error"

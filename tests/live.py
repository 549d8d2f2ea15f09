"""A real termsys server (manage.py serve) in a subprocess with its own database."""

from __future__ import annotations

import base64
import contextlib
import http.cookiejar
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIVE_USER = "alice"
LIVE_PASSWORD = "wonderland-" + secrets.token_hex(6)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """Start with ``start()``, stop with ``stop()``; ``restart()`` keeps the database."""

    def __init__(self, workdir: Path, **extra_env: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = workdir / "server.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO_"))}
        self.env.update(
            DJANGO_SETTINGS_MODULE="termsys.settings",
            TERMSYS_VAR_DIR=str(workdir / "var"),
            TERMSYS_PROJECTS_ROOT=str(workdir / "projects"),
            SECRET_KEY="live-test-" + secrets.token_hex(16),
            # Its own keys in Redis: cached flags of another server's database must not leak in.
            TERMSYS_REDIS_PREFIX="termsys-live-" + secrets.token_hex(4),
            TERMSYS_PROFILES=json.dumps({"system": ["/bin/bash", "--noprofile", "--norc"]}),
            **extra_env,
        )
        redis = os.environ.get("REDIS_URL", "")
        if redis:
            # A Redis database of its own: the test process's cached flags are not the server's.
            match = re.match(r"^(redis://[^/]+)/?(\d*)$", redis)
            if match:
                self.env["REDIS_URL"] = f"{match.group(1)}/{(int(match.group(2) or 0) + 1) % 16}"
        self._pg_name: str | None = None
        base = os.environ.get("DATABASE_URL", "")
        if base.startswith(("postgres://", "postgresql://")):
            self._pg_name = f"termsys_live_{os.getpid()}_{secrets.token_hex(3)}"
            self._pg_base = base
            self.env["DATABASE_URL"] = re.sub(
                r"/[^/?]*(\?|$)", f"/{self._pg_name}\\1", base.split("://", 1)[1], count=1
            )
            self.env["DATABASE_URL"] = base.split("://", 1)[0] + "://" + self.env["DATABASE_URL"]

    def _pg(self, sql: str) -> None:
        import psycopg

        admin = re.sub(r"/[^/?]*(\?|$)", "/postgres\\1", self._pg_base.split("://", 1)[1], count=1)
        with psycopg.connect("postgresql://" + admin, autocommit=True) as conn:
            conn.execute(sql)

    def manage(self, *args: str, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode:
            raise RuntimeError(
                f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
            )
        return result.stdout

    def setup(self) -> None:
        if self._pg_name:
            self._pg(f'CREATE DATABASE "{self._pg_name}"')
        self.manage("migrate", "--noinput")
        self.manage(
            "createsuperuser",
            "--noinput",
            "--username",
            LIVE_USER,
            "--email",
            "alice@example.com",
            env={"DJANGO_SUPERUSER_PASSWORD": LIVE_PASSWORD},
        )

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/api/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        raise RuntimeError(f"the server did not answer: {self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """End the server with SIGKILL: no shutdown code runs (a crash)."""
        self.stop(signal.SIGKILL)

    def stored_output(self, session_id: str) -> bytes:
        """Return the session's output as the database holds it (read in a separate process)."""
        code = (
            "import base64, sys; from sessions_app.models import OutputChunk as C; "
            f"rows = C.objects.filter(session_id={session_id!r}).order_by('seq'); "
            "blob = base64.b64encode(b''.join(bytes(r.data) for r in rows)).decode(); "
            "sys.stdout.write('<<' + blob + '>>')"
        )
        return base64.b64decode(re.search(r"<<(.*?)>>", self.manage("shell", "-c", code)).group(1))

    def restart(self) -> None:
        self.stop()
        self.start()

    def teardown(self) -> None:
        self.stop()
        if self._pg_name:
            self._pg(f'DROP DATABASE IF EXISTS "{self._pg_name}" WITH (FORCE)')


class Browserless:
    """An HTTP client of the live server with a cookie jar: logs in like a browser does."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def cookie(self, name: str) -> str:
        return next(c.value for c in self.jar if c.name == name)

    def login(self, username: str = LIVE_USER, password: str = LIVE_PASSWORD) -> None:
        page = self.opener.open(self.server.url + "/accounts/login/").read().decode()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        data = urllib.parse.urlencode(
            {"username": username, "password": password, "csrfmiddlewaretoken": token}
        )
        self.opener.open(
            urllib.request.Request(
                self.server.url + "/accounts/login/",
                data=data.encode(),
                headers={"Referer": self.server.url + "/"},
            )
        )
        self.cookie("sessionid")

    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.server.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                "X-CSRFToken": self.cookie("csrftoken"),
                "Referer": self.server.url + "/",
            },
        )
        try:
            with self.opener.open(request) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def page(self, path: str, form: dict[str, str] | None = None) -> str:
        """GET a page, or POST ``form`` to it with the CSRF token; return the HTML."""
        data = None
        if form is not None:
            data = urllib.parse.urlencode({"csrfmiddlewaretoken": self.cookie("csrftoken"), **form})
            data = data.encode()
        request = urllib.request.Request(
            self.server.url + path, data=data, headers={"Referer": self.server.url + path}
        )
        with self.opener.open(request) as response:
            return response.read().decode()

    def ws_headers(self) -> dict[str, str]:
        cookies = "; ".join(f"{c.name}={c.value}" for c in self.jar)
        return {"Cookie": cookies}


@contextlib.contextmanager
def serving(workdir: Path, **extra_env: str) -> Iterator[LiveServer]:
    """Run a migrated live server with a user for the duration of the block."""
    server = LiveServer(workdir, **extra_env)
    server.setup()
    server.start()
    try:
        yield server
    finally:
        server.teardown()


def close_worker_connections() -> None:
    """Close this test process's database connections, worker threads' included (before a
    test database is dropped, or after the database server restarted under them)."""
    from asgiref.sync import SyncToAsync
    from django.db import connections

    from sessions_app import dbthread

    connections.close_all()
    dbthread.close_connections()
    SyncToAsync.single_thread_executor.submit(connections.close_all).result()

"""Project switching and output throughput, per storage mode. Prints figures; asserts nothing.

For each storage mode this starts its own server (``manage.py serve`` on a free 127.0.0.1
port, its own TERMSYS_VAR_DIR, a fresh migrated SQLite database or, with --database-url, a
PostgreSQL database it creates and drops), creates a user, PROJECTS x SESSIONS shells that
each print about 1 MiB (acknowledging output over the WebSocket, as the page does, so flow
control lets it through), then:

- switches project round-robin SWITCHES times, timing each snapshot request from sending it
  to the last byte of the answer (measured by this client over loopback, keep-alive);
- reads the server's VmRSS before and after the shells printed their output;
- times one shell printing THROUGHPUT bytes over the WebSocket, with acks.

Run: .venv/bin/python bench/switch.py [--database-url postgres://postgres@127.0.0.1:5432/x]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import http.cookies
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidHandshake

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "bench", "bench-" + secrets.token_hex(8)
ACK_BYTES = 64 * 1024
START_TIMEOUT = 60
STOP_TIMEOUT = 15
COMMAND_TIMEOUT = 180
CONNECT_ATTEMPTS = 5
QUIET_TIMEOUT = 180
ACCESS_LOG_RE = re.compile(r'\] "(?:GET|POST|WS\w+) ')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_database(url: str, name: str) -> str:
    """Return ``url`` pointing at database ``name`` on the same server."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def postgres(url: str, sql: str) -> None:
    import psycopg

    admin = with_database(url, "postgres").replace("postgres://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


class Server:
    """One termsys server process with its own var dir and database; stopped by PID."""

    def __init__(self, mode: str, database_url: str | None, projects: int, sessions: int) -> None:
        self.mode = mode
        self.workdir = Path(tempfile.mkdtemp(prefix=f"termsys-bench-{mode.lower()}-"))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.pg_url = database_url
        self.pg_name = f"termsys_bench_{os.getpid()}_{secrets.token_hex(3)}"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DJANGO_", "TERMSYS_")) and k not in ("DATABASE_URL", "REDIS_URL")
        }
        self.env.update(
            DJANGO_SETTINGS_MODULE="termsys.settings",
            TERMSYS_VAR_DIR=str(self.workdir / "var"),
            TERMSYS_STORAGE_MODE=mode,
            TERMSYS_PROFILES=json.dumps({"system": ["/bin/bash", "--noprofile", "--norc"]}),
            SECRET_KEY="bench-" + secrets.token_hex(24),
            LOG_LEVEL="WARNING",
            # the bench's terminals plus the throughput one, whatever the default limits are
            TERMSYS_MAX_SESSIONS_PER_USER=str(projects * sessions + 1),
            TERMSYS_MAX_SESSIONS_PER_PROJECT=str(max(sessions, 10)),
        )
        if database_url:
            self.env["DATABASE_URL"] = with_database(database_url, self.pg_name)

    @property
    def database(self) -> str:
        return "PostgreSQL" if self.pg_url else "SQLite"

    def manage(self, *args: str, env: dict[str, str] | None = None) -> None:
        subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            check=True,
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
        )

    def setup(self) -> None:
        if self.pg_url:
            postgres(self.pg_url, f'CREATE DATABASE "{self.pg_name}"')
        self.manage("migrate", "--noinput")
        self.manage(
            "createsuperuser",
            "--noinput",
            "--username",
            USER,
            "--email",
            "bench@example.com",
            env={"DJANGO_SUPERUSER_PASSWORD": PASSWORD},
        )

    def start(self) -> None:
        log = (self.workdir / "server.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.log_tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/api/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer within {START_TIMEOUT}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        """Return the end of the server's log, without its access-log lines."""
        path = self.workdir / "server.log"
        if not path.exists():
            return ""
        lines = path.read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines if not ACCESS_LOG_RE.search(line))[-4000:]

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_quiet(self, share: float = 0.05, timeout: float = QUIET_TIMEOUT) -> float:
        """Wait until the server uses under ``share`` of a CPU for a second (write-behind
        done); return the seconds waited (``timeout`` at most)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            before = self.cpu_seconds()
            time.sleep(1)
            if self.cpu_seconds() - before < share:
                break
        return time.monotonic() - started

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)

    def teardown(self) -> None:
        try:
            self.stop()
        finally:
            if self.pg_url:
                postgres(self.pg_url, f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')
            shutil.rmtree(self.workdir, ignore_errors=True)


class Client:
    """A logged-in HTTP client over one keep-alive connection."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.cookies: dict[str, str] = {}
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, bytes]:
        headers = {**(headers or {}), "Cookie": self.cookie_header()}
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=body, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionError):
                if attempt == 2:
                    raise
                self.conn.close()
        for value in response.headers.get_all("Set-Cookie") or []:
            cookie = http.cookies.SimpleCookie(value)
            for name, morsel in cookie.items():
                self.cookies[name] = morsel.value
        return response.status, data

    def cookie_header(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.cookies.items())

    def login(self) -> None:
        _, page = self.request("GET", "/accounts/login/")
        token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1).decode()
        form = urllib.parse.urlencode(
            {"username": USER, "password": PASSWORD, "csrfmiddlewaretoken": token}
        ).encode()
        status, _ = self.request(
            "POST",
            "/accounts/login/",
            form,
            {
                "Content-Type": "application/x-www-form-urlencoded",
                "Referer": self.server.base + "/",
            },
        )
        if status != 302 or "sessionid" not in self.cookies:
            raise RuntimeError(f"login failed ({status})")

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        status, data = self.request(
            method,
            path,
            None if body is None else json.dumps(body).encode(),
            {
                "Content-Type": "application/json",
                "X-CSRFToken": self.cookies.get("csrftoken", ""),
                "Referer": self.server.base + "/",
            },
        )
        if status >= 400:
            raise RuntimeError(f"{method} {path} -> {status}: {data[:300]!r}")
        return json.loads(data)


async def open_socket(client: Client, session_id: str) -> tuple[ClientConnection, int]:
    """Open a session's WebSocket; return it and how many handshakes failed first."""
    uri = f"ws://127.0.0.1:{client.server.port}/ws/terminals/{session_id}/"
    headers = {"Cookie": client.cookie_header(), "Origin": client.server.base}
    for failed in range(CONNECT_ATTEMPTS):
        try:
            ws = await ws_connect(
                uri, additional_headers=headers, max_size=None, compression=None, open_timeout=30
            )
            return ws, failed
        except (InvalidHandshake, OSError, TimeoutError) as exc:
            print(f"  handshake {session_id} failed ({exc!r}); retrying", file=sys.stderr)
            await asyncio.sleep(1)
    raise RuntimeError(f"{session_id}: {CONNECT_ATTEMPTS} handshakes failed")


async def run_until(
    client: Client, session_id: str, command: str, marker: bytes
) -> tuple[int, int]:
    """Type ``command`` in a session and read (acking) until ``marker``.

    Return the bytes read and the number of failed handshakes before the connection.
    """
    received = unacked = 0
    window = b""
    ws, failed = await open_socket(client, session_id)
    async with ws:
        await ws.send(command.encode() + b"\r")
        async with asyncio.timeout(COMMAND_TIMEOUT):
            async for message in ws:
                if isinstance(message, str):
                    continue  # hello, title, ...
                received += len(message)
                unacked += len(message)
                window = (window + message)[-256:]
                if unacked >= ACK_BYTES:
                    await ws.send(json.dumps({"type": "ack", "bytes": unacked}))
                    unacked = 0
                if marker in window:
                    return received, failed
    raise RuntimeError(f"{session_id}: connection ended before {marker!r}")


@dataclass
class Figures:
    mode: str
    database: str
    switch_ms: list[float] = field(default_factory=list)
    snapshot_bytes: int = 0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    sessions: int = 0
    fill_seconds: float = 0.0
    failed_handshakes: int = 0
    settle_seconds: float = 0.0
    throughput_mb_s: float = 0.0


async def fill(client: Client, session_ids: list[str], fill_bytes: int, parallel: int) -> int:
    """Have each session print about ``fill_bytes`` * 4/3; return the failed handshakes."""
    gate = asyncio.Semaphore(parallel)
    command = f"head -c {fill_bytes} /dev/urandom | base64; echo FILL-$((20+22))-DONE"

    async def one(session_id: str) -> int:
        async with gate:
            return (await run_until(client, session_id, command, b"FILL-42-DONE"))[1]

    return sum(await asyncio.gather(*(one(s) for s in session_ids)))


def bench_mode(mode: str, args: argparse.Namespace) -> Figures:
    server = Server(mode, args.database_url, args.projects, args.sessions)
    figures = Figures(mode=mode, database=server.database)
    try:
        server.setup()
        server.start()
        client = Client(server)
        client.login()
        projects = [
            client.api("POST", "/api/projects", {"name": f"p{i}"})["project"]["id"]
            for i in range(args.projects)
        ]
        client.api("GET", f"/api/workspace/projects/{projects[0]}/snapshot")
        figures.rss_before_kib = server.rss_kib()
        sessions = [
            client.api("POST", "/api/terminal/create", {"projectId": p, "tabName": f"t{j}"})[
                "session"
            ]["id"]
            for p in projects
            for j in range(args.sessions)
        ]
        figures.sessions = len(sessions)
        started = time.perf_counter()
        figures.failed_handshakes = asyncio.run(
            fill(client, sessions, args.fill_bytes, args.parallel)
        )
        figures.fill_seconds = time.perf_counter() - started
        figures.settle_seconds = server.wait_quiet()  # batched / write-behind storage
        figures.rss_after_kib = server.rss_kib()

        tail = f"?tail={args.tail}" if args.tail is not None else ""
        for i in range(args.warmup + args.switches):
            path = f"/api/workspace/projects/{projects[i % len(projects)]}/snapshot{tail}"
            t0 = time.perf_counter()
            status, body = client.request("GET", path)
            elapsed = (time.perf_counter() - t0) * 1000
            if status != 200:
                raise RuntimeError(f"snapshot -> {status}: {body[:300]!r}")
            if i >= args.warmup:
                figures.switch_ms.append(elapsed)
                figures.snapshot_bytes = max(figures.snapshot_bytes, len(body))

        project = client.api("POST", "/api/projects", {"name": "throughput"})["project"]["id"]
        session = client.api("POST", "/api/terminal/create", {"projectId": project})["session"]
        command = f"head -c {args.throughput} /dev/zero | tr '\\0' x; echo; echo TP-$((1+1))-END"
        t0 = time.perf_counter()
        received, _ = asyncio.run(run_until(client, session["id"], command, b"TP-2-END"))
        figures.throughput_mb_s = received / (time.perf_counter() - t0) / 1e6
    except Exception:
        code = server.process.poll() if server.process else None
        state = "running" if code is None else f"exited with {code}"
        print(f"[{mode}] failed; server {state}; log:\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        server.teardown()
    return figures


def report(rows: list[Figures], args: argparse.Namespace) -> None:
    print()
    print(
        f"{args.projects} projects x {args.sessions} sessions, each printed "
        f"{args.fill_bytes} random bytes as base64 (~{args.fill_bytes * 4 / 3 / 2**20:.2f} MiB); "
        f"{args.switches} round-robin switches after {args.warmup} warm-up; snapshot tail "
        f"{'server default' if args.tail is None else args.tail}. Switch time = client wall "
        "time on loopback from sending GET .../snapshot to its last byte (keep-alive), "
        "measured once the server is idle again after the fill (settle s)."
    )
    header = (
        f"{'mode':<9} {'database':<10} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'snap KiB':>8} {'RSS0 MiB':>8} {'RSS1 MiB':>8} {'KiB/sess':>8} {'fill s':>6} "
        f"{'settle s':>8} {'out MB/s':>8} {'hs fail':>7}"
    )
    print(header)
    print("-" * len(header))
    for f in rows:
        per_session = (f.rss_after_kib - f.rss_before_kib) / max(f.sessions, 1)
        print(
            f"{f.mode:<9} {f.database:<10} {statistics.median(f.switch_ms):7.1f} "
            f"{percentile(f.switch_ms, 95):7.1f} {percentile(f.switch_ms, 99):7.1f} "
            f"{max(f.switch_ms):7.1f} {f.snapshot_bytes / 1024:8.0f} "
            f"{f.rss_before_kib / 1024:8.1f} {f.rss_after_kib / 1024:8.1f} {per_session:8.0f} "
            f"{f.fill_seconds:6.1f} {f.settle_seconds:8.1f} {f.throughput_mb_s:8.1f} "
            f"{f.failed_handshakes:7d}"
        )
    local = next((f for f in rows if f.mode == "LOCAL"), None)
    hybrid = next((f for f in rows if f.mode == "HYBRID"), None)
    if local and hybrid:
        print(
            f"HYBRID output throughput = {hybrid.throughput_mb_s / local.throughput_mb_s:.2f}x "
            "LOCAL"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="postgres://... (default: a fresh SQLite file)")
    parser.add_argument("--modes", default="LOCAL,DATABASE,HYBRID")
    parser.add_argument("--projects", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=5, help="per project")
    parser.add_argument("--fill-bytes", type=int, default=786432, help="random bytes per shell")
    parser.add_argument("--parallel", type=int, default=10, help="shells printing at once")
    parser.add_argument("--switches", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--tail", type=int, help="snapshot tail bytes (default: server's)")
    parser.add_argument("--throughput", type=int, default=50_000_000, help="bytes of output")
    args = parser.parse_args()
    if args.database_url and not args.database_url.startswith(("postgres://", "postgresql://")):
        parser.error("--database-url must be postgres://...")
    rows = []
    for mode in [m.strip().upper() for m in args.modes.split(",") if m.strip()]:
        print(f"[{mode}] running...", flush=True)
        rows.append(bench_mode(mode, args))
    report(rows, args)


if __name__ == "__main__":
    main()

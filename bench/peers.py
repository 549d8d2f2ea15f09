"""termsys side by side with terminado and the raw-PTY floor, in one run. Prints figures only.

Drives the shared browser-terminal benchmark client (``../shared/bench``: bench.py and
termclient.py, terminado_server.py) the way its run_peers.sh does, and adds two phases the
shared client does not have. Per run:

A. termsys (``manage.py serve`` on a free 127.0.0.1 port, own TERMSYS_VAR_DIR, fresh migrated
   SQLite, bash --noprofile --norc, raised session limits) and terminado start fresh;
   bench.py ``--phase echo`` measures keystroke echo latency of raw, terminado and termsys
   interleaved; then termsys alone: ``--cpu-rts`` echo round trips, reading the server's
   utime+stime from /proc/<pid>/stat before and after (server CPU per round trip); then
   bench.py ``--phase throughput`` (``cat`` of a 50 MB base64 payload, all peers alternating).
C. bench.py ``--phase concurrency`` (``--conns`` sessions x ``--rts`` round trips, server peak
   RSS) against one freshly started peer at a time.
I. 1000 idle WebSockets (``--idle-conns``) against a fresh termsys (spread over
   ``--idle-sessions`` sessions, several clients per session) and a fresh terminado
   (``--single``: every client on its one shell): server VmRSS once quiet, before and after
   they are open, per connection.

The shared client is looked for in ../shared/bench next to this checkout (SHARED_BENCH=DIR
to point elsewhere); its .venv (websockets, terminado, tornado) is created on first use.

Every process it starts binds to 127.0.0.1 and is stopped by its PID (SIGTERM, then SIGKILL),
shells left behind by their PID; every wait is bounded. Results (bench.py's JSON per run, in
run_peers.sh's layout, so ``summarize.py`` reads them too) go to ``--out``.

Run: .venv/bin/python bench/peers.py [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from switch import PASSWORD, ROOT, USER, Client, Server, free_port
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

SHARED = Path(os.environ.get("SHARED_BENCH", ROOT.parent / "shared" / "bench"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAYLOAD_BYTES = 37_500_000  # raw bytes; base64-encoded to ~50.7 MB, as run_peers.sh
BENCH_TIMEOUT = 330  # hard limit per bench.py invocation (it stops itself at 300 s)
STOP_TIMEOUT = 10
PORT_TIMEOUT = 15
IDLE_TIMEOUT = 300
IDLE_BATCH = 50  # WebSocket handshakes in flight at once in the idle phase
IDLE_WARMUP = 10  # connections opened and closed before the baseline RSS


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- processes ----------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one process (all its threads, not its children), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def wait_quiet(pid: int, share: float = 0.05, timeout: float = 60) -> float:
    """Wait until ``pid`` uses under ``share`` of a CPU for a second; return seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = proc_cpu_s(pid)
        time.sleep(1)
        if proc_cpu_s(pid) - before < share:
            break
    return time.monotonic() - started


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in kids.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_leftovers(pids: list[int]) -> None:
    """SIGKILL those of ``pids`` (shells of a stopped server) still alive."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def stop_process(process: subprocess.Popen | None) -> None:
    """SIGTERM, SIGKILL after STOP_TIMEOUT s, then whatever it had started."""
    if process is None or process.poll() is not None:
        return
    kids = descendants(process.pid)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)
    time.sleep(0.3)
    kill_leftovers(kids)


class Termsys(Server):
    """switch.py's server (fresh SQLite, own var dir) with limits for this benchmark."""

    def __init__(self, mode: str, sessions: int, logs: Path) -> None:
        super().__init__(mode, None, 1, 1)
        self.logs = logs
        self.env.update(
            TERMSYS_MAX_SESSIONS_PER_USER=str(sessions + 50),
            TERMSYS_MAX_SESSIONS_PER_PROJECT=str(min(sessions + 50, 1000)),
            # per-user connect and per-socket frame rate limits, where the server has them:
            # kept on the path but out of reach (echo sends thousands of frames a second)
            TERMSYS_WS_CONNECTS_PER_MINUTE=str(10**6),
            TERMSYS_WS_MESSAGES_PER_SECOND=str(10**6),
        )
        self.url = f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> None:
        self.setup()
        super().start()

    def shutdown(self) -> None:
        """Stop the server by PID, then any shell it left, and remove the var dir."""
        kids = descendants(self.process.pid) if self.process else []
        self.stop()
        with contextlib.suppress(OSError):
            shutil.copy(self.workdir / "server.log", self.logs / f"termsys-{self.port}.log")
        self.teardown()
        time.sleep(0.3)
        kill_leftovers(kids)


class Terminado:
    """The shared terminado_server.py on a free 127.0.0.1 port, from the peers' venv."""

    def __init__(self, python: Path, workdir: Path, single: bool = False) -> None:
        self.python = python
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/websocket"
        self.single = single
        self.logfile = workdir / f"terminado-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> None:
        cmd = [str(self.python), str(SHARED / "terminado_server.py")]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        if self.single:
            cmd.append("--single")
        with self.logfile.open("ab") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        wait_port(self.port, self.process)

    def shutdown(self) -> None:
        process, self.process = self.process, None
        stop_process(process)


def wait_port(port: int, process: subprocess.Popen) -> None:
    import socket

    deadline = time.monotonic() + PORT_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"peer on port {port} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {PORT_TIMEOUT}s")


# --- the shared client --------------------------------------------------------------------


def peer_python() -> Path:
    """The shared client's venv (websockets, terminado, tornado), made as run_peers.sh does."""
    python = SHARED / ".venv" / "bin" / "python"
    if not python.exists():
        log(f"creating {python.parent.parent}")
        subprocess.run(["python3", "-m", "venv", str(SHARED / ".venv")], check=True, timeout=120)
        pip = [str(SHARED / ".venv" / "bin" / "pip"), "install", "-q"]
        subprocess.run([*pip, "websockets", "terminado", "tornado"], check=True, timeout=600)
    return python


def payload(workdir: Path) -> Path:
    """run_peers.sh's payload: the same seeded random bytes, base64 in 76-column lines."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"payload-{PAYLOAD_BYTES}.b64"
    if not path.exists() or path.stat().st_size == 0:
        data = base64.encodebytes(random.Random(12345).randbytes(PAYLOAD_BYTES))
        path.with_suffix(".tmp").write_bytes(data)
        path.with_suffix(".tmp").rename(path)
    return path


def load_shared_client():
    """Import the shared bench.py (and its termclient) for the phases run in this process."""
    sys.path.insert(0, str(SHARED))
    spec = importlib.util.spec_from_file_location("shared_bench", SHARED / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.termclient = sys.modules["termclient"]
    return module


def run_bench(python: Path, run_dir: Path, name: str, args: list[str]) -> dict[str, dict]:
    """Run one bench.py phase; return its result per peer label."""
    cmd = [str(python), str(SHARED / "bench.py"), "--deadline", "300"]
    cmd += ["--json-dir", str(run_dir), *args]
    with (run_dir / f"{name}.out").open("w") as out, (run_dir / f"{name}.err").open("w") as err:
        try:
            subprocess.run(cmd, stdout=out, stderr=err, timeout=BENCH_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            log(f"  {name}: bench.py killed after {BENCH_TIMEOUT}s")
    results = {}
    for line in (run_dir / f"{name}.out").read_text().splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            results[item["target"]] = item
            if not item.get("ok"):
                log(f"  {name}: {item['target']} failed: {item.get('error')}")
    return results


def save(run_dir: Path, target: str, phase: str, result: dict) -> dict:
    result = {"target": target, "phase": phase, "ok": True, "error": None, **result}
    (run_dir / f"{target}-{phase}.json").write_text(json.dumps(result) + "\n")
    return result


# --- phases of this script ----------------------------------------------------------------


async def cpu_phase(shared, url: str, pid: int, n: int, warmup: int) -> dict:
    """termsys alone: N echo round trips, the server's CPU time before and after."""
    adapter_cls = shared.termclient.TermsysAdapter
    adapter_cls._cookies = adapter_cls._project = adapter_cls._login_lock = None  # new server
    adapter = shared.make_adapter("termsys", url, open_timeout=15)
    samples: list[int] = []
    try:
        async with asyncio.timeout(120):
            await shared.setup_echo_session(adapter, 30)
            await shared.echo_round_trips(adapter, warmup, 10, None)
            cpu0, t0 = proc_cpu_s(pid), time.perf_counter()
            await shared.echo_round_trips(adapter, n, 10, samples, start=warmup)
            cpu1, t1 = proc_cpu_s(pid), time.perf_counter()
    finally:
        await adapter.close()
    stats = shared.lat_stats(samples)
    return {
        "round_trips": n,
        "server_cpu_s": round(cpu1 - cpu0, 3),
        "cpu_us_per_rt": round((cpu1 - cpu0) / n * 1e6, 1),
        "server_cpu_pct": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
        "wall_s": round(t1 - t0, 3),
        "p50_us": stats["p50_us"],
        "p99_us": stats["p99_us"],
    }


async def open_many(
    count: int, connect: Callable[[int], object], first_message_timeout: float = 30
) -> tuple[list[ClientConnection], int]:
    """Open ``count`` WebSockets, IDLE_BATCH at a time, each until its first message."""
    gate = asyncio.Semaphore(IDLE_BATCH)

    async def one(index: int) -> ClientConnection | None:
        async with gate:
            try:
                ws = await connect(index)
                async with asyncio.timeout(first_message_timeout):
                    await ws.recv()
                return ws
            except Exception as exc:
                log(f"  idle connection {index} failed: {exc!r}")
                return None

    sockets = await asyncio.gather(*(one(i) for i in range(count)))
    return [ws for ws in sockets if ws is not None], sum(ws is None for ws in sockets)


async def close_all(sockets: list[ClientConnection]) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


async def idle_connections(
    pid: int, count: int, connect: Callable[[int], object], rss_sessions: int
) -> dict:
    """Server RSS before and after ``count`` idle WebSockets are open (server quiet each time)."""
    warm, _ = await open_many(IDLE_WARMUP, connect)
    await close_all(warm)
    await asyncio.to_thread(wait_quiet, pid)
    rss0 = rss_kib(pid)
    sockets, failed = await open_many(count, connect)
    settle = await asyncio.to_thread(wait_quiet, pid)
    await asyncio.sleep(2)
    rss1 = rss_kib(pid)
    still_open = sum(ws.close_code is None for ws in sockets)
    await close_all(sockets)
    return {
        "conns": count,
        "open": still_open,
        "failures": failed + len(sockets) - still_open,
        "rss_before_sessions_kib": rss_sessions,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "kib_per_conn": round((rss1 - rss0) / max(still_open, 1), 1),
        "settle_s": round(settle, 1),
    }


async def idle_termsys(server: Termsys, count: int, sessions: int) -> dict:
    client = Client(server)
    client.login()
    rss_sessions = rss_kib(server.pid)
    per_project = 50
    ids = []
    for p in range(-(-sessions // per_project)):
        project = client.api("POST", "/api/projects", {"name": f"idle{p}"})["project"]["id"]
        for _ in range(min(per_project, sessions - len(ids))):
            body = {"projectId": project, "type": "system", "tabName": "idle"}
            ids.append(client.api("POST", "/api/terminal/create", body)["session"]["id"])
    await asyncio.to_thread(wait_quiet, server.pid)
    rss_live = rss_kib(server.pid)
    headers = {"Cookie": client.cookie_header(), "Origin": server.base}

    def connect(index: int):
        uri = f"{server.url}/ws/terminals/{ids[index % len(ids)]}/"
        return ws_connect(uri, additional_headers=headers, max_size=None, compression=None,
                          open_timeout=30, ping_interval=None)  # fmt: skip

    result = await idle_connections(server.pid, count, connect, rss_sessions)
    result.update(sessions=len(ids), kib_per_session=round((rss_live - rss_sessions) / len(ids)))
    return result


async def idle_terminado(peer: Terminado, count: int) -> dict:
    def connect(index: int):
        return ws_connect(peer.url, max_size=None, compression=None, open_timeout=30,
                          ping_interval=None)  # fmt: skip

    result = await idle_connections(peer.pid, count, connect, rss_kib(peer.pid))
    result["sessions"] = 1
    return result


# --- one run ------------------------------------------------------------------------------


@dataclass
class Setup:
    args: argparse.Namespace
    python: Path
    shared: object
    payload: Path
    out: Path


def rotated(items: list[str], k: int) -> list[str]:
    k %= len(items)
    return items[k:] + items[:k]


def phase_a(s: Setup, run_dir: Path, order: list[str]) -> dict[str, dict]:
    """Echo (all peers interleaved), termsys CPU per round trip, throughput."""
    a = s.args
    termsys, terminado = Termsys(a.mode, 10, s.out), Terminado(s.python, s.out)
    results: dict[str, dict] = {}
    try:
        termsys.start()
        terminado.start()
        urls = {"raw": "raw", "terminado": f"terminado={terminado.url}"}
        urls["termsys"] = f"termsys={termsys.url}"
        peers = ",".join(urls[t] for t in order)
        pids = f"terminado={terminado.pid},termsys={termsys.pid}"
        echo = run_bench(s.python, run_dir, "echo", ["--phase", "echo", "--peers", peers,
                         "--n", str(a.n), "--warmup", str(a.warmup)])  # fmt: skip
        try:
            cpu = asyncio.run(cpu_phase(s.shared, termsys.url, termsys.pid, a.cpu_rts, a.warmup))
        except Exception as exc:
            log(f"  cpu: termsys failed: {exc!r}")
            cpu = {"ok": False, "error": repr(exc)}
        tput = run_bench(s.python, run_dir, "throughput", ["--phase", "throughput", "--peers",
                         peers, "--pids", pids, "--payload", str(s.payload), "--reps",
                         str(a.reps)])  # fmt: skip
        for t in order:
            results[t] = {"echo": echo.get(t, {}), "throughput": tput.get(t, {})}
        results["termsys"]["cpu"] = save(run_dir, "termsys", "cpu", cpu)
    finally:
        terminado.shutdown()
        termsys.shutdown()
    return results


def phase_c(s: Setup, run_dir: Path, target: str) -> dict:
    """Concurrency against one freshly started peer."""
    a = s.args
    peer = None
    if target == "termsys":
        peer = Termsys(a.mode, a.conns, s.out)
    elif target == "terminado":
        peer = Terminado(s.python, s.out)
    try:
        spec, extra = "raw", []
        if peer is not None:
            peer.start()
            spec, extra = f"{target}={peer.url}", ["--server-pid", str(peer.pid)]
        args = ["--phase", "concurrency", "--peers", spec, "--conns", str(a.conns)]
        res = run_bench(s.python, run_dir, f"conc-{target}", [*args, "--rts", str(a.rts), *extra])
        return res.get(target, {})
    finally:
        if peer is not None:
            peer.shutdown()


def phase_i(s: Setup, run_dir: Path, target: str) -> dict:
    """Idle WebSockets against one freshly started peer."""
    a = s.args
    if target == "termsys":
        peer = Termsys(a.mode, a.idle_sessions, s.out)
        job = lambda: idle_termsys(peer, a.idle_conns, a.idle_sessions)  # noqa: E731
    else:
        peer = Terminado(s.python, s.out, single=True)
        job = lambda: idle_terminado(peer, a.idle_conns)  # noqa: E731

    async def bounded() -> dict:
        async with asyncio.timeout(IDLE_TIMEOUT):
            return await job()

    try:
        peer.start()
        return save(run_dir, target, "idle", asyncio.run(bounded()))
    except Exception as exc:
        log(f"  idle {target} failed: {exc!r}")
        return {"ok": False, "error": repr(exc)}
    finally:
        peer.shutdown()


def one_run(s: Setup, r: int) -> dict[str, dict]:
    run_dir = s.out / f"run{r}"
    run_dir.mkdir(parents=True, exist_ok=True)
    order = rotated(["raw", "terminado", "termsys"], r - 1)
    log(f"== run {r}/{s.args.runs} (order: {' '.join(order)})")
    results = phase_a(s, run_dir, order)
    time.sleep(1)
    for t in order:
        results[t]["concurrency"] = phase_c(s, run_dir, t)
        time.sleep(1)
    if s.args.idle_conns:
        for t in [t for t in order if t != "raw"]:
            results[t]["idle"] = phase_i(s, run_dir, t)
            time.sleep(1)
    log(summary_line(results))
    return results


def summary_line(res: dict[str, dict]) -> str:
    parts = []
    for t, d in res.items():
        e, tp, c = d["echo"], d["throughput"], d["concurrency"]
        parts.append(
            f"{t}: echo {e.get('p50_us')}/{e.get('p99_us')} us, {tp.get('MBps')} MB/s, "
            f"conc p99 {c.get('p99_us')} us fail {c.get('failures')}"
        )
    cpu = res["termsys"].get("cpu", {}).get("cpu_us_per_rt")
    idle = {t: d.get("idle", {}).get("kib_per_conn") for t, d in res.items() if "idle" in d}
    return "  " + "\n  ".join(parts) + f"\n  termsys CPU/rt {cpu} us; idle KiB/conn {idle}"


# --- report -------------------------------------------------------------------------------


@dataclass
class Row:
    """One figure of the table: where it is in a peer's results, and its goal if any.

    A goal is ("ratio-<=", 0.85) on termsys/terminado, or ("abs-<=", 150) on termsys's own
    figure (the median across runs; for failures the largest).
    """

    label: str
    path: tuple[str, ...]
    fmt: str = "{:.0f}"
    goal: tuple[str, float] | None = None
    scale: float = 1

    def extract(self, results: dict) -> float | None:
        value = results
        for key in self.path:
            value = value.get(key) if isinstance(value, dict) else None
        phase = results.get(self.path[0]) or {}
        if self.path[0] == "throughput" and not phase.get("complete"):
            return None
        if self.path[:2] == ("concurrency", "rss") and not phase.get("rss_root_is_server"):
            return None  # raw has no server: bench.py sampled its own process
        return None if value is None else value / self.scale


ROWS = [
    Row("echo p50 (us)", ("echo", "p50_us"), goal=("ratio-<=", 0.85)),
    Row("echo p99 (us)", ("echo", "p99_us"), goal=("ratio-<=", 0.75)),
    Row("output MB/s", ("throughput", "MBps"), "{:.1f}", ("ratio->=", 1.6)),
    Row("  server CPU in transfer (%)", ("throughput", "server_cpu_pct")),
    Row("{conns} sess x {rts} rt: p50 (ms)", ("concurrency", "p50_us"), "{:.2f}", scale=1000),
    Row(
        "{conns} sess x {rts} rt: p99 (ms)",
        ("concurrency", "p99_us"),
        "{:.1f}",
        ("ratio-<=", 0.4),
        scale=1000,
    ),
    Row("{conns} sess x {rts} rt: failures", ("concurrency", "failures"), goal=("abs-==", 0)),
    Row("  server peak RSS (MiB)", ("concurrency", "rss", "root_hwm_kb"), "{:.1f}", scale=1024),
    Row("server CPU / keystroke rt (us)", ("cpu", "cpu_us_per_rt"), goal=("abs-<=", 150)),
    Row("  echo p50, termsys alone (us)", ("cpu", "p50_us")),
    Row("{idle_conns} idle WS: KiB per conn", ("idle", "kib_per_conn"), "{:.1f}", ("abs-<", 64)),
    Row("  server RSS with them (MiB)", ("idle", "rss_after_kib"), "{:.1f}", scale=1024),
    Row("  idle failures", ("idle", "failures")),
]


def cell(values: list, fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} [{fmt.format(min(values))}..{fmt.format(max(values))}]"


def verdict(goal: tuple[str, float] | None, ratio: float | None, own: float | None) -> str:
    """``<= 0.85x: met`` for a goal on the ratio, ``<= 150: met`` for one on termsys's figure."""
    if goal is None:
        return ""
    kind, _, op = goal[0].partition("-")
    limit = goal[1]
    value = ratio if kind == "ratio" else own
    text = f"{op} {limit}{'x' if kind == 'ratio' else ''}"
    if value is None:
        return f"{text}: n/a"
    checks = {"<=": value <= limit, ">=": value >= limit, "<": value < limit, "==": value == limit}
    return f"{text}: {'met' if checks[op] else 'MISSED'}"


def report(runs: list[dict[str, dict]], args: argparse.Namespace) -> str:
    peers = ["raw", "terminado", "termsys"]
    header = f"{'figure':<31}" + "".join(f"{p:>22}" for p in peers)
    header += f"{'termsys/terminado':>19}  goal"
    lines = [header, "-" * (len(header) + 20)]
    for row in ROWS:
        per_peer = {p: [row.extract(run.get(p, {})) for run in runs] for p in peers}
        pairs = zip(per_peer["termsys"], per_peer["terminado"], strict=True)
        ratios = [a / b for a, b in pairs if a is not None and b]
        ratio = statistics.median(ratios) if ratios else None
        own_values = [v for v in per_peer["termsys"] if v is not None]
        own = None
        if own_values:
            worst = row.goal is not None and row.goal[0] == "abs-=="
            own = max(own_values) if worst else statistics.median(own_values)
        label = row.label.format(**vars(args))
        line = f"{label:<31}" + "".join(f"{cell(per_peer[p], row.fmt):>22}" for p in peers)
        line += f"{'' if ratio is None else f'{ratio:.2f}x':>19}  {verdict(row.goal, ratio, own)}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def load_runs(dirs: list[Path]) -> list[dict[str, dict]]:
    """Results of earlier runs (``<dir>/run*/<target>-<phase>.json``), pooled."""
    runs = []
    for run_dir in sorted(d for root in dirs for d in root.glob("run*") if d.is_dir()):
        run: dict[str, dict] = {}
        for path in run_dir.glob("*-*.json"):
            item = json.loads(path.read_text().strip().splitlines()[-1])
            run.setdefault(item["target"], {})[item["phase"]] = item
        runs.append(run)
    return runs


def environment(args: argparse.Namespace, python: Path) -> str:
    def out(cmd: list[str]) -> str:
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
            return run.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    commit = out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    versions = out([str(python), "-c", "import terminado,tornado,websockets;print("
                    "'terminado',terminado.__version__,'tornado',tornado.version,"
                    "'websockets',websockets.__version__)"])  # fmt: skip
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"date {time.strftime('%Y-%m-%d %H:%M')}, termsys {commit}"
        f"{' (uncommitted changes: ' + ' '.join(dirty.split()[1::2]) + ')' if dirty else ''}, "
        f"storage mode {args.mode}, {os.cpu_count()} CPUs, load average {load}\n"
        f"peers: {versions}; bash --norc --noprofile everywhere\n"
        f"runs {args.runs}; echo {args.n} round trips after {args.warmup} warm-up, interleaved; "
        f"CPU: {args.cpu_rts} round trips, termsys alone; throughput median of {args.reps} "
        f"transfers; {args.conns} sessions x {args.rts} round trips; {args.idle_conns} idle "
        f"WebSockets (termsys over {args.idle_sessions} sessions, terminado --single)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("RUNS", "3")))
    parser.add_argument("--n", type=int, default=2000, help="echo round trips per peer")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--cpu-rts", type=int, default=3000, help="round trips for CPU/rt")
    parser.add_argument("--reps", type=int, default=3, help="throughput transfers per peer")
    parser.add_argument("--conns", type=int, default=100)
    parser.add_argument("--rts", type=int, default=50)
    parser.add_argument("--idle-conns", type=int, default=1000, help="0 skips the idle phase")
    parser.add_argument("--idle-sessions", type=int, default=100)
    parser.add_argument("--mode", default="DATABASE", help="termsys storage mode")
    parser.add_argument("--out", type=Path, help="results dir (default /tmp/termsys-peers-*)")
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="print the table of earlier runs' results (pooled); run nothing",
    )
    args = parser.parse_args()
    if args.report:
        print(
            f"results: {' '.join(map(str, args.report))}; cells: median across runs "
            "[min..max]; ratio: median of per-run ratios\n"
        )
        print(report(load_runs(args.report), args))
        return
    out = args.out or Path(f"/tmp/termsys-peers-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    os.environ.update(TERMSYS_USER=USER, TERMSYS_PASSWORD=PASSWORD)  # the shared client's login
    python = peer_python()
    setup = Setup(args, python, load_shared_client(), payload(Path("/tmp/termbench")), out)
    env = environment(args, python)
    log(env)
    runs = [one_run(setup, r) for r in range(1, args.runs + 1)]
    text = f"{env}\ncells: median across runs [min..max]; ratio: median of per-run ratios\n\n"
    text += report(runs, args)
    (out / "peers.txt").write_text(text + "\n")
    print(text)
    log(f"results: {out}")


if __name__ == "__main__":
    main()

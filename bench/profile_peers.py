"""Where termsys spends its time in peers.py's phases, sampled with py-spy. Prints figures only.

Starts termsys as peers.py does and, for each phase, records the server with
``py-spy record -p PID -f raw --threads`` while the shared client (termsys alone) runs:

- ``echo``: ROUND_TRIPS keystroke echo round trips on one session;
- ``throughput``: ``cat`` of the 50 MB payload, REPS times;
- ``concurrency``: CONNS sessions x RTS echo round trips.

Then prints, per phase, the share of samples per thread, the frames with the most samples on
top of the stack (self), and the termsys / channels / uvicorn / websockets / asyncio functions
with the most samples anywhere in the stack (inclusive), each as ``function (file:line)``. The
raw files stay in --out for flame graphs (e.g. ``inferno-flamegraph``).

Run: .venv/bin/python bench/profile_peers.py [--py-spy /tmp/tools/bin/py-spy]
(install py-spy with: python3 -m venv /tmp/tools && /tmp/tools/bin/pip install py-spy)
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from peers import Termsys, log, payload, peer_python, run_bench
from switch import PASSWORD, USER

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
SPY_TIMEOUT = 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
OURS = ("sessions_app/", "termsys/", "channels/", "uvicorn/", "websockets/", "asyncio/")


def short(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)``."""
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path}{':' + m['line'] if m['line'] else ''})"


def summarize(raw: Path, top: int) -> str:
    threads: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        thread = re.sub(r"0x[0-9a-f]+", "", frames[0]).strip()
        threads[thread] += n
        total += n
        if len(frames) > 1:
            leaf[short(frames[-1])] += n
        for frame in {short(f) for f in frames[1:]}:
            if any(part in frame for part in OURS):
                inclusive[frame] += n
    if not total:
        return f"{raw.name}: no samples"

    def block(title: str, counter: collections.Counter[str]) -> list[str]:
        rows = [f"  {title}"]
        rows += [f"    {100 * n / total:5.1f}%  {name}" for name, n in counter.most_common(top)]
        return rows

    lines = [f"{raw.name}: {total} samples (idle threads included)"]
    lines += block("threads", threads)
    lines += block("self (top of stack)", leaf)
    lines += block("inclusive (termsys, channels, uvicorn, websockets, asyncio)", inclusive)
    return "\n".join(lines)


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (utime + stime) per thread of ``pid``, from /proc/PID/task."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return found


def thread_names(raw: Path) -> dict[int, str]:
    """tid -> Python thread name, from py-spy's ``thread (TID): NAME`` frames."""
    names = {}
    for m in re.finditer(r"thread \((\d+)\)(?:: ([^;]+))?;", raw.read_text(errors="replace")):
        names.setdefault(int(m[1]), m[2] or "?")
    return names


def cpu_report(before: dict[int, float], after: dict[int, float], raw: Path, per: int) -> str:
    names = thread_names(raw) if raw.exists() else {}
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    total = sum(used.values())
    lines = [f"  server CPU by thread: {total:.2f} s" + (f", {total / per * 1e6:.0f} us per round "
             "trip (setup and login included)" if per else "")]  # fmt: skip
    for tid, seconds in sorted(used.items(), key=lambda kv: -kv[1]):
        if seconds >= 0.01:
            share = f", {seconds / per * 1e6:.0f} us/rt" if per else ""
            lines.append(f"    {seconds:6.2f} s{share}  {names.get(tid, '?')} ({tid})")
    return "\n".join(lines)


def record(py_spy: str, pid: int, raw: Path, rate: int, gil: bool) -> subprocess.Popen:
    cmd = [py_spy, "record", "-p", str(pid), "-f", "raw", "-o", str(raw), "--threads"]
    cmd += ["--rate", str(rate), "--nonblocking", *(["--gil"] if gil else [])]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.5)  # let py-spy attach before the load starts
    return process


def finish(process: subprocess.Popen) -> None:
    """py-spy writes its file on SIGINT; kill it (by PID) if it does not stop."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=SPY_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=SPY_TIMEOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--py-spy", default="/tmp/tools/bin/py-spy")
    parser.add_argument("--phases", default="echo,throughput,concurrency")
    parser.add_argument("--round-trips", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--conns", type=int, default=100)
    parser.add_argument("--rts", type=int, default=50)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--mode", default="DATABASE")
    parser.add_argument("--gil", action="store_true", help="sample only the GIL holder")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, help="default /tmp/termsys-profile-*")
    args = parser.parse_args()
    out = args.out or Path(f"/tmp/termsys-profile-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.update(TERMSYS_USER=USER, TERMSYS_PASSWORD=PASSWORD)
    python = peer_python()
    jobs = {
        "echo": ["--phase", "echo", "--n", str(args.round_trips), "--warmup", "200"],
        "throughput": ["--phase", "throughput", "--reps", str(args.reps)],
        "concurrency": ["--phase", "concurrency", "--conns", str(args.conns)],
    }
    jobs["throughput"] += ["--payload", str(payload(Path("/tmp/termbench")))]
    jobs["concurrency"] += ["--rts", str(args.rts)]
    reports = []
    for phase in [p.strip() for p in args.phases.split(",") if p.strip()]:
        server = Termsys(args.mode, args.conns, out)
        spy = None
        try:
            server.start()
            raw = out / f"{phase}.raw"
            spy = record(args.py_spy, server.pid, raw, args.rate, args.gil)
            cpu0 = thread_cpu(server.pid)
            extra = ["--server-pid", str(server.pid)] if phase == "concurrency" else []
            spec = ["--peers", f"termsys={server.url}", *extra]
            result = run_bench(python, out, phase, [*jobs[phase], *spec]).get("termsys", {})
            cpu1 = thread_cpu(server.pid)
            finish(spy)
            spy = None
            keys = ("p50_us", "p99_us", "MBps", "failures", "server_cpu_pct")
            log(f"{phase}: " + ", ".join(f"{k} {result.get(k)}" for k in keys if k in result))
            per = args.round_trips + 200 if phase == "echo" else 0
            if phase == "concurrency":
                per = args.conns * (args.rts + 2)
            reports.append(summarize(raw, args.top) + "\n" + cpu_report(cpu0, cpu1, raw, per))
        finally:
            if spy is not None:
                finish(spy)
            server.shutdown()
    print("\n\n".join(reports))
    log(f"raw profiles: {out}")


if __name__ == "__main__":
    main()

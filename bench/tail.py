"""Where the slowest keystrokes of many sessions come from. Prints figures; asserts nothing.

peers.py's concurrency phase reports a p99; this says what made it. Per run, against a fresh
termsys (started as peers.py starts it): ``--conns`` sessions, a barrier, ``--rts`` echo round
trips each (``tail_client.py``, in the shared client's venv), then

- p50, p99 and max of the round trips, and the whole phase's wall time;
- CPU per round trip between the barrier and the end: the server process (all its threads),
  the client process, and the rest of the machine's busy time (the kernel's PTY workers, the
  shells' ``cat``, loopback TCP, anything else running), and how idle the machine was. When
  the machine is near 100 % busy, the latency of a keystroke is set by all three;
- when the slowest 2 % of round trips started, as clusters (round trips starting within 5 ms
  of each other): clusters 0.25 s apart are the storage ticks' (``outputwriter``); a cluster
  at 0 is the first burst of all sessions at once.

Run: .venv/bin/python bench/tail.py [--conns 100] [--rts 200] [--runs 3] [--mode DATABASE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from peers import SHARED, Termsys, log, peer_python
from switch import PASSWORD, USER

CLIENT = Path(__file__).resolve().parent / "tail_client.py"
CLUSTER_GAP_NS = 5_000_000
CLIENT_TIMEOUT = 600


def percentile(ordered: list[int], share: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] / 1e6


def clusters(round_trips: list[tuple[int, int]], share: float = 0.02) -> list[tuple[float, int]]:
    """(start in ms, how many) of the groups the slowest ``share`` of round trips start in."""
    took = sorted(t for _, t in round_trips)
    threshold = took[int(len(took) * (1 - share))]
    starts = sorted(s for s, t in round_trips if t >= threshold)
    groups: list[list[int]] = []
    for start in starts:
        if groups and start - groups[-1][-1] <= CLUSTER_GAP_NS:
            groups[-1].append(start)
        else:
            groups.append([start])
    return [(round(g[0] / 1e6), len(g)) for g in groups]


def one_run(args: argparse.Namespace, python: Path, logs: Path) -> str:
    server = Termsys(args.mode, args.conns, logs)
    server.start()
    try:
        cmd = [str(python), str(CLIENT), str(SHARED), server.url, str(args.conns)]
        cmd += [str(args.rts), str(server.pid)]
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False
        )
    finally:
        server.shutdown()
    if done.returncode != 0:
        return f"client failed: {done.stderr.strip()[-1500:]}"
    result = json.loads(done.stdout)
    trips = result["round_trips"]
    took = sorted(t for _, t in trips)
    n, wall = len(trips), result["wall_s"]
    busy = result["cpus"] * wall - result["machine_idle_s"]
    rest = busy - result["server_cpu_s"] - result["client_cpu_s"]
    per = lambda seconds: f"{seconds / n * 1e6:.0f}"  # noqa: E731
    return "\n".join(
        [
            f"  {n} round trips in {wall:.2f} s: p50 {percentile(took, 0.5):.1f} ms, "
            f"p99 {percentile(took, 0.99):.1f} ms, max {took[-1] / 1e6:.1f} ms",
            f"  CPU per round trip: server {per(result['server_cpu_s'])} µs, client "
            f"{per(result['client_cpu_s'])} µs, rest of the machine {per(rest)} µs; machine "
            f"{100 * busy / (result['cpus'] * wall):.0f} % busy",
            "  slowest 2 % start at (ms, count): "
            + ", ".join(f"{start} ({count})" for start, count in clusters(trips)),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=100)
    parser.add_argument("--rts", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mode", default="DATABASE", help="termsys storage mode")
    args = parser.parse_args()
    os.environ.update(TERMSYS_USER=USER, TERMSYS_PASSWORD=PASSWORD)  # the shared client's login
    python = peer_python()
    with tempfile.TemporaryDirectory(prefix="termsys-tail-") as logs:
        for run in range(1, args.runs + 1):
            log(f"== run {run}/{args.runs}: {args.conns} sessions x {args.rts} round trips")
            print(f"run {run}:\n{one_run(args, python, Path(logs))}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""tail.py's client: runs in the shared client's venv, prints one JSON object on stdout.

Opens CONNS termsys sessions with the shared client (``bench.py``, ``termclient.py``) set up
as its concurrency phase does (``stty raw -echo; exec cat``, two warm-up round trips), waits
for all of them, then runs RTS echo round trips on each at once. Records each round trip's
start and duration, and the CPU time of the server (SERVER_PID), of this process and of the
whole machine (/proc/stat) between the barrier and the end.

Run by tail.py: python tail_client.py SHARED_DIR URL CONNS RTS SERVER_PID
"""

import asyncio
import json
import os
import sys
import time

shared, url, conns, rts, server_pid = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
sys.path.insert(0, shared)
from termclient import make_adapter  # noqa: E402

import bench  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_idle() -> float:
    return int(open("/proc/stat").readline().split()[4]) / TICK


async def main() -> None:
    records: list[tuple[int, int]] = []
    ready = asyncio.Event()
    marks: dict[str, float] = {}
    settled = 0

    async def one(index: int):
        nonlocal settled
        adapter = make_adapter("termsys", url, open_timeout=30)
        await bench.setup_echo_session(adapter, 60)
        await bench.echo_round_trips(adapter, 2, 10, None, start=index)
        settled += 1
        if settled == conns:
            marks.update(
                server=process_cpu(server_pid),
                client=time.process_time(),
                idle=machine_idle(),
                wall=time.perf_counter(),
            )
            ready.set()
        await ready.wait()
        clock = time.perf_counter_ns
        for n in range(index, index + rts):
            letter = bench.LETTERS[n % 26]
            started = clock()
            await adapter.send(letter)
            async with asyncio.timeout(30):
                while letter not in await adapter.recv():
                    pass
            records.append((started, clock() - started))
        return adapter

    adapters = await asyncio.gather(*[one(i) for i in range(conns)])
    wall = time.perf_counter() - marks["wall"]
    result = {
        "wall_s": wall,
        "server_cpu_s": process_cpu(server_pid) - marks["server"],
        "client_cpu_s": time.process_time() - marks["client"],
        "machine_idle_s": machine_idle() - marks["idle"],
        "cpus": os.cpu_count(),
        "round_trips": [(start - records[0][0], took) for start, took in sorted(records)],
    }
    for adapter in adapters:
        await adapter.close()
    print(json.dumps(result))


asyncio.run(main())

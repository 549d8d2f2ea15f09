"""One storage write for every live terminal's batch of output: group commit.

Each live terminal stores its output in batches a few times a second (``LiveTerminal``), at
the ticks of one grid (multiples of ``conf.OUTPUT_FLUSH_SECONDS`` of the event loop's clock),
so the batches of every busy terminal come due together. ``store_output`` queues a batch; the
batches queued in the same turn of the event loop, and those that come while a write is in
flight, go to the terminals' database thread as one call, which the DATABASE provider makes
one transaction. A hundred typing users cost a few commits a second instead of hundreds, and
one hop to the database thread per tick instead of one per terminal.

Each caller still gets its own batch's result (the new end offset) or exception, so a
terminal's retry and error handling do not depend on the others.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import weakref
from dataclasses import dataclass, field

from sessions_app.dbthread import db_call
from sessions_app.storage.base import StorageProvider


@dataclass
class _Queue:
    """The batches waiting for the database thread, of one event loop."""

    batches: list[tuple[StorageProvider, str, int, bytes, asyncio.Future]] = field(
        default_factory=list
    )
    draining: bool = False
    task: asyncio.Task | None = None


_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue] = weakref.WeakKeyDictionary()


def next_tick(loop: asyncio.AbstractEventLoop, period: float) -> float:
    """Return the loop time of the next tick of the shared batch grid (after now)."""
    return (math.floor(loop.time() / period) + 1) * period


async def store_output(provider: StorageProvider, session_id: str, offset: int, data: bytes) -> int:
    """Store one terminal's batch with whatever other batches are due; return the new end."""
    loop = asyncio.get_running_loop()
    queue = _queues.get(loop)
    if queue is None:
        queue = _queues[loop] = _Queue()
    future = loop.create_future()
    queue.batches.append((provider, session_id, offset, data, future))
    if not queue.draining:
        queue.draining = True
        # Start on the next turn of the loop: the other terminals whose batch came due at
        # the same tick queue theirs in this one.
        loop.call_soon(_start, loop, queue, context=contextvars.Context())
    return await future


def _store_all(
    batches: list[tuple[StorageProvider, str, int, bytes, asyncio.Future]],
) -> list[int | Exception]:
    """In the database thread: one ``append_output_many`` per provider, results in order."""
    results: list[int | Exception] = [0] * len(batches)
    by_provider: dict[int, list[int]] = {}
    for index, (provider, *_rest) in enumerate(batches):
        by_provider.setdefault(id(provider), []).append(index)
    for indexes in by_provider.values():
        provider = batches[indexes[0]][0]
        stored = provider.append_output_many([batches[i][1:4] for i in indexes])
        for index, result in zip(indexes, stored, strict=True):
            results[index] = result
    return results


def _start(loop: asyncio.AbstractEventLoop, queue: _Queue) -> None:
    queue.task = loop.create_task(_drain(queue))


async def _drain(queue: _Queue) -> None:
    batches: list[tuple[StorageProvider, str, int, bytes, asyncio.Future]] = []
    try:
        while queue.batches:
            batches, queue.batches = queue.batches, []
            try:
                results = await db_call(_store_all, batches)
            except Exception as exc:  # the thread call itself failed: every batch did
                results = [exc] * len(batches)
            for (*_batch, future), result in zip(batches, results, strict=True):
                if future.done():  # its terminal stopped waiting (cancelled)
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
    finally:
        queue.draining = False
        # Cancelled (the loop is closing): nobody is left waiting for an answer.
        for *_batch, future in batches + queue.batches:
            if not future.done():
                future.cancel()

"""Batches of output that come due together are stored together, and each terminal still gets
its own answer: what it printed is stored exactly once, and a failure is its own."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async

from sessions_app.errors import NotFound
from sessions_app.models import StorageMode, TerminalSession, new_session_id
from sessions_app.outputwriter import store_output
from sessions_app.storage.database import DatabaseStorage
from tests.factories import ProjectFactory

pytestmark = pytest.mark.django_db(transaction=True)


class CountingStorage(DatabaseStorage):
    """The real DATABASE provider, counting the calls that reach it."""

    def __init__(self) -> None:
        super().__init__(scrollback_bytes=1024 * 1024)
        self.calls: list[int] = []

    def append_output_many(self, batches):
        self.calls.append(len(batches))
        return super().append_output_many(batches)


@sync_to_async
def make_sessions(user, count: int) -> list[str]:
    project = ProjectFactory(owner=user)
    ids = [new_session_id() for _ in range(count)]
    for session_id in ids:
        TerminalSession.objects.create(
            id=session_id,
            project=project,
            user=user,
            profile="system",
            tab_name="t",
            storage_mode=StorageMode.DATABASE,
        )
    return ids


@sync_to_async
def stored(storage, session_id: str) -> bytes:
    return storage.read_scrollback(session_id, max_bytes=1 << 20).data


async def test_batches_due_together_are_one_write_and_each_gets_its_own_answer(user):
    storage = CountingStorage()
    ids = await make_sessions(user, 20)
    missing = new_session_id()
    results = await asyncio.gather(
        *(store_output(storage, sid, 0, f"out {i}\r\n".encode()) for i, sid in enumerate(ids)),
        store_output(storage, missing, 0, b"lost?"),
        return_exceptions=True,
    )
    assert results[:20] == [len(f"out {i}\r\n") for i in range(20)]
    assert isinstance(results[20], NotFound)  # the bad batch fails alone
    for i, sid in enumerate(ids):
        assert await stored(storage, sid) == f"out {i}\r\n".encode()
    assert storage.calls == [21]  # one trip to the database thread for all of them

    # Batches that come while a write is in flight wait for it and go together next.
    first = asyncio.ensure_future(store_output(storage, ids[0], 7, b"more\r\n"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the first write is now in the database thread
    rest = [store_output(storage, sid, 8, b"later\r\n") for sid in ids[10:]]
    assert await first == 13 and await asyncio.gather(*rest) == [15] * 10
    assert storage.calls[1:] == [1, 10]
    assert await stored(storage, ids[12]) == b"out 12\r\nlater\r\n"

"""A database thread of the terminals' own, for work no request is waiting on.

A live terminal outlives the request or socket that started it. Its storage writes must not
go to that request's thread (gone when it ends) nor to asgiref's shared thread (which a
request can hold while it waits on the terminal): they go here, in order, one at a time.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from django.db import close_old_connections, connections

T = TypeVar("T")

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="termsys-db")
# This thread keeps a connection it opened at least this long, even with CONN_MAX_AGE=0 (the
# embedded SQLite default): reopening it for every batch of output costs more than the batch.
# A connection that broke is still closed after the call that saw it break.
KEEP_SECONDS = 60.0


def _keep_open() -> None:
    for conn in connections.all(initialized_only=True):
        opened = conn.connection
        if opened is not None and getattr(conn, "_termsys_kept", None) is not opened:
            conn._termsys_kept = opened
            if conn.close_at is not None:
                conn.close_at = max(conn.close_at, time.monotonic() + KEEP_SECONDS)


def _run(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    close_old_connections()
    try:
        return func(*args, **kwargs)
    finally:
        _keep_open()
        close_old_connections()


async def db_call(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``func(*args, **kwargs)`` in the terminals' database thread and return its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor, functools.partial(_run, func, *args, **kwargs))


def close_connections() -> None:
    """Close the database thread's connections (before a test database is dropped)."""
    _executor.submit(connections.close_all).result()

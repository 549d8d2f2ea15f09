"""A database thread of the terminals' own, for work no request is waiting on.

A live terminal outlives the request or socket that started it. Its storage writes must not
go to that request's thread (gone when it ends) nor to asgiref's shared thread (which a
request can hold while it waits on the terminal): they go here, in order, one at a time.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from django.db import close_old_connections, connections

T = TypeVar("T")

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="termsys-db")


def _run(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    close_old_connections()
    try:
        return func(*args, **kwargs)
    finally:
        close_old_connections()


async def db_call(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``func(*args, **kwargs)`` in the terminals' database thread and return its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor, functools.partial(_run, func, *args, **kwargs))


def close_connections() -> None:
    """Close the database thread's connections (before a test database is dropped)."""
    _executor.submit(connections.close_all).result()

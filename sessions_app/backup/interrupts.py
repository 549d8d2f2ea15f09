"""Ctrl-C during a restore: it stops the restore before the data is replaced, never after.

A restore has a point of no return: the commit of its transaction, or SQLite's page copy, whose
last step commits. Before it, SIGINT stops the restore as usual (KeyboardInterrupt: everything
rolls back, and the command says nothing changed). From ``point_of_no_return`` on, SIGINT is
only recorded (``requested``): the restore completes and says that it did. The page copy runs
in steps and looks at ``requested`` after each but the last: stopping there rolls it back.

The handler is installed by ``guarded`` in the main thread only (the only one Python delivers
signals to); elsewhere these functions change nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class _Guard:
    def __init__(self) -> None:
        self.deferred = False
        self.requested = False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.deferred:
            raise KeyboardInterrupt
        self.requested = True


_current: _Guard | None = None


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Handle SIGINT as this module says while the block runs."""
    global _current
    if threading.current_thread() is not threading.main_thread() or _current is not None:
        yield
        return
    guard = _Guard()
    previous = signal.signal(signal.SIGINT, guard.handle)
    _current = guard
    try:
        yield
    finally:
        _current = None
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def point_of_no_return() -> None:
    """From now until the end of ``guarded``, record SIGINT instead of stopping."""
    if _current is not None:
        _current.deferred = True


def requested() -> bool:
    """Whether SIGINT came since ``point_of_no_return``."""
    return _current is not None and _current.requested

"""Notice flag changes made by other processes when nothing else would tell this one.

Without ``REDIS_URL`` every process caches flags in its own memory and its channel layer
reaches only itself, so a change made by ``manage.py flags`` or by another server process
would reach this one only when its cached copy expires (five minutes). So every change also
writes a new number into the database once it has committed (``version_bump``: the single
``FlagsVersion`` row), and every process reads that number at most once a second, when it
reads a flag (``notice_changes``, called by ``Flag.get``): one primary-key query, and nothing
more while the number stays. When it moved, the process forgets every flag it has cached and
runs the hooks the channel-layer broadcast runs (``featureflags.broadcast``: live sessions
re-evaluate their storage mode). When the database cannot answer, the cached flags stay and
the next read a second later tries again. With a shared cache (``REDIS_URL``) the changing
process has already deleted the shared copies and told every process; the check then only
covers a change made without access to that cache (a command run without ``REDIS_URL``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
from collections import deque

from django.db import connection

logger = logging.getLogger(__name__)

CHECK_SECONDS = 1.0
MSG_UNREADABLE = (
    "flags: the change marker (featureflags_flagsversion) is unreadable (%s: %s); using the "
    "cached flags and trying again every second"
)
MSG_NOT_BUMPED = (
    "flags: could not move the change marker after a change of %s; processes without REDIS_URL "
    "see the change when their cached copy expires"
)

_lock = threading.Lock()
_checked_at = -math.inf  # time.monotonic() of the last check
_version: int | None = None  # the number last read; None before the first read
_unreadable = False
_names: set[str] = set()  # flags this process has read (and may have cached)
_written: deque[int] = deque(maxlen=16)  # numbers this process wrote (only to word the log)


def version_bump(name: str = "") -> None:
    """Move the change marker (after a change has committed). Never raises.

    The new number is random rather than the old one plus one: a marker emptied (a test's
    flush) or restored from a backup must not come back to a number a process last saw.
    """
    from featureflags.models import FlagsVersion

    version = secrets.randbits(62)
    _written.append(version)
    try:
        if not FlagsVersion.objects.filter(pk=1).update(version=version):
            FlagsVersion.objects.update_or_create(pk=1, defaults={"version": version})
    except Exception:
        logger.warning(MSG_NOT_BUMPED, name or "a flag", exc_info=True)


def version_read() -> int:
    """Return the change marker's number (0 before the first change)."""
    from featureflags.models import FlagsVersion

    return FlagsVersion.objects.filter(pk=1).values_list("version", flat=True).first() or 0


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def notice_changes(name: str | None = None) -> bool:
    """Forget this process's cached flags if the change marker moved since the last look (at
    most once every ``CHECK_SECONDS``); return whether it did. Never raises.

    Skipped inside a transaction (a failed query would break it; the next read outside one
    looks) and on an event loop's thread (no database queries there).
    """
    global _checked_at, _version, _unreadable
    if name is not None:
        _names.add(name)
    if time.monotonic() - _checked_at < CHECK_SECONDS:
        return False
    if _in_event_loop() or connection.in_atomic_block:
        return False
    if not _lock.acquire(blocking=False):
        return False  # another thread is looking right now
    try:
        if time.monotonic() - _checked_at < CHECK_SECONDS:
            return False
        _checked_at = time.monotonic()
        try:
            version = version_read()
        except Exception as exc:
            if not _unreadable:
                logger.warning(MSG_UNREADABLE, type(exc).__name__, exc)
                _unreadable = True
            return False
        if _unreadable:
            logger.info("flags: the change marker is readable again")
            _unreadable = False
        previous, _version = _version, version
        if version == previous:
            return False
        # The first look: flags cached before it (inside a transaction, say) may be stale.
        _forget(announce=previous is not None, here=version in _written)
        return previous is not None
    finally:
        _lock.release()


def _forget(*, announce: bool, here: bool = False) -> None:
    """Forget every flag this process may have cached; with ``announce``, run the change
    hooks for each on this process's listening event loops.

    ``here``: the number read is one this process wrote. The flags are forgotten all the same
    (another process may have changed one between this process's two looks); only the log
    line no longer says the change came from elsewhere.
    """
    from django.core.cache import cache
    from waffle.utils import get_setting, keyfmt

    from featureflags import broadcast
    from featureflags.evaluation import forget
    from featureflags.models import Flag

    names = set(_names)
    try:
        names.update(Flag.objects.values_list("name", flat=True))
    except Exception:
        logger.warning("flags: could not list the flags; forgetting those read here only")
    for flag in sorted(names):
        forget(flag)
    try:
        cache.delete(keyfmt(get_setting("ALL_FLAGS_CACHE_KEY")))
    except Exception:
        logger.warning("flags: could not clear the cached list of all flags", exc_info=True)
    if announce:
        if here:
            logger.debug("flags: the change marker moved with a change made here")
        else:
            logger.info("flags: changed in another process; cached flags forgotten")
        broadcast.dispatch_here(sorted(names))


def reset() -> None:
    """Forget what this process knows of the marker (tests)."""
    global _checked_at, _version, _unreadable
    with _lock:
        _checked_at, _version, _unreadable = -math.inf, None, False
        _names.clear()
        _written.clear()

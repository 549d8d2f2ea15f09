"""The write-behind sync engine of HYBRID storage: drains journal records into the database.

One engine (one thread) per process. Records are applied in journal order, so every session's
writes land in the order they were made, in batches of one transaction each. Every apply is
idempotent: a session row is created only if missing, a state write carries its version and
changes zero rows when the database already has that version or a newer one, events carry a
unique key, and output is keyed by byte offset. Replaying a journal after a crash therefore
changes nothing that already landed.

When the database is down a circuit breaker opens: the engine stops trying for a back-off
interval (0.25 s doubling to 30 s), the journal keeps accepting writes up to its bound, and
the engine drains by itself when the database answers again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    close_old_connections,
    connections,
    transaction,
)
from django.utils.dateparse import parse_datetime

from sessions_app.models import SessionEvent, TerminalSession
from sessions_app.storage.database import DatabaseStorage

logger = logging.getLogger(__name__)

BATCH_RECORDS = 2000
BATCH_BYTES = 4 * 1024 * 1024
# SQLite has one writer at a time and its busy handler waits in growing steps: between two
# batches the engine pauses this long so a request waiting for the lock gets it.
SQLITE_PAUSE = 0.02
BACKOFF_START = 0.25
BACKOFF_MAX = 30.0
FSYNC_INTERVAL = 1.0

# Errors that mean "the database is unreachable", as opposed to "this record is bad".
UNAVAILABLE = (OperationalError, InterfaceError)


@dataclass
class Pending:
    """A journal record waiting to be applied."""

    lsn: int
    kind: str
    session_id: str
    meta: dict[str, Any]
    data: bytes = b""
    queued_at: float = field(default_factory=time.monotonic)


def _datetimes(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for name in ("created_at", "last_activity", "closed_at"):
        if isinstance(out.get(name), str):
            out[name] = parse_datetime(out[name])
    return out


class CircuitBreaker:
    """Fail fast while the database is down; probe again after a growing back-off."""

    def __init__(self) -> None:
        self.failures = 0
        self.open_until = 0.0
        self.last_error = ""

    @property
    def is_open(self) -> bool:
        return time.monotonic() < self.open_until

    def failed(self, error: BaseException) -> float:
        self.failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_START * 2 ** (self.failures - 1))
        self.open_until = time.monotonic() + delay
        self.last_error = f"{type(error).__name__}: {error}".strip()[:300]
        return delay

    def succeeded(self) -> None:
        if self.failures:
            logger.warning("database reachable again after %d failed attempts", self.failures)
        self.failures = 0
        self.open_until = 0.0
        self.last_error = ""


class SyncEngine:
    """Apply queued records to the database in a thread of its own."""

    def __init__(
        self,
        *,
        database: DatabaseStorage,
        on_applied: Callable[[int], None],
        on_tick: Callable[[], None] = lambda: None,
    ) -> None:
        self.database = database
        self.on_applied = on_applied  # called with the highest lsn applied
        self.on_tick = on_tick  # called about once a second (journal fsync)
        self.breaker = CircuitBreaker()
        self.applied_lsn = 0
        self._queue: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="termsys-sync", daemon=True)
        self._thread.start()

    # --- producer side (any thread) -------------------------------------------------------

    def put(self, record: Pending) -> None:
        with self._cond:
            self._queue.append(record)
            self._cond.notify()

    def pending(self) -> dict[str, Any]:
        with self._cond:
            oldest = self._queue[0].queued_at if self._queue else None
            count = len(self._queue)
        return {
            "count": count,
            "oldest_age": round(time.monotonic() - oldest, 3) if oldest else 0.0,
            "circuit": "open" if self.breaker.failures else "closed",
            "last_error": self.breaker.last_error,
        }

    def wait_drained(self, timeout: float | None = None, session_id: str | None = None) -> bool:
        """Block until nothing (of ``session_id``, if given) is pending; return False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._busy or any(
                session_id is None or r.session_id == session_id for r in self._queue
            ):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 0.5)
        return True

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # --- the engine's thread --------------------------------------------------------------

    def _run(self) -> None:
        last_tick = time.monotonic()
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait(FSYNC_INTERVAL)
                    if time.monotonic() - last_tick >= FSYNC_INTERVAL:
                        break
                if self._stopping and not self._queue:
                    break
                batch = self._take_batch() if not self.breaker.is_open else []
                self._busy = bool(batch)
            if time.monotonic() - last_tick >= FSYNC_INTERVAL:
                last_tick = time.monotonic()
                self._safe(self.on_tick)
            if batch:
                self._apply_batch(batch)
                if connections["default"].vendor == "sqlite":
                    time.sleep(SQLITE_PAUSE)
            elif self.breaker.is_open:
                time.sleep(min(0.1, max(0.0, self.breaker.open_until - time.monotonic())))
        close_old_connections()
        connections.close_all()

    def _take_batch(self) -> list[Pending]:
        batch: list[Pending] = []
        size = 0
        while self._queue and len(batch) < BATCH_RECORDS and size < BATCH_BYTES:
            record = self._queue[0]
            batch.append(record)
            size += len(record.data)
            self._queue.popleft()
        return batch

    def _apply_batch(self, batch: list[Pending]) -> None:
        close_old_connections()
        try:
            with transaction.atomic():
                for record in _coalesce(batch):
                    self._apply(record)
        except UNAVAILABLE as exc:
            self._requeue(batch)
            delay = self.breaker.failed(exc)
            connections.close_all()  # a broken connection must not be reused
            logger.warning(
                "database unavailable (%s); %d records wait, retry in %.2fs",
                self.breaker.last_error,
                len(self._queue),
                delay,
            )
            return
        except (IntegrityError, DatabaseError, ValueError, KeyError, TypeError):
            logger.exception("a batch of %d records failed; applying one by one", len(batch))
            if not self._apply_one_by_one(batch):
                return
        else:
            self.breaker.succeeded()
        self._done(batch)

    def _apply_one_by_one(self, batch: list[Pending]) -> bool:
        for index, record in enumerate(batch):
            try:
                with transaction.atomic():
                    self._apply(record)
            except UNAVAILABLE as exc:
                self._requeue(batch[index:])
                self.breaker.failed(exc)
                connections.close_all()
                self._done(batch[:index])
                return False
            except Exception:
                logger.exception(
                    "dropping journal record %d (%s of %s) that the database refuses",
                    record.lsn,
                    record.kind,
                    record.session_id,
                )
        return True

    def _requeue(self, batch: list[Pending]) -> None:
        with self._cond:
            self._queue.extendleft(reversed(batch))
            self._busy = False
            self._cond.notify_all()

    def _done(self, batch: list[Pending]) -> None:
        if batch:
            self.applied_lsn = max(self.applied_lsn, batch[-1].lsn)
            self._safe(self.on_applied, self.applied_lsn)
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    @staticmethod
    def _safe(func: Callable[..., Any], *args: Any) -> None:
        try:
            func(*args)
        except Exception:
            logger.exception("sync engine callback failed")

    def _apply(self, record: Pending) -> None:
        if record.kind == "create":
            fields = _datetimes(record.meta["record"])
            fields.pop("id", None)
            fields["output_bytes"] = 0  # output arrives as its own records
            TerminalSession.objects.get_or_create(pk=record.session_id, defaults=fields)
        elif record.kind == "update":
            fields = _datetimes(record.meta["record"])
            fields.pop("id", None)
            # A stale write (the database already has this version or newer) changes zero rows.
            TerminalSession.objects.filter(
                pk=record.session_id, version__lt=fields["version"]
            ).update(**{k: v for k, v in fields.items() if k not in ("created_at", "output_bytes")})
        elif record.kind == "event":
            SessionEvent.objects.get_or_create(
                key=record.meta["id"],
                defaults={
                    "session_id": record.session_id,
                    "kind": record.meta["kind"],
                    "data": record.meta.get("data") or {},
                },
            )
        elif record.kind == "output":
            self.database.append_output(record.session_id, record.meta["offset"], record.data)
        elif record.kind == "delete":
            TerminalSession.objects.filter(pk=record.session_id).delete()
        else:
            raise ValueError(f"unknown journal record kind {record.kind!r}")


def _coalesce(batch: list[Pending]) -> list[Pending]:
    """Merge each session's contiguous output in a batch into one write.

    Sessions are independent, so one session's output may be merged across another's records;
    any other record of the same session (state, event) ends the run, keeping per-session order.
    """
    merged: list[Pending] = []
    parts: dict[int, list[bytes]] = {}  # index in merged -> the data pieces of an output run
    open_run: dict[str, tuple[int, int]] = {}  # session -> (index in merged, next offset)
    for record in batch:
        if record.kind != "output":
            open_run.pop(record.session_id, None)
            merged.append(record)
            continue
        run = open_run.get(record.session_id)
        if run is not None and run[1] == record.meta["offset"]:
            parts[run[0]].append(record.data)
        else:
            parts[len(merged)] = [record.data]
            run = (len(merged), record.meta["offset"])
            merged.append(record)
        open_run[record.session_id] = (run[0], record.meta["offset"] + len(record.data))
    for index, pieces in parts.items():
        if len(pieces) > 1:
            first = merged[index]
            merged[index] = Pending(
                lsn=first.lsn,
                kind="output",
                session_id=first.session_id,
                meta=first.meta,
                data=b"".join(pieces),
                queued_at=first.queued_at,
            )
    return merged

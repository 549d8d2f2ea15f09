"""HYBRID storage: memory first for reads and writes, a local journal, write-behind to the database.

Every write goes, in this order, to the journal (one ``write`` to the operating system, so a
crash of the server process loses nothing), to memory (where reads are served from), and to
the sync engine's queue, which applies it to the database in batches, in order, idempotently.
On start-up the journal is replayed into memory and into the queue; what already reached the
database is re-applied without effect. Power loss: see ``TERMSYS_JOURNAL_FSYNC`` in README.md
(the default fsyncs the journal about once a second, so at most about a second of writes).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from sessions_app.errors import NotFound, TermsysError
from sessions_app.storage.base import (
    Scrollback,
    SessionRecord,
    StorageProvider,
    newest_versions,
)
from sessions_app.storage.database import DatabaseStorage
from sessions_app.storage.journal import Journal, JournalFull
from sessions_app.storage.local import LocalStorage
from sessions_app.storage.sync import Pending, SyncEngine

logger = logging.getLogger(__name__)

# Above this share of the journal's bound, terminals stop reading their PTYs until it drains.
BACKPRESSURE_SHARE = 0.8


class StorageBusy(TermsysError):
    status, code, close_code = 503, "storage_busy", 4503


def _jsonable(record: SessionRecord) -> dict[str, Any]:
    out = dataclasses.asdict(record)
    for name, value in out.items():
        if isinstance(value, datetime):
            out[name] = value.isoformat()
    return out


def _record(values: dict[str, Any]) -> SessionRecord:
    from django.utils.dateparse import parse_datetime

    fields = dict(values)
    for name in ("created_at", "last_activity", "closed_at"):
        if isinstance(fields.get(name), str):
            fields[name] = parse_datetime(fields[name])
    return SessionRecord(**fields)


class HybridStorage(StorageProvider):
    mode = "HYBRID"
    appends_inline = True  # output is journaled in the event loop, before clients see it

    def __init__(
        self,
        *,
        scrollback_bytes: int,
        memory_max_bytes: int,
        journal_dir: Path,
        journal_max_bytes: int,
        fsync: str,
    ) -> None:
        self.scrollback_bytes = scrollback_bytes
        self.memory = LocalStorage(scrollback_bytes=scrollback_bytes, max_bytes=memory_max_bytes)
        self.database = DatabaseStorage(scrollback_bytes=scrollback_bytes)
        journal_dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(journal_dir, max_bytes=journal_max_bytes, fsync=fsync)
        self.journal_max_bytes = journal_max_bytes
        self._lock = threading.RLock()
        # Sessions deleted here: the database may list them until the delete is written behind,
        # so reads leave them out (ids are never reused: a tombstone can never hide another).
        self._deleted: set[str] = set()
        self.engine = SyncEngine(
            database=self.database,
            on_applied=self.journal.release_through,
            on_tick=self.journal.sync,
        )
        self.replayed = self._replay()

    # --- the write path -------------------------------------------------------------------

    def _write(self, kind: str, session_id: str, meta: dict[str, Any], data: bytes = b"") -> None:
        """Journal a write, then queue it for the database (memory is updated by the caller)."""
        try:
            lsn = self.journal.append(kind, session_id, meta, data)
        except JournalFull as exc:
            raise StorageBusy(str(exc)) from None
        self.engine.put(Pending(lsn=lsn, kind=kind, session_id=session_id, meta=meta, data=data))

    def backpressure(self) -> bool:
        """Return True while writers should hold back (the journal is nearly full)."""
        return self.journal.size() > self.journal_max_bytes * BACKPRESSURE_SHARE

    def _replay(self) -> int:
        """Load the journal into memory and the sync queue; return how many records."""
        count = 0
        for record in self.journal.replay():
            count += 1
            try:
                self._apply_to_memory(record.kind, record.session_id, record.meta, record.data)
            except (ValueError, NotFound):
                pass  # memory lacks what came before; the database has it
            self.engine.put(
                Pending(
                    lsn=record.lsn,
                    kind=record.kind,
                    session_id=record.session_id,
                    meta=record.meta,
                    data=record.data,
                )
            )
        for problem in self.journal.problems:
            logger.error("journal: %s", problem)
        if count:
            logger.warning("replayed %d journal records; syncing them to the database", count)
        return count

    def _apply_to_memory(
        self, kind: str, session_id: str, meta: dict[str, Any], data: bytes
    ) -> None:
        if kind in ("create", "update"):
            self.memory.put(_record(meta["record"]))
        elif kind == "event":
            self.memory.add_event(session_id, meta["kind"], meta.get("data"))
        elif kind == "output":
            if self.memory.get(session_id) is not None:
                self.memory.append_output(session_id, meta["offset"], data)
        elif kind == "delete":
            self.memory.delete(session_id)
            self._deleted.add(session_id)

    def _in_memory(self, session_id: str) -> SessionRecord | None:
        """Return the session from memory, loading it from the database on a miss."""
        if session_id in self._deleted:
            return None
        record = self.memory.get(session_id)
        if record is None:
            record = self.database.get(session_id)
            if record is not None:
                self.memory.put(record)
        return record

    # --- the contract ---------------------------------------------------------------------

    def create(self, record: SessionRecord) -> SessionRecord:
        with self._lock:
            created = self.memory.create(record)
            self._write("create", created.id, {"record": _jsonable(created)})
        return created

    def get(self, session_id: str) -> SessionRecord | None:
        if session_id in self._deleted:
            return None
        record = self.memory.get(session_id)
        if record is not None:
            return record
        record = self.database.get(session_id)
        if record is not None and record.storage_mode == self.mode:
            self.memory.put(record)  # ours (from before a restart): serve it from memory now
        return record

    def update(
        self, session_id: str, *, expected_version: int | None = None, **changes: Any
    ) -> SessionRecord:
        with self._lock:
            if self._in_memory(session_id) is None:
                raise NotFound(f"No session {session_id}.")
            updated = self.memory.update(session_id, expected_version=expected_version, **changes)
            self._write("update", session_id, {"record": _jsonable(updated)})
        return updated

    def delete(self, session_id: str) -> None:
        with self._lock:
            self.memory.delete(session_id)
            self._deleted.add(session_id)
            self._write("delete", session_id, {})

    def _not_deleted(self, records: list[SessionRecord]) -> list[SessionRecord]:
        return [r for r in records if r.id not in self._deleted]

    def list_by_project(
        self, project_id: int, *, include_closed: bool = False
    ) -> list[SessionRecord]:
        return newest_versions(
            self.memory.list_by_project(project_id, include_closed=include_closed),
            self._not_deleted(
                self.database.list_by_project(project_id, include_closed=include_closed)
            ),
        )

    def list_by_user(self, user_id: int, *, include_closed: bool = False) -> list[SessionRecord]:
        return newest_versions(
            self.memory.list_by_user(user_id, include_closed=include_closed),
            self._not_deleted(self.database.list_by_user(user_id, include_closed=include_closed)),
        )

    def add_event(self, session_id: str, kind: str, data: dict[str, Any] | None = None) -> None:
        with self._lock:
            self._in_memory(session_id)
            self.memory.add_event(session_id, kind, data)
            # The event's key makes re-applying it a no-op (lsns may repeat after a power loss).
            meta = {"kind": kind, "data": data or {}, "id": secrets.token_hex(12)}
            self._write("event", session_id, meta)

    def append_output(self, session_id: str, offset: int, data: bytes) -> int:
        with self._lock:
            record = self._in_memory(session_id)
            if record is None:
                raise NotFound(f"No session {session_id}.")
            end = record.output_bytes
            if offset + len(data) <= end:
                return end
            if offset > end:
                raise ValueError(
                    f"output of {session_id} has a gap: stored up to {end}, got {offset}"
                )
            fresh = data[end - offset :]
            self._write("output", session_id, {"offset": end}, fresh)
            return self.memory.append_output(session_id, end, fresh)

    def read_scrollback(
        self, session_id: str, *, max_bytes: int, since: int | None = None
    ) -> Scrollback:
        if self._in_memory(session_id) is None:
            raise NotFound(f"No session {session_id}.")
        memory = self.memory.read_scrollback(session_id, max_bytes=max_bytes, since=since)
        wanted = max(since or 0, memory.end - min(max_bytes, self.scrollback_bytes), 0)
        if memory.start <= wanted:
            return memory
        # Memory dropped older bytes (its cap, or a restart): the database may still have them.
        try:
            stored = self.database.read_scrollback(session_id, max_bytes=max_bytes, since=since)
        except NotFound:
            return memory
        if stored.start >= memory.start or stored.end < memory.start:
            return memory
        data = stored.data[: memory.start - stored.start] + memory.data
        start = stored.start
        return Scrollback(
            data=data, start=start, end=start + len(data), pruned=start > (since or 0)
        )

    def cleanup(self, before: datetime) -> int:
        self.flush()  # then the database holds every session this provider has
        self.memory.cleanup(before)
        return self.database.cleanup(before)

    def prefetch(self, project_ids: list[int]) -> None:
        for project_id in project_ids:
            for record in self._not_deleted(self.database.list_by_project(project_id)):
                if self.memory.get(record.id) is None:
                    self.memory.put(record)

    def release(self, session_id: str) -> None:
        """Forget a session that moved to another mode (after flushing it)."""
        self.engine.wait_drained(timeout=30, session_id=session_id)
        self.memory.delete(session_id)

    def flush(self, session_id: str | None = None, timeout: float = 30) -> None:
        if not self.engine.wait_drained(timeout=timeout, session_id=session_id):
            raise StorageBusy(
                f"HYBRID writes not yet in the database after {timeout:.0f}s "
                f"({self.engine.pending()['count']} pending): is the database down?"
            )

    def pending(self) -> dict[str, Any]:
        return {**self.engine.pending(), "journal_bytes": self.journal.size()}

    def close(self) -> None:
        self.engine.stop()
        self.journal.close()

"""LOCAL storage: sessions, events and output held in this process's memory only.

Loss window: everything. A restart of the server process loses every session record, event
and byte of scrollback stored here; nothing is written anywhere else. Use it where that is
acceptable (development, throw-away terminals) or as the memory tier of another provider.

Memory is bounded twice: each session keeps at most ``scrollback_bytes`` of its newest output,
and all sessions together keep at most ``max_bytes``. Past that cap the retained output of
sessions nobody is watching (any state but ``active`` / ``creating``) is dropped, the longest
idle first; a watched session's output is never dropped to make room.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from django.utils import timezone

from sessions_app.errors import NotFound, VersionConflict
from sessions_app.models import StorageMode
from sessions_app.states import LIVE_STATES, SessionState
from sessions_app.storage.base import (
    Scrollback,
    SessionRecord,
    StorageProvider,
    check_update_fields,
)

logger = logging.getLogger(__name__)

# Fields ``update`` may change: the id is the key and the version is the provider's to bump.
# Output of sessions in these states is kept even when the total cap is exceeded.
WATCHED_STATES = frozenset({SessionState.ACTIVE, SessionState.CREATING})


@dataclass
class _Entry:
    record: SessionRecord
    output: bytearray = field(default_factory=bytearray)  # the newest bytes, ending at the end
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def retained_start(self) -> int:
        return self.record.output_bytes - len(self.output)


class LocalStorage(StorageProvider):
    mode = StorageMode.LOCAL

    def __init__(self, scrollback_bytes: int, max_bytes: int) -> None:
        self.scrollback_bytes = scrollback_bytes
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._total = 0  # bytes of output retained over all sessions
        self._warned_over_cap = False

    def _entry(self, session_id: str) -> _Entry:
        entry = self._entries.get(session_id)
        if entry is None:
            raise NotFound(f"No session {session_id}.")
        return entry

    def create(self, record: SessionRecord) -> SessionRecord:
        now = timezone.now()
        record = replace(record, created_at=now, last_activity=now)
        with self._lock:
            if record.id in self._entries:
                raise ValueError(f"session {record.id} already exists")
            self._entries[record.id] = _Entry(record)
        return record

    def put(self, record: SessionRecord) -> None:
        """Insert or replace a record as given (version and times included), keeping output
        and events. For a memory tier loading what another store holds."""
        with self._lock:
            entry = self._entries.get(record.id)
            if entry is None:
                self._entries[record.id] = _Entry(record)
            else:
                entry.record = replace(record, output_bytes=entry.record.output_bytes)

    def get(self, session_id: str) -> SessionRecord | None:
        with self._lock:
            entry = self._entries.get(session_id)
            return entry.record if entry else None

    def update(
        self, session_id: str, *, expected_version: int | None = None, **changes: Any
    ) -> SessionRecord:
        check_update_fields(changes)
        changes.setdefault("last_activity", timezone.now())
        with self._lock:
            entry = self._entry(session_id)
            if expected_version is not None and entry.record.version != expected_version:
                raise VersionConflict(
                    f"session {session_id} changed since version {expected_version}"
                )
            entry.record = replace(entry.record, version=entry.record.version + 1, **changes)
            self._enforce_cap()  # the session may have just become evictable
            return entry.record

    def delete(self, session_id: str) -> None:
        with self._lock:
            entry = self._entries.pop(session_id, None)
            if entry is not None:
                self._total -= len(entry.output)

    def _list(self, include_closed: bool, **match: int) -> list[SessionRecord]:
        with self._lock:
            records = [
                e.record
                for e in self._entries.values()
                if all(getattr(e.record, k) == v for k, v in match.items())
                and (include_closed or e.record.closed_at is None)
            ]
        return sorted(records, key=lambda r: (r.created_at, r.id))

    def list_by_project(
        self, project_id: int, *, include_closed: bool = False
    ) -> list[SessionRecord]:
        return self._list(include_closed, project_id=project_id)

    def list_by_user(self, user_id: int, *, include_closed: bool = False) -> list[SessionRecord]:
        return self._list(include_closed, user_id=user_id)

    def add_event(self, session_id: str, kind: str, data: dict[str, Any] | None = None) -> None:
        with self._lock:
            self._entry(session_id).events.append((kind, dict(data or {})))

    def events(self, session_id: str) -> list[tuple[str, dict[str, Any]]]:
        """Return the session's events in the order they were added (for tests and admin)."""
        with self._lock:
            return list(self._entry(session_id).events)

    def append_output(self, session_id: str, offset: int, data: bytes) -> int:
        with self._lock:
            entry = self._entry(session_id)
            end = entry.record.output_bytes
            if offset + len(data) <= end:
                return end  # already stored: a retried batch
            if offset > end:
                raise ValueError(
                    f"output of {session_id} has a gap: stored up to {end}, got {offset}"
                )
            data = data[end - offset :]
            before = len(entry.output)
            entry.output += data
            excess = len(entry.output) - self.scrollback_bytes
            if excess > 0:
                del entry.output[:excess]  # O(1) amortised: bytearray trims its head in place
            self._total += len(entry.output) - before
            end += len(data)
            entry.record = replace(entry.record, output_bytes=end, last_activity=timezone.now())
            self._enforce_cap()
            return end

    def _enforce_cap(self) -> None:
        """Drop unwatched sessions' output, longest idle first, until under ``max_bytes``."""
        if self._total <= self.max_bytes:
            self._warned_over_cap = False
            return
        idle = sorted(
            (
                e
                for e in self._entries.values()
                if e.output and e.record.state not in WATCHED_STATES
            ),
            key=lambda e: (e.record.last_activity, e.record.created_at, e.record.id),
        )
        for entry in idle:
            self._total -= len(entry.output)
            entry.output = bytearray()
            if self._total <= self.max_bytes:
                return
        if not self._warned_over_cap:
            self._warned_over_cap = True
            logger.warning(
                "LOCAL storage holds %d bytes of output, over TERMSYS_LOCAL_MAX_BYTES=%d, "
                "and all of it belongs to active sessions; keeping it.",
                self._total,
                self.max_bytes,
            )

    def read_scrollback(
        self, session_id: str, *, max_bytes: int, since: int | None = None
    ) -> Scrollback:
        with self._lock:
            entry = self._entry(session_id)
            end = entry.record.output_bytes
            retained = entry.retained_start
            start = max(since or 0, end - min(max_bytes, self.scrollback_bytes), retained, 0)
            data = bytes(entry.output[start - retained :])
        return Scrollback(
            data=data, start=start, end=start + len(data), pruned=start > (since or 0)
        )

    def cleanup(self, before: datetime) -> int:
        with self._lock:
            ended = [
                sid
                for sid, e in self._entries.items()
                if e.record.state not in LIVE_STATES and e.record.last_activity < before
            ]
            for sid in ended:
                self._total -= len(self._entries.pop(sid).output)
        return len(ended)

    def stats(self) -> dict[str, int]:
        """Return the session count and retained output bytes against the cap."""
        with self._lock:
            return {
                "sessions": len(self._entries),
                "bytes": self._total,
                "max_bytes": self.max_bytes,
            }

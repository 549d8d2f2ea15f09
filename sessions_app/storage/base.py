"""The storage provider contract and the frozen records that cross it."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

# Every alternative starts with ESC or another control byte, so the regex engine skips plain
# text quickly; text with no control byte at all skips the regex (see plain_text).
ANSI_RE = re.compile(
    rb"\x1b(?:"
    rb"\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC ... BEL / ST
    rb"|\[[0-?]*[ -/]*[@-~]"  # CSI
    rb"|[PX^_][^\x1b]*\x1b\\"  # DCS / SOS / PM / APC
    rb"|[ -/]+[0-~]"  # nF: intermediates, then a final byte (ESC ( B, ESC ) 0, ESC # 8)
    rb"|[0-Z\\-~])"  # two-byte escapes: Fp (ESC 7, ESC 8, ESC =), Fe (ESC M), Fs (ESC c)
    rb"|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"  # other control bytes (keep \t \n \r)
)
CONTROL_BYTES = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
# ESC ] (OSC), P (DCS), X, ^ and _ read as two-byte escapes at the very end of the output so far,
# but begin longer sequences once their text and terminator arrive.
STRING_STARTS = {b"\x1b]", b"\x1bP", b"\x1bX", b"\x1b^", b"\x1b_"}


def plain_text(data: bytes) -> str:
    """Return ``data`` as text with escape sequences and control bytes removed."""
    if len(data.translate(None, CONTROL_BYTES)) != len(data):  # else: nothing to remove
        data = ANSI_RE.sub(b"", data)
    return data.replace(b"\r\n", b"\n").decode("utf-8", "replace")


def plain_text_after(data: bytes, text: str, more: bytes) -> str:
    """Return ``plain_text(data + more)``, given ``text == plain_text(data)``.

    Only ``more`` is read when nothing can span the boundary: ``data`` ends neither inside an
    escape sequence, nor with ``\r`` (a ``\r\n`` pair), nor with a non-ASCII byte (a UTF-8
    character cut in two). Otherwise the whole is read again.
    """
    if not data:
        return plain_text(more)
    last_escape = data.rfind(b"\x1b")
    if last_escape >= 0:
        match = ANSI_RE.match(data, last_escape)
        if (
            match is None
            or match.end() - last_escape < 2  # ESC alone, or an unfinished CSI
            or match.group() in STRING_STARTS  # an OSC or DCS whose text is still to come
        ):
            return plain_text(data + more)
    if data[-1] == 0x0D or data[-1] >= 0x80:
        return plain_text(data + more)
    return text + plain_text(more)


@dataclass(frozen=True)
class SessionRecord:
    """A terminal session as storage knows it."""

    id: str
    project_id: int
    user_id: int
    profile: str
    tab_name: str
    state: str
    storage_mode: str
    title: str = ""
    cwd: str = ""
    pid: int | None = None
    node: str = ""
    version: int = 1
    cols: int = 80
    rows: int = 24
    output_bytes: int = 0
    created_at: datetime | None = None
    last_activity: datetime | None = None
    exit_code: int | None = None
    end_reason: str = ""
    closed_at: datetime | None = None
    tab_named: bool = False  # the user chose tab_name (rename): it wins over the process title


RECORD_FIELDS = tuple(f.name for f in fields(SessionRecord))
# Fields ``update`` may change: the id is the key and the version is the provider's to bump.
UPDATABLE_FIELDS = frozenset(RECORD_FIELDS) - {"id", "version"}


def check_update_fields(changes: dict[str, Any]) -> None:
    """Raise TypeError naming any field ``update`` may not change."""
    unknown = set(changes) - UPDATABLE_FIELDS
    if unknown:
        raise TypeError(f"unknown session fields: {', '.join(sorted(unknown))}")


def newest_versions(*lists: list[SessionRecord]) -> list[SessionRecord]:
    """Merge record lists keeping each session's highest version (the first list wins ties),
    ordered by creation time."""
    newest: dict[str, SessionRecord] = {}
    for records in lists:
        for record in records:
            if record.id not in newest or newest[record.id].version < record.version:
                newest[record.id] = record
    return sorted(newest.values(), key=lambda r: (r.created_at is None, r.created_at, r.id))


@dataclass(frozen=True)
class Scrollback:
    """Stored output from byte offset ``start`` (inclusive) to ``end`` (exclusive)."""

    data: bytes
    start: int
    end: int
    pruned: bool = field(default=False)  # True when output before ``start`` is gone


class StorageProvider(ABC):
    """Persistence for sessions, their events and their output. Methods are synchronous."""

    mode: str
    # True when append_output is cheap enough for the event loop (memory, a journal write):
    # a live terminal then stores each read before any client sees it. Otherwise the
    # terminal batches output and stores it from a worker thread.
    appends_inline: bool = False
    # True when append_output accepts a batch at least ``scrollback_bytes`` long after a gap:
    # a writer that has fallen further behind than the retained window then stores only the
    # window's worth (the rest would be pruned as soon as it was stored).
    skips_pruned_output: bool = False
    scrollback_bytes: int

    def backpressure(self) -> bool:
        """Return True while writers should hold back (a write-behind queue is nearly full)."""
        return False

    @abstractmethod
    def create(self, record: SessionRecord) -> SessionRecord: ...

    @abstractmethod
    def get(self, session_id: str) -> SessionRecord | None: ...

    @abstractmethod
    def update(
        self, session_id: str, *, expected_version: int | None = None, **changes: Any
    ) -> SessionRecord:
        """Apply ``changes`` and bump the version; raise VersionConflict on a stale version."""

    @abstractmethod
    def delete(self, session_id: str) -> None: ...

    @abstractmethod
    def list_by_project(
        self, project_id: int, *, include_closed: bool = False
    ) -> list[SessionRecord]: ...

    @abstractmethod
    def list_by_user(
        self, user_id: int, *, include_closed: bool = False
    ) -> list[SessionRecord]: ...

    @abstractmethod
    def add_event(self, session_id: str, kind: str, data: dict[str, Any] | None = None) -> None: ...

    @abstractmethod
    def append_output(self, session_id: str, offset: int, data: bytes) -> int:
        """Store ``data`` starting at byte ``offset``; return the new end offset.

        Idempotent: bytes before the stored end are skipped, so a retried batch changes nothing.
        A gap (``offset`` after the stored end) raises ValueError, unless the provider
        ``skips_pruned_output`` and ``data`` fills the retained window by itself.
        """

    def append_output_many(self, batches: list[tuple[str, int, bytes]]) -> list[int | Exception]:
        """Store several sessions' output (``(session_id, offset, data)`` each, at most one per
        session); return each one's new end offset, or the exception that batch raised. One
        batch failing does not keep the others from being stored."""
        results: list[int | Exception] = []
        for session_id, offset, data in batches:
            try:
                results.append(self.append_output(session_id, offset, data))
            except Exception as exc:
                results.append(exc)
        return results

    @abstractmethod
    def read_scrollback(
        self, session_id: str, *, max_bytes: int, since: int | None = None
    ) -> Scrollback:
        """Return the retained output tail: at most ``max_bytes``, starting no earlier than
        byte offset ``since`` when given (``pruned`` says whether bytes after ``since``, or
        before the tail, are gone). Raise NotFound for an unknown session."""

    @abstractmethod
    def cleanup(self, before: datetime) -> int:
        """Delete ended sessions last active before ``before``; return how many."""

    def prefetch(self, project_ids: list[int]) -> None:  # noqa: B027 - optional hook
        """Warm whatever cache the provider has for these projects."""

    def suspend_project(self, project_id: int) -> None:  # noqa: B027 - optional hook
        """The project is no longer on screen: its memory may be released (shells keep running)."""

    def resume_project(self, project_id: int) -> None:
        """The project is on screen again: make its reads fast."""
        self.prefetch([project_id])

    def flush(  # noqa: B027 - optional hook
        self, session_id: str | None = None, timeout: float = 30
    ) -> None:
        """Write out anything pending (of ``session_id``, if given); return when it is durable
        in the provider's store, or raise StorageBusy after ``timeout`` seconds."""

    def pending(self) -> dict[str, float]:
        """Return write-behind figures: ``count`` of pending writes, ``oldest_age`` in seconds."""
        return {"count": 0, "oldest_age": 0.0}

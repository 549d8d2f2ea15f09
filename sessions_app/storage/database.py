"""DATABASE storage: every write goes to the database; output is stored as chunks keyed by seq."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache, partial
from typing import Any

from django.db import connection, transaction
from django.db.models import F, Max
from django.utils import timezone

from sessions_app.errors import NotFound, VersionConflict
from sessions_app.models import OutputChunk, SessionEvent, StorageMode, TerminalSession
from sessions_app.states import LIVE_STATES
from sessions_app.storage.base import (
    RECORD_FIELDS,
    Scrollback,
    SessionRecord,
    StorageProvider,
    check_update_fields,
    plain_text,
    plain_text_after,
)

# Output is stored in chunks of 16-256 KiB: small batches grow the last chunk until it is big
# enough, so an interactive session does not write a row per keystroke echo. Growing it
# rewrites it (and its search text): a small minimum keeps that rewrite cheap.
CHUNK_MIN_BYTES = 16 * 1024
CHUNK_MAX_BYTES = 256 * 1024
# How many sessions' last batch (and last chunk, under CHUNK_MIN_BYTES) a process remembers.
KNOWN_SESSIONS = 256


@dataclass(frozen=True)
class _Stored:
    """What this process last stored of a session's output, so that the next batch needs no
    reads: the session's stored end, its chunks' offsets (oldest first), and its last chunk."""

    end: int
    offsets: tuple[int, ...]
    last_pk: int | None  # None: no chunk yet
    last_seq: int
    last_data: bytes | None  # None: the last chunk is full, the next batch starts a new one
    last_text: str  # plain_text(last_data): a merge reads only the new bytes for it


@dataclass(frozen=True)
class _Grown:
    """A batch that only grows a session's last chunk: the chunk's new bytes and text, and
    what is stored once it is written."""

    data: bytes
    text: str
    stored: _Stored


class _Stale(Exception):
    """The database does not hold what ``_Stored`` says (a restore, another writer)."""


@cache
def _hot_statements(vendor: str) -> tuple[str, str]:
    """The two statements of a remembered batch: the session's end (only if it is still what
    was remembered), and the last chunk's bytes and text."""
    quote = connection.ops.quote_name
    return (
        f"UPDATE {quote(TerminalSession._meta.db_table)} "
        f"SET {quote('output_bytes')} = %s, {quote('last_activity')} = %s "
        f"WHERE {quote('id')} = %s AND {quote('output_bytes')} = %s",
        f"UPDATE {quote(OutputChunk._meta.db_table)} "
        f"SET {quote('data')} = %s, {quote('text')} = %s WHERE {quote('id')} = %s",
    )


def _record(row: TerminalSession) -> SessionRecord:
    return SessionRecord(**{name: getattr(row, name) for name in RECORD_FIELDS})


class DatabaseStorage(StorageProvider):
    mode = StorageMode.DATABASE
    skips_pruned_output = True

    def __init__(self, scrollback_bytes: int) -> None:
        self.scrollback_bytes = scrollback_bytes
        # Per session, what the last committed batch left (see _append_known). Written only
        # after a commit; checked against the database by every batch that uses it.
        self._stored: dict[str, _Stored] = {}

    def create(self, record: SessionRecord) -> SessionRecord:
        values = {
            name: getattr(record, name)
            for name in RECORD_FIELDS
            if getattr(record, name) is not None
        }
        values.pop("created_at", None)
        values.pop("last_activity", None)
        row = TerminalSession.objects.create(**values)
        return _record(row)

    def get(self, session_id: str) -> SessionRecord | None:
        row = TerminalSession.objects.filter(pk=session_id).first()
        return _record(row) if row else None

    def update(
        self, session_id: str, *, expected_version: int | None = None, **changes: Any
    ) -> SessionRecord:
        check_update_fields(changes)
        query = TerminalSession.objects.filter(pk=session_id)
        if expected_version is not None:
            query = query.filter(version=expected_version)
        changes.setdefault("last_activity", timezone.now())
        if not query.update(version=F("version") + 1, **changes):
            if not TerminalSession.objects.filter(pk=session_id).exists():
                raise NotFound(f"No session {session_id}.")
            raise VersionConflict(f"session {session_id} changed since version {expected_version}")
        return _record(TerminalSession.objects.get(pk=session_id))

    def delete(self, session_id: str) -> None:
        TerminalSession.objects.filter(pk=session_id).delete()

    def list_by_project(
        self, project_id: int, *, include_closed: bool = False
    ) -> list[SessionRecord]:
        query = TerminalSession.objects.filter(project_id=project_id)
        if not include_closed:
            query = query.open()
        return [_record(row) for row in query]

    def list_by_user(self, user_id: int, *, include_closed: bool = False) -> list[SessionRecord]:
        query = TerminalSession.objects.filter(user_id=user_id)
        if not include_closed:
            query = query.open()
        return [_record(row) for row in query]

    def add_event(self, session_id: str, kind: str, data: dict[str, Any] | None = None) -> None:
        SessionEvent.objects.create(session_id=session_id, kind=kind, data=data or {})

    def append_output_many(self, batches: list[tuple[str, int, bytes]]) -> list[int | Exception]:
        """Store every session's batch in one transaction (one commit for all of them); when
        one fails, each is stored in a transaction of its own so the others still are.

        The batches that only grow their session's last chunk (typing: most of a busy tick)
        are stored together, two statements for all of them."""
        if len(batches) > 1:
            try:
                with transaction.atomic():
                    return self._append_all(batches)
            except Exception:
                pass
        return super().append_output_many(batches)

    def _append_all(self, batches: list[tuple[str, int, bytes]]) -> list[int]:
        ends: list[int] = []
        grown: list[tuple[str, _Stored, _Grown]] = []
        for session_id, offset, data in batches:
            known = self._stored.get(session_id)
            growth = self._grown(known, offset, data) if known is not None else None
            if growth is None:
                ends.append(self._append(session_id, offset, data))
            else:
                grown.append((session_id, known, growth))
                ends.append(growth.stored.end)
        if grown and not self._store_grown(grown):
            for session_id, _known, _growth in grown:  # the careful path for them next time
                self._stored.pop(session_id, None)
            raise _Stale("a session's stored end is not what this process remembered")
        return ends

    def append_output(self, session_id: str, offset: int, data: bytes) -> int:
        try:
            with transaction.atomic():
                return self._append(session_id, offset, data)
        except _Stale:
            with transaction.atomic():  # _append forgot what it knew: it reads this time
                return self._append(session_id, offset, data)

    def _keep(self, session_id: str, stored: _Stored) -> None:
        """Note what a committed batch left; the sessions written longest ago are forgotten
        past KNOWN_SESSIONS (they take the careful path again when they next write)."""
        self._stored.pop(session_id, None)
        self._stored[session_id] = stored
        while len(self._stored) > KNOWN_SESSIONS:
            del self._stored[next(iter(self._stored))]

    def _append(self, session_id: str, offset: int, data: bytes) -> int:
        known = self._stored.get(session_id)
        if known is not None and offset > known.end and len(data) < self.scrollback_bytes:
            known = None  # a gap, unless another writer appended since: read the database
        if known is not None:
            try:
                end = self._append_known(known, session_id, offset, data)
            except _Stale:
                self._stored.pop(session_id, None)
                raise
            if end is not None:
                return end
        # Not remembered, or the database differs: read the state with the session locked.
        known = self._read_stored(session_id)
        if offset + len(data) <= known.end:
            transaction.on_commit(partial(self._keep, session_id, known))
            return known.end  # already stored: a retried batch
        end = self._append_known(known, session_id, offset, data)
        if end is None:  # cannot happen with the row locked; never store blind
            raise _Stale(f"the stored end of {session_id} moved while it was locked")
        return end

    def _read_stored(self, session_id: str) -> _Stored:
        """Read what storage holds of a session's output, locking the session's row."""
        end = (
            TerminalSession.objects.select_for_update()
            .filter(pk=session_id)
            .values_list("output_bytes", flat=True)
            .first()
        )
        if end is None:
            raise NotFound(f"No session {session_id}.")
        chunks = list(
            OutputChunk.objects.filter(session_id=session_id)
            .order_by("seq")
            .values_list("pk", "seq", "offset")
        )
        if not chunks:
            return _Stored(end, (), None, 0, None, "")
        last_pk, last_seq, _ = chunks[-1]
        last, text = OutputChunk.objects.filter(pk=last_pk).values_list("data", "text")[0]
        growing = len(last) < CHUNK_MIN_BYTES
        return _Stored(
            end=end,
            offsets=tuple(offset for _, _, offset in chunks),
            last_pk=last_pk,
            last_seq=last_seq,
            last_data=bytes(last) if growing else None,
            last_text=text if growing else "",
        )

    def _append_known(
        self, known: _Stored, session_id: str, offset: int, data: bytes
    ) -> int | None:
        """Store a batch from what ``known`` says is stored, with no reads: for a busy
        terminal, two statements (the session, its last chunk). Return None, having changed
        nothing, when the session's stored end is not what ``known`` says."""
        if offset + len(data) <= known.end:
            return None  # a retried batch: checked against the database by the caller
        growth = self._grown(known, offset, data)
        if growth is not None:
            return growth.stored.end if self._store_grown([(session_id, known, growth)]) else None
        gap = offset > known.end
        if gap and len(data) < self.scrollback_bytes:
            raise ValueError(
                f"output of {session_id} has a gap: stored up to {known.end}, got {offset}"
            )
        # A gap the batch fills the retained window after: the output missing before it would
        # be pruned as soon as it was stored, so the writer left it out (skips_pruned_output).
        start = offset if gap else known.end
        data = data[start - offset :]
        merged, merged_text = None, ""
        if not gap and known.last_data is not None:
            room = CHUNK_MAX_BYTES - len(known.last_data)
            merged = known.last_data + data[:room]
            merged_text = plain_text_after(known.last_data, known.last_text, data[:room])
            data = data[room:]
        position = start + (len(merged) - len(known.last_data) if merged is not None else 0)
        end = position + len(data)
        update_session, update_chunk = _hot_statements(connection.vendor)
        with connection.cursor() as cursor:
            cursor.execute(
                update_session,
                [end, connection.ops.adapt_datetimefield_value(timezone.now()), session_id,
                 known.end],
            )  # fmt: skip
            if cursor.rowcount != 1:
                return None
            offsets, last_pk, last_seq = list(known.offsets), known.last_pk, known.last_seq
            last_data, last_text = merged, merged_text
            if merged is not None:
                cursor.execute(update_chunk, [merged, merged_text, known.last_pk])
                if cursor.rowcount != 1:
                    raise _Stale(f"the last output chunk of {session_id} is gone")
        for piece_start in range(0, len(data), CHUNK_MAX_BYTES):
            piece = data[piece_start : piece_start + CHUNK_MAX_BYTES]
            last_seq += 1
            last_text = plain_text(piece)
            chunk = OutputChunk.objects.create(
                session_id=session_id, seq=last_seq, offset=position, data=piece, text=last_text
            )
            offsets.append(position)
            last_pk, last_data = chunk.pk, piece
            position += len(piece)
        first_kept = self._first_kept(offsets, end)
        if offsets and first_kept > offsets[0]:
            OutputChunk.objects.filter(session_id=session_id, offset__lt=first_kept).delete()
            offsets = [o for o in offsets if o >= first_kept]
        growing = last_data is not None and len(last_data) < CHUNK_MIN_BYTES
        stored = _Stored(
            end=end,
            offsets=tuple(offsets),
            last_pk=last_pk,
            last_seq=last_seq,
            last_data=last_data if growing else None,
            last_text=last_text if growing else "",
        )
        transaction.on_commit(partial(self._keep, session_id, stored))
        return end

    def _grown(self, known: _Stored, offset: int, data: bytes) -> _Grown | None:
        """Return the batch as a growth of the last chunk, or None when it needs more: a new
        chunk, pruning, a gap, or it is a retry."""
        if known.last_data is None or not offset <= known.end < offset + len(data):
            return None
        more = data[known.end - offset :]
        merged = known.last_data + more
        end = known.end + len(more)
        if len(merged) > CHUNK_MAX_BYTES or self._first_kept(known.offsets, end) > known.offsets[0]:
            return None
        text = plain_text_after(known.last_data, known.last_text, more)
        growing = len(merged) < CHUNK_MIN_BYTES
        stored = _Stored(
            end=end,
            offsets=known.offsets,
            last_pk=known.last_pk,
            last_seq=known.last_seq,
            last_data=merged if growing else None,
            last_text=text if growing else "",
        )
        return _Grown(merged, text, stored)

    def _store_grown(self, grown: list[tuple[str, _Stored, _Grown]]) -> bool:
        """Write batches that grow their last chunk: two statements for all of them. Return
        False when a session's stored end differs from what was remembered: for one batch,
        having changed nothing; for several, the caller rolls back."""
        update_session, update_chunk = _hot_statements(connection.vendor)
        now = connection.ops.adapt_datetimefield_value(timezone.now())
        with connection.cursor() as cursor:
            cursor.executemany(
                update_session,
                [[g.stored.end, now, session_id, known.end] for session_id, known, g in grown],
            )
            if cursor.rowcount != len(grown):
                return False
            cursor.executemany(update_chunk, [[g.data, g.text, k.last_pk] for _, k, g in grown])
            if cursor.rowcount != len(grown):
                raise _Stale("the last output chunk of a session is gone")
        transaction.on_commit(partial(self._keep_all, [(sid, g.stored) for sid, _, g in grown]))
        return True

    def _keep_all(self, stored: list[tuple[str, _Stored]]) -> None:
        for session_id, state in stored:
            self._keep(session_id, state)

    def _first_kept(self, offsets: tuple[int, ...] | list[int], end: int) -> int:
        """Return the offset of the oldest chunk to keep when the output ends at ``end``."""
        return max((o for o in offsets if o <= end - self.scrollback_bytes), default=0)

    @staticmethod
    def _chunk_offset_at(session_id: str, position: int) -> int:
        """Return the offset of the chunk holding byte ``position`` (0 if none starts before)."""
        found = OutputChunk.objects.filter(session_id=session_id, offset__lte=position).aggregate(
            m=Max("offset")
        )["m"]
        return found or 0

    def read_scrollback(
        self, session_id: str, *, max_bytes: int, since: int | None = None
    ) -> Scrollback:
        end = (
            TerminalSession.objects.filter(pk=session_id)
            .values_list("output_bytes", flat=True)
            .first()
        )
        if end is None:
            raise NotFound(f"No session {session_id}.")
        wanted = max(since or 0, end - min(max_bytes, self.scrollback_bytes), 0)
        first = self._chunk_offset_at(session_id, wanted)
        rows = (
            OutputChunk.objects.filter(session_id=session_id, offset__gte=first)
            .order_by("seq")
            .values_list("offset", "data")
        )
        parts = [(offset, bytes(data)) for offset, data in rows]
        start = parts[0][0] if parts else end
        blob = b"".join(data for _, data in parts)
        if start < wanted:
            blob = blob[wanted - start :]
            start = wanted
        return Scrollback(
            data=blob, start=start, end=start + len(blob), pruned=start > (since or 0)
        )

    def cleanup(self, before: datetime) -> int:
        query = TerminalSession.objects.exclude(state__in=LIVE_STATES).filter(
            last_activity__lt=before
        )
        _, per_model = query.delete()
        return per_model.get(TerminalSession._meta.label, 0)

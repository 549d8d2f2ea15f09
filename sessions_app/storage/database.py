"""DATABASE storage: every write goes to the database; output is stored as chunks keyed by seq."""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import F, Max
from django.utils import timezone

from sessions_app.errors import NotFound, VersionConflict
from sessions_app.models import OutputChunk, SessionEvent, StorageMode, TerminalSession
from sessions_app.states import LIVE_STATES
from sessions_app.storage.base import Scrollback, SessionRecord, StorageProvider, plain_text

RECORD_FIELDS = tuple(f.name for f in fields(SessionRecord))
# Model fields named differently from the record's.
_MODEL_NAMES = {"project_id": "project_id", "user_id": "user_id"}


def _record(row: TerminalSession) -> SessionRecord:
    return SessionRecord(**{name: getattr(row, name) for name in RECORD_FIELDS})


class DatabaseStorage(StorageProvider):
    mode = StorageMode.DATABASE

    def __init__(self, scrollback_bytes: int) -> None:
        self.scrollback_bytes = scrollback_bytes

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
        unknown = set(changes) - set(RECORD_FIELDS)
        if unknown:
            raise TypeError(f"unknown session fields: {', '.join(sorted(unknown))}")
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

    @transaction.atomic
    def append_output(self, session_id: str, offset: int, data: bytes) -> int:
        session = (
            TerminalSession.objects.select_for_update().only("output_bytes").get(pk=session_id)
        )
        end = session.output_bytes
        if offset + len(data) <= end:
            return end  # already stored: a retried batch
        if offset < end:
            data = data[end - offset :]
            offset = end
        last_seq = OutputChunk.objects.filter(session_id=session_id).aggregate(m=Max("seq"))["m"]
        OutputChunk.objects.create(
            session_id=session_id,
            seq=(last_seq or 0) + 1,
            offset=offset,
            data=data,
            text=plain_text(data),
        )
        end = offset + len(data)
        TerminalSession.objects.filter(pk=session_id).update(
            output_bytes=end, last_activity=timezone.now()
        )
        self._prune(session_id, end)
        return end

    def _prune(self, session_id: str, end: int) -> None:
        """Delete chunks wholly before the retained scrollback window."""
        cutoff = end - self.scrollback_bytes
        if cutoff <= 0:
            return
        first_kept = OutputChunk.objects.filter(
            session_id=session_id, offset__lte=cutoff
        ).aggregate(m=Max("offset"))["m"]
        if first_kept:
            OutputChunk.objects.filter(session_id=session_id, offset__lt=first_kept).delete()

    def read_scrollback(self, session_id: str, *, max_bytes: int) -> Scrollback:
        end = (
            TerminalSession.objects.filter(pk=session_id)
            .values_list("output_bytes", flat=True)
            .first()
        )
        if end is None:
            raise NotFound(f"No session {session_id}.")
        cutoff = max(0, end - min(max_bytes, self.scrollback_bytes))
        first = (
            (
                OutputChunk.objects.filter(session_id=session_id, offset__lte=cutoff).aggregate(
                    m=Max("offset")
                )["m"]
            )
            or 0
        )
        chunks = OutputChunk.objects.filter(session_id=session_id, offset__gte=first).order_by(
            "seq"
        )
        parts = []
        start = None
        for offset, data in chunks.values_list("offset", "data"):
            if start is None:
                start = offset
            parts.append(bytes(data))
        blob = b"".join(parts)
        start = end - len(blob) if start is None else start
        if start < cutoff:
            blob = blob[cutoff - start :]
            start = cutoff
        return Scrollback(data=blob, start=start, end=start + len(blob), pruned=start > 0)

    def cleanup(self, before: datetime) -> int:
        query = TerminalSession.objects.exclude(state__in=LIVE_STATES).filter(
            last_activity__lt=before
        )
        count, _ = query.delete()
        return count

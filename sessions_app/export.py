"""Export a session's stored output as an asciicast v3 recording or as plain text.

Output is stored as chunks without per-byte times. A ``.cast`` gives each chunk's first frame the
time since the previous chunk was stored (``OutputChunk.at``; later bytes appended to a chunk
share its time) and the other frames of a chunk ``FRAME_INTERVAL``; with no chunk rows (a
session held only in memory) every frame is ``FRAME_INTERVAL`` apart. The header has the size
the terminal had where the retained output begins; each later change of size (a ``resized``
event, a revival at another size) is an ``r`` event at the output byte it took effect from.
"""

from __future__ import annotations

import bisect
import codecs
import json
import re
from dataclasses import dataclass
from datetime import datetime

from sessions_app import storage
from sessions_app.models import OutputChunk, SessionEvent, StorageMode
from sessions_app.storage import SessionRecord, get_storage
from sessions_app.storage.base import plain_text

FORMATS = ("cast", "text")
CAST_CONTENT_TYPE = "application/x-asciicast"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
# Frames are cut at line ends near this size, so a player shows output as it scrolls by.
FRAME_BYTES = 4096
FRAME_INTERVAL = 0.02
# Players shorten pauses longer than this (a header field of asciicast v3).
IDLE_TIME_LIMIT = 2.0
# The whole retained output: providers cap it at their scrollback size anyway.
ALL_OUTPUT = 1 << 62

UNKNOWN_FORMAT = "Unknown export format {format!r}; use one of: cast, text."


class UnknownFormat(ValueError):
    """An export format other than ``cast`` or ``text``."""


@dataclass(frozen=True)
class Export:
    filename: str
    content_type: str
    body: bytes


def session_output(record: SessionRecord) -> tuple[bytes, int]:
    """Return the session's retained output and the offset of its first byte.

    Read from the provider of the session's mode when this process has it open (the server),
    else from the database: a command in a process of its own must not open the HYBRID
    journal the server owns, and has no LOCAL memory.
    """
    mode = record.storage_mode if record.storage_mode in storage.pending() else StorageMode.DATABASE
    provider = get_storage(mode)
    scrollback = provider.read_scrollback(record.id, max_bytes=ALL_OUTPUT, since=0)
    return scrollback.data, scrollback.start


def _frames(data: bytes) -> list[bytes]:
    """Cut ``data`` into frames of about FRAME_BYTES, at a line end where there is one."""
    frames, start = [], 0
    while start < len(data):
        end = start + FRAME_BYTES
        if end < len(data):
            newline = data.rfind(b"\n", start, end)
            end = newline + 1 if newline >= start else end
        frames.append(data[start:end])
        start = end
    return frames


def _chunk_times(session_id: str) -> tuple[list[int], list[datetime]]:
    """Return the offsets of the session's stored chunks and when each was stored."""
    rows = OutputChunk.objects.filter(session_id=session_id).order_by("seq")
    pairs = list(rows.values_list("offset", "at"))
    return [offset for offset, _ in pairs], [at for _, at in pairs]


def _sizes(session_id: str) -> list[tuple[int | None, str]]:
    """Return each size the session's terminal took (its starts and its resizes, in order),
    with the output offset it held from (None in events recorded before offsets were)."""
    kinds = (SessionEvent.Kind.STARTED, SessionEvent.Kind.RESIZED)
    events = SessionEvent.objects.filter(session_id=session_id, kind__in=kinds).order_by("at", "id")
    sizes = []
    for data in events.values_list("data", flat=True):
        if isinstance(data, dict) and _is_int(data.get("cols")) and _is_int(data.get("rows")):
            offset = data.get("offset")
            sizes.append((offset if _is_int(offset) else None, f"{data['cols']}x{data['rows']}"))
    return sizes


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pieces(record: SessionRecord, data: bytes, start: int) -> tuple[str, list[bytes | str]]:
    """Return the size in effect where ``data`` (from offset ``start``) begins, and ``data``
    in frames with each later change of size (a "COLSxROWS" string) where it took effect."""
    size = f"{record.cols}x{record.rows}"
    changes: list[tuple[int, str]] = []
    for number, (offset, taken) in enumerate(_sizes(record.id)):
        if number == 0 or (offset is not None and offset <= start):
            size = taken
        elif offset is not None:
            changes.append((offset, taken))
    pieces: list[bytes | str] = []
    position = start
    for offset, taken in sorted(changes):
        if offset > position:
            pieces.extend(_frames(data[position - start : offset - start]))
            position = offset
        pieces.append(taken)
    pieces.extend(_frames(data[position - start :]))
    return size, pieces


def to_cast(record: SessionRecord, data: bytes, start: int) -> bytes:
    """Return an asciicast v3 recording of ``data`` (output from byte offset ``start``)."""
    size, pieces = _pieces(record, data, start)
    cols, rows = (int(n) for n in size.split("x"))
    header = {
        "version": 3,
        "term": {"cols": cols, "rows": rows, "type": "xterm-256color"},
        "idle_time_limit": IDLE_TIME_LIMIT,
        "title": record.title or record.tab_name or record.id,
    }
    if record.created_at is not None:
        header["timestamp"] = int(record.created_at.timestamp())
    offsets, times = _chunk_times(record.id)
    lines = [json.dumps(header, ensure_ascii=False)]
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    position, previous_chunk = start, None
    interval = 0.0  # carried to the next event when a frame decodes to nothing
    for piece in pieces:
        if isinstance(piece, str):
            lines.append(json.dumps([round(interval, 6), "r", piece]))
            interval = 0.0
            continue
        chunk = bisect.bisect_right(offsets, position) - 1
        if chunk < 0 or chunk == previous_chunk:
            interval += FRAME_INTERVAL if lines[1:] else 0.0
        else:
            before = times[previous_chunk] if previous_chunk is not None else times[chunk]
            interval += max(0.0, (times[chunk] - before).total_seconds())
        previous_chunk = chunk if chunk >= 0 else previous_chunk
        position += len(piece)
        text = decoder.decode(piece)
        if text:
            lines.append(json.dumps([round(interval, 6), "o", text], ensure_ascii=False))
            interval = 0.0
    tail = decoder.decode(b"", final=True)
    if tail:
        lines.append(json.dumps([0.0, "o", tail], ensure_ascii=False))
    if record.exit_code is not None:
        lines.append(json.dumps([0.0, "x", str(record.exit_code)]))
    return ("\n".join(lines) + "\n").encode("utf-8")


def export_filename(record: SessionRecord, extension: str) -> str:
    """Return ``<tab name>-<session id>.<extension>``, safe in a Content-Disposition header."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", record.tab_name).strip("-.")[:60]
    return f"{name}-{record.id}.{extension}" if name else f"{record.id}.{extension}"


def session_export(*, record: SessionRecord, format: str) -> Export:
    """Return the session's retained output as a ``.cast`` recording or as plain text."""
    if format not in FORMATS:
        raise UnknownFormat(UNKNOWN_FORMAT.format(format=format))
    data, start = session_output(record)
    if format == "cast":
        return Export(
            export_filename(record, "cast"), CAST_CONTENT_TYPE, to_cast(record, data, start)
        )
    return Export(export_filename(record, "txt"), TEXT_CONTENT_TYPE, plain_text(data).encode())

"""The local durable journal of HYBRID storage: output lands here before any client sees it.

Records go to segment files ``journal-<16-digit first lsn>.tsj`` in one directory. A segment
is an 8-byte header (``b"TSJ"``, the format version, 4 zero bytes) and then records, each a
sync marker ``a5 5a``, u32 payload length, u32 CRC-32 of the payload, and the payload: u64 lsn,
u16 metadata length, UTF-8 JSON metadata ``{"k": kind, "s": session_id, ...}``, raw data.
Integers are little-endian. Lsns start at 1 and increase by one per record across segments.

Every record is one ``os.write`` on an ``O_APPEND`` descriptor, so once ``append`` returns a
crash of the process loses nothing: the bytes are in the OS page cache. What a power loss can
take depends on ``fsync``:

- ``ALWAYS``: fsync after every append; a power loss loses nothing returned. Slow.
- ``INTERVAL``: the flusher calls ``sync()`` about once a second, which fsyncs what was written
  since; a power loss loses at most about the last second.
- ``NEVER``: never fsync; a power loss loses whatever the OS had not yet written back.

Replay survives damage: a record cut short by a crash, garbage, or a bad CRC is skipped with a
warning naming the file and offset, and replay resumes at the next sync marker whose record
validates. Appends after a restart always go to a new segment, never after damaged bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"TSJ"
HEADER = MAGIC + bytes([FORMAT_VERSION]) + bytes(4)
SYNC = b"\xa5\x5a"
RECORD_HEAD = struct.Struct("<2sII")  # sync marker, payload length, crc32 of payload
PAYLOAD_HEAD = struct.Struct("<QH")  # lsn, metadata length
MAX_PAYLOAD = 256 * 1024 * 1024
# A fully applied open segment is deleted (and a new one started) only once it is this big.
OPEN_SEGMENT_RELEASE_BYTES = 1024 * 1024
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
FSYNC_POLICIES = ("ALWAYS", "INTERVAL", "NEVER")
SEGMENT_RE = re.compile(r"^journal-(\d{16})\.tsj$")

JOURNAL_FULL = (
    "journal {directory} is full: {size} of TERMSYS_JOURNAL_MAX_BYTES={max_bytes} bytes used, "
    "a record of {record} bytes does not fit; it drains as the database catches up"
)
UNSUPPORTED_VERSION = (
    "journal segment {path} has format version {found}; this build reads version {supported}. "
    "Kept it as {kept} without replaying it; a newer termsys can read it"
)
BAD_MAGIC = (
    "journal segment {path} does not start with a termsys journal header (found {found!r}). "
    "Kept it as {kept} without replaying it"
)
SKIPPED = "journal segment {path}: skipped {count} damaged bytes at offset {offset} ({reason})"
LOCKED = "journal {directory} is in use by another process; give each process its own directory"
BAD_FSYNC = "fsync={value!r} is not valid; use one of {choices} (TERMSYS_JOURNAL_FSYNC)"


class JournalFull(Exception):
    """The journal has reached its byte bound; nothing was written."""


@dataclass(frozen=True)
class Record:
    """One journal record as replay returns it."""

    lsn: int
    kind: str
    session_id: str
    meta: dict[str, Any]
    data: bytes


@dataclass
class _Segment:
    first_lsn: int
    path: Path
    size: int


def _decode(buf: memoryview, pos: int) -> tuple[Record | None, int, str]:
    """Return the record at ``pos`` and the offset after it, or None and why it is bad."""
    if len(buf) - pos < RECORD_HEAD.size:
        return None, pos, "truncated record"
    marker, length, crc = RECORD_HEAD.unpack_from(buf, pos)
    if marker != SYNC:
        return None, pos, "no sync marker"
    if not PAYLOAD_HEAD.size <= length <= MAX_PAYLOAD:
        return None, pos, f"impossible length {length}"
    start, end = pos + RECORD_HEAD.size, pos + RECORD_HEAD.size + length
    if end > len(buf):
        return None, pos, "truncated record"
    payload = buf[start:end]
    if zlib.crc32(payload) != crc:
        return None, pos, "bad checksum"
    lsn, meta_len = PAYLOAD_HEAD.unpack_from(payload)
    try:
        meta = json.loads(bytes(payload[PAYLOAD_HEAD.size : PAYLOAD_HEAD.size + meta_len]))
        kind, session_id = meta.pop("k"), meta.pop("s")
    except (ValueError, KeyError, AttributeError, TypeError):
        return None, pos, "bad metadata"
    data = bytes(payload[PAYLOAD_HEAD.size + meta_len :])
    return Record(lsn, str(kind), str(session_id), meta, data), end, ""


def _scan(buf: bytes) -> Iterator[tuple[Record | None, int, int, str]]:
    """Yield (record, 0, 0, "") per intact record and (None, offset, count, reason) per gap."""
    view, pos = memoryview(buf), len(HEADER)
    while pos < len(buf):
        record, end, reason = _decode(view, pos)
        if record is not None:
            yield record, 0, 0, ""
            pos = end
            continue
        resume = buf.find(SYNC, pos + 1)
        while resume != -1 and _decode(view, resume)[0] is None:
            resume = buf.find(SYNC, resume + 1)
        resume = len(buf) if resume == -1 else resume
        yield None, pos, resume - pos, reason
        pos = resume


def _aside(path: Path, suffix: str) -> Path:
    """Rename ``path`` to a free ``<name><suffix>[.N]`` and return the new path."""
    target, n = path.with_name(path.name + suffix), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{suffix}.{n}")
    path.rename(target)
    return target


class Journal:
    """An append-only, segmented, bounded journal of terminal records in one directory."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: str = "INTERVAL",
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(BAD_FSYNC.format(value=fsync, choices=", ".join(FSYNC_POLICIES)))
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.problems: list[str] = []
        self._lock = threading.Lock()
        self._fd: int | None = None  # the open segment, always self._segments[-1]
        self._dirty = False  # written since the last fsync of the open segment
        self._dir_dirty = False  # a segment was created since the last fsync of the directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(LOCKED.format(directory=self.directory)) from None
        self._segments = self._open_segments()
        self._next_lsn = self._find_next_lsn()

    @property
    def last_lsn(self) -> int:
        """Return the lsn of the newest record written (0 when there is none yet)."""
        return self._next_lsn - 1

    def size(self) -> int:
        """Return the bytes the journal's segments take on disk."""
        with self._lock:
            return sum(segment.size for segment in self._segments)

    def append(
        self, kind: str, session_id: str, meta: dict[str, Any] | None = None, data: bytes = b""
    ) -> int:
        """Write one record and return its lsn; raise JournalFull when it does not fit."""
        meta = meta or {}
        if "k" in meta or "s" in meta:
            raise ValueError("journal metadata may not use the reserved keys 'k' and 's'")
        encoded = json.dumps(
            {"k": kind, "s": session_id, **meta}, separators=(",", ":"), ensure_ascii=False
        ).encode()
        if len(encoded) > 0xFFFF:
            raise ValueError(f"journal metadata is {len(encoded)} bytes; the limit is 65535")
        if PAYLOAD_HEAD.size + len(encoded) + len(data) > MAX_PAYLOAD:
            raise ValueError(f"journal record of {len(data)} data bytes exceeds {MAX_PAYLOAD}")
        with self._lock:
            if self._lock_fd < 0:
                raise ValueError(f"journal {self.directory} is closed")
            lsn = self._next_lsn
            payload = PAYLOAD_HEAD.pack(lsn, len(encoded)) + encoded + data
            record = RECORD_HEAD.pack(SYNC, len(payload), zlib.crc32(payload)) + payload
            current = self._segments[-1] if self._fd is not None else None
            rotate = current is None or (
                current.size > len(HEADER) and current.size + len(record) > self.segment_bytes
            )
            needed = len(record) + (len(HEADER) if rotate else 0)
            used = sum(segment.size for segment in self._segments)
            if used + needed > self.max_bytes:
                raise JournalFull(
                    JOURNAL_FULL.format(
                        directory=self.directory,
                        size=used,
                        max_bytes=self.max_bytes,
                        record=needed,
                    )
                )
            if rotate:
                self._start_segment(lsn)
            self._write(record)
            self._next_lsn = lsn + 1
            return lsn

    def sync(self) -> None:
        """Fsync what was written since the last call (the INTERVAL policy's once-a-second)."""
        with self._lock:
            if self.fsync != "INTERVAL" or self._fd is None or not self._dirty:
                fd = -1
            else:
                fd, self._dirty = os.dup(self._fd), False  # fsync outside the lock
            dir_dirty, self._dir_dirty = self._dir_dirty, False
        if fd >= 0:
            try:
                os.fsync(fd)
            except OSError:
                with self._lock:
                    self._dirty = self._fd is not None
                raise
            finally:
                os.close(fd)
        if dir_dirty and self.fsync == "INTERVAL":
            self._fsync_directory()

    def release_through(self, lsn: int) -> None:
        """Delete the segments whose records all have an lsn <= ``lsn`` (applied to the DB)."""
        with self._lock:
            while self._segments:
                segment = self._segments[0]
                following = self._segments[1].first_lsn if len(self._segments) > 1 else None
                last = (following if following is not None else self._next_lsn) - 1
                if last > lsn:
                    break
                if following is None and self._fd is not None:
                    # The segment being written stays while it is small: deleting it after
                    # every applied batch would cost a file creation and fsync per batch.
                    if segment.size < min(OPEN_SEGMENT_RELEASE_BYTES, self.max_bytes // 2):
                        break
                    os.close(self._fd)  # the next append starts a new segment
                    self._fd, self._dirty = None, False
                segment.path.unlink(missing_ok=True)
                self._segments.pop(0)
                logger.debug("released journal segment %s (lsn <= %d)", segment.path, last)

    def replay(self) -> Iterator[Record]:
        """Yield every intact record in lsn order, skipping (and reporting) damaged bytes."""
        with self._lock:
            snapshot = [(segment.path, segment.size) for segment in self._segments]
        last = 0
        for path, size in snapshot:
            try:
                with path.open("rb") as file:
                    buf = file.read(size)
            except FileNotFoundError:
                continue  # released while we were replaying
            for record, offset, count, reason in _scan(buf):
                if record is None:
                    message = SKIPPED.format(path=path, count=count, offset=offset, reason=reason)
                    logger.warning("%s; replay continues with the next intact record", message)
                    self.problems.append(message)
                elif record.lsn <= last:
                    logger.warning("journal segment %s: lsn %d out of order", path, record.lsn)
                else:
                    last = record.lsn
                    yield record

    def close(self) -> None:
        """Close the open segment and give up the directory."""
        with self._lock:
            if self._fd is not None:
                if self._dirty and self.fsync != "NEVER":
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def _write(self, record: bytes) -> None:
        assert self._fd is not None
        segment = self._segments[-1]
        try:
            written = os.write(self._fd, record)
            if written != len(record):
                raise OSError(f"short write to {segment.path}: {written} of {len(record)} bytes")
        except OSError:
            # Never append after a partial record: cut it off, and start a new segment next time.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, segment.size)
            os.close(self._fd)
            self._fd = None
            raise
        segment.size += len(record)
        self._dirty = True
        if self.fsync == "ALWAYS":
            os.fsync(self._fd)
            self._dirty = False

    def _start_segment(self, first_lsn: int) -> None:
        if self._fd is not None:
            if self._dirty and self.fsync != "NEVER":
                os.fsync(self._fd)  # keep the power-loss window of the segment being left
            os.close(self._fd)
            self._fd, self._dirty = None, False
        path = self.directory / f"journal-{first_lsn:016d}.tsj"
        if path.exists():  # can only hold no intact record, else first_lsn would be higher
            kept = _aside(path, ".corrupt")
            self._problem(f"journal segment {path} held no intact record; kept it as {kept}")
            self._segments = [s for s in self._segments if s.path != path]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            os.write(fd, HEADER)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fd = fd
        self._segments.append(_Segment(first_lsn, path, len(HEADER)))
        self._dir_dirty = True
        if self.fsync == "ALWAYS":
            os.fsync(fd)
            self._fsync_directory()
            self._dir_dirty = False

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _problem(self, message: str) -> None:
        logger.error("%s", message)
        self.problems.append(message)

    def _open_segments(self) -> list[_Segment]:
        """Return the readable segments by first lsn, setting aside those this build can't read."""
        segments = []
        for path in sorted(self.directory.iterdir()):
            match = SEGMENT_RE.match(path.name)
            if not match or not path.is_file():
                continue
            with path.open("rb") as file:
                head = file.read(len(HEADER))
            size = path.stat().st_size
            if len(head) < len(HEADER) and HEADER.startswith(head):
                path.unlink()  # created, then the process died before the header was written
            elif head[:3] != MAGIC:
                kept = _aside(path, ".corrupt")
                self._problem(BAD_MAGIC.format(path=path, found=head[:3], kept=kept.name))
            elif head[3] != FORMAT_VERSION:
                kept = _aside(path, ".unsupported")
                self._problem(
                    UNSUPPORTED_VERSION.format(
                        path=path, found=head[3], supported=FORMAT_VERSION, kept=kept.name
                    )
                )
            else:
                segments.append(_Segment(int(match.group(1)), path, size))
        return segments

    def _find_next_lsn(self) -> int:
        """Return the lsn after the newest intact record (scanning from the newest segment)."""
        floor = max((segment.first_lsn for segment in self._segments), default=1)
        for segment in reversed(self._segments):
            buf = segment.path.read_bytes()
            lsns = [record.lsn for record, *_ in _scan(buf) if record is not None]
            if lsns:
                return max(floor, max(lsns) + 1)
        return floor

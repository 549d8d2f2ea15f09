"""The newest output of a live terminal, held for replay.

Kept as a queue of the reads it came in: appending a read is O(1), and trimming to the
scrollback size drops whole reads and cuts at most one, instead of moving the whole tail (a
megabyte) for every 64 KiB read, as a bytearray trimmed from the front would.
"""

from __future__ import annotations

from collections import deque


class OutputTail:
    """Bytes ``[start, end)`` of a session's output."""

    def __init__(self, start: int, data: bytes = b"") -> None:
        self.start = start
        self.size = len(data)
        self._chunks: deque[bytes] = deque([data] if data else [])

    def __len__(self) -> int:
        return self.size

    @property
    def end(self) -> int:
        return self.start + self.size

    def append(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self.size += len(data)

    def drop_before(self, offset: int) -> int:
        """Forget the bytes before ``offset``; return how many were dropped."""
        cut = min(offset, self.end) - self.start
        if cut <= 0:
            return 0
        remaining = cut
        while remaining and remaining >= len(self._chunks[0]):
            remaining -= len(self._chunks.popleft())
        if remaining:
            self._chunks[0] = self._chunks[0][remaining:]
        self.start += cut
        self.size -= cut
        return cut

    def keep_last(self, max_bytes: int) -> int:
        """Keep at most the newest ``max_bytes``; return how many were dropped."""
        return self.drop_before(self.end - max_bytes) if self.size > max_bytes else 0

    def since(self, offset: int) -> bytes:
        """Return the bytes from ``offset`` (clamped to what is held) to the end."""
        skip = max(0, min(offset, self.end) - self.start)
        parts = []
        for chunk in self._chunks:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            parts.append(chunk[skip:] if skip else chunk)
            skip = 0
        return b"".join(parts)

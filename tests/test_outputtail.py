"""The in-memory output tail keeps exactly the newest bytes, at their session offsets."""

from __future__ import annotations

import random

from sessions_app.outputtail import OutputTail


def test_it_holds_exactly_the_newest_bytes_whatever_the_read_sizes():
    rng = random.Random(7)
    stream = bytes(rng.randrange(256) for _ in range(200_000))
    tail, position, limit = OutputTail(1000), 0, 30_000
    while position < len(stream):
        read = stream[position : position + rng.choice((1, 7, 4096, 65536))]
        tail.append(read)
        position += len(read)
        tail.keep_last(limit)
        assert tail.end == 1000 + position
        assert tail.since(0) == stream[max(0, position - limit) : position]
    assert tail.start == 1000 + len(stream) - limit
    assert tail.since(tail.end - 10) == stream[-10:]
    assert tail.since(tail.end + 5) == b""  # nothing after the end


def test_dropping_before_an_offset_keeps_the_rest():
    tail = OutputTail(0)
    for part in (b"abc", b"defg", b"hij"):
        tail.append(part)
    assert tail.drop_before(5) == 5 and tail.start == 5
    assert tail.since(0) == b"fghij" and len(tail) == 5
    assert tail.drop_before(3) == 0  # already gone
    assert tail.drop_before(100) == 5 and tail.since(0) == b"" and tail.start == 10

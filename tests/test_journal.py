"""The HYBRID storage journal: what survives crashes, damage, restarts and upgrades."""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from pathlib import Path

import pytest

from sessions_app.storage import journal as journal_module
from sessions_app.storage.journal import (
    FORMAT_VERSION,
    JOURNAL_FULL,
    Journal,
    JournalFull,
    Record,
)


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("journal-*.tsj"))


def fill(journal: Journal, count: int, *, size: int = 100) -> list[int]:
    return [
        journal.append("output", f"s{i % 3}", {"offset": i * size}, bytes([i % 256]) * size)
        for i in range(count)
    ]


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "journal"


def test_round_trip_keeps_every_record_and_every_byte_value(directory: Path) -> None:
    journal = Journal(directory)
    every_byte = bytes(range(256))
    written = []
    for i in range(300):
        meta = {"offset": i * 256, "note": "ünïcode ✓", "nested": {"n": i}}
        data = every_byte if i % 2 else b""
        lsn = journal.append("output" if i % 2 else "event", f"session_{i % 7}", meta, data)
        written.append(Record(lsn, "output" if i % 2 else "event", f"session_{i % 7}", meta, data))
    journal.close()

    replayed = list(Journal(directory).replay())

    assert replayed == written
    assert [r.lsn for r in replayed] == list(range(1, 301))


def test_lsn_continues_after_reopen_in_a_new_segment(directory: Path) -> None:
    journal = Journal(directory)
    assert fill(journal, 5) == [1, 2, 3, 4, 5]
    journal.close()

    reopened = Journal(directory)
    assert reopened.last_lsn == 5
    assert reopened.append("event", "s1", {"kind": "attached"}) == 6
    reopened.close()

    assert [p.name for p in segments(directory)] == [
        "journal-0000000000000001.tsj",
        "journal-0000000000000006.tsj",
    ]
    assert [r.lsn for r in Journal(directory).replay()] == [1, 2, 3, 4, 5, 6]


def test_segments_rotate_and_release_deletes_only_fully_released_ones(directory: Path) -> None:
    journal = Journal(directory, segment_bytes=1000)
    fill(journal, 30)  # ~160 bytes a record: 6 records a segment
    names = [p.name for p in segments(directory)]
    assert len(names) == 5
    assert all(p.stat().st_size <= 1000 for p in segments(directory))

    journal.release_through(10)  # the second segment (lsn 7..12) still holds 11 and 12
    assert [p.name for p in segments(directory)] == names[1:]

    journal.release_through(29)  # the open segment still holds 30
    assert [p.name for p in segments(directory)] == names[-1:]
    assert [r.lsn for r in journal.replay()] == [25, 26, 27, 28, 29, 30]

    assert journal.append("event", "s1") == 31
    assert [r.lsn for r in journal.replay()][-2:] == [30, 31]
    assert journal.size() == sum(p.stat().st_size for p in segments(directory))


def test_a_small_open_segment_survives_release_and_appends_go_on_in_it(directory: Path) -> None:
    journal = Journal(directory)
    fill(journal, 10)
    journal.release_through(10)  # applied, but deleting it would cost a new file per batch
    assert len(segments(directory)) == 1
    assert journal.append("event", "s1") == 11
    assert len(segments(directory)) == 1
    assert [r.lsn for r in journal.replay()][-1] == 11


def test_releasing_everything_frees_the_disk_and_appends_go_on(directory: Path) -> None:
    journal = Journal(directory, max_bytes=2000)  # the open segment is big for this bound
    fill(journal, 10)

    journal.release_through(10)

    assert segments(directory) == []
    assert journal.size() == 0
    assert journal.append("event", "s1") == 11
    assert [p.name for p in segments(directory)] == ["journal-0000000000000011.tsj"]
    assert [r.lsn for r in journal.replay()] == [11]


def test_full_journal_refuses_the_record_and_writes_nothing(directory: Path) -> None:
    journal = Journal(directory, max_bytes=2000)
    fill(journal, 10)  # 8-byte header + 10 records of ~140 bytes
    before = {p: p.read_bytes() for p in segments(directory)}
    size = journal.size()

    with pytest.raises(JournalFull) as raised:
        journal.append("output", "s1", {"offset": 0}, b"x" * 1000)

    message = str(raised.value)
    assert "TERMSYS_JOURNAL_MAX_BYTES=2000" in message
    assert f"{size} of" in message
    assert JOURNAL_FULL.split("{")[0] in message
    assert {p: p.read_bytes() for p in segments(directory)} == before
    assert journal.size() == size
    assert journal.last_lsn == 10

    journal.release_through(10)  # the sync engine caught up: room again, numbering continues
    assert journal.append("output", "s1", {"offset": 0}, b"x" * 1000) == 11


def test_record_cut_short_by_a_crash_loses_only_that_record(directory: Path) -> None:
    journal = Journal(directory)
    fill(journal, 20)
    journal.close()
    path = segments(directory)[0]
    cut = path.stat().st_size - 37  # the crash landed in the middle of record 20
    with path.open("r+b") as file:
        file.truncate(cut)

    reopened = Journal(directory)
    assert [r.lsn for r in reopened.replay()] == list(range(1, 20))
    assert reopened.append("event", "s1", {"kind": "attached"}) == 20
    assert reopened.append("output", "s1", {"offset": 0}, b"after") == 21
    reopened.close()

    replayed = list(Journal(directory).replay())
    assert [r.lsn for r in replayed] == list(range(1, 22))
    assert replayed[-1].data == b"after"
    assert path.stat().st_size == cut  # nothing is ever appended after damaged bytes
    assert len(segments(directory)) == 2


def test_garbage_and_a_flipped_byte_skip_only_the_damaged_record(
    directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(directory)
    ends = []
    for i in range(10):
        journal.append("output", "s1", {"offset": i}, f"record-{i}".encode() * 5)
        ends.append(segments(directory)[0].stat().st_size)
    journal.close()
    path = segments(directory)[0]
    content = bytearray(path.read_bytes())
    content[content.index(b"record-6")] ^= 0x01  # bit rot inside record 7's data
    garbage = b"\xa5\x5a\xff\xff" + bytes(range(200, 256)) * 2 + b"\xa5\x5a\x10\x00\x00\x00junk"
    content[ends[2] : ends[2]] = garbage  # between records 3 and 4
    path.write_bytes(bytes(content))

    with caplog.at_level(logging.WARNING, logger="sessions_app.storage.journal"):
        reopened = Journal(directory)
        replayed = list(reopened.replay())

    assert [r.lsn for r in replayed] == [1, 2, 3, 4, 5, 6, 8, 9, 10]
    assert all(r.data == f"record-{r.lsn - 1}".encode() * 5 for r in replayed)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all(str(path) in w for w in warnings)
    assert f"offset {ends[2]} " in warnings[0]
    assert "bad checksum" in warnings[1]
    assert len(reopened.problems) == 2
    assert reopened.append("event", "s1") == 11


def test_segment_from_a_newer_version_is_kept_aside_untouched(
    directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(directory, segment_bytes=500)
    fill(journal, 9)  # three segments of three records
    journal.close()
    _, newer, _ = segments(directory)
    content = bytearray(newer.read_bytes())
    content[3] = 99
    newer.write_bytes(bytes(content))

    with caplog.at_level(logging.ERROR, logger="sessions_app.storage.journal"):
        reopened = Journal(directory)
        replayed = [r.lsn for r in reopened.replay()]

    kept = newer.with_name(newer.name + ".unsupported")
    assert not newer.exists()
    assert kept.read_bytes() == bytes(content)
    assert replayed == [1, 2, 3, 7, 8, 9]
    (problem,) = reopened.problems
    assert "format version 99" in problem
    assert f"reads version {FORMAT_VERSION}" in problem
    assert kept.name in problem
    assert problem in caplog.text
    assert reopened.append("event", "s1") == 10


def test_segment_with_a_foreign_header_is_kept_aside_as_corrupt(directory: Path) -> None:
    journal = Journal(directory)
    fill(journal, 3)
    journal.close()
    stranger = directory / "journal-0000000000000100.tsj"
    stranger.write_bytes(b"PK\x03\x04 not a journal")

    reopened = Journal(directory)

    assert [r.lsn for r in reopened.replay()] == [1, 2, 3]
    assert (directory / (stranger.name + ".corrupt")).read_bytes() == b"PK\x03\x04 not a journal"
    assert "does not start with a termsys journal header" in reopened.problems[0]
    assert reopened.append("event", "s1") == 4


def test_on_disk_format_is_readable_without_this_module(directory: Path) -> None:
    journal = Journal(directory)
    journal.append("output", "session_1", {"offset": 0}, b"\x1b[1mhi\r\n")
    journal.close()

    raw = segments(directory)[0].read_bytes()

    assert raw[:8] == b"TSJ\x01\x00\x00\x00\x00"
    marker, length, crc = struct.unpack_from("<2sII", raw, 8)
    payload = raw[18 : 18 + length]
    assert marker == b"\xa5\x5a" and zlib.crc32(payload) == crc and len(raw) == 18 + length
    lsn, meta_len = struct.unpack_from("<QH", payload)
    assert lsn == 1
    assert payload[10 : 10 + meta_len] == b'{"k":"output","s":"session_1","offset":0}'
    assert payload[10 + meta_len :] == b"\x1b[1mhi\r\n"


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(journal_module.os, "fsync", counting_fsync)
    return calls


def test_fsync_always_syncs_every_append(directory: Path, fsyncs: list[int]) -> None:
    journal = Journal(directory, fsync="ALWAYS")
    journal.append("event", "s1")  # also creates the segment (file and directory fsync)
    fsyncs.clear()

    fill(journal, 5)
    journal.sync()

    assert len(fsyncs) == 5
    assert [r.lsn for r in journal.replay()] == [1, 2, 3, 4, 5, 6]


def test_fsync_interval_syncs_once_per_sync_call_with_writes(
    directory: Path, fsyncs: list[int]
) -> None:
    journal = Journal(directory, fsync="INTERVAL")
    journal.append("event", "s1")
    journal.sync()  # the new segment's file and directory entry
    fsyncs.clear()

    fill(journal, 5)
    assert fsyncs == []
    journal.sync()
    assert len(fsyncs) == 1
    journal.sync()
    assert len(fsyncs) == 1  # nothing written since
    assert [r.lsn for r in journal.replay()] == [1, 2, 3, 4, 5, 6]


def test_fsync_never_never_syncs(directory: Path, fsyncs: list[int]) -> None:
    journal = Journal(directory, fsync="NEVER")
    fill(journal, 5)
    journal.sync()
    journal.close()

    assert fsyncs == []
    assert [r.lsn for r in Journal(directory).replay()] == [1, 2, 3, 4, 5]


def test_unknown_fsync_policy_names_the_setting(directory: Path) -> None:
    with pytest.raises(ValueError, match="TERMSYS_JOURNAL_FSYNC"):
        Journal(directory, fsync="SOMETIMES")


def test_a_second_process_cannot_write_the_same_directory(directory: Path) -> None:
    journal = Journal(directory)
    with pytest.raises(RuntimeError, match="in use by another process"):
        Journal(directory)
    journal.close()
    Journal(directory).close()


def test_appends_and_releases_from_two_threads_keep_lsn_order(directory: Path) -> None:
    journal = Journal(directory, segment_bytes=2000, fsync="INTERVAL")
    done = threading.Event()

    def flusher() -> None:
        while not done.is_set():
            journal.sync()
            journal.release_through(max(journal.last_lsn - 50, 0))

    thread = threading.Thread(target=flusher)
    thread.start()
    lsns = fill(journal, 2000)
    done.set()
    thread.join()

    assert lsns == list(range(1, 2001))
    replayed = [r.lsn for r in journal.replay()]
    assert replayed == list(range(replayed[0], 2001))
    assert replayed[0] <= 1950


def test_write_behind_merges_each_sessions_output_but_keeps_its_order() -> None:
    from sessions_app.storage.sync import Pending, _coalesce

    def out(lsn: int, session: str, offset: int, data: bytes) -> Pending:
        return Pending(
            lsn=lsn, kind="output", session_id=session, meta={"offset": offset}, data=data
        )

    batch = [
        out(1, "a", 0, b"aa"),
        out(2, "b", 0, b"bb"),
        out(3, "a", 2, b"AA"),
        Pending(lsn=4, kind="event", session_id="a", meta={"kind": "title"}),
        out(5, "a", 4, b"zz"),
        out(6, "b", 2, b"BB"),
    ]
    merged = _coalesce(batch)
    assert [(r.session_id, r.kind, r.data) for r in merged] == [
        ("a", "output", b"aaAA"),
        ("b", "output", b"bbBB"),
        ("a", "event", b""),
        ("a", "output", b"zz"),
    ]

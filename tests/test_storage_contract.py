"""One contract suite run against every storage provider, on whichever database is configured.

Like Django's ``SessionTestsMixin``: each test here runs once per entry of ``PROVIDERS``, so a
user sees the same sessions and the same scrollback whichever mode their sessions are stored in.
"""

from __future__ import annotations

import itertools
import logging
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from sessions_app.errors import NotFound, VersionConflict
from sessions_app.models import SessionEvent, new_session_id
from sessions_app.storage.base import SessionRecord, StorageProvider
from sessions_app.storage.database import DatabaseStorage
from sessions_app.storage.hybrid import HybridStorage
from sessions_app.storage.local import LocalStorage
from tests.factories import ProjectFactory

pytestmark = pytest.mark.django_db(transaction=True)

SCROLLBACK_BYTES = 1000
ALL_BYTES = bytes(range(256))


def make_local(scrollback_bytes: int) -> StorageProvider:
    return LocalStorage(scrollback_bytes=scrollback_bytes, max_bytes=64 * 1024 * 1024)


def make_database(scrollback_bytes: int) -> StorageProvider:
    return DatabaseStorage(scrollback_bytes=scrollback_bytes)


def make_hybrid(scrollback_bytes: int) -> StorageProvider:
    return HybridStorage(
        scrollback_bytes=scrollback_bytes,
        memory_max_bytes=64 * 1024 * 1024,
        journal_dir=Path(tempfile.mkdtemp(prefix="termsys-journal-")),
        journal_max_bytes=64 * 1024 * 1024,
        fsync="NEVER",
    )


PROVIDERS: dict[str, Callable[[int], StorageProvider]] = {
    "LOCAL": make_local,
    "DATABASE": make_database,
    "HYBRID": make_hybrid,
}


@pytest.fixture(params=list(PROVIDERS))
def provider(request):
    provider = PROVIDERS[request.param](SCROLLBACK_BYTES)
    yield provider
    if isinstance(provider, HybridStorage):
        provider.close()
        shutil.rmtree(provider.journal.directory, ignore_errors=True)


@pytest.fixture
def new(provider, project, user):
    """Return ``new(**fields)`` -> a session created through the provider."""

    def _new(**fields) -> SessionRecord:
        values = {
            "id": new_session_id(),
            "project_id": project.pk,
            "user_id": user.pk,
            "profile": "system",
            "tab_name": "main",
            "state": "active",
            "storage_mode": provider.mode,
        }
        return provider.create(SessionRecord(**{**values, **fields}))

    return _new


def pieces(data: bytes, size: int) -> list[tuple[int, bytes]]:
    return [(offset, data[offset : offset + size]) for offset in range(0, len(data), size)]


def printed(provider: StorageProvider, session_id: str, data: bytes, size: int = 7) -> int:
    """Append ``data`` in small pieces, the way a PTY's output arrives; return the end."""
    end = 0
    for offset, piece in pieces(data, size):
        end = provider.append_output(session_id, offset, piece)
    return end


def recorded_events(provider: StorageProvider, session_id: str) -> list[tuple[str, dict]]:
    provider.flush()
    if hasattr(provider, "events"):
        return provider.events(session_id)
    rows = SessionEvent.objects.filter(session_id=session_id).order_by("at", "id")
    return [(row.kind, row.data) for row in rows]


# --- records -----------------------------------------------------------------------------


def test_created_session_reads_back_with_every_field(provider, new):
    before = timezone.now()
    created = new(
        tab_name="build",
        title="make -j8",
        cwd="/srv/app",
        pid=4242,
        node="web-1:123",
        cols=132,
        rows=43,
        state="detached",
        exit_code=None,
    )
    after = timezone.now()

    assert provider.get(created.id) == created
    assert (created.tab_name, created.title, created.cwd, created.pid, created.node) == (
        "build",
        "make -j8",
        "/srv/app",
        4242,
        "web-1:123",
    )
    assert (created.cols, created.rows, created.state) == (132, 43, "detached")
    assert (created.version, created.output_bytes, created.closed_at) == (1, 0, None)
    assert before <= created.created_at <= after
    assert before <= created.last_activity <= after


def test_unknown_session_is_absent_everywhere(provider, new):
    new()
    missing = new_session_id()
    assert provider.get(missing) is None
    with pytest.raises(NotFound):
        provider.update(missing, title="x")
    with pytest.raises(NotFound):
        provider.append_output(missing, 0, b"x")
    with pytest.raises(NotFound):
        provider.read_scrollback(missing, max_bytes=100)
    provider.delete(missing)  # deleting what is not there is not an error


def test_update_bumps_version_and_last_activity(provider, new):
    created = new()
    before = timezone.now()
    renamed = provider.update(created.id, expected_version=1, tab_name="logs", cols=100)
    assert (renamed.tab_name, renamed.cols, renamed.version) == ("logs", 100, 2)
    assert renamed.last_activity >= before
    again = provider.update(created.id, title="tail -f")
    assert again.version == 3
    assert provider.get(created.id) == again


def test_stale_version_is_rejected_and_changes_nothing(provider, new):
    created = new()
    current = provider.update(created.id, expected_version=1, tab_name="mine")
    with pytest.raises(VersionConflict):
        provider.update(created.id, expected_version=1, tab_name="theirs")
    assert provider.get(created.id) == current


def test_update_rejects_unknown_fields(provider, new):
    created = new()
    with pytest.raises(TypeError):
        provider.update(created.id, colour="red")
    assert provider.get(created.id) == created


def test_deleted_session_is_gone(provider, new):
    kept, gone = new(), new()
    provider.append_output(gone.id, 0, b"bye")
    provider.delete(gone.id)
    assert provider.get(gone.id) is None
    assert [r.id for r in provider.list_by_project(kept.project_id)] == [kept.id]
    with pytest.raises(NotFound):
        provider.read_scrollback(gone.id, max_bytes=100)


def test_a_session_deleted_after_it_was_written_out_is_gone_at_once(provider, new):
    """HYBRID writes behind: once a session is in the database, a delete must hide it from
    every read before the delete itself reaches the database."""
    kept, gone = new(), new()
    provider.flush()
    provider.delete(gone.id)
    assert provider.get(gone.id) is None
    assert [r.id for r in provider.list_by_project(kept.project_id)] == [kept.id]
    assert [r.id for r in provider.list_by_user(kept.user_id)] == [kept.id]
    provider.prefetch([kept.project_id])
    assert provider.get(gone.id) is None
    provider.flush(session_id=gone.id)
    assert provider.get(gone.id) is None


def test_lists_show_only_that_users_and_projects_open_tabs(
    provider, new, project, user, other_user
):
    other_project = ProjectFactory(owner=user)
    theirs_project = ProjectFactory(owner=other_user)
    first = new()
    second = new(state="detached")
    closed = new(state="exited", closed_at=timezone.now())
    elsewhere = new(project_id=other_project.pk)
    theirs = new(project_id=theirs_project.pk, user_id=other_user.pk)

    assert [r.id for r in provider.list_by_project(project.pk)] == [first.id, second.id]
    assert [r.id for r in provider.list_by_project(project.pk, include_closed=True)] == [
        first.id,
        second.id,
        closed.id,
    ]
    assert [r.id for r in provider.list_by_user(user.pk)] == [first.id, second.id, elsewhere.id]
    assert {r.id for r in provider.list_by_user(user.pk, include_closed=True)} == {
        first.id,
        second.id,
        closed.id,
        elsewhere.id,
    }
    assert [r.id for r in provider.list_by_user(other_user.pk)] == [theirs.id]
    assert provider.list_by_project(theirs_project.pk) == [provider.get(theirs.id)]


def test_events_are_kept_in_order(provider, new):
    created = new()
    provider.add_event(created.id, "created")
    provider.add_event(created.id, "resized", {"cols": 120, "rows": 40})
    provider.add_event(created.id, "title", {"title": "vim"})
    assert recorded_events(provider, created.id) == [
        ("created", {}),
        ("resized", {"cols": 120, "rows": 40}),
        ("title", {"title": "vim"}),
    ]


# --- output and scrollback -------------------------------------------------------------------


def test_output_in_small_pieces_is_replayed_exactly(provider, new):
    created = new()
    output = ALL_BYTES * 3  # 768 bytes, under the scrollback size
    assert printed(provider, created.id, output) == len(output)
    back = provider.read_scrollback(created.id, max_bytes=10_000)
    assert (back.data, back.start, back.end, back.pruned) == (output, 0, len(output), False)
    assert provider.get(created.id).output_bytes == len(output)


def test_retried_output_is_not_shown_twice(provider, new):
    created = new()
    output = ALL_BYTES * 2
    printed(provider, created.id, output[:300], size=50)
    # The same batch again, a batch overlapping the stored end, and an old piece again.
    assert provider.append_output(created.id, 250, output[250:300]) == 300
    assert provider.append_output(created.id, 200, output[200:400]) == 400
    assert provider.append_output(created.id, 0, output[:10]) == 400
    assert provider.append_output(created.id, 400, b"") == 400
    assert provider.append_output(created.id, 400, output[400:]) == len(output)
    back = provider.read_scrollback(created.id, max_bytes=10_000)
    assert back.data == output
    assert provider.get(created.id).output_bytes == len(output)


def test_output_with_a_gap_is_refused(provider, new):
    created = new()
    provider.append_output(created.id, 0, b"hello ")
    with pytest.raises(ValueError):
        provider.append_output(created.id, 10, b"world")
    assert provider.read_scrollback(created.id, max_bytes=100).data == b"hello "
    assert provider.get(created.id).output_bytes == 6


def test_several_sessions_batches_are_stored_together_and_one_bad_batch_spoils_none(provider, new):
    first, second, third = new(), new(), new()
    provider.append_output(second.id, 0, b"earlier ")
    results = provider.append_output_many(
        [
            (first.id, 0, b"one"),
            (second.id, 8, b"two"),
            (third.id, 5, b"a gap"),  # refused: nothing stored before offset 5
            (new_session_id(), 0, b"nobody's"),  # no such session
        ]
    )
    assert results[:2] == [3, 11]
    assert isinstance(results[2], ValueError) and isinstance(results[3], NotFound)
    assert provider.read_scrollback(first.id, max_bytes=100).data == b"one"
    assert provider.read_scrollback(second.id, max_bytes=100).data == b"earlier two"
    assert provider.read_scrollback(third.id, max_bytes=100).data == b""
    assert provider.get(third.id).output_bytes == 0


def test_scrollback_keeps_the_newest_output(provider, new):
    created = new()
    output = ALL_BYTES * 10  # 2560 bytes, well past SCROLLBACK_BYTES
    printed(provider, created.id, output, size=37)

    back = provider.read_scrollback(created.id, max_bytes=10_000)
    assert back.data == output[-SCROLLBACK_BYTES:]
    assert (back.start, back.end, back.pruned) == (
        len(output) - SCROLLBACK_BYTES,
        len(output),
        True,
    )

    short = provider.read_scrollback(created.id, max_bytes=100)
    assert short.data == output[-100:]
    assert (short.start, short.end, short.pruned) == (len(output) - 100, len(output), True)


def test_resume_since_an_offset_sends_exactly_what_followed(provider, new):
    created = new()
    output = ALL_BYTES * 3
    printed(provider, created.id, output)

    resumed = provider.read_scrollback(created.id, max_bytes=10_000, since=500)
    assert (resumed.data, resumed.start, resumed.end, resumed.pruned) == (
        output[500:],
        500,
        len(output),
        False,
    )
    caught_up = provider.read_scrollback(created.id, max_bytes=10_000, since=len(output))
    assert (caught_up.data, caught_up.start, caught_up.pruned) == (b"", len(output), False)


def test_resume_from_before_the_retained_output_says_it_was_pruned(provider, new):
    created = new()
    output = ALL_BYTES * 10
    printed(provider, created.id, output, size=64)

    resumed = provider.read_scrollback(created.id, max_bytes=10_000, since=100)
    assert resumed.pruned
    assert resumed.start == len(output) - SCROLLBACK_BYTES
    assert resumed.data == output[resumed.start :]

    limited = provider.read_scrollback(created.id, max_bytes=50, since=len(output) - 80)
    assert (limited.data, limited.start, limited.pruned) == (output[-50:], len(output) - 50, True)


def test_scrollback_of_a_silent_session_is_empty(provider, new):
    created = new()
    back = provider.read_scrollback(created.id, max_bytes=100)
    assert (back.data, back.start, back.end, back.pruned) == (b"", 0, 0, False)


# --- cleanup ---------------------------------------------------------------------------------


def test_cleanup_removes_only_ended_sessions_idle_before_the_cutoff(provider, new, request):
    now = timezone.now()
    old, recent = now - timedelta(hours=2), now - timedelta(minutes=5)
    cutoff = now - timedelta(hours=1)
    sessions = {}
    for name, state, last in [
        ("old_exited", "exited", old),
        ("old_killed", "killed", old),
        ("old_error", "error", old),
        ("old_detached", "detached", old),
        ("old_active", "active", old),
        ("recent_exited", "exited", recent),
    ]:
        created = new(state=state)
        provider.append_output(created.id, 0, b"$ ")
        provider.add_event(created.id, "created")
        sessions[name] = provider.update(created.id, last_activity=last)

    assert provider.cleanup(cutoff) == 3
    left = {r.id for r in provider.list_by_user(sessions["old_active"].user_id)}
    assert left == {sessions[n].id for n in ("old_detached", "old_active", "recent_exited")}
    assert provider.get(sessions["old_exited"].id) is None
    assert provider.cleanup(cutoff) == 0


def test_optional_hooks_are_safe_to_call(provider, new, project):
    created = new()
    provider.prefetch([project.pk])
    provider.suspend_project(project.pk)
    provider.resume_project(project.pk)
    provider.flush()
    assert provider.pending()["count"] == 0
    assert provider.get(created.id) == created


# --- LOCAL only ------------------------------------------------------------------------------


@pytest.fixture
def local() -> LocalStorage:
    """A LOCAL provider whose total cap (250 bytes) is below one session's scrollback."""
    return LocalStorage(scrollback_bytes=1000, max_bytes=250)


@pytest.fixture
def local_new(local, project, user):
    """Return ``local_new(state)`` -> a session in that state created in ``local``."""

    def _new(state: str) -> SessionRecord:
        record = SessionRecord(
            id=new_session_id(),
            project_id=project.pk,
            user_id=user.pk,
            profile="system",
            tab_name=state,
            state=state,
            storage_mode="LOCAL",
        )
        return local.create(record)

    return _new


def test_local_cap_evicts_the_longest_idle_detached_output_first(local, local_new, caplog):
    watched, older, newer = local_new("active"), local_new("detached"), local_new("detached")
    local.append_output(older.id, 0, b"o" * 100)
    local.append_output(newer.id, 0, b"n" * 100)
    now = timezone.now()
    local.update(older.id, last_activity=now - timedelta(hours=2))
    local.update(newer.id, last_activity=now - timedelta(hours=1))

    local.append_output(watched.id, 0, b"a" * 100)  # 300 bytes > 250: one must go
    gone = local.read_scrollback(older.id, max_bytes=1000)
    assert (gone.data, gone.start, gone.end, gone.pruned) == (b"", 100, 100, True)
    assert local.read_scrollback(newer.id, max_bytes=1000).data == b"n" * 100
    assert local.read_scrollback(watched.id, max_bytes=1000).data == b"a" * 100
    assert local.get(older.id).output_bytes == 100  # the offsets survive; resume still works

    local.append_output(watched.id, 100, b"b" * 100)
    assert local.read_scrollback(newer.id, max_bytes=1000).data == b""
    assert local.stats()["bytes"] == 200

    with caplog.at_level(logging.WARNING, logger="sessions_app.storage.local"):
        local.append_output(watched.id, 200, b"c" * 100)
        local.append_output(watched.id, 300, b"d" * 100)
    assert local.read_scrollback(watched.id, max_bytes=1000).data == (
        b"a" * 100 + b"b" * 100 + b"c" * 100 + b"d" * 100
    )
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "TERMSYS_LOCAL_MAX_BYTES" in caplog.records[0].getMessage()


def test_local_session_that_detaches_becomes_evictable(local, local_new):
    creating, leaving = local_new("creating"), local_new("active")
    local.append_output(creating.id, 0, b"c" * 120)
    local.append_output(leaving.id, 0, b"l" * 120)
    local.update(leaving.id, state="detached")
    local.append_output(creating.id, 120, b"c" * 20)  # 260 bytes > 250
    assert local.read_scrollback(leaving.id, max_bytes=1000).data == b""
    assert local.read_scrollback(creating.id, max_bytes=1000).data == b"c" * 140


def test_local_concurrent_retries_store_output_once(local, local_new):
    created = local_new("active")
    output = ALL_BYTES * 4
    batches = pieces(output, 13)
    errors: list[BaseException] = []

    def replay() -> None:
        try:
            for offset, piece in batches:
                local.append_output(created.id, offset, piece)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=replay) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert local.read_scrollback(created.id, max_bytes=1000).data == output[-1000:]
    assert local.get(created.id).output_bytes == len(output)


def test_local_storage_loses_everything_with_the_process(local, local_new):
    created = local_new("active")
    local.append_output(created.id, 0, b"x")
    fresh = LocalStorage(scrollback_bytes=1000, max_bytes=250)
    assert fresh.get(created.id) is None


def test_factory_builds_local_storage_with_the_configured_caps(settings):
    from sessions_app.storage import get_storage

    settings.TERMSYS_SCROLLBACK_BYTES = 8192
    settings.TERMSYS_LOCAL_MAX_BYTES = 2 * 1024 * 1024
    storage = get_storage("LOCAL")
    assert isinstance(storage, LocalStorage)
    assert (storage.scrollback_bytes, storage.max_bytes) == (8192, 2 * 1024 * 1024)
    assert get_storage("LOCAL") is storage


def database_session(database: StorageProvider, project, user) -> SessionRecord:
    """A new active session created through ``database``."""
    return database.create(
        SessionRecord(
            id=new_session_id(),
            project_id=project.pk,
            user_id=user.pk,
            profile="system",
            tab_name="t",
            state="active",
            storage_mode="DATABASE",
        )
    )


def test_stored_output_text_is_what_the_user_read_without_escape_sequences(project, user):
    """The database keeps each chunk's plain text beside its bytes, for search: colours, titles
    and cursor movement are dropped; line breaks, tabs and non-ASCII text stay."""
    from sessions_app.models import OutputChunk

    database = DatabaseStorage(scrollback_bytes=SCROLLBACK_BYTES)
    record = database_session(database, project, user)
    screen = (
        b"\x1b]0;build: ~/api\x07\x1b]7;file://host/srv/app\x1b\\"
        b"\x1b[01;34mmod12.py\x1b[0m\tcaf\xc3\xa9\r\n"
        b"\x1b[2K\x1b[1Gdone\x07\x1bM\r\n"
        b"\x1b(B\x1b[1mbold\x1b(B\x1b[maf\x1b7ter\x1b8\r\n"  # what tput sgr0 and ESC 7/8 write
    )
    database.append_output(record.id, 0, screen)
    database.append_output(record.id, len(screen), b"plain line\r\n")
    text = "".join(OutputChunk.objects.filter(session_id=record.id).values_list("text", flat=True))
    assert text == "mod12.py\tcafé\ndone\nboldafter\nplain line\n"


def test_text_of_a_grown_chunk_is_the_same_whether_read_whole_or_added_to():
    """A chunk that grows by small batches gets its search text by reading only the new bytes
    where nothing can span the boundary: the result is exactly what reading the whole chunk
    gives, wherever the batches split it (inside colours, titles, DCS strings, CR LF pairs,
    UTF-8 characters)."""
    from sessions_app.storage.base import plain_text, plain_text_after

    stream = (
        b"\x1b]0;build: ~/api\x07\x1b]7;file://host/srv/app\x1b\\"
        b"\x1b[01;34mmod12.py\x1b[0m\tcaf\xc3\xa9 \xe2\x82\xac\r\n"
        b"\x1bP1$r0m\x1b\\\x1b[2K\x1b[1Gdone\x07\x1bM\r\n"
        b"\x1b]133;D;0\x07\x1b]133;A\x07$ \x1b[?2004hls\r\r\nplain\x00line\x7f\r\n"
        b"\x1b(Bbold\x1b)0\x1b7saved\x1b8\x1b#8\x1b%Gx\x1b=\x1bc\r\n\x1b"
    )
    assert plain_text(stream).endswith("plainline\nboldsavedx\n")
    for cut in range(len(stream) + 1):
        first, more = stream[:cut], stream[cut:]
        assert plain_text_after(first, plain_text(first), more) == plain_text(stream), cut
        for second in range(cut, len(stream) + 1):  # and a third batch after that
            middle, rest = stream[cut:second], stream[second:]
            text = plain_text_after(first, plain_text(first), middle)
            assert plain_text_after(stream[:second], text, rest) == plain_text(stream), (
                cut,
                second,
            )


def test_database_keeps_an_interactive_sessions_output_in_few_chunks(project, user):
    """Keystroke-sized batches do not leave a row each: they grow the last chunk up to
    64 KiB, and the output reads back byte for byte."""
    from sessions_app.models import OutputChunk
    from sessions_app.storage.database import CHUNK_MIN_BYTES

    database = DatabaseStorage(scrollback_bytes=1024 * 1024)
    record = database_session(database, project, user)
    written = b""
    for i in range(600):  # 600 batches of 300 bytes: about 176 KiB
        batch = f"{i:05d}".encode() * 60
        database.append_output(record.id, len(written), batch)
        written += batch
    rows = list(OutputChunk.objects.filter(session_id=record.id).order_by("seq"))
    assert len(rows) <= len(written) // CHUNK_MIN_BYTES + 1
    assert b"".join(bytes(r.data) for r in rows) == written
    assert database.read_scrollback(record.id, max_bytes=len(written)).data == written


def test_database_takes_a_window_sized_batch_after_output_it_would_have_pruned(project, user):
    """A terminal whose flood outran the database stores only the newest window's worth: the
    history reads exactly as if every byte had been stored and the oldest pruned."""
    window = 8192
    database = DatabaseStorage(scrollback_bytes=window)
    record = database_session(database, project, user)
    flood = b"".join(f"line {i:06d}\r\n".encode() for i in range(5000))  # 65 KiB
    database.append_output(record.id, 0, flood[:1000])
    with pytest.raises(ValueError):  # a gap the window would still show is refused
        database.append_output(record.id, 2000, flood[2000 : 2000 + window - 1])
    start = len(flood) - window
    assert database.append_output(record.id, start, flood[start:]) == len(flood)

    back = database.read_scrollback(record.id, max_bytes=10**6)
    assert (back.data, back.start, back.end) == (flood[start:], start, len(flood))
    resumed = database.read_scrollback(record.id, max_bytes=10**6, since=500)
    assert resumed.pruned and resumed.data == flood[start:]
    assert database.get(record.id).output_bytes == len(flood)


@pytest.mark.django_db(transaction=True)
def test_database_batches_stored_from_memory_read_back_exactly_and_survive_another_writer(
    project, user
):
    """A busy terminal's batches are stored without reading the session first (the provider
    remembers what the last committed batch left). What is stored must read back exactly as
    if every batch had been read-checked: through small echoes that grow the last chunk,
    batches that fill a chunk, batches longer than one, pruning, a window-sized gap, and a
    second writer of the same session that makes what the first remembers stale."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from sessions_app.models import OutputChunk
    from sessions_app.storage import database as db_module

    window = 300 * 1024
    writer = DatabaseStorage(scrollback_bytes=window)
    record = database_session(writer, project, user)
    just_under = db_module.CHUNK_MIN_BYTES - 3  # leaves a chunk one batch short of full
    sizes = [5, 17, 1, 3000, 70_000, 9, 200_000, 300_000, 40, just_under, 12, 600_000, 7]
    stream = b""
    for i, size in enumerate(sizes):
        batch = bytes((i * 31 + n) % 251 for n in range(size))
        if size == 600_000:  # a flood the terminal kept to the newest window (a gap)
            stream += b"\0" * (size - window)
            batch = batch[-window:]
        offset = len(stream)
        assert writer.append_output(record.id, offset, batch) == offset + len(batch)
        stream += batch
        fresh = DatabaseStorage(scrollback_bytes=window).read_scrollback(
            record.id, max_bytes=window
        )
        assert (fresh.data, fresh.end) == (stream[-window:], len(stream)), f"after batch {i}"
    chunks = list(OutputChunk.objects.filter(session_id=record.id).order_by("seq"))
    for before, after in itertools.pairwise(chunks):
        assert after.seq == before.seq + 1 and after.offset == before.offset + len(before.data)
    assert all(len(c.data) <= db_module.CHUNK_MAX_BYTES for c in chunks)

    # An echo after all that reads nothing: two statements (the session, the last chunk).
    with CaptureQueriesContext(connection) as queries:
        writer.append_output(record.id, len(stream), b"x")
    stream += b"x"
    statements = written_statements(queries)
    assert len(statements) == 2 and all(s.startswith("UPDATE") for s in statements), statements

    # Another writer (HYBRID's sync, another process) appends: the first one's memory is stale.
    DatabaseStorage(scrollback_bytes=window).append_output(record.id, len(stream), b"<other>")
    stream += b"<other>"
    assert writer.append_output(record.id, len(stream) - 7, b"<other>") == len(stream)  # a retry
    assert writer.append_output(record.id, len(stream), b"<mine>") == len(stream) + 6
    stream += b"<mine>"
    back = DatabaseStorage(scrollback_bytes=window).read_scrollback(record.id, max_bytes=window)
    assert (back.data, back.end) == (stream[-window:], len(stream))

    # The remembered last chunk vanishes (a restore): the batch is refused, nothing changes,
    # and the next attempt reads the database and stores it.
    last = OutputChunk.objects.filter(session_id=record.id).order_by("-seq").first()
    kept = (last.seq, last.offset, bytes(last.data))
    last.delete()
    OutputChunk.objects.create(
        session_id=record.id, seq=kept[0], offset=kept[1], data=kept[2], text=""
    )
    assert writer.append_output(record.id, len(stream), b"<after restore>") == len(stream) + 15
    stream += b"<after restore>"
    back = DatabaseStorage(scrollback_bytes=window).read_scrollback(record.id, max_bytes=window)
    assert (back.data, back.end) == (stream[-window:], len(stream))


def written_statements(queries) -> list[str]:
    """The SELECT and UPDATE statements captured, one per execute or executemany call."""
    sql = [re.sub(r"^\d+ times: ", "", q["sql"]) for q in queries.captured_queries]
    return [q for q in sql if q.startswith(("SEL", "UP"))]


@pytest.mark.django_db(transaction=True)
def test_a_busy_tick_of_many_terminals_is_two_statements_and_a_stale_one_spoils_none(project, user):
    """A tick where every terminal's batch only grows its last chunk (many users typing) is
    stored with two statements for all of them. When one session's stored end is not what
    the writer remembers (another writer appended), nothing of the tick is lost: every
    batch is stored, the stale one after reading the database."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    window = 64 * 1024
    writer = DatabaseStorage(scrollback_bytes=window)
    records = [database_session(writer, project, user) for _ in range(6)]
    streams = {r.id: b"" for r in records}

    def tick(text: bytes) -> list:
        batches = [(r.id, len(streams[r.id]), text + r.id[-4:].encode()) for r in records]
        ends = writer.append_output_many(batches)
        for session_id, _offset, data in batches:
            streams[session_id] += data
        return ends

    tick(b"$ ls\r\n")  # the first batches read what is stored; from then on it is known
    with CaptureQueriesContext(connection) as queries:
        ends = tick(b"x")
    assert ends == [len(streams[r.id]) for r in records]
    statements = written_statements(queries)
    assert len(statements) == 2 and all(s.startswith("UPDATE") for s in statements), statements

    other = records[3]
    DatabaseStorage(scrollback_bytes=window).append_output(
        other.id, len(streams[other.id]), b"<other>"
    )
    streams[other.id] += b"<other>"
    ends = tick(b"after")
    assert ends == [len(streams[r.id]) for r in records]
    reader = DatabaseStorage(scrollback_bytes=window)
    for record in records:
        back = reader.read_scrollback(record.id, max_bytes=window)
        assert (back.data, back.end) == (streams[record.id], len(streams[record.id]))
    assert tick(b"again") == [len(streams[r.id]) for r in records]

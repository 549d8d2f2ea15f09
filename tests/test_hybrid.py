"""HYBRID storage and live storage-mode switches, with real PTYs and the real database."""

from __future__ import annotations

import re

import pytest
from channels.db import database_sync_to_async

from featureflags import services as flags
from sessions_app import services, storage, terminals
from sessions_app.models import OutputChunk, SessionEvent, TerminalSession
from sessions_app.storage.journal import Journal
from sessions_app.storage.sync import SyncEngine

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def hybrid(settings):
    settings.TERMSYS_STORAGE_MODE = "HYBRID"
    settings.TERMSYS_SCROLLBACK_BYTES = 4 * 1024 * 1024
    yield
    storage._close_all()


def stored_output(session_id: str) -> bytes:
    chunks = OutputChunk.objects.filter(session_id=session_id).order_by("seq")
    return b"".join(bytes(c.data) for c in chunks)


async def test_output_is_journaled_before_a_client_sees_it(
    user, project, hybrid, live_terminals, connect, settings, monkeypatch
):
    # Keep applied segments on disk so the test can look at them afterwards.
    monkeypatch.setattr(Journal, "release_through", lambda self, lsn: None)
    record = await services.session_create(user=user, project_id=project.pk)
    assert record.storage_mode == "HYBRID"
    term = await connect(user, record.id)
    await term.type("echo journal-$((6*7))-first\r")
    await term.read_until(b"journal-42-first")
    on_disk = b"".join(
        p.read_bytes() for p in sorted(settings.TERMSYS_JOURNAL_DIR.glob("journal-*.tsj"))
    )
    assert b"journal-42-first" in on_disk


async def test_write_behind_reaches_the_database_once_in_order(
    user, project, hybrid, live_terminals, connect
):
    record = await services.session_create(user=user, project_id=project.pk)
    term = await connect(user, record.id)
    await term.type("for i in $(seq 1 300); do echo row-$i; done\r")
    seen = await term.read_until(b"row-300\r\n")
    provider = storage.get_storage("HYBRID")
    await database_sync_to_async(provider.flush)()
    in_db = await database_sync_to_async(stored_output)(record.id)
    assert in_db[: len(seen)] == seen  # everything the client saw, once, in order
    rows = [int(n) for n in re.findall(rb"row-(\d+)\r\n", in_db)]
    assert rows == list(range(1, 301))
    kinds = await database_sync_to_async(
        lambda: list(
            SessionEvent.objects.filter(session_id=record.id).values_list("kind", flat=True)
        )
    )()
    assert kinds[:2] == ["created", "started"]
    state = await database_sync_to_async(lambda: TerminalSession.objects.get(pk=record.id).state)()
    assert state == "active"


def test_journal_replay_after_a_crash_applies_everything_once(user, project, settings, monkeypatch):
    """Writes that never reached the database (the process died first) land after restart."""
    settings.TERMSYS_STORAGE_MODE = "HYBRID"
    monkeypatch.setattr(
        SyncEngine, "_apply_batch", lambda self, batch: None
    )  # the crash: nothing applied
    first = storage.get_storage("HYBRID")
    from sessions_app.models import new_session_id
    from sessions_app.storage.base import SessionRecord

    session_id = new_session_id()
    first.create(
        SessionRecord(
            id=session_id,
            project_id=project.pk,
            user_id=user.pk,
            profile="system",
            tab_name="t",
            state="active",
            storage_mode="HYBRID",
        )
    )
    first.add_event(session_id, "started", {"pid": 1})
    for i in range(50):
        first.append_output(session_id, i * 6, f"out{i:03d}".encode())
    first.update(session_id, title="after")
    assert not TerminalSession.objects.filter(pk=session_id).exists()
    first.engine.stop()
    first.journal.close()  # the process is gone; only its journal remains
    storage._providers.clear()
    monkeypatch.undo()

    second = storage.get_storage("HYBRID")
    assert second.replayed >= 53
    second.flush()
    row = TerminalSession.objects.get(pk=session_id)
    assert (row.title, row.output_bytes) == ("after", 300)
    assert stored_output(session_id) == b"".join(f"out{i:03d}".encode() for i in range(50))
    # replaying the same journal again changes nothing
    second.engine.stop()
    second.journal.close()
    storage._providers.clear()
    third = storage.get_storage("HYBRID")
    third.flush()
    assert stored_output(session_id) == b"".join(f"out{i:03d}".encode() for i in range(50))
    assert SessionEvent.objects.filter(session_id=session_id, kind="started").count() == 1
    storage._close_all()


async def test_live_session_switches_hybrid_to_database_mid_stream(
    user, project, settings, live_terminals, connect
):
    settings.TERMSYS_SCROLLBACK_BYTES = 4 * 1024 * 1024
    await database_sync_to_async(_save_flag)(True)
    record = await services.session_create(user=user, project_id=project.pk)
    assert record.storage_mode == "HYBRID"
    term = await connect(user, record.id)
    await term.control("hello")
    # The client does not acknowledge, so output stops at the flow-control high-water mark,
    # mid-stream; the flag goes off there and the session must switch before the rest flows.
    await term.type("seq 1 200000; echo END-$((1+1))\r")
    await term.read_until(b"\r\n1000\r\n")
    await database_sync_to_async(_save_flag)(False)
    mode = await term.control("mode", timeout=15)
    assert mode["mode"] == "DATABASE"
    while b"END-2" not in term.output:
        await term.ws.send_to(text_data='{"type": "ack", "bytes": 10000000}')
        try:
            await term._receive_one(0.5)
        except TimeoutError:
            pass
    await term.read_until(b"END-2\r\n")
    terminal = terminals.get(record.id)
    await terminal.flush()
    in_db = await database_sync_to_async(stored_output)(record.id)
    seen = bytes(term.output)  # the prompt after END-2 may be stored before the client reads it
    common = min(len(in_db), len(seen))
    assert in_db[:common] == seen[:common] and b"END-2\r\n" in in_db
    expected = "".join(f"{i}\r\n" for i in range(1, 200001)).encode()
    assert in_db.count(expected) == 1
    row = await database_sync_to_async(TerminalSession.objects.get)(pk=record.id)
    assert row.storage_mode == "DATABASE"
    changed = await database_sync_to_async(
        lambda: list(
            SessionEvent.objects.filter(session_id=record.id, kind="mode_changed").values_list(
                "data", flat=True
            )
        )
    )()
    assert changed == [{"from": "HYBRID", "to": "DATABASE"}]
    storage._close_all()


def _save_flag(on: bool) -> None:
    """Turn storage_hybrid on for everyone, or roll it back (as an operator would)."""
    flags.ensure_product_flags()  # a transactional test's flush removed the migration's rows
    if on:
        flags.flag_enable("storage_hybrid", actor="test", source="command", reason="test on")
    else:
        flags.flag_rollback("storage_hybrid", actor="test", source="command", reason="test off")


async def test_emergency_rollback_puts_new_sessions_on_the_stable_mode(
    user, project, settings, live_terminals
):
    await database_sync_to_async(_save_flag)(True)
    settings.TERMSYS_EMERGENCY_ROLLBACK = True
    record = await services.session_create(user=user, project_id=project.pk)
    assert record.storage_mode == "DATABASE"
    settings.TERMSYS_EMERGENCY_ROLLBACK = False
    record = await services.session_create(user=user, project_id=project.pk)
    assert record.storage_mode == "HYBRID"
    storage._close_all()

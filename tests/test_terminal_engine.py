"""The terminal engine seen from its clients: lossless resume, shared sessions, read-only
viewers, the PTY size, and rate limits. Real PTYs running real bash."""

from __future__ import annotations

import base64
import json
import random
import re

import pytest
from channels.db import database_sync_to_async

from sessions_app import terminals
from sessions_app.models import SessionEvent
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

SEQ_COUNT = 300_000
SEQ_BYTES = "".join(f"{i}\r\n" for i in range(1, SEQ_COUNT + 1)).encode()
ACK_EVERY = 64 * 1024


async def frame(term, timeout: float = 10) -> bytes | dict:
    """Return the next frame: bytes (output) or a dict (control)."""
    message = await term.ws.receive_output(timeout)
    if message["type"] == "websocket.close":
        raise ConnectionError(f"closed with {message.get('code')}")
    if message.get("bytes") is not None:
        return message["bytes"]
    return json.loads(message["text"])


class Reader:
    """Reads one connection's stream into ``received``, acknowledging as the page does."""

    def __init__(self, term, received: bytearray) -> None:
        self.term, self.received, self.unacked = term, received, 0

    async def until(self, *, more: int | None = None, marker: bytes | None = None) -> None:
        goal = len(self.received) + more if more is not None else None
        while True:
            if goal is not None and len(self.received) >= goal:
                return
            if marker is not None and marker in self.received[-4096:]:
                return
            item = await frame(self.term)
            if isinstance(item, bytes):
                self.received += item
                self.unacked += len(item)
                if self.unacked >= ACK_EVERY:
                    await self.term.send_json({"type": "ack", "bytes": self.unacked})
                    self.unacked = 0


async def test_random_disconnects_lose_and_repeat_nothing(user, session, connect, settings):
    """A client that disconnects at random points and resumes from the bytes it has, by query
    parameter or by a resume message, ends up with exactly the session's stream."""
    settings.TERMSYS_SCROLLBACK_BYTES = 8 * 1024 * 1024  # so nothing is pruned meanwhile
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    received = bytearray()
    typed = False
    for attempt in range(200):
        by_message = attempt % 2 == 1
        query = "" if by_message or not received else f"offset={len(received)}"
        term = await connect(user, session.id, query=query)
        if by_message:
            await term.send_json({"type": "resume", "offset": len(received)})
            while True:  # everything before the answer to the resume is to be ignored
                item = await frame(term)
                if isinstance(item, dict) and item.get("resumed"):
                    hello = item
                    break
        else:
            hello = await frame(term)
        assert hello["type"] == "hello", (seed, hello)
        assert (hello["offset"], hello["pruned"]) == (len(received), False), (seed, hello)
        reader = Reader(term, received)
        if not typed:
            await term.type(f"seq 1 {SEQ_COUNT}; echo SEQ-$((6*7))-END\r")
            typed = True
        await reader.until(more=rng.randrange(1, 300_000), marker=b"SEQ-42-END")
        await term.close()
        if b"SEQ-42-END" in received[-4096:]:
            break
    else:
        raise AssertionError(f"seed {seed}: the stream did not end")

    stored = terminals.get(session.id).tail(16 * 1024 * 1024)
    assert stored.start == 0
    assert bytes(received) == stored.data[: len(received)], f"seed {seed}"
    assert bytes(received).count(SEQ_BYTES) == 1, f"seed {seed}"


async def test_resume_from_a_pruned_offset_says_so_and_sends_the_retained_tail(
    user, session, connect, settings
):
    settings.TERMSYS_SCROLLBACK_BYTES = 4096
    term = await connect(user, session.id)
    await term.type("seq 1 5000; echo DONE-$((2+3))\r")
    await term.read_until(b"DONE-5\r\n")
    while not re.search(rb"DONE-5\r\n.*[#$] (?:\x1b\]633;B\x07)?$", bytes(term.output), re.S):
        await term._receive_one(10)  # the prompt too: nothing more is printed after this
    await term.close()

    again = await connect(user, session.id)
    await again.send_json({"type": "resume", "offset": 10})
    while True:
        item = await frame(again)
        if isinstance(item, dict) and item.get("resumed"):
            break
    assert item["pruned"] is True and item["offset"] > 10
    again.output.clear()
    info = await again.control("info")
    assert info["code"] == "output_pruned" and str(item["offset"]) in info["message"]
    tail = terminals.get(session.id).tail(4096)
    assert tail.start == item["offset"]
    await again.read_until(tail.data[-64:])
    assert bytes(again.output).startswith(tail.data[:64])


async def test_resume_of_an_ended_session_sends_the_missing_history(user, session, connect):
    term = await connect(user, session.id)
    await term.type("echo first-$((1)); echo second-$((2)); exit 3\r")
    await term.control("exit")
    everything = bytes(term.output)
    await term.close()
    cut = everything.index(b"second-2")

    again = await connect(user, session.id)
    await again.control("hello")
    await again.control("exit")
    again.output.clear()
    await again.send_json({"type": "resume", "offset": cut})
    hello = await again.control("hello")
    assert hello["resumed"] is True and hello["offset"] == cut
    exit_message = await again.control("exit")
    assert exit_message["exitCode"] == 3
    assert bytes(again.output) == everything[cut : len(again.output) + cut]
    assert bytes(again.output).startswith(b"second-2")


async def test_malformed_resume_is_an_error_and_the_terminal_keeps_working(user, session, connect):
    term = await connect(user, session.id)
    await term.control("hello")
    for bad in (
        {"type": "resume"},
        {"type": "resume", "offset": -1},
        {"type": "resume", "offset": "9"},
    ):
        await term.send_json(bad)
        error = await term.control("error")
        assert error["code"] == "invalid_resume"
    await term.type("echo alive-$((40+2))\r")
    await term.read_until(b"alive-42")


# --- shared sessions and read-only viewers ------------------------------------------------


@pytest.fixture
def staff(db):
    staff = UserFactory(is_staff=True)
    return staff


async def test_two_of_the_owners_clients_can_both_type(user, session, connect):
    first = await connect(user, session.id)
    second = await connect(user, session.id)
    await first.type("echo from-$((1))-first\r")
    await second.read_until(b"from-1-first\r\n")
    await second.type("echo from-$((2))-second\r")
    await first.read_until(b"from-2-second\r\n")


async def test_staff_watch_read_only_and_their_input_never_reaches_the_shell(
    user, staff, session, connect
):
    owner = await connect(user, session.id)
    await owner.control("hello")
    viewer = await connect(staff, session.id)
    hello = await viewer.control("hello")
    assert hello["readOnly"] is True

    await viewer.type("touch VIEWER-WAS-HERE; echo viewer-$((6*6))\r")
    error = await viewer.control("error")
    assert error["code"] == "read_only"
    await viewer.send_json({"type": "resize", "cols": 33, "rows": 11})
    await owner.type("stty size; ls; echo owner-$((7*7))\r")
    seen_by_owner = await owner.read_until(b"owner-49\r\n")
    seen_by_viewer = await viewer.read_until(b"owner-49\r\n")
    assert b"viewer-36" not in seen_by_owner and b"VIEWER-WAS-HERE" not in seen_by_owner
    assert b"11 33" not in seen_by_owner  # a viewer's window does not size the terminal
    assert seen_by_viewer.endswith(seen_by_owner[-200:])  # the same stream

    events = await database_sync_to_async(
        lambda: list(
            SessionEvent.objects.filter(session_id=session.id, kind="attached").values_list(
                "data", flat=True
            )
        )
    )()
    assert {"readOnly": True, "viewer": staff.username} in events


async def test_a_viewer_is_told_the_owners_size_and_each_change_before_output_drawn_for_it(
    user, staff, session, connect
):
    """A viewer draws at the owner's size; when the owner resizes, what the shell draws next is
    drawn for the new size, so the viewer must learn of it first, in stream order."""
    owner = await connect(user, session.id)
    await owner.send_json({"type": "resize", "cols": 120, "rows": 40})
    await owner.type("stty size; echo sized-$((3*3))\r")
    await owner.read_until(b"sized-9\r\n")
    viewer = await connect(staff, session.id)
    hello = await viewer.control("hello")
    assert (hello["cols"], hello["rows"]) == (120, 40)

    await owner.send_json({"type": "resize", "cols": 90, "rows": 30})
    await owner.type("stty size; echo resized-$((4*4))\r")
    size = await viewer.control("size")
    assert (size["cols"], size["rows"]) == (90, 30)
    assert b"resized-16" not in viewer.output  # told before the output drawn for it
    out = await viewer.read_until(b"resized-16\r\n")
    assert b"30 90" in out[out.index(b"resized-$") :]
    await owner.read_until(b"resized-16\r\n")
    assert not any(c.get("type") == "size" for c in owner.controls)  # owners size it


async def test_the_owner_can_open_a_read_only_view_too(user, session, connect):
    term = await connect(user, session.id, query="readonly=1")
    assert (await term.control("hello"))["readOnly"] is True
    await term.type("x")
    assert (await term.control("error"))["code"] == "read_only"


async def test_a_slow_viewer_never_slows_the_owner_and_is_resynced(user, staff, session, connect):
    owner = await connect(user, session.id)
    await owner.control("hello")
    viewer = await connect(staff, session.id)  # reads nothing and acknowledges nothing
    await viewer.control("hello")

    received = bytearray()
    await owner.type("seq 1 400000; echo FLOOD-$((5*5))-DONE\r")
    await Reader(owner, received).until(marker=b"FLOOD-25-DONE")  # never held back
    terminal = terminals.get(session.id)
    viewer_client = next(c for c in terminal.clients if not c.interactive)
    assert viewer_client.behind
    assert viewer_client.unacked < 2 * 1024 * 1024  # what was sent to it stayed bounded

    # The viewer catches up on what was sent, acknowledges it, and is resynced from the tail.
    while True:
        item = await frame(viewer)
        if isinstance(item, dict) and item.get("resync"):
            break
        if isinstance(item, bytes) and viewer_client.unacked > 0:
            await viewer.send_json({"type": "ack", "bytes": viewer_client.unacked})
    # The resync reaches what the owner saw (the prompt may print after it, as live output).
    assert item["pruned"] is True and len(received) <= item["end"] <= terminal.end_offset
    viewer.output.clear()
    await viewer.read_until(b"FLOOD-25-DONE")
    stored = terminal.tail(16 * 1024 * 1024)
    assert stored.data[item["offset"] - stored.start :].startswith(bytes(viewer.output))
    assert item["offset"] > len(received) // 2  # only the newest part, not the whole flood


async def test_pty_size_follows_the_client_that_typed_last(user, session, connect):
    wide = await connect(user, session.id)
    narrow = await connect(user, session.id)
    await wide.send_json({"type": "resize", "cols": 150, "rows": 40})
    await wide.type("stty size; echo A-$((1+1))\r")
    await wide.read_until(b"A-2\r\n")
    await narrow.send_json({"type": "resize", "cols": 60, "rows": 20})
    await wide.type("stty size; echo B-$((1+2))\r")  # the wide window still types: 40 150
    out = await wide.read_until(b"B-3\r\n")
    assert b"40 150" in out[out.index(b"B-$") :]
    await narrow.type("stty size; echo C-$((1+3))\r")  # now the narrow one: 20 60
    out = await narrow.read_until(b"C-4\r\n")
    assert b"20 60" in out[out.index(b"C-$") :]


# --- rate limits --------------------------------------------------------------------------


async def test_too_many_connections_a_minute_close_4429(user, session, connect, settings):
    settings.TERMSYS_WS_CONNECTS_PER_MINUTE = 2
    for _ in range(2):
        term = await connect(user, session.id)
        await term.control("hello")
        await term.close()
    refused = await connect(user, session.id)
    error = await refused.control("error")
    assert error["code"] == "rate_limited"
    assert "TERMSYS_WS_CONNECTS_PER_MINUTE=2" in error["message"]
    assert await refused.closed() == 4429


async def test_a_frame_flood_closes_4429_and_acks_are_not_counted(user, session, connect, settings):
    settings.TERMSYS_WS_MESSAGES_PER_SECOND = 20
    term = await connect(user, session.id)
    await term.control("hello")
    for _ in range(100):
        await term.send_json({"type": "ack", "bytes": 0})
    await term.type("echo acks-ok-$((2*5))\r")
    await term.read_until(b"acks-ok-10")
    for _ in range(100):
        await term.send_json({"type": "ping"})
    error = await term.control("error")
    assert error["code"] == "rate_limited"
    assert await term.closed() == 4429
    again = await connect(user, session.id)  # the session itself is untouched
    await again.type("echo still-$((3*3))\r")
    await again.read_until(b"still-9")


class FakeClient:
    """A client as the terminal sees it, recording what it is sent."""

    interactive = True

    def __init__(self) -> None:
        self.unacked, self.unsent, self.position, self.behind, self.size = 0, 0, 0, False, None
        self.frames: list[bytes | dict] = []

    async def send_output(self, data: bytes) -> None:
        self.frames.append(data)

    async def send_control(self, message: dict) -> None:
        self.frames.append(message)

    def stream(self) -> bytes:
        """Output after the last hello, as a client would write it to its screen."""
        last = max(i for i, f in enumerate(self.frames) if isinstance(f, dict))
        return b"".join(f for f in self.frames[last:] if isinstance(f, bytes))


async def test_a_client_attaching_while_output_is_queued_gets_each_byte_once(
    user, session, connect
):
    import asyncio

    term = await connect(user, session.id)
    await term.type("echo ready-$((1+1))\r")
    await term.read_until(b"ready-2")
    terminal = terminals.get(session.id)
    # Output queued for the attached clients but not sent yet, when a new client attaches
    # (or an attached one resumes): the replay already holds it, so it must not come again.
    terminal._emit(b"<queued-before-attach>")
    late, resuming = FakeClient(), FakeClient()
    terminal.attach(resuming, {"type": "hello"})
    await asyncio.sleep(0.05)
    terminal._emit(b"<queued-before-resume>")
    terminal.attach(late, {"type": "hello"})
    terminal.resume(resuming, {"type": "hello"}, since=0)
    terminal._emit(b"<after>")
    await asyncio.sleep(0.05)
    everything = terminal.tail(1 << 20).data
    try:
        assert isinstance(late.frames[0], dict)  # hello first: nothing before it
        assert b"".join(f for f in late.frames if isinstance(f, bytes)) == everything
        assert resuming.stream() == everything
        assert late.stream().count(b"<queued-before-attach>") == 1
    finally:
        terminal.detach(late)
        terminal.detach(resuming)


class StalledClient(FakeClient):
    """A client whose socket is full until ``drained`` is set (a send that has to wait)."""

    def __init__(self) -> None:
        super().__init__()
        import asyncio

        self.drained = asyncio.Event()
        self.drained.set()

    async def send_output(self, data: bytes) -> None:
        await self.drained.wait()
        self.frames.append(data)


async def test_output_that_waits_for_a_full_socket_keeps_its_order_and_holds_up_no_one(
    user, session, connect
):
    """Output is sent at once while a client's socket takes it; when one has to wait, what
    follows waits behind it, in order, and the other clients keep getting theirs."""
    import asyncio

    term = await connect(user, session.id)
    await term.type("echo ready-$((2+2))\r")
    await term.read_until(b"ready-4")
    terminal = terminals.get(session.id)
    stalled, other = StalledClient(), FakeClient()
    terminal.attach(stalled, {"type": "hello"})
    terminal.attach(other, {"type": "hello"})
    await asyncio.sleep(0.05)
    try:
        stalled.drained.clear()
        for part in (b"<one>", b"<two>", b"<three>"):
            terminal._emit(part)
        await asyncio.sleep(0.05)
        assert other.stream().endswith(b"<one><two><three>")  # not held up
        assert not stalled.stream().endswith(b"<one>")  # still waiting
        stalled.drained.set()
        await asyncio.sleep(0.05)
        assert stalled.stream().endswith(b"<one><two><three>")
        terminal._emit(b"<four>")
        assert stalled.stream().endswith(b"<three><four>")  # sent at once again

        stalled.drained.clear()  # a client that leaves while a send waits
        terminal._emit(b"<five>")
        terminal.detach(stalled)
        await asyncio.sleep(0.05)
        assert not stalled.stream().endswith(b"<five>")
        assert other.stream().endswith(b"<four><five>")
    finally:
        terminal.detach(stalled)
        terminal.detach(other)
    await term.type("echo still-$((5*5))\r")
    await term.read_until(b"still-25")


# --- revival ------------------------------------------------------------------------------


async def test_only_a_shell_that_died_with_its_server_can_be_revived(user, session, connect):
    from sessions_app import services
    from sessions_app.errors import Conflict

    with pytest.raises(Conflict, match="server restarted"):  # still running
        await services.session_revive(user=user, session_id=session.id)
    term = await connect(user, session.id)
    await term.type("exit 4\r")
    assert (await term.control("exit"))["revivable"] is False
    with pytest.raises(Conflict, match=r"exited \(exited\)"):  # the user ended it
        await services.session_revive(user=user, session_id=session.id)
    record = await database_sync_to_async(services._find)(session.id)
    assert (record.state, record.end_reason, record.exit_code) == ("exited", "exited", 4)


async def test_a_revival_whose_shell_cannot_start_keeps_the_session_and_says_why(
    user, project, settings
):
    """Unlike a refused create, a failed revival keeps the tab and its history, in state
    error: the session existed before the request."""
    from sessions_app import services
    from sessions_app.errors import SpawnFailed
    from sessions_app.models import TerminalSession

    settings.TERMSYS_PROFILES = {"system": ["/opt/nowhere/shell"]}
    session = await TerminalSession.objects.acreate(
        user=user, project=project, tab_name="old", state="exited", end_reason="server_restarted"
    )
    with pytest.raises(SpawnFailed, match="/opt/nowhere/shell"):
        await services.session_revive(user=user, session_id=session.pk)
    record = await database_sync_to_async(services._find)(session.pk)
    assert (record.state, record.tab_name) == ("error", "old")
    assert await SessionEvent.objects.filter(session_id=session.pk, kind="error").aexists()


# --- total scrollback memory ----------------------------------------------------------------


async def test_over_the_memory_cap_detached_sessions_are_replayed_from_the_database(
    user, project, connect, settings, live_terminals
):
    from sessions_app import services

    settings.TERMSYS_SCROLLBACK_MEMORY_BYTES = 1024 * 1024
    quiet = await services.session_create(user=user, project_id=project.pk, tab_name="quiet")
    loud = await services.session_create(user=user, project_id=project.pk, tab_name="loud")
    term = await connect(user, quiet.id)
    await term.type("seq 1 100000; echo QUIET-$((1+1))-DONE\r")  # about 590 KB
    quiet_reader = Reader(term, bytearray())
    await quiet_reader.until(marker=b"QUIET-2-DONE")
    await quiet_reader.until(marker=b"\x1b]633;B\x07")  # its prompt: it prints no more
    await term.close()  # nobody watches it now
    quiet_terminal = terminals.get(quiet.id)
    await quiet_terminal.flush()
    everything = quiet_terminal.tail(8 * 1024 * 1024).data

    term = await connect(user, loud.id)
    await term.type("seq 1 150000; echo LOUD-$((1+2))-DONE\r")  # about 950 KB more
    await Reader(term, bytearray()).until(marker=b"LOUD-3-DONE")
    assert terminals.tail_bytes() <= settings.TERMSYS_SCROLLBACK_MEMORY_BYTES
    assert len(quiet_terminal.tail(8 * 1024 * 1024).data) < len(everything)  # memory let go

    # Opening the project shows it whole (the snapshot reads what memory let go from storage).
    from sessions_app import workspace

    snapshot = await workspace.project_snapshot(
        user=user, project_id=project.pk, tail_bytes=1024 * 1024
    )
    shown = next(t for t in snapshot["terminals"] if t["id"] == quiet.id)["scrollback"]
    assert (shown["offset"], shown["end"]) == (0, len(everything))
    assert base64.b64decode(bytes(shown["data"])) == everything

    # Attaching again replays it all (from the database), and resuming gets exact bytes.
    again = await connect(user, quiet.id)
    hello = await again.control("hello")
    assert (hello["offset"], hello["end"]) == (0, len(everything))
    await again.read_until(b"QUIET-2-DONE")
    assert bytes(again.output)[: len(everything)] == everything
    resumed = await connect(user, quiet.id, query="offset=1000")
    hello = await resumed.control("hello")
    assert (hello["offset"], hello["pruned"]) == (1000, False)
    await resumed.read_until(b"QUIET-2-DONE")
    assert bytes(resumed.output)[: len(everything) - 1000] == everything[1000:]
    for client in (again, resumed):  # rendered: the page acknowledges what it wrote
        await client.send_json({"type": "ack", "bytes": len(client.output)})
    await again.type("echo still-$((4*4))\r")  # the shell itself was never touched
    await again.read_until(b"still-16")


async def test_a_server_fault_on_one_frame_is_reported_and_the_terminal_stays_open(
    user, session, connect, monkeypatch
):
    from sessions_app import consumers

    async def broken(self, message):  # a fault the real code cannot produce on demand
        raise RuntimeError("resize exploded")

    monkeypatch.setitem(consumers.TerminalConsumer.CONTROL_HANDLERS, "resize", broken)
    term = await connect(user, session.id)
    await term.control("hello")
    await term.send_json({"type": "resize", "cols": 100, "rows": 30})
    error = await term.control("error")
    assert error["code"] == "internal_error" and "stays open" in error["message"]
    await term.type("echo survived-$((8*8))\r")
    await term.read_until(b"survived-64")


async def test_a_flood_is_stored_a_window_a_second_and_exactly_once_it_ends(
    user, session, connect, monkeypatch
):
    """While output outruns the stored window (DATABASE), each batch replaces the whole
    window: storing it on every 0.25 s tick was a core's worth of writes and search
    indexing for nothing. The newest window is stored about once a second instead, and what
    the flood left is stored once it ends: the history then reads exactly what the client saw."""
    from sessions_app import conf
    from sessions_app.storage.database import DatabaseStorage

    stored_batches: list[int] = []
    real = DatabaseStorage.append_output_many

    def counting(self, batches):
        stored_batches.extend(len(data) for sid, _offset, data in batches if sid == session.id)
        return real(self, batches)

    monkeypatch.setattr(DatabaseStorage, "append_output_many", counting)
    terminal = terminals.get(session.id)
    window = 64 * 1024  # a flood outruns it on a slow machine too
    monkeypatch.setattr(terminal.storage, "scrollback_bytes", window)
    term = await connect(user, session.id)
    await term.control("hello")
    received = bytearray()
    await term.type("timeout 3 yes termsys-flood; echo FLOOD-$((6*7))-OVER\r")
    reader = Reader(term, received)
    await reader.until(marker=b"FLOOD-42-OVER")
    await reader.until(marker=b"\x1b]633;B\x07")  # its prompt: it prints no more
    await terminal.flush()

    assert len(received) > 16 * window  # it did outrun the window, many times over
    # 3 s of flood on the 0.25 s grid are a dozen windows; a window a second, four or five
    # (the first tick's, and the one after the flood, included).
    ticks = 3 / conf.OUTPUT_FLUSH_SECONDS
    assert len(stored_batches) <= ticks / 2, stored_batches
    history = await database_sync_to_async(terminal.storage.read_scrollback)(
        session.id, max_bytes=window
    )
    assert (history.end, len(history.data)) == (terminal.end_offset, window)
    assert history.data[: len(received) - history.start] == received[history.start :]
    tail = terminal.tail(window)
    assert (history.start, history.data) == (tail.start, tail.data)


# --- input a program does not read, and acknowledgements a client cannot have made ---------


async def test_input_a_finished_shell_never_read_never_reaches_the_next_shell(
    user, other_user, project, live_terminals, connect
):
    """Input still waiting for a shell that ended (a background job held its terminal open)
    is dropped with it: the next terminal, which may get the same descriptor number, never
    receives it."""
    import asyncio

    from sessions_app import services
    from tests.factories import ProjectFactory

    first = await services.session_create(user=user, project_id=project.pk, tab_name="first")
    term = await connect(user, first.id)
    fd = terminals.get(first.id).pty.fd
    await term.type("stty -echo; (sleep 30 &); echo busy-$((2*3)); sleep 2; exit\r")
    await term.read_until(b"busy-6")
    await term.type("echo INJECTED-BY-$((6*7))\r" * 3000)  # ~70 KiB: most of it has to wait
    for _ in range(100):  # the consumer takes the frame
        if terminals.get(first.id)._pending_input:
            break
        await asyncio.sleep(0.02)
    assert terminals.get(first.id)._pending_input  # the shell is busy: held for it
    assert (await term.control("exit", timeout=15))["type"] == "exit"
    # Nothing waits to be written to that descriptor number any more (this probe returns
    # whether a writer was still registered for it).
    assert not asyncio.get_running_loop().remove_writer(fd)

    elsewhere = await database_sync_to_async(ProjectFactory)(owner=other_user)
    second = await services.session_create(
        user=other_user, project_id=elsewhere.pk, tab_name="second"
    )
    # Usually the same number again; then a writer left behind would type into this shell.
    other = await connect(other_user, second.id)
    await asyncio.sleep(1)  # a writer left behind fires as soon as the new PTY is writable
    await other.type("echo mine-$((5*5))\r")
    out = await other.read_until(b"mine-25")
    assert b"INJECTED-BY-42" not in out


async def test_input_a_busy_program_does_not_read_waits_only_up_to_a_limit(user, session, connect):
    term = await connect(user, session.id)
    await term.type("stty -echo; echo busy-$((2*3)); sleep 30\r")
    await term.read_until(b"busy-6")
    frame_bytes = 200 * 1024
    for _ in range(terminals.PENDING_INPUT_LIMIT // frame_bytes + 2):
        await term.ws.send_to(bytes_data=b"a" * frame_bytes)
    error = await term.control("error")
    assert error["code"] == "input_overflow"
    assert "not reading its input" in error["message"]
    # what was refused, as numbers a client can add up (a paste is refused frame by frame)
    assert (error["bytes"], error["limit"]) == (frame_bytes, terminals.PENDING_INPUT_LIMIT)
    assert len(terminals.get(session.id)._pending_input) <= terminals.PENDING_INPUT_LIMIT
    await term.type("\x03")  # the terminal still answers
    await term.type("stty echo; echo back-$((4*4))\r")
    await term.read_until(b"back-16", timeout=20)


async def test_a_client_acknowledging_what_it_never_read_still_holds_the_shell_back(
    user, session, connect
):
    """Acknowledgements count only for output handed to the client's socket: a client that
    stops reading and acknowledges everything anyway cannot make the server queue a flood
    for it without bound."""
    import asyncio

    terminal = terminals.get(session.id)
    liar = StalledClient()
    terminal.attach(liar, {"type": "hello"})
    liar.drained.clear()  # its socket takes nothing more
    try:
        terminal.write(b"yes flood\r", client=liar)
        for _ in range(40):
            await asyncio.sleep(0.05)
            terminal.acknowledge(liar, 10**15)
        queued = sum(len(p) for p in terminal._queues[liar] if isinstance(p, bytes))
        assert 0 < queued <= 2 * 1024 * 1024  # the high-water mark and what was in flight
        assert not terminal._reading  # the flood waits in the shell, not in the server
        terminal.write(b"\x03", client=liar)
    finally:
        terminal.detach(liar)
    term = await connect(user, session.id)
    await term.type("echo calm-$((3*3))\r")
    await Reader(term, bytearray()).until(marker=b"calm-9")

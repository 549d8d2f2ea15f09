"""Live terminals of this server process: PTY output fan-out, flow control, batched storage.

Everything here runs on the event loop that spawned the terminal. The PTY is read with
``loop.add_reader``; each read (up to 64 KiB) is queued at once, in order, for every attached
client, and each client's queue is sent by a pump task of its own: a keystroke's echo never
waits on a timer, and a client whose socket is full never holds up another. Output reaches
storage in batches off that path.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from featureflags import safeguard
from sessions_app import conf, shellint
from sessions_app.outputtail import OutputTail
from sessions_app.outputwriter import next_tick, store_output
from sessions_app.pty import PtyProcess
from sessions_app.storage import Scrollback, StorageProvider, get_storage

logger = logging.getLogger(__name__)

NODE_ID = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
# Output that storage has not taken yet (the database is down) is held in memory up to this
# much per session; past it the PTY is not read, so the shell blocks instead of output being lost.
# A provider that skips pruned output (DATABASE) needs no such bound: only the newest
# scrollback_bytes of what it has not taken are kept for it, the rest it would prune anyway.
UNSTORED_LIMIT = 8 * 1024 * 1024
# A read at least this long suggests more output is waiting in the PTY (a keystroke echo is short).
SHORT_READ = 1024
# A viewer that fell behind is resynced with at most this much of the newest output.
RESYNC_BYTES = 256 * 1024
HOLD_BACK_SECONDS = 0.1
# A new size is recorded (a ``resized`` event) once it has held this long: dragging a window's
# edge resizes many times a second.
RESIZE_RECORD_SECONDS = 1.0
# Input the program has not read yet is held up to this much per session (a paste into a busy
# program); input past it is refused with an error, never held without bound.
PENDING_INPUT_LIMIT = 4 * 1024 * 1024
# Held input goes to the PTY in writes of at most this much (a write copies what it sends).
INPUT_WRITE_BYTES = 64 * 1024
MSG_STORAGE_DOWN = (
    "Output is not being saved: the database is unavailable. It is kept in memory and saved "
    "as soon as the database answers again."
)
MSG_STORAGE_BACK = "The database answers again; all output has been saved."
MSG_INPUT_OVERFLOW = (
    "The program is not reading its input: {held} bytes already wait for it, so these "
    "{size} bytes were not delivered (at most {limit} bytes wait)."
)


class InputOverflow(Exception):
    """Input refused: the program has not read what already waits for it. ``dropped``: the
    bytes refused; ``limit``: what may wait."""

    def __init__(self, message: str, *, dropped: int, limit: int) -> None:
        super().__init__(message)
        self.dropped, self.limit = dropped, limit


def node_is_alive(node: str) -> bool:
    """Return whether the server process named ``node`` may still own its PTYs."""
    if node == NODE_ID:
        return True
    host, _, rest = node.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return True  # another machine's process: not ours to judge
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # our pid, another token: an earlier life of this process id
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Client(Protocol):
    """One attached WebSocket, as the terminal sees it.

    ``interactive`` clients (the owner's) may type and hold the PTY back while they have more
    than the high-water mark unacknowledged; the others are read-only viewers, which never
    slow the session: a viewer that falls behind skips live output and is resynced from the
    scrollback once it has caught up. ``position`` is the session offset the client has been
    sent everything before (managed here); ``size`` the (cols, rows) it last asked for.
    ``unacked`` counts the output bytes queued for it and not acknowledged, ``unsent`` those
    of them not yet handed to its socket (managed here): no client can acknowledge those.
    """

    unacked: int
    unsent: int
    interactive: bool
    position: int
    behind: bool
    size: tuple[int, int] | None

    async def send_output(self, data: bytes) -> None: ...

    async def send_control(self, message: dict[str, Any]) -> None: ...

    # Optional: ``send_output_now(data) -> bool`` sends output bytes at once if the socket
    # takes them now, without a coroutine (False: not sent, ``send_output`` is awaited).


class LiveTerminal:
    """A running PTY and the clients attached to it."""

    def __init__(
        self,
        *,
        session_id: str,
        user_id: int,
        pty: PtyProcess,
        storage_mode: str,
        start_offset: int,
        on_exit: Callable[[LiveTerminal, int | None], Awaitable[None]],
        history: Scrollback | None = None,
        on_resize: Callable[[LiveTerminal], Awaitable[None]] | None = None,
    ) -> None:
        self.session_id = session_id
        self.user_id = user_id
        self.pty = pty
        self.storage_mode = storage_mode
        self.loop = asyncio.get_running_loop()
        self.clients: set[Client] = set()
        self.cols, self.rows = 80, 24
        self.exit_code: int | None = None
        self.ended = False
        self.killed = False  # ended by a user or the server, not by itself
        self._on_exit = on_exit
        self._on_resize = on_resize
        self._resize_record: asyncio.TimerHandle | None = None
        self.size_offset = start_offset  # the output offset from which the current size holds
        # The newest output, kept in memory for replay: [self._tail.start, self.end_offset).
        # A revived session starts with its stored history (its output offsets continue).
        self._tail = (
            OutputTail(history.start, history.data)
            if history is not None
            else OutputTail(start_offset)
        )
        self._tail_dropped = False  # memory let go of output storage has (drop_tail)
        _account(len(self._tail))
        self.end_offset = start_offset
        # Output not yet in storage: [self._stored_offset, self.end_offset).
        self._unstored = bytearray()
        self._stored_offset = start_offset
        self._flooding = False  # output outran storage's window since the last batch
        self._flush_handle: asyncio.Handle | None = None
        self._flush_task: asyncio.Task | None = None
        # What each client is still to be sent (output bytes or control messages), in order,
        # and the task sending it. Bytes count as unacknowledged from the moment they are queued.
        self._queues: dict[Client, deque[bytes | dict[str, Any]]] = {}
        self._pumps: dict[Client, asyncio.Task] = {}
        self._pending_input = bytearray()
        self._typist: Client | None = None  # the client that typed last: its size applies
        self._reading = False
        self._tasks: set[asyncio.Task] = set()
        self.switching = False  # a storage mode switch is in progress: output waits in memory
        self.end_reason = ""  # why the server ended it (e.g. "idle"), for its exit event
        self.cwd = ""  # the shell's working directory as last recorded
        self._last_activity = time.monotonic()
        self._storage_failing = False
        self._held_back: asyncio.TimerHandle | None = None
        self.shell = shellint.ShellTracker(self)  # what the shell reports in its output

    @property
    def storage(self) -> StorageProvider:
        return get_storage(self.storage_mode)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._resume_reading()
        # Reader callbacks run in an empty context too (see _spawn).
        contextvars.Context().run(self.loop.add_reader, self.pty.pidfd, self._on_process_exit)

    def _resume_reading(self) -> None:
        if not self._reading and not self.ended:
            contextvars.Context().run(self.loop.add_reader, self.pty.fd, self._on_readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.pty.fd)
            self._reading = False

    def _on_readable(self) -> None:
        storage = self.storage
        if storage.backpressure() or (
            len(self._unstored) > UNSTORED_LIMIT and not storage.skips_pruned_output
        ):
            # Storage cannot take more now: leave the output in the PTY (the shell blocks on
            # write) and look again shortly. Nothing is read that could not be stored.
            self._pause_reading()
            if self._held_back is None:
                self._held_back = self.loop.call_later(
                    HOLD_BACK_SECONDS, self._retry_reading, context=contextvars.Context()
                )
            return
        data = self.pty.read()
        if data is None:
            return
        if data == b"":  # every writer of the PTY is gone; the pidfd reports the exit
            self._pause_reading()
            return
        # A PTY hands out at most a few KiB per read. While more is waiting, keep reading (up
        # to 64 KiB) so a flood becomes few large frames; a short read means drained: send now.
        if len(data) >= SHORT_READ:
            parts = [data]
            size = len(data)
            while size < conf.READ_BYTES:
                more = self.pty.read(conf.READ_BYTES - size)
                if not more:
                    break
                parts.append(more)
                size += len(more)
            data = b"".join(parts)
        self._emit(data)

    def _retry_reading(self) -> None:
        self._held_back = None
        self._apply_flow_control()

    def _on_process_exit(self) -> None:
        self.loop.remove_reader(self.pty.pidfd)
        self._spawn(self._finish(self.pty.poll()))

    async def _finish(self, exit_code: int | None) -> None:
        """Drain what the process wrote, store it, tell the clients, release the PTY."""
        if self.ended:
            return
        self._drain()
        self.ended = True
        self._pause_reading()
        self._drop_input()
        self.exit_code = exit_code
        await self.flush()
        await self.shell.drain()
        await self._on_exit(self, exit_code)
        self.pty.close()

    def _drain(self, max_reads: int = 16) -> None:
        """Read what the PTY still holds (bounded: an escaped child may write forever)."""
        for _ in range(max_reads):
            data = self.pty.read()
            if not data:
                break
            self._emit(data)

    async def kill(self) -> int | None:
        """End the process tree (escalating signals) and wait for the output to be stored."""
        if self.ended:
            return self.exit_code
        self.killed = True
        self.loop.remove_reader(self.pty.pidfd)
        self._drain()
        code = await asyncio.to_thread(self.pty.terminate)
        await self._finish(code)
        return code

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run ``coro`` as a task of the terminal, outside the context of whoever started it.

        A terminal outlives the HTTP request that created it; a task inheriting that request's
        context would send its database work to the request's thread after it has finished.
        """
        task = self.loop.create_task(coro, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- output ---------------------------------------------------------------------------

    def tail(self, max_bytes: int, history: Scrollback | None = None) -> Scrollback:
        """Return the newest output, at most ``max_bytes`` (call on self.loop).

        From memory; ``history`` (read from storage, see ``needs_history``) fills in what
        memory no longer holds.
        """
        start, data = self._replay_from(max(0, self.end_offset - max_bytes), history)
        return Scrollback(data=data, start=start, end=self.end_offset, pruned=start > 0)

    def needs_history(self, since: int | None, max_bytes: int | None = None) -> bool:
        """Return whether a replay from ``since`` (None: the whole scrollback, or the newest
        ``max_bytes``) needs output that memory dropped (see ``drop_tail``), from storage."""
        if since is None:
            since = max(0, self.end_offset - (max_bytes or conf.scrollback_bytes()))
        return since < self._tail.start and self._tail_dropped

    def _replay_from(self, since: int, history: Scrollback | None) -> tuple[int, bytes]:
        """Return (start, bytes) of the output after ``since`` that memory, or memory and
        ``history`` together, still hold; start > since where it is gone."""
        start = max(min(since, self.end_offset), self._tail.start)
        data = self._tail.since(start)
        if (
            history is not None
            and start > since
            and history.start < start
            and history.end >= self._tail.start
        ):
            lead = max(since, history.start)
            data = history.data[lead - history.start : self._tail.start - history.start] + data
            start = lead
        return start, data

    def drop_tail(self) -> int:
        """Free the in-memory output that storage already has; return how many bytes.

        What is not stored yet stays. Replays then read the rest from storage.
        """
        cut = self._tail.drop_before(min(self._stored_offset, self.end_offset))
        if cut > 0:
            self._tail_dropped = True
            _account(-cut)
        return cut

    def memory_bytes(self) -> int:
        """Output this terminal holds in memory (replay tail and not yet stored)."""
        return len(self._tail) + len(self._unstored)

    def emit_notice(self, data: bytes) -> None:
        """Add a line of the server's own (e.g. "history restored") to the output stream."""
        self._emit(data)

    def shell_cwd(self) -> str | None:
        """Return the shell's current working directory (from /proc), or None if unknown."""
        try:
            return os.readlink(f"/proc/{self.pty.pid}/cwd")
        except OSError:
            return None

    def cwd_changed(self, cwd: str) -> None:
        """Take ``cwd`` as the shell's working directory (once recorded) and tell the clients:
        a tab names it in its tooltip."""
        if cwd == self.cwd:
            return
        self.cwd = cwd
        self.broadcast({"type": "cwd", "cwd": cwd})

    def send_to(self, client: Client, message: dict[str, Any]) -> None:
        """Queue a control message for one client, after what is already queued for it."""
        self._queue(client, message)

    def idle_seconds(self) -> float:
        """Return how long the session has had no client attached and no output or input."""
        return 0.0 if self.clients else time.monotonic() - self._last_activity

    def _emit(self, data: bytes) -> None:
        self._last_activity = time.monotonic()
        offset = self.end_offset
        self._tail.append(data)
        self.end_offset += len(data)
        _account(len(data) - self._tail.keep_last(conf.scrollback_bytes()))
        if _tail_bytes > conf.scrollback_memory_bytes():
            _drop_idle_tails(keep=self)
        if not self._store_inline(offset, data):
            self._unstored += data
            self._skip_beyond_window()
            if (
                len(self._unstored) >= conf.OUTPUT_FLUSH_BYTES
                and not self.storage.skips_pruned_output
            ):
                self._schedule_flush(0)
            else:
                # A provider that skips pruned output keeps what waits to a window anyway: a
                # flood is stored on the grid's ticks, a window a tick, not as fast as the
                # database can go (each window stored is a window tokenised for search).
                self._schedule_flush(conf.OUTPUT_FLUSH_SECONDS)
        if self.clients:
            for client in list(self.clients):
                part = self._live_part(client, data, offset)
                if part is not None:
                    self._queue(client, part)
        self.shell.feed(data)

    def _store_inline(self, offset: int, data: bytes) -> bool:
        """Store output now when the provider allows it (before any client sees it)."""
        storage = self.storage
        if not storage.appends_inline or self._unstored or self.switching:
            return False
        try:
            storage.append_output(self.session_id, offset, data)
        except Exception as exc:
            self._storage_failed(exc)
            return False
        self._stored_offset = offset + len(data)
        return True

    def _storage_failed(self, exc: Exception) -> None:
        logger.warning("storing output of %s failed: %s", self.session_id, exc)
        safeguard.record(self.user_id, ok=False)  # the flag safeguard counts it
        if not self._storage_failing:
            self._storage_failing = True
            self.broadcast(
                {"type": "error", "code": "storage_unavailable", "message": MSG_STORAGE_DOWN}
            )

    def _storage_recovered(self) -> None:
        if self._storage_failing:
            self._storage_failing = False
            self.broadcast(
                {"type": "info", "code": "storage_recovered", "message": MSG_STORAGE_BACK}
            )

    def _schedule_flush(self, delay: float) -> None:
        if self._flush_handle is not None:
            if delay > 0:
                return
            self._flush_handle.cancel()
        if delay > 0:  # at the grid's next tick, with every other terminal's batch
            self._flush_handle = self.loop.call_at(
                next_tick(self.loop, delay), self._start_flush, context=contextvars.Context()
            )
        else:
            self._flush_handle = self.loop.call_soon(
                self._start_flush, context=contextvars.Context()
            )

    def _start_flush(self) -> None:
        self._flush_handle = None
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = self._spawn(self._flush_pending())

    async def _flush_pending(self, force: bool = False) -> None:
        delay = 0.25
        while self._unstored and (force or not self.switching):
            self._skip_beyond_window()
            data = bytes(self._unstored)
            offset = self._stored_offset
            flooding, self._flooding = self._flooding, False
            started = time.perf_counter()
            try:
                await store_output(self.storage, self.session_id, offset, data)
            except Exception as exc:
                self._storage_failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            # A storage operation, for the flag safeguard (a few a second per busy session).
            elapsed_ms = (time.perf_counter() - started) * 1000
            safeguard.record(self.user_id, ok=True, latency_ms=elapsed_ms)
            stored_end = offset + len(data)
            if stored_end > self._stored_offset:  # else skipped past while it was written
                del self._unstored[: stored_end - self._stored_offset]
                self._stored_offset = stored_end
            self._storage_recovered()
            if (
                not force
                and self._unstored
                and (
                    len(self._unstored) < conf.OUTPUT_FLUSH_BYTES
                    or self.storage.skips_pruned_output
                )
            ):
                # Output that came during the write waits for the next batch, as the first
                # did: an interactive session writes a few times a second, not per keystroke.
                # So does a flood, when what storage cannot take yet is bounded by the window
                # (skips_pruned_output): the database takes a window a tick, not a stream, and
                # while output outruns the window, a window a FLOOD_FLUSH_SECONDS tick.
                if self._flush_handle is not None:
                    self._flush_handle.cancel()
                    self._flush_handle = None
                flooding = flooding or self._flooding
                self._schedule_flush(
                    conf.FLOOD_FLUSH_SECONDS if flooding else conf.OUTPUT_FLUSH_SECONDS
                )
                return

    def _skip_beyond_window(self) -> None:
        """Leave out of the next batch what storage would prune as soon as it was stored: the
        unstored output older than the newest ``scrollback_bytes`` (a flood that outran the
        database). Memory and the clients have it all; the stored history is the same."""
        storage = self.storage
        if storage.skips_pruned_output and len(self._unstored) > storage.scrollback_bytes:
            skip = len(self._unstored) - storage.scrollback_bytes
            del self._unstored[:skip]
            self._stored_offset += skip
            self._flooding = True

    def flush_now(self) -> None:
        """Store pending output synchronously: for process exit, when no event loop runs."""
        self._skip_beyond_window()
        if self._unstored:
            self.storage.append_output(self.session_id, self._stored_offset, bytes(self._unstored))
            self._stored_offset += len(self._unstored)
            self._unstored.clear()

    async def flush(self) -> None:
        """Store every byte emitted so far (also while a mode switch is in progress)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._flush_task is not None and not self._flush_task.done():
            await self._flush_task
        await self._flush_pending(force=True)

    def _queue(self, client: Client, payload: bytes | dict[str, Any]) -> None:
        """Queue output bytes or a control message for ``client`` and see that it is sent."""
        queue = self._queues.get(client)
        if queue is None:
            queue = self._queues[client] = deque()
        if isinstance(payload, bytes):
            client.unacked += len(payload)
            client.unsent += len(payload)
            if client.interactive and client.unacked > conf.FLOW_HIGH_WATER:
                self._pause_reading()  # the slowest of the owner's clients holds the PTY back
        pump = self._pumps.get(client)
        if pump is None or pump.done():
            if not queue and client in self.clients:
                self._send_now(client, queue, payload)
                return
            queue.append(payload)
            self._pumps[client] = self._spawn(self._pump(client, queue))
        else:
            queue.append(payload)

    def _send_now(
        self, client: Client, queue: deque[bytes | dict[str, Any]], payload: bytes | dict
    ) -> None:
        """Send ``payload`` without a task when nothing is queued for ``client``: the server
        takes it at once unless the socket's buffer is full; only then does a task wait on
        it (and send what is queued meanwhile)."""
        if isinstance(payload, bytes):
            send_now = getattr(client, "send_output_now", None)
            if send_now is not None and send_now(payload):
                self._sent(client, payload)
                return
        sending = self._send(client, payload)
        try:
            waiting = sending.send(None)
        except StopIteration:
            self._sent(client, payload)
            return
        except Exception:
            self._sent(client, payload)
            self._send_failed()
            return
        self._pumps[client] = self._spawn(
            self._finish_send(client, queue, sending, waiting, payload)
        )

    async def _finish_send(
        self,
        client: Client,
        queue: deque[bytes | dict[str, Any]],
        sending: Coroutine[Any, Any, None],
        waiting: Any,
        payload: bytes | dict[str, Any],
    ) -> None:
        """Drive a send that had to wait to its end, as a task would have, then send what
        was queued meanwhile. ``waiting`` is what the send yielded: the future it waits on."""
        try:
            while True:
                try:
                    if waiting is None:  # a bare yield: give the loop one turn
                        await asyncio.sleep(0)
                    else:
                        waiting._asyncio_future_blocking = False  # ours to wait on now
                        await waiting
                except asyncio.CancelledError:  # the client left
                    sending.close()
                    raise
                except Exception as exc:
                    waiting = sending.throw(exc)
                else:
                    waiting = sending.send(None)
        except StopIteration:
            pass
        except Exception:
            self._send_failed()
        self._sent(client, payload)
        await self._pump(client, queue)

    async def _pump(self, client: Client, queue: deque[bytes | dict[str, Any]]) -> None:
        """Send ``client``'s queue, in order, while it is attached."""
        while queue and client in self.clients:
            payload = queue.popleft()
            try:
                await self._send(client, payload)
            except Exception:
                self._send_failed()
            self._sent(client, payload)

    @staticmethod
    def _sent(client: Client, payload: bytes | dict[str, Any]) -> None:
        """Count output bytes as handed to the client's socket (or gone with it)."""
        if isinstance(payload, bytes):
            client.unsent = max(0, client.unsent - len(payload))

    @staticmethod
    def _send(client: Client, payload: bytes | dict[str, Any]) -> Coroutine[Any, Any, None]:
        """Return the coroutine that sends output bytes or a control message to ``client``."""
        if isinstance(payload, bytes):
            return client.send_output(payload)
        return client.send_control(payload)

    def _send_failed(self) -> None:
        """A send raised: a socket that went away (its disconnect detaches the client)."""
        logger.debug("send to a client of %s failed", self.session_id, exc_info=True)

    def _drop_queue(self, client: Client) -> None:
        """Forget what ``client`` has not been sent yet (it resumes, or it left)."""
        queue = self._queues.get(client)
        if queue:
            unsent = sum(len(p) for p in queue if isinstance(p, bytes))
            client.unacked = max(0, client.unacked - unsent)
            client.unsent = max(0, client.unsent - unsent)
            queue.clear()

    @staticmethod
    def _live_part(client: Client, data: bytes, offset: int) -> bytes | None:
        """Return what of live output at ``offset`` the client still needs, or None.

        A client's replay already covers the output queued before it attached (or resumed);
        a viewer too far behind gets nothing more until it is resynced.
        """
        if client.behind:
            return None
        skip = client.position - offset
        if skip >= len(data):
            return None
        if not client.interactive and client.unacked > conf.FLOW_HIGH_WATER:
            client.behind = True
            return None
        client.position = offset + len(data)
        return data[skip:] if skip > 0 else data

    def _apply_flow_control(self) -> None:
        backlog = max((c.unacked for c in self.clients if c.interactive), default=0)
        if backlog > conf.FLOW_HIGH_WATER:
            self._pause_reading()
        elif backlog <= conf.FLOW_LOW_WATER:
            self._resume_reading()

    def acknowledge(self, client: Client, count: int) -> None:
        """Take ``count`` bytes as processed by ``client``; never more than its socket was
        handed, so a client acknowledging what it has not read still holds the PTY back (or,
        a viewer, falls behind) once its queue here passes the high-water mark."""
        count = min(count, client.unacked - client.unsent)
        client.unacked -= max(0, count)
        if client.behind and client.unacked <= conf.FLOW_LOW_WATER and client in self.clients:
            self._resync(client)
        if not self._reading:
            self._apply_flow_control()

    # --- clients --------------------------------------------------------------------------

    def attach(
        self,
        client: Client,
        hello: dict[str, Any],
        since: int | None = None,
        history: Scrollback | None = None,
    ) -> int:
        """Queue hello and the scrollback for ``client``, then live output; return the offset
        the replay starts at.

        With ``since`` (a byte offset the client already has everything before), only what
        follows it is replayed; ``pruned`` in hello says that part of it is gone. ``history``
        is the stored output, when ``needs_history`` says memory lacks some of it.
        """
        self._last_activity = time.monotonic()
        client.behind = False
        self.clients.add(client)
        return self._queue_replay(client, hello, since, history=history)

    def resume(
        self,
        client: Client,
        hello: dict[str, Any],
        since: int,
        history: Scrollback | None = None,
    ) -> int:
        """Restart ``client``'s stream after byte ``since`` (a ``resume`` message).

        What was queued for it and not sent yet is dropped; hello (with ``resumed``) marks
        where the new stream begins, so the client ignores output that arrives before it.
        """
        self._drop_queue(client)
        client.behind = False
        return self._queue_replay(client, {**hello, "resumed": True}, since, history=history)

    def _resync(self, client: Client) -> None:
        """Bring a viewer that fell behind up to date from the scrollback.

        It gets what it missed if that is at most RESYNC_BYTES (no byte lost on its screen),
        else only the newest RESYNC_BYTES, with ``pruned`` so that it starts a fresh screen.
        """
        client.behind = False
        since = max(client.position, self.end_offset - RESYNC_BYTES)
        hello = {"type": "hello", "session": self.session_id, "mode": self.storage_mode}
        hello.update(cols=self.cols, rows=self.rows)  # a viewer's: the owner's size
        self._queue_replay(
            client,
            {**hello, "state": "active", "resync": True},
            since,
            pruned=since > client.position or client.position < self._tail.start,
        )

    def _queue_replay(
        self,
        client: Client,
        hello: dict[str, Any],
        since: int | None,
        pruned: bool | None = None,
        history: Scrollback | None = None,
    ) -> int:
        """Queue hello and the output after ``since`` (None: the scrollback) for ``client``;
        return the offset the replay starts at."""
        wanted = max(0, self.end_offset - conf.scrollback_bytes()) if since is None else since
        first, replay = self._replay_from(wanted, history)
        if pruned is None:
            pruned = since is not None and since < first
        client.position = self.end_offset
        self._queue(client, {**hello, "offset": first, "end": self.end_offset, "pruned": pruned})
        for start in range(0, len(replay), conf.READ_BYTES):
            self._queue(client, replay[start : start + conf.READ_BYTES])
        return first

    def detach(self, client: Client) -> None:
        self.clients.discard(client)
        self._drop_queue(client)
        self._queues.pop(client, None)
        pump = self._pumps.pop(client, None)
        if pump is not None and not pump.done():
            pump.cancel()  # it may wait on a socket that is gone
        if self._typist is client:
            self._typist = None
        self._last_activity = time.monotonic()
        if not self._reading:
            self._apply_flow_control()

    def broadcast(self, message: dict[str, Any]) -> None:
        for client in list(self.clients):
            self._queue(client, message)

    # --- input ----------------------------------------------------------------------------

    def write(self, data: bytes, client: Client | None = None) -> None:
        """Write input to the PTY; what it cannot take now is written when it can.

        The PTY takes the size of the client that typed last (two windows of different sizes:
        the one in use decides where the shell wraps its lines).
        """
        if self.ended:
            return
        self._last_activity = time.monotonic()
        if client is not None and client is not self._typist:
            self._typist = client
            if client.size is not None and client.size != (self.cols, self.rows):
                self._set_size(*client.size)
        if self._pending_input:
            held = len(self._pending_input)
            if held + len(data) > PENDING_INPUT_LIMIT:
                raise InputOverflow(
                    MSG_INPUT_OVERFLOW.format(held=held, size=len(data), limit=PENDING_INPUT_LIMIT),
                    dropped=len(data),
                    limit=PENDING_INPUT_LIMIT,
                )
            self._pending_input += data
            return
        written = self.pty.write(data)
        if written < len(data):
            self._pending_input += data[written:]
            self.loop.add_writer(self.pty.fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            written = self.pty.write(bytes(self._pending_input[:INPUT_WRITE_BYTES]))
        except OSError:
            written = len(self._pending_input)
        del self._pending_input[:written]
        if not self._pending_input or self.ended:
            self._drop_input()

    def _drop_input(self) -> None:
        """Stop writing held input: the PTY is done with (its descriptor number may soon be
        another terminal's), or everything has been written."""
        self.loop.remove_writer(self.pty.fd)
        self._pending_input.clear()

    def resize(self, cols: int, rows: int, client: Client | None = None) -> None:
        """Record ``client``'s size; apply it unless another client typed last."""
        if client is not None:
            client.size = (cols, rows)
            if self._typist is not None and self._typist is not client:
                return
        self._set_size(cols, rows)

    def _set_size(self, cols: int, rows: int) -> None:
        if (cols, rows) == (self.cols, self.rows):
            return
        self.cols, self.rows = cols, rows
        for client in self.clients:
            if not client.interactive:  # a viewer draws at the owner's size: tell it the new one
                self._queue(client, {"type": "size", "cols": cols, "rows": rows})
        if not self.ended:
            self.pty.resize(cols, rows)
            self.size_offset = self.end_offset
            if self._on_resize is not None:
                if self._resize_record is not None:
                    self._resize_record.cancel()
                self._resize_record = self.loop.call_later(
                    RESIZE_RECORD_SECONDS, self._record_size, context=contextvars.Context()
                )

    def _record_size(self) -> None:
        self._resize_record = None
        if not self.ended and self._on_resize is not None:
            self._spawn(self._on_resize(self))


_terminals: dict[str, LiveTerminal] = {}


@atexit.register
def _at_exit() -> None:
    """On server shutdown store what the shells printed last, and hang up on them."""
    for terminal in list(_terminals.values()):
        try:
            terminal.flush_now()
        except Exception:
            logger.exception("could not store the last output of %s", terminal.session_id)
        terminal.pty.hangup()


def get(session_id: str) -> LiveTerminal | None:
    return _terminals.get(session_id)


def register(terminal: LiveTerminal) -> None:
    _terminals[terminal.session_id] = terminal


def unregister(terminal: LiveTerminal) -> None:
    if _terminals.get(terminal.session_id) is terminal:
        del _terminals[terminal.session_id]
        _account(-len(terminal._tail))


# Output all live terminals of this process hold in memory for replay (their tails).
_tail_bytes = 0


def _account(delta: int) -> None:
    global _tail_bytes
    _tail_bytes += delta


def tail_bytes() -> int:
    """Return how much output the live terminals of this process hold in memory."""
    return _tail_bytes


def _drop_idle_tails(keep: LiveTerminal) -> None:
    """Over TERMSYS_SCROLLBACK_MEMORY_BYTES: free the in-memory output of terminals nobody
    watches, longest idle first, until under it. Their history stays in storage."""
    limit = conf.scrollback_memory_bytes()
    detached = [t for t in _terminals.values() if t is not keep and not t.clients and t._tail]
    for terminal in sorted(detached, key=lambda t: t._last_activity):
        if _tail_bytes <= limit:
            break
        freed = terminal.drop_tail()
        if freed:
            logger.info(
                "dropped %d bytes of in-memory output of detached session %s "
                "(TERMSYS_SCROLLBACK_MEMORY_BYTES=%d); it is read from storage when needed",
                freed,
                terminal.session_id,
                limit,
            )


def all_terminals() -> list[LiveTerminal]:
    return list(_terminals.values())


async def call_on_owner_loop(terminal: LiveTerminal, method: Callable[[], Awaitable[Any]]) -> Any:
    """Await ``method()`` on the event loop that owns ``terminal``, from whichever loop we are on.

    A sync view (the admin) reaches async code through a loop of its own; the PTY's readers
    live on the server's loop and may only be touched there.
    """
    if asyncio.get_running_loop() is terminal.loop:
        return await method()
    if terminal.loop.is_closed() or not terminal.loop.is_running():
        unregister(terminal)  # its loop is gone: end the processes directly
        await asyncio.to_thread(terminal.pty.terminate)
        terminal.pty.close()
        return terminal.pty.poll()
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(method(), terminal.loop))

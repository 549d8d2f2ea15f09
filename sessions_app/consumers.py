"""The terminal WebSocket: parse a frame, call one method, send.

Binary frames carry raw input (client -> server) and raw output (server -> client); text
frames carry JSON control messages. See DESIGN.md, "Terminal I/O".
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any
from urllib.parse import parse_qs

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.sessions import InstanceSessionWrapper

from featureflags import safeguard
from sessions_app import conf, ratelimit, selectors, services, signout, terminals
from sessions_app.dbthread import db_call
from sessions_app.errors import (
    Conflict,
    NotAuthenticated,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ReadOnly,
    TermsysError,
)
from sessions_app.states import LIVE_STATES
from sessions_app.storage import Scrollback, SessionRecord, get_storage
from sessions_app.wsprotocol import TerminalWebSocketProtocol

logger = logging.getLogger(__name__)

MSG_NOT_LOGGED_IN = "Log in to attach to a terminal."
MSG_MALFORMED = "Control frames must be a JSON object with a string 'type'."
MSG_NUMBER_TOO_LONG = "Numbers in control frames have at most {digits} digits."
NUMBER_DIGITS = 20
MSG_UNKNOWN_TYPE = "Unknown message type {type!r}; expected one of: {allowed}."
MSG_BAD_RESIZE = "resize needs integer 'cols' and 'rows'."
MSG_BAD_ACK = "ack needs a non-negative integer 'bytes'."
MSG_BAD_RESUME = "resume needs a non-negative integer 'offset'."
MSG_INTERNAL = "The server failed to handle that message; see its log. The terminal stays open."
MSG_READ_ONLY = "This is a read-only view of someone else's terminal; input is not delivered."
MSG_CONNECT_RATE = (
    "Too many terminal connections opened in the last minute "
    "(TERMSYS_WS_CONNECTS_PER_MINUTE={limit}); try again shortly."
)
MSG_MESSAGE_RATE = (
    "More than {limit} frames a second on this terminal (TERMSYS_WS_MESSAGES_PER_SECOND); "
    "the connection was closed."
)
MSG_PRUNED = (
    "Output before byte {start} of this session is no longer kept "
    "(TERMSYS_SCROLLBACK_BYTES); showing what follows."
)
MSG_ENDED = "The session has ended; input is not delivered."
MSG_OTHER_PROCESS = "The session's shell runs in another server process ({node}); connect there."
MSG_TOO_LARGE = "{kind} frame of {size} bytes is over the limit of {limit} bytes."
MSG_NO_SUCH_PATH = (
    "No terminal at {path!r}: terminal sockets are /ws/terminals/<session id>/ "
    "(letters, digits and underscores, at most 64)."
)


def _past_session_wrapper(send: Any) -> Any:
    """Return the server's own send when ``send`` is Channels' session wrapper, which saves
    the session only on the message types it names (an HTTP response's start): terminal
    output, most of what this consumer sends, skips its checks of the session on every frame."""
    wrapper = getattr(send, "__self__", None)
    if (
        isinstance(wrapper, InstanceSessionWrapper)
        and "websocket.send" not in wrapper.save_message_types
    ):
        return wrapper.real_send
    return send


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


class _NumberTooLong(ValueError):
    pass


def _parse_int(text: str) -> int:
    if len(text) > NUMBER_DIGITS + 1:  # no count, size or offset is longer ("-" aside)
        raise _NumberTooLong(text[:20])
    return int(text)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TerminalConsumer(AsyncWebsocketConsumer):
    """One browser tab attached to one terminal session.

    The owner's sockets are interactive: they type, resize and take part in flow control.
    Staff attaching to another user's session (from the admin), or anyone with
    ``?readonly=1``, get a read-only view: input is dropped and answered with an error.
    """

    # Terminal bytes never travel through the channel layer, and an open terminal must keep
    # working while Redis is down: this consumer does not listen on the layer at all.
    channel_layer_alias = "__termsys_no_layer__"
    interactive = True
    read_only = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # Channels' loop (await_many_dispatch) makes a task and an asyncio.wait per message,
        # to listen on the channel layer too; this consumer never does: a plain loop.
        self.scope = scope
        self.channel_layer = None
        self.base_send = send
        self._send_frame = _past_session_wrapper(send)
        self._waiting = False
        self._gone = False  # closed by us, or found closed: frames still queued are dropped
        # Served by termsys's own protocol (manage.py serve): input frames may come straight
        # to _input_now, and output frames leave through send_output_now (wsprotocol.py).
        protocol = getattr(receive, "__self__", None)
        self._protocol = protocol if isinstance(protocol, TerminalWebSocketProtocol) else None
        if self._protocol is not None:
            self._protocol.fast_input = self._input_now
        try:
            while True:
                self._waiting = True
                message = await receive()
                self._waiting = False
                if self._gone and message["type"] != "websocket.disconnect":
                    continue  # sent before the close: nothing of it is answered or delivered
                await self.dispatch(message)
        except StopConsumer:
            pass
        finally:
            if self._protocol is not None:
                self._protocol.fast_input = None
                self._protocol = None
            if getattr(self, "terminal", None) is not None:
                # The loop ended without the socket's disconnect (an error, or the server
                # stopping): a client left attached would hold the terminal's output back.
                try:
                    await self.disconnect(1006)
                except Exception:
                    logger.warning(
                        "detaching from %s failed", self.scope["url_route"], exc_info=True
                    )

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels' dispatch closes old database connections before every message: a hop to
        # the sync thread per keystroke. Database work here happens only in explicit helpers.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        self.unacked = 0
        self.unsent = 0
        self.position = 0
        self.behind = False
        self.size: tuple[int, int] | None = None
        self.terminal: terminals.LiveTerminal | None = None
        self.record: SessionRecord | None = None
        session = self.scope.get("session")
        self.session_key = getattr(session, "session_key", None) if session is not None else None
        self.bucket = ratelimit.TokenBucket(conf.ws_messages_per_second())
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self._refuse(NotAuthenticated(MSG_NOT_LOGGED_IN))
            return
        session_id = self.scope["url_route"]["kwargs"]["session_id"]
        started = time.perf_counter()
        # In the one database thread: a cache client (a Redis connection) per thread would
        # otherwise be opened for every connect and left to the garbage collector.
        if not await db_call(ratelimit.connect_allowed, user.pk):
            limit = conf.ws_connects_per_minute()
            await self._refuse(RateLimited(MSG_CONNECT_RATE.format(limit=limit)))
            return
        try:
            record = await database_sync_to_async(self._load)(user, session_id)
        except TermsysError as exc:
            safeguard.record(user.pk, ok=exc.status < 500)
            await self._refuse(exc)
            return
        except Exception:
            safeguard.record(user.pk, ok=False)
            raise
        safeguard.record(user.pk, ok=True, latency_ms=(time.perf_counter() - started) * 1000)
        if record.user_id != user.pk or self._query("readonly") in ("1", "true"):
            self.read_only, self.interactive = True, False
        terminal = terminals.get(record.id)
        if terminal is None and record.state in LIVE_STATES:
            await self._refuse(Conflict(MSG_OTHER_PROCESS.format(node=record.node)))
            return
        await self.accept()
        self.record = record
        since = self._resume_offset()
        if terminal is None or terminal.ended:
            await self._replay_ended(record, self._hello(record.state), since)
            return
        self.terminal = terminal
        history = await self._history_if_needed(terminal, since)
        start = terminal.attach(self, self._hello("active"), since=since, history=history)
        self._tell_if_pruned(since, start)
        if self.read_only:
            await database_sync_to_async(services.session_watched)(
                session_id=record.id, viewer=user.get_username()
            )
        else:
            await database_sync_to_async(services.session_attached)(
                session_id=record.id, clients=len(terminal.clients)
            )

    @staticmethod
    def _load(user: Any, session_id: str) -> SessionRecord:
        record = selectors.session_get_for_viewer(user=user, session_id=session_id)
        if record.state in LIVE_STATES and terminals.get(record.id) is None:
            services.sessions_reconcile(user_id=record.user_id)
            record = selectors.session_get_for_viewer(user=user, session_id=session_id)
        return record

    @staticmethod
    async def _history_if_needed(
        terminal: terminals.LiveTerminal, since: int | None
    ) -> Scrollback | None:
        """Read the stored output a replay needs when memory let go of it (to stay under
        TERMSYS_SCROLLBACK_MEMORY_BYTES while nobody watched)."""
        if not terminal.needs_history(since):
            return None
        return await database_sync_to_async(terminal.storage.read_scrollback)(
            terminal.session_id, max_bytes=conf.scrollback_bytes(), since=since
        )

    def _hello(self, state: str) -> dict[str, Any]:
        record = self.record
        mode = self.terminal.storage_mode if self.terminal is not None else record.storage_mode
        hello = {
            "type": "hello",
            "session": record.id,
            "mode": mode,
            "state": state,
            "readOnly": self.read_only,
        }
        if self.read_only:  # a viewer draws at the owner's size (``size`` when it changes)
            sized = self.terminal if self.terminal is not None else record
            hello.update(cols=sized.cols, rows=sized.rows)
        return hello

    def _query(self, name: str) -> str | None:
        values = parse_qs(self.scope.get("query_string", b"").decode("latin-1")).get(name)
        return values[0] if values else None

    def _resume_offset(self) -> int | None:
        """Return the ``offset`` query parameter: the client has every byte before it."""
        value = self._query("offset")
        if value is None or not value.isascii() or not value.isdigit() or len(value) > 18:
            return None
        return int(value)

    def _tell_if_pruned(self, since: int | None, start: int) -> None:
        if since is not None and since < start and self.terminal is not None:
            self.terminal.send_to(
                self,
                {
                    "type": "info",
                    "code": "output_pruned",
                    "message": MSG_PRUNED.format(start=start),
                },
            )

    async def _replay_ended(
        self, record: SessionRecord, hello: dict[str, Any], since: int | None
    ) -> None:
        """Send an ended session's stored history, then its exit."""
        if since is not None:
            since = min(since, record.output_bytes)
        scrollback = await database_sync_to_async(get_storage(record.storage_mode).read_scrollback)(
            record.id, max_bytes=conf.scrollback_bytes(), since=since
        )
        await self.send_control(
            {
                **hello,
                "offset": scrollback.start,
                "end": scrollback.end,
                "pruned": scrollback.pruned,
            }
        )
        if since is not None and scrollback.pruned:
            message = MSG_PRUNED.format(start=scrollback.start)
            await self.send_control({"type": "info", "code": "output_pruned", "message": message})
        for start in range(0, len(scrollback.data), conf.READ_BYTES):
            await self.send(bytes_data=scrollback.data[start : start + conf.READ_BYTES])
        await self.send_control(
            {
                "type": "exit",
                "exitCode": record.exit_code,
                "state": record.state,
                "endReason": record.end_reason,
                "revivable": record.state == "exited" and record.end_reason == "server_restarted",
                "cwd": record.cwd,
            }
        )

    async def _refuse(self, error: TermsysError) -> None:
        await self.accept()
        await self.send_control({"type": "error", "code": error.code, "message": error.message})
        await self.close(code=error.close_code)

    def sign_out(self) -> None:
        """Close this socket: its login has ended (call on its loop; see signout.py)."""
        if not self._gone:
            self._signing_out = asyncio.ensure_future(self._signed_out())

    async def _signed_out(self) -> None:
        await self.send_error("signed_out", signout.MSG_SIGNED_OUT)
        await self.close(code=NotAuthenticated.close_code)

    async def disconnect(self, code: int) -> None:
        terminal = self.terminal
        if terminal is None:
            return
        terminal.detach(self)
        self.terminal = None
        owners_left = any(client.interactive for client in terminal.clients)
        if self.interactive and not owners_left and not terminal.ended:
            await database_sync_to_async(services.session_detached)(
                session_id=terminal.session_id, cols=terminal.cols, rows=terminal.rows
            )

    # --- client -> server -----------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self._gone:
            return
        try:
            if bytes_data is not None:
                if not self.bucket.take():
                    await self._rate_limited()
                    return
                await self._input(bytes_data)
            elif text_data is not None:
                await self._control(text_data)
        except Exception:
            if self._gone:  # the socket closed while the frame was handled: no one to tell
                return
            # A server fault handling one frame: report it, count it for the flag safeguard,
            # and keep the terminal open.
            logger.exception("handling a frame of %s failed", self.scope["url_route"])
            safeguard.record(self.scope["user"].pk, ok=False)
            await self.send_error("internal_error", MSG_INTERNAL)

    async def _rate_limited(self) -> None:
        error = RateLimited(MSG_MESSAGE_RATE.format(limit=self.bucket.rate))
        await self.send_error(error.code, error.message)
        await self.close(code=error.close_code)

    def _input_now(self, data: bytes) -> bool:
        """Write input from the protocol's short path; False leaves it to ``receive``.

        Only while this consumer waits for its next message (nothing earlier is unfinished)
        and only input that passes every check: anything to report takes the ordinary path.
        """
        terminal = self.terminal
        if (
            not self._waiting
            or self._gone
            or terminal is None
            or terminal.ended
            or self.read_only
            or len(data) > conf.MAX_INPUT_FRAME_BYTES
            or not self.bucket.take()
        ):
            return False
        try:
            terminal.write(data, client=self)
        except Exception:
            # What fails here fails before the PTY took anything (its size, its write): the
            # ordinary path tries again, and reports it.
            return False
        return True

    async def _input(self, data: bytes) -> None:
        if len(data) > conf.MAX_INPUT_FRAME_BYTES:
            await self._too_large("Input", len(data), conf.MAX_INPUT_FRAME_BYTES)
            return
        if self.read_only:
            await self.send_error(ReadOnly.code, MSG_READ_ONLY)
            return
        if self.terminal is None or self.terminal.ended:
            await self.send_error("session_ended", MSG_ENDED)
            return
        try:
            self.terminal.write(data, client=self)
        except terminals.InputOverflow as exc:
            await self.send_control(
                {
                    "type": "error",
                    "code": "input_overflow",
                    "message": str(exc),
                    "bytes": exc.dropped,
                    "limit": exc.limit,
                }
            )

    async def _control(self, text: str) -> None:
        size = len(text.encode())
        if size > conf.MAX_CONTROL_FRAME_BYTES:
            await self._too_large("Control", size, conf.MAX_CONTROL_FRAME_BYTES)
            return
        try:
            message = json.loads(text, parse_int=_parse_int)
        except _NumberTooLong:
            await self.send_error(
                "malformed_json", MSG_NUMBER_TOO_LONG.format(digits=NUMBER_DIGITS)
            )
            return
        except (ValueError, RecursionError):
            await self.send_error("malformed_json", MSG_MALFORMED)
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            await self.send_error("malformed_message", MSG_MALFORMED)
            return
        if message["type"] != "ack" and not self.bucket.take():  # acks keep output flowing
            await self._rate_limited()
            return
        handler = self.CONTROL_HANDLERS.get(message["type"])
        if handler is None:
            allowed = ", ".join(sorted(self.CONTROL_HANDLERS))
            await self.send_error(
                "unknown_type", MSG_UNKNOWN_TYPE.format(type=message["type"][:40], allowed=allowed)
            )
            return
        await handler(self, message)

    async def _on_resize(self, message: dict[str, Any]) -> None:
        cols, rows = message.get("cols"), message.get("rows")
        if not _is_int(cols) or not _is_int(rows):
            await self.send_error("invalid_resize", MSG_BAD_RESIZE)
            return
        if self.read_only:
            return  # a viewer's window does not size the owner's terminal
        if self.terminal is not None and not self.terminal.ended:
            self.terminal.resize(
                _clamp(cols, conf.MIN_COLS, conf.MAX_COLS),
                _clamp(rows, conf.MIN_ROWS, conf.MAX_ROWS),
                client=self,
            )

    async def _on_ack(self, message: dict[str, Any]) -> None:
        count = message.get("bytes")
        if not _is_int(count) or count < 0:
            await self.send_error("invalid_ack", MSG_BAD_ACK)
            return
        if self.terminal is not None:
            self.terminal.acknowledge(self, count)

    async def _on_resume(self, message: dict[str, Any]) -> None:
        """Restart the stream after byte ``offset``: hello (``resumed``), the missing bytes
        from memory or storage, then live output. Output already on its way before that
        hello is to be ignored by the client."""
        offset = message.get("offset")
        if not _is_int(offset) or offset < 0:
            await self.send_error("invalid_resume", MSG_BAD_RESUME)
            return
        terminal = self.terminal
        if terminal is not None and not terminal.ended:
            history = await self._history_if_needed(terminal, offset)
            start = terminal.resume(self, self._hello("active"), since=offset, history=history)
            self._tell_if_pruned(offset, start)
            return
        record = await database_sync_to_async(selectors.session_find)(session_id=self.record.id)
        if record is not None:
            self.record = record
        hello = {**self._hello(self.record.state), "resumed": True}
        await self._replay_ended(self.record, hello, offset)

    async def _on_ping(self, message: dict[str, Any]) -> None:
        await self.send_control({"type": "pong"})

    CONTROL_HANDLERS = {
        "resize": _on_resize,
        "ack": _on_ack,
        "resume": _on_resume,
        "ping": _on_ping,
    }

    # --- server -> client -----------------------------------------------------------------

    async def _too_large(self, kind: str, size: int, limit: int) -> None:
        error = PayloadTooLarge(MSG_TOO_LARGE.format(kind=kind, size=size, limit=limit))
        await self.send_error(error.code, error.message)
        await self.close(code=error.close_code)

    async def send(
        self, text_data: str | None = None, bytes_data: bytes | None = None, close: bool = False
    ) -> None:
        """Send a frame; a socket already closed (by either side) takes nothing, quietly."""
        if self._gone:
            return
        try:
            await super().send(text_data=text_data, bytes_data=bytes_data, close=close)
        except (OSError, RuntimeError):  # uvicorn: ClientDisconnected, or a send after close
            self._gone = True
            logger.debug("send to %s after its socket closed", self.scope["url_route"])

    async def close(self, code: int | bool | None = None, reason: str | None = None) -> None:
        if self._gone:
            return
        self._gone = True
        try:
            await super().close(code=code, reason=reason)
        except (OSError, RuntimeError):
            logger.debug("closing %s after its socket closed", self.scope["url_route"])

    async def send_error(self, code: str, message: str) -> None:
        await self.send_control({"type": "error", "code": code, "message": message})

    async def send_output(self, data: bytes) -> None:
        # Straight to the server (the hot path): what AsyncWebsocketConsumer.send would do.
        await self._send_frame({"type": "websocket.send", "bytes": data})

    def send_output_now(self, data: bytes) -> bool:
        """Send output at once if the socket takes it now (termsys's protocol only)."""
        protocol = self._protocol
        return protocol is not None and protocol.send_binary_now(data)

    async def send_control(self, message: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(message))


class NoSuchTerminal(AsyncWebsocketConsumer):
    """A WebSocket to a path with no terminal: say so, and close 4404."""

    async def connect(self) -> None:
        await self.accept()
        path = self.scope.get("path", "")[:200]
        await self.send(
            text_data=json.dumps(
                {
                    "type": "error",
                    "code": "not_found",
                    "message": MSG_NO_SUCH_PATH.format(path=path),
                }
            )
        )
        await self.close(code=NotFound.close_code)

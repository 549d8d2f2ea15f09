"""The terminal WebSocket: parse a frame, call one method, send.

Binary frames carry raw input (client -> server) and raw output (server -> client); text
frames carry JSON control messages. See DESIGN.md, "Terminal I/O".
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import parse_qs

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from sessions_app import conf, selectors, services, terminals
from sessions_app.errors import Conflict, NotAuthenticated, PayloadTooLarge, TermsysError
from sessions_app.states import LIVE_STATES
from sessions_app.storage import SessionRecord, get_storage

logger = logging.getLogger(__name__)

MSG_NOT_LOGGED_IN = "Log in to attach to a terminal."
MSG_MALFORMED = "Control frames must be a JSON object with a string 'type'."
MSG_UNKNOWN_TYPE = "Unknown message type {type!r}; expected one of: {allowed}."
MSG_BAD_RESIZE = "resize needs integer 'cols' and 'rows'."
MSG_BAD_ACK = "ack needs a non-negative integer 'bytes'."
MSG_ENDED = "The session has ended; input is not delivered."
MSG_OTHER_PROCESS = "The session's shell runs in another server process ({node}); connect there."
MSG_TOO_LARGE = "{kind} frame of {size} bytes is over the limit of {limit} bytes."


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TerminalConsumer(AsyncWebsocketConsumer):
    """One browser tab attached to one terminal session."""

    # Terminal bytes never travel through the channel layer, and an open terminal must keep
    # working while Redis is down: this consumer does not listen on the layer at all.
    channel_layer_alias = "__termsys_no_layer__"
    interactive = True

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels' dispatch closes old database connections before every message: a hop to
        # the sync thread per keystroke. Database work here happens only in explicit helpers.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        self.unacked = 0
        self.terminal: terminals.LiveTerminal | None = None
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self._refuse(NotAuthenticated(MSG_NOT_LOGGED_IN))
            return
        session_id = self.scope["url_route"]["kwargs"]["session_id"]
        try:
            record = await database_sync_to_async(self._load)(user, session_id)
        except TermsysError as exc:
            await self._refuse(exc)
            return
        terminal = terminals.get(record.id)
        if terminal is None and record.state in LIVE_STATES:
            await self._refuse(Conflict(MSG_OTHER_PROCESS.format(node=record.node)))
            return
        await self.accept()
        hello = {
            "type": "hello",
            "session": record.id,
            "mode": record.storage_mode,
            "state": record.state,
        }
        if terminal is None or terminal.ended:
            await self._replay_ended(record, hello)
            return
        self.terminal = terminal
        terminal.attach(self, {**hello, "state": "active"}, since=self._resume_offset())
        await database_sync_to_async(services.session_attached)(
            session_id=record.id, clients=len(terminal.clients)
        )

    @staticmethod
    def _load(user: Any, session_id: str) -> SessionRecord:
        record = selectors.session_get(user=user, session_id=session_id)
        if record.state in LIVE_STATES and terminals.get(record.id) is None:
            services.sessions_reconcile(user=user)
            record = selectors.session_get(user=user, session_id=session_id)
        return record

    def _resume_offset(self) -> int | None:
        """Return the ``offset`` query parameter: the client has every byte before it."""
        values = parse_qs(self.scope.get("query_string", b"").decode("latin-1")).get("offset")
        if not values or not values[0].isdigit() or len(values[0]) > 18:
            return None
        return int(values[0])

    async def _replay_ended(self, record: SessionRecord, hello: dict[str, Any]) -> None:
        """Send an ended session's stored history, then its exit."""
        since = self._resume_offset()
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
        for start in range(0, len(scrollback.data), conf.READ_BYTES):
            await self.send(bytes_data=scrollback.data[start : start + conf.READ_BYTES])
        await self.send_control(
            {"type": "exit", "exitCode": record.exit_code, "state": record.state}
        )

    async def _refuse(self, error: TermsysError) -> None:
        await self.accept()
        await self.send_control({"type": "error", "code": error.code, "message": error.message})
        await self.close(code=error.close_code)

    async def disconnect(self, code: int) -> None:
        terminal = self.terminal
        if terminal is None:
            return
        terminal.detach(self)
        self.terminal = None
        if not terminal.clients and not terminal.ended:
            await database_sync_to_async(services.session_detached)(
                session_id=terminal.session_id, cols=terminal.cols, rows=terminal.rows
            )

    # --- client -> server -----------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if bytes_data is not None:
            await self._input(bytes_data)
        elif text_data is not None:
            await self._control(text_data)

    async def _input(self, data: bytes) -> None:
        if len(data) > conf.MAX_INPUT_FRAME_BYTES:
            await self._too_large("Input", len(data), conf.MAX_INPUT_FRAME_BYTES)
            return
        if self.terminal is None or self.terminal.ended:
            await self.send_error("session_ended", MSG_ENDED)
            return
        self.terminal.write(data)

    async def _control(self, text: str) -> None:
        size = len(text.encode())
        if size > conf.MAX_CONTROL_FRAME_BYTES:
            await self._too_large("Control", size, conf.MAX_CONTROL_FRAME_BYTES)
            return
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):
            await self.send_error("malformed_json", MSG_MALFORMED)
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            await self.send_error("malformed_message", MSG_MALFORMED)
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
        if self.terminal is not None and not self.terminal.ended:
            self.terminal.resize(
                _clamp(cols, conf.MIN_COLS, conf.MAX_COLS),
                _clamp(rows, conf.MIN_ROWS, conf.MAX_ROWS),
            )

    async def _on_ack(self, message: dict[str, Any]) -> None:
        count = message.get("bytes")
        if not _is_int(count) or count < 0:
            await self.send_error("invalid_ack", MSG_BAD_ACK)
            return
        if self.terminal is not None:
            self.terminal.acknowledge(self, count)

    async def _on_ping(self, message: dict[str, Any]) -> None:
        await self.send_control({"type": "pong"})

    CONTROL_HANDLERS = {"resize": _on_resize, "ack": _on_ack, "ping": _on_ping}

    # --- server -> client -----------------------------------------------------------------

    async def _too_large(self, kind: str, size: int, limit: int) -> None:
        error = PayloadTooLarge(MSG_TOO_LARGE.format(kind=kind, size=size, limit=limit))
        await self.send_error(error.code, error.message)
        await self.close(code=error.close_code)

    async def send_error(self, code: str, message: str) -> None:
        await self.send_control({"type": "error", "code": code, "message": message})

    async def send_output(self, data: bytes) -> None:
        await self.send(bytes_data=data)

    async def send_control(self, message: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(message))

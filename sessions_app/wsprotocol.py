"""uvicorn's WebSocket protocol (websockets-sansio) with a short path for terminal frames.

Every frame through ASGI costs a message dict, a queue hand-over that wakes the consumer's task
and resumes its chain of middleware coroutines, and a pause and a resume of the socket's reads
(two epoll changes); every frame sent, a coroutine and websockets' general frame builder. On a
keystroke's round trip that is most of what the server does besides the two system calls
(bench/README.md). The terminal consumer registers here for the two frames that make up
nearly all of its traffic:

- a binary frame from the client (input) is handed to ``fast_input`` synchronously when
  nothing is queued for the application; it returns False to let it take the ASGI path
  (an error to report, a limit, or the consumer busy with an earlier message), so order and
  every check are those of the ordinary path;
- ``send_binary_now`` writes a binary frame at once when the connection is open and writable,
  and returns False otherwise (the caller then awaits the ordinary ``send``).

Anything else (text frames, pings, close, the handshake) is uvicorn's. This subclass reads
uvicorn's own attributes (``queue``, ``frames``, ``writable``, ``conn``...): it is written for
the uvicorn and websockets pinned in requirements/base.txt, and the live-server tests
(tests/test_live_server.py, tests/browser) run every terminal frame through it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

OP_BINARY_FIN = 0x82


def binary_frame_header(length: int) -> bytes:
    """The header of an unmasked (server-to-client), final binary frame (RFC 6455 5.2)."""
    if length < 126:
        return bytes((OP_BINARY_FIN, length))
    if length < 1 << 16:
        return struct.pack("!BBH", OP_BINARY_FIN, 126, length)
    return struct.pack("!BBQ", OP_BINARY_FIN, 127, length)


class TerminalWebSocketProtocol(WebSocketsSansIOProtocol):
    """Serve as uvicorn's websockets-sansio protocol, plus the terminal's short paths."""

    fast_input: Callable[[bytes], bool] | None = None

    def handle_bytes(self, event: Any) -> None:
        handler = self.fast_input
        if (
            handler is not None
            and event.fin
            and not self.frames
            and not self.close_sent
            and self.queue.empty()
            and handler(bytes(event.data))
        ):
            return
        super().handle_bytes(event)

    def send_binary_now(self, data: bytes) -> bool:
        """Write ``data`` as one binary frame if the socket takes it now; else return False."""
        conn = self.conn
        if (
            self.disconnected
            or self.close_sent
            or not self.handshake_complete
            or self.initial_response is not None
            or not self.writable.is_set()
            or conn.state is not State.OPEN
            or conn.extensions
            or conn.writes
        ):
            return False
        self.transport.write(binary_frame_header(len(data)) + data)
        return True

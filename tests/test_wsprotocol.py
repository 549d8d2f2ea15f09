"""termsys's short path for output frames writes what any WebSocket client reads."""

from __future__ import annotations

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from sessions_app.wsprotocol import binary_frame_header


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
def test_a_frame_of_any_size_reaches_a_websocket_client_whole(size):
    # The length takes 7 bits, 16 or 64 (RFC 6455 5.2): each side of each boundary.
    client = ClientProtocol(parse_uri("ws://127.0.0.1/"), state=State.OPEN, max_size=None)
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    wire = binary_frame_header(size) + payload + binary_frame_header(3) + b"end"
    for at in range(0, len(wire), 4096):  # as TCP may deliver it
        client.receive_data(wire[at : at + 4096])
    frames = client.events_received()
    assert client.parser_exc is None
    assert [(f.opcode, f.fin, bytes(f.data)) for f in frames] == [
        (Opcode.BINARY, True, payload),
        (Opcode.BINARY, True, b"end"),
    ]

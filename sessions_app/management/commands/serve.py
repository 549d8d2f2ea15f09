"""Serve termsys with uvicorn, with the WebSocket settings chosen for terminals."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

from django.core.management.base import BaseCommand, CommandError

MAX_MESSAGE_BYTES = 1024 * 1024

# uvicorn on uvloop, httptools and websockets: the per-frame cost of the server is what is
# left of a keystroke's round trip once the consumer is lean (bench/README.md), so the terminal's
# input and output frames skip ASGI's queue and coroutines (sessions_app/wsprotocol.py).
#
# WebSockets stay open as long as the peer answers pings (every 20 s, 30 s to answer): a
# terminal tab may sit idle for days, and a proxy must not drop it for silence. The page
# reconnects and replays after any drop anyway, so no upper bound on a connection's age is set.
# Terminal output is mostly already-dense bytes at high rates: no permessage-deflate (it costs
# more CPU than the bytes it saves on a LAN, and the ack window bounds what is in flight).
UVICORN_OPTIONS: dict[str, Any] = {
    "loop": "uvloop",
    "http": "httptools",
    # uvicorn's websockets-sansio protocol, with a short path for terminal frames
    "ws": "sessions_app.wsprotocol:TerminalWebSocketProtocol",
    "ws_max_size": MAX_MESSAGE_BYTES,
    "ws_ping_interval": 20.0,
    "ws_ping_timeout": 30.0,
    "ws_per_message_deflate": False,
    "lifespan": "off",
    "log_config": None,  # Django's LOGGING (settings.py) stays in charge
    "access_log": False,
    "server_header": False,
    "timeout_graceful_shutdown": 10,
}


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a SIGTERM or SIGINT ends the process normally.

        After its graceful shutdown uvicorn raises the signal it caught again, with the default
        handler back in place: the process would die of it without running its ``atexit``
        handlers, which store what the shells printed last and hang up on them.
        """

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals.clear()

    return Server


class Command(BaseCommand):
    help = "Serve termsys (HTTP + WebSockets) with uvicorn on HOST:PORT (default 127.0.0.1:8000)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", default=os.environ.get("PORT", "8000"))
        parser.add_argument(
            "--proxy-headers",
            action="store_true",
            help="Trust X-Forwarded-For/-Proto from the reverse proxy in front of termsys "
            "(from the addresses in --forwarded-allow-ips).",
        )
        parser.add_argument(
            "--forwarded-allow-ips",
            default=os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1"),
            help="Comma-separated proxy addresses (or networks, or *) whose X-Forwarded-* "
            "headers are trusted with --proxy-headers (default 127.0.0.1,::1).",
        )

    def handle(
        self,
        *args: Any,
        host: str,
        port: str,
        proxy_headers: bool,
        forwarded_allow_ips: str,
        **options: Any,
    ) -> None:
        if not re.fullmatch(r"[0-9]{1,5}", str(port)) or not 0 < int(port) < 65536:
            raise CommandError(f"PORT={port!r} is not a TCP port (1-65535).")
        import uvicorn

        from termsys.asgi import application

        config = uvicorn.Config(
            application,
            host=host,
            port=int(port),
            proxy_headers=proxy_headers,
            forwarded_allow_ips=forwarded_allow_ips,
            **UVICORN_OPTIONS,
        )
        server = _server_class()(config)
        self.stdout.write(f"termsys is serving on http://{host}:{port}/")
        self.stdout.flush()
        server.run()
        if not server.started:
            raise CommandError(f"could not serve on {host}:{port} (see the log above).")

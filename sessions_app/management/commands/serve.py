"""Serve termsys with daphne, with the WebSocket settings chosen for terminals."""

from __future__ import annotations

import os
from typing import Any

from daphne.cli import CommandLineInterface
from django.core.management.base import BaseCommand, CommandError

# WebSockets stay open as long as the peer answers pings (every 20 s, 30 s to answer): a
# terminal tab may sit idle for days, and a proxy must not drop it for silence. The page
# reconnects and replays after any drop anyway, so no upper bound on a connection's age is set.
DAPHNE_ARGS = [
    "--websocket_timeout", "-1",
    "--ping-interval", "20",
    "--ping-timeout", "30",
    "--websocket-max-message-size", str(1024 * 1024),
    "--application-close-timeout", "10",
]  # fmt: skip


class Command(BaseCommand):
    help = "Serve termsys (HTTP + WebSockets) with daphne on HOST:PORT (default 127.0.0.1:8000)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", default=os.environ.get("PORT", "8000"))
        parser.add_argument(
            "--proxy-headers",
            action="store_true",
            help="Trust X-Forwarded-For/-Proto from a reverse proxy in front of termsys.",
        )

    def handle(self, *args: Any, host: str, port: str, proxy_headers: bool, **options: Any) -> None:
        if not str(port).isdigit() or not 0 < int(port) < 65536:
            raise CommandError(f"PORT={port!r} is not a TCP port (1-65535).")
        argv = ["-b", host, "-p", str(port), *DAPHNE_ARGS]
        if proxy_headers:
            argv.append("--proxy-headers")
        self.stdout.write(f"termsys is serving on http://{host}:{port}/")
        CommandLineInterface().run([*argv, "termsys.asgi:application"])

"""Accept a WebSocket only from the page's own origin (or an origin the settings trust).

Channels' ``AllowedHostsOriginValidator`` compares only the Origin's host name with
``ALLOWED_HOSTS``: a page on another port of the same host (``http://127.0.0.1:3000``, any dev
server a user runs), which the browser sends the session cookie from, could drive their shells.
Here the Origin must be the origin the request was made to: the ``Host`` header's name and
port (a Host without a port is the Origin scheme's default port), with that host in
``ALLOWED_HOSTS``; or one of ``CSRF_TRUSTED_ORIGINS`` (``https://*.example.com`` matches its
subdomains, as Django's CSRF check does). A refused handshake is answered 403.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host

logger = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 80, "https": 443}


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _trusted(origin: str) -> bool:
    """Whether ``origin`` is one of CSRF_TRUSTED_ORIGINS (``*.`` for any subdomain)."""
    parts = urlsplit(origin)
    for trusted in settings.CSRF_TRUSTED_ORIGINS:
        if origin == trusted:
            return True
        allowed = urlsplit(trusted)
        if allowed.netloc.startswith("*") and parts.scheme == allowed.scheme:
            suffix = allowed.netloc[1:]  # ".example.com[:port]"
            if parts.netloc.endswith(suffix) and len(parts.netloc) > len(suffix):
                return True
    return False


def same_origin(origin: str, host: str) -> bool:
    """Whether ``origin`` (an Origin header) names the server ``host`` (a Host header) is."""
    try:
        parts = urlsplit(origin)
        origin_port = parts.port
    except ValueError:
        return False
    if (
        parts.scheme not in DEFAULT_PORTS
        or parts.username is not None
        or parts.password is not None
        or parts.path
        or parts.query
        or parts.fragment
        or not parts.hostname
    ):
        return False
    name, port = split_domain_port(host)
    if not name or not validate_host(name, settings.ALLOWED_HOSTS):
        return False
    if parts.hostname.lower() != name.strip("[]").lower():
        return False
    default = DEFAULT_PORTS[parts.scheme]
    if port:
        return (origin_port or default) == int(port)
    return origin_port in (None, default)


def origin_allowed(scope: dict[str, Any]) -> bool:
    """Whether a WebSocket handshake's Origin may open a terminal socket."""
    origin = _header(scope, b"origin")
    host = _header(scope, b"host")
    if origin is None or host is None:
        return False
    return _trusted(origin) or same_origin(origin, host)


class SameOriginValidator:
    """ASGI middleware: refuse WebSocket handshakes from any origin but the page's own."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] == "websocket" and not origin_allowed(scope):
            logger.info(
                "WebSocket from origin %r to host %r refused",
                _header(scope, b"origin"),
                _header(scope, b"host"),
            )
            denier = WebsocketDenier()
            return await denier(scope, receive, send)
        return await self.application(scope, receive, send)

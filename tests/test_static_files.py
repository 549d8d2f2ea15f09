"""Static files served over ASGI, as `manage.py serve` serves them."""

from __future__ import annotations

import asyncio
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from asgiref.testing import ApplicationCommunicator
from django.conf import settings
from django.core.asgi import get_asgi_application

XTERM_JS = Path(settings.BASE_DIR) / "node_modules" / "@xterm" / "xterm" / "lib" / "xterm.js"


def fetch(path: str, *headers: tuple[bytes, bytes]) -> tuple[int, dict, bytes, list]:
    """GET ``path`` through Django's ASGI handler; return status, headers, body, warnings.

    On an event loop of its own in a thread of its own: the browser tests' Playwright keeps
    one running in this thread for the whole session.
    """
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, _fetch(path, *headers)).result(timeout=60)


async def _fetch(path: str, *headers: tuple[bytes, bytes]) -> tuple[int, dict, bytes, list]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        app = ApplicationCommunicator(get_asgi_application(), scope)
        await app.send_input({"type": "http.request", "body": b""})
        start = await app.receive_output(10)
        body = b""
        while True:
            message = await app.receive_output(10)
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await app.wait(10)
    response_headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], response_headers, body, [str(w.message) for w in caught]


def test_a_static_file_arrives_whole_without_the_sync_iterator_warning():
    status, headers, body, caught = fetch("/static/vendor/xterm/lib/xterm.js")
    expected = XTERM_JS.read_bytes()
    assert status == 200
    assert len(expected) > 256 * 1024  # more than one block
    assert body == expected
    assert int(headers["content-length"]) == len(expected)
    assert not [w for w in caught if "synchronous iterators" in w], caught


def test_a_range_of_a_static_file_is_that_range():
    status, _, body, caught = fetch(
        "/static/vendor/xterm/lib/xterm.js", (b"range", b"bytes=300000-300099")
    )
    assert status == 206
    assert body == XTERM_JS.read_bytes()[300000:300100]
    assert not [w for w in caught if "synchronous iterators" in w], caught


def test_a_revalidated_static_file_is_not_modified_and_empty():
    _, headers, _, _ = fetch("/static/vendor/xterm/lib/xterm.js")
    status, _, body, caught = fetch(
        "/static/vendor/xterm/lib/xterm.js", (b"if-none-match", headers["etag"].encode())
    )
    assert (status, body) == (304, b"")
    assert not [w for w in caught if "synchronous iterators" in w], caught


def test_the_icon_is_found_where_browsers_look_for_it():
    """Pages without an icon link (the admin's) make browsers ask for /favicon.ico."""
    status, headers, _, _ = fetch("/favicon.ico")
    assert status == 301
    status, headers, body, _ = fetch(headers["location"])
    assert status == 200 and headers["content-type"].startswith("image/svg+xml")
    assert body.startswith(b"<svg")

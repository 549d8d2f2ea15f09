"""Serve file responses (WhiteNoise's static files) to ASGI with an asynchronous iterator.

Django's ASGI handler reads a streaming response through ``__aiter__``; given a synchronous
iterator (every ``FileResponse``: WhiteNoise answers each static file with one) it warns
"StreamingHttpResponse must consume synchronous iterators" on every start of the server and
reads the whole file into memory first. Here the file is read in a worker thread, a block at
a time, so a cold disk never holds up the event loop that also carries the terminals.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import IO

from django.core.handlers.asgi import ASGIRequest
from django.http import FileResponse, HttpRequest, HttpResponseBase

BLOCK_BYTES = 256 * 1024


async def _read_blocks(filelike: IO[bytes]) -> AsyncIterator[bytes]:
    """Yield ``filelike``'s content, each block read in a worker thread."""
    while True:
        block = await asyncio.to_thread(filelike.read, BLOCK_BYTES)
        if not block:
            return
        yield block


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator with no items


class AsyncFileStreamMiddleware:
    """Give a ``FileResponse`` an asynchronous body when the request came over ASGI."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        if (
            isinstance(request, ASGIRequest)
            and isinstance(response, FileResponse)
            and not response.is_async
        ):
            filelike = response.file_to_stream
            # The file is still closed by the response's closer, registered when it was set;
            # the generator is iterated by the ASGI handler, on the server's event loop.
            response.streaming_content = _nothing() if filelike is None else _read_blocks(filelike)
        return response

"""Flag middleware: a stable id for visitors who are not logged in (so percentage flags
bucket them too: logged-in users are bucketed by user id), and the safeguard's recording of
request outcomes."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse

from featureflags import safeguard, tasks
from featureflags.models import ANONYMOUS_COOKIE

COOKIE_AGE = 365 * 24 * 3600


class VisitorIdMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        visitor = request.COOKIES.get(ANONYMOUS_COOKIE, "")
        fresh = not (16 <= len(visitor) <= 64 and visitor.isalnum())
        if fresh:
            visitor = secrets.token_hex(16)
        request.termsys_visitor = visitor
        response = self.get_response(request)
        if fresh and not request.path.startswith(("/api/", "/static/", "/metrics")):
            response.set_cookie(
                ANONYMOUS_COOKIE, visitor, max_age=COOKIE_AGE, httponly=True, samesite="Lax"
            )
        return response


class SafeguardMiddleware:
    """Record each logged-in user's request outcome (status >= 500 is an error) and latency
    for the flag safeguard, and start the periodic flag work with the server's event loop."""

    sync_capable = True
    async_capable = True
    SKIPPED = ("/static/", "/api/health", "/metrics")

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):
        if self.is_async:
            return self.__acall__(request)
        started = time.perf_counter()
        response = self.get_response(request)
        if not request.path.startswith(self.SKIPPED):
            try:
                user = getattr(request, "user", None)
                if user is not None and user.is_authenticated:
                    self._record(user.pk, response, started)
            except Exception:  # e.g. the database is down: the response stands as it is
                pass
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        tasks.start()
        started = time.perf_counter()
        response = await self.get_response(request)
        if not request.path.startswith(self.SKIPPED) and hasattr(request, "auser"):
            try:
                user = await request.auser()
                if user.is_authenticated:
                    self._record(user.pk, response, started)
            except Exception:  # e.g. the database is down: the response stands as it is
                pass
        return response

    @staticmethod
    def _record(user_id: int, response: HttpResponse, started: float) -> None:
        safeguard.record(
            user_id,
            ok=response.status_code < 500,
            latency_ms=(time.perf_counter() - started) * 1000,
        )

"""Make every error under /api/ answer in the JSON error shape, never an HTML page."""

from __future__ import annotations

import logging

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse
from django.utils.deprecation import MiddlewareMixin
from django.views.csrf import csrf_failure as django_csrf_failure

from sessions_app.errors import Forbidden, NotAuthenticated, TermsysError

logger = logging.getLogger(__name__)

API_PREFIX = "/api/"


class InternalError(TermsysError):
    status, code = 500, "internal_error"


class DatabaseUnavailable(TermsysError):
    status, code = 503, "database_unavailable"


MSG_DATABASE_DOWN = "The database is unavailable; try again shortly."


class ApiErrorMiddleware(MiddlewareMixin):
    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not request.path.startswith(API_PREFIX):
            return None
        from sessions_app.api import error_response

        if isinstance(exception, TermsysError):
            return error_response(request, exception)
        if isinstance(exception, (OperationalError, InterfaceError)):
            logger.warning(
                "database unavailable in %s %s: %s", request.method, request.path, exception
            )
            return error_response(request, DatabaseUnavailable(MSG_DATABASE_DOWN))
        logger.exception(
            "unhandled error in %s %s", request.method, request.path, exc_info=exception
        )
        return error_response(request, InternalError("Internal server error; see the server log."))


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """Answer a failed CSRF check with JSON under /api/ and Django's page elsewhere."""
    if request.path.startswith(API_PREFIX):
        from sessions_app.api import error_response

        user = getattr(request, "user", None)
        if user is not None and not user.is_authenticated:
            return error_response(
                request, NotAuthenticated("Log in first (your session has ended).")
            )
        return error_response(
            request,
            Forbidden(
                "CSRF check failed: send the csrftoken cookie's value in the X-CSRFToken header.",
                details={"reason": reason},
            ),
        )
    return django_csrf_failure(request, reason=reason)

"""Make every error under /api/ answer in the JSON error shape, never an HTML page.

Errors reach here two ways: raised by a view (``ApiErrorMiddleware.process_exception``), or
raised before the view runs, by Django's request parsing inside a middleware (a form body too
large, too many fields, a malformed multipart body, a Host not allowed), which Django hands to
the ``handler400``/``403``/``404``/``500`` views that ``termsys/urls.py`` points here. A client's
mistake is a 4xx either way: the flag safeguard counts 5xx answers as server errors.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.exceptions import (
    BadRequest,
    DisallowedHost,
    PermissionDenied,
    RequestDataTooBig,
    SuspiciousOperation,
    TooManyFieldsSent,
    TooManyFilesSent,
)
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse
from django.http.multipartparser import MultiPartParserError
from django.http.request import RawPostDataException
from django.utils.deprecation import MiddlewareMixin
from django.views import defaults
from django.views.csrf import csrf_failure as django_csrf_failure

from sessions_app.errors import (
    Forbidden,
    NotAuthenticated,
    NotFound,
    PayloadTooLarge,
    TermsysError,
    UnsupportedMediaType,
)

logger = logging.getLogger(__name__)

API_PREFIX = "/api/"


class InternalError(TermsysError):
    status, code = 500, "internal_error"


class DatabaseUnavailable(TermsysError):
    status, code = 503, "database_unavailable"


MSG_DATABASE_DOWN = "The database is unavailable; try again shortly."
MSG_INTERNAL = "Internal server error; see the server log."
MSG_BODY_TOO_LARGE = "Request body is larger than {limit} bytes (DATA_UPLOAD_MAX_MEMORY_SIZE)."
MSG_TOO_MANY_FIELDS = (
    "The request has more than {limit} query parameters or form fields "
    "(DATA_UPLOAD_MAX_NUMBER_FIELDS)."
)
MSG_TOO_MANY_FILES = "The request has more than {limit} files (DATA_UPLOAD_MAX_NUMBER_FILES)."
MSG_BAD_HOST = "The Host header names no site this server answers to (ALLOWED_HOSTS)."
MSG_SEND_JSON = "Send the request body as JSON (Content-Type: application/json), not {kind}."
MSG_BAD_REQUEST = "The request is malformed: {reason}."
MSG_FORBIDDEN = "You may not do this."
MSG_NOT_FOUND = "Not found."
MSG_NO_ENDPOINT = "No API endpoint {path}."

# SQLite primary result codes that mean the database cannot be used right now (busy, locked,
# out of memory or disk, unreadable, unopenable), not that a statement was wrong.
_SQLITE_UNAVAILABLE = frozenset({5, 6, 7, 8, 10, 11, 13, 14, 15, 26})
# PostgreSQL SQLSTATE classes of the same kind: connection exception, insufficient resources,
# operator intervention (shutdown, cancel), system error.
_POSTGRES_UNAVAILABLE = frozenset({"08", "53", "57", "58"})


def database_unavailable(exception: BaseException) -> bool:
    """Return whether ``exception`` says the database cannot be reached or used right now.

    Django raises OperationalError for a stopped server and for an SQL statement SQLite
    refuses alike (an FTS5 syntax error, say); only the first is an outage to report as 503.
    The driver's error, which Django chains as the cause, tells them apart.
    """
    if isinstance(exception, InterfaceError):  # the connection is gone
        return True
    if not isinstance(exception, OperationalError):
        return False
    cause = exception.__cause__
    code = getattr(cause, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _SQLITE_UNAVAILABLE
    if hasattr(cause, "sqlstate"):  # psycopg: no SQLSTATE when no server answered at all
        state = cause.sqlstate
        return state is None or state[:2] in _POSTGRES_UNAVAILABLE
    return False


def client_error(exception: BaseException) -> TermsysError | None:
    """Return the JSON error for a request Django refused as malformed, or None."""
    if isinstance(exception, RequestDataTooBig):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return PayloadTooLarge(MSG_BODY_TOO_LARGE.format(limit=limit), details={"limit": limit})
    if isinstance(exception, TooManyFieldsSent):
        limit = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
        return TermsysError(MSG_TOO_MANY_FIELDS.format(limit=limit), details={"limit": limit})
    if isinstance(exception, TooManyFilesSent):
        limit = settings.DATA_UPLOAD_MAX_NUMBER_FILES
        return TermsysError(MSG_TOO_MANY_FILES.format(limit=limit), details={"limit": limit})
    if isinstance(exception, DisallowedHost):
        return TermsysError(MSG_BAD_HOST, details={"header": "Host"})
    if isinstance(exception, MultiPartParserError | RawPostDataException):
        return UnsupportedMediaType(MSG_SEND_JSON.format(kind="multipart/form-data"))
    if isinstance(exception, SuspiciousOperation | BadRequest):
        return TermsysError(MSG_BAD_REQUEST.format(reason=type(exception).__name__))
    if isinstance(exception, PermissionDenied):
        return Forbidden(MSG_FORBIDDEN)
    if isinstance(exception, Http404):
        return NotFound(MSG_NOT_FOUND)
    return None


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIX)


def _error_response(request: HttpRequest, error: TermsysError) -> HttpResponse:
    from sessions_app.api import error_response  # api imports models; this module loads first

    return error_response(request, error)


class ApiErrorMiddleware(MiddlewareMixin):
    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not _is_api(request):
            return None
        if isinstance(exception, TermsysError):
            return _error_response(request, exception)
        error = client_error(exception)
        if error is not None:
            logger.info("refused %s %s: %r", request.method, request.path, exception)
            return _error_response(request, error)
        if database_unavailable(exception):
            logger.warning(
                "database unavailable in %s %s: %s", request.method, request.path, exception
            )
            return _error_response(request, DatabaseUnavailable(MSG_DATABASE_DOWN))
        logger.exception(
            "unhandled error in %s %s", request.method, request.path, exc_info=exception
        )
        return _error_response(request, InternalError(MSG_INTERNAL))


# --- Django's error views (handler400, ...): JSON under /api/, Django's pages elsewhere -------


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not _is_api(request):
        return defaults.bad_request(request, exception)
    error = client_error(exception)
    if error is None:
        error = TermsysError(MSG_BAD_REQUEST.format(reason=type(exception).__name__))
    return _error_response(request, error)


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not _is_api(request):
        return defaults.permission_denied(request, exception)
    return _error_response(request, Forbidden(MSG_FORBIDDEN))


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not _is_api(request):
        return defaults.page_not_found(request, exception)
    return _error_response(request, NotFound(MSG_NO_ENDPOINT.format(path=request.path)))


def server_error(request: HttpRequest) -> HttpResponse:
    if not _is_api(request):
        return defaults.server_error(request)
    return _error_response(request, InternalError(MSG_INTERNAL))


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """Answer a failed CSRF check with JSON under /api/ and Django's page elsewhere."""
    if _is_api(request):
        user = getattr(request, "user", None)
        if user is not None and not user.is_authenticated:
            return _error_response(
                request, NotAuthenticated("Log in first (your session has ended).")
            )
        return _error_response(
            request,
            Forbidden(
                "CSRF check failed: send the csrftoken cookie's value in the X-CSRFToken header.",
                details={"reason": reason},
            ),
        )
    return django_csrf_failure(request, reason=reason)

"""Typed errors raised by services; views and consumers translate them, never decide them."""

from __future__ import annotations

from typing import Any


class TermsysError(Exception):
    """An error a client caused or should hear about, with an HTTP status and a stable code."""

    status = 400
    code = "bad_request"
    close_code = 4400

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class ValidationFailed(TermsysError):
    status, code = 400, "validation_failed"


class NotAuthenticated(TermsysError):
    status, code, close_code = 401, "not_authenticated", 4401


class Forbidden(TermsysError):
    status, code, close_code = 403, "forbidden", 4403


class NotFound(TermsysError):
    status, code, close_code = 404, "not_found", 4404


class MethodNotAllowed(TermsysError):
    status, code = 405, "method_not_allowed"


class Conflict(TermsysError):
    status, code, close_code = 409, "conflict", 4409


class SessionLimitReached(Conflict):
    code = "session_limit_reached"


class PayloadTooLarge(TermsysError):
    status, code, close_code = 413, "payload_too_large", 4413


class UnsupportedMediaType(TermsysError):
    status, code = 415, "unsupported_media_type"


class RateLimited(TermsysError):
    status, code, close_code = 429, "rate_limited", 4429


class ReadOnly(TermsysError):
    status, code, close_code = 403, "read_only", 4403


class SpawnFailed(TermsysError):
    """The profile's command could not be started."""

    status, code = 400, "spawn_failed"


class VersionConflict(Exception):
    """A write carried a stale version: someone else wrote the record first."""

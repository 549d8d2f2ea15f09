"""Read and validate the process environment for settings.py.

Every reader raises ``ImproperlyConfigured`` with a message that names the variable, the value
found and what would be valid, so a bad setting stops start-up instead of misbehaving later.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

TRUE_VALUES = {"1", "true", "yes", "on"}
FALSE_VALUES = {"0", "false", "no", "off", ""}


def _raw(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    return None if value is None else value.strip()


def env_bool(name: str, default: bool, environ: Mapping[str, str] = os.environ) -> bool:
    """Return a boolean variable; accept 1/0, true/false, yes/no, on/off."""
    value = _raw(environ, name)
    if value is None:
        return default
    if value.lower() in TRUE_VALUES:
        return True
    if value.lower() in FALSE_VALUES:
        return False
    raise ImproperlyConfigured(
        f"{name}={value!r} is not a boolean; use one of 1, 0, true, false, yes, no, on, off."
    )


def env_int(
    name: str,
    default: int,
    *,
    minimum: int = 1,
    maximum: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> int:
    """Return an integer variable within [minimum, maximum]."""
    value = _raw(environ, name)
    if value is None or value == "":
        return default
    try:
        number = int(value.replace("_", ""))
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer.") from None
    upper = "" if maximum is None else f" and at most {maximum}"
    if number < minimum or (maximum is not None and number > maximum):
        raise ImproperlyConfigured(
            f"{name}={number} is out of range; it must be at least {minimum}{upper}."
        )
    return number


def env_float(
    name: str,
    default: float,
    minimum: float,
    maximum: float,
    environ: Mapping[str, str] = os.environ,
) -> float:
    """Return a number variable within [minimum, maximum]."""
    value = _raw(environ, name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a number.") from None
    if not minimum <= number <= maximum:  # also refuses nan
        raise ImproperlyConfigured(
            f"{name}={value} is out of range; it must be from {minimum:g} to {maximum:g}."
        )
    return number


def env_choice(
    name: str, default: str, choices: tuple[str, ...], environ: Mapping[str, str] = os.environ
) -> str:
    """Return a variable that must be one of ``choices`` (case-insensitive)."""
    value = _raw(environ, name)
    if value is None or value == "":
        return default
    if value.upper() not in choices:
        allowed = ", ".join(choices)
        raise ImproperlyConfigured(f"{name}={value!r} is not a known value; allowed: {allowed}.")
    return value.upper()


def env_url(
    name: str, schemes: tuple[str, ...], environ: Mapping[str, str] = os.environ
) -> str | None:
    """Return a URL variable whose scheme is one of ``schemes``, or None when unset."""
    value = _raw(environ, name)
    if not value:
        return None
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} is not a valid URL ({exc}).") from None
    allowed = ", ".join(f"{s}://" for s in schemes)
    if parts.scheme not in schemes:
        raise ImproperlyConfigured(
            f"{name} has scheme {parts.scheme or '(none)'!r}; "
            f"expected a URL starting with {allowed}."
        )
    if not parts.hostname and not parts.path.strip("/"):
        raise ImproperlyConfigured(
            f"{name} names no host; expected e.g. {schemes[0]}://127.0.0.1/..."
        )
    return value


def env_json_object(name: str, environ: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """Return a JSON object variable, or None when unset."""
    value = _raw(environ, name)
    if not value:
        return None
    try:
        data = json.loads(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ImproperlyConfigured(f"{name} must be a JSON object, got {type(data).__name__}.")
    return data


def env_list(name: str, default: list[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """Return a comma-separated list variable."""
    value = _raw(environ, name)
    if value is None or value == "":
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def env_regex_list(
    name: str, default: list[str], environ: Mapping[str, str] = os.environ
) -> list[str]:
    """Return a JSON list of regular expressions, each checked to compile."""
    value = _raw(environ, name)
    if value is None or value == "":
        return list(default)
    try:
        data = json.loads(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} is not valid JSON ({exc}).") from None
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise ImproperlyConfigured(
            f'{name} must be a JSON list of regular expressions, e.g. ["token=(\\\\S+)"].'
        )
    for pattern in data:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ImproperlyConfigured(
                f"{name}: {pattern!r} is not a valid regular expression ({exc})."
            ) from None
    return data

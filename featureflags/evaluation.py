"""Evaluate feature flags without a request (consumers, services, commands).

``flag_is_active_for(user, name)`` answers as ``waffle.flag_is_active(request, name)`` would
for that user's requests: rollback first (off, whatever else), then waffle's everyone, the
user/group/superuser/staff/authenticated overrides, then the deterministic percentage. Flags
are read through waffle's cache (shared Redis in production). When the cache or the database
cannot answer, the last value this process saw is used, else off: a flag never raises.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from django.conf import settings
from waffle import get_waffle_flag_model

from featureflags.models import in_percent

logger = logging.getLogger(__name__)

STORAGE_FLAG = "storage_hybrid"

_last_known: dict[str, Any] = {}
_lock = threading.Lock()


def load_flag(name: str) -> Any | None:
    """Return flag ``name`` (through waffle's cache), or the last one seen when unreadable."""
    try:
        flag = get_waffle_flag_model().get(name)
    except Exception as exc:  # cache or database down: never fail a caller over a flag
        with _lock:
            known = _last_known.get(name)
        logger.warning(
            "flag %s unreadable (%s: %s); using %s",
            name,
            type(exc).__name__,
            exc,
            "its last known value" if known is not None else "off",
        )
        return known
    if flag.pk is None:
        return None
    with _lock:
        _last_known[name] = flag
    return flag


def forget(name: str) -> None:
    """Drop this process's cached copies of flag ``name`` (waffle's cache entries)."""
    try:
        get_waffle_flag_model()(name=name).flush()
    except Exception:
        logger.warning("could not clear the cached flag %s", name, exc_info=True)


def _user_and_id(user: Any) -> tuple[Any | None, int | None]:
    if user is None:
        return None, None
    if isinstance(user, int):
        return None, user
    return (user, user.pk) if getattr(user, "is_authenticated", False) else (None, None)


def flag_is_active_for(user: Any, name: str) -> bool:
    """Return whether flag ``name`` is on for ``user`` (a user, a user id, or None)."""
    flag = load_flag(name)
    if flag is None or flag.rolled_back:
        return False
    if flag.everyone is not None:
        return bool(flag.everyone)
    user_obj, user_id = _user_and_id(user)
    if user_id is None:
        return False
    try:
        if user_obj is None and (
            user_id in flag._get_user_ids()  # waffle's cached override lists
            or flag._get_group_ids()
            or flag.staff
            or flag.superusers
            or flag.authenticated
        ):
            from django.contrib.auth import get_user_model

            user_obj = get_user_model().objects.filter(pk=user_id).first()
        if user_obj is not None and flag.is_active_for_user(user_obj):
            return True
    except Exception:
        logger.warning("flag %s: user overrides unreadable; ignoring them", name, exc_info=True)
    return in_percent(flag.salt, user_id, flag.percent)


def storage_mode_for(user: Any) -> str:
    """Return the storage mode for a user: the stable mode unless storage_hybrid picks them."""
    stable = settings.TERMSYS_STORAGE_MODE
    if settings.TERMSYS_EMERGENCY_ROLLBACK:
        return stable
    if flag_is_active_for(user, STORAGE_FLAG):
        return "HYBRID"
    return stable

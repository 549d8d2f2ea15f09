"""Evaluate feature flags for a user without a request (consumers, services, commands).

Percentages are deterministic per user: bucket = hash(flag name, user id) over 10,000 buckets,
so a user gets the same answer on every device and in every process, and raising a percentage
only ever adds users.
"""

from __future__ import annotations

import hashlib
import logging

from django.conf import settings
from django.db import DatabaseError
from waffle import get_waffle_flag_model

logger = logging.getLogger(__name__)

BUCKETS = 10_000
STORAGE_FLAG = "storage_hybrid"


def bucket(salt: str, user_id: int) -> int:
    """Return the user's bucket (0-9999) for a flag salt."""
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def flag_is_active_for(user_id: int | None, name: str) -> bool:
    """Return whether flag ``name`` is on for the user; off when unknown or unreadable."""
    try:
        flag = get_waffle_flag_model().get(name)
    except DatabaseError:
        logger.warning("flag %s unreadable (database unavailable); treating it as off", name)
        return False
    if flag.pk is None or flag.everyone is False:
        return False
    if flag.everyone:
        return True
    if user_id is None or not flag.percent:
        return False
    return bucket(flag.name, user_id) < int(float(flag.percent) * BUCKETS / 100)


def storage_mode_for(user_id: int | None) -> str:
    """Return the storage mode for a user: the stable mode unless storage_hybrid picks them."""
    stable = settings.TERMSYS_STORAGE_MODE
    if settings.TERMSYS_EMERGENCY_ROLLBACK:
        return stable
    if flag_is_active_for(user_id, STORAGE_FLAG):
        return "HYBRID"
    return stable

"""termsys's waffle flag (``WAFFLE_FLAG_MODEL``) and the audit trail of every flag change.

The flag keeps everything of waffle's (everyone, users, groups, superusers, staff,
authenticated, testing, languages) but decides percentages by a hash of (salt, user id) over
10,000 buckets instead of a random number kept in a cookie: the same user gets the same answer
on every device and in every process, raising the percentage only adds users, and 0.01 %
steps up to 100 % work. A rolled-back flag is off for everyone, whatever else it says.
"""

from __future__ import annotations

import hashlib
import secrets
from decimal import Decimal
from typing import Any

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.http import HttpRequest
from waffle.models import AbstractUserFlag

BUCKETS = 10_000
ANONYMOUS_COOKIE = "termsys_visitor"


def new_salt() -> str:
    return secrets.token_hex(8)


def bucket(salt: str, subject: str | int) -> int:
    """Return the bucket (0-9999) of a user id (or an anonymous visitor id) for a flag salt."""
    digest = hashlib.sha256(f"{salt}:{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def in_percent(salt: str, subject: str | int, percent: Decimal | float | None) -> bool:
    """Return whether ``subject`` falls inside the first ``percent`` % of the buckets."""
    if not percent or percent <= 0:
        return False
    return bucket(salt, subject) < int(Decimal(str(percent)) * BUCKETS / 100)


class Flag(AbstractUserFlag):
    percent = models.DecimalField(
        max_digits=5,
        decimal_places=2,
        null=True,
        blank=True,
        validators=[MinValueValidator(Decimal("0")), MaxValueValidator(Decimal("100"))],
        help_text=(
            "0.00-100.00: the share of users (by a stable hash of their id) for whom the flag "
            "is on. Raising it only adds users."
        ),
    )
    salt = models.CharField(
        max_length=32,
        default=new_salt,
        help_text="Mixed into each user's bucket, so two flags pick independent groups.",
    )
    rolled_back = models.BooleanField(
        default=False,
        help_text="Rolled back: off for everyone, overriding every other setting, until it is "
        "rolled out or enabled again.",
    )
    rolled_back_at = models.DateTimeField(null=True, blank=True)
    ramp = models.JSONField(
        default=dict,
        blank=True,
        help_text='A ramp plan, e.g. {"steps": [5, 25, 50, 100], "holdSeconds": 3600, '
        '"minExposed": 100}.',
    )
    ramp_step = models.IntegerField(
        null=True, blank=True, help_text="Index of the ramp step in effect."
    )
    ramp_step_at = models.DateTimeField(null=True, blank=True)

    class Meta(AbstractUserFlag.Meta):
        verbose_name = "flag"
        verbose_name_plural = "flags"

    @classmethod
    def get(cls, name: str) -> Flag:
        """Return the flag through waffle's cache, after noticing changes made by other
        processes (at most once a second; see ``featureflags.marker``)."""
        from featureflags import marker

        marker.notice_changes(name)
        return super().get(name)

    def is_active(self, request: HttpRequest, read_only: bool = False) -> bool | None:
        if self.pk and self.rolled_back:
            return False
        return super().is_active(request, read_only)

    def _is_active_for_percent(self, request: HttpRequest, read_only: bool) -> bool | None:
        """Bucket by user id when logged in, else by the visitor cookie (see middleware)."""
        if not self.percent or self.percent <= 0:
            return None
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            return in_percent(self.salt, user.pk, self.percent)
        visitor = getattr(request, "termsys_visitor", None) or request.COOKIES.get(ANONYMOUS_COOKIE)
        return in_percent(self.salt, f"anon:{visitor}", self.percent) if visitor else False

    def state(self) -> dict[str, Any]:
        """The flag's settings as plain data, for the audit trail and export."""
        return {
            "everyone": self.everyone,
            "percent": None if self.percent is None else str(self.percent),
            "testing": self.testing,
            "superusers": self.superusers,
            "staff": self.staff,
            "authenticated": self.authenticated,
            "languages": self.languages,
            "note": self.note,
            "rolledBack": self.rolled_back,
            "ramp": self.ramp,
            "rampStep": self.ramp_step,
        }


SOURCES = ("admin", "command", "api", "safeguard", "schedule", "emergency", "migration")


class AppendOnly(models.Model):
    """A row written once: saving it again or deleting it raises."""

    class Meta:
        abstract = True

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise PermissionError(f"{type(self).__name__} rows are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(f"{type(self).__name__} rows are append-only")


class FlagChange(AppendOnly):
    """One change to a flag, from any path: who, when, why, before -> after."""

    flag = models.CharField(max_length=100, db_index=True)
    at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.CharField(max_length=150, help_text="User name, or the command/task.")
    source = models.CharField(max_length=16, choices=[(s, s) for s in SOURCES])
    reason = models.TextField(blank=True)
    before = models.JSONField(default=dict)
    after = models.JSONField(default=dict)

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.flag} by {self.actor} at {self.at:%Y-%m-%d %H:%M:%S}"


class RollbackEvent(AppendOnly):
    """A rollback: the flag went off for everyone. Who or what did it, when, why, and what it
    was before."""

    flag = models.CharField(max_length=100, db_index=True)
    at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.CharField(max_length=150)
    source = models.CharField(max_length=16, choices=[(s, s) for s in SOURCES])
    automatic = models.BooleanField(default=False, help_text="Done by the safeguard.")
    reason = models.TextField()
    before = models.JSONField(default=dict)

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"rollback of {self.flag} at {self.at:%Y-%m-%d %H:%M:%S}"


class FlagsVersion(models.Model):
    """One row whose number changes (to a random one) after every committed flag change
    (``featureflags.marker``): a process that caches flags in its own memory reads it to notice
    changes made elsewhere."""

    version = models.BigIntegerField(default=0)

    class Meta:
        verbose_name = "flags version"

    def __str__(self) -> str:
        return f"flags version {self.version}"

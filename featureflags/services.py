"""Every change to a flag goes through here: admin, ``manage.py flags``, the API, the
safeguard, the ramp schedule and ``TERMSYS_EMERGENCY_ROLLBACK`` alike.

Each change is one transaction that locks the flag's row, writes an append-only
``FlagChange`` (who, when, why, before -> after) and, for a rollback, a ``RollbackEvent``.
Once committed, waffle's cache entries of the flag are deleted (every process reads the new
state from the shared cache or the database), every server process is told at once over the
channel layer (``featureflags.broadcast``), so live sessions re-evaluate within a second, and
the change marker moves (``featureflags.marker``): without Redis the cache and the channel
layer are each process's own, and the other processes notice the change there instead.
"""

from __future__ import annotations

import itertools
import logging
from decimal import Decimal, InvalidOperation
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import models, transaction
from django.utils import timezone

from featureflags import broadcast, marker
from featureflags.models import SOURCES, Flag, FlagChange, RollbackEvent
from featureflags.selectors import flag_members

logger = logging.getLogger(__name__)

# The product's flags (also created, off, by migration 0003).
PRODUCT_FLAGS = {
    "storage_hybrid": "Moves a percentage of users to HYBRID storage (memory first, write-behind).",
    "dynamic_titles": "Tab titles follow the running command or the working directory.",
    "activity_tracking": "Records command events (command line, cwd, exit code, duration).",
    "session_search": "Shows the session search panel and enables the search API.",
}
BOOL_FIELDS = ("testing", "superusers", "staff", "authenticated")
TEXT_FIELDS = ("note", "languages")
# A flag's settings an operator sets (admin form, import); ramp fields come with a ramp.
SETTING_FIELDS = ("everyone", "percent", *BOOL_FIELDS, *TEXT_FIELDS)
RAMP_FIELDS = ("ramp", "ramp_step")
# Who the flag names besides its other settings, by user name and group name.
MEMBER_FIELDS = ("users", "groups")
# Everything flag_update (and flag_create) may set.
EDITABLE_FIELDS = (*SETTING_FIELDS, *RAMP_FIELDS, *MEMBER_FIELDS)
RAMP_KEYS = ("steps", "holdSeconds", "minExposed")


MSG_NO_PLAN = (
    'flag {name} has no ramp plan; set its ramp to a plan like {{"steps": [5, 25, 50, 100]}}'
)
MSG_LAST_STEP = "flag {name} is already at the last step of its ramp ({percent} %)"
MSG_RAMP_ROLLED_BACK = (
    "flag {name} is rolled back; set a rollout percentage to resume it before advancing its ramp"
)
MSG_BAD_RAMP = (
    'ramp must be {{}} (no plan) or an object like {{"steps": [5, 25, 50, 100], '
    '"holdSeconds": 3600, "minExposed": 100}}: {problem}'
)
MSG_BAD_RAMP_STEP = "ramp_step must be unset or a step of the ramp plan, 0 to {last}; got {step!r}"
MSG_NO_RAMP_STEP = "ramp_step must be unset while the flag has no ramp plan; got {step!r}"
MSG_FLAG_EXISTS = "a flag named {name!r} exists already"
MSG_BAD_NAME = "a flag name is 1-100 characters without spaces; got {name!r}"
MSG_PRODUCT_FLAG = (
    "flag {name} cannot be deleted: it is one of the product's flags and the code asks for it "
    "by name; disable it or roll it back to turn it off for everyone"
)


class FlagError(ValueError):
    """A flag change that cannot be made; the message says why."""


def reason_required() -> bool:
    return settings.TERMSYS_FLAG_REASON_REQUIRED


def parse_percent(value: Any) -> Decimal:
    """Return ``value`` as a percentage 0-100 in steps of 0.01, or raise FlagError."""
    try:
        percent = Decimal(str(value).strip().rstrip("%"))
    except (InvalidOperation, ValueError):
        raise FlagError(f"percent must be a number from 0 to 100, got {value!r}") from None
    if not percent.is_finite() or not Decimal(0) <= percent <= Decimal(100):
        raise FlagError(f"percent must be from 0 to 100, got {value!r}")
    if percent != percent.quantize(Decimal("0.01")):
        raise FlagError(f"percent has steps of 0.01, got {value!r}")
    return percent.quantize(Decimal("0.01"))


def _check(actor: str, source: str, reason: str) -> str:
    if source not in SOURCES:
        raise FlagError(f"unknown source {source!r}; one of {', '.join(SOURCES)}")
    if not actor:
        raise FlagError("who made the change (actor) is required")
    reason = (reason or "").strip()
    if not reason and reason_required():
        raise FlagError("a reason is required for every flag change (TERMSYS_FLAG_REASON_REQUIRED)")
    return reason


def _locked(name: str) -> Flag:
    try:
        return Flag.objects.select_for_update().get(name=name)
    except Flag.DoesNotExist:
        known = ", ".join(Flag.objects.order_by("name").values_list("name", flat=True))
        raise FlagError(f"no flag {name!r}; flags: {known or 'none'}") from None


def _committed(flag: Flag) -> None:
    """After commit: drop waffle's cached copies, tell every process over the channel layer,
    and move the change marker that processes without a shared cache watch."""
    name = flag.name

    def after() -> None:
        try:
            flag.flush()
        except Exception:
            logger.warning("could not clear the cached flag %s", name, exc_info=True)
        broadcast.flag_changed(name)
        marker.version_bump(name)

    transaction.on_commit(after)


def ramp_check(ramp: Any, step: Any) -> None:
    """Raise FlagError unless ``ramp`` is a valid plan (or ``{}``) and ``step`` one of its steps
    (or None)."""
    if not isinstance(ramp, dict):
        raise FlagError(MSG_BAD_RAMP.format(problem=f"got {ramp!r}"))
    if not ramp:
        if step is not None:
            raise FlagError(MSG_NO_RAMP_STEP.format(step=step))
        return
    unknown = sorted(set(ramp) - set(RAMP_KEYS))
    if unknown:
        problem = f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(RAMP_KEYS)}"
        raise FlagError(MSG_BAD_RAMP.format(problem=problem))
    steps = ramp.get("steps")
    if not isinstance(steps, list) or not steps:
        raise FlagError(
            MSG_BAD_RAMP.format(problem=f"steps must be a list of percentages, got {steps!r}")
        )
    percents = []
    for value in steps:
        if isinstance(value, bool):
            raise FlagError(MSG_BAD_RAMP.format(problem=f"step {value!r} is not a percentage"))
        try:
            percents.append(parse_percent(value))
        except FlagError as exc:
            raise FlagError(MSG_BAD_RAMP.format(problem=f"step {exc}")) from None
    if any(b <= a for a, b in itertools.pairwise(percents)):
        raise FlagError(MSG_BAD_RAMP.format(problem=f"steps must rise, got {steps!r}"))
    for key in ("holdSeconds", "minExposed"):
        value = ramp.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            problem = f"{key} must be a number of 0 or more, got {value!r}"
            raise FlagError(MSG_BAD_RAMP.format(problem=problem))
    if step is not None and (
        isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < len(steps)
    ):
        raise FlagError(MSG_BAD_RAMP_STEP.format(last=len(steps) - 1, step=step))


def members_named(label: str, names: Any) -> list[Any]:
    """Return the users (``label`` "user", by user name) or groups ("group", by name) named, or
    raise FlagError naming the missing ones."""
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise FlagError(f"must be a list of {label} names, got {names!r}")
    model: type[models.Model] = get_user_model() if label == "user" else Group
    key = model.USERNAME_FIELD if label == "user" else "name"  # type: ignore[attr-defined]
    found = list(model.objects.filter(**{f"{key}__in": list(names)}))
    missing = sorted(set(names) - {getattr(obj, key) for obj in found})
    if missing:
        raise FlagError(f"no {label} {', '.join(map(repr, missing))}")
    return found


def _audited(flag: Flag, members: bool) -> dict[str, Any]:
    """The flag's state for the audit trail, with its users and groups when they change."""
    return {**flag.state(), **flag_members(flag)} if members else flag.state()


def _apply(flag: Flag, changes: dict[str, Any]) -> None:
    """Set the given fields of ``flag`` (not saved), or raise FlagError naming the bad value."""
    unknown = set(changes) - set(EDITABLE_FIELDS)
    if unknown:
        raise FlagError(
            f"unknown flag field(s): {', '.join(sorted(unknown))}; "
            f"fields: {', '.join(EDITABLE_FIELDS)}"
        )
    for field, value in changes.items():
        if field in MEMBER_FIELDS:
            continue  # set after the flag is saved (flag_members_set)
        if field == "everyone" and value not in (True, False, None):
            raise FlagError(f"everyone must be true, false or unset, got {value!r}")
        if field in BOOL_FIELDS and not isinstance(value, bool):
            raise FlagError(f"{field} must be true or false, got {value!r}")
        if field in TEXT_FIELDS and not isinstance(value, str):
            raise FlagError(f"{field} must be text, got {value!r}")
        if field == "percent" and value is not None:
            setattr(flag, field, parse_percent(value))
        else:
            setattr(flag, field, value)
    if {"ramp", "ramp_step"} & set(changes):
        ramp_check(flag.ramp, flag.ramp_step)


def _members_set(flag: Flag, changes: dict[str, Any]) -> None:
    if "users" in changes:
        flag.users.set(members_named("user", changes["users"]))
    if "groups" in changes:
        flag.groups.set(members_named("group", changes["groups"]))


def flag_update(name: str, *, actor: str, source: str, reason: str = "", **changes: Any) -> Flag:
    """Change only the given fields of flag ``name``; record who, when, why, before -> after.

    Fields: ``everyone`` (True, False or None), ``percent`` (0-100), ``testing``,
    ``superusers``, ``staff``, ``authenticated``, ``note``, ``languages``, ``ramp``,
    ``ramp_step``, ``users`` (user names) and ``groups`` (group names). Turning a rolled-back
    flag on again (everyone=True or a percentage above 0) ends the rollback; any other change
    leaves a rolled-back flag off.
    """
    reason = _check(actor, source, reason)
    members = bool(set(MEMBER_FIELDS) & set(changes))
    with transaction.atomic():
        flag = _locked(name)
        before = _audited(flag, members)
        _apply(flag, changes)
        # Only turning the flag on ends a rollback; editing anything else leaves it off.
        turned_on = changes.get("everyone") is True or (
            "percent" in changes and (flag.percent or 0) > 0
        )
        if flag.rolled_back and turned_on:
            flag.rolled_back = False
        flag.modified = timezone.now()
        if set(RAMP_FIELDS) & set(changes):
            flag.ramp_step_at = flag.modified
        flag.save()
        _members_set(flag, changes)
        after = _audited(flag, members)
        if after != before:
            FlagChange.objects.create(
                flag=name, actor=actor, source=source, reason=reason, before=before, after=after
            )
        _committed(flag)
    logger.info("flag %s changed by %s (%s): %s", name, actor, source, reason or "-")
    return flag


def flag_create(name: str, *, actor: str, source: str, reason: str = "", **settings_: Any) -> Flag:
    """Create flag ``name`` with the given fields (as ``flag_update`` takes them; the rest keep
    their defaults: off for everyone) and record it: before ``{}``, after its settings."""
    reason = _check(actor, source, reason)
    if not isinstance(name, str) or not 0 < len(name) <= 100 or name != "".join(name.split()):
        raise FlagError(MSG_BAD_NAME.format(name=name))
    with transaction.atomic():
        if Flag.objects.filter(name=name).exists():
            raise FlagError(MSG_FLAG_EXISTS.format(name=name))
        flag = Flag(name=name)
        _apply(flag, settings_)
        if flag.ramp_step is not None:
            flag.ramp_step_at = timezone.now()
        flag.save()
        _members_set(flag, settings_)
        FlagChange.objects.create(
            flag=name,
            actor=actor,
            source=source,
            reason=reason,
            before={},
            after=_audited(flag, members=True),
        )
        _committed(flag)
    logger.info("flag %s created by %s (%s): %s", name, actor, source, reason or "-")
    return flag


def flag_delete(name: str, *, actor: str, source: str, reason: str = "") -> None:
    """Delete flag ``name`` and record it (before: its settings, after ``{}``); the product's
    flags, which the code asks for by name, are refused."""
    if name in PRODUCT_FLAGS:
        raise FlagError(MSG_PRODUCT_FLAG.format(name=name))
    reason = _check(actor, source, reason)
    with transaction.atomic():
        flag = _locked(name)
        before = _audited(flag, members=True)
        flag.delete()
        FlagChange.objects.create(
            flag=name, actor=actor, source=source, reason=reason, before=before, after={}
        )
        _committed(flag)
    logger.warning("flag %s DELETED by %s (%s): %s", name, actor, source, reason or "-")


def flag_rollout(name: str, percent: Any, *, actor: str, source: str, reason: str = "") -> Flag:
    """Turn the flag on for ``percent`` % of users (everyone unset), ending any rollback."""
    return flag_update(
        name, actor=actor, source=source, reason=reason, everyone=None, percent=percent
    )


def flag_enable(name: str, *, actor: str, source: str, reason: str = "") -> Flag:
    return flag_update(name, actor=actor, source=source, reason=reason, everyone=True)


def flag_disable(name: str, *, actor: str, source: str, reason: str = "") -> Flag:
    return flag_update(name, actor=actor, source=source, reason=reason, everyone=False)


def ramp_next_step(flag: Flag) -> tuple[int, Decimal]:
    """Return the index and percentage of the next step of the flag's ramp plan, or raise
    FlagError when it has no plan, is at its last step, or is rolled back."""
    steps = flag.ramp.get("steps") if isinstance(flag.ramp, dict) else None
    if not isinstance(steps, list) or not steps:
        raise FlagError(MSG_NO_PLAN.format(name=flag.name))
    if flag.rolled_back:
        raise FlagError(MSG_RAMP_ROLLED_BACK.format(name=flag.name))
    step = 0 if flag.ramp_step is None else flag.ramp_step + 1
    if step >= len(steps):
        raise FlagError(MSG_LAST_STEP.format(name=flag.name, percent=steps[-1]))
    return step, parse_percent(steps[step])


def flag_ramp_advance(name: str, *, actor: str, source: str, reason: str = "") -> Flag:
    """Move the flag to the next step of its ramp plan (the admin action and the schedule)."""
    with transaction.atomic():
        step, percent = ramp_next_step(_locked(name))
        return flag_update(
            name,
            actor=actor,
            source=source,
            reason=reason,
            everyone=None,
            percent=percent,
            ramp_step=step,
        )


def flag_rollback(
    name: str, *, actor: str, reason: str, source: str = "admin", automatic: bool = False
) -> RollbackEvent:
    """Turn the flag off for everyone, overriding every other setting, and record it.

    The one rollback path for the admin action, ``manage.py flags rollback``, the safeguard and
    ``TERMSYS_EMERGENCY_ROLLBACK``. A reason is always required.
    """
    if not (reason or "").strip():
        raise FlagError("a rollback needs a reason")
    reason = _check(actor, source, reason)
    with transaction.atomic():
        flag = _locked(name)
        before = flag.state()
        flag.rolled_back = True
        flag.rolled_back_at = timezone.now()
        flag.modified = flag.rolled_back_at
        flag.save()
        event = RollbackEvent.objects.create(
            flag=name,
            actor=actor,
            source=source,
            automatic=automatic,
            reason=reason,
            before=before,
        )
        FlagChange.objects.create(
            flag=name,
            actor=actor,
            source=source,
            reason=reason,
            before=before,
            after=flag.state(),
        )
        _committed(flag)
    logger.warning("flag %s ROLLED BACK by %s (%s): %s", name, actor, source, reason)
    return event


def emergency_rollback() -> RollbackEvent | None:
    """With ``TERMSYS_EMERGENCY_ROLLBACK=1``, roll ``storage_hybrid`` back once (at server start),
    through the same path as every rollback. Never raises: the variable itself already puts
    every user on the stable mode."""
    from featureflags.evaluation import STORAGE_FLAG

    if not settings.TERMSYS_EMERGENCY_ROLLBACK:
        return None
    try:
        if Flag.objects.filter(name=STORAGE_FLAG, rolled_back=True).exists():
            return None
        return flag_rollback(
            STORAGE_FLAG,
            actor="TERMSYS_EMERGENCY_ROLLBACK",
            source="emergency",
            reason="TERMSYS_EMERGENCY_ROLLBACK=1 is set in the server's environment",
        )
    except Exception:
        logger.exception("emergency rollback of %s could not be recorded", STORAGE_FLAG)
        return None


def ensure_product_flags() -> list[str]:
    """Create any of the product's flags that is missing (off); return the names created."""
    created = []
    for name, note in PRODUCT_FLAGS.items():
        _, new = Flag.objects.get_or_create(
            name=name, defaults={"everyone": False, "note": note, "superusers": False}
        )
        if new:
            created.append(name)
    return created


MSG_LOCAL_CACHE = (
    "flags: no REDIS_URL, so flags are cached in this process's memory and the channel layer "
    "reaches only this process; a change made elsewhere (manage.py flags, another server "
    "process) reaches this one within about a second through the database's change marker."
)
MSG_FIGURES_PER_PROCESS = (
    "SAFEGUARD FIGURES ARE PER PROCESS: the database is shared (PostgreSQL) but there is no "
    "REDIS_URL, so with more than one server process each one's safeguard judges only its own "
    "traffic and WebSocket rate limits count per process. Flag changes and rollbacks still reach "
    "every process within about a second (through the database). Set REDIS_URL to share them."
)


def warn_if_cache_is_per_process() -> bool:
    """Say at start-up what a cache of the process's own means; warn loudly when several server
    processes are likely (a shared PostgreSQL database). Return whether it warned."""
    from django.db import connection

    if not settings.CACHES["default"]["BACKEND"].endswith("LocMemCache"):
        return False
    logger.info(MSG_LOCAL_CACHE)
    if connection.vendor == "postgresql":
        logger.warning(MSG_FIGURES_PER_PROCESS)
        return True
    return False

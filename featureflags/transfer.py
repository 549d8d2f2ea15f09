"""Export every flag to a versioned JSON document, and import one back: validate, diff, apply.

The document (``FORMAT``, ``VERSION`` 1)::

    {"format": "termsys-flags", "version": 1, "exportedAt": "2025-06-01T12:00:00+00:00",
     "flags": {"storage_hybrid": {"everyone": null, "percent": "5.00", "testing": false,
               "superusers": false, "staff": false, "authenticated": false, "languages": "",
               "note": "...", "rolledBack": false, "ramp": {}, "users": ["ana"],
               "groups": ["beta"]}}}

An import changes only what differs from the current flags: flags missing from the document,
and fields missing from a flag's entry, are left alone; flags the database does not know are
reported and skipped (flags are created by migrations, not by imports). A document is checked
completely before anything is changed, and applied in one transaction through
``featureflags.services`` (``flag_update``, ``flag_rollback``): all of it or nothing, every
change audited.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.utils import timezone

from featureflags import services
from featureflags.models import Flag
from featureflags.selectors import flag_members
from featureflags.services import FlagError

FORMAT = "termsys-flags"
VERSION = 1
DOCUMENT_KEYS = ("format", "version", "exportedAt", "flags")
# Field of the document -> keyword of services.flag_update.
UPDATE_FIELDS = (*services.SETTING_FIELDS, "ramp")  # file keys that are flag fields
FIELDS = (
    "everyone",
    "percent",
    "testing",
    "superusers",
    "staff",
    "authenticated",
    "languages",
    "note",
    "rolledBack",
    "ramp",
    "users",
    "groups",
)

NOT_JSON = "not valid JSON: {error}"
TOO_DEEP = "not a termsys flags export: nested too deeply to read"
NOT_UNICODE = (
    "{where} holds text that is not valid Unicode (an unpaired surrogate, \\u{code:04x}); "
    "a flags export never does"
)
NOT_A_DOCUMENT = 'not a termsys flags export: expected an object with "format": "termsys-flags"'
WRONG_FORMAT = 'format {found!r} is not a termsys flags export (expected "termsys-flags")'
BAD_VERSION = "version must be an integer, got {found!r}"
UNSUPPORTED_VERSION = (
    "version {found} of the termsys-flags format is not supported: this termsys reads version "
    "{supported} only; export the flags again with this termsys, or upgrade it"
)
UNKNOWN_KEYS = "unknown field(s) {keys}; allowed: {allowed}"
BAD_FIELD = "flag {flag!r}, field {field!r}: {problem}"
NOT_AN_OBJECT = "flag {flag!r}: expected an object of fields, got {found}"
CANNOT_END_ROLLBACK = (
    "false cannot be imported: the flag is rolled back, and a rollback ends only when the flag "
    "is turned on (everyone true, or a percent above 0); set one of those, or rolledBack true"
)


class TransferError(FlagError):
    """A document that cannot be imported; ``problems`` lists every reason found."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class FieldChange:
    field: str
    before: Any
    after: Any


@dataclass(frozen=True)
class FlagPlan:
    """What an import does to one flag: the visible changes and the service calls behind them."""

    name: str
    changes: tuple[FieldChange, ...]
    update: dict[str, Any]
    users: tuple[str, ...] | None
    groups: tuple[str, ...] | None
    rollback: bool


@dataclass(frozen=True)
class ImportPlan:
    flags: tuple[FlagPlan, ...]
    unknown: tuple[str, ...]
    known: tuple[str, ...]

    @property
    def changed(self) -> tuple[FlagPlan, ...]:
        return tuple(p for p in self.flags if p.changes)


# --- export -------------------------------------------------------------------------------


def flag_export(flag: Flag) -> dict[str, Any]:
    """Return one flag as the document holds it."""
    exported = {**flag.state(), **flag_members(flag)}
    return {field: exported[field] for field in FIELDS}


def flags_export() -> dict[str, Any]:
    """Return every flag as a versioned document (see the module docstring)."""
    flags = Flag.objects.order_by("name").prefetch_related("users", "groups")
    return {
        "format": FORMAT,
        "version": VERSION,
        "exportedAt": timezone.now().isoformat(),
        "flags": {flag.name: flag_export(flag) for flag in flags},
    }


# --- import: parse and check --------------------------------------------------------------


def flags_document_parse(text: str) -> dict[str, dict[str, Any]]:
    """Return the flags of an exported document, or raise TransferError saying what is wrong."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TransferError([NOT_JSON.format(error=exc)]) from None
    except RecursionError:
        raise TransferError([TOO_DEEP]) from None
    unpaired = _unpaired_surrogate(document)
    if unpaired is not None:
        raise TransferError([NOT_UNICODE.format(where=unpaired[0], code=unpaired[1])])
    if not isinstance(document, dict) or "format" not in document:
        raise TransferError([NOT_A_DOCUMENT])
    if document["format"] != FORMAT:
        raise TransferError([WRONG_FORMAT.format(found=document["format"])])
    version = document.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise TransferError([BAD_VERSION.format(found=version)])
    if version != VERSION:
        raise TransferError([UNSUPPORTED_VERSION.format(found=version, supported=VERSION)])
    problems = []
    unknown = sorted(set(document) - set(DOCUMENT_KEYS))
    if unknown:
        problems.append(
            UNKNOWN_KEYS.format(keys=", ".join(unknown), allowed=", ".join(DOCUMENT_KEYS))
        )
    flags = document.get("flags")
    if not isinstance(flags, dict):
        raise TransferError([*problems, '"flags" must be an object of flag name -> fields'])
    for name, entry in flags.items():
        if not isinstance(entry, dict):
            problems.append(NOT_AN_OBJECT.format(flag=name, found=type(entry).__name__))
    if problems:
        raise TransferError(problems)
    return flags


def _unpaired_surrogate(document: Any) -> tuple[str, int] | None:
    """Return where the first string with an unpaired surrogate is (JSON's "\\ud800" decodes
    to one; no database stores it) and its code point, or None."""
    stack: list[tuple[str, Any]] = [("the file", document)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                stack.append((f"key {key!r}", key))
                stack.append((f"{key!r}", item))
        elif isinstance(value, list):
            stack.extend((where, item) for item in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return where, ord(value[exc.start])
    return None


def _clean(field: str, value: Any) -> Any:
    """Return a field's value in the export's form, or raise FlagError saying what is valid."""
    shown = json.dumps(value)
    if field == "everyone":
        if value is not None and not isinstance(value, bool):
            raise FlagError(f"must be true, false or null, got {shown}")
        return value
    if field == "percent":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise FlagError(f'must be a percentage such as "12.50" (0 to 100) or null, got {shown}')
        return str(services.parse_percent(value))
    if field in ("testing", "superusers", "staff", "authenticated", "rolledBack"):
        if not isinstance(value, bool):
            raise FlagError(f"must be true or false, got {shown}")
        return value
    if field in ("languages", "note"):
        if not isinstance(value, str):
            raise FlagError(f"must be a string, got {shown}")
        return value
    if field == "ramp":
        if not isinstance(value, dict):
            raise FlagError(f"must be an object, got {shown}")
        return value
    services.members_named(field[:-1], value)  # "users" -> "user", "groups" -> "group"
    return sorted(set(value))


def _turns_on(state: dict[str, Any]) -> bool:
    return state["everyone"] is True or Decimal(state["percent"] or "0") > 0


def _flag_plan(flag: Flag, entry: dict[str, Any], problems: list[str]) -> FlagPlan | None:
    before = flag_export(flag)
    extra = sorted(set(entry) - set(FIELDS))
    if extra:
        allowed = ", ".join(FIELDS)
        problems.append(
            f"flag {flag.name!r}: " + UNKNOWN_KEYS.format(keys=", ".join(extra), allowed=allowed)
        )
    wanted = {}
    for field in FIELDS:
        if field not in entry:
            continue
        try:
            wanted[field] = _clean(field, entry[field])
        except FlagError as exc:
            problems.append(BAD_FIELD.format(flag=flag.name, field=field, problem=exc))
    if extra or len(wanted) != len(entry):
        return None
    after = {**before, **wanted}
    update = {f: after[f] for f in UPDATE_FIELDS if f in wanted and after[f] != before[f]}
    # flag_update ends a rollback whenever the flag is on afterwards; a rollback follows it
    # again where the document says the flag stays rolled back.
    ends_rollback = before["rolledBack"] and _turns_on(after) and bool(update)
    if before["rolledBack"] and not after["rolledBack"]:
        if not _turns_on(after):
            problems.append(
                BAD_FIELD.format(flag=flag.name, field="rolledBack", problem=CANNOT_END_ROLLBACK)
            )
            return None
        update.setdefault("everyone", after["everyone"])
        update.setdefault("percent", after["percent"])
    rollback = after["rolledBack"] and (not before["rolledBack"] or ends_rollback)
    changes = tuple(FieldChange(f, before[f], after[f]) for f in FIELDS if before[f] != after[f])
    return FlagPlan(
        name=flag.name,
        changes=changes,
        update=update,
        users=tuple(after["users"]) if after["users"] != before["users"] else None,
        groups=tuple(after["groups"]) if after["groups"] != before["groups"] else None,
        rollback=rollback,
    )


def flags_import_plan(entries: dict[str, dict[str, Any]]) -> ImportPlan:
    """Compare a parsed document with the flags; raise TransferError naming every bad field."""
    flags = {f.name: f for f in Flag.objects.prefetch_related("users", "groups")}
    problems: list[str] = []
    plans = []
    for name, entry in entries.items():
        if name in flags:
            plan = _flag_plan(flags[name], entry, problems)
            if plan is not None:
                plans.append(plan)
    if problems:
        raise TransferError(problems)
    return ImportPlan(
        flags=tuple(sorted(plans, key=lambda p: p.name)),
        unknown=tuple(sorted(set(entries) - set(flags))),
        known=tuple(sorted(flags)),
    )


# --- import: apply ------------------------------------------------------------------------


def flags_import_apply(plan: ImportPlan, *, actor: str, source: str, reason: str = "") -> int:
    """Apply an import plan in one transaction; return the number of flags changed."""
    with transaction.atomic():
        for flag in plan.changed:
            members = {"users": flag.users, "groups": flag.groups}
            update = {**flag.update, **{k: v for k, v in members.items() if v is not None}}
            if update:
                services.flag_update(flag.name, actor=actor, source=source, reason=reason, **update)
            if flag.rollback:
                services.flag_rollback(flag.name, actor=actor, source=source, reason=reason)
    return len(plan.changed)

"""Show, change, export and import feature flags from the command line.

Every change goes through ``featureflags.services`` (or ``featureflags.transfer`` for imports)
with source ``command`` and the OS user running the command as actor, so it is audited like a
change in the admin. Each subcommand changes only what it names: unlike waffle's
``waffle_flag``, ``flags rollout`` leaves note, staff, users and the rest as they are.
"""

from __future__ import annotations

import datetime
import getpass
import json
import os
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from featureflags import services, transfer
from featureflags.models import Flag, FlagChange, RollbackEvent
from featureflags.services import FlagError

SOURCE = "command"
HISTORY_LIMIT = 20
CELL_WIDTH = 40

UNKNOWN_FLAG = "no flag {name!r}; flags: {known}"
UNCHANGED = "{name}: already {state}; nothing changed."
NO_HISTORY = "No flag changes recorded."
REFUSED = "{file}: refused, nothing changed:"
NOT_APPLIED = "{file}: not applied, nothing changed: {error}"
NO_CHANGES = "No changes: the flags already match {file}."
DRY_RUN = "Dry run: nothing changed. Run again with --apply to apply these changes."
APPLIED = "Applied: {count} flag(s) changed, recorded as {actor} (source command)."
SKIPPED = "Skipped, no such flag here: {names} (flags: {known}). Imports do not create flags."


def command_actor() -> str:
    """Return who runs the command, for the audit trail: ``command:<OS user>``.

    Under sudo the invoking user is kept too: ``command:termsys (sudo by ana)``.
    """
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container, say)
        user = f"uid {os.getuid()}"
    actor = f"command:{user}"
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user and sudo_user != user:
        actor += f" (sudo by {sudo_user})"
    return actor[:150]


# --- presentation -------------------------------------------------------------------------


def percent_label(percent: Any) -> str:
    """Return ``5`` for 5.00, ``12.5`` for 12.50, ``0.01`` for 0.01."""
    return f"{percent}".rstrip("0").rstrip(".") if "." in f"{percent}" else f"{percent}"


def overrides(flag: Flag) -> list[str]:
    """Return who else a flag whose *everyone* is unset is on for, besides its percentage."""
    found = [f for f in ("superusers", "staff", "authenticated", "testing") if getattr(flag, f)]
    users, groups = len(flag.users.all()), len(flag.groups.all())
    if users:
        found.append(f"{users} user{'s' if users != 1 else ''}")
    if groups:
        found.append(f"{groups} group{'s' if groups != 1 else ''}")
    if flag.languages:
        found.append(f"languages {flag.languages}")
    return found


def state_label(flag: Flag) -> str:
    """Return ``rolled back``, ``on``, ``off`` or ``N %`` (with the overrides that apply)."""
    if flag.rolled_back:
        return "rolled back"
    if flag.everyone is not None:
        return "on" if flag.everyone else "off"
    base = f"{percent_label(flag.percent)} %" if flag.percent and flag.percent > 0 else "off"
    extra = overrides(flag)
    return f"{base} + {', '.join(extra)}" if extra else base


def ramp_label(ramp: Any, step: int | None) -> str:
    if not ramp:
        return "-"
    steps = ramp.get("steps") if isinstance(ramp, dict) else None
    if not isinstance(steps, list) or not steps:
        return json.dumps(ramp)
    plan = " → ".join(percent_label(s) for s in steps) + " %"
    if step is None or not 0 <= step < len(steps):
        return f"not started ({plan})"
    return f"step {step + 1} of {len(steps)}: {percent_label(steps[step])} % ({plan})"


def when(at: datetime.datetime | None, seconds: bool = False) -> str:
    if at is None:
        return "-"
    return timezone.localtime(at).strftime("%Y-%m-%d %H:%M" + (":%S" if seconds else ""))


def short(text: str, width: int = CELL_WIDTH) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]


def changed_fields(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Return ``field: before → after`` for each field that differs."""
    missing = object()
    lines = []
    for key in dict.fromkeys([*before, *after]):
        old, new = before.get(key, missing), after.get(key, missing)
        if old != new:
            old_text = "-" if old is missing else show(old)
            new_text = "-" if new is missing else show(new)
            lines.append(f"{key}: {old_text} → {new_text}")
    return lines


def json_default(value: Any) -> str:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# --- reads --------------------------------------------------------------------------------


def _audit_row(row: FlagChange | RollbackEvent | None, *extra: str) -> dict[str, Any] | None:
    if row is None:
        return None
    return {field: getattr(row, field) for field in ("at", "actor", "source", *extra, "reason")}


def flag_status(flag: Flag) -> dict[str, Any]:
    """Return one flag's state, last change and last rollback (the rows of ``flags status``)."""
    change = FlagChange.objects.filter(flag=flag.name).first()
    rollback = RollbackEvent.objects.filter(flag=flag.name).first()
    return {
        "name": flag.name,
        "state": state_label(flag),
        "everyone": flag.everyone,
        "percent": None if flag.percent is None else str(flag.percent),
        "rolledBack": flag.rolled_back,
        "rolledBackAt": flag.rolled_back_at,
        "overrides": overrides(flag),
        "lastChange": _audit_row(change),
        "lastRollback": _audit_row(rollback, "automatic"),
        "ramp": flag.ramp,
        "rampStep": flag.ramp_step,
        "rampStepAt": flag.ramp_step_at,
    }


def known_flags() -> str:
    return ", ".join(Flag.objects.order_by("name").values_list("name", flat=True)) or "none"


class Command(BaseCommand):
    help = (
        "Show, change, export and import feature flags. Every change is audited (source "
        "'command', actor 'command:<OS user>') and changes only what it names."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
        status = sub.add_parser("status", help="Each flag's state, last change, last rollback.")
        status.add_argument("--json", action="store_true", dest="as_json", help="Print JSON.")

        rollout = sub.add_parser("rollout", help="Turn a flag on for PERCENT %% of users.")
        rollout.add_argument("name")
        rollout.add_argument("percent", help="0-100 in steps of 0.01, e.g. 5 or 12.5")
        rollout.add_argument("--reason", required=True, help="Why (recorded).")
        for verb, what in (("enable", "on for everyone"), ("disable", "off for everyone")):
            parser_ = sub.add_parser(verb, help=f"Turn a flag {what}.")
            parser_.add_argument("name")
            parser_.add_argument("--reason", default="", help="Why (recorded; may be required).")
        rollback = sub.add_parser("rollback", help="Turn a flag off for everyone, overriding all.")
        rollback.add_argument("name")
        rollback.add_argument("--reason", required=True, help="Why (recorded).")

        history = sub.add_parser("history", help="Flag changes, newest first.")
        history.add_argument("name", nargs="?", help="Only this flag.")
        history.add_argument("--limit", type=int, default=HISTORY_LIMIT, help="Default 20.")

        export = sub.add_parser("export", help="Every flag as versioned JSON.")
        export.add_argument("--output", help="Write to this file instead of stdout.")

        import_ = sub.add_parser("import", help="Show (and with --apply make) an export's changes.")
        import_.add_argument("file")
        import_.add_argument("--apply", action="store_true", help="Make the changes.")
        import_.add_argument("--reason", default="", help="Why (recorded; may be required).")

    def handle(self, *args: Any, subcommand: str, **options: Any) -> None:
        handler = getattr(self, f"handle_{subcommand}")
        try:
            handler(**options)
        except FlagError as exc:
            raise CommandError(str(exc)) from exc

    # --- status and history ---------------------------------------------------------------

    def handle_status(self, *, as_json: bool, **options: Any) -> None:
        flags = Flag.objects.order_by("name").prefetch_related("users", "groups")
        rows = [flag_status(flag) for flag in flags]
        if as_json:
            self.stdout.write(json.dumps({"flags": rows}, indent=2, default=json_default))
            return
        if not rows:
            self.stdout.write("No flags.")
            return
        headers = ["FLAG", "STATE", "PERCENT", "LAST CHANGE", "LAST ROLLBACK"]
        with_ramp = any(row["ramp"] for row in rows)
        cells = []
        for row in rows:
            change, rollback = row["lastChange"], row["lastRollback"]
            cells.append(
                [
                    row["name"],
                    row["state"],
                    row["percent"] or "-",
                    f"{when(change['at'])} {short(change['actor'], 24)}" if change else "-",
                    f"{when(rollback['at'])} {short(rollback['reason'])}" if rollback else "-",
                    *([ramp_label(row["ramp"], row["rampStep"])] if with_ramp else []),
                ]
            )
        lines = table([*headers, *(["RAMP"] if with_ramp else [])], cells)
        self.stdout.write(self.style.MIGRATE_HEADING(lines[0]))
        for line in lines[1:]:
            self.stdout.write(line)

    def handle_history(self, *, name: str | None, limit: int, **options: Any) -> None:
        if limit < 1:
            raise CommandError(f"--limit must be 1 or more, got {limit}")
        changes = FlagChange.objects.all()
        if name is not None:
            if not Flag.objects.filter(name=name).exists():
                raise CommandError(UNKNOWN_FLAG.format(name=name, known=known_flags()))
            changes = changes.filter(flag=name)
        total = changes.count()
        if not total:
            self.stdout.write(NO_HISTORY)
            return
        for change in changes[:limit]:
            was, now = change.before.get("rolledBack"), change.after.get("rolledBack")
            mark = " ROLLBACK" if now and not was else " rollback ended" if was and not now else ""
            head = (
                f"{when(change.at, seconds=True)}  {change.flag}  {change.actor} ({change.source})"
            )
            self.stdout.write(head + (self.style.ERROR(mark) if mark else ""))
            self.stdout.write(f"    reason: {change.reason or '-'}")
            for line in changed_fields(change.before, change.after) or ["no field changed"]:
                self.stdout.write(f"    {line}")
        if total > limit:
            self.stdout.write(f"(newest {limit} of {total}; --limit N shows more)")

    # --- changes --------------------------------------------------------------------------

    def _before(self, name: str) -> tuple[str, dict[str, Any]]:
        flag = Flag.objects.prefetch_related("users", "groups").filter(name=name).first()
        if flag is None:
            raise CommandError(UNKNOWN_FLAG.format(name=name, known=known_flags()))
        return state_label(flag), flag.state()

    def _report(self, name: str, before: tuple[str, dict[str, Any]], flag: Flag) -> None:
        label, state = before
        if flag.state() == state:
            self.stdout.write(self.style.WARNING(UNCHANGED.format(name=name, state=label)))
        else:
            self.stdout.write(self.style.SUCCESS(f"{name}: {label} → {state_label(flag)}"))

    def handle_rollout(self, *, name: str, percent: str, reason: str, **options: Any) -> None:
        before = self._before(name)
        flag = services.flag_rollout(
            name, percent, actor=command_actor(), source=SOURCE, reason=reason
        )
        self._report(name, before, flag)

    def handle_enable(self, *, name: str, reason: str, **options: Any) -> None:
        before = self._before(name)
        flag = services.flag_enable(name, actor=command_actor(), source=SOURCE, reason=reason)
        self._report(name, before, flag)

    def handle_disable(self, *, name: str, reason: str, **options: Any) -> None:
        before = self._before(name)
        flag = services.flag_disable(name, actor=command_actor(), source=SOURCE, reason=reason)
        self._report(name, before, flag)

    def handle_rollback(self, *, name: str, reason: str, **options: Any) -> None:
        before = self._before(name)
        services.flag_rollback(name, actor=command_actor(), source=SOURCE, reason=reason)
        message = f"{name}: {before[0]} → rolled back (off for everyone): {reason}"
        self.stdout.write(self.style.WARNING(message))

    # --- export and import ----------------------------------------------------------------

    def handle_export(self, *, output: str | None, **options: Any) -> None:
        document = transfer.flags_export()
        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
        if output is None:
            self.stdout.write(text, ending="")
            return
        try:
            Path(output).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"cannot write {output}: {exc.strerror or exc}") from exc
        self.stdout.write(f"Exported {len(document['flags'])} flags to {output}.")

    def handle_import(self, *, file: str, apply: bool, reason: str, **options: Any) -> None:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read {file}: {exc}") from exc
        try:
            plan = transfer.flags_import_plan(transfer.flags_document_parse(text))
        except transfer.TransferError as exc:
            lines = [REFUSED.format(file=file), *(f"  - {p}" for p in exc.problems)]
            raise CommandError("\n".join(lines)) from exc
        if plan.unknown:
            skipped = SKIPPED.format(names=", ".join(plan.unknown), known=", ".join(plan.known))
            self.stdout.write(self.style.WARNING(skipped))
        if not plan.changed:
            self.stdout.write(NO_CHANGES.format(file=file))
            return
        for flag in plan.changed:
            self.stdout.write(self.style.MIGRATE_LABEL(f"{flag.name}:"))
            for change in flag.changes:
                self.stdout.write(
                    f"    {change.field}: {show(change.before)} → {show(change.after)}"
                )
        if not apply:
            self.stdout.write(self.style.WARNING(DRY_RUN))
            return
        actor = command_actor()
        try:
            count = transfer.flags_import_apply(plan, actor=actor, source=SOURCE, reason=reason)
        except FlagError as exc:
            raise CommandError(NOT_APPLIED.format(file=file, error=exc)) from exc
        self.stdout.write(self.style.SUCCESS(APPLIED.format(count=count, actor=actor)))

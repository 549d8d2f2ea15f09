"""Reads of the flags' rollout and rollback state, for the admin status page and its JSON twin.

``rollback_status()`` gathers, in one pass: each flag's state and ramp, its latest changes and
rollbacks, the live terminal sessions per storage mode right now, the safeguard's latest
figures (when a safeguard is installed), and whether a rollback has finished taking effect.
A rollback of a flag that moves live sessions between storage modes (``storage_hybrid``) is
complete only once no live session is left in the mode it rolled out.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Count
from django.template.defaultfilters import filesizeformat
from django.utils import timezone
from django.utils.timesince import timesince

from featureflags.evaluation import STORAGE_FLAG
from featureflags.models import Flag, FlagChange, RollbackEvent

logger = logging.getLogger(__name__)

# Flags whose rollout moves live sessions into a storage mode: their rollback is complete
# when no live session is left in that mode.
FLAG_MODES = {STORAGE_FLAG: "HYBRID"}
RECENT = 5
NO_FIGURES = "no figures yet"


@dataclass(frozen=True)
class ChangeRow:
    at: datetime.datetime
    actor: str
    source: str
    reason: str
    changed: dict[str, tuple[Any, Any]]
    ago: str = ""

    @property
    def summary(self) -> str:
        parts = [f"{name} {_show(a)} → {_show(b)}" for name, (a, b) in self.changed.items()]
        return "; ".join(parts) or "no change"


@dataclass(frozen=True)
class RollbackRow:
    at: datetime.datetime
    actor: str
    source: str
    reason: str
    automatic: bool
    ago: str = ""


@dataclass(frozen=True)
class FlagStatus:
    name: str
    note: str
    state: str  # "on", "off", "percent" or "rolled_back"
    label: str  # "on", "off", "12.5 %", "rolled back"
    percent: Decimal | None
    everyone: bool | None
    rolled_back: bool
    rolled_back_at: datetime.datetime | None
    overrides: list[str]
    ramp_steps: list[Any]
    ramp_step: int | None
    ramp_step_at: datetime.datetime | None
    modified: datetime.datetime | None
    changes: list[ChangeRow]
    rollbacks: list[RollbackRow]
    mode: str | None = None  # the storage mode this flag rolls out, if any
    live_in_mode: int | None = None
    rollback_complete: bool | None = None  # None: not a flag whose rollback takes time

    @property
    def ramp_label(self) -> str:
        if not self.ramp_steps:
            return ""
        if self.ramp_step is None:
            return f"not started (of {len(self.ramp_steps)})"
        step = self.ramp_step
        percent = self.ramp_steps[step] if 0 <= step < len(self.ramp_steps) else "?"
        return f"step {step + 1} of {len(self.ramp_steps)} ({percent_text(percent)} %)"


@dataclass(frozen=True)
class FigureRow:
    flag: str  # "" when the figures are not per flag
    cohort: str
    values: list[str]
    check: str = ""  # the flag's last check: "ok" or the breach, and when
    first: bool = True  # the first row of its flag (the page spans the flag's cells)
    span: int = 1


@dataclass(frozen=True)
class Figures:
    columns: list[str]
    rows: list[FigureRow]
    raw: Any

    @property
    def per_flag(self) -> bool:
        return any(row.flag for row in self.rows)


@dataclass(frozen=True)
class RollbackStatus:
    generated_at: datetime.datetime
    stable_mode: str
    emergency_rollback: bool
    live_sessions: dict[str, int]
    flags: list[FlagStatus]
    safeguard: Figures | None = None
    storage: FlagStatus | None = field(default=None)

    @property
    def rollback_complete(self) -> bool | None:
        """Whether ``storage_hybrid`` is rolled back and no live session is left in HYBRID."""
        return self.storage.rollback_complete if self.storage else None

    @property
    def live_total(self) -> int:
        return sum(self.live_sessions.values())


def percent_text(value: Any) -> str:
    """Return 50 for 50.00 and 12.5 for 12.50."""
    try:
        return f"{Decimal(str(value)).normalize():f}"
    except ArithmeticError:
        return str(value)


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if value is True:
        return "on"
    if value is False:
        return "off"
    if value == "":
        return '""'
    return str(value)


def flag_members(flag: Flag) -> dict[str, list[str]]:
    """Return the user names and group names the flag names, sorted (for audit and export)."""
    return {
        "users": sorted(u.get_username() for u in flag.users.all()),
        "groups": sorted(g.name for g in flag.groups.all()),
    }


def state_of(flag: Flag) -> tuple[str, str]:
    """Return the flag's state and its label: rolled back, on, off, or a percentage."""
    if flag.rolled_back:
        return "rolled_back", "rolled back"
    if flag.everyone is True:
        return "on", "on"
    if flag.everyone is None and flag.percent and flag.percent > 0:
        return "percent", f"{percent_text(flag.percent)} %"
    return "off", "off"


def _overrides(flag: Flag, users: int, groups: int) -> list[str]:
    """Who the flag is on for besides its percentage (waffle's overrides)."""
    if flag.everyone is not None or flag.rolled_back:
        return []  # everyone (or the rollback) decides for all
    found = [
        name for name in ("superusers", "staff", "authenticated", "testing") if getattr(flag, name)
    ]
    if users:
        found.append(f"{users} user{'s' if users != 1 else ''}")
    if groups:
        found.append(f"{groups} group{'s' if groups != 1 else ''}")
    return found


def ago(at: datetime.datetime, now: datetime.datetime) -> str:
    """Return "just now" or "3 minutes ago" (one unit)."""
    if (now - at).total_seconds() < 60:
        return "just now"
    return f"{timesince(at, now, depth=1)} ago"


def _changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    keys = list(dict.fromkeys([*before, *after]))
    return {k: (before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)}


def live_sessions_by_mode() -> dict[str, int]:
    """Return the number of live terminal sessions per storage mode (every mode, zeros too)."""
    from sessions_app.models import StorageMode, TerminalSession

    counts = dict.fromkeys(StorageMode.values, 0)
    rows = (
        TerminalSession.objects.live()
        .order_by()
        .values_list("storage_mode")
        .annotate(n=Count("pk"))
    )
    for mode, n in rows:
        counts[mode] = counts.get(mode, 0) + n
    return counts


def safeguard_figures() -> Any | None:
    """Return ``featureflags.safeguard.latest_figures()``, or None while there is no safeguard
    or it has nothing to report yet. Never raises: the status page must load during trouble."""
    try:
        from featureflags import safeguard  # type: ignore[attr-defined]
    except ModuleNotFoundError as exc:
        if exc.name != "featureflags.safeguard":
            logger.warning("the safeguard module cannot be imported", exc_info=True)
        return None
    latest = getattr(safeguard, "latest_figures", None)
    if latest is None:
        return None
    try:
        figures = latest()
    except Exception:
        logger.warning("the safeguard's latest figures are unreadable", exc_info=True)
        return None
    return plain(figures) or None


def plain(value: Any) -> Any:
    """Return ``value`` as JSON-ready data (dataclasses, mappings, decimals, datetimes)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


FIGURE_LABELS = {
    "samples": "samples",
    "errors": "errors",
    "errorRate": "error rate %",
    "errorUsers": "users with errors",
    "p95Ms": "p95 ms",
    "memoryBytes": "memory",
}


def _figure(name: str, value: Any) -> str:
    if value is None:
        return "\N{EN DASH}"
    if name.endswith("Bytes") and isinstance(value, int | float):
        return filesizeformat(value)
    if isinstance(value, float):
        return f"{value:,.2f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _check(entry: Mapping[str, Any]) -> str:
    """Describe a flag's last safeguard check: its breach (and streak) or ok, and when."""
    breach, streak, at = entry.get("breach"), entry.get("streak"), entry.get("checkedAt")
    text = f"{breach} ({streak} check{'s' if streak != 1 else ''})" if breach else "ok"
    if not breach and entry.get("note"):  # over a threshold, but from too few users
        text += f" ({entry['note']})"
    if isinstance(at, int | float):
        at = datetime.datetime.fromtimestamp(at, tz=datetime.UTC)
        text += f", checked {timezone.localtime(at):%H:%M:%S}"
    return text


def figures_table(figures: Any) -> Figures:
    """Lay out the safeguard's figures: one row per (flag,) cohort, one column per figure.

    Takes ``{flag: {cohort: {figure: value}, "breach": ..., "streak": ..., "checkedAt": ...}}``
    (the safeguard's shape) or plain ``{cohort: {figure: value}}``; a list of
    ``{"cohort": ..., figure: value}`` is taken as the latter.
    """
    raw = figures
    if isinstance(figures, list):
        figures = {
            str(e.get("cohort") or e.get("name") or f"#{i + 1}")
            if isinstance(e, Mapping)
            else f"#{i + 1}": e
            for i, e in enumerate(figures)
        }
    if not isinstance(figures, Mapping):
        figures = {"all": figures}
    groups: list[tuple[str, list[tuple[str, Mapping[str, Any]]], str]] = []
    for key, entry in figures.items():
        if isinstance(entry, Mapping) and any(isinstance(v, Mapping) for v in entry.values()):
            cohorts = [(str(c), v) for c, v in entry.items() if isinstance(v, Mapping)]
            groups.append((str(key), cohorts, _check(entry)))
        else:
            values = entry if isinstance(entry, Mapping) else {"value": entry}
            groups.append(("", [(str(key), values)], ""))
    names: list[str] = []
    for _, cohorts, _ in groups:
        for _, values in cohorts:
            names += [n for n in values if n != "cohort" and n not in names]
    rows = [
        FigureRow(
            flag=flag,
            cohort=cohort,
            values=[_figure(n, values.get(n)) for n in names],
            check=check,
            first=i == 0,
            span=len(cohorts),
        )
        for flag, cohorts, check in groups
        for i, (cohort, values) in enumerate(cohorts)
    ]
    return Figures(columns=[FIGURE_LABELS.get(n, n) for n in names], rows=rows, raw=raw)


def rollback_status(*, recent: int = RECENT) -> RollbackStatus:
    """Return every flag's state, its latest changes and rollbacks, the live sessions per
    storage mode, the safeguard's figures and whether ``storage_hybrid``'s rollback is
    complete."""
    now = timezone.now()
    live = live_sessions_by_mode()
    flags = list(
        Flag.objects.annotate(
            n_users=Count("users", distinct=True), n_groups=Count("groups", distinct=True)
        ).order_by("name")
    )
    names = [f.name for f in flags]
    changes: dict[str, list[ChangeRow]] = {n: [] for n in names}
    for row in FlagChange.objects.filter(flag__in=names).order_by("-at", "-id"):
        if len(changes[row.flag]) < recent:
            changes[row.flag].append(
                ChangeRow(
                    at=row.at,
                    actor=row.actor,
                    source=row.source,
                    reason=row.reason,
                    changed=_changed(row.before, row.after),
                    ago=ago(row.at, now),
                )
            )
    rollbacks: dict[str, list[RollbackRow]] = {n: [] for n in names}
    for row in RollbackEvent.objects.filter(flag__in=names).order_by("-at", "-id"):
        if len(rollbacks[row.flag]) < recent:
            rollbacks[row.flag].append(
                RollbackRow(
                    at=row.at,
                    actor=row.actor,
                    source=row.source,
                    reason=row.reason,
                    automatic=row.automatic,
                    ago=ago(row.at, now),
                )
            )
    statuses = []
    for flag in flags:
        state, label = state_of(flag)
        mode = FLAG_MODES.get(flag.name)
        in_mode = live.get(mode, 0) if mode else None
        ramp = flag.ramp if isinstance(flag.ramp, Mapping) else {}
        steps = ramp.get("steps") if isinstance(ramp.get("steps"), list) else []
        statuses.append(
            FlagStatus(
                name=flag.name,
                note=flag.note,
                state=state,
                label=label,
                percent=flag.percent,
                everyone=flag.everyone,
                rolled_back=flag.rolled_back,
                rolled_back_at=flag.rolled_back_at,
                overrides=_overrides(flag, flag.n_users, flag.n_groups),
                ramp_steps=steps,
                ramp_step=flag.ramp_step,
                ramp_step_at=flag.ramp_step_at,
                modified=flag.modified,
                changes=changes[flag.name],
                rollbacks=rollbacks[flag.name],
                mode=mode,
                live_in_mode=in_mode,
                rollback_complete=(flag.rolled_back and in_mode == 0) if mode else None,
            )
        )
    figures = safeguard_figures()
    return RollbackStatus(
        generated_at=now,
        stable_mode=settings.TERMSYS_STORAGE_MODE,
        emergency_rollback=bool(settings.TERMSYS_EMERGENCY_ROLLBACK),
        live_sessions=live,
        flags=statuses,
        safeguard=figures_table(figures) if figures is not None else None,
        storage=next((s for s in statuses if s.name == STORAGE_FLAG), None),
    )

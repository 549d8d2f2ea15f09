"""Read and check the previous system's JSON state; every problem names its record and field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sessions_app.names import name_sanitize

PROFILES = ("system", "claude")
LEGACY_ID_MAX = 200
CURRENT_PATH_MAX = 1024  # TerminalSession.cwd's max_length (PostgreSQL refuses longer)
# Epoch numbers above this are milliseconds (1e11 s is the year 5138).
EPOCH_MS_THRESHOLD = 10**11

NOT_JSON = "the file is not JSON: {error}"
NOT_A_LIST = 'the file must hold a list of sessions or {{"sessions": [...]}}, got {kind}'
SURROGATE = "has a lone UTF-16 surrogate {char} at character {at}: not text any database stores"
NUL = "has a NUL character at character {at}: PostgreSQL text cannot hold it"
TOO_LONG = "must be at most {limit} characters, got {length}"
OUT_OF_RANGE = "{value!r} is out of range once in UTC (years 1 to 9999)"


class LegacyFormatError(Exception):
    """The file as a whole is not legacy state (not JSON, not a list of sessions)."""


@dataclass(frozen=True)
class Problem:
    """A malformed record: its position in the file, the field at fault and why."""

    index: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"record {self.index}: {self.field}: {self.message}"


@dataclass(frozen=True)
class LegacyRecord:
    """One checked legacy session."""

    index: int
    legacy_id: str
    project_id: str
    user_id: str | None
    profile: str
    tab_name: str
    active: bool
    output: tuple[str, ...]
    current_path: str
    pid: int | None
    created_at: datetime
    last_activity: datetime | None


def load_records(raw: bytes) -> list[Any]:
    """Return the file's session objects (unchecked), or raise LegacyFormatError."""
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise LegacyFormatError(NOT_JSON.format(error=exc)) from None
    if isinstance(document, dict) and isinstance(document.get("sessions"), list):
        return document["sessions"]
    if isinstance(document, list):
        return document
    raise LegacyFormatError(NOT_A_LIST.format(kind=type(document).__name__))


class _Invalid(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _text(field: str, text: str, *, nul: bool = False) -> str:
    """Return ``text`` if every database stores it: no lone surrogate (JSON's ``\\ud800``,
    which UTF-8 cannot encode) and, unless ``nul``, no NUL character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = f"\\u{ord(text[exc.start]):04x}"
        raise _Invalid(field, SURROGATE.format(char=char, at=exc.start)) from None
    if not nul and "\x00" in text:
        raise _Invalid(field, NUL.format(at=text.index("\x00")))
    return text


def _key(
    item: dict[str, Any], field: str, *, required: bool = True, nul: bool = False
) -> str | None:
    """Return a string or whole-number key as text."""
    value = item.get(field)
    if value is None:
        if required:
            raise _Invalid(field, "missing")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Invalid(field, f"must be a string or a whole number, got {value!r}")
    text = str(value).strip()
    if not text or len(text) > LEGACY_ID_MAX:
        raise _Invalid(field, f"must be 1-{LEGACY_ID_MAX} characters, got {value!r}")
    return _text(field, text, nul=nul)


def _time(item: dict[str, Any], field: str, *, required: bool = True) -> datetime | None:
    """Return an ISO 8601 string or epoch number (seconds or milliseconds) as an aware time."""
    value = item.get(field)
    if value is None:
        if required:
            raise _Invalid(field, "missing")
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int | float):
            seconds = value / 1000 if value > EPOCH_MS_THRESHOLD else value
            return datetime.fromtimestamp(seconds, tz=UTC)
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        else:
            raise TypeError
    except (TypeError, ValueError, OverflowError, OSError):
        raise _Invalid(
            field, f"must be an ISO 8601 time or epoch milliseconds, got {value!r}"
        ) from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:  # stored in UTC: 0001-01-01T00:00+01:00 is in year 0 there
        return parsed.astimezone(UTC)
    except OverflowError:
        raise _Invalid(field, OUT_OF_RANGE.format(value=value)) from None


def _record(index: int, item: Any) -> LegacyRecord:
    if not isinstance(item, dict):
        raise _Invalid("(record)", f"must be a JSON object, got {type(item).__name__}")
    profile = item.get("type")
    if profile not in PROFILES:
        raise _Invalid("type", f"must be one of {', '.join(PROFILES)}, got {profile!r}")
    tab_name = item.get("tabName")
    if not isinstance(tab_name, str):
        raise _Invalid("tabName", f"must be a string, got {tab_name!r}")
    _text("tabName", tab_name)
    active = item.get("active")
    if not isinstance(active, bool):
        raise _Invalid("active", f"must be true or false, got {active!r}")
    output = item.get("output")
    if not isinstance(output, list):
        raise _Invalid("output", f"must be a list of lines, got {type(output).__name__}")
    for number, line in enumerate(output):
        if not isinstance(line, str):
            raise _Invalid(f"output[{number}]", f"must be a string, got {type(line).__name__}")
    current_path = item.get("currentPath")
    if not isinstance(current_path, str):
        raise _Invalid("currentPath", f"must be a string, got {current_path!r}")
    _text("currentPath", current_path)
    if len(current_path) > CURRENT_PATH_MAX:
        raise _Invalid(
            "currentPath", TOO_LONG.format(limit=CURRENT_PATH_MAX, length=len(current_path))
        )
    pid = item.get("pid")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
        raise _Invalid("pid", f"must be a whole number or null, got {pid!r}")
    return LegacyRecord(
        index=index,
        legacy_id=_key(item, "id") or "",
        # Only the project's name comes from it, with control characters replaced.
        project_id=_key(item, "projectId", nul=True) or "",
        user_id=_key(item, "userId", required=False),
        profile=profile,
        # what the old system allowed in a name and termsys does not (ESC, BEL, ...) becomes a space
        tab_name=name_sanitize(tab_name),
        active=active,
        output=tuple(output),
        current_path=current_path,
        pid=pid,
        created_at=_time(item, "createdAt"),  # type: ignore[arg-type]
        last_activity=_time(item, "lastActivity", required=False),
    )


def check_records(items: list[Any]) -> tuple[list[LegacyRecord], list[Problem]]:
    """Return the well-formed records and a problem for each malformed one (and duplicate id)."""
    records: list[LegacyRecord] = []
    problems: list[Problem] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(items):
        try:
            record = _record(index, item)
        except _Invalid as exc:
            problems.append(Problem(index, exc.field, exc.message))
            continue
        if record.legacy_id in first_index:
            duplicate = f"duplicate of record {first_index[record.legacy_id]}"
            problems.append(Problem(index, "id", f"{record.legacy_id!r} is a {duplicate}"))
            continue
        first_index[record.legacy_id] = index
        records.append(record)
    return records, problems

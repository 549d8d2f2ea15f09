"""Import the previous system's JSON state: users, projects and ended sessions with their output.

Decisions (README "Legacy import"): a record's ``userId`` is mapped by ``user_map``, else is the
termsys user of that username, else the ``legacy-<userId>`` user an earlier import created, else
(with ``create_users``) a new inactive ``legacy-<userId>`` user with an unusable password;
records without ``userId`` belong to ``default_user``. A legacy ``projectId`` becomes the user's
project ``legacy-<projectId>`` (or the name ``project_map`` gives), reused when it exists. Every
imported session has ended: state ``exited``, end reason ``imported``, no pid.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction

from legacy.models import LegacyImport, LegacySession
from legacy.parsing import LegacyRecord, Problem, check_records, load_records
from sessions_app import names
from sessions_app.errors import ValidationFailed
from sessions_app.models import Project, SessionEvent, StorageMode, TerminalSession, new_session_id
from sessions_app.projectdirs import directory_allocate
from sessions_app.states import SessionState
from sessions_app.storage import SessionRecord, get_storage

logger = logging.getLogger(__name__)

END_REASON = "imported"
LINE_SEPARATOR = "\r\n"
CREATED_USER_PREFIX = "legacy-"
PROJECT_PREFIX = "legacy-"
SESSION_ID_RE = re.compile(r"^session_\d{13}_[a-z0-9]{8}$")
USERNAME_RE = re.compile(r"^[\w.@+-]{1,150}$")
LOOKUP_BATCH = 500

NO_SUCH_USER = "no termsys user {username!r} (given by {option})"
NO_DEFAULT_USER = "missing, and no --default-user USERNAME was given"
BAD_PROJECT_NAME = "--map-project {old}={name!r}: {problem}"
NO_PROJECT_DIRECTORY = "cannot create the project directory {path}: {error}"
UNKNOWN_USER = (
    "no termsys user for legacy user {user_id!r}; map it with --map-user {user_id}=USERNAME "
    "or pass --create-users"
)


class LegacyImportError(Exception):
    """The import cannot start: an option names a user that does not exist, say."""


class LegacyImportRefused(Exception):
    """Malformed records and no ``skip_invalid``: nothing was imported."""

    def __init__(self, problems: list[Problem], read: int) -> None:
        super().__init__(f"{len(problems)} malformed record(s) of {read}")
        self.problems = problems
        self.read = read


@dataclass(frozen=True)
class ImportReport:
    sha256: str
    read: int
    imported: int
    skipped: int
    already_present: int
    dry_run: bool
    problems: tuple[Problem, ...] = ()
    new_ids: int = 0  # legacy ids not in today's pattern, imported under a new id
    users_created: tuple[str, ...] = ()
    projects_created: tuple[str, ...] = ()
    previous_run: str = ""  # when this file (same sha256) was first imported, if it was


@dataclass
class _Plan:
    """What the checked records resolve to before anything is written."""

    todo: list[tuple[LegacyRecord, str]] = field(default_factory=list)  # (record, username)
    present: int = 0
    problems: list[Problem] = field(default_factory=list)
    users: dict[str, Any] = field(default_factory=dict)  # username -> user (None: create)


def _known_legacy_ids(ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), LOOKUP_BATCH):
        batch = ids[start : start + LOOKUP_BATCH]
        found.update(
            LegacySession.objects.filter(legacy_id__in=batch).values_list("legacy_id", flat=True)
        )
    return found


def _created_username(user_id: str) -> str:
    slug = re.sub(r"[^\w.@+-]+", "-", user_id).strip("-") or "user"
    return (CREATED_USER_PREFIX + slug)[:150]


def _owner(
    record: LegacyRecord,
    users: dict[str, Any],
    default_user: str | None,
    user_map: Mapping[str, str],
    create_users: bool,
) -> tuple[str, str]:
    """Return the username a record goes to (added to ``users`` as None when it is to be
    created), or "" and the problem."""
    if record.user_id is None:
        return (default_user, "") if default_user else ("", NO_DEFAULT_USER)
    if record.user_id in user_map:
        return user_map[record.user_id], ""
    if record.user_id in users:
        return record.user_id, ""
    created = _created_username(record.user_id)
    if created in users:
        return created, ""
    if create_users:
        users[created] = None
        return created, ""
    return "", UNKNOWN_USER.format(user_id=record.user_id)


def _plan(
    records: list[LegacyRecord],
    *,
    default_user: str | None,
    user_map: Mapping[str, str],
    create_users: bool,
) -> _Plan:
    user_model = get_user_model()
    plan = _Plan()
    known = _known_legacy_ids([r.legacy_id for r in records])
    candidates = {*user_map.values(), *([default_user] if default_user else [])}
    for record in records:
        if record.user_id is not None:
            candidates.update({record.user_id, _created_username(record.user_id)})
    existing = {
        u.get_username(): u
        for u in user_model.objects.filter(**{f"{user_model.USERNAME_FIELD}__in": candidates})
    }
    for option, username in [
        *((f"--map-user {old}={new}", new) for old, new in user_map.items()),
        *([("--default-user", default_user)] if default_user else []),
    ]:
        if username not in existing:
            raise LegacyImportError(NO_SUCH_USER.format(username=username, option=option))
    plan.users.update(existing)
    for record in records:
        if record.legacy_id in known:
            plan.present += 1
            continue
        username, problem = _owner(record, plan.users, default_user, user_map, create_users)
        if problem:
            plan.problems.append(Problem(record.index, "userId", problem))
            continue
        plan.todo.append((record, username))
    return plan


def _project_name(project_id: str, project_map: Mapping[str, str]) -> str:
    if project_id in project_map:
        return project_map[project_id]
    return names.name_sanitize(
        PROJECT_PREFIX + project_id, refused=names.PROJECT_NAME_SEPARATORS, replacement="-"
    )


def _project_path(
    owner: Any, name: str, paths: Iterable[str], *, dry_run: bool, made: list[Path]
) -> str:
    """Return the sessions' common directory if it exists here, else a new directory under
    TERMSYS_PROJECTS_ROOT that no other project has (not created on a dry run; each directory
    made is added to ``made``)."""
    absolute = [p for p in paths if os.path.isabs(p)]
    if absolute:
        common = Path(os.path.commonpath(absolute))
        if common.is_dir() and common != Path(common.anchor):
            return str(common.resolve())
    directory = directory_allocate(owner=owner, name=name, create=False)
    if not dry_run:
        _make_directory(directory, made)
    return str(directory)


def _make_directory(directory: Path, made: list[Path]) -> None:
    """Create ``directory`` and its missing parents; add each one made to ``made``."""
    missing = []
    for parent in (directory, *directory.parents):
        if parent.exists():
            break
        missing.append(parent)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        error = exc.strerror or exc
        raise LegacyImportError(NO_PROJECT_DIRECTORY.format(path=directory, error=error)) from exc
    made.extend(reversed(missing))


def _remove_directories(made: list[Path]) -> None:
    """Remove the directories an import that failed had made (still empty), deepest first."""
    for directory in reversed(made):
        try:
            directory.rmdir()
        except OSError as exc:
            logger.warning("left %s, made by a failed import: %s", directory, exc)


def _session_id(legacy_id: str) -> str:
    if SESSION_ID_RE.match(legacy_id) and not TerminalSession.objects.filter(pk=legacy_id).exists():
        return legacy_id
    return new_session_id()


def _import_session(record: LegacyRecord, *, user: Any, project: Project, sha256: str) -> str:
    """Create one ended session with its output, through the DATABASE storage provider."""
    provider = get_storage(StorageMode.DATABASE)
    session_id = _session_id(record.legacy_id)
    provider.create(
        SessionRecord(
            id=session_id,
            project_id=project.pk,
            user_id=user.pk,
            profile=record.profile,
            tab_name=record.tab_name or f"Terminal {record.index + 1}",
            state=SessionState.EXITED,
            storage_mode=StorageMode.DATABASE,
            cwd=record.current_path,
            end_reason=END_REASON,
        )
    )
    provider.add_event(
        session_id,
        SessionEvent.Kind.CREATED,
        {
            "imported": True,
            "legacyId": record.legacy_id,
            "legacyPid": record.pid,
            "legacyActive": record.active,
            "file": sha256,
        },
    )
    data = LINE_SEPARATOR.join(record.output).encode("utf-8", "surrogatepass")
    if data:
        provider.append_output(session_id, 0, data)
    provider.update(
        session_id,
        created_at=record.created_at,
        last_activity=record.last_activity or record.created_at,
    )
    return session_id


def _create_users(plan: _Plan) -> list[str]:
    """Create the users the plan lacks: inactive, with an unusable password."""
    user_model = get_user_model()
    created = []
    for username, existing in list(plan.users.items()):
        if existing is None:
            user = user_model(**{user_model.USERNAME_FIELD: username}, is_active=False)
            user.set_unusable_password()
            user.save()
            plan.users[username] = user
            created.append(username)
    return created


def _projects(
    plan: _Plan, project_map: Mapping[str, str], *, dry_run: bool, made: list[Path]
) -> tuple[dict[tuple[str, str], Project], list[str]]:
    """Return the project of each (username, legacy projectId), and those created."""
    paths: dict[tuple[str, str], list[str]] = {}
    for record, username in plan.todo:
        paths.setdefault((username, record.project_id), []).append(record.current_path)
    projects: dict[tuple[str, str], Project] = {}
    created = []
    for (username, project_id), cwds in paths.items():
        owner = plan.users[username]
        name = _project_name(project_id, project_map)
        project = Project.objects.filter(owner=owner, name=name).first()
        if project is None:
            path = _project_path(owner, name, cwds, dry_run=dry_run, made=made)
            project = Project.objects.create(owner=owner, name=name, path=path)
            created.append(f"{username}/{name}")
        projects[(username, project_id)] = project
    return projects, created


def _write(
    plan: _Plan,
    *,
    project_map: Mapping[str, str],
    sha256: str,
    file_name: str,
    records: int,
    dry_run: bool,
    made: list[Path],
    progress: Callable[[int, int], None] | None,
    progress_every: int,
) -> tuple[list[str], list[str], int]:
    """Create the plan's users, projects and sessions (in the caller's transaction); return
    the users and projects created and how many ids were replaced."""
    new_ids = 0
    users_created = _create_users(plan)
    projects, projects_created = _projects(plan, project_map, dry_run=dry_run, made=made)
    ledger = None
    for done, (record, username) in enumerate(plan.todo, start=1):
        if ledger is None:
            ledger, _ = LegacyImport.objects.get_or_create(
                sha256=sha256,
                defaults={"file_name": file_name[:1024], "records": records, "imported": 0},
            )
        session_id = _import_session(
            record,
            user=plan.users[username],
            project=projects[(username, record.project_id)],
            sha256=sha256,
        )
        new_ids += session_id != record.legacy_id
        LegacySession.objects.create(
            legacy_id=record.legacy_id,
            session_id=session_id,
            session_key=session_id,
            source=ledger,
            record_index=record.index,
        )
        if progress is not None and (done % progress_every == 0 or done == len(plan.todo)):
            progress(done, len(plan.todo))
    if ledger is not None:
        ledger.imported += len(plan.todo)
        ledger.file_name = file_name[:1024]
        ledger.save(update_fields=["imported", "file_name", "last_run_at"])
    return users_created, projects_created, new_ids


def legacy_state_import(
    *,
    raw: bytes,
    file_name: str,
    default_user: str | None = None,
    user_map: Mapping[str, str] | None = None,
    project_map: Mapping[str, str] | None = None,
    create_users: bool = False,
    skip_invalid: bool = False,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    progress_every: int = 100,
) -> ImportReport:
    """Import a legacy state file in one transaction (rolled back on a dry run).

    Raise LegacyFormatError for a file that is not legacy state, LegacyImportError for a bad
    option, and LegacyImportRefused when records are malformed and ``skip_invalid`` is off.
    """
    user_map, project_map = dict(user_map or {}), dict(project_map or {})
    for old, name in project_map.items():
        try:
            project_map[old] = names.name_clean(
                name, field="the project name", refused=names.PROJECT_NAME_SEPARATORS
            )
        except ValidationFailed as exc:
            raise LegacyImportError(
                BAD_PROJECT_NAME.format(old=old, name=name, problem=exc.message)
            ) from None
    sha256 = hashlib.sha256(raw).hexdigest()
    items = load_records(raw)
    records, problems = check_records(items)
    previous = LegacyImport.objects.filter(sha256=sha256).first()
    plan = _plan(records, default_user=default_user, user_map=user_map, create_users=create_users)
    problems = sorted([*problems, *plan.problems], key=lambda p: p.index)
    if problems and not skip_invalid:
        raise LegacyImportRefused(problems, read=len(items))

    made: list[Path] = []  # project directories, removed again if the import fails
    try:
        with transaction.atomic():
            counts = _write(
                plan,
                project_map=project_map,
                sha256=sha256,
                file_name=file_name,
                records=len(items),
                dry_run=dry_run,
                made=made,
                progress=progress,
                progress_every=progress_every,
            )
            if dry_run:
                transaction.set_rollback(True)
    except BaseException:
        _remove_directories(made)
        raise
    users_created, projects_created, new_ids = counts
    if not dry_run:
        logger.info(
            "legacy import %s (%s): %d imported, %d already present, %d skipped",
            file_name,
            sha256,
            len(plan.todo),
            plan.present,
            len(problems),
        )
    return ImportReport(
        sha256=sha256,
        read=len(items),
        imported=len(plan.todo),
        skipped=len(problems),
        already_present=plan.present,
        dry_run=dry_run,
        problems=tuple(problems),
        new_ids=new_ids,
        users_created=tuple(users_created),
        projects_created=tuple(projects_created),
        previous_run=previous.first_run_at.isoformat() if previous else "",
    )

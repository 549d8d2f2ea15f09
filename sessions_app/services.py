"""Actions that change projects and terminal sessions. Views, consumers, admin and commands call
these; the decisions live here, once.

Synchronous functions touch the database; the ``async`` ones also drive live PTYs and must run
on the server's event loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

from channels.db import database_sync_to_async
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils import timezone

from sessions_app import conf, housekeeping, names, projectdirs, selectors, storage, terminals
from sessions_app.dbthread import db_call
from sessions_app.errors import (
    Conflict,
    NotFound,
    SessionLimitReached,
    SpawnFailed,
    ValidationFailed,
    VersionConflict,
)
from sessions_app.models import Project, SessionEvent, TerminalSession, new_session_id
from sessions_app.pty import PtyProcess, shell_environment
from sessions_app.states import LIVE_STATES, SessionState, check_transition
from sessions_app.storage import Scrollback, SessionRecord, get_storage
from sessions_app.storage.hybrid import StorageBusy

logger = logging.getLogger(__name__)

Kind = SessionEvent.Kind
# A shell that ended because its server process went away; such a session can be revived.
END_SERVER_RESTARTED = "server_restarted"
DISCARD_FLUSH_SECONDS = 5.0
MSG_PROJECT_ID_REQUIRED = "projectId is required: the id of one of your projects."
MSG_PROJECT_ID_TYPE = (
    "projectId must be a project's id, a whole number such as 12; got {value} ({kind})."
)
_JSON_KINDS = {bool: "true/false", int: "number", float: "number", str: "string", list: "array"}
MSG_PROJECT_EXISTS = "You already have a project named {name!r}; choose another name."


# --- projects ---------------------------------------------------------------------------------


def project_create(*, owner: AbstractBaseUser, name: Any, path: Any = None) -> Project:
    """Create a project; its path must be an existing directory, or defaults to one we create."""
    name = names.name_clean(name, field="name", refused=names.PROJECT_NAME_SEPARATORS)
    duplicate = Conflict(MSG_PROJECT_EXISTS.format(name=name), details={"field": "name"})
    if Project.objects.filter(owner=owner, name=name).exists():
        raise duplicate  # before a directory is made for it
    if path not in (None, ""):
        directory, made = projectdirs.existing_directory(path), False
    else:
        directory, made = projectdirs.directory_allocate(owner=owner, name=name), True
    try:
        with transaction.atomic():
            return Project.objects.create(owner=owner, name=name, path=str(directory))
    except BaseException as exc:
        if made:
            with contextlib.suppress(OSError):
                directory.rmdir()  # made for a project that was refused: leave nothing behind
        if isinstance(exc, IntegrityError):
            raise duplicate from None
        raise


# --- session state ----------------------------------------------------------------------------


def _find(session_id: str) -> SessionRecord:
    record = storage.find(session_id)
    if record is None:
        raise NotFound(f"No session {session_id}.")
    return record


def session_transition(
    *, session_id: str, target: str, event: str, data: dict[str, Any] | None = None, **changes: Any
) -> SessionRecord:
    """Move a session to ``target`` (checked by the state machine) and record ``event``."""
    for _ in range(5):
        record = _find(session_id)
        provider = get_storage(record.storage_mode)
        if record.state != target:
            check_transition(session_id, record.state, target)
        try:
            with transaction.atomic():
                updated = provider.update(
                    session_id, expected_version=record.version, state=target, **changes
                )
                provider.add_event(session_id, event, {"from": record.state, **(data or {})})
            return updated
        except VersionConflict:
            continue
    raise Conflict(f"Session {session_id} is changing too fast; try again.")


def session_rename(*, user: AbstractBaseUser, session_id: str, tab_name: Any) -> SessionRecord:
    """Give a session the name the user chose; from now on its tab shows it, not the title.

    An empty name (or null) takes the user's name back: the tab follows the title again, and
    while there is none shows a name as a new tab gets one (the first free "Terminal N").
    """
    follow_title = tab_name is None or (isinstance(tab_name, str) and not tab_name.strip())
    if not follow_title:
        tab_name = names.name_clean(tab_name, field="tabName")
    record = selectors.session_get(user=user, session_id=session_id)
    provider = get_storage(record.storage_mode)
    with transaction.atomic():
        if follow_title:
            others = [r for r in storage.list_for_project(record.project_id) if r.id != record.id]
            tab_name = _next_tab_name(others, first=1)
        updated = provider.update(record.id, tab_name=tab_name, tab_named=not follow_title)
        data = {"from": record.tab_name, "to": updated.tab_name}
        if follow_title:
            data["followsTitle"] = True
        provider.add_event(record.id, Kind.RENAMED, data)
    return updated


def sessions_reconcile(*, user: AbstractBaseUser | None = None, user_id: int | None = None) -> int:
    """Mark live sessions (of one user, or all) whose server process is gone as exited.

    A PTY dies with the process that owns it; its history stays. Returns how many.
    """
    if user is not None:
        user_id = user.pk
    if user_id is not None:
        live = [(r.id, r.node) for r in storage.list_for_user(user_id) if r.state in LIVE_STATES]
    else:
        live = list(TerminalSession.objects.filter(state__in=LIVE_STATES).values_list("id", "node"))
    count = 0
    for session_id, node in live:
        if terminals.get(session_id) is not None or not node or terminals.node_is_alive(node):
            continue  # ours, still being created by a request in flight, or another process's
        try:
            session_transition(
                session_id=session_id,
                target=SessionState.EXITED,
                event=Kind.EXITED,
                data={"reason": "server restarted"},
                pid=None,
                end_reason=END_SERVER_RESTARTED,
            )
            count += 1
        except Exception:
            logger.exception("could not mark orphaned session %s exited", session_id)
    return count


# --- live sessions ----------------------------------------------------------------------------


def _check_limits(user: AbstractBaseUser, project: Project) -> list[SessionRecord]:
    """Raise SessionLimitReached if one more live terminal is too many; return the project's
    sessions. Call inside a transaction holding the project's row lock."""
    sessions = storage.list_for_project(project.pk)
    live = sum(1 for r in sessions if r.state in LIVE_STATES)
    limit = conf.max_sessions_per_project()
    if live >= limit:
        raise SessionLimitReached(
            f"Project {project.name!r} already has {live} live terminals "
            f"(TERMSYS_MAX_SESSIONS_PER_PROJECT={limit}); close one first.",
            details={"limit": limit, "live": live},
        )
    yours = sum(1 for r in storage.list_for_user(user.pk) if r.state in LIVE_STATES)
    if yours >= conf.max_sessions_per_user():
        raise SessionLimitReached(
            f"You already have {yours} live terminals "
            f"(TERMSYS_MAX_SESSIONS_PER_USER={conf.max_sessions_per_user()}); close one first.",
            details={"limit": conf.max_sessions_per_user(), "live": yours},
        )
    return sessions


def _session_insert(
    *, user: AbstractBaseUser, project_id: Any, profile: Any, tab_name: Any
) -> tuple[SessionRecord, Project]:
    profiles = conf.profiles()
    if profile in (None, ""):
        profile = conf.SYSTEM_PROFILE
    if not isinstance(profile, str) or profile not in profiles:
        raise ValidationFailed(
            f"Unknown terminal type {profile!r}; available: {', '.join(sorted(profiles))}.",
            details={"field": "type", "allowed": sorted(profiles)},
        )
    if isinstance(tab_name, str) and not tab_name.strip():
        tab_name = None  # no tab name (or only spaces): the next free "Terminal N"
    if tab_name is not None:
        tab_name = names.name_clean(tab_name, field="tabName")
    if project_id is None:
        raise ValidationFailed(MSG_PROJECT_ID_REQUIRED, details={"field": "projectId"})
    if isinstance(project_id, bool) or not isinstance(project_id, int):
        raise ValidationFailed(
            MSG_PROJECT_ID_TYPE.format(
                value=json.dumps(project_id, default=repr)[:40],
                kind=_JSON_KINDS.get(type(project_id), "object"),
            ),
            details={"field": "projectId"},
        )
    with transaction.atomic():
        project = selectors.project_get(user=user, project_id=project_id)
        Project.objects.select_for_update().filter(
            pk=project.pk
        ).first()  # serialise the limit check
        sessions = _check_limits(user, project)
        provider = get_storage(storage.mode_for_user(user.pk))
        record = provider.create(
            SessionRecord(
                id=new_session_id(),
                project_id=project.pk,
                user_id=user.pk,
                profile=profile,
                tab_name=tab_name or _next_tab_name(sessions),
                state=SessionState.CREATING,
                storage_mode=provider.mode,
                cwd=project.path,
            )
        )
        provider.add_event(record.id, Kind.CREATED, {"profile": profile})
    return record, project


def _next_tab_name(sessions: list[SessionRecord], first: int | None = None) -> str:
    """Return "Terminal N" for the project's next tab, as the page names it: N one more than
    the tabs shown (or ``first``), or the next number no tab has."""
    taken = {r.tab_name for r in sessions}
    n = len(sessions) + 1 if first is None else first
    while f"Terminal {n}" in taken:
        n += 1
    return f"Terminal {n}"


async def session_create(
    *,
    user: AbstractBaseUser,
    project_id: Any,
    profile: Any = None,
    tab_name: Any = None,
    cols: int = 80,
    rows: int = 24,
) -> SessionRecord:
    """Create a session in the user's project and start its shell on a PTY.

    A shell that cannot start (SpawnFailed: the profile's command does not exist, say) leaves
    no session behind: the request is refused as a whole, the tab list is as before, and the
    next terminal gets the name this one would have had.
    """
    record, project = await database_sync_to_async(_session_insert)(
        user=user, project_id=project_id, profile=profile, tab_name=tab_name
    )
    try:
        return await _start_terminal(record, cwd=project.path, cols=cols, rows=rows)
    except SpawnFailed as exc:
        logger.warning(
            "terminal of %s in project %s not created: %s",
            user.get_username(),
            project.pk,
            exc.message,
        )
        await database_sync_to_async(_session_discard)(record=record)
        raise


def _session_discard(*, record: SessionRecord) -> None:
    """Remove a session (whose shell never started, or that an admin deletes) with its events
    and output.

    A write-behind provider (HYBRID) may have written the session to the database already,
    where lists would still find it until the delete follows: wait for that, briefly.
    """
    provider = get_storage(record.storage_mode)
    provider.delete(record.id)
    try:
        provider.flush(session_id=record.id, timeout=DISCARD_FLUSH_SECONDS)
    except StorageBusy as exc:  # the database is down: it is deleted when it is back
        logger.warning("discarded session %s is still listed: %s", record.id, exc.message)


async def _start_terminal(
    record: SessionRecord,
    *,
    cwd: str,
    cols: int,
    rows: int,
    history: Scrollback | None = None,
    banner: bytes = b"",
) -> SessionRecord:
    """Spawn the session's shell in ``cwd`` and make it live (``creating`` -> ``active``).

    ``history`` (a revived session's stored output) is what clients are replayed before the
    new shell's output; ``banner`` is written into the output stream first.
    """
    argv = conf.profiles().get(record.profile)
    if argv is None:
        raise SpawnFailed(
            f"Terminal type {record.profile!r} is no longer configured (TERMSYS_PROFILES)."
        )
    pty = PtyProcess.spawn(
        argv,
        cwd=cwd,
        env=shell_environment(cwd=cwd, session_id=record.id),
        cols=cols,
        rows=rows,
    )
    terminal = terminals.LiveTerminal(
        session_id=record.id,
        user_id=record.user_id,
        pty=pty,
        storage_mode=record.storage_mode,
        start_offset=record.output_bytes if history is None else history.end,
        history=history,
        on_exit=_on_terminal_exit,
        on_resize=_on_terminal_resized,
    )
    terminal.cols, terminal.rows = cols, rows
    terminal.cwd = cwd
    terminals.register(terminal)
    if banner:
        terminal.emit_notice(banner)
    terminal.start()
    housekeeping.ensure_running()
    return await database_sync_to_async(session_transition)(
        session_id=record.id,
        target=SessionState.ACTIVE,
        event=Kind.STARTED,
        data={"pid": pty.pid, "cols": cols, "rows": rows, "offset": terminal.size_offset},
        pid=pty.pid,
        node=terminals.NODE_ID,
        cols=cols,
        rows=rows,
    )


def session_resized(*, session_id: str, cols: int, rows: int, offset: int) -> None:
    """Record a live session's new size, which holds from output byte ``offset`` on (its
    ``resized`` event: an export replays it there)."""
    record = storage.find(session_id)
    if record is None or (record.cols, record.rows) == (cols, rows):
        return
    provider = get_storage(record.storage_mode)
    with transaction.atomic():
        provider.update(session_id, cols=cols, rows=rows)
        provider.add_event(session_id, Kind.RESIZED, {"cols": cols, "rows": rows, "offset": offset})


async def _on_terminal_resized(terminal: terminals.LiveTerminal) -> None:
    try:
        await db_call(
            session_resized,
            session_id=terminal.session_id,
            cols=terminal.cols,
            rows=terminal.rows,
            offset=terminal.size_offset,
        )
    except Exception:  # the size is recorded again at the next resize or detach
        logger.warning("could not record the size of %s", terminal.session_id, exc_info=True)


async def _on_terminal_exit(terminal: terminals.LiveTerminal, exit_code: int | None) -> None:
    """Record how a terminal ended and tell its clients."""
    killed = terminal.killed
    target = SessionState.KILLED if killed else SessionState.EXITED
    end_reason = terminal.end_reason or ("killed" if killed else "exited")
    data = {
        "exitCode": exit_code,
        **({"reason": terminal.end_reason} if terminal.end_reason else {}),
    }
    try:
        await db_call(
            session_transition,
            session_id=terminal.session_id,
            target=target,
            event=Kind.KILLED if killed else Kind.EXITED,
            data=data,
            exit_code=exit_code,
            pid=None,
            cols=terminal.cols,
            rows=terminal.rows,
            end_reason=end_reason,
        )
    except Exception:
        logger.exception("could not record the end of session %s", terminal.session_id)
    terminals.unregister(terminal)
    terminal.broadcast(
        {
            "type": "exit",
            "exitCode": exit_code,
            "state": str(target),
            "endReason": end_reason,
            "revivable": False,
            "cwd": terminal.cwd,
        }
    )


def _revive_prepare(*, user: AbstractBaseUser, session_id: str) -> tuple[SessionRecord, Scrollback]:
    """Check that the session may be revived and move it to ``creating``; return it and its
    stored history."""
    with transaction.atomic():
        record = selectors.session_get(user=user, session_id=session_id)
        if (
            record.state != SessionState.EXITED
            or record.end_reason != END_SERVER_RESTARTED
            or record.closed_at is not None
        ):
            why = record.end_reason or record.state
            raise Conflict(
                f"Only a terminal whose shell ended because the server restarted can be "
                f"revived; this one is {record.state} ({why}). Open a new terminal instead.",
                details={"state": record.state, "endReason": record.end_reason},
            )
        project = selectors.project_get(user=user, project_id=record.project_id)
        Project.objects.select_for_update().filter(pk=project.pk).first()
        _check_limits(user, project)
        cwd = record.cwd if record.cwd and os.path.isdir(record.cwd) else project.path
        record = session_transition(
            session_id=record.id,
            target=SessionState.CREATING,
            event=Kind.REVIVED,
            data={"cwd": cwd},
            cwd=cwd,
            exit_code=None,
            end_reason="",
        )
    history = get_storage(record.storage_mode).read_scrollback(
        record.id, max_bytes=conf.scrollback_bytes()
    )
    return record, history


async def session_revive(
    *, user: AbstractBaseUser, session_id: str, cols: int = 80, rows: int = 24
) -> SessionRecord:
    """Start a new shell in a session whose shell died with its server, in place: same id and
    tab, in its last working directory, its history above a "history restored" line."""
    record, history = await database_sync_to_async(_revive_prepare)(
        user=user, session_id=session_id
    )
    stamp = timezone.localtime().strftime("%Y-%m-%d %H:%M")
    banner = f"\r\n\x1b[2m── history restored · new shell in {record.cwd} · {stamp} ──\x1b[0m\r\n"
    try:
        return await _start_terminal(
            record, cwd=record.cwd, cols=cols, rows=rows, history=history, banner=banner.encode()
        )
    except SpawnFailed as exc:  # the session and its history stay, marked as failed
        await database_sync_to_async(session_transition)(
            session_id=record.id,
            target=SessionState.ERROR,
            event=Kind.ERROR,
            data={"message": exc.message},
        )
        raise


async def session_kill(*, session_id: str, actor: str = "") -> SessionRecord:
    """End a live session's whole process tree and record it as killed; keep its history."""
    terminal = terminals.get(session_id)
    if terminal is not None:
        await terminals.call_on_owner_loop(terminal, terminal.kill)
    else:
        record = await database_sync_to_async(_find)(session_id)
        if record.state in LIVE_STATES:
            if record.node and terminals.node_is_alive(record.node):
                raise Conflict(
                    f"Session {session_id} runs in another server process ({record.node}); "
                    "kill it there.",
                    details={"node": record.node},
                )
            await database_sync_to_async(session_transition)(
                session_id=session_id,
                target=SessionState.KILLED,
                event=Kind.KILLED,
                data={"actor": actor, "orphan": True},
                pid=None,
                end_reason="killed",
            )
    return await database_sync_to_async(_find)(session_id)


def session_running_elsewhere(*, session_id: str) -> str | None:
    """Return the server process that owns a live session's shell when it is not this one and
    still runs (its shell can be ended only there), else None."""
    record = storage.find(session_id)
    if record is None or record.state not in LIVE_STATES or terminals.get(session_id) is not None:
        return None
    if record.node and terminals.node_is_alive(record.node):
        return record.node
    return None


def sessions_forget(*, session_ids: list[str]) -> None:
    """Remove sessions whose shells have ended from their storage providers (an admin deletes
    them: a provider that holds sessions in memory must not list them again)."""
    for session_id in session_ids:
        record = storage.find(session_id)
        if record is not None:
            get_storage(record.storage_mode).delete(session_id)


async def session_close(*, user: AbstractBaseUser, session_id: str) -> SessionRecord:
    """End a session's process tree (if it runs) and hide it from the tab list; keep history."""
    record = await database_sync_to_async(selectors.session_get)(user=user, session_id=session_id)
    await session_kill(session_id=record.id, actor=user.get_username())
    return await database_sync_to_async(_mark_closed)(session_id=record.id)


def _mark_closed(*, session_id: str) -> SessionRecord:
    provider = get_storage(_find(session_id).storage_mode)
    with transaction.atomic():
        record = provider.update(session_id, closed_at=timezone.now())
        provider.add_event(session_id, Kind.CLOSED, {})
    return record


def session_attached(*, session_id: str, clients: int) -> None:
    """Record that a client attached; a detached session becomes active."""
    record = storage.find(session_id)
    if record is not None and record.state == SessionState.DETACHED:
        session_transition(
            session_id=session_id,
            target=SessionState.ACTIVE,
            event=Kind.ATTACHED,
            data={"clients": clients},
        )


def session_watched(*, session_id: str, viewer: str) -> None:
    """Record that someone (staff, from the admin) attached read-only; the state is unchanged."""
    get_storage(_find(session_id).storage_mode).add_event(
        session_id, Kind.ATTACHED, {"readOnly": True, "viewer": viewer}
    )


def session_detached(*, session_id: str, cols: int, rows: int) -> None:
    """Record that the last client left; an active session becomes detached."""
    record = storage.find(session_id)
    if record is not None and record.state == SessionState.ACTIVE:
        session_transition(
            session_id=session_id,
            target=SessionState.DETACHED,
            event=Kind.DETACHED,
            cols=cols,
            rows=rows,
        )


async def terminals_shutdown() -> None:
    """Kill every live terminal of this process (server shutdown, test teardown)."""
    for terminal in terminals.all_terminals():
        try:
            await terminals.call_on_owner_loop(terminal, terminal.kill)
        except Exception:
            logger.exception("could not end session %s", terminal.session_id)

"""Per-process housekeeping of live sessions, about once a second: end the ones idle past
TERMSYS_IDLE_TIMEOUT, record shells' working directories, move sessions between storage
modes when the storage_hybrid flag or TERMSYS_EMERGENCY_ROLLBACK says so (flushing first,
without the clients reconnecting), and close the sockets of logins that have ended."""

from __future__ import annotations

import asyncio
import contextvars
import logging

from django.db import transaction

from featureflags import broadcast, tasks
from featureflags.evaluation import STORAGE_FLAG
from sessions_app import conf, signout, storage, terminals
from sessions_app.dbthread import db_call
from sessions_app.models import SessionEvent
from sessions_app.storage import get_storage

logger = logging.getLogger(__name__)

Kind = SessionEvent.Kind

MODE_CHECK_SECONDS = 1.0
# LOCAL keeps a session in this process's memory only; moving one in or out of it would need
# its whole history copied, so only sessions backed by the database switch modes live.
SWITCHABLE_MODES = frozenset({"DATABASE", "HYBRID"})
_watchers: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}


def _record_mode_change(session_id: str, old_mode: str, new_mode: str) -> None:
    provider = get_storage(new_mode)
    with transaction.atomic():
        provider.update(session_id, storage_mode=new_mode)
        provider.add_event(session_id, Kind.MODE_CHANGED, {"from": old_mode, "to": new_mode})


async def session_switch_mode(terminal: terminals.LiveTerminal, new_mode: str) -> bool:
    """Move a live session to ``new_mode`` without its clients reconnecting; return whether it did.

    Pending writes in the old mode are flushed first; output that arrives meanwhile waits in
    memory and is written in the new mode afterwards, so nothing is lost or written twice.
    """
    old_mode = terminal.storage_mode
    if (
        new_mode == old_mode
        or terminal.switching
        or terminal.ended
        or {old_mode, new_mode} - SWITCHABLE_MODES
    ):
        return False
    terminal.switching = True
    try:
        await terminal.flush()
        old = get_storage(old_mode)
        await db_call(old.flush, terminal.session_id)
        await db_call(_record_mode_change, terminal.session_id, old_mode, new_mode)
        terminal.storage_mode = new_mode
    except Exception:
        logger.exception(
            "switching %s from %s to %s failed; will retry", terminal.session_id, old_mode, new_mode
        )
        return False
    finally:
        terminal.switching = False
    await terminal.flush()
    terminal.broadcast({"type": "mode", "mode": new_mode})
    release = getattr(old, "release", None)  # the old mode's memory of it is stale now
    if release is not None:
        try:
            await db_call(release, terminal.session_id)
        except Exception:
            logger.exception("could not release %s from %s storage", terminal.session_id, old_mode)
    logger.info(
        "session %s switched storage mode %s -> %s", terminal.session_id, old_mode, new_mode
    )
    return True


def _desired_modes(live: list[terminals.LiveTerminal]) -> dict[str, str]:
    return {t.session_id: storage.mode_for_user(t.user_id) for t in live}


async def _end_idle(live: list[terminals.LiveTerminal]) -> list[terminals.LiveTerminal]:
    """Kill sessions idle past TERMSYS_IDLE_TIMEOUT (no client, no output); return the rest."""
    limit = conf.idle_timeout()
    busy = []
    for terminal in live:
        if terminal.idle_seconds() > limit:
            logger.info("ending %s: idle for more than %ss", terminal.session_id, limit)
            terminal.end_reason = "idle"
            await terminal.kill()
        else:
            busy.append(terminal)
    return busy


def _record_cwd(session_id: str, cwd: str) -> None:
    record = storage.find(session_id)
    if record is not None and record.cwd != cwd:
        get_storage(record.storage_mode).update(session_id, cwd=cwd)


async def _track_cwd(live: list[terminals.LiveTerminal]) -> None:
    """Record each shell's working directory when it changed (after ``cd``), so a session
    revived after a restart starts where its shell was."""
    for terminal in live:
        cwd = terminal.shell_cwd()
        if cwd is None or cwd == terminal.cwd:
            continue
        try:
            await db_call(_record_cwd, terminal.session_id, cwd)
        except Exception:
            logger.warning("could not record the cwd of %s", terminal.session_id, exc_info=True)
            continue
        terminal.cwd_changed(cwd)


async def _watch_modes(loop: asyncio.AbstractEventLoop) -> None:
    """About once a second: end idle sessions, record working directories, and switch storage
    modes where the flag says; every few seconds, close the sockets of ended logins."""
    signed_out_at = loop.time()
    while not loop.is_closed():
        await asyncio.sleep(MODE_CHECK_SECONDS)
        if loop.time() - signed_out_at >= signout.CHECK_SECONDS:
            signed_out_at = loop.time()
            await signout.end_signed_out(loop)
        live = [t for t in terminals.all_terminals() if t.loop is loop and not t.ended]
        live = await _end_idle(live)
        if not live:
            continue
        await _track_cwd(live)
        await _switch_modes(live)


async def _switch_modes(live: list[terminals.LiveTerminal]) -> None:
    """Move live sessions to the storage mode the flag (or the emergency variable) says."""
    try:
        desired = await db_call(_desired_modes, live)
    except Exception:
        logger.warning("could not evaluate storage modes", exc_info=True)
        return
    for terminal in live:
        if desired[terminal.session_id] != terminal.storage_mode:
            await session_switch_mode(terminal, desired[terminal.session_id])


async def _on_flag_change(name: str) -> None:
    """The storage flag changed (in any process): re-evaluate this loop's sessions now."""
    if name != STORAGE_FLAG:
        return
    loop = asyncio.get_running_loop()
    await _switch_modes([t for t in terminals.all_terminals() if t.loop is loop and not t.ended])


broadcast.on_change(_on_flag_change)


def ensure_running() -> None:
    """Start the housekeeping task of the running event loop, and the flag listener, once."""
    loop = asyncio.get_running_loop()
    if loop not in _watchers:
        _watchers[loop] = loop.create_task(_watch_modes(loop), context=contextvars.Context())
    broadcast.start_listener()
    tasks.start()

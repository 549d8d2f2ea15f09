"""Per-process housekeeping of live sessions, about once a second: end the ones idle past
TERMSYS_IDLE_TIMEOUT, and move sessions between storage modes when the storage_hybrid flag or
TERMSYS_EMERGENCY_ROLLBACK says so (flushing first, without the clients reconnecting)."""

from __future__ import annotations

import asyncio
import contextvars
import logging

from django.db import transaction

from sessions_app import conf, storage, terminals
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


async def _watch_modes(loop: asyncio.AbstractEventLoop) -> None:
    """About once a second: end idle sessions, and switch storage modes where the flag says."""
    while not loop.is_closed():
        await asyncio.sleep(MODE_CHECK_SECONDS)
        live = [t for t in terminals.all_terminals() if t.loop is loop and not t.ended]
        live = await _end_idle(live)
        if not live:
            continue
        try:
            desired = await db_call(_desired_modes, live)
        except Exception:
            logger.warning("could not evaluate storage modes", exc_info=True)
            continue
        for terminal in live:
            if desired[terminal.session_id] != terminal.storage_mode:
                await session_switch_mode(terminal, desired[terminal.session_id])


def ensure_running() -> None:
    """Start the housekeeping task of the running event loop, once."""
    loop = asyncio.get_running_loop()
    if loop not in _watchers:
        _watchers[loop] = loop.create_task(_watch_modes(loop), context=contextvars.Context())

"""Periodic flag work: save the safeguard's figures, run its checks, advance ramps.

Runs in every server process (``start()``, on the server's event loop, for the embedded default)
and in ``manage.py flag_tasks`` (a loop, for deployments that prefer a worker of its own). Each
process saves its own figures about once a second; a check and a ramp tick run at most once per
``TERMSYS_SAFEGUARD_INTERVAL`` over all processes (a lock in the shared cache).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time

from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from featureflags import safeguard
from sessions_app.dbthread import db_call

logger = logging.getLogger(__name__)

LOCK_KEY = "termsys:flag-tasks:lock"
_running: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}


def ramp_tick() -> list[str]:
    """Advance each flag's ramp one step where it is due; return the flags advanced.

    Due: not rolled back, held at least ``holdSeconds`` at its step, on for at least
    ``minExposed`` distinct users during the step, and the safeguard's last check healthy.
    """
    from featureflags.models import Flag
    from featureflags.services import flag_ramp_advance

    advanced = []
    for flag in Flag.objects.filter(rolled_back=False).exclude(ramp={}):
        steps = list(flag.ramp.get("steps") or [])
        step = flag.ramp_step
        if step is None or step + 1 >= len(steps):
            continue
        hold = float(flag.ramp.get("holdSeconds", 3600))
        minimum = int(flag.ramp.get("minExposed", 100))
        held = (timezone.now() - flag.ramp_step_at).total_seconds() if flag.ramp_step_at else 0
        exposed = safeguard.exposed_users(flag.name, step)
        if held < hold or exposed < minimum or not safeguard.healthy(flag.name):
            continue
        flag_ramp_advance(
            flag.name,
            actor="ramp",
            source="schedule",
            reason=(
                f"ramp step {step + 1}/{len(steps) - 1}: held {held:.0f} s at {steps[step]} % "
                f"with {exposed} users exposed; safeguard healthy"
            ),
        )
        advanced.append(flag.name)
    return advanced


def run_due() -> None:
    """Save this process's figures; check and ramp if no process did in this interval."""
    safeguard.flush()
    interval = settings.TERMSYS_SAFEGUARD_INTERVAL
    try:
        mine = cache.add(LOCK_KEY, time.time(), timeout=interval)
    except Exception:
        logger.warning("flag tasks: cache unavailable; skipping this check", exc_info=True)
        return
    if not mine:
        return
    try:
        safeguard.check()
        ramp_tick()
    except Exception:
        logger.exception("flag tasks failed")


async def _loop() -> None:
    while True:
        await asyncio.sleep(1.0)
        try:
            await db_call(run_due)
        except Exception:
            logger.exception("flag tasks failed")


def start() -> None:
    """Run the periodic flag work on this event loop, once (unless TERMSYS_FLAG_TASKS is off:
    then ``manage.py flag_tasks`` does it)."""
    if not settings.TERMSYS_FLAG_TASKS:
        return
    loop = asyncio.get_running_loop()
    task = _running.get(loop)
    if task is None or task.done():
        _running[loop] = loop.create_task(_loop(), context=contextvars.Context())

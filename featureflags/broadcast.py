"""Tell every server process at once that a flag changed, over the channel layer.

Each process runs one listener (started with the server, see ``start_listener``) on a group
of the channel layer. A change sends ``flag.changed`` to the group; each listener drops its
process's cached copies of the flag and runs the hooks registered with ``on_change``
(housekeeping re-evaluates storage modes at once: the flush-then-switch of live sessions).
Terminal bytes never travel this way, and a terminal keeps working while Redis is down: the
listener only retries, and housekeeping's once-a-second re-check covers the gap. Without Redis
the layer reaches only its own process; changes made elsewhere arrive through the database's
change marker instead (``featureflags.marker``, which calls ``dispatch_here``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)

GROUP = "termsys.flags"
RETRY_SECONDS = 1.0
# Group membership expires in the channel layer (a day by default): join again this often.
REJOIN_SECONDS = 3600.0

Hook = Callable[[str], Awaitable[None]]
_hooks: list[Hook] = []
_listeners: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}
_sending: set[asyncio.Future] = set()
_joined: set[asyncio.AbstractEventLoop] = set()


def on_change(hook: Hook) -> None:
    """Run ``await hook(flag_name)`` in every process whenever a flag changes."""
    if hook not in _hooks:
        _hooks.append(hook)


def flag_changed(name: str) -> None:
    """Announce a change to every process (from sync code, after commit). Never raises."""
    layer = get_channel_layer()
    if layer is None:
        return
    message = {"type": "flag.changed", "name": name}
    try:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            async_to_sync(layer.group_send)(GROUP, message)
        else:  # called from async code: send without blocking the loop
            task = asyncio.ensure_future(layer.group_send(GROUP, message))
            _sending.add(task)
            task.add_done_callback(_sending.discard)
    except Exception:
        logger.warning("could not broadcast the change of flag %s", name, exc_info=True)


def dispatch_here(names: list[str]) -> None:
    """Run the change hooks for ``names`` on each event loop of this process whose listener
    runs, as a message over the channel layer would (from any thread). Never raises."""
    for loop, task in list(_listeners.items()):
        if task.done() or loop.is_closed():
            continue
        for name in names:
            try:
                asyncio.run_coroutine_threadsafe(_dispatch(name), loop)
            except RuntimeError:  # the loop closed meanwhile
                break


async def _dispatch(name: str) -> None:
    from featureflags.evaluation import forget

    forget(name)
    for hook in list(_hooks):
        try:
            await hook(name)
        except Exception:
            logger.exception("flag change hook %r failed for %s", hook, name)


async def _listen() -> None:
    channel = None
    while True:
        layer = get_channel_layer()
        if layer is None:
            return
        try:
            # One channel for the listener's life: a change sent to it while the listener
            # retries after an error waits there and is read on the next try, not lost.
            if channel is None:
                channel = await layer.new_channel()
            while True:
                await layer.group_add(GROUP, channel)
                _joined.add(asyncio.get_running_loop())
                try:
                    async with asyncio.timeout(REJOIN_SECONDS):
                        while True:
                            message = await layer.receive(channel)
                            if message.get("type") == "flag.changed":
                                await _dispatch(str(message.get("name", "")))
                except TimeoutError:
                    continue
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("flag broadcast listener: %s; retrying in %ss", exc, RETRY_SECONDS)
            await asyncio.sleep(RETRY_SECONDS)


def start_listener() -> None:
    """Start this event loop's listener, once."""
    loop = asyncio.get_running_loop()
    task = _listeners.get(loop)
    if task is None or task.done():
        _listeners[loop] = loop.create_task(_listen(), context=contextvars.Context())


def listening() -> bool:
    """Whether this event loop's listener has joined the group (changes reach it now)."""
    return asyncio.get_running_loop() in _joined


async def stop_listener() -> None:
    """Stop this event loop's listener (before the loop closes: a channel layer allows one
    receiving loop at a time)."""
    loop = asyncio.get_running_loop()
    task = _listeners.pop(loop, None)
    _joined.discard(loop)
    if task is not None and not task.done():
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
    await _finish_receive_cleaners()


async def _finish_receive_cleaners() -> None:
    """Let channels_redis finish what it started for the messages already received.

    After each message it starts a task that removes the message from its backup queue and,
    when done, releases a lock that every later receive on this layer takes first. A loop
    closed with such a task pending leaves the lock taken for good: the next loop's listener
    then waits on it forever and hears nothing (seen in the test suite, where every test has
    a loop of its own; a server's loop lives as long as its listener).
    """
    layer = get_channel_layer()
    cleaners = [
        t
        for t in list(getattr(layer, "receive_cleaners", ()))
        if not t.done() and t.get_loop() is asyncio.get_running_loop()
    ]
    if cleaners:
        await asyncio.wait(cleaners, timeout=5)

"""Close the terminal sockets of a login that has ended (logged out, expired, deleted).

A WebSocket is authenticated once, at its handshake; without this, a terminal open in another
browser tab kept working after its user logged out in the first. Two ways, for the two places a
logout can happen:

- in this process: Django's ``user_logged_out`` signal closes the sockets of that login at once;
- in another server process (or an expired or deleted session): about every two seconds the
  housekeeping loop asks the session store which of its attached clients' logins still exist.

A closed socket gets an ``error`` ``signed_out`` and close code 4401; the page goes to the login.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth.signals import user_logged_out
from django.dispatch import receiver
from django.utils import timezone

from sessions_app import terminals
from sessions_app.dbthread import db_call

logger = logging.getLogger(__name__)

CHECK_SECONDS = 2.0
MSG_SIGNED_OUT = "You have been signed out; log in again to use your terminals."
DATABASE_ENGINES = (
    "django.contrib.sessions.backends.db",
    "django.contrib.sessions.backends.cached_db",
)


def _clients_with_keys(
    loop: asyncio.AbstractEventLoop | None = None,
) -> list[tuple[terminals.LiveTerminal, Any]]:
    """Return the attached clients of this process that know their login's session key, each
    with its terminal."""
    return [
        (terminal, client)
        for terminal in terminals.all_terminals()
        if loop is None or terminal.loop is loop
        for client in list(terminal.clients)
        if getattr(client, "session_key", None)
    ]


def sessions_alive(keys: Iterable[str]) -> set[str]:
    """Return which of the login session ``keys`` still exist and have not expired."""
    keys = set(keys)
    if settings.SESSION_ENGINE in DATABASE_ENGINES:
        from django.contrib.sessions.models import Session

        return set(
            Session.objects.filter(
                session_key__in=keys, expire_date__gt=timezone.now()
            ).values_list("session_key", flat=True)
        )
    store = import_module(settings.SESSION_ENGINE).SessionStore
    return {key for key in keys if store().exists(key)}


async def end_signed_out(loop: asyncio.AbstractEventLoop) -> None:
    """Close this loop's terminal sockets whose login no longer exists."""
    clients = _clients_with_keys(loop)
    if not clients:
        return
    try:
        alive = await db_call(sessions_alive, {client.session_key for _, client in clients})
    except Exception:  # the database is down: the terminals keep working meanwhile
        logger.warning("could not check the logins of attached terminals", exc_info=True)
        return
    for _, client in clients:
        if client.session_key not in alive:
            client.sign_out()


@receiver(user_logged_out, dispatch_uid="termsys-terminals-sign-out")
def _on_logout(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    """Close this process's terminal sockets of the login that is logging out, at once."""
    key = getattr(getattr(request, "session", None), "session_key", None)
    if not key:
        return
    for terminal, client in _clients_with_keys():
        if client.session_key == key:
            terminal.loop.call_soon_threadsafe(client.sign_out)

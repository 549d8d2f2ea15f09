"""Close the terminal sockets of a login that has ended (logged out, expired, deleted, or no
longer valid: its user was deleted or deactivated, or their password changed).

A WebSocket is authenticated once, at its handshake; without this, a terminal open in another
browser tab kept working after its user logged out in the first. Two ways, for the two places a
logout can happen:

- in this process: Django's ``user_logged_out`` signal closes the sockets of that login at once;
- in another server process (or an expired or deleted session, or a password changed): about
  every two seconds the housekeeping loop asks the session store which of its attached
  clients' logins are still valid, by the test Django applies at a login's next request.

A closed socket gets an ``error`` ``signed_out`` and close code 4401; the page goes to the login,
unless its cookie is still a login (Django gave it a new key: a password changed in another tab),
and then connects again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.contrib.auth.signals import user_logged_out
from django.core.exceptions import ValidationError
from django.dispatch import receiver
from django.utils import timezone
from django.utils.crypto import constant_time_compare

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


def _session_data(keys: set[str]) -> dict[str, dict[str, Any]]:
    """Return the data of those of the login session ``keys`` that exist and have not expired."""
    if settings.SESSION_ENGINE in DATABASE_ENGINES:
        from django.contrib.sessions.models import Session

        found = Session.objects.filter(session_key__in=keys, expire_date__gt=timezone.now())
        return {session.session_key: session.get_decoded() for session in found}
    store = import_module(settings.SESSION_ENGINE).SessionStore
    data = {}
    for key in keys:
        session = store(session_key=key)
        if session.exists(key):
            data[key] = session.load()
    return data


def _password_unchanged(session_hash: Any, user: Any) -> bool:
    """Whether the login's password hash is the user's, under the secret key or a fallback."""
    if not session_hash:
        return False
    if constant_time_compare(session_hash, user.get_session_auth_hash()):
        return True
    return any(
        constant_time_compare(session_hash, fallback)
        for fallback in user.get_session_auth_fallback_hash()
    )


def logins_valid(keys: Iterable[str]) -> set[str]:
    """Return which of the login session ``keys`` still hold a valid login.

    Valid as ``django.contrib.auth.get_user`` has it at the login's next request: the session
    exists and has not expired, names an authentication backend that is still configured and a
    user that backend still returns (deleted or deactivated users it does not), and holds the
    hash of that user's current password. The sessions are only read: Django ends an invalid
    one at its next request, as it always does.
    """
    backends = settings.AUTHENTICATION_BACKENDS
    user_pk = get_user_model()._meta.pk
    users: dict[tuple[str, Any], Any] = {}
    valid = set()
    for key, data in _session_data(set(keys)).items():
        user_id, backend_path = data.get(SESSION_KEY), data.get(BACKEND_SESSION_KEY)
        if user_id is None or backend_path not in backends:
            continue
        try:
            user_id = user_pk.to_python(user_id)
        except ValidationError:
            continue
        if (backend_path, user_id) not in users:
            users[backend_path, user_id] = load_backend(backend_path).get_user(user_id)
        user = users[backend_path, user_id]
        if user is None:
            continue
        if hasattr(user, "get_session_auth_hash") and not _password_unchanged(
            data.get(HASH_SESSION_KEY), user
        ):
            continue
        valid.add(key)
    return valid


async def end_signed_out(loop: asyncio.AbstractEventLoop) -> None:
    """Close this loop's terminal sockets whose login has ended or is no longer valid."""
    clients = _clients_with_keys(loop)
    if not clients:
        return
    try:
        alive = await db_call(logins_valid, {client.session_key for _, client in clients})
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

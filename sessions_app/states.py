"""The terminal session state machine, enforced here and nowhere else.

``creating -> active <-> detached -> exited | killed``, anything -> ``error``. One way back:
a session whose shell ended because its server process went away (``end_reason``
``server_restarted``) may be revived, ``exited -> creating``, with a new shell in the same
tab; ``services.session_revive`` checks the reason.
"""

from __future__ import annotations

from django.db import models


class SessionState(models.TextChoices):
    CREATING = "creating"
    ACTIVE = "active"
    DETACHED = "detached"
    EXITED = "exited"
    KILLED = "killed"
    ERROR = "error"


S = SessionState
TRANSITIONS: dict[str, frozenset[str]] = {
    S.CREATING: frozenset({S.ACTIVE, S.EXITED, S.KILLED, S.ERROR}),
    S.ACTIVE: frozenset({S.DETACHED, S.EXITED, S.KILLED, S.ERROR}),
    S.DETACHED: frozenset({S.ACTIVE, S.EXITED, S.KILLED, S.ERROR}),
    S.EXITED: frozenset({S.CREATING, S.ERROR}),
    S.KILLED: frozenset({S.ERROR}),
    S.ERROR: frozenset(),
}
LIVE_STATES = frozenset({S.CREATING, S.ACTIVE, S.DETACHED})


class InvalidTransition(Exception):
    """A state change the state machine does not allow."""

    def __init__(self, session_id: str, current: str, target: str) -> None:
        allowed = ", ".join(sorted(TRANSITIONS.get(current, ()))) or "none"
        super().__init__(
            f"session {session_id}: cannot go from {current!r} to {target!r} (allowed: {allowed})"
        )
        self.current = current
        self.target = target


def check_transition(session_id: str, current: str, target: str) -> None:
    """Raise InvalidTransition unless ``current -> target`` is allowed."""
    if target not in TRANSITIONS.get(current, frozenset()):
        raise InvalidTransition(session_id, current, target)

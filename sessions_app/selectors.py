"""Reads used by several callers. A user only ever sees their own projects and sessions."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser

from sessions_app import storage
from sessions_app.errors import NotFound
from sessions_app.models import Project
from sessions_app.storage import SessionRecord


def project_list(*, user: AbstractBaseUser) -> list[Project]:
    return list(Project.objects.filter(owner=user))


# Primary keys are 64-bit; a larger number names no project (and no database could look it up).
_ID_MAX = 2**63 - 1


def project_get(*, user: AbstractBaseUser, project_id: int | str) -> Project:
    """Return the user's project, or raise NotFound (also for another user's project)."""
    try:
        pk = int(project_id)
        if not 0 < pk <= _ID_MAX:
            raise ValueError(pk)
        return Project.objects.get(pk=pk, owner=user)
    except (Project.DoesNotExist, ValueError, TypeError, OverflowError):
        raise NotFound(f"No project {project_id}.", details={"projectId": project_id}) from None


def session_get(*, user: AbstractBaseUser, session_id: str) -> SessionRecord:
    """Return the user's session, or raise NotFound (also for another user's session)."""
    record = storage.find(session_id) if isinstance(session_id, str) else None
    if record is None or record.user_id != user.pk:
        raise NotFound(f"No session {session_id}.", details={"sessionId": session_id})
    return record


def session_get_for_viewer(*, user: AbstractBaseUser, session_id: str) -> SessionRecord:
    """Return a session ``user`` may watch: their own, or any session for staff.

    Anyone else's session is NotFound, as in ``session_get``.
    """
    record = storage.find(session_id) if isinstance(session_id, str) else None
    if record is None or (record.user_id != user.pk and not user.is_staff):
        raise NotFound(f"No session {session_id}.", details={"sessionId": session_id})
    return record


def session_find(*, session_id: str) -> SessionRecord | None:
    """Return the newest record of a session, whoever owns it (for callers already checked)."""
    return storage.find(session_id)


def session_list(*, user: AbstractBaseUser) -> list[SessionRecord]:
    return storage.list_for_user(user.pk)


def project_sessions(*, user: AbstractBaseUser, project_id: int | str) -> list[SessionRecord]:
    project = project_get(user=user, project_id=project_id)
    return storage.list_for_project(project.pk)

"""``manage.py sessions list``: an operator finds a session's id (for ``export``) by its user,
project or state, newest activity first."""

from __future__ import annotations

import io
import socket
import subprocess
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from sessions_app.models import SessionState, TerminalSession
from tests.factories import ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db


def _ended_process() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# A server process of this machine that has ended: its sessions' shells are gone with it.
DEAD = f"{socket.gethostname()}:{_ended_process()}:0123abcd"


def listed(*args: str) -> list[str]:
    out = io.StringIO()
    call_command("sessions", "list", *args, stdout=out)
    return out.getvalue().splitlines()


@pytest.fixture
def sessions():
    now = timezone.now()
    ana, bo = UserFactory(username="ana"), UserFactory(username="bo")
    api, web = ProjectFactory(owner=ana, name="API"), ProjectFactory(owner=bo, name="web")

    def make(project, tab, state, minutes_ago, **fields):
        record = TerminalSession.objects.create(
            project=project, user=project.owner, tab_name=tab, state=state, **fields
        )
        TerminalSession.objects.filter(pk=record.pk).update(
            last_activity=now - timedelta(minutes=minutes_ago)
        )
        return record.pk

    return {
        "build": make(api, "build", SessionState.ACTIVE, 5, output_bytes=3 * 1024 * 1024),
        "old": make(api, "Terminal 2", SessionState.EXITED, 60, title="vim notes.md"),
        "named": make(web, "deploy", SessionState.DETACHED, 1, title="ssh", tab_named=True),
        "gone": make(web, "Terminal 1", SessionState.DETACHED, 2, node=DEAD, closed_at=now),
    }


def test_sessions_are_listed_newest_first_with_what_their_tab_shows(sessions):
    lines = listed()
    assert [line.rsplit(" ", 1)[-1] for line in lines[:-1]] == [
        sessions["named"],
        sessions["gone"],
        sessions["build"],
        sessions["old"],
    ]
    assert " bo web / deploy (detached, 0 bytes) " in lines[0]  # the name the user gave
    assert " ana API / build (active, 3.0 MiB) " in lines[2]
    assert " ana API / vim notes.md (exited, 0 bytes) " in lines[3]  # else the title
    assert lines[-1] == "4 session(s)."


def test_a_session_whose_server_is_gone_or_whose_tab_was_closed_says_so(sessions):
    line = next(line for line in listed() if line.endswith(sessions["gone"]))
    assert "(detached, its server process is gone, tab closed, 0 bytes)" in line


def test_filters_by_user_project_and_state(sessions):
    assert [line.rsplit(" ", 1)[-1] for line in listed("--user", "ana")[:-1]] == [
        sessions["build"],
        sessions["old"],
    ]
    assert len(listed("--project", "api")) == 3  # a project's name in any case
    live = [line.rsplit(" ", 1)[-1] for line in listed("--state", "live")[:-1]]
    assert live == [sessions["named"], sessions["gone"], sessions["build"]]
    assert listed("--state", "exited")[0].endswith(sessions["old"])
    assert listed("--limit", "1")[-1] == "1 session(s) of 4 (raise --limit)."
    assert listed("--project", "nothing-here") == ["0 session(s)."]


def test_a_bad_user_or_limit_is_a_clear_error(sessions):
    with pytest.raises(CommandError, match="no user 'nobody'"):
        listed("--user", "nobody")
    with pytest.raises(CommandError, match="--limit must be at least 1, not 0"):
        listed("--limit", "0")

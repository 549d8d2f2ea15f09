"""The terminal WebSocket with a real PTY running a real shell."""

from __future__ import annotations

import asyncio
import os
import secrets

import pytest
from channels.db import database_sync_to_async

from sessions_app import conf, consumers, services
from sessions_app.models import SessionEvent, TerminalSession
from sessions_app.pty import is_running

pytestmark = pytest.mark.django_db(transaction=True)


async def test_echo_round_trip(user, session, connect):
    term = await connect(user, session.id)
    hello = await term.control("hello")
    assert hello["session"] == session.id
    assert hello["state"] == "active"
    marker = f"hi-{secrets.token_hex(4)}"
    await term.type(f"echo {marker}-$((6*7))\r")
    await term.read_until(f"{marker}-42".encode())


async def test_shell_runs_in_project_dir_with_xterm_term(user, project, session, connect):
    term = await connect(user, session.id)
    await term.type('printf "[%s|%s]\\n" "$PWD" "$TERM"\r')
    await term.read_until(f"[{project.path}|xterm-256color]".encode())


async def test_server_secrets_do_not_reach_the_shell(
    user, project, live_terminals, connect, monkeypatch
):
    monkeypatch.setenv("SECRET_KEY", "server-secret-key-value")
    monkeypatch.setenv("DATABASE_URL", "postgres://leak@127.0.0.1/leak")
    monkeypatch.setenv("REDIS_URL", "redis://leak")
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "termsys.settings")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-leak")
    record = await services.session_create(user=user, project_id=project.pk)
    term = await connect(user, record.id)
    await term.type("env; echo END-OF-$((1+1))-ENV\r")
    out = (await term.read_until(b"END-OF-2-ENV\r\n")).decode(errors="replace")
    for leaked in (
        "server-secret-key-value",
        "leak@127.0.0.1",
        "redis://leak",
        "DJANGO_SETTINGS_MODULE",
        "aws-leak",
    ):
        assert leaked not in out
    assert "TERM=xterm-256color" in out


async def test_resize_reaches_the_pty_and_is_clamped(user, session, connect):
    term = await connect(user, session.id)
    await term.send_json({"type": "resize", "cols": 132, "rows": 43})
    await term.type("stty size\r")
    await term.read_until(b"43 132")
    await term.send_json({"type": "resize", "cols": 100000, "rows": -5})
    await term.type("stty size; echo SIZE-$((0))-DONE\r")
    out = await term.read_until(b"SIZE-0-DONE\r\n")
    assert f"{conf.MIN_ROWS} {conf.MAX_COLS}".encode() in out


async def test_replay_after_reconnect(user, session, connect):
    term = await connect(user, session.id)
    marker = f"kept-{secrets.token_hex(4)}"
    await term.type(f"echo {marker}-$((5*5))\r")
    await term.read_until(f"{marker}-25\r\n".encode())
    await term.close()

    again = await connect(user, session.id)
    hello = await again.control("hello")
    assert hello["offset"] == 0 and hello["end"] > 0
    await again.read_until(f"{marker}-25\r\n".encode())
    # and the session is live again: typing still works
    await again.type("echo still-$((1+1))\r")
    await again.read_until(b"still-2")


async def test_two_clients_see_the_same_stream(user, session, connect):
    first = await connect(user, session.id)
    second = await connect(user, session.id)
    await first.type("echo shared-$((3*3))\r")
    await first.read_until(b"shared-9")
    await second.read_until(b"shared-9")


async def test_detach_and_attach_are_recorded(user, session, connect):
    term = await connect(user, session.id)
    await term.control("hello")
    await term.close()
    state = await database_sync_to_async(lambda: TerminalSession.objects.get(pk=session.id).state)()
    assert state == "detached"
    again = await connect(user, session.id)
    await again.control("hello")
    kinds = await database_sync_to_async(
        lambda: list(
            SessionEvent.objects.filter(session_id=session.id).values_list("kind", flat=True)
        )
    )()
    assert kinds[:2] == ["created", "started"]
    assert "detached" in kinds and kinds[-1] == "attached"


async def test_other_users_session_is_refused_and_nothing_spawned(
    user, other_user, session, connect
):
    before = len(os.listdir("/proc"))
    term = await connect(other_user, session.id)
    assert await term.closed() == 4404
    error = await term.control("error")
    assert error["code"] == "not_found"
    assert abs(len(os.listdir("/proc")) - before) < 3


async def test_unknown_session_closes_4404(user, connect, db):
    term = await connect(user, "session_0000000000000_nosuchxx")
    assert await term.closed() == 4404


async def test_anonymous_is_refused_with_4401(session, connect):
    from django.contrib.auth.models import AnonymousUser

    term = await connect(AnonymousUser(), session.id)
    assert await term.closed() == 4401


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "malformed_json"),
        ("[" * 5000 + "]" * 5000, "malformed_json"),
        ('"just a string"', "malformed_message"),
        ('{"type": 7}', "malformed_message"),
        ('{"type": "launch_missiles"}', "unknown_type"),
        ('{"type": "resize", "cols": "wide", "rows": 10}', "invalid_resize"),
        ('{"type": "resize", "cols": true, "rows": 10}', "invalid_resize"),
        ('{"type": "ack", "bytes": -1}', "invalid_ack"),
    ],
)
async def test_bad_control_frames_get_an_error_and_the_terminal_keeps_working(
    user, session, connect, frame, code
):
    term = await connect(user, session.id)
    await term.ws.send_to(text_data=frame)
    error = await term.control("error")
    assert error["code"] == code
    assert error["message"]
    await term.type("echo alive-$((2+3))\r")
    await term.read_until(b"alive-5")


async def test_ping_pong(user, session, connect):
    term = await connect(user, session.id)
    await term.send_json({"type": "ping"})
    assert await term.control("pong") == {"type": "pong"}


async def test_oversized_frames_close_4413_and_the_session_survives(user, session, connect):
    term = await connect(user, session.id)
    await term.ws.send_to(
        text_data='{"type":"ping","pad":"' + "x" * conf.MAX_CONTROL_FRAME_BYTES + '"}'
    )
    assert await term.closed() == 4413
    assert any(c.get("code") == "payload_too_large" for c in term.controls)

    big = await connect(user, session.id)
    await big.ws.send_to(bytes_data=b"a" * (conf.MAX_INPUT_FRAME_BYTES + 1))
    assert await big.closed() == 4413

    fine = await connect(user, session.id)
    await fine.type("echo survived-$((4+4))\r")
    await fine.read_until(b"survived-8")


async def test_exit_is_reported_and_history_replayed_after(user, session, connect):
    term = await connect(user, session.id)
    await term.type("echo last-$((1+1))-words; exit 3\r")
    exit_message = await term.control("exit")
    assert exit_message["exitCode"] == 3
    assert exit_message["state"] == "exited"
    await term.ws.send_to(bytes_data=b"ls\r")
    assert (await term.control("error"))["message"] == consumers.MSG_ENDED

    later = await connect(user, session.id)
    hello = await later.control("hello")
    assert hello["state"] == "exited"
    await later.read_until(b"last-2-words")
    assert (await later.control("exit"))["exitCode"] == 3


async def test_session_owned_by_another_live_server_process_is_refused_4409(user, project, connect):
    import socket

    other_node = f"{socket.gethostname()}:{os.getppid()}:feedbeef"  # a process that is alive
    session = await database_sync_to_async(TerminalSession.objects.create)(
        project=project, user=user, state="active", node=other_node
    )
    term = await connect(user, session.id)
    assert await term.closed() == 4409
    assert "another server process" in (await term.control("error"))["message"]


async def test_session_of_a_dead_server_process_is_shown_exited(user, project, connect):
    import socket

    dead_node = f"{socket.gethostname()}:999999999:feedbeef"
    session = await database_sync_to_async(TerminalSession.objects.create)(
        project=project, user=user, state="detached", node=dead_node
    )
    term = await connect(user, session.id)
    assert (await term.control("hello"))["state"] == "exited"
    event = await database_sync_to_async(
        lambda: SessionEvent.objects.filter(session_id=session.id).latest("id")
    )()
    assert (event.kind, event.data["reason"]) == ("exited", "server restarted")


async def test_resume_from_an_offset_sends_only_the_missing_bytes(user, session, connect):
    from channels.routing import URLRouter
    from channels.testing import WebsocketCommunicator

    from sessions_app.routing import websocket_urlpatterns
    from tests.conftest import Terminal

    term = await connect(user, session.id)
    await term.type("echo part-$((1))-one\r")
    seen = await term.read_until(b"part-1-one\r\n")
    have = len(seen)
    await term.close()

    communicator = WebsocketCommunicator(
        URLRouter(websocket_urlpatterns), f"/ws/terminals/{session.id}/?offset={have}"
    )
    communicator.scope["user"] = user
    assert (await communicator.connect(timeout=10))[0]
    again = Terminal(communicator)
    hello = await again.control("hello")
    assert hello["offset"] == have and hello["pruned"] is False
    await again.type("echo part-$((2))-two\r")
    rest = await again.read_until(b"part-2-two\r\n")
    assert b"part-1-one" not in rest  # nothing repeated
    full = await connect(user, session.id)
    everything = await full.read_until(b"part-2-two\r\n")
    # what the resumed client got continues exactly where the first left off
    joined = seen + rest
    common = min(len(everything), len(joined))
    assert everything[:common] == joined[:common]
    assert common >= joined.index(b"part-2-two\r\n")
    await again.close()


async def test_idle_sessions_are_ended_and_watched_ones_kept(
    user, project, settings, live_terminals, connect
):
    settings.TERMSYS_IDLE_TIMEOUT = 1
    idle = await services.session_create(user=user, project_id=project.pk, tab_name="idle")
    watched = await services.session_create(user=user, project_id=project.pk, tab_name="watched")
    term = await connect(user, watched.id)
    await term.control("hello")
    for _ in range(100):
        row = await database_sync_to_async(TerminalSession.objects.get)(pk=idle.id)
        if row.state == "killed":
            break
        await asyncio.sleep(0.1)
    assert row.state == "killed"
    event = await database_sync_to_async(
        lambda: SessionEvent.objects.filter(session_id=idle.id, kind="killed").get()
    )()
    assert event.data["reason"] == "idle"
    assert not is_running(idle.pid)
    await term.type("echo still-$((9*9))\r")
    await term.read_until(b"still-81")  # the session with a client attached lives on


async def test_per_user_limit_is_enforced_across_projects(
    user, project, settings, live_terminals, tmp_path
):
    from sessions_app.errors import SessionLimitReached
    from tests.factories import ProjectFactory

    settings.TERMSYS_MAX_SESSIONS_PER_USER = 1
    other = await database_sync_to_async(ProjectFactory)(owner=user, path=str(tmp_path))
    await services.session_create(user=user, project_id=project.pk)
    with pytest.raises(SessionLimitReached, match="TERMSYS_MAX_SESSIONS_PER_USER=1"):
        await services.session_create(user=user, project_id=other.pk)


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", True),
        ("http://127.0.0.1:8001", "127.0.0.1:8000", False),  # another port: another site
        ("http://localhost:8000", "127.0.0.1:8000", False),
        ("https://localhost", "localhost", True),  # a proxy's Host without the default port
        ("http://localhost", "localhost", True),
        ("https://localhost:8443", "localhost", False),
        ("http://[::1]:8000", "[::1]:8000", True),
        ("http://evil.example@127.0.0.1:8000", "127.0.0.1:8000", False),
        ("http://evil.example", "evil.example", False),  # not in ALLOWED_HOSTS
        ("https://app.example.com", "127.0.0.1:8000", True),  # CSRF_TRUSTED_ORIGINS
        ("https://a.corp.example", "127.0.0.1:8000", True),  # https://*.corp.example
        ("http://a.corp.example", "127.0.0.1:8000", False),
        ("https://corp.example", "127.0.0.1:8000", False),
        ("null", "127.0.0.1:8000", False),
        ("http://127.0.0.1:8000/path", "127.0.0.1:8000", False),
    ],
)
def test_a_terminal_socket_opens_only_from_the_pages_own_or_a_trusted_origin(
    settings, origin, host, allowed
):
    from termsys.origin import origin_allowed

    settings.ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
    settings.CSRF_TRUSTED_ORIGINS = ["https://app.example.com", "https://*.corp.example"]
    scope = {"headers": [(b"origin", origin.encode()), (b"host", host.encode())]}
    assert origin_allowed(scope) is allowed

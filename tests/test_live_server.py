"""What only a real server shows: Origin checks, auth cookies, history after a restart."""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib.admin.utils import quote
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.sync.client import connect as ws_connect

from sessions_app.pty import is_running


def open_terminal(client, name: str) -> dict:
    status, body = client.api("POST", "/api/projects", {"name": name})
    assert status == 201, body
    status, body = client.api(
        "POST", "/api/terminal/create", {"projectId": body["project"]["id"], "tabName": name}
    )
    assert status == 201, body
    return body


def ws_url(server, connection_url: str) -> str:
    return server.url.replace("http://", "ws://") + connection_url


def terminal_socket(server, client, body: dict):
    """Open the terminal socket of ``body`` (a create answer) as ``client``, from the page's
    own origin."""
    return ws_connect(
        ws_url(server, body["connectionUrl"]),
        origin=server.url,
        additional_headers=client.ws_headers(),
        open_timeout=10,
    )


def read_until(ws, needle: bytes, timeout: float = 10) -> tuple[bytes, list[dict]]:
    out, controls = bytearray(), []
    deadline = time.monotonic() + timeout
    while needle not in out:
        frame = ws.recv(timeout=max(0.05, deadline - time.monotonic()))
        if isinstance(frame, bytes):
            out += frame
        else:
            controls.append(json.loads(frame))
    return bytes(out), controls


def test_foreign_origin_is_refused_before_anything_spawns(live_termsys, live_client):
    body = open_terminal(live_client, "origin")
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(
            ws_url(live_termsys, body["connectionUrl"]),
            origin="http://evil.example",
            additional_headers=live_client.ws_headers(),
            open_timeout=10,
        )
    assert refused.value.response.status_code == 403
    # the same request from the page's own origin is accepted
    with ws_connect(
        ws_url(live_termsys, body["connectionUrl"]),
        origin=live_termsys.url,
        additional_headers=live_client.ws_headers(),
        open_timeout=10,
    ) as ws:
        hello = json.loads(ws.recv(timeout=10))
        assert hello["type"] == "hello"


def test_websocket_without_login_closes_4401(live_termsys, live_client):
    body = open_terminal(live_client, "anon")
    with ws_connect(
        ws_url(live_termsys, body["connectionUrl"]), origin=live_termsys.url, open_timeout=10
    ) as ws:
        error = json.loads(ws.recv(timeout=10))
        assert error["code"] == "not_authenticated"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.protocol.close_rcvd.code == 4401


def masked(opcode: Opcode, data: bytes) -> bytes:
    """One client frame as it goes on the wire (masked, RFC 6455)."""
    return Frame(opcode, data).serialize(mask=True, extensions=[])


def test_typing_between_control_frames_reaches_the_shell_whole_and_in_order(
    live_termsys, live_client
):
    """Input frames take the server's short path when nothing is queued before them and the
    ordinary one otherwise; mixed in one write with control frames, none is lost, none
    overtakes another."""
    body = open_terminal(live_client, "burst")
    with terminal_socket(live_termsys, live_client, body) as ws:
        read_until(ws, b"# ")
        words = " ".join(f"w{n}" for n in range(120))
        typed = f"printf '<%s>' {words}; echo\r".encode()
        wire = bytearray()
        for n, at in enumerate(range(0, len(typed), 3)):
            wire += masked(Opcode.BINARY, typed[at : at + 3])
            if n % 2:
                wire += masked(Opcode.TEXT, b'{"type":"ack","bytes":0}')
            if n % 25 == 0:
                wire += masked(Opcode.TEXT, b'{"type":"ping"}')
        ws.socket.sendall(wire)  # one write: the server reads it in as few reads as it can
        expected = "".join(f"<w{n}>" for n in range(120)).encode()
        out, controls = read_until(ws, expected)
        assert out.count(expected) == 1
        assert not [c for c in controls if c["type"] == "error"], controls


def test_a_read_only_viewers_typing_is_refused_and_never_reaches_the_shell(
    live_termsys, live_client
):
    body = open_terminal(live_client, "viewer")
    url = ws_url(live_termsys, body["connectionUrl"])
    headers = live_client.ws_headers()
    viewer_url = url + "?readonly=1"
    with (
        ws_connect(url, origin=live_termsys.url, additional_headers=headers) as owner,
        ws_connect(viewer_url, origin=live_termsys.url, additional_headers=headers) as viewer,
    ):
        read_until(owner, b"# ")
        viewer.send(b"echo peeked-$((6*7))\r")
        assert read_until_control(viewer, "error")["code"] == "read_only"
        owner.send(b"echo owner-$((6*7))\r")
        out, _ = read_until(owner, b"owner-42")
        assert b"peeked" not in out


def test_history_and_exited_state_survive_a_server_restart(live_termsys, live_client):
    body = open_terminal(live_client, "restart")
    marker = f"before-restart-{secrets.token_hex(4)}"
    with terminal_socket(live_termsys, live_client, body) as ws:
        ws.send(f"echo {marker}-$((20+22))\r".encode())
        read_until(ws, f"{marker}-42".encode())
    # Restart at once: output still batched in memory must be stored at shutdown.
    live_termsys.restart()

    status, listed = live_client.api(
        "GET", f"/api/workspace/projects/{body['session']['projectId']}/terminals"
    )
    assert status == 200
    assert listed["terminals"][0]["state"] == "exited"
    with terminal_socket(live_termsys, live_client, body) as ws:
        _, controls = read_until(ws, f"{marker}-42".encode())
        assert controls[0]["type"] == "hello" and controls[0]["state"] == "exited"


def test_admin_filters_sessions_shows_events_and_kills(live_termsys, live_client):
    body = open_terminal(live_client, "admin-kill")
    session_id, pid = body["session"]["id"], body["session"]["pid"]
    base = "/admin/sessions_app/terminalsession/"
    assert session_id in live_client.page(base + "?state__exact=active")
    assert session_id not in live_client.page(base + "?state__exact=exited")
    detail = live_client.page(f"{base}{quote(session_id)}/change/")  # as the admin's links
    assert "started" in detail and "created" in detail  # events inline

    result = live_client.page(
        base, {"action": "kill_sessions", "_selected_action": session_id, "index": "0"}
    )
    assert "Killed 1 session(s)." in result
    _, listed = live_client.api("GET", "/api/terminal/list")
    assert next(s for s in listed["sessions"] if s["id"] == session_id)["state"] == "killed"
    assert not is_running(pid)


def server_rss_kib(server) -> int:
    status = open(f"/proc/{server.process.pid}/status").read()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))


def test_a_client_that_stops_reading_during_yes_keeps_server_memory_bounded(
    live_termsys, live_client
):
    """`yes` runs while the client reads nothing: the server stops reading the PTY at the
    flow-control window instead of buffering, and Ctrl-C then gives the prompt back."""
    body = open_terminal(live_client, "flood-" + secrets.token_hex(2))
    headers = {**live_client.ws_headers(), "Origin": live_termsys.url}
    url = ws_url(live_termsys, body["connectionUrl"])
    with ws_connect(url, additional_headers=headers, max_size=None) as ws:
        read_until(ws, b"# ")  # the prompt
        before = server_rss_kib(live_termsys)
        ws.send(b"yes termsys-flood\r")
        time.sleep(3)  # `yes` writes hundreds of MB in that time; this client reads none
        grown = server_rss_kib(live_termsys) - before
        assert grown < 16 * 1024, f"server grew by {grown} KiB while the client did not read"

        ws.send(b"\x03")
        ws.send(b"echo back-$((20+22))\r")
        seen = read_acking(ws, b"back-42")
        assert len(seen) < 64 * 1024 * 1024  # not everything `yes` could have written


def read_acking(ws, needle: bytes, timeout: float = 30) -> bytes:
    """Read output until ``needle``, acknowledging every 64 KiB as the page does."""
    seen, unacked = bytearray(), 0
    deadline = time.monotonic() + timeout
    while needle not in seen[-4096:]:
        frame = ws.recv(timeout=max(0.05, deadline - time.monotonic()))
        if isinstance(frame, bytes):
            seen += frame
            unacked += len(frame)
            if unacked >= 64 * 1024:  # as the page does once it has rendered output
                ws.send(json.dumps({"type": "ack", "bytes": unacked}))
                unacked = 0
    return bytes(seen)


def wait_for_session(client, session_id: str, check, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, listed = client.api("GET", "/api/terminal/list")
        assert status == 200, listed
        found = next(s for s in listed["sessions"] if s["id"] == session_id)
        if check(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_a_session_is_revived_in_place_after_a_restart_in_its_last_directory(
    live_termsys, live_client
):
    body = open_terminal(live_client, "revive-" + secrets.token_hex(2))
    session_id = body["session"]["id"]
    url = ws_url(live_termsys, body["connectionUrl"])
    folder = f"deep-{secrets.token_hex(3)}"
    headers = live_client.ws_headers()
    with ws_connect(url, origin=live_termsys.url, additional_headers=headers) as ws:
        ws.send(f"mkdir -p {folder}/x && cd {folder}/x && echo before-$((6*7))\r".encode())
        read_until(ws, b"before-42\r\n")
    # the shell's working directory is recorded (from /proc) within about a second of `cd`
    recorded = wait_for_session(live_client, session_id, lambda s: s["cwd"].endswith("/x"))
    assert recorded["cwd"].endswith(f"{folder}/x")
    old_pid = recorded["pid"]

    live_termsys.restart()
    ended = wait_for_session(live_client, session_id, lambda s: s["state"] == "exited")
    assert (ended["state"], ended["revivable"], ended["endReason"]) == (
        "exited",
        True,
        "server_restarted",
    )
    with ws_connect(url, origin=live_termsys.url, additional_headers=headers) as ws:
        _, controls = read_until(ws, b"before-42")
        exit_message = read_until_control(ws, "exit")
        assert exit_message["revivable"] is True and exit_message["cwd"].endswith("/x")

    status, revived = live_client.api("POST", f"/api/terminal/{session_id}/revive", {})
    assert status == 200, revived
    assert revived["session"]["id"] == session_id and revived["session"]["state"] == "active"
    assert revived["session"]["pid"] != old_pid and is_running(revived["session"]["pid"])
    with ws_connect(url, origin=live_termsys.url, additional_headers=headers) as ws:
        ws.send(b"pwd; echo after-$((3*3))\r")
        seen, controls = read_until(ws, b"after-9\r\n")
    assert controls[0]["type"] == "hello" and controls[0]["offset"] == 0
    history, restored, fresh = (
        seen.index(b"before-42"),
        seen.index(b"history restored"),
        seen.index(b"after-9\r\n"),
    )
    assert history < restored < fresh  # the old history above the line, the new shell below
    assert f"{folder}/x\r\n".encode() in seen[restored:]  # pwd: where the old shell was

    status, again = live_client.api("POST", f"/api/terminal/{session_id}/revive", {})
    assert status == 409 and again["error"]["code"] == "conflict"


def read_until_control(ws, kind: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        frame = ws.recv(timeout=max(0.05, deadline - time.monotonic()))
        if isinstance(frame, str) and json.loads(frame).get("type") == kind:
            return json.loads(frame)


def test_a_socket_closed_right_after_a_frame_is_detached_and_holds_no_one_up(
    live_termsys, live_client
):
    """A client that sends a frame the server answers and closes at once (a tab closed, a
    network drop) is detached: its session shows detached, and the next client gets all of
    a large output, not the first ack window of it."""
    body = open_terminal(live_client, "gone-" + secrets.token_hex(2))
    session_id = body["session"]["id"]
    with terminal_socket(live_termsys, live_client, body) as ws:
        read_until(ws, b"# ")
        # A ping and the close in one write: the pong meets a socket already closing.
        ws.socket.sendall(
            masked(Opcode.TEXT, b'{"type":"ping"}') + masked(Opcode.CLOSE, b"\x03\xe8")
        )
        time.sleep(0.5)
        ws.socket.close()
    found = wait_for_session(live_client, session_id, lambda s: s["state"] == "detached")
    assert found["state"] == "detached"

    with terminal_socket(live_termsys, live_client, body) as again:
        again.send(b"seq 1 300000 | tail -c 1500000 | wc -c; echo seq-$((6*7))-done\r")
        assert b"1500000" in read_acking(again, b"seq-42-done")


def test_only_the_pages_own_origin_may_open_a_terminal_socket(live_termsys, live_client):
    """Another port of the same host is another site (a dev server the user runs) that the
    browser would send the session cookie from: it is refused, as are other hosts."""
    body = open_terminal(live_client, "origins")
    url = ws_url(live_termsys, body["connectionUrl"])
    port = live_termsys.port
    for origin in (
        f"http://127.0.0.1:{port + 1}",
        "http://127.0.0.1",
        f"http://localhost:{port}",  # another host name than the page's (127.0.0.1)
        f"http://evil.example@127.0.0.1:{port}",
        "null",
    ):
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(
                url,
                origin=origin,
                additional_headers=live_client.ws_headers(),
                open_timeout=10,
            )
        assert refused.value.response.status_code == 403, origin
    with terminal_socket(live_termsys, live_client, body) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"


def test_a_socket_to_no_terminal_closes_4404_with_a_message(live_termsys, live_client):
    log_before = live_termsys.log.read_text()
    for path in ("/ws/terminals/" + "a" * 65 + "/", "/ws/terminals/caf%C3%A9/", "/ws/other/"):
        with ws_connect(
            live_termsys.url.replace("http://", "ws://") + path,
            origin=live_termsys.url,
            additional_headers=live_client.ws_headers(),
            open_timeout=10,
        ) as ws:
            error = json.loads(ws.recv(timeout=10))
            assert (
                error["code"] == "not_found" and "/ws/terminals/<session id>/" in error["message"]
            )
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
            assert ws.protocol.close_rcvd.code == 4404
    assert "Traceback" not in live_termsys.log.read_text()[len(log_before) :]


def _running_job(live_termsys, live_client, name: str) -> tuple[dict, int, int]:
    """Open a terminal whose shell runs a background job; return it, the shell and the job."""
    body = open_terminal(live_client, name)
    with ws_connect(
        ws_url(live_termsys, body["connectionUrl"]),
        origin=live_termsys.url,
        additional_headers=live_client.ws_headers(),
        open_timeout=10,
    ) as ws:
        read_until(ws, b"# ")
        ws.send(b"sleep 4949 & echo job=$! ok-$((6*7))\r")
        out, _ = read_until(ws, b"ok-42")
    job = int(re.search(rb"job=(\d+) ok-42", out).group(1))
    return body, body["session"]["pid"], job


def _ended(*pids: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while any(is_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(is_running(pid) for pid in pids)


def test_deleting_a_live_session_or_its_project_in_the_admin_ends_its_shells(
    live_termsys, live_client
):
    """A deleted session's shell would run on, listed and limited by nothing."""
    body, shell, job = _running_job(live_termsys, live_client, "del-" + secrets.token_hex(2))
    session_id = body["session"]["id"]
    sessions = "/admin/sessions_app/terminalsession/"
    confirm = live_client.page(f"{sessions}{quote(session_id)}/delete/")
    assert "Are you sure" in confirm
    live_client.page(f"{sessions}{quote(session_id)}/delete/", {"post": "yes"})
    assert _ended(shell, job)
    _, listed = live_client.api("GET", "/api/terminal/list")
    assert session_id not in [s["id"] for s in listed["sessions"]]

    body, shell, job = _running_job(live_termsys, live_client, "delp-" + secrets.token_hex(2))
    project = body["session"]["projectId"]
    live_client.page(f"/admin/sessions_app/project/{project}/delete/", {"post": "yes"})
    assert _ended(shell, job)
    _, listed = live_client.api("GET", "/api/terminal/list")
    assert body["session"]["id"] not in [s["id"] for s in listed["sessions"]]


def _closed_with(ws, timeout: float = 15) -> tuple[int | None, list[dict]]:
    """Read until the server closes ``ws``; return the close code and the control messages."""
    controls = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            frame = ws.recv(timeout=max(0.05, deadline - time.monotonic()))
            if isinstance(frame, str):
                controls.append(json.loads(frame))
    except ConnectionClosed:
        return ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else None, controls
    return None, controls


def django_shell(server, code: str) -> None:
    """Run ``code`` in ``manage.py shell`` against the server's database: another process."""
    server.manage("shell", "-c", code)


def assert_signed_out(ws) -> None:
    """The server closes ``ws`` as a login that ended: ``signed_out``, then 4401."""
    code, controls = _closed_with(ws)
    assert code == 4401
    assert any(c.get("code") == "signed_out" for c in controls), controls


def test_logging_out_closes_the_terminals_of_that_login_in_every_tab(live_termsys):
    """A socket is authenticated at its handshake only: after a logout in one tab, a terminal
    open in another must not keep running commands."""
    from tests.live import Browserless

    client = Browserless(live_termsys)
    client.login()
    body = open_terminal(client, "logout-" + secrets.token_hex(2))
    with terminal_socket(live_termsys, client, body) as ws:
        read_until(ws, b"# ")
        client.page("/accounts/logout/", {})
        assert_signed_out(ws)


def test_a_login_ended_elsewhere_closes_its_terminals(live_termsys):
    """A login deleted or expired outside this server process (another process's logout,
    clearsessions) closes its terminals too, within a few seconds."""
    from tests.live import Browserless

    client = Browserless(live_termsys)
    client.login()
    body = open_terminal(client, "ended-" + secrets.token_hex(2))
    with terminal_socket(live_termsys, client, body) as ws:
        read_until(ws, b"# ")
        key = client.cookie("sessionid")
        django_shell(
            live_termsys,
            "from django.contrib.sessions.models import Session; "
            f"Session.objects.filter(session_key={key!r}).delete()",
        )
        assert_signed_out(ws)


@dataclass
class TwoLogins:
    """A new user logged in twice: one login changes the password, the other is someone
    else's (a stolen cookie, a forgotten device)."""

    name: str
    old: str
    new: str
    changer: Any
    other: Any

    def change_password(self, page: str, old: str | None = None) -> str:
        """Post ``page``'s password form as the changer (``old``: what it types as the old
        password); return the page that answers."""
        form = {"old_password": old or self.old, "new_password1": self.new}
        return self.changer.page(page, {**form, "new_password2": self.new})


def two_logins(server, prefix: str, *, staff: bool = False) -> TwoLogins:
    from tests.live import Browserless

    name = prefix + secrets.token_hex(3)
    old, new = "Old-" + secrets.token_hex(8), "New-" + secrets.token_hex(8)
    django_shell(
        server,
        "from django.contrib.auth.models import User; "
        f"User.objects.create_user({name!r}, password={old!r}, is_staff={staff!r})",
    )
    changer, other = Browserless(server), Browserless(server)
    changer.login(name, old)
    other.login(name, old)
    return TwoLogins(name, old, new, changer, other)


def test_a_password_change_ends_the_users_other_logins_and_the_changer_keeps_its_terminal(
    live_termsys,
):
    """Django ends a login made with an old password at its next page request; a terminal
    socket makes none, so a login taken by someone else kept its shells after the password was
    changed. Now its socket closes and it cannot reconnect; the login that changed the
    password got a new session key from Django, and with it reattaches to its running shell.
    Deactivating the user ends that login too."""
    user = two_logins(live_termsys, "pw-", staff=True)
    name, changer, other = user.name, user.changer, user.other
    mine = open_terminal(changer, "pw-mine-" + secrets.token_hex(2))
    theirs = open_terminal(other, "pw-theirs-" + secrets.token_hex(2))

    with (
        terminal_socket(live_termsys, changer, mine) as ws_mine,
        terminal_socket(live_termsys, other, theirs) as ws_theirs,
    ):
        read_until(ws_mine, b"# ")
        read_until(ws_theirs, b"# ")
        ws_mine.send(b"sleep 1000 &\r")
        read_until(ws_mine, b"# ")
        assert "Password change successful" in user.change_password("/admin/password_change/")
        assert_signed_out(ws_theirs)

    with terminal_socket(live_termsys, other, theirs) as ws_theirs:  # the old login: refused
        code, _ = _closed_with(ws_theirs)
    assert code == 4401
    with terminal_socket(live_termsys, changer, mine) as ws_mine:  # its new key: same shell
        ws_mine.send(b"jobs; echo still-$((6*7))\r")
        out, _ = read_until(ws_mine, b"still-42")
        assert b"sleep 1000" in out

        django_shell(
            live_termsys,
            "from django.contrib.auth.models import User; "
            f"User.objects.filter(username={name!r}).update(is_active=False)",
        )
        assert_signed_out(ws_mine)


def test_a_user_changes_their_password_on_its_page_and_their_other_logins_end(live_termsys):
    """Not only staff (in the admin): every user has a page to change their password, and a
    login someone else holds ends with it, terminals included."""
    from tests.live import Browserless

    user = two_logins(live_termsys, "own-")
    name, new, changer, other = user.name, user.new, user.changer, user.other
    theirs = open_terminal(other, "own-theirs-" + secrets.token_hex(2))
    form = changer.page("/accounts/password/")
    assert "Change your password" in form and 'name="old_password"' in form

    with terminal_socket(live_termsys, other, theirs) as ws:
        read_until(ws, b"# ")
        wrong = user.change_password("/accounts/password/", old="not-it")
        assert "Your old password was entered incorrectly" in wrong
        ws.send(b"echo still-$((3*4))\r")  # a refused change ends nothing
        read_until(ws, b"still-12")

        assert "Password changed" in user.change_password("/accounts/password/")
        assert_signed_out(ws)
    status, _ = other.api("GET", "/api/terminal/list")
    assert status in (401, 403)
    status, listed = changer.api("GET", "/api/terminal/list")  # this login goes on
    assert status == 200 and theirs["session"]["id"] in [s["id"] for s in listed["sessions"]]
    fresh = Browserless(live_termsys)
    fresh.login(name, new)
    assert fresh.api("GET", "/api/terminal/list")[0] == 200

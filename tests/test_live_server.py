"""What only a real daphne server shows: Origin checks, auth cookies, history after a restart."""

from __future__ import annotations

import json
import secrets
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
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


def test_foreign_origin_is_refused_before_anything_spawns(daphne_server, live_client):
    body = open_terminal(live_client, "origin")
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(
            ws_url(daphne_server, body["connectionUrl"]),
            origin="http://evil.example",
            additional_headers=live_client.ws_headers(),
            open_timeout=10,
        )
    assert refused.value.response.status_code == 403
    # the same request from the page's own origin is accepted
    with ws_connect(
        ws_url(daphne_server, body["connectionUrl"]),
        origin=daphne_server.url,
        additional_headers=live_client.ws_headers(),
        open_timeout=10,
    ) as ws:
        hello = json.loads(ws.recv(timeout=10))
        assert hello["type"] == "hello"


def test_websocket_without_login_closes_4401(daphne_server, live_client):
    body = open_terminal(live_client, "anon")
    with ws_connect(
        ws_url(daphne_server, body["connectionUrl"]), origin=daphne_server.url, open_timeout=10
    ) as ws:
        error = json.loads(ws.recv(timeout=10))
        assert error["code"] == "not_authenticated"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.protocol.close_rcvd.code == 4401


def test_history_and_exited_state_survive_a_server_restart(daphne_server, live_client):
    body = open_terminal(live_client, "restart")
    marker = f"before-restart-{secrets.token_hex(4)}"
    url = ws_url(daphne_server, body["connectionUrl"])
    with ws_connect(
        url, origin=daphne_server.url, additional_headers=live_client.ws_headers(), open_timeout=10
    ) as ws:
        ws.send(f"echo {marker}-$((20+22))\r".encode())
        read_until(ws, f"{marker}-42".encode())
    # Restart at once: output still batched in memory must be stored at shutdown.
    daphne_server.restart()

    status, listed = live_client.api(
        "GET", f"/api/workspace/projects/{body['session']['projectId']}/terminals"
    )
    assert status == 200
    assert listed["terminals"][0]["state"] == "exited"
    with ws_connect(
        url, origin=daphne_server.url, additional_headers=live_client.ws_headers(), open_timeout=10
    ) as ws:
        _, controls = read_until(ws, f"{marker}-42".encode())
        assert controls[0]["type"] == "hello" and controls[0]["state"] == "exited"


def test_admin_filters_sessions_shows_events_and_kills(daphne_server, live_client):
    body = open_terminal(live_client, "admin-kill")
    session_id, pid = body["session"]["id"], body["session"]["pid"]
    base = "/admin/sessions_app/terminalsession/"
    assert session_id in live_client.page(base + "?state__exact=active")
    assert session_id not in live_client.page(base + "?state__exact=exited")
    detail = live_client.page(f"{base}{session_id}/change/")
    assert "started" in detail and "created" in detail  # events inline

    result = live_client.page(
        base, {"action": "kill_sessions", "_selected_action": session_id, "index": "0"}
    )
    assert "Killed 1 session(s)." in result
    _, listed = live_client.api("GET", "/api/terminal/list")
    assert next(s for s in listed["sessions"] if s["id"] == session_id)["state"] == "killed"
    assert not is_running(pid)

"""Project snapshots: every terminal of a project with its scrollback tail, in one request."""

from __future__ import annotations

import asyncio
import base64
import secrets
import threading

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.db.backends import utils as db_utils
from django.test import AsyncClient

from sessions_app import conf, services, storage, terminals, workspace
from sessions_app.routing import websocket_urlpatterns
from tests.conftest import Terminal
from tests.factories import ProjectFactory

pytestmark = pytest.mark.django_db(transaction=True)

MODES = ["DATABASE", "LOCAL", "HYBRID"]


@pytest.fixture(params=MODES)
def mode(request, settings):
    settings.TERMSYS_STORAGE_MODE = request.param
    workspace.recent_projects.clear()
    yield request.param
    workspace.recent_projects.wait_idle()
    storage._close_all()


@pytest.fixture
async def client(user):
    client = AsyncClient()
    await client.aforce_login(user)
    return client


def snapshot_url(project_id: int, tail: int | str | None = None) -> str:
    url = f"/api/workspace/projects/{project_id}/snapshot"
    return url if tail is None else f"{url}?tail={tail}"


async def get_snapshot(client, project_id: int, tail: int | str | None = None) -> dict:
    response = await client.get(snapshot_url(project_id, tail))
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["success"] is True
    return body


def by_id(body: dict) -> dict[str, dict]:
    return {t["id"]: t for t in body["terminals"]}


def data_of(terminal_json: dict) -> bytes:
    return base64.b64decode(terminal_json["scrollback"]["data"])


async def read_at_least(term: Terminal, size: int, timeout: float = 10) -> bytes:
    """Read until the client has received at least ``size`` bytes of output."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(term.output) < size:
        remaining = deadline - loop.time()
        assert remaining > 0, f"only {len(term.output)} of {size} bytes arrived"
        await term._receive_one(remaining)
    return bytes(term.output)


async def connect_at(user, session_id: str, offset: int) -> Terminal:
    communicator = WebsocketCommunicator(
        URLRouter(websocket_urlpatterns), f"/ws/terminals/{session_id}/?offset={offset}"
    )
    communicator.scope["user"] = user
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    return Terminal(communicator)


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["success"] is False
    assert set(body["error"]) == {"code", "message", "details", "timestamp"}
    assert body["error"]["code"] == code
    assert body["requestId"]
    return body["error"]


async def test_snapshot_holds_what_each_connected_client_saw(
    mode, user, project, live_terminals, connect, client
):
    seen = {}
    for name in ("one", "two"):
        record = await services.session_create(user=user, project_id=project.pk, tab_name=name)
        term = await connect(user, record.id)
        marker = f"{name}-{secrets.token_hex(3)}"
        await term.type(f"echo {marker}-$((6*7))\r")
        await term.read_until(f"{marker}-42\r\n".encode())
        seen[record.id] = (term, marker)

    body = await get_snapshot(client, project.pk)
    assert body["projectId"] == project.pk
    assert body["activeCount"] == 2
    terminals_json = by_id(body)
    assert set(terminals_json) == set(seen)
    for session_id, (term, marker) in seen.items():
        shown = terminals_json[session_id]
        assert shown["state"] == "active"
        assert shown["mode"] == mode
        assert {"id", "projectId", "tabName", "title", "type", "cwd"} <= set(shown)
        scrollback = shown["scrollback"]
        assert scrollback["offset"] == 0 and scrollback["pruned"] is False
        data = data_of(shown)
        assert len(data) == scrollback["end"]
        assert f"{marker}-42\r\n".encode() in data
        # byte for byte what the connected client received, up to the snapshot's end
        output = await read_at_least(term, scrollback["end"])
        assert output[: scrollback["end"]] == data


async def test_tail_limits_the_bytes_and_says_older_output_exists(
    user, project, session, connect, client
):
    term = await connect(user, session.id)
    await term.type("for i in $(seq 1 200); do echo line-$i; done\r")
    await term.read_until(b"line-200\r\n")

    shown = by_id(await get_snapshot(client, project.pk, tail=100))[session.id]
    scrollback = shown["scrollback"]
    data = data_of(shown)
    assert len(data) == 100
    assert scrollback["end"] - scrollback["offset"] == 100
    assert scrollback["pruned"] is True
    output = await read_at_least(term, scrollback["end"])
    assert output[scrollback["offset"] : scrollback["end"]] == data

    empty = by_id(await get_snapshot(client, project.pk, tail=0))[session.id]
    assert data_of(empty) == b""
    assert empty["scrollback"]["offset"] == empty["scrollback"]["end"] >= scrollback["end"]


async def test_exited_sessions_come_from_storage(
    mode, user, project, live_terminals, connect, client
):
    record = await services.session_create(user=user, project_id=project.pk)
    term = await connect(user, record.id)
    marker = f"gone-{secrets.token_hex(3)}"
    await term.type(f"echo {marker}-$((2+3)); exit 3\r")
    await term.read_until(f"{marker}-5\r\n".encode())
    assert (await term.control("exit"))["exitCode"] == 3
    assert terminals.get(record.id) is None

    shown = by_id(await get_snapshot(client, project.pk))[record.id]
    assert shown["state"] == "exited" and shown["exitCode"] == 3
    data = data_of(shown)
    assert f"{marker}-5\r\n".encode() in data
    assert shown["scrollback"]["end"] == len(term.output)
    assert data == bytes(term.output)  # what the client saw, now served by the provider

    # attaching with the snapshot's end sends nothing again, only the exit
    again = await connect_at(user, record.id, shown["scrollback"]["end"])
    hello = await again.control("hello")
    assert hello["offset"] == shown["scrollback"]["end"] and hello["pruned"] is False
    assert (await again.control("exit"))["exitCode"] == 3
    assert again.output == b""
    await again.close()


async def test_attaching_at_the_snapshot_end_never_repeats_a_byte(
    mode, user, project, live_terminals, connect, client
):
    record = await services.session_create(user=user, project_id=project.pk)
    watcher = await connect(user, record.id)  # sees the whole stream, for comparison
    first = f"before-{secrets.token_hex(3)}"
    await watcher.type(f"echo {first}-$((1+1))\r")
    await watcher.read_until(f"{first}-2\r\n".encode())

    shown = by_id(await get_snapshot(client, project.pk))[record.id]
    end = shown["scrollback"]["end"]

    term = await connect_at(user, record.id, end)
    hello = await term.control("hello")
    assert hello["offset"] == end and hello["pruned"] is False
    second = f"after-{secrets.token_hex(3)}"
    await term.type(f"echo {second}-$((2+2))\r")
    await term.read_until(f"{second}-4\r\n".encode())
    received = bytes(term.output)
    assert first.encode() not in received
    everything = await read_at_least(watcher, end + len(received))
    assert everything[:end] == data_of(shown)
    assert everything[end : end + len(received)] == received
    await term.close()


async def test_another_users_project_is_not_found(user, other_user, client):
    theirs = await database_sync_to_async(ProjectFactory)(owner=other_user)
    assert_error(await client.get(snapshot_url(theirs.pk)), 404, "not_found")
    assert_error(await client.get(snapshot_url(999_999)), 404, "not_found")


@pytest.mark.parametrize(
    "tail",
    ["abc", "-1", "1.5", "1e3", "99999999999999", "%C2%B2", "%D9%A3", "%EF%BC%91", "1_0"],
)
async def test_bad_tail_is_refused(client, project, tail):
    error = assert_error(await client.get(snapshot_url(project.pk, tail)), 400, "validation_failed")
    assert error["details"]["field"] == "tail"
    assert "TERMSYS_SCROLLBACK_BYTES" in error["message"]


async def test_tail_over_the_scrollback_limit_is_refused(client, project):
    over = conf.scrollback_bytes() + 1
    assert_error(await client.get(snapshot_url(project.pk, over)), 400, "validation_failed")
    ok = await get_snapshot(client, project.pk, conf.scrollback_bytes())
    assert ok["terminals"] == []


async def test_not_logged_in_and_wrong_method(project):
    anonymous = AsyncClient()
    assert_error(await anonymous.get(snapshot_url(project.pk)), 401, "not_authenticated")


# Threads that write behind on their own schedule: not the request's queries.
BACKGROUND_THREADS = ("termsys-sync", "termsys-db", "termsys-workspace")


@pytest.fixture
def count_queries(monkeypatch):
    """Collect the SQL statements run on behalf of requests (any thread but write-behind)."""
    executed: list[str] = []
    real = db_utils.CursorWrapper._execute

    def counting(self, sql, params, *ignored_wrappers):
        if not threading.current_thread().name.startswith(BACKGROUND_THREADS):
            executed.append(sql)
        return real(self, sql, params, *ignored_wrappers)

    monkeypatch.setattr(db_utils.CursorWrapper, "_execute", counting)
    return executed


# The project (ownership) and the session list; HYBRID's list reads its own database rows
# besides the DATABASE provider's, one more.
EXPECTED_QUERIES = {"DATABASE": 2, "LOCAL": 2, "HYBRID": 3}


async def test_live_sessions_cost_no_scrollback_queries(
    mode, user, project, live_terminals, connect, count_queries
):
    for _ in range(3):
        record = await services.session_create(user=user, project_id=project.pk)
        term = await connect(user, record.id)
        await term.type("seq 1 50\r")
        await term.read_until(b"50\r\n")
    workspace.recent_projects.wait_idle()
    count_queries.clear()
    body = await workspace.project_snapshot(user=user, project_id=project.pk, tail_bytes=65536)
    assert len(body["terminals"]) == 3
    assert all(b"50\r\n" in data_of(t) for t in body["terminals"])
    assert len(count_queries) <= EXPECTED_QUERIES[mode], count_queries


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def prefetch(self, project_ids):
        self.calls.append(("prefetch", sorted(project_ids)))

    def resume_project(self, project_id):
        self.calls.append(("resume", project_id))

    def suspend_project(self, project_id):
        self.calls.append(("suspend", project_id))


def test_recent_projects_warm_the_recent_and_suspend_the_dropped(monkeypatch, settings):
    settings.TERMSYS_STORAGE_MODE = "LOCAL"
    recorder = Recorder()
    monkeypatch.setattr(workspace, "get_storage", lambda mode=None: recorder)
    now = [0.0]
    recent = workspace.RecentProjects(size=2, warm_seconds=30, clock=lambda: now[0])

    recent.touch(1, 10, {"LOCAL"})
    recent.touch(1, 11, {"LOCAL"})  # 10 was warmed a moment ago: not again
    recent.touch(1, 11, {"LOCAL"})  # already on screen: nothing to do
    recent.touch(1, 12, {"LOCAL"})  # 10 falls out
    recent.touch(1, 11, {"LOCAL"})  # everything recent is warm
    now[0] = 31.0
    recent.touch(1, 12, {"LOCAL"})  # cold again: this one resumed, the other prefetched
    recent.touch(2, 20, {"LOCAL"})  # another user's list is separate
    recent.touch(1, 10, {"LOCAL"})  # back after being suspended: resumed, 11 falls out
    assert recent.wait_idle(10)
    assert recorder.calls == [
        ("resume", 10),
        ("resume", 11),
        ("suspend", 10),
        ("resume", 12),
        ("resume", 12),
        ("prefetch", [11]),
        ("resume", 20),
        ("suspend", 11),
        ("resume", 10),
    ]
    assert recent.recent(1) == [10, 12]
    assert recent.recent(2) == [20]


async def test_snapshot_marks_the_project_recent(user, project, client):
    workspace.recent_projects.clear()
    second = await database_sync_to_async(ProjectFactory)(owner=user)
    await get_snapshot(client, project.pk)
    await get_snapshot(client, second.pk)
    assert workspace.recent_projects.recent(user.pk) == [second.pk, project.pk]
    assert workspace.recent_projects.wait_idle(10)


async def test_each_terminal_comes_with_its_size_and_whether_the_user_named_it(
    mode, user, project, live_terminals, connect, client
):
    """A page writes a tab's history in at the size it was drawn at (a screen drawn at column
    100 stays intact), and shows a name the user chose instead of the process title."""
    record = await services.session_create(user=user, project_id=project.pk)
    term = await connect(user, record.id)
    await term.send_json({"type": "resize", "cols": 132, "rows": 41})
    await term.type("stty size\r")
    await term.read_until(b"41 132\r\n")
    shown = by_id(await get_snapshot(client, project.pk))[record.id]
    assert (shown["cols"], shown["rows"]) == (132, 41)
    assert shown["tabNamed"] is False

    renamed = await database_sync_to_async(services.session_rename)(
        user=user, session_id=record.id, tab_name="api server"
    )
    assert renamed.tab_named is True
    await term.type("exit\r")
    await term.control("exit")
    # Ended, the session keeps the size and the name: they come from storage now.
    shown = by_id(await get_snapshot(client, project.pk))[record.id]
    assert shown["state"] == "exited"
    assert (shown["cols"], shown["rows"]) == (132, 41)
    assert (shown["tabName"], shown["tabNamed"]) == ("api server", True)

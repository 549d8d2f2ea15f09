from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from featureflags import broadcast
from sessions_app import services, terminals
from sessions_app.routing import websocket_urlpatterns
from tests.factories import ProjectFactory, UserFactory

# Shells in tests skip the machine's rc files: those belong to whoever runs the suite, and a
# login rc that does slow work (pyenv's rehash, say) would only make the tests slow and flaky.
TEST_PROFILES = {"system": ["/bin/bash", "--noprofile", "--norc"]}


@pytest.fixture(scope="session", autouse=True)
def _close_thread_connections(django_db_setup, django_db_blocker):
    """Close connections held by worker threads, so the test database can be dropped."""
    yield
    from tests.live import close_worker_connections

    with django_db_blocker.unblock():
        close_worker_connections()


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Start and end every test with an empty cache: waffle caches flags there, and a
    transactional test's database flush does not reach a shared (Redis) cache."""
    from django.core.cache import cache

    from featureflags import safeguard

    cache.clear()
    safeguard.reset()  # outcomes other tests recorded are not this test's
    yield
    cache.clear()


@pytest.fixture(autouse=True)
def _test_settings(settings, tmp_path):
    # Users made by the factory: hashing their passwords the production way costs ~0.5 s each.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # Each test has an event loop of its own: no periodic flag work left behind on one.
    settings.TERMSYS_FLAG_TASKS = False
    settings.TERMSYS_PROJECTS_ROOT = tmp_path / "projects"
    settings.TERMSYS_PROFILES = TEST_PROFILES
    settings.TERMSYS_JOURNAL_DIR = tmp_path / "journal"


@pytest.fixture
def user(db):
    return UserFactory()


@pytest.fixture
def other_user(db):
    return UserFactory()


@pytest.fixture
def project(user, tmp_path):
    path = tmp_path / "work"
    path.mkdir()
    return ProjectFactory(owner=user, path=str(path))


@pytest.fixture
async def live_terminals() -> AsyncIterator[None]:
    """Kill every terminal a test started, so no process outlives it."""
    yield
    await services.terminals_shutdown()
    assert terminals.all_terminals() == []
    await broadcast.stop_listener()  # the next test runs on another event loop


@pytest.fixture
async def session(user, project, live_terminals):
    """A live session of ``user`` running bash in ``project``."""
    return await services.session_create(user=user, project_id=project.pk, tab_name="main")


class Terminal:
    """A WebSocket client of one session, collecting output and control messages."""

    def __init__(self, communicator: WebsocketCommunicator) -> None:
        self.ws = communicator
        self.output = bytearray()
        self.controls: list[dict] = []
        self.close_code: int | None = None

    async def _receive_one(self, timeout: float) -> None:
        message = await self.ws.receive_output(timeout)
        if message["type"] == "websocket.close":
            self.close_code = message.get("code")
            raise ConnectionError(f"closed with {self.close_code}")
        if message["type"] == "websocket.accept":
            return
        if message.get("bytes") is not None:
            self.output += message["bytes"]
        else:
            self.controls.append(json.loads(message["text"]))

    async def read_until(self, needle: bytes, timeout: float = 10) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while needle not in self.output:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"{needle!r} not seen; got {bytes(self.output[-500:])!r}")
            await self._receive_one(remaining)
        return bytes(self.output)

    async def control(self, kind: str, timeout: float = 10) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for message in self.controls:
                if message.get("type") == kind:
                    self.controls.remove(message)
                    return message
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no {kind!r} message; got {self.controls}")
            await self._receive_one(remaining)

    async def closed(self, timeout: float = 10) -> int | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.close_code is None:
            try:
                await self._receive_one(max(0.01, deadline - loop.time()))
            except ConnectionError:
                break
        return self.close_code

    async def type(self, text: str) -> None:
        await self.ws.send_to(bytes_data=text.encode())

    async def send_json(self, message: object) -> None:
        await self.ws.send_to(text_data=json.dumps(message))

    async def close(self) -> None:
        # Wait for the consumer's disconnect handler (it records the detach) to finish.
        await self.ws.disconnect(timeout=10)


@pytest.fixture
async def connect():
    """Return ``await connect(user, session_id)`` -> a connected Terminal."""
    opened: list[Terminal] = []

    async def _connect(
        user, session_id: str, *, expect_accept: bool = True, query: str = ""
    ) -> Terminal:
        app = URLRouter(websocket_urlpatterns)
        path = f"/ws/terminals/{session_id}/" + (f"?{query}" if query else "")
        communicator = WebsocketCommunicator(app, path)
        communicator.scope["user"] = user
        connected, _ = await communicator.connect(timeout=10)
        assert connected == expect_accept
        terminal = Terminal(communicator)
        opened.append(terminal)
        return terminal

    yield _connect
    for terminal in opened:
        if terminal.close_code is None:
            await terminal.close()


@pytest.fixture(scope="session")
def live_termsys(tmp_path_factory):
    """A termsys server (manage.py serve) in a subprocess with its own database and a user."""
    from tests.live import serving

    with serving(tmp_path_factory.mktemp("live")) as server:
        yield server


@pytest.fixture
def live_client(live_termsys):
    from tests.live import Browserless

    client = Browserless(live_termsys)
    client.login()
    return client

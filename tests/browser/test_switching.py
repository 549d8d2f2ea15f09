"""Switching project in real Chromium: one snapshot per project, every line exactly once."""

from __future__ import annotations

import re
import secrets
import time
from collections import Counter
from urllib.parse import parse_qs, urlparse

import pytest
from playwright.sync_api import expect

from tests.browser.test_workspace import log_in, screen_text, wait_for_text

pytestmark = pytest.mark.browser

SNAPSHOT_RE = re.compile(r"/api/workspace/projects/(\d+)/snapshot")


def buffer_text(page, session_id: str) -> str:
    return page.evaluate(
        """(id) => { const t = window.termsys.terminal(id); if (!t) return '';
           const b = t.buffer.active; const lines = [];
           for (let i = 0; i < b.length; i++) lines.push(b.getLine(i).translateToString(true));
           return lines.join('\\n'); }""",
        session_id,
    )


def wait_until(page, check, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        page.wait_for_timeout(100)  # lets Playwright deliver the page's events meanwhile
    raise AssertionError(f"timed out waiting for {what}")


class Traffic:
    """Snapshot fetches per project and WebSocket URLs opened per session, seen by the page."""

    def __init__(self, page) -> None:
        self.snapshots: Counter[str] = Counter()
        self.sockets: list[tuple[str, int | None]] = []
        page.on("request", self._on_request)
        page.on("websocket", self._on_websocket)

    def _on_request(self, request) -> None:
        match = SNAPSHOT_RE.search(request.url)
        if match:
            self.snapshots[match.group(1)] += 1

    def _on_websocket(self, ws) -> None:
        url = urlparse(ws.url)
        session_id = url.path.rstrip("/").rsplit("/", 1)[-1]
        offset = parse_qs(url.query).get("offset")
        self.sockets.append((session_id, int(offset[0]) if offset else None))

    def opened(self, session_id: str) -> list[int | None]:
        return [offset for sid, offset in self.sockets if sid == session_id]


def create_project(page, name: str) -> str:
    page.fill("#new-project-form input[name=name]", name)
    page.click("#new-project-form button[type=submit]")
    item = page.locator(".project-item.active")
    expect(item).to_contain_text(name)
    return item.get_attribute("data-project-id")


def new_terminal(page, count: int) -> str:
    page.click("#new-terminal")
    expect(page.locator(".tab")).to_have_count(count)
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    return page.evaluate("() => window.termsys.activeSessionId()")


def run(page, command: str) -> None:
    page.locator(".terminal-pane.active").click()
    page.keyboard.type(command + "\n")


def select_project(page, project_id: str) -> None:
    page.click(f'.project-item[data-project-id="{project_id}"]')
    expect(page.locator(".project-item.active")).to_have_attribute("data-project-id", project_id)
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")


def once(page, line: str) -> None:
    """The active terminal shows ``line`` exactly once."""
    wait_for_text(page, line)
    text = screen_text(page)
    assert text.count(line) == 1, f"{line!r} appears {text.count(line)} times:\n{text[-1500:]}"


def test_switching_projects_shows_each_once_from_one_snapshot(page, live_termsys):
    log_in(page, live_termsys)
    tag = secrets.token_hex(3)
    a_id = create_project(page, f"switch-a-{tag}")
    a1 = new_terminal(page, 1)
    run(page, f"echo alpha-{tag}-$((40+2))")
    wait_for_text(page, f"alpha-{tag}-42")
    a2 = new_terminal(page, 2)
    run(page, f"echo second-{tag}-$((3*3))")
    wait_for_text(page, f"second-{tag}-9")
    page.click(f'.tab[data-session-id="{a1}"]')

    b_id = create_project(page, f"switch-b-{tag}")
    b1 = new_terminal(page, 1)
    run(page, f"echo beta-{tag}-$((50+5))")
    wait_for_text(page, f"beta-{tag}-55")

    # A fresh page: everything now comes from snapshots, never twice.
    traffic = Traffic(page)
    page.reload()
    expect(page.locator(".project-item.active")).to_have_attribute("data-project-id", b_id)
    once(page, f"beta-{tag}-55")
    assert traffic.snapshots == {b_id: 1}

    for round_ in range(4):
        select_project(page, a_id)
        assert page.evaluate("() => window.termsys.activeSessionId()") == a1
        once(page, f"alpha-{tag}-42")
        assert f"beta-{tag}" not in screen_text(page)
        run(page, f"echo a-round-{round_}-$((100+{round_}))")
        once(page, f"a-round-{round_}-{100 + round_}")

        select_project(page, b_id)
        once(page, f"beta-{tag}-55")
        assert f"alpha-{tag}" not in screen_text(page)
        run(page, f"echo b-round-{round_}-$((200+{round_}))")
        once(page, f"b-round-{round_}-{200 + round_}")

    # Every earlier line is still there exactly once after all the switching.
    for r in range(4):
        once(page, f"b-round-{r}-{200 + r}")
    select_project(page, a_id)
    for r in range(4):
        once(page, f"a-round-{r}-{100 + r}")
    assert traffic.snapshots == {a_id: 1, b_id: 1}

    # Each visible tab attached once, continuing after the snapshot's bytes (never from 0).
    assert len(traffic.opened(a1)) == 1 and traffic.opened(a1)[0] > 0
    assert len(traffic.opened(b1)) == 1 and traffic.opened(b1)[0] > 0
    # The hidden tab already holds its scrollback, written from the snapshot, unconnected.
    assert traffic.opened(a2) == []
    assert buffer_text(page, a2).count(f"second-{tag}-9") == 1
    page.click(f'.tab[data-session-id="{a2}"]')
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    once(page, f"second-{tag}-9")
    assert len(traffic.opened(a2)) == 1 and traffic.opened(a2)[0] > 0
    assert page.console_errors == []


# Keeps every WebSocket the page opens, so a test can drop one the way a network failure does.
RECORD_SOCKETS = """
  window.__sockets = [];
  const RealWebSocket = window.WebSocket;
  window.WebSocket = class extends RealWebSocket {
    constructor(...args) { super(...args); window.__sockets.push(this); }
  };
"""


def test_reconnect_continues_without_repeating_output(page, live_termsys):
    page.add_init_script(RECORD_SOCKETS)
    log_in(page, live_termsys)
    tag = secrets.token_hex(3)
    create_project(page, f"resume-{tag}")
    session_id = new_terminal(page, 1)
    run(page, f"echo first-{tag}-$((1+1))")
    once(page, f"first-{tag}-2")

    traffic = Traffic(page)
    for attempt in range(2):
        page.evaluate(
            """(id) => window.__sockets
                 .filter((ws) => ws.url.includes(id) && ws.readyState === WebSocket.OPEN)
                 .forEach((ws) => ws.close())""",
            session_id,
        )
        wait_until(page, lambda n=attempt: len(traffic.opened(session_id)) > n, "a reconnect")
        expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
        run(page, f"echo again-{attempt}-{tag}-$((2+2))")
        once(page, f"again-{attempt}-{tag}-4")
    once(page, f"first-{tag}-2")
    offsets = traffic.opened(session_id)
    assert len(offsets) == 2 and all(o is not None and o > 0 for o in offsets)
    assert offsets[1] > offsets[0]
    assert page.console_errors == []

"""A terminal's history is drawn at the size it was written for: in tabs not shown first after
a reload, and in the staff's read-only view."""

from __future__ import annotations

import json
import secrets

import pytest
from playwright.sync_api import expect
from websockets.sync.client import connect as ws_connect

from tests.browser.conftest import ARTIFACTS
from tests.browser.test_switching import buffer_text, create_project, new_terminal, run
from tests.browser.test_workspace import log_in, wait_for_text
from tests.live import Browserless
from tests.test_live_server import open_terminal, read_until, ws_url

pytestmark = pytest.mark.browser

COLUMN = 100  # 0-based: where the right-hand marks are drawn, past 80 columns


def draw(rows: int, column: int = COLUMN) -> str:
    """A shell command that draws like full-screen programs do: by moving the cursor."""
    move = "\\033[%d;{}H"
    return (
        f"clear; for r in $(seq 1 {rows}); do "
        f"printf '{move.format(1)}row%02d{move.format(column + 1)}R%02d' $r $r $r $r; done; "
        f"printf '{move.format(1)}' {rows + 2}"
    )


def drawn_at(text: str, rows: int, column: int = COLUMN) -> list[str]:
    """The rows that do not show their mark at ``column`` on the same line."""
    lines = text.split("\n")
    wrong = []
    for r in range(1, rows + 1):
        line = next((ln for ln in lines if ln.startswith(f"row{r:02d}")), "")
        if line[column : column + 3] != f"R{r:02d}":
            wrong.append(line)
    return wrong


def test_a_background_tab_keeps_its_screen_after_a_reload(page, live_termsys):
    log_in(page, live_termsys)
    create_project(page, f"sizes-{secrets.token_hex(3)}")
    drawn = new_terminal(page, 1)
    shown = new_terminal(page, 2)
    page.click(f'.tab[data-session-id="{drawn}"]')
    cols = page.evaluate("() => window.termsys.activeTerminal().cols")
    assert cols > COLUMN + 3, f"the window is too small for this test: {cols} columns"
    run(page, draw(12))
    wait_for_text(page, "R12")
    assert drawn_at(buffer_text(page, drawn), 12) == []
    page.click(f'.tab[data-session-id="{shown}"]')  # the tab shown first after the reload
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")

    page.reload()
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    assert page.evaluate("() => window.termsys.activeSessionId()") == shown
    # Written in from the snapshot at the size it was drawn at, before it is ever shown.
    size = "(id) => [window.termsys.terminal(id).cols, window.termsys.terminal(id).rows]"
    assert page.evaluate(size, drawn)[0] == cols
    assert drawn_at(buffer_text(page, drawn), 12) == []
    page.click(f'.tab[data-session-id="{drawn}"]')
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    assert drawn_at(buffer_text(page, drawn), 12) == []
    page.screenshot(path=str(ARTIFACTS / "background-tab-after-reload.png"))
    assert page.console_errors == []


def watch_text(watch) -> str:
    """The read-only view's terminal buffer, a line per row."""
    return watch.evaluate(
        """() => { const b = window.termsys.activeTerminal().buffer.active; const out = [];
           for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));
           return out.join('\\n'); }"""
    )


def test_the_read_only_view_renders_at_the_owners_size(browser, live_termsys):
    server = live_termsys
    owner = Browserless(server)
    owner.login()
    session = open_terminal(owner, "sized-" + secrets.token_hex(2))["session"]
    url = ws_url(server, f"/ws/terminals/{session['id']}/")
    headers = {**owner.ws_headers(), "Origin": server.url}
    with ws_connect(url, additional_headers=headers) as shell:
        shell.send(json.dumps({"type": "resize", "cols": 132, "rows": 30}))
        shell.send(b"stty size\r")
        read_until(shell, b"30 132\r\n")
        shell.send(draw(10).encode() + b"\r")
        read_until(shell, b"R10")

        context = browser.new_context(viewport={"width": 700, "height": 500})
        try:
            watch = context.new_page()
            log_in(watch, server)  # alice: staff
            watch.goto(f"{server.url}/watch/{session['id']}/")
            wait_for_text(watch, "R10")
            expect(watch.locator("#connection-status")).to_contain_text("read-only")
            term = "window.termsys.activeTerminal()"
            assert watch.evaluate(f"() => [{term}.cols, {term}.rows]") == [132, 30]
            text = watch_text(watch)
            assert drawn_at(text, 10) == []
            # Wider than this window: the pane scrolls sideways, the page does not.
            pane = watch.locator(".terminal-pane")
            assert pane.evaluate("(el) => el.scrollWidth > el.clientWidth")
            assert watch.evaluate("() => document.documentElement.scrollWidth <= innerWidth")
            watch.screenshot(path=str(ARTIFACTS / "watch-owner-size.png"))

            # The owner resizes and redraws: the view follows, and draws it right.
            shell.send(json.dumps({"type": "resize", "cols": 90, "rows": 20}))
            shell.send(draw(8, column=70).encode() + b"; echo redrawn-$((8*8))\r")
            read_until(shell, b"redrawn-64")
            wait_for_text(watch, "redrawn-64")
            assert watch.evaluate(f"() => [{term}.cols, {term}.rows]") == [90, 20]
            text = watch_text(watch)
            assert drawn_at(text, 8, column=70) == []
            watch.screenshot(path=str(ARTIFACTS / "watch-owner-resized.png"))
        finally:
            context.close()

"""The workspace on narrow windows (phones, tablets) in real Chromium."""

from __future__ import annotations

import secrets

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import ARTIFACTS
from tests.browser.test_switching import create_project, new_terminal, run
from tests.browser.test_workspace import log_in, wait_for_text

pytestmark = pytest.mark.browser


def layout(page) -> dict:
    return page.evaluate(
        """() => {
          const box = (sel) => { const r = document.querySelector(sel).getBoundingClientRect();
                                 return { left: r.left, right: r.right, width: r.width }; };
          return { pageWidth: document.documentElement.scrollWidth, window: innerWidth,
                   tabs: box('#tabs'), tab: box('.tab.active'), plus: box('#new-terminal'),
                   status: box('#connection-status'), sidebar: box('#sidebar'),
                   cols: window.termsys.activeTerminal().cols };
        }"""
    )


@pytest.mark.parametrize("width", [320, 375, 768, 1280])
def test_the_workspace_fits_the_window(page, live_termsys, width):
    log_in(page, live_termsys)
    name = f"narrow-{width}-{secrets.token_hex(3)}"
    create_project(page, name)  # on a wide window; the page remembers it
    new_terminal(page, 1)
    new_terminal(page, 2)
    page.set_viewport_size({"width": width, "height": 700})
    page.reload()
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    run(page, "echo fits-$((20+1))")
    wait_for_text(page, "fits-21")
    page.screenshot(path=str(ARTIFACTS / f"workspace-{width}.png"))

    seen = layout(page)
    assert seen["pageWidth"] <= seen["window"], seen  # no sideways scrolling
    for part in ("tabs", "tab", "plus", "status"):
        assert 0 <= seen[part]["left"] and seen[part]["right"] <= width, (part, seen)
    assert seen["tab"]["width"] >= 48, seen
    toggle = page.locator("#sidebar-toggle")
    if width >= 720:
        expect(toggle).to_be_hidden()
        expect(page.locator("#sidebar")).to_be_visible()
        return
    # Narrow: the terminal has the width, the projects are behind ☰.
    assert seen["cols"] >= (30 if width < 360 else 38), seen
    expect(page.locator("#sidebar")).to_be_hidden()
    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    sidebar = page.locator("#sidebar")
    expect(sidebar).to_be_visible()
    expect(sidebar.locator(".project-item.active")).to_be_focused()
    expect(sidebar.locator("input[name=name]")).to_be_visible()
    # All of it on screen once it has slid in.
    page.wait_for_function(
        "(w) => { const r = document.getElementById('sidebar').getBoundingClientRect();"
        " return r.left === 0 && r.right <= w; }",
        arg=width,
    )
    page.screenshot(path=str(ARTIFACTS / f"workspace-{width}-projects.png"))
    page.keyboard.press("Escape")
    expect(sidebar).to_be_hidden()
    expect(toggle).to_be_focused()
    toggle.click()
    sidebar.locator(".project-item", has_text=name).click()  # choosing closes it
    expect(sidebar).to_be_hidden()
    assert page.console_errors == []

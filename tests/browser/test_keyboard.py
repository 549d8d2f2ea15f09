"""Keyboard-only use in real Chromium: out of the terminal, through the tabs (WAI-ARIA tabs
pattern), renaming with F2, the export menu with the arrow keys."""

from __future__ import annotations

import secrets

import pytest
from playwright.sync_api import expect

from tests.browser.test_switching import create_project, new_terminal, run
from tests.browser.test_workspace import log_in, screen_text, wait_for_text

pytestmark = pytest.mark.browser

LEAVE_KEY = "Control+Shift+F6"


def focused(page) -> dict:
    return page.evaluate(
        """() => { const el = document.activeElement;
           return { id: el.id, role: el.getAttribute('role'), cls: el.className,
                    session: el.dataset.sessionId || null,
                    text: el.textContent.trim().slice(0, 40),
                    inTerminal: Boolean(el.closest('.terminal-pane')) }; }"""
    )


def test_keyboard_user_leaves_the_terminal_switches_renames_and_exports(page, live_termsys):
    log_in(page, live_termsys)
    create_project(page, f"keys-{secrets.token_hex(3)}")
    first = new_terminal(page, 1)
    second = new_terminal(page, 2)
    run(page, "echo typed-$((1+1))")
    wait_for_text(page, "typed-2")
    assert focused(page)["inTerminal"]

    # Tab, Shift+Tab and Escape belong to the shell; the documented key leaves the terminal.
    page.keyboard.press(LEAVE_KEY)
    assert focused(page) | {"text": ""} == {
        "id": f"tab-{second}",
        "role": "tab",
        "cls": "tab active",
        "session": second,
        "text": "",
        "inTerminal": False,
    }
    assert "F6" in page.locator("#tabs").get_attribute("title")
    # Only the selected tab is in the tab order.
    tab_index = "(id) => document.querySelector(`.tab[data-session-id='${id}']`).tabIndex"
    assert page.evaluate(tab_index, second) == 0 and page.evaluate(tab_index, first) == -1

    # Arrows move between tabs without opening them; Enter opens, into the terminal.
    page.keyboard.press("ArrowLeft")
    assert focused(page)["session"] == first
    expect(page.locator(f'.tab[data-session-id="{second}"]')).to_have_attribute(
        "aria-selected", "true"
    )
    page.keyboard.press("Enter")
    expect(page.locator(f'.tab[data-session-id="{first}"]')).to_have_attribute(
        "aria-selected", "true"
    )
    assert focused(page)["inTerminal"]
    page.keyboard.type("echo in-first-$((2+2))\n")
    wait_for_text(page, "in-first-4")
    assert page.evaluate("() => window.termsys.activeSessionId()") == first

    # F2 renames the focused tab; focus comes back to it.
    page.keyboard.press(LEAVE_KEY)
    page.keyboard.press("F2")
    expect(page.locator(".tab-rename")).to_be_focused()
    page.keyboard.press("Control+A")
    page.keyboard.type("keyboard named")
    page.keyboard.press("Enter")
    expect(page.locator(f'.tab[data-session-id="{first}"] .tab-label')).to_have_text(
        "keyboard named"
    )
    expect(page.locator(f'.tab[data-session-id="{first}"]')).to_be_focused()

    # Shift+F10 opens the export menu; arrows move in it; Escape comes back to the tab.
    page.keyboard.press("Shift+F10")
    menu = page.locator(".tab-menu")
    expect(menu).to_be_visible()
    items = menu.get_by_role("menuitem")
    expect(items.nth(0)).to_be_focused()
    page.keyboard.press("ArrowDown")
    expect(items.nth(1)).to_be_focused()
    page.keyboard.press("ArrowDown")
    expect(items.nth(0)).to_be_focused()
    page.keyboard.press("ArrowUp")
    expect(items.nth(1)).to_be_focused()
    page.keyboard.press("Escape")
    expect(menu).to_have_count(0)
    assert focused(page)["session"] == first

    # Tab goes on to the page's other controls: the keyboard is not trapped.
    page.keyboard.press("Tab")
    assert focused(page)["id"] == "new-terminal"
    page.keyboard.press("Shift+Tab")
    assert focused(page)["session"] == first

    # Nothing of this reached the shells.
    assert "keyboard named" not in screen_text(page)
    assert page.console_errors == []

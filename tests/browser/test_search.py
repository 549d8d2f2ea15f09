"""The search panel, in real Chromium: find a command's output and open its tab from the hit."""

from __future__ import annotations

import secrets

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import ARTIFACTS
from tests.browser.test_flags_admin import run_action
from tests.browser.test_workspace import log_in, wait_for_text

pytestmark = pytest.mark.browser


def set_search_flag(page, server, action: str) -> None:
    """Turn session_search on or off from the flag admin (in the server process: no cache lag)."""
    run_action(page, server, "session_search", action)
    reason = page.locator("textarea[name=reason]")
    if reason.count():  # TERMSYS_FLAG_REASON_REQUIRED
        reason.fill("browser test of the search panel")
        page.locator(".submit-row input[type=submit]").click()
    expect(page.locator(".messagelist")).to_be_visible()


def test_search_panel_finds_output_and_opens_its_tab(page, live_termsys):
    server = live_termsys
    log_in(page, server)
    page.goto(server.url + "/")
    expect(page.locator(".layout")).to_have_attribute("data-search-enabled", "false")
    expect(page.locator("#search-panel")).to_have_count(0)

    set_search_flag(page, server, "Enable for everyone")
    try:
        page.goto(server.url + "/")
        expect(page.locator("#search-panel")).to_be_visible()
        first = f"found-{secrets.token_hex(3)}"
        page.fill("#new-project-form input[name=name]", first)
        page.click("#new-project-form button[type=submit]")
        expect(page.locator("#current-project-name")).to_have_text(first)
        page.click("#new-terminal")
        expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
        marker = f"needle{secrets.token_hex(4)}"
        page.locator(".terminal-pane.active").click()
        page.keyboard.type(f"echo '/srv/app/{marker}.py <b>'\n")
        wait_for_text(page, f"/srv/app/{marker}.py <b>")
        page.wait_for_timeout(1000)  # DATABASE storage writes output in batches (0.25 s)

        page.fill("#new-project-form input[name=name]", f"other-{secrets.token_hex(3)}")
        page.click("#new-project-form button[type=submit]")
        expect(page.locator("#current-project-name")).not_to_have_text(first)

        page.fill("#search-input", f"{marker}.py")
        page.press("#search-input", "Enter")
        hit = page.locator(".search-hit").first
        expect(hit).to_contain_text(first)
        expect(hit.locator("mark").first).to_have_text(marker)
        expect(hit.locator(".search-hit-snippet")).to_contain_text("<b>")  # text, not markup
        page.screenshot(path=str(ARTIFACTS / "search-panel.png"))
        hit.click()
        expect(page.locator("#current-project-name")).to_have_text(first)
        wait_for_text(page, f"/srv/app/{marker}.py <b>")

        page.fill("#search-input", "(broken OR")
        page.press("#search-input", "Enter")
        expect(page.locator("#search-error")).to_contain_text("at position 11")
        assert page.console_errors == []
    finally:
        set_search_flag(page, server, "Disable for everyone")

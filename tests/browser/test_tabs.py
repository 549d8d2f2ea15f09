"""The tab strip in real Chromium: tabs opened while a project loads or in another window."""

from __future__ import annotations

import secrets
import time

import pytest
from playwright.sync_api import expect

from tests.browser.test_flags_admin import run_action
from tests.browser.test_switching import create_project, new_terminal, run, wait_until
from tests.browser.test_workspace import log_in, wait_for_text

pytestmark = pytest.mark.browser


def set_flag(page, server, flag: str, action: str) -> None:
    """Run a flag admin action (in the server process: no cache lag), e.g. "Enable for
    everyone"; the page is left on the admin."""
    run_action(page, server, flag, action)
    reason = page.locator("textarea[name=reason]")
    if reason.count():  # TERMSYS_FLAG_REASON_REQUIRED
        reason.fill("browser test of the tab strip")
        page.locator(".submit-row input[type=submit]").click()
    expect(page.locator(".messagelist")).to_be_visible()


def tab_ids(page) -> list[str]:
    return page.evaluate(
        "() => [...document.querySelectorAll('#tabs .tab')].map((t) => t.dataset.sessionId)"
    )


def select_project_by_name(page, name: str) -> None:
    page.locator(".project-item", has_text=name).click()
    expect(page.locator("#current-project-name")).to_have_text(name)


def test_a_tab_opened_while_the_project_loads_stays(page, live_termsys):
    """The user clicks + before a slow project snapshot arrives: the snapshot, older than the
    new tab, must not take it away."""
    log_in(page, live_termsys)
    create_project(page, f"early-tab-{secrets.token_hex(3)}")
    first = new_terminal(page, 1)
    held = []
    page.route("**/snapshot*", lambda route: held.append((route, route.fetch())))
    page.reload()
    wait_until(page, lambda: held, "the snapshot request")
    page.click("#new-terminal")  # the project is still loading
    expect(page.locator(".tab")).to_have_count(1)
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    opened = page.evaluate("() => window.termsys.activeSessionId()")
    assert opened != first

    route, stale = held[0]
    route.fulfill(response=stale)  # the snapshot, taken before the new tab existed
    page.unroute("**/snapshot*")
    expect(page.locator(".tab")).to_have_count(2)
    assert tab_ids(page) == [first, opened]
    expect(page.locator(f'.tab[data-session-id="{opened}"]')).to_have_attribute(
        "aria-selected", "true"
    )
    run(page, "echo still-here-$((2+3))")
    wait_for_text(page, "still-here-5")
    assert page.console_errors == []


def test_tabs_opened_or_closed_in_another_window_show_up_here(page, live_termsys):
    server = live_termsys
    log_in(page, server)
    set_flag(page, server, "session_search", "Enable for everyone")
    try:
        page.goto(server.url + "/")
        tag = secrets.token_hex(3)
        shared, other = f"shared-{tag}", f"other-{tag}"
        create_project(page, shared)
        first = new_terminal(page, 1)
        create_project(page, other)  # this window now looks at another project

        second_window = page.context.new_page()
        second_window.on("dialog", lambda dialog: dialog.accept())
        second_window.goto(server.url + "/")
        select_project_by_name(second_window, shared)
        expect(second_window.locator(".tab")).to_have_count(1)
        elsewhere = new_terminal(second_window, 2)
        marker = f"quokka{secrets.token_hex(4)}"
        run(second_window, f"echo {marker}-$((6*7))")
        wait_for_text(second_window, f"{marker}-42")

        # A search hit for the terminal opened elsewhere opens it here.
        hits = page.locator(".search-hit")
        deadline = time.monotonic() + 15
        while not hits.count() and time.monotonic() < deadline:  # output is stored in batches
            page.fill("#search-input", f"{marker}-42")
            page.press("#search-input", "Enter")
            page.wait_for_timeout(300)
        hits.first.click()
        expect(page.locator("#current-project-name")).to_have_text(shared)
        expect(page.locator(".tab")).to_have_count(2)
        expect(page.locator(f'.tab[data-session-id="{elsewhere}"]')).to_have_attribute(
            "aria-selected", "true"
        )
        wait_for_text(page, f"{marker}-42")
        expect(page.locator(".toast")).to_have_count(0)  # no "has been closed"

        # Switching away and back shows what the other window opened and closed meanwhile.
        select_project_by_name(page, other)
        third = new_terminal(second_window, 3)
        second_window.locator(f'.tab[data-session-id="{first}"] .tab-close').click()
        expect(second_window.locator(".tab")).to_have_count(2)
        select_project_by_name(page, shared)
        wait_until(page, lambda: tab_ids(page) == [elsewhere, third], "the other window's tabs")

        # Coming back to this window (focus) does it too.
        fourth = new_terminal(second_window, 3)

        def back_in_this_window() -> bool:
            page.evaluate("window.dispatchEvent(new Event('focus'))")
            return tab_ids(page) == [elsewhere, third, fourth]

        wait_until(page, back_in_this_window, "the tab opened in the other window")
        second_window.close()
        assert page.console_errors == []
    finally:
        set_flag(page, server, "session_search", "Disable for everyone")

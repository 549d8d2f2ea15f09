"""The tab strip in real Chromium: tabs opened while a project loads or in another window,
names the user gave against process titles, what the tooltip and the close question say."""

from __future__ import annotations

import re
import secrets
import time

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import ARTIFACTS
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


def test_a_name_the_user_gave_wins_over_the_process_title(page, live_termsys):
    """With dynamic_titles on, a tab follows its shell's directory until the user renames
    it; then it shows the name (the title stays in the tooltip), after a reload too."""
    server = live_termsys
    log_in(page, server)
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    page.dialogs = []
    set_flag(page, server, "dynamic_titles", "Enable for everyone")
    try:
        page.goto(server.url + "/")
        create_project(page, f"titles-{secrets.token_hex(3)}")
        named = new_terminal(page, 1)
        where = f"/tmp/titled-{secrets.token_hex(3)}"
        run(page, f"mkdir -p {where}/deeper && cd {where}")
        tab = page.locator(f'.tab[data-session-id="{named}"]')
        expect(tab.locator(".tab-label")).to_have_text(where)

        tab.locator(".tab-label").dblclick()
        page.locator(".tab-rename").fill("build shell")
        page.keyboard.press("Enter")
        expect(tab.locator(".tab-label")).to_have_text("build shell")
        run(page, "cd deeper")
        expect(tab).to_have_attribute("title", re.compile(re.escape(f"{where}/deeper")))
        expect(tab.locator(".tab-label")).to_have_text("build shell")

        # A tab nobody renamed keeps following its title.
        follows = new_terminal(page, 2)
        run(page, f"cd {where}")
        other = page.locator(f'.tab[data-session-id="{follows}"]')
        expect(other.locator(".tab-label")).to_have_text(where)

        # The close question names what the tab shows.
        other.locator(".tab-close").click()
        wait_until(page, lambda: page.dialogs, "the close question")
        assert f'"{where}"' in page.dialogs[-1], page.dialogs
        expect(page.locator(".tab")).to_have_count(2)

        # A rename the server refuses puts back what the tab showed.
        page.route(
            "**/rename",
            lambda route: route.fulfill(
                status=409,
                content_type="application/json",
                body='{"success": false, "error": {"code": "conflict", "message": "Not now."}}',
            ),
        )
        other.locator(".tab-label").dblclick()
        page.locator(".tab-rename").fill("refused name")
        page.keyboard.press("Enter")
        expect(page.locator(".toast")).to_contain_text("Not now.")
        expect(other.locator(".tab-label")).to_have_text(where)
        page.unroute("**/rename")

        page.reload()
        expect(page.locator(".tab")).to_have_count(2)
        expect(tab.locator(".tab-label")).to_have_text("build shell")
        expect(other.locator(".tab-label")).to_have_text(where)
        page.screenshot(path=str(ARTIFACTS / "tab-named-and-titled.png"))

        # Emptying the name gives the tab back to its title, after a reload too.
        tab.locator(".tab-label").dblclick()
        page.locator(".tab-rename").fill("")
        page.keyboard.press("Enter")
        expect(tab.locator(".tab-label")).to_have_text(f"{where}/deeper")
        page.reload()
        expect(tab.locator(".tab-label")).to_have_text(f"{where}/deeper")
        assert page.console_errors == []
    finally:
        set_flag(page, server, "dynamic_titles", "Disable for everyone")


def test_the_tooltip_names_the_directory_after_cd(page, live_termsys, live_client):
    log_in(page, live_termsys)
    project_id = create_project(page, f"tooltip-{secrets.token_hex(3)}")
    session_id = new_terminal(page, 1)
    where = f"/tmp/tooltip-{secrets.token_hex(3)}"
    run(page, f"mkdir -p {where} && cd {where}")

    # The server tells the page: no refresh of the tab list (hover, focus) is needed.
    tab = page.locator(f'.tab[data-session-id="{session_id}"]')
    expect(tab).to_have_attribute("title", re.compile(re.escape(where)))

    def recorded() -> bool:  # and the session keeps it
        _, body = live_client.api("GET", f"/api/workspace/projects/{project_id}/terminals")
        return any(t["id"] == session_id and t["cwd"] == where for t in body["terminals"])

    wait_until(page, recorded, "the server to record the directory")


def test_a_paste_the_program_does_not_read_is_reported_once_with_its_total(page, live_termsys):
    log_in(page, live_termsys)
    create_project(page, f"paste-{secrets.token_hex(3)}")
    new_terminal(page, 1)
    run(page, "sleep 30")  # reads no input: the pasted bytes pile up on the server
    page.wait_for_timeout(300)
    pasted = page.evaluate(
        """() => { const text = ('y'.repeat(99) + '\\n').repeat(60000);
                   window.termsys.activeTerminal().paste(text); return text.length; }"""
    )
    toast = page.locator(".toast")
    expect(toast).to_have_count(1)
    expect(toast).to_contain_text("bytes in all were not delivered")
    page.wait_for_timeout(1000)  # any later notice would have come by now
    expect(toast).to_have_count(1)
    total = int(re.search(r"(\d+) bytes in all", toast.inner_text()).group(1))
    # More than one 64 KiB frame's worth, and no more than was pasted beyond the 4 MiB held.
    assert 64 * 1024 < total <= pasted - 4 * 1024 * 1024
    # Done: end the shell and what it would do with the 4 MiB it still holds.
    page.on("dialog", lambda dialog: dialog.accept())
    page.locator(".tab.active .tab-close").click()
    expect(page.locator(".tab")).to_have_count(0)
    assert page.console_errors == []

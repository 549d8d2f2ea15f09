"""A user in real Chromium: log in, create a project, type in a real shell, reload, see it again."""

from __future__ import annotations

import secrets
import time

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import ARTIFACTS
from tests.live import LIVE_PASSWORD, LIVE_USER

pytestmark = pytest.mark.browser


def screen_text(page) -> str:
    return page.evaluate(
        """() => { const t = window.termsys.activeTerminal(); if (!t) return '';
           const b = t.buffer.active; const lines = [];
           for (let i = 0; i < b.length; i++) lines.push(b.getLine(i).translateToString(true));
           return lines.join('\\n'); }"""
    )


def wait_for_text(page, text: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in screen_text(page):
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"{text!r} not on screen:\n{screen_text(page)[-1500:]}")


def log_in(page, server) -> None:
    page.goto(server.url + "/")
    expect(page).to_have_url(server.url + "/accounts/login/?next=/")
    page.fill("input[name=username]", LIVE_USER)
    page.fill("input[name=password]", LIVE_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(server.url + "/")


def test_type_in_a_real_shell_and_find_it_after_reload(page, live_termsys):
    log_in(page, live_termsys)
    name = f"web-{secrets.token_hex(3)}"
    page.fill("#new-project-form input[name=name]", name)
    page.click("#new-project-form button[type=submit]")
    expect(page.locator(".project-item.active")).to_contain_text(name)

    page.click("#new-terminal")
    expect(page.locator(".tab.active")).to_have_count(1)
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    marker = f"hello-{secrets.token_hex(4)}"
    page.locator(".terminal-pane.active").click()
    page.keyboard.type(f"echo {marker}-$((40+2))\n")
    wait_for_text(page, f"{marker}-42")

    page.reload()
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    expect(page.locator(".project-item.active")).to_contain_text(name)
    wait_for_text(page, f"{marker}-42")
    # and the shell is still the same live shell
    page.locator(".terminal-pane.active").click()
    page.keyboard.type("echo again-$((1+1))\n")
    wait_for_text(page, "again-2")
    assert page.console_errors == []


def test_wrong_password_is_refused_with_a_message(page, live_termsys):
    page.goto(live_termsys.url + "/accounts/login/")
    page.fill("input[name=username]", LIVE_USER)
    page.fill("input[name=password]", "not-the-password")
    page.click("button[type=submit]")
    expect(page).to_have_url(live_termsys.url + "/accounts/login/")
    expect(page.locator("body")).to_contain_text("correct username and password")


def test_the_password_page_is_a_click_away_and_says_what_is_wrong(page, live_termsys):
    log_in(page, live_termsys)
    page.click("#password-link")
    expect(page).to_have_url(live_termsys.url + "/accounts/password/")
    expect(page.locator("input[name=old_password]")).to_be_focused()
    page.fill("input[name=old_password]", "not-the-password")
    page.fill("input[name=new_password1]", "short")
    page.fill("input[name=new_password2]", "different")
    page.click("button[type=submit]")
    errors = page.locator(".field-error")
    expect(errors.first).to_be_visible()
    text = " ".join(errors.all_text_contents())
    assert "old password was entered incorrectly" in text
    assert "match" in text  # the two new passwords differ
    page.screenshot(path=str(ARTIFACTS / "password-change.png"))
    page.click("text=Back to your terminals")
    expect(page).to_have_url(live_termsys.url + "/")


def test_a_project_created_while_the_page_loads_stays_selected(page, live_termsys):
    """On a slow network the user may act before the project list arrives."""
    log_in(page, live_termsys)
    held = []

    def hold_the_list(route):
        if route.request.method == "GET":
            held.append((route, route.fetch()))  # the list as it is now, delivered later
        else:
            route.continue_()

    page.route("**/api/projects", hold_the_list)
    page.reload()
    name = f"early-{secrets.token_hex(3)}"
    page.fill("#new-project-form input[name=name]", name)
    page.click("#new-project-form button[type=submit]")
    expect(page.locator(".project-item.active")).to_contain_text(name)
    route, stale = held[0]
    route.fulfill(response=stale)  # the list arrives now, without the new project
    page.wait_for_timeout(1000)
    expect(page.locator(".project-item.active")).to_contain_text(name)
    expect(page.locator(".project-item", has_text=name)).to_have_count(1)


def test_typing_a_project_name_while_a_terminal_opens_keeps_the_keyboard(page, live_termsys):
    """The terminal that opens when the page has loaded must not steal the user's typing."""
    log_in(page, live_termsys)
    project_name = f"first-{secrets.token_hex(3)}"
    page.fill("#new-project-form input[name=name]", project_name)
    page.click("#new-project-form button[type=submit]")
    expect(page.locator("#current-project-name")).to_have_text(project_name)
    page.click("#new-terminal")
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    held = []

    def hold_snapshot(route):
        held.append((route, route.fetch()))

    page.route("**/snapshot*", hold_snapshot)
    page.reload()
    page.locator("#new-project-form input[name=name]").click()
    page.keyboard.type("second")
    page.wait_for_timeout(500)
    route, response = held[0]
    route.fulfill(response=response)  # the terminal opens now, mid-typing
    page.wait_for_timeout(500)
    page.keyboard.type("-name")
    assert page.input_value("#new-project-form input[name=name]") == "second-name"


def test_ctrl_c_stops_yes_and_the_page_stays_responsive(page, live_termsys):
    """A flood of output does not freeze the page: flow control holds the shell back to what
    the page renders, so Ctrl-C reaches `yes` and the prompt comes back at once."""
    log_in(page, live_termsys)
    project_name = f"flood-{secrets.token_hex(3)}"
    page.fill("#new-project-form input[name=name]", project_name)
    page.click("#new-project-form button[type=submit]")
    expect(page.locator("#current-project-name")).to_have_text(project_name)
    page.click("#new-terminal")
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    page.locator(".terminal-pane.active").click()
    page.keyboard.type("yes flooding-the-page\n")
    wait_for_text(page, "flooding-the-page\nflooding-the-page")
    page.wait_for_timeout(1500)  # let it flood
    assert page.evaluate("() => 1 + 1") == 2  # the page still answers
    page.keyboard.press("Control+C")
    page.keyboard.type("echo stopped-$((6*7))\n")
    wait_for_text(page, "stopped-42")
    # `yes` is gone: the screen does not change any more
    before = screen_text(page)
    page.wait_for_timeout(500)
    assert screen_text(page) == before
    assert page.console_errors == []


def test_after_a_server_restart_enter_revives_the_shell_where_it_was(page, live_termsys):
    log_in(page, live_termsys)
    project_name = f"revive-{secrets.token_hex(3)}"
    page.fill("#new-project-form input[name=name]", project_name)
    page.click("#new-project-form button[type=submit]")
    expect(page.locator("#current-project-name")).to_have_text(project_name)
    page.click("#new-terminal")
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    folder = f"work-{secrets.token_hex(3)}"
    page.locator(".terminal-pane.active").click()
    page.keyboard.type(f"mkdir {folder} && cd {folder} && echo old-shell-$((6*7))\n")
    wait_for_text(page, "old-shell-42")
    page.wait_for_timeout(1500)  # the working directory is recorded about once a second

    live_termsys.restart()
    wait_for_text(page, "history restored", timeout=30)  # the page reconnected by itself
    wait_for_text(page, "Press Enter to start a new shell")
    expect(page.locator("#connection-status")).to_contain_text("server restarted")
    page.screenshot(path=str(ARTIFACTS / "revivable.png"))

    page.locator(".terminal-pane.active").click()
    page.keyboard.press("Enter")
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    page.keyboard.type("pwd; echo new-shell-$((7*7))\n")
    wait_for_text(page, "new-shell-49")
    text = screen_text(page)
    assert text.index("old-shell-42") < text.index("history restored") < text.index("new-shell-49")
    assert f"/{folder}\n" in text[text.index("new-shell-") :]
    page.screenshot(path=str(ARTIFACTS / "revived.png"))
    assert page.console_errors == []


def test_a_shell_revived_in_one_window_is_attached_in_the_other(page, live_termsys):
    """After a server restart two windows show the same tabs. Reviving one in the first
    window leaves the second attached to the new shell: on Enter there, and by itself when
    the user comes back to that window."""
    log_in(page, live_termsys)
    name = f"revive2-{secrets.token_hex(3)}"
    page.fill("#new-project-form input[name=name]", name)
    page.click("#new-project-form button[type=submit]")
    expect(page.locator(".project-item.active")).to_contain_text(name)
    tab_a = new_tab(page, 1)
    tab_b = new_tab(page, 2)
    other = page.context.new_page()
    other_errors: list[str] = []
    other.on("pageerror", lambda exc: other_errors.append(str(exc)))
    other.goto(live_termsys.url + "/")  # the same project and tab, remembered
    expect(other.locator(".tab")).to_have_count(2)
    expect(other.locator(".tab.active")).to_have_attribute("data-session-id", tab_b)
    expect(other.locator("#connection-status")).to_have_attribute("data-state", "connected")

    live_termsys.restart()
    for window in (page, other):
        wait_for_text(window, "Press Enter to start a new shell", timeout=30)
        expect(window.locator("#connection-status")).to_contain_text("server restarted")

    page.locator(".terminal-pane.active").click()
    page.keyboard.press("Enter")
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    page.keyboard.type("echo revived-b-$((2*3))\n")
    wait_for_text(page, "revived-b-6")

    other.locator(".terminal-pane.active").click()
    other.keyboard.press("Enter")  # the shell runs already: this window attaches to it
    expect(other.locator("#connection-status")).to_have_attribute("data-state", "connected")
    wait_for_text(other, "revived-b-6")
    other.keyboard.type("echo from-other-$((3*3))\n")
    wait_for_text(page, "from-other-9")
    expect(other.locator(".toast")).to_have_count(0)

    other.click(f'.tab[data-session-id="{tab_a}"]')
    wait_for_text(other, "Press Enter to start a new shell")
    page.click(f'.tab[data-session-id="{tab_a}"]')
    wait_for_text(page, "Press Enter to start a new shell")
    page.locator(".terminal-pane.active").click()
    page.keyboard.press("Enter")
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    page.keyboard.type("echo revived-a-$((4*4))\n")
    wait_for_text(page, "revived-a-16")

    # The user comes back to the other window: it finds the new shell by itself.
    deadline = time.monotonic() + 15
    while "revived-a-16" not in screen_text(other) and time.monotonic() < deadline:
        other.evaluate("window.dispatchEvent(new Event('focus'))")
        other.wait_for_timeout(300)
    expect(other.locator("#connection-status")).to_have_attribute("data-state", "connected")
    wait_for_text(other, "revived-a-16")
    assert page.console_errors == [] and other_errors == []
    other.close()


def new_tab(page, count: int) -> str:
    page.click("#new-terminal")
    expect(page.locator(".tab")).to_have_count(count)
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    return page.evaluate("() => window.termsys.activeSessionId()")

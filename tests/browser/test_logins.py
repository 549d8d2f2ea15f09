"""Logins in real Chromium: a password changed in one tab, and what the others do."""

from __future__ import annotations

import secrets

import pytest
from playwright.sync_api import expect

from tests.browser.test_switching import create_project, new_terminal, run
from tests.browser.test_workspace import wait_for_text

pytestmark = pytest.mark.browser

SIGN_OUT_CHECK_SECONDS = 2.0  # sessions_app.signout.CHECK_SECONDS


def new_user(server) -> tuple[str, str]:
    """A user of their own (this module changes passwords and logs out): name, password."""
    name, password = "tabs-" + secrets.token_hex(3), "Old-" + secrets.token_hex(8)
    server.manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import User; "
        f"User.objects.create_user({name!r}, password={password!r})",
    )
    return name, password


def sign_in_to_a_terminal(page, server, name: str, password: str) -> None:
    page.goto(server.url + "/")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(server.url + "/")
    create_project(page, "logins-" + secrets.token_hex(2))
    new_terminal(page, 1)


def test_a_password_changed_in_another_tab_keeps_this_tab_on_its_terminal(browser, live_termsys):
    """Django gives the login that changes its password a new session key, and the sockets of
    the old key close as signed out. A tab of the same browser, whose cookie is that login's,
    connects again: no reload, no login page, the same shell."""
    server = live_termsys
    name, old = new_user(server)
    new = "New-" + secrets.token_hex(8)
    context = browser.new_context()
    try:
        page = context.new_page()
        sign_in_to_a_terminal(page, server, name, old)
        run(page, "sleep 1000 & echo before-$((2*2))")
        wait_for_text(page, "before-4")
        page.evaluate("() => { window.notReloaded = true; }")
        sockets = []
        page.on("websocket", lambda ws: sockets.append(ws.url))

        other = context.new_page()
        other.goto(server.url + "/accounts/password/")
        other.fill("input[name=old_password]", old)
        other.fill("input[name=new_password1]", new)
        other.fill("input[name=new_password2]", new)
        other.click("button[type=submit]")
        expect(other.locator("h1")).to_have_text("Password changed")

        page.wait_for_timeout(SIGN_OUT_CHECK_SECONDS * 2 * 1000)  # the old key's socket closed
        assert any("/ws/terminals/" in url for url in sockets), sockets  # and it came back
        expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
        assert page.url == server.url + "/"
        assert page.evaluate("() => window.notReloaded") is True
        run(page, "jobs; echo after-$((5*5))")
        wait_for_text(page, "after-25")
        wait_for_text(page, "sleep 1000")
    finally:
        context.close()


def test_logging_out_in_another_tab_sends_this_one_to_the_login_page(browser, live_termsys):
    """The same check finds no login behind the cookie any more: to the login page."""
    server = live_termsys
    name, password = new_user(server)
    context = browser.new_context()
    try:
        page = context.new_page()
        sign_in_to_a_terminal(page, server, name, password)
        other = context.new_page()
        other.goto(server.url + "/")
        other.click(".logout-form button[type=submit]")
        expect(page).to_have_url(server.url + "/accounts/login/?next=/")
    finally:
        context.close()

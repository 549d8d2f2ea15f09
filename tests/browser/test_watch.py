"""Staff watch another user's terminal read-only, from the admin, in real Chromium."""

from __future__ import annotations

import secrets

import pytest
from django.contrib.admin.utils import quote
from playwright.sync_api import expect
from websockets.sync.client import connect as ws_connect

from tests.browser.conftest import ARTIFACTS
from tests.browser.test_workspace import log_in, screen_text, wait_for_text
from tests.live import Browserless
from tests.test_live_server import open_terminal, read_until, ws_url

pytestmark = pytest.mark.browser


def make_user(server, username: str, password: str) -> None:
    server.manage(
        "shell",
        "-c",
        "from django.contrib.auth import get_user_model; "
        f"get_user_model().objects.create_user({username!r}, password={password!r})",
    )


def test_staff_watch_a_users_terminal_from_the_admin_and_cannot_type(page, live_termsys):
    owner_name, owner_password = f"bob{secrets.token_hex(3)}", "builder-" + secrets.token_hex(6)
    make_user(live_termsys, owner_name, owner_password)
    owner = Browserless(live_termsys)
    owner.login(owner_name, owner_password)
    session = open_terminal(owner, "watched-" + secrets.token_hex(2))["session"]
    url = ws_url(live_termsys, f"/ws/terminals/{session['id']}/")
    headers = {**owner.ws_headers(), "Origin": live_termsys.url}
    with ws_connect(url, additional_headers=headers) as shell:
        shell.send(b"echo before-$((6*7))-watch\r")
        read_until(shell, b"before-42-watch\r\n")

        log_in(page, live_termsys)  # alice, a superuser
        admin_url = f"{live_termsys.url}/admin/sessions_app/terminalsession"
        # As the admin's own links do: an id holding "_40" would otherwise read as "@".
        change_url = f"{admin_url}/{quote(session['id'])}/change/"
        for _ in range(20):  # a HYBRID session reaches the database (the admin) write-behind
            page.goto(change_url)
            if page.get_by_role("link", name="Watch (read-only)").count():
                break
            page.wait_for_timeout(500)
        with page.context.expect_page() as opened:
            page.get_by_role("link", name="Watch (read-only)").click()
        watch = opened.value
        watch.wait_for_function("() => window.termsys !== undefined")
        wait_for_text(watch, "before-42-watch")  # history first
        expect(watch.locator("#connection-status")).to_contain_text("read-only")
        expect(watch.locator("#watch-title")).to_contain_text(owner_name)

        shell.send(b"echo live-$((5*5))-while-watched\r")
        wait_for_text(watch, "live-25-while-watched")  # then live output

        watch.locator(".terminal-pane").click()
        watch.keyboard.type("echo typed-by-staff\n")
        shell.send(b"echo after-$((9*9))-typing\r")
        seen, _ = read_until(shell, b"after-81-typing\r\n")
        wait_for_text(watch, "after-81-typing")
        assert b"typed-by-staff" not in seen
        assert "typed-by-staff" not in screen_text(watch)
        watch.screenshot(path=str(ARTIFACTS / "watch.png"))


def test_watch_page_is_for_staff_only(live_termsys):
    name, password = f"eve{secrets.token_hex(3)}", "not-staff-" + secrets.token_hex(6)
    make_user(live_termsys, name, password)
    client = Browserless(live_termsys)
    client.login(name, password)
    session = open_terminal(client, "own-" + secrets.token_hex(2))["session"]
    html = client.page(f"/watch/{session['id']}/")  # redirected to the admin login
    assert "watch-title" not in html and 'name="password"' in html

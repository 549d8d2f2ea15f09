"""The tab's export menu downloads the session as text and as an asciicast v3 recording."""

from __future__ import annotations

import json
import secrets

import pytest
from playwright.sync_api import expect

from tests.browser.test_workspace import log_in, wait_for_text

pytestmark = pytest.mark.browser


def test_export_menu_downloads_text_and_cast(page, live_termsys):
    log_in(page, live_termsys)
    project_name = f"export-{secrets.token_hex(3)}"
    page.fill("#new-project-form input[name=name]", project_name)
    page.click("#new-project-form button[type=submit]")
    expect(page.locator("#current-project-name")).to_have_text(project_name)
    page.click("#new-terminal")
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    marker = f"exported-{secrets.token_hex(4)}"
    page.locator(".terminal-pane.active").click()
    page.keyboard.type(f"printf '\\033[1;32m%s\\033[0m\\n' {marker}-$((6*7))\n")
    wait_for_text(page, f"{marker}-42")
    page.wait_for_timeout(1000)  # DATABASE storage writes output in batches (0.25 s)

    page.locator(".tab.active .tab-export").click()
    menu = page.locator(".tab-menu")
    expect(menu.get_by_role("menuitem")).to_have_count(2)
    with page.expect_download() as info:
        menu.get_by_text("Plain text (.txt)").click()
    download = info.value
    assert download.suggested_filename.endswith(".txt")
    text = open(download.path(), encoding="utf-8").read()
    assert f"{marker}-42\n" in text and "\x1b" not in text
    expect(menu).to_have_count(0)

    page.locator(".tab.active").click(button="right")  # the context menu is the same menu
    with page.expect_download() as info:
        page.locator(".tab-menu").get_by_text("Recording (.cast)").click()
    download = info.value
    assert download.suggested_filename.endswith(".cast")
    lines = open(download.path(), encoding="utf-8").read().splitlines()
    assert json.loads(lines[0])["version"] == 3
    played = "".join(event[2] for event in map(json.loads, lines[1:]) if event[1] == "o")
    assert f"\x1b[1;32m{marker}-42\x1b[0m" in played
    assert page.console_errors == []


def test_an_imported_legacy_session_replays_in_its_tab(page, live_termsys, tmp_path):
    from tests.live import LIVE_USER

    marker = f"legacy-{secrets.token_hex(4)}"
    project = f"p{secrets.token_hex(3)}"
    state = tmp_path / "state.json"
    state.write_text(
        json.dumps(
            {
                "sessions": [
                    {
                        "id": f"old-{marker}",
                        "projectId": project,
                        "type": "system",
                        "tabName": "from before",
                        "active": True,
                        "output": ["$ make", f"\x1b[32m{marker} built\x1b[0m", "$ "],
                        "currentPath": "/nowhere/at/all",
                        "pid": 4242,
                        "createdAt": "2025-06-01T10:00:00Z",
                    }
                ]
            }
        )
    )
    out = live_termsys.manage("import_legacy_state", str(state), "--default-user", LIVE_USER)
    assert "read 1, imported 1, skipped 0, already present 0" in out

    log_in(page, live_termsys)
    page.locator(".project-item", has_text=f"legacy-{project}").click()
    tab = page.locator(".tab", has_text="from before")
    expect(tab).to_have_attribute("data-state", "exited")
    tab.click()
    wait_for_text(page, f"{marker} built")
    assert page.console_errors == []

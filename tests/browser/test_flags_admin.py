"""An admin rolls storage_hybrid out and back from the flag admin, in real Chromium, and reads
the rollback-status page, which keeps itself up to date."""

from __future__ import annotations

import secrets

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import ARTIFACTS
from tests.browser.test_workspace import log_in
from tests.live import LIVE_USER

pytestmark = pytest.mark.browser


def run_action(page, server, flag: str, action_label: str) -> None:
    """Tick ``flag`` on the flag changelist and run the action labelled ``action_label``."""
    page.goto(f"{server.url}/admin/featureflags/flag/")
    row = page.locator("#result_list tbody tr").filter(
        has=page.get_by_role("link", name=flag, exact=True)
    )
    row.locator("input.action-select").check()
    page.select_option("select[name=action]", label=action_label)
    page.get_by_role("button", name="Go").click()


def test_admin_rolls_storage_hybrid_out_and_back_and_the_status_page_shows_it(page, live_termsys):
    server = live_termsys
    log_in(page, server)  # alice, a superuser

    run_action(page, server, "storage_hybrid", "Set rollout %…")
    expect(page.locator("#content h1")).to_have_text("Set rollout percentage")
    page.fill("input[name=percent]", "50")
    page.fill("textarea[name=reason]", "canary: half of the users on HYBRID")
    page.screenshot(path=str(ARTIFACTS / "flags-set-rollout.png"))
    page.get_by_role("button", name="Set rollout").click()
    expect(page.locator(".messagelist")).to_contain_text("Rolled out storage_hybrid to 50 %")
    expect(page.locator("#result_list")).to_contain_text("50 %")

    run_action(page, server, "storage_hybrid", "Roll back…")
    page.get_by_role("button", name="Roll back").click()  # no reason: the form will not go
    expect(page.locator("textarea[name=reason]:invalid")).to_have_count(1)
    expect(page.locator("#content h1")).to_have_text("Roll back")
    reason = f"journal lag over 5 s on node-{secrets.token_hex(2)}"
    page.fill("textarea[name=reason]", reason)
    page.get_by_role("button", name="Roll back").click()
    expect(page.locator(".messagelist")).to_contain_text("Rolled back storage_hybrid")

    page.goto(f"{server.url}/admin/")
    page.screenshot(path=str(ARTIFACTS / "admin-index.png"))
    page.locator("#rollback-status-module").get_by_role("link", name="Rollback status").click()
    expect(page).to_have_url(f"{server.url}/admin/featureflags/status/")
    verdict = page.locator("#storage-rollback .verdict")
    expect(verdict).to_contain_text("Rollback complete")  # no live session left in HYBRID
    expect(verdict).to_have_attribute("data-rollback-complete", "true")
    rollback = page.locator("#flag-storage_hybrid table.rollbacks tbody tr").first
    expect(rollback).to_contain_text(LIVE_USER)
    expect(rollback).to_contain_text(reason)
    expect(rollback).to_contain_text("manual")
    expect(page.locator("#flags tr[data-flag=storage_hybrid]")).to_contain_text("rolled back")
    expect(page.locator("#live-sessions")).to_contain_text("HYBRID")

    # The page refreshes itself in place: a change made elsewhere shows up, the scroll stays.
    page.evaluate("window.scrollTo(0, 400)")
    note = f"watched by the on-call {secrets.token_hex(2)}"
    server.manage(
        "shell",
        "-c",
        "from featureflags import services; services.flag_update('dynamic_titles', "
        f"note={note!r}, actor='bob', source='command', reason='handover')",
    )
    expect(page.locator("#flag-dynamic_titles")).to_contain_text(note, timeout=10_000)
    expect(page.locator("#flag-dynamic_titles table.changes")).to_contain_text("bob")
    assert page.evaluate("window.scrollY") == 400
    assert page.console_errors == []

    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "flags-rollback-status.png"), full_page=True)

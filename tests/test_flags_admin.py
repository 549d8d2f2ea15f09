"""The flag admin's actions, the rollback-status page and GET /api/health/rollback-status."""

from __future__ import annotations

import json
import sys
import time
import types
from decimal import Decimal
from typing import Any

import pytest
from django import forms
from django.contrib.admin.models import LogEntry

import featureflags
from featureflags import admin as flag_admin
from featureflags import services
from featureflags.evaluation import flag_is_active_for
from featureflags.models import Flag, FlagChange, RollbackEvent
from sessions_app.models import TerminalSession
from tests.factories import ProjectFactory, UserFactory

# Transactions commit as in production: caches are cleared and changes announced on commit.
pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = "/admin/featureflags/flag/"
STATUS_PAGE = "/admin/featureflags/status/"
STATUS_JSON = "/api/health/rollback-status"
RAMP = {"steps": [5, 25, 50, 100], "holdSeconds": 3600}


@pytest.fixture
def flags(db, settings):
    settings.TERMSYS_FLAG_REASON_REQUIRED = True
    services.ensure_product_flags()
    return Flag.objects


@pytest.fixture
def admin_client(client, flags):
    admin = UserFactory(username="root", is_staff=True, is_superuser=True)
    client.force_login(admin)
    return client


def act(client, action: str, *names: str, apply: bool = True, **data):
    """Post an admin action for the named flags, as the changelist (or its form page) does."""
    pks = [Flag.objects.get(name=n).pk for n in names]
    body = {"action": action, "_selected_action": pks, **data}
    if apply:
        body["apply"] = "1"
    else:
        body["index"] = "0"  # the changelist's action bar
    return client.post(CHANGELIST, body, follow=True)


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def hybrid_session(state: str = "active") -> TerminalSession:
    """A terminal session row in HYBRID storage (no process: only its row counts here)."""
    project = ProjectFactory()
    return TerminalSession.objects.create(
        project=project, user=project.owner, state=state, storage_mode="HYBRID"
    )


# --- actions --------------------------------------------------------------------------------


def test_set_rollout_asks_for_a_percentage_and_a_reason_first(admin_client):
    response = act(admin_client, "set_rollout", "storage_hybrid", apply=False)
    assert response.status_code == 200
    html = response.content.decode()
    assert 'name="percent"' in html and 'step="0.01"' in html and 'name="reason"' in html
    assert "storage_hybrid" in html
    assert FlagChange.objects.count() == 0


def test_set_rollout_writes_the_percentage_and_an_audited_change(admin_client):
    response = act(
        admin_client, "set_rollout", "storage_hybrid", percent="12.5", reason="canary cohort"
    )
    assert flag_admin.MSG_ROLLED_OUT.format(name="storage_hybrid", percent="12.5") in messages_of(
        response
    )
    flag = Flag.objects.get(name="storage_hybrid")
    assert flag.percent == Decimal("12.50") and flag.everyone is None
    change = FlagChange.objects.get(flag="storage_hybrid")
    assert (change.actor, change.source, change.reason) == ("root", "admin", "canary cohort")
    assert change.before["percent"] is None and change.after["percent"] == "12.50"
    assert LogEntry.objects.filter(object_id=str(flag.pk)).exists()  # the admin's own history


@pytest.mark.parametrize("percent", ["100.5", "-1", "0.001", "lots"])
def test_set_rollout_refuses_a_percentage_outside_0_to_100_in_steps_of_0_01(admin_client, percent):
    response = act(admin_client, "set_rollout", "storage_hybrid", percent=percent, reason="x")
    assert response.status_code == 200
    assert "errorlist" in response.content.decode()
    assert Flag.objects.get(name="storage_hybrid").percent is None
    assert FlagChange.objects.count() == 0


def test_set_rollout_needs_a_reason_when_reasons_are_required(admin_client):
    response = act(admin_client, "set_rollout", "storage_hybrid", percent="50", reason="  ")
    assert "This field is required." in response.content.decode()
    assert Flag.objects.get(name="storage_hybrid").percent is None


def test_rollback_without_a_reason_is_refused_and_changes_nothing(admin_client, settings):
    settings.TERMSYS_FLAG_REASON_REQUIRED = False  # a rollback needs a reason regardless
    services.flag_rollout("storage_hybrid", "50", actor="ops", source="command", reason="ramp")
    response = act(admin_client, "roll_back", "storage_hybrid", reason="")
    assert response.status_code == 200
    assert "This field is required." in response.content.decode()
    flag = Flag.objects.get(name="storage_hybrid")
    assert not flag.rolled_back and flag.percent == Decimal("50.00")
    assert RollbackEvent.objects.count() == 0
    assert FlagChange.objects.count() == 1  # only the rollout


def test_rollback_with_a_reason_records_who_when_and_why(admin_client):
    services.flag_rollout("storage_hybrid", "50", actor="ops", source="command", reason="ramp")
    response = act(admin_client, "roll_back", "storage_hybrid", reason="p95 latency doubled")
    assert flag_admin.MSG_ROLLED_BACK.format(name="storage_hybrid") in messages_of(response)
    assert Flag.objects.get(name="storage_hybrid").rolled_back
    event = RollbackEvent.objects.get(flag="storage_hybrid")
    assert (event.actor, event.source, event.automatic) == ("root", "admin", False)
    assert event.reason == "p95 latency doubled"
    assert event.before["percent"] == "50.00"


def test_an_action_on_several_flags_changes_all_or_none(admin_client, monkeypatch):
    real = services.flag_rollback

    def refuse_the_third(name, **kwargs):
        event = real(name, **kwargs)
        if name == "session_search":
            raise services.FlagError("session_search refused for this test")
        return event

    monkeypatch.setattr(services, "flag_rollback", refuse_the_third)
    names = ("activity_tracking", "dynamic_titles", "session_search", "storage_hybrid")
    response = act(admin_client, "roll_back", *names, reason="bad release")
    assert messages_of(response) == ["Nothing changed: session_search refused for this test."]
    assert not Flag.objects.filter(rolled_back=True).exists()
    assert RollbackEvent.objects.count() == 0 and FlagChange.objects.count() == 0


def test_advance_ramp_moves_to_the_next_step_of_the_plan(admin_client):
    services.flag_update("storage_hybrid", ramp=RAMP, actor="ops", source="command", reason="plan")
    for step, percent in enumerate(["5.00", "25.00"]):
        response = act(admin_client, "advance_ramp", "storage_hybrid", reason="healthy")
        flag = Flag.objects.get(name="storage_hybrid")
        assert (flag.ramp_step, flag.percent) == (step, Decimal(percent))
        assert messages_of(response) == [
            flag_admin.MSG_ADVANCED.format(
                name="storage_hybrid", step=step + 1, steps=4, percent=percent.removesuffix(".00")
            )
        ]
    change = FlagChange.objects.filter(flag="storage_hybrid").first()
    assert change.reason == "healthy" and change.actor == "root"
    assert change.after["rampStep"] == 1 and change.after["percent"] == "25.00"


def test_advance_ramp_shows_the_next_step_before_asking_why(admin_client):
    services.flag_update("storage_hybrid", ramp=RAMP, actor="ops", source="command", reason="plan")
    response = act(admin_client, "advance_ramp", "storage_hybrid", apply=False)
    assert "step 1 of 4: 5 %" in response.content.decode()
    assert Flag.objects.get(name="storage_hybrid").ramp_step is None


def test_advance_ramp_refuses_without_a_plan_or_at_the_last_step(admin_client):
    response = act(admin_client, "advance_ramp", "dynamic_titles", reason="go")
    assert messages_of(response) == [
        flag_admin.MSG_NOTHING_CHANGED.format(
            error=services.MSG_NO_PLAN.format(name="dynamic_titles")
        )
    ]
    services.flag_update(
        "storage_hybrid", ramp=RAMP, ramp_step=3, percent=100, **_who("at the top")
    )
    response = act(admin_client, "advance_ramp", "storage_hybrid", reason="go")
    assert "already at the last step" in messages_of(response)[0]
    assert Flag.objects.get(name="storage_hybrid").ramp_step == 3
    assert FlagChange.objects.filter(source="admin").count() == 0


def test_advance_ramp_refuses_a_rolled_back_flag(admin_client):
    services.flag_update("storage_hybrid", ramp=RAMP, ramp_step=0, percent=5, **_who("ramp"))
    services.flag_rollback("storage_hybrid", **_who("errors"))
    response = act(admin_client, "advance_ramp", "storage_hybrid", reason="go")
    assert "is rolled back" in messages_of(response)[0]
    assert Flag.objects.get(name="storage_hybrid").rolled_back


def test_enable_and_disable_ask_why_when_reasons_are_required(admin_client):
    response = act(admin_client, "enable_for_everyone", "session_search", apply=False)
    assert 'name="reason"' in response.content.decode()
    assert Flag.objects.get(name="session_search").everyone is False
    response = act(admin_client, "enable_for_everyone", "session_search", reason="launch")
    assert flag_admin.MSG_ENABLED.format(name="session_search") in messages_of(response)
    assert Flag.objects.get(name="session_search").everyone is True
    response = act(admin_client, "disable_for_everyone", "session_search", reason="")
    assert "This field is required." in response.content.decode()
    assert Flag.objects.get(name="session_search").everyone is True
    act(admin_client, "disable_for_everyone", "session_search", reason="support load")
    assert Flag.objects.get(name="session_search").everyone is False
    reasons = list(FlagChange.objects.values_list("reason", flat=True))
    assert reasons == ["support load", "launch"]


def test_enable_applies_at_once_when_reasons_are_optional(admin_client, settings):
    settings.TERMSYS_FLAG_REASON_REQUIRED = False
    response = act(admin_client, "enable_for_everyone", "dynamic_titles", apply=False)
    assert flag_admin.MSG_ENABLED.format(name="dynamic_titles") in messages_of(response)
    assert Flag.objects.get(name="dynamic_titles").everyone is True


def _who(reason: str) -> dict[str, str]:
    return {"actor": "ops", "source": "command", "reason": reason}


# --- the change form, adding and deleting: every change audited -----------------------------


def change_url(name: str) -> str:
    return f"{CHANGELIST}{Flag.objects.get(name=name).pk}/change/"


def delete_url(name: str) -> str:
    return f"{CHANGELIST}{Flag.objects.get(name=name).pk}/delete/"


def as_posted(response, **changes: str) -> dict[str, Any]:
    """The admin form of ``response`` as a browser posts it, with ``changes`` typed in."""
    form = response.context["adminform"].form
    data: dict[str, Any] = {}
    for name, field in form.fields.items():
        value = form[name].value()
        if isinstance(field, forms.NullBooleanField):
            data[name] = {None: "unknown", True: "true", False: "false"}[value]
        elif isinstance(field, forms.BooleanField):
            if value:
                data[name] = "on"
        elif isinstance(field, forms.ModelMultipleChoiceField):
            ids = [str(v) for v in value or []]
            data[name] = ",".join(ids) if name == "users" else ids  # users: a raw-id box
        else:
            data[name] = "" if value is None else str(value)
    return {**data, **changes, "_save": "Save"}


def history(client, name: str) -> list[dict[str, Any]]:
    """The flag's latest changes as the rollback status shows them."""
    flags = client.get(STATUS_JSON).json()["flags"]
    return next(f for f in flags if f["name"] == name)["changes"]


def test_a_user_named_in_the_change_form_takes_effect_and_is_audited(admin_client):
    alice = UserFactory(username="alice")
    services.flag_update("dynamic_titles", everyone=None, **_who("per-user from now on"))
    form = admin_client.get(change_url("dynamic_titles"))
    data = as_posted(form, users=str(alice.pk), reason="alice tries titles")
    response = admin_client.post(change_url("dynamic_titles"), data, follow=True)

    assert any("was changed successfully" in m for m in messages_of(response))
    assert flag_is_active_for(alice, "dynamic_titles") is True
    titles = next(
        f for f in admin_client.get(STATUS_JSON).json()["flags"] if f["name"] == "dynamic_titles"
    )
    assert titles["overrides"] == ["1 user"]
    latest = history(admin_client, "dynamic_titles")[0]
    assert (latest["actor"], latest["source"], latest["reason"]) == (
        "root",
        "admin",
        "alice tries titles",
    )
    assert latest["changed"] == {"users": {"before": [], "after": ["alice"]}}


def test_ramp_and_ramp_step_typed_in_the_change_form_are_saved_and_audited(admin_client):
    form = admin_client.get(change_url("storage_hybrid"))
    data = as_posted(form, ramp=json.dumps(RAMP), ramp_step="0", percent="5", reason="plan it")
    response = admin_client.post(change_url("storage_hybrid"), data, follow=True)

    assert any("was changed successfully" in m for m in messages_of(response))
    flag = Flag.objects.get(name="storage_hybrid")
    assert (flag.ramp, flag.ramp_step, flag.percent) == (RAMP, 0, Decimal("5.00"))
    changed = history(admin_client, "storage_hybrid")[0]["changed"]
    assert changed["ramp"] == {"before": {}, "after": RAMP}
    assert changed["rampStep"] == {"before": None, "after": 0}
    assert "step 1 of 4" in admin_client.get(CHANGELIST).content.decode()


@pytest.mark.parametrize(
    ("ramp", "step", "error"),
    [
        ("[5, 25]", "", "ramp must be {} (no plan) or an object like"),
        ('{"steps": [50, 25]}', "", "steps must rise"),
        ('{"steps": [5, 250]}', "", "percent must be from 0 to 100"),
        (json.dumps(RAMP), "4", "ramp_step must be unset or a step of the ramp plan, 0 to 3"),
        ("{}", "1", "ramp_step must be unset while the flag has no ramp plan"),
    ],
)
def test_a_bad_ramp_in_the_change_form_is_refused_naming_what_is_wrong(
    admin_client, ramp, step, error
):
    form = admin_client.get(change_url("storage_hybrid"))
    data = as_posted(form, ramp=ramp, ramp_step=step, reason="plan it")
    response = admin_client.post(change_url("storage_hybrid"), data)
    assert response.status_code == 200  # the form again, with the error
    assert error in response.content.decode()
    flag = Flag.objects.get(name="storage_hybrid")
    assert (flag.ramp, flag.ramp_step) == ({}, None)
    assert FlagChange.objects.count() == 0


def test_the_change_form_saves_everything_it_lets_an_admin_edit(admin_client):
    """What the form shows as editable is saved; waffle's "rollout" mode (meaningless with
    termsys's bucketing) and the timestamps are not editable there."""
    form = admin_client.get(change_url("session_search"))
    editable = set(form.context["adminform"].form.fields)
    assert editable == {"note", *services.EDITABLE_FIELDS, "reason"}
    html = form.content.decode()
    assert 'name="rollout"' not in html and 'name="ramp_step_at"' not in html


def test_a_flags_name_cannot_be_changed_in_the_change_form(admin_client):
    form = admin_client.get(change_url("session_search"))
    assert 'name="name"' not in form.content.decode()  # shown, not editable
    data = as_posted(form, name="session_search_renamed", note="renamed?", reason="tidy")
    response = admin_client.post(change_url("session_search"), data, follow=True)

    shown = messages_of(response)
    assert not any("No flag" in m or "no flag" in m for m in shown)
    assert Flag.objects.filter(name="session_search", note="renamed?").exists()
    assert not Flag.objects.filter(name="session_search_renamed").exists()


def test_a_flag_added_in_the_admin_is_audited(admin_client):
    form = admin_client.get(f"{CHANGELIST}add/")
    data = as_posted(form, name="new_sidebar", note="the new sidebar", everyone="true")
    response = admin_client.post(f"{CHANGELIST}add/", data)
    assert flag_admin.MSG_SAY_WHY in response.content.decode()  # reasons are required
    assert not Flag.objects.filter(name="new_sidebar").exists()

    data["reason"] = "sidebar beta"
    response = admin_client.post(f"{CHANGELIST}add/", data, follow=True)
    assert any("was added successfully" in m for m in messages_of(response))
    assert Flag.objects.get(name="new_sidebar").everyone is True
    created = history(admin_client, "new_sidebar")[0]
    assert (created["actor"], created["source"], created["reason"]) == (
        "root",
        "admin",
        "sidebar beta",
    )
    assert created["changed"]["everyone"] == {"before": None, "after": True}


def test_a_flag_deleted_in_the_admin_is_audited_and_needs_a_reason(admin_client):
    services.flag_create("old_banner", everyone=True, **_who("banner"))
    page = admin_client.get(delete_url("old_banner"))
    assert 'name="reason"' in page.content.decode()

    response = admin_client.post(delete_url("old_banner"), {"post": "yes"}, follow=True)
    assert messages_of(response) == [
        flag_admin.MSG_NOTHING_CHANGED.format(
            error="a reason is required for every flag change (TERMSYS_FLAG_REASON_REQUIRED)"
        )
    ]
    assert Flag.objects.filter(name="old_banner").exists()

    response = admin_client.post(
        delete_url("old_banner"), {"post": "yes", "reason": "banner retired"}, follow=True
    )
    assert messages_of(response) == [flag_admin.MSG_DELETED.format(name="old_banner")]
    assert not Flag.objects.filter(name="old_banner").exists()
    deleted = FlagChange.objects.filter(flag="old_banner").first()
    assert (deleted.actor, deleted.source, deleted.reason) == ("root", "admin", "banner retired")
    assert deleted.before["everyone"] is True and deleted.after == {}


@pytest.mark.parametrize("name", sorted(services.PRODUCT_FLAGS))
def test_a_product_flag_cannot_be_deleted_in_the_admin(admin_client, name):
    services.flag_enable(name, **_who("on"))
    assert delete_url(name) not in admin_client.get(change_url(name)).content.decode()
    for response in (
        admin_client.get(delete_url(name), follow=True),
        admin_client.post(delete_url(name), {"post": "yes", "reason": "cleanup"}, follow=True),
    ):
        assert messages_of(response) == [services.MSG_PRODUCT_FLAG.format(name=name)]
    assert Flag.objects.get(name=name).everyone is True
    assert FlagChange.objects.filter(flag=name).count() == 1  # only the enable


# --- status page and JSON -------------------------------------------------------------------


def test_the_changelist_and_the_admin_index_link_to_the_status_page(admin_client):
    assert f'href="{STATUS_PAGE}"' in admin_client.get(CHANGELIST).content.decode()
    assert f'href="{STATUS_PAGE}"' in admin_client.get("/admin/").content.decode()


def test_status_page_and_json_show_the_rollback_and_when_it_is_complete(admin_client):
    services.flag_rollout("storage_hybrid", "50", **_who("ramp to half"))
    session = hybrid_session("active")
    hybrid_session("exited")  # ended sessions do not count
    act(admin_client, "roll_back", "storage_hybrid", reason="journal lag over 5 s")

    html = admin_client.get(STATUS_PAGE).content.decode()
    assert "Rollback in progress" in html and "1 live session still in HYBRID" in html
    assert "journal lag over 5 s" in html and "root" in html and "manual" in html
    assert "just now" in html
    body = admin_client.get(STATUS_JSON).json()
    assert body["success"] is True and body["rollbackComplete"] is False
    assert body["liveSessions"]["HYBRID"] == 1
    hybrid = next(f for f in body["flags"] if f["name"] == "storage_hybrid")
    assert hybrid["state"] == "rolled_back" and hybrid["rollbackComplete"] is False
    assert hybrid["rollbacks"][0] == {
        "at": hybrid["rollbacks"][0]["at"],
        "actor": "root",
        "source": "admin",
        "reason": "journal lag over 5 s",
        "automatic": False,
    }
    assert hybrid["changes"][0]["changed"]["rolledBack"] == {"before": False, "after": True}
    assert hybrid["changes"][1]["reason"] == "ramp to half"
    others = [f["rollbackComplete"] for f in body["flags"] if f["name"] != "storage_hybrid"]
    assert others == [None, None, None]  # their rollback takes effect at once

    TerminalSession.objects.filter(pk=session.pk).update(storage_mode="DATABASE")  # switched
    body = admin_client.get(STATUS_JSON).json()
    assert body["rollbackComplete"] is True and body["liveSessions"]["HYBRID"] == 0
    html = admin_client.get(STATUS_PAGE + "?fragment=1").content.decode()
    assert "Rollback complete" in html and "<html" not in html


def test_status_shows_each_flags_state(admin_client):
    services.flag_rollout("storage_hybrid", "12.5", **_who("a"))
    services.flag_enable("session_search", **_who("b"))
    services.flag_update("dynamic_titles", everyone=None, staff=True, **_who("c"))
    services.flag_update("activity_tracking", ramp=RAMP, ramp_step=1, **_who("d"))
    states = {f["name"]: f["label"] for f in admin_client.get(STATUS_JSON).json()["flags"]}
    assert states == {
        "activity_tracking": "off",
        "dynamic_titles": "off",
        "session_search": "on",
        "storage_hybrid": "12.5 %",
    }
    body = admin_client.get(STATUS_JSON).json()
    titles = next(f for f in body["flags"] if f["name"] == "dynamic_titles")
    assert titles["overrides"] == ["staff"]
    tracking = next(f for f in body["flags"] if f["name"] == "activity_tracking")
    assert tracking["ramp"]["steps"] == [5, 25, 50, 100] and tracking["ramp"]["step"] == 1
    assert "step 2 of 4 (25 %)" in admin_client.get(STATUS_PAGE).content.decode()
    assert body["rollbackComplete"] is False  # not rolled back
    assert body["safeguard"] is None
    assert "No figures yet." in admin_client.get(STATUS_PAGE).content.decode()


def test_status_shows_the_safeguards_latest_figures_when_there_are_some(admin_client, monkeypatch):
    figures = {
        "storage_hybrid": {
            "on": {"samples": 380, "errors": 5, "errorRate": 1.316, "p95Ms": 41.5},
            "off": {"samples": 1210, "errors": 4, "errorRate": 0.331, "p95Ms": 38.0},
            "breach": "error rate 1.3 % over 1 %",
            "streak": 2,
            "checkedAt": time.time(),
        }
    }
    safeguard = types.ModuleType("featureflags.safeguard")
    safeguard.latest_figures = lambda: figures
    monkeypatch.setitem(sys.modules, "featureflags.safeguard", safeguard)
    monkeypatch.setattr(featureflags, "safeguard", safeguard, raising=False)
    body = admin_client.get(STATUS_JSON).json()
    assert body["safeguard"]["storage_hybrid"]["on"]["p95Ms"] == 41.5
    html = admin_client.get(STATUS_PAGE).content.decode()
    assert "error rate %" in html and "1,210" in html and "41.5" in html
    assert "error rate 1.3 % over 1 % (2 checks)" in html
    assert "No figures yet." not in html

    safeguard.latest_figures = dict  # nothing measured yet
    assert "No figures yet." in admin_client.get(STATUS_PAGE).content.decode()
    del safeguard.latest_figures  # a safeguard without figures to show
    assert "No figures yet." in admin_client.get(STATUS_PAGE).content.decode()


def test_the_status_is_for_staff_only(client, flags):
    response = client.get(STATUS_JSON)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
    assert client.get(STATUS_PAGE).status_code == 302  # to the admin's login

    client.force_login(UserFactory())
    response = client.get(STATUS_JSON)
    assert response.status_code == 403
    body = response.json()
    assert body["success"] is False and body["error"]["code"] == "forbidden"
    assert set(body) == {"success", "error", "requestId"}
    response = client.get(STATUS_PAGE)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]

    assert client.post(STATUS_JSON).status_code == 405

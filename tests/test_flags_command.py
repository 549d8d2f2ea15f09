"""``manage.py flags``: status, rollout, enable, disable, rollback, history, export, import."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from featureflags import services, transfer
from featureflags.management.commands import flags as command
from featureflags.models import Flag, FlagChange, RollbackEvent
from tests.factories import UserFactory

# Transactions commit as in production (and the import's all-or-nothing is a real one); the
# flush between tests removes the migration's flags, so the fixture creates them again.
pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
KNOWN = "flags: activity_tracking, dynamic_titles, session_search, storage_hybrid"
ACTOR = "command:ana"


@pytest.fixture(autouse=True)
def product_flags(settings, monkeypatch):
    settings.TERMSYS_FLAG_REASON_REQUIRED = True
    monkeypatch.setattr(command.getpass, "getuser", lambda: "ana")
    monkeypatch.delenv("SUDO_USER", raising=False)
    services.ensure_product_flags()


def flags(*args: str) -> str:
    """Run ``manage.py flags ARGS`` and return what it printed."""
    out = io.StringIO()
    call_command("flags", *args, stdout=out, stderr=io.StringIO(), no_color=True)
    return out.getvalue()


def line_of(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(name + " "))


def snapshot() -> tuple[dict, int, int]:
    """Every flag as exported, plus the audit rows: what a refused command must not change."""
    return (
        transfer.flags_export()["flags"],
        FlagChange.objects.count(),
        RollbackEvent.objects.count(),
    )


def write(path: Path, document: object) -> str:
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


# --- status -------------------------------------------------------------------------------


def test_status_shows_state_percent_last_change_rollback_and_ramp():
    flags("rollout", "storage_hybrid", "5", "--reason", "canary")
    services.flag_update(
        "storage_hybrid",
        actor="ops",
        source="admin",
        reason="plan",
        ramp={"steps": [5, 25, 50, 100]},
        ramp_step=0,
    )
    flags("enable", "dynamic_titles", "--reason", "done")
    flags("rollback", "session_search", "--reason", "p95 up")

    out = flags("status")
    assert out.splitlines()[0].split() == [
        "FLAG",
        "STATE",
        "PERCENT",
        "LAST",
        "CHANGE",
        "LAST",
        "ROLLBACK",
        "RAMP",
    ]
    hybrid = line_of(out, "storage_hybrid")
    assert " 5 % " in hybrid
    assert "5.00" in hybrid
    assert " ops " in hybrid  # the last change
    assert "step 1 of 4: 5 % (5 → 25 → 50 → 100 %)" in hybrid
    assert line_of(out, "dynamic_titles").split()[:2] == ["dynamic_titles", "on"]
    search = line_of(out, "session_search")
    assert "rolled back" in search
    assert search.rstrip().endswith("p95 up  -")  # last rollback's why; no ramp
    assert ACTOR in search
    assert line_of(out, "activity_tracking").split() == [
        "activity_tracking",
        "off",
        "-",
        "-",
        "-",
        "-",
    ]

    rows = {row["name"]: row for row in json.loads(flags("status", "--json"))["flags"]}
    assert rows["storage_hybrid"]["state"] == "5 %"
    assert rows["storage_hybrid"]["percent"] == "5.00"
    assert rows["storage_hybrid"]["rampStep"] == 0
    assert rows["storage_hybrid"]["lastChange"]["actor"] == "ops"
    assert rows["session_search"]["state"] == "rolled back"
    assert rows["session_search"]["lastRollback"]["reason"] == "p95 up"
    assert rows["session_search"]["lastRollback"]["actor"] == ACTOR
    assert rows["activity_tracking"]["lastChange"] is None


def test_status_names_the_overrides_of_a_percentage():
    services.flag_update(
        "session_search", actor="ops", source="admin", reason="beta", everyone=None, staff=True
    )
    Flag.objects.get(name="session_search").users.add(UserFactory(), UserFactory())
    flags("rollout", "session_search", "12.5", "--reason", "beta")
    assert line_of(flags("status"), "session_search").split()[1:6] == [
        "12.5",
        "%",
        "+",
        "staff,",
        "2",
    ]


# --- changes ------------------------------------------------------------------------------


def test_rollout_changes_only_percent_and_everyone():
    services.flag_update(
        "storage_hybrid",
        actor="ops",
        source="admin",
        reason="setup",
        note="keep me",
        staff=True,
        languages="de",
        ramp={"steps": [5, 50]},
    )
    user = UserFactory()
    Flag.objects.get(name="storage_hybrid").users.add(user)
    before = transfer.flag_export(Flag.objects.get(name="storage_hybrid"))

    out = flags("rollout", "storage_hybrid", "12.5", "--reason", "canary")

    assert out == "storage_hybrid: off → 12.5 % + staff, 1 user, languages de\n"
    after = transfer.flag_export(Flag.objects.get(name="storage_hybrid"))
    assert {k for k in after if after[k] != before[k]} == {"everyone", "percent"}
    assert (after["everyone"], after["percent"]) == (None, "12.50")


def test_each_change_is_audited_with_source_command_the_os_user_and_the_reason():
    flags("rollout", "storage_hybrid", "5", "--reason", "canary")
    flags("enable", "storage_hybrid", "--reason", "all good")
    flags("disable", "storage_hybrid", "--reason", "pause")
    out = flags("rollback", "storage_hybrid", "--reason", "p95 up")

    assert out == "storage_hybrid: off → rolled back (off for everyone): p95 up\n"
    changes = FlagChange.objects.filter(flag="storage_hybrid").order_by("id")
    assert [(c.actor, c.source, c.reason) for c in changes] == [
        (ACTOR, "command", "canary"),
        (ACTOR, "command", "all good"),
        (ACTOR, "command", "pause"),
        (ACTOR, "command", "p95 up"),
    ]
    assert [(c.before["everyone"], c.after["everyone"]) for c in changes[:3]] == [
        (False, None),
        (None, True),
        (True, False),
    ]
    event = RollbackEvent.objects.get(flag="storage_hybrid")
    assert (event.actor, event.source, event.reason) == (ACTOR, "command", "p95 up")
    assert Flag.objects.get(name="storage_hybrid").rolled_back


def test_the_actor_names_the_user_behind_sudo(monkeypatch):
    monkeypatch.setenv("SUDO_USER", "bob")
    flags("enable", "dynamic_titles", "--reason", "ship")
    assert FlagChange.objects.get(flag="dynamic_titles").actor == "command:ana (sudo by bob)"


def test_enable_and_rollout_say_when_nothing_changed():
    flags("enable", "dynamic_titles", "--reason", "ship")
    assert flags("enable", "dynamic_titles", "--reason", "again") == (
        "dynamic_titles: already on; nothing changed.\n"
    )
    flags("rollout", "session_search", "5%", "--reason", "canary")
    assert "already 5 %" in flags("rollout", "session_search", "5", "--reason", "canary")
    assert FlagChange.objects.filter(reason="again").count() == 0


def test_a_missing_reason_is_refused_cleanly_and_changes_nothing():
    before = snapshot()
    with pytest.raises(CommandError, match="a reason is required for every flag change"):
        flags("enable", "storage_hybrid")
    with pytest.raises(CommandError, match="a reason is required"):
        flags("disable", "storage_hybrid", "--reason", "   ")
    with pytest.raises(CommandError, match="a rollback needs a reason"):
        flags("rollback", "storage_hybrid", "--reason", "")
    assert snapshot() == before


def test_without_the_reason_setting_enable_needs_no_reason(settings):
    settings.TERMSYS_FLAG_REASON_REQUIRED = False
    assert flags("enable", "storage_hybrid") == "storage_hybrid: off → on\n"
    assert FlagChange.objects.get(flag="storage_hybrid").reason == ""


@pytest.mark.parametrize(
    "args",
    [
        ["rollout", "nope", "5", "--reason", "x"],
        ["enable", "nope", "--reason", "x"],
        ["disable", "nope", "--reason", "x"],
        ["rollback", "nope", "--reason", "x"],
        ["history", "nope"],
    ],
)
def test_an_unknown_flag_is_refused_with_the_known_flags(args):
    with pytest.raises(CommandError, match=f"no flag 'nope'; {KNOWN}"):
        flags(*args)


@pytest.mark.parametrize(
    "percent, message",
    [("101", "from 0 to 100"), ("12.345", "steps of 0.01"), ("lots", "must be a number")],
)
def test_a_bad_percent_is_refused(percent, message):
    before = snapshot()
    with pytest.raises(CommandError, match=message):
        flags("rollout", "storage_hybrid", percent, "--reason", "x")
    assert snapshot() == before


# --- history ------------------------------------------------------------------------------


def test_history_lists_changes_newest_first_with_what_changed_and_marks_rollbacks():
    flags("rollout", "storage_hybrid", "5", "--reason", "canary")
    flags("rollout", "storage_hybrid", "25", "--reason", "ok so far")
    flags("enable", "dynamic_titles", "--reason", "ship")
    flags("rollback", "storage_hybrid", "--reason", "p95 up")

    out = flags("history", "storage_hybrid")
    blocks = out.split("\n2")  # each change starts with its date
    assert len(blocks) == 3
    assert "storage_hybrid  command:ana (command) ROLLBACK" in blocks[0]
    assert "reason: p95 up" in blocks[0]
    assert "rolledBack: false → true" in blocks[0]
    assert "reason: ok so far" in blocks[1]
    assert 'percent: "5.00" → "25.00"' in blocks[1]
    assert "everyone" not in blocks[1]  # only what changed
    assert "everyone: false → null" in blocks[2]
    assert "dynamic_titles" not in out

    newest = flags("history", "--limit", "1")
    assert "ROLLBACK" in newest
    assert "(newest 1 of 4; --limit N shows more)" in newest
    assert "dynamic_titles" in flags("history", "--limit", "2")


def test_history_without_changes():
    assert flags("history") == command.NO_HISTORY + "\n"


# --- export -------------------------------------------------------------------------------


def test_export_prints_a_versioned_document_of_every_flag(tmp_path):
    user = UserFactory(username="ana")
    group = Group.objects.create(name="beta")
    flag = Flag.objects.get(name="session_search")
    flag.users.add(user)
    flag.groups.add(group)
    flags("rollout", "session_search", "12.5", "--reason", "beta")

    document = json.loads(flags("export"))
    assert (document["format"], document["version"]) == ("termsys-flags", 1)
    assert document["exportedAt"]
    assert sorted(document["flags"]) == KNOWN.removeprefix("flags: ").split(", ")
    assert document["flags"]["session_search"] == {
        "everyone": None,
        "percent": "12.50",
        "testing": False,
        "superusers": False,
        "staff": False,
        "authenticated": False,
        "languages": "",
        "note": services.PRODUCT_FLAGS["session_search"],
        "rolledBack": False,
        "ramp": {},
        "users": ["ana"],
        "groups": ["beta"],
    }

    out = flags("export", "--output", str(tmp_path / "flags.json"))
    assert out == f"Exported 4 flags to {tmp_path / 'flags.json'}.\n"
    assert json.loads((tmp_path / "flags.json").read_text())["flags"] == document["flags"]


# --- import -------------------------------------------------------------------------------


def test_import_shows_the_diff_changes_nothing_without_apply_and_applies_with_it(tmp_path):
    UserFactory(username="ana")
    document = json.loads(flags("export"))
    document["flags"]["storage_hybrid"].update(percent="25", note="hybrid canary")
    document["flags"]["dynamic_titles"].update(users=["ana"], staff=True)
    document["flags"]["session_search"]["rolledBack"] = True
    path = write(tmp_path / "flags.json", document)
    before = snapshot()

    out = flags("import", path)

    assert out.splitlines() == [
        "dynamic_titles:",
        "    staff: false → true",
        '    users: [] → ["ana"]',
        "session_search:",
        "    rolledBack: false → true",
        "storage_hybrid:",
        '    percent: null → "25.00"',
        f'    note: "{services.PRODUCT_FLAGS["storage_hybrid"]}" → "hybrid canary"',
        command.DRY_RUN,
    ]
    assert snapshot() == before

    out = flags("import", path, "--apply", "--reason", "promote staging")

    assert out.splitlines()[-1] == command.APPLIED.format(count=3, actor=ACTOR)
    after = transfer.flags_export()["flags"]
    for name in ("storage_hybrid", "dynamic_titles", "session_search"):
        assert after[name] == document["flags"][name] | {"percent": after[name]["percent"]}
    assert after["storage_hybrid"]["percent"] == "25.00"
    assert after["activity_tracking"] == before[0]["activity_tracking"]
    new = FlagChange.objects.order_by("id")[before[1] :]
    assert {(c.flag, c.actor, c.source, c.reason) for c in new} == {
        (name, ACTOR, "command", "promote staging")
        for name in ("storage_hybrid", "dynamic_titles", "session_search")
    }
    rollback = RollbackEvent.objects.get(flag="session_search")
    assert (rollback.actor, rollback.reason) == (ACTOR, "promote staging")
    assert flags("import", path) == command.NO_CHANGES.format(file=path) + "\n"


def test_an_unchanged_export_imports_as_no_changes(tmp_path):
    flags("rollout", "storage_hybrid", "5", "--reason", "canary")
    flags("rollback", "session_search", "--reason", "p95 up")
    path = str(tmp_path / "flags.json")
    flags("export", "--output", path)
    before = snapshot()

    assert flags("import", path) == command.NO_CHANGES.format(file=path) + "\n"
    assert flags("import", path, "--apply", "--reason", "noop") == (
        command.NO_CHANGES.format(file=path) + "\n"
    )
    assert snapshot() == before


def test_import_leaves_missing_flags_and_fields_alone_and_skips_unknown_flags(tmp_path):
    flags("rollout", "storage_hybrid", "5", "--reason", "canary")
    path = write(
        tmp_path / "partial.json",
        {
            "format": "termsys-flags",
            "version": 1,
            "flags": {"dynamic_titles": {"everyone": True}, "brand_new": {"everyone": True}},
        },
    )

    out = flags("import", path, "--apply", "--reason", "ship titles")

    assert out.splitlines()[0] == command.SKIPPED.format(
        names="brand_new", known=KNOWN.removeprefix("flags: ")
    )
    assert "    everyone: false → true" in out.splitlines()
    assert not Flag.objects.filter(name="brand_new").exists()
    assert Flag.objects.get(name="dynamic_titles").everyone is True
    hybrid = Flag.objects.get(name="storage_hybrid")
    assert (hybrid.everyone, str(hybrid.percent)) == (None, "5.00")


def test_import_ends_a_rollback_only_by_turning_the_flag_on(tmp_path):
    flags("rollout", "storage_hybrid", "5", "--reason", "canary")
    flags("rollback", "storage_hybrid", "--reason", "p95 up")
    document = json.loads(flags("export"))
    document["flags"]["storage_hybrid"]["rolledBack"] = False
    path = write(tmp_path / "resume.json", document)

    assert "    rolledBack: true → false" in flags("import", path, "--apply", "--reason", "fixed")
    flag = Flag.objects.get(name="storage_hybrid")
    assert (flag.rolled_back, str(flag.percent)) == (False, "5.00")

    flags("disable", "storage_hybrid", "--reason", "off")
    flags("rollback", "storage_hybrid", "--reason", "again")
    before = snapshot()
    document["flags"]["storage_hybrid"].update(everyone=False, percent=None)
    with pytest.raises(CommandError, match="field 'rolledBack': false cannot be imported"):
        flags("import", write(tmp_path / "off.json", document), "--apply", "--reason", "x")
    assert snapshot() == before


def test_an_import_is_applied_all_or_nothing(tmp_path, settings):
    settings.TERMSYS_FLAG_REASON_REQUIRED = False  # the first flag's update needs none
    document = json.loads(flags("export"))
    document["flags"]["dynamic_titles"]["everyone"] = True
    document["flags"]["session_search"]["rolledBack"] = True  # a rollback always needs one
    before = snapshot()

    with pytest.raises(CommandError, match="not applied, nothing changed: a rollback needs"):
        flags("import", write(tmp_path / "flags.json", document), "--apply")
    assert snapshot() == before


def test_import_with_apply_needs_a_reason(tmp_path):
    document = json.loads(flags("export"))
    document["flags"]["dynamic_titles"]["everyone"] = True
    before = snapshot()
    with pytest.raises(CommandError, match="a reason is required"):
        flags("import", write(tmp_path / "flags.json", document), "--apply")
    assert snapshot() == before


def _document(**changes):
    document = {
        "format": "termsys-flags",
        "version": 1,
        "exportedAt": "2025-06-01T12:00:00+00:00",
        "flags": {"storage_hybrid": {"percent": "5"}},
    }
    for key, value in changes.items():
        if key.startswith("flag_"):
            document["flags"]["storage_hybrid"][key.removeprefix("flag_")] = value
        else:
            document[key] = value
    return document


@pytest.mark.parametrize(
    "document, messages",
    [
        (
            _document(version=2),
            [
                "version 2 of the termsys-flags format is not supported: this termsys reads "
                "version 1 only"
            ],
        ),
        ('{"format": "termsys-flags", "version": 1, "flags": {', ["not valid JSON: "]),
        ("[1, 2]", [transfer.NOT_A_DOCUMENT]),
        (_document(format="waffle"), ["format 'waffle' is not a termsys flags export"]),
        (_document(version="1"), ["version must be an integer, got '1'"]),
        (_document(comment="hi"), ["unknown field(s) comment"]),
        (
            _document(flag_percent="150"),
            ["flag 'storage_hybrid', field 'percent': percent must be from 0 to 100"],
        ),
        (
            _document(flag_percent="2.555", flag_staff="yes", flag_colour="red"),
            [
                "flag 'storage_hybrid': unknown field(s) colour",
                "flag 'storage_hybrid', field 'percent': percent has steps of 0.01",
                "flag 'storage_hybrid', field 'staff': must be true or false, got \"yes\"",
            ],
        ),
        (
            _document(flag_everyone=1, flag_users=["ghost"], flag_ramp=[5]),
            [
                "flag 'storage_hybrid', field 'everyone': must be true, false or null, got 1",
                "flag 'storage_hybrid', field 'users': no user 'ghost'",
                "flag 'storage_hybrid', field 'ramp': must be an object, got [5]",
            ],
        ),
    ],
    ids=[
        "newer-version",
        "malformed-json",
        "not-an-object",
        "other-format",
        "version-not-int",
        "unknown-top-field",
        "bad-percent",
        "several-bad-fields",
        "bad-types-and-unknown-user",
    ],
)
def test_a_bad_file_is_refused_naming_what_is_wrong_and_nothing_changes(
    tmp_path, document, messages
):
    path = write(tmp_path / "flags.json", document)
    before = snapshot()
    with pytest.raises(CommandError) as refused:
        flags("import", path, "--apply", "--reason", "x")
    text = str(refused.value)
    assert text.startswith(command.REFUSED.format(file=path))
    for message in messages:
        assert message in text
    assert snapshot() == before


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(CommandError, match=r"cannot read .*nothing\.json"):
        flags("import", str(tmp_path / "nothing.json"))


# --- from a shell -------------------------------------------------------------------------


def _database_url() -> str:
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = quote(db["USER"] or "") + (f":{quote(db['PASSWORD'])}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}/{db['NAME']}"


def test_from_a_shell_a_refusal_exits_1_with_a_message_and_no_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="termsys.settings",
        DATABASE_URL=_database_url(),
        TERMSYS_VAR_DIR=str(tmp_path / "var"),
        SECRET_KEY="flags-command-test-0123456789abcdef",
        TERMSYS_FLAG_REASON_REQUIRED="1",
    )

    def manage(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "manage.py", "flags", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    refused = manage("enable", "storage_hybrid")
    assert refused.returncode == 1
    assert "CommandError: a reason is required for every flag change" in refused.stderr
    assert "Traceback" not in refused.stderr
    newer = manage("import", write(tmp_path / "v2.json", _document(version=2)), "--apply")
    assert newer.returncode == 1
    assert "version 2 of the termsys-flags format is not supported" in newer.stderr
    assert "Traceback" not in newer.stderr
    shown = manage("status")
    assert shown.returncode == 0, shown.stderr
    assert "storage_hybrid" in shown.stdout
    assert Flag.objects.get(name="storage_hybrid").everyone is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (
            '{"format": "termsys-flags", "version": 1, "flags": '
            '{"storage_hybrid": {"note": "a\\ud800b"}}}',
            "'note' holds text that is not valid Unicode (an unpaired surrogate, \\ud800)",
        ),
        (
            '{"format": "termsys-flags", "version": 1, "flags": {"x\\udc00": {}}}',
            "not valid Unicode",
        ),
    ],
)
def test_an_import_file_no_export_could_be_is_refused_with_why(tmp_path, text, message):
    before = snapshot()
    with pytest.raises(CommandError, match=re.escape(message)):
        flags("import", write(tmp_path / "flags.json", text), "--apply", "--reason", "x")
    assert snapshot() == before

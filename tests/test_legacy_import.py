"""``manage.py import_legacy_state``: the previous system's JSON state, imported once."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from legacy.models import LegacyImport, LegacySession
from sessions_app import selectors, storage
from sessions_app.models import OutputChunk, Project, SessionEvent, TerminalSession
from sessions_app.storage import get_storage
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

COUNT = 300
EPOCH = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
EVERYTHING = 1 << 40


def legacy_session(i: int) -> dict:
    """Return a legacy record: ids old-style or in today's pattern, three users, epoch or ISO."""
    created = EPOCH + timedelta(minutes=i)
    record = {
        "id": f"session_{1740000000000 + i:013d}_{i:08d}" if i % 3 == 0 else f"term-{i}",
        "projectId": f"proj{i % 4}",
        "userId": ("1", "2", None)[i % 3],
        "type": "claude" if i % 5 == 0 else "system",
        "tabName": f"Tab {i}",
        "active": i % 2 == 0,
        "output": [
            f"$ echo {i}",
            f"\x1b[1;32mline {i} ✓\x1b[0m",
            "",
            *(f"row {i}.{n} " + "x" * (n * 7 % 50) for n in range(i % 40)),
        ],
        "currentPath": f"/legacy/home/u{i % 3}/proj{i % 4}/sub{i % 2}",
        "pid": 40000 + i,
        "createdAt": created.isoformat() if i % 2 else int(created.timestamp() * 1000),
    }
    if i % 7:
        record["lastActivity"] = (created + timedelta(seconds=30)).isoformat()
    if record["userId"] is None:
        del record["userId"]
    return record


@pytest.fixture
def ana(db):
    return UserFactory(username="ana")


@pytest.fixture
def records():
    return [legacy_session(i) for i in range(COUNT)]


def write(tmp_path, document, name="state.json"):
    path = tmp_path / name
    path.write_text(json.dumps(document), encoding="utf-8")
    return str(path)


def run(path, *options):
    out = io.StringIO()
    call_command(
        "import_legacy_state",
        path,
        "--map-user",
        "1=ana",
        "--create-users",
        "--default-user",
        "ana",
        *options,
        stdout=out,
    )
    return out.getvalue()


def snapshot():
    """Every row the import can touch, so 'nothing changed' can be checked exactly."""
    user_model = get_user_model()
    return {
        "users": sorted(user_model.objects.values_list("username", "is_active")),
        "projects": sorted(Project.objects.values_list("owner__username", "name", "path")),
        "sessions": sorted(
            TerminalSession.objects.values_list("id", "version", "state", "output_bytes")
        ),
        "chunks": OutputChunk.objects.count(),
        "events": SessionEvent.objects.count(),
        "ledger": sorted(LegacySession.objects.values_list("legacy_id", "session_key")),
        "files": sorted(LegacyImport.objects.values_list("sha256", "imported")),
    }


def stored_output(session_id: str) -> bytes:
    record = storage.find(session_id)
    return (
        get_storage(record.storage_mode)
        .read_scrollback(session_id, max_bytes=EVERYTHING, since=0)
        .data
    )


def test_every_session_is_imported_with_its_output(tmp_path, ana, records):
    path = write(tmp_path, {"sessions": records})

    out = run(path)

    assert f"read {COUNT}, imported {COUNT}, skipped 0, already present 0" in out
    assert f"  100/{COUNT} sessions" in out and f"  {COUNT}/{COUNT} sessions" in out
    assert "user legacy-2: created (inactive, no usable password)" in out
    assert TerminalSession.objects.count() == COUNT
    created_user = get_user_model().objects.get(username="legacy-2")
    assert not created_user.is_active and not created_user.has_usable_password()
    owners = {"1": "ana", "2": "legacy-2", None: "ana"}
    for legacy in records:
        entry = LegacySession.objects.get(legacy_id=legacy["id"])
        record = storage.find(entry.session_key)
        assert record is not None, legacy["id"]
        expected = "\r\n".join(legacy["output"]).encode()
        assert stored_output(record.id) == expected, legacy["id"]
        assert record.output_bytes == len(expected)
        assert (record.state, record.end_reason, record.pid) == ("exited", "imported", None)
        assert record.profile == legacy["type"] and record.tab_name == legacy["tabName"]
        assert record.cwd == legacy["currentPath"]
        project = Project.objects.get(pk=record.project_id)
        assert project.name == f"legacy-{legacy['projectId']}"
        assert project.owner.username == owners[legacy.get("userId")]
        assert record.user_id == project.owner_id
        assert record.created_at == EPOCH + timedelta(minutes=entry.record_index)
        # today's id pattern is kept; anything else gets a new id, the ledger keeps the old one
        if legacy["id"].startswith("session_"):
            assert record.id == legacy["id"]
        else:
            assert record.id != legacy["id"] and record.id.startswith("session_")
    # the owner's page lists them (as ended tabs); project paths that do not exist here
    # became directories under TERMSYS_PROJECTS_ROOT
    assert len(selectors.session_list(user=ana)) == 2 * COUNT // 3
    for project in Project.objects.all():
        assert project.path.startswith(str(tmp_path / "projects"))
    assert LegacyImport.objects.get().imported == COUNT


def test_a_second_run_changes_nothing(tmp_path, ana, records):
    path = write(tmp_path, records)
    run(path)
    before = snapshot()

    out = run(path)

    assert f"read {COUNT}, imported 0, skipped 0, already present {COUNT}" in out
    assert "was imported before" in out
    assert snapshot() == before


def test_sessions_already_imported_from_another_file_are_already_present(tmp_path, ana, records):
    run(write(tmp_path, records[:100], "first.json"))

    out = run(write(tmp_path, records, "all.json"))

    assert f"read {COUNT}, imported {COUNT - 100}, skipped 0, already present 100" in out
    assert TerminalSession.objects.count() == COUNT


def test_a_malformed_record_imports_nothing_and_names_index_and_field(tmp_path, ana, records):
    records[137]["output"] = "not a list"
    records[211]["output"][2] = 42
    path = write(tmp_path, records)
    before = snapshot()

    with pytest.raises(CommandError) as caught:
        run(path)

    message = str(caught.value)
    assert "nothing imported; 2 malformed record(s)" in message
    assert "record 137: output: must be a list of lines, got str" in message
    assert "record 211: output[2]: must be a string, got int" in message
    assert snapshot() == before
    assert not get_user_model().objects.filter(username="legacy-2").exists()
    assert not (tmp_path / "projects").exists()


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("type", "zsh", "type: must be one of system, claude, got 'zsh'"),
        ("createdAt", "yesterday", "createdAt: must be an ISO 8601 time or epoch milliseconds"),
        ("active", "yes", "active: must be true or false"),
        ("id", None, "id: missing"),
        ("pid", "12", "pid: must be a whole number or null"),
    ],
)
def test_each_kind_of_bad_field_is_named(tmp_path, ana, records, field, value, expected):
    records[5][field] = value

    with pytest.raises(CommandError, match="record 5: " + expected.replace("(", r"\(")):
        run(write(tmp_path, records[:10]))

    assert TerminalSession.objects.count() == 0


def test_skip_invalid_imports_the_rest(tmp_path, ana, records):
    bad = dict(records[42], tabName=["not", "text"])
    records[42] = bad
    records.append(dict(records[7]))  # a duplicate id is malformed too
    path = write(tmp_path, records)

    out = run(path, "--skip-invalid")

    assert "skipped record 42: tabName: must be a string" in out
    assert f"skipped record {COUNT}: id: " in out and "duplicate of record 7" in out
    assert f"read {COUNT + 1}, imported {COUNT - 1}, skipped 2, already present 0" in out
    assert TerminalSession.objects.count() == COUNT - 1
    assert not LegacySession.objects.filter(legacy_id=bad["id"]).exists()

    records[42] = legacy_session(42)  # fixed: a new file imports only what is missing
    out = run(write(tmp_path, records[:COUNT], "fixed.json"))
    assert f"read {COUNT}, imported 1, skipped 0, already present {COUNT - 1}" in out


def test_dry_run_changes_nothing(tmp_path, ana, records):
    path = write(tmp_path, records)
    before = snapshot()

    out = run(path, "--dry-run")

    assert f"would import: read {COUNT}, imported {COUNT}, skipped 0, already present 0" in out
    assert "Dry run: nothing changed." in out
    assert snapshot() == before
    assert not (tmp_path / "projects").exists()


def test_unknown_users_are_refused_unless_mapped_or_created(tmp_path, ana, records):
    path = write(tmp_path, records[:6])
    out = io.StringIO()

    with pytest.raises(CommandError) as caught:
        call_command("import_legacy_state", path, "--default-user", "ana", stdout=out)

    assert "record 0: userId: no termsys user for legacy user '1'" in str(caught.value)
    assert "--map-user 1=USERNAME or pass --create-users" in str(caught.value)
    with pytest.raises(CommandError, match="record 2: userId: missing, and no --default-user"):
        call_command("import_legacy_state", path, "--create-users", stdout=out)
    with pytest.raises(CommandError, match="no termsys user 'nobody' \\(given by --map-user"):
        call_command("import_legacy_state", path, "--map-user", "1=nobody", stdout=out)
    assert TerminalSession.objects.count() == 0


def test_existing_project_paths_and_mapped_projects(tmp_path, ana):
    work = tmp_path / "srv" / "api"
    (work / "src").mkdir(parents=True)
    mine = Project.objects.create(owner=ana, name="api", path=str(work))
    records = [
        dict(legacy_session(3), projectId="p1", currentPath=str(work / "src")),
        dict(legacy_session(6), projectId="p1", currentPath=str(work)),
        dict(legacy_session(9), projectId="p2", currentPath=str(work / "src")),
    ]
    out = io.StringIO()
    call_command(
        "import_legacy_state",
        write(tmp_path, records),
        "--default-user",
        "ana",
        "--map-user",
        "1=ana",
        "--map-project",
        "p2=api",
        stdout=out,
    )

    p1 = Project.objects.get(owner=ana, name="legacy-p1")
    assert p1.path == str(work)  # the sessions' common directory, which exists here
    assert TerminalSession.objects.filter(project=mine).count() == 1
    assert "project ana/legacy-p1: created" in out.getvalue()


def test_imported_names_follow_the_rule_of_names_users_give(tmp_path, ana):
    """Characters termsys refuses in a name (ESC, BEL, bidi overrides) do not come in by import."""
    records = [dict(legacy_session(3), projectId="p\u202e1", tabName="\x1b[31mred\x07 tab")]
    run(write(tmp_path, records))
    (session,) = TerminalSession.objects.all()
    assert session.tab_name == "[31mred  tab"
    assert session.project.name == "legacy-p-1"
    with pytest.raises(CommandError, match="U\\+202E at character 5"):
        run(write(tmp_path, records, "again.json"), "--map-project", "x=evil\u202etxt")


def test_imported_projects_without_a_directory_here_get_one_each(tmp_path, ana):
    records = [
        dict(legacy_session(3), projectId="p 1", currentPath="/nowhere/a"),
        dict(legacy_session(6), projectId="p-1", currentPath="/nowhere/b"),
    ]
    run(write(tmp_path, records))
    paths = sorted(Project.objects.values_list("path", flat=True))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["legacy-p-1", "legacy-p-1-2"]


def test_not_legacy_state_is_refused(tmp_path, ana):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(CommandError, match="the file is not JSON"):
        run(str(bad))
    with pytest.raises(CommandError, match=r'must hold a list of sessions or \{"sessions"'):
        run(write(tmp_path, {"terminals": []}))


# Values a JSON file can hold that no database stores as they are (JSON's "\ud800" is a lone
# surrogate, which UTF-8 cannot encode; PostgreSQL text cannot hold NUL; cwd is 1024 at most),
# and times that leave datetime's range once in UTC: each is a malformed record.
UNSTORABLE = [
    ("tabName", "tab \ud800", "tabName: has a lone UTF-16 surrogate \\ud800 at character 4"),
    ("currentPath", "/srv/\udfff", "currentPath: has a lone UTF-16 surrogate \\udfff"),
    ("id", "term-\ud800", "id: has a lone UTF-16 surrogate \\ud800"),
    ("userId", "\ud800", "userId: has a lone UTF-16 surrogate"),
    ("projectId", "p\ud800", "projectId: has a lone UTF-16 surrogate"),
    ("tabName", "a\x00b", "tabName: has a NUL character at character 1"),
    ("currentPath", "/srv/a\x00b", "currentPath: has a NUL character"),
    ("id", "term\x00-1", "id: has a NUL character"),
    ("userId", "an\x00a", "userId: has a NUL character"),
    ("currentPath", "/x" * 513, "currentPath: must be at most 1024 characters, got 1026"),
    ("createdAt", "0001-01-01T00:00:00+01:00", "createdAt: '0001-01-01T00:00:00+01:00' is out"),
    ("createdAt", "9999-12-31T23:59:59-05:00", "createdAt: '9999-12-31T23:59:59-05:00' is out"),
    ("lastActivity", "9999-12-31T23:59:59-05:00", "lastActivity: '9999-12-31T23:59:59-05:00'"),
]


@pytest.mark.parametrize(("field", "value", "expected"), UNSTORABLE)
def test_values_no_database_stores_are_malformed_records(
    tmp_path, ana, records, field, value, expected
):
    records[5][field] = value
    path = write(tmp_path, records[:10])
    before = snapshot()
    for options in ((), ("--dry-run",)):
        with pytest.raises(CommandError) as caught:
            run(path, *options)
        assert f"record 5: {expected}" in str(caught.value)
        assert "nothing imported; 1 malformed record(s)" in str(caught.value)
        assert snapshot() == before
        assert not (tmp_path / "projects").exists()

    out = run(path, "--skip-invalid")
    assert f"skipped record 5: {expected}" in out
    assert "read 10, imported 9, skipped 1" in out
    assert TerminalSession.objects.count() == 9


def test_a_failed_import_leaves_no_project_directory_behind(tmp_path, ana, records, settings):
    """The second user's project directory cannot be made (a file is in the way): the import
    stops with the reason, and the directory it had made for the first user is gone too."""
    root = tmp_path / "projects"
    root.mkdir()
    (root / "legacy-2").write_text("in the way")
    path = write(tmp_path, records[:6])
    before = snapshot()

    with pytest.raises(CommandError) as caught:
        run(path)

    assert f"nothing imported; cannot create the project directory {root / 'legacy-2'}/" in str(
        caught.value
    )
    assert snapshot() == before
    assert sorted(p.name for p in root.iterdir()) == ["legacy-2"]

"""The JSON HTTP API: every endpoint, every error shape."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from channels.db import database_sync_to_async
from django.test import AsyncClient

from sessions_app import services, terminals
from sessions_app.models import Project, TerminalSession
from sessions_app.pty import descendants, is_running, processes_with_env
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

SESSION_ID_RE = r"^session_\d{13}_[a-z0-9]{8}$"


@pytest.fixture
async def client(user):
    client = AsyncClient()
    await client.aforce_login(user)
    return client


async def post(client, url, body=None, **extra):
    return await client.post(
        url, data=json.dumps(body or {}), content_type="application/json", **extra
    )


def assert_error(response, status, code=None):
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert body["success"] is False
    assert set(body["error"]) == {"code", "message", "details", "timestamp"}
    assert body["error"]["message"]
    assert body["requestId"]
    if code:
        assert body["error"]["code"] == code
    return body["error"]


async def test_create_and_list_projects(client, tmp_path):
    response = await post(client, "/api/projects", {"name": "api"})
    assert response.status_code == 201
    project = response.json()["project"]
    assert project["name"] == "api"
    assert project["path"].endswith("/api")
    explicit = await post(client, "/api/projects", {"name": "explicit", "path": str(tmp_path)})
    assert explicit.json()["project"]["path"] == str(tmp_path)
    listed = (await client.get("/api/projects")).json()
    assert [p["name"] for p in listed["projects"]] == ["api", "explicit"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "name"),
        ({"name": "  "}, "name"),
        ({"name": "a/b"}, "name"),
        ({"name": "x", "path": "/nonexistent/dir"}, "path"),
        ({"name": "x", "path": "relative"}, "path"),
        ({"name": "x", "path": "/etc/hostname"}, "path"),
    ],
)
async def test_project_validation(client, body, field):
    error = assert_error(await post(client, "/api/projects", body), 400, "validation_failed")
    assert error["details"]["field"] == field


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/tmp/" + "a" * 300, "File name too long"),
        ("~nosuchuser-termsys", "names no user of this machine"),
        ("~nosuchuser-termsys/work", "names no user of this machine"),
        ("/tmp/a\x00b", "does not exist or is not a directory"),
    ],
)
async def test_a_path_the_system_cannot_use_is_400_naming_path(client, path, fragment):
    response = await post(client, "/api/projects", {"name": "p", "path": path})
    error = assert_error(response, 400, "validation_failed")
    assert error["details"] == {"field": "path"}
    assert fragment in error["message"]
    assert not await Project.objects.filter(name="p").aexists()


REFUSED_IN_NAMES = [
    ("\x00", "control character"),
    ("\x1b", "control character"),
    ("\x07", "control character"),
    ("\r", "control character"),
    ("\n", "control character"),
    ("\x7f", "control character"),
    ("\x9b", "control character"),
    ("\u202e", "invisible formatting character"),
    ("\u200b", "invisible formatting character"),
    ("\u2028", "line separator"),
    ("\u2029", "paragraph separator"),
]


@pytest.mark.parametrize(("char", "what"), REFUSED_IN_NAMES)
async def test_names_refuse_invisible_and_control_characters_everywhere(
    client, project, char, what, live_terminals
):
    name = f"ab{char}cd"
    code = f"U+{ord(char):04X}"
    for url, body, field in [
        ("/api/projects", {"name": name}, "name"),
        ("/api/terminal/create", {"projectId": project.pk, "tabName": name}, "tabName"),
    ]:
        error = assert_error(await post(client, url, body), 400, "validation_failed")
        assert error["details"] == {"field": field, "position": 3, "codePoint": code}
        assert error["message"].startswith(f"{field} must not contain ")
        assert f"{what}: {code} at character 3" in error["message"]
    assert await Project.objects.acount() == 1
    assert terminals.all_terminals() == []
    created = await post(client, "/api/terminal/create", {"projectId": project.pk, "tabName": "t"})
    session_id = created.json()["session"]["id"]
    response = await post(client, f"/api/terminal/{session_id}/rename", {"tabName": name})
    error = assert_error(response, 400, "validation_failed")
    assert error["details"]["codePoint"] == code
    assert (await TerminalSession.objects.aget(pk=session_id)).tab_name == "t"


async def test_names_keep_the_joiners_that_writing_needs(client, project, live_terminals):
    """Persian and Indic scripts need the zero-width non-joiner, emoji sequences the joiner."""
    for name in ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "👨\u200d👩\u200d👧 family"):
        created = await post(client, "/api/projects", {"name": name})
        assert created.status_code == 201, created.content
        assert created.json()["project"]["name"] == name
        opened = await post(
            client, "/api/terminal/create", {"projectId": project.pk, "tabName": name}
        )
        assert opened.json()["session"]["tabName"] == name


async def test_a_name_is_trimmed_before_its_length_is_checked_at_create_and_rename(
    client, project, live_terminals
):
    longest, too_long = "x" * 100, "y" * 101
    created = await post(
        client, "/api/terminal/create", {"projectId": project.pk, "tabName": f" {longest} "}
    )
    assert created.status_code == 201, created.content
    session_id = created.json()["session"]["id"]
    assert created.json()["session"]["tabName"] == longest
    renamed = await post(client, f"/api/terminal/{session_id}/rename", {"tabName": longest + " "})
    assert renamed.json()["session"]["tabName"] == longest
    project_created = await post(client, "/api/projects", {"name": longest + " "})
    assert project_created.json()["project"]["name"] == longest
    for url, body, field in [
        ("/api/terminal/create", {"projectId": project.pk, "tabName": too_long}, "tabName"),
        (f"/api/terminal/{session_id}/rename", {"tabName": too_long}, "tabName"),
        ("/api/projects", {"name": too_long}, "name"),
    ]:
        error = assert_error(await post(client, url, body), 400, "validation_failed")
        assert error["details"] == {"field": field, "max": 100}
        assert f"{field} must be at most 100 characters" in error["message"]


def test_the_admin_holds_project_names_to_the_same_rule(project):
    from django.contrib.auth import get_user_model
    from django.test import Client

    staff = get_user_model().objects.create_user("root-names", password="x" * 12)
    staff.is_staff = staff.is_superuser = True
    staff.save()
    client = Client()
    client.force_login(staff)
    url = f"/admin/sessions_app/project/{project.pk}/change/"
    form = {"owner": project.owner.pk, "name": "evil\u202eexe.txt", "path": project.path}
    page = client.post(url, form)
    assert page.status_code == 200  # the form again, with the error
    assert "U+202E" in page.content.decode()
    project.refresh_from_db()
    assert project.name != "evil\u202eexe.txt"
    client.post(url, dict(form, name="  renamed  "))
    project.refresh_from_db()
    assert project.name == "renamed"


async def test_every_project_without_a_path_gets_a_directory_of_its_own(client, user, settings):
    root = Path(settings.TERMSYS_PROJECTS_ROOT).resolve()
    owner_dir = root / user.username
    (owner_dir / "left-over").mkdir(parents=True)  # a deleted project's, or someone else's
    names = ["my app", "my-app", "My App", "..", ".", "~", "名前", "😀", "😀😀", "left-over"]
    paths = {}
    for name in names:
        response = await post(client, "/api/projects", {"name": name})
        assert response.status_code == 201, response.content
        paths[name] = Path(response.json()["project"]["path"])
    assert len(set(paths.values())) == len(names)
    for path in paths.values():
        assert path.parent == owner_dir and path.is_dir() and not any(path.iterdir())
    assert paths["my app"].name == "my-app" and paths["my-app"].name == "my-app-2"
    assert paths["名前"].name == "名前"
    assert paths["left-over"].name == "left-over-2"
    assert {paths[n].name for n in ("..", ".", "~", "😀", "😀😀")} == {
        "project",
        *(f"project-{n}" for n in range(2, 6)),
    }


async def test_no_two_users_share_a_project_directory(settings):
    root = Path(settings.TERMSYS_PROJECTS_ROOT).resolve()
    paths = []
    for username in ["a@b", "a+b", "..", "."]:  # valid Django usernames
        client = AsyncClient()
        await client.aforce_login(await database_sync_to_async(UserFactory)(username=username))
        response = await post(client, "/api/projects", {"name": "x"})
        assert response.status_code == 201, response.content
        paths.append(Path(response.json()["project"]["path"]))
    assert len(set(paths)) == 4
    assert all(root in path.parents for path in paths)


async def test_a_refused_project_leaves_no_directory_behind(client, settings):
    first = await post(client, "/api/projects", {"name": "twice"})
    assert_error(await post(client, "/api/projects", {"name": "twice"}), 409, "conflict")
    made = Path(first.json()["project"]["path"])
    assert sorted(p.name for p in made.parent.iterdir()) == ["twice"]


async def test_duplicate_project_name_is_409(client):
    await post(client, "/api/projects", {"name": "twice"})
    assert_error(await post(client, "/api/projects", {"name": "twice"}), 409)


async def test_malformed_json_is_400(client):
    response = await client.post("/api/projects", data="{nope", content_type="application/json")
    assert "not valid JSON" in assert_error(response, 400)["message"]
    response = await client.post("/api/projects", data="[1]", content_type="application/json")
    assert assert_error(response, 400)["message"] == "Request body must be a JSON object."


async def test_oversized_body_is_413(client):
    response = await post(client, "/api/projects", {"name": "x" * (2 * 1024 * 1024)})
    assert_error(response, 413, "payload_too_large")


def strict_json(response) -> dict:
    """Parse a response as standard JSON: NaN and Infinity are not JSON."""

    def refuse(constant):
        raise ValueError(f"{constant} in the response")

    return json.loads(response.content, parse_constant=refuse)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_are_not_json(client, project, constant):
    response = await client.post(
        "/api/terminal/create",
        data=f'{{"projectId": {constant}}}',
        content_type="application/json",
    )
    error = assert_error(response, 400, "validation_failed")
    assert f"{constant} is not a JSON value" in error["message"]
    strict_json(response)


@pytest.mark.parametrize("value", ["true", "1.5", "1.9", '"1"', "[1]"])
async def test_project_id_must_be_a_whole_number(client, project, value, live_terminals):
    response = await client.post(
        "/api/terminal/create",
        data=f'{{"projectId": {value.replace("1", str(project.pk))}}}',
        content_type="application/json",
    )
    error = assert_error(response, 400, "validation_failed")
    assert error["details"] == {"field": "projectId"}
    assert "projectId must be a project's id, a whole number" in error["message"]
    assert terminals.all_terminals() == []


@pytest.mark.parametrize("value", ["1e400", "100000000000000000000000", "-1", "0"])
async def test_a_project_id_no_project_can_have_is_not_found(client, value):
    response = await client.post(
        "/api/terminal/create", data=f'{{"projectId": {value}}}', content_type="application/json"
    )
    assert response.status_code in (400, 404), response.content
    assert_error(response, response.status_code)
    strict_json(response)


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("/api/projects", '{"name": "x\\ud800"}', "name"),
        ("/api/projects", '{"name": "ok", "path": "/tmp/\\udcff"}', "path"),
        ("/api/terminal/create", '{"projectId": 1, "tabName": "\\udfff"}', "tabName"),
        ("/api/projects", '{"name": "ok", "extra": {"deep": ["\\ud83d"]}}', "extra.deep[0]"),
    ],
)
async def test_text_not_valid_unicode_is_refused_naming_the_field(client, url, body, field):
    response = await client.post(url, data=body, content_type="application/json")
    error = assert_error(response, 400, "validation_failed")
    assert error["details"]["field"] == field
    assert f"{field} is not valid Unicode" in error["message"]
    assert not await Project.objects.filter(name="ok").aexists()


async def test_rename_to_text_that_is_not_valid_unicode_is_refused(client, session):
    response = await client.post(
        f"/api/terminal/{session.id}/rename",
        data='{"tabName": "\\udfff"}',
        content_type="application/json",
    )
    error = assert_error(response, 400, "validation_failed")
    assert error["details"]["field"] == "tabName"
    assert (await TerminalSession.objects.aget(pk=session.id)).tab_name == "main"


async def test_a_multipart_body_is_refused_saying_to_send_json(user):
    strict = AsyncClient(enforce_csrf_checks=True)
    await strict.aforce_login(user)
    token = (await strict.get("/")).cookies["csrftoken"].value
    response = await strict.post(
        "/api/projects", data={"name": "x"}, headers={"X-CSRFToken": token}
    )
    error = assert_error(response, 415, "unsupported_media_type")
    assert "application/json" in error["message"]
    assert not await Project.objects.filter(name="x").aexists()


@pytest.fixture
async def strict_client(user):
    """A logged-in client that goes through the CSRF check, which parses form bodies."""
    client = AsyncClient(enforce_csrf_checks=True)
    await client.aforce_login(user)
    token = (await client.get("/")).cookies["csrftoken"].value
    client.defaults["HTTP_X_CSRFTOKEN"] = token
    return client


async def test_a_form_body_over_the_limit_is_413_json(strict_client):
    response = await strict_client.post(
        "/api/projects",
        data="name=" + "a" * 1_100_000,
        content_type="application/x-www-form-urlencoded",
    )
    error = assert_error(response, 413, "payload_too_large")
    assert "DATA_UPLOAD_MAX_MEMORY_SIZE" in error["message"]


async def test_a_form_body_with_too_many_fields_is_400_json(strict_client):
    response = await strict_client.post(
        "/api/projects",
        data="&".join(f"k{i}=v" for i in range(1100)),
        content_type="application/x-www-form-urlencoded",
    )
    error = assert_error(response, 400, "bad_request")
    assert "more than 1000 query parameters or form fields" in error["message"]


async def test_a_multipart_body_without_boundary_is_415_json(strict_client):
    response = await strict_client.post(
        "/api/projects", data="name=x", content_type="multipart/form-data"
    )
    assert "application/json" in assert_error(response, 415, "unsupported_media_type")["message"]


async def test_too_many_query_parameters_is_400_json(client):
    query = "&".join(f"k{i}=v" for i in range(1100))
    response = await client.get(f"/api/sessions/search?q=x&{query}")
    error = assert_error(response, 400, "bad_request")
    assert "DATA_UPLOAD_MAX_NUMBER_FIELDS" in error["message"]


async def test_a_host_not_allowed_is_400_json_under_api_and_a_page_elsewhere(client):
    response = await client.get("/api/projects", headers={"host": "evil.example"})
    error = assert_error(response, 400, "bad_request")
    assert "ALLOWED_HOSTS" in error["message"] and "evil" not in error["message"]
    page = await client.get("/accounts/login/", headers={"host": "evil.example"})
    assert page.status_code == 400 and page["Content-Type"].startswith("text/html")


async def test_terminal_lifecycle(client, user, project, live_terminals):
    response = await post(
        client,
        "/api/terminal/create",
        {"projectId": project.pk, "type": "system", "tabName": "build"},
    )
    assert response.status_code == 201
    body = response.json()
    session = body["session"]
    assert re.match(SESSION_ID_RE, session["id"])
    assert body["connectionUrl"] == f"/ws/terminals/{session['id']}/"
    assert {k: session[k] for k in ("projectId", "type", "tabName", "state", "cwd")} == {
        "projectId": project.pk,
        "type": "system",
        "tabName": "build",
        "state": "active",
        "cwd": project.path,
    }
    assert session["pid"] > 0 and session["createdAt"] and session["lastActivity"]

    listed = (await client.get("/api/terminal/list")).json()
    assert [s["id"] for s in listed["sessions"]] == [session["id"]]
    assert listed["memoryUsage"]["rss"] > 0 and listed["memoryUsage"]["sessionCount"] >= 1

    in_project = (await client.get(f"/api/workspace/projects/{project.pk}/terminals")).json()
    assert in_project["projectId"] == project.pk and in_project["activeCount"] == 1
    assert in_project["terminals"][0]["tabName"] == "build"

    assert (session["tabNamed"], session["cols"], session["rows"]) == (False, 80, 24)
    renamed = await post(client, f"/api/terminal/{session['id']}/rename", {"tabName": "deploy"})
    assert renamed.json()["session"]["tabName"] == "deploy"
    # The user chose it: the page shows it rather than the process title, from now on.
    assert renamed.json()["session"]["tabNamed"] is True
    listed = (await client.get(f"/api/workspace/projects/{project.pk}/terminals")).json()
    assert listed["terminals"][0]["tabNamed"] is True
    # An empty name (or null) takes it back: the tab follows the title again, and has a name
    # as a new tab gets one for while there is none. No name at all is still a clear 400.
    for cleared in ("", "   ", None):
        back = await post(client, f"/api/terminal/{session['id']}/rename", {"tabName": cleared})
        assert back.status_code == 200, back.content
        assert (back.json()["session"]["tabName"], back.json()["session"]["tabNamed"]) == (
            "Terminal 1",
            False,
        )
    error = assert_error(await post(client, f"/api/terminal/{session['id']}/rename", {}), 400)
    assert error["details"] == {"field": "tabName"} and '""' in error["message"]

    shell_pid = session["pid"]
    closed = await post(client, f"/api/terminal/{session['id']}/close")
    assert closed.status_code == 200
    assert closed.json()["session"]["state"] == "killed"
    assert terminals.get(session["id"]) is None
    assert not descendants(shell_pid) and not is_running(shell_pid)
    # history kept, tab gone
    assert await TerminalSession.objects.filter(pk=session["id"], state="killed").aexists()
    assert (await client.get(f"/api/workspace/projects/{project.pk}/terminals")).json()[
        "terminals"
    ] == []


def _sleeps_of(session_id: str) -> set[int]:
    found = set()
    for pid in processes_with_env(f"TERMSYS_SESSION_ID={session_id}".encode()):
        try:
            if open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"sleep\0"):
                found.add(pid)
        except OSError:
            pass
    return found


async def test_close_ends_every_process_the_shell_started(
    client, user, project, live_terminals, connect
):
    response = await post(client, "/api/terminal/create", {"projectId": project.pk})
    session = response.json()["session"]
    term = await connect(user, session["id"])
    await term.type(
        "sleep 1000 & (sleep 1001 &) ; setsid sleep 1002 & "
        "nohup sleep 1003 >/dev/null 2>&1 & echo BG-$((1))-OK\r"
    )
    await term.read_until(b"BG-1-OK")
    sleeps: set[int] = set()
    for _ in range(100):  # background jobs exec their sleep a moment after the echo
        sleeps = _sleeps_of(session["id"])
        if len(sleeps) == 4:
            break
        await asyncio.sleep(0.05)
    assert len(sleeps) == 4, "all four sleeps run, some of them outside the shell's process tree"
    assert not sleeps <= descendants(session["pid"])
    await post(client, f"/api/terminal/{session['id']}/close")
    assert [pid for pid in sleeps | {session["pid"]} if is_running(pid)] == []


async def test_session_limit_is_409(client, project, settings, live_terminals):
    settings.TERMSYS_MAX_SESSIONS_PER_PROJECT = 2
    for _ in range(2):
        assert (
            await post(client, "/api/terminal/create", {"projectId": project.pk})
        ).status_code == 201
    error = assert_error(
        await post(client, "/api/terminal/create", {"projectId": project.pk}),
        409,
        "session_limit_reached",
    )
    assert "TERMSYS_MAX_SESSIONS_PER_PROJECT=2" in error["message"]


async def test_unknown_profile_is_400(client, project):
    error = assert_error(
        await post(client, "/api/terminal/create", {"projectId": project.pk, "type": "nope"}), 400
    )
    assert "system" in error["details"]["allowed"]


@pytest.mark.parametrize("mode", ["DATABASE", "LOCAL", "HYBRID"])
async def test_a_profile_whose_command_does_not_exist_is_a_clear_error_not_a_hung_tab(
    client, project, settings, tmp_path, mode, live_terminals
):
    """A create refused with 400 leaves nothing behind: no tab in either list, no row, and the
    next terminal is "Terminal 1" as if the attempt had not happened."""
    from sessions_app import storage

    settings.TERMSYS_STORAGE_MODE = mode
    not_a_program = tmp_path / "not-a-program"
    not_a_program.write_text("this is text, not a program\n")
    not_a_program.chmod(0o755)
    settings.TERMSYS_PROFILES = {
        "ghost": ["/opt/nowhere/ghost-shell", "-l"],
        "text": [str(not_a_program)],
        "system": ["/bin/bash", "--noprofile", "--norc"],
    }
    try:
        for profile, fragment in [("ghost", "/opt/nowhere/ghost-shell"), ("text", "Exec format")]:
            response = await post(
                client, "/api/terminal/create", {"projectId": project.pk, "type": profile}
            )
            error = assert_error(response, 400, "spawn_failed")
            assert fragment in error["message"]
            assert "session" not in response.json()
        assert (await client.get("/api/terminal/list")).json()["sessions"] == []
        url = f"/api/workspace/projects/{project.pk}/terminals"
        assert (await client.get(url)).json()["terminals"] == []
        snapshot = (await client.get(f"/api/workspace/projects/{project.pk}/snapshot")).json()
        assert snapshot["terminals"] == []
        assert not await TerminalSession.objects.aexists()
        created = await post(client, "/api/terminal/create", {"projectId": project.pk})
        assert created.json()["session"]["tabName"] == "Terminal 1"
    finally:
        await services.terminals_shutdown()
        storage._close_all()


async def test_the_default_tab_name_is_one_no_tab_of_the_project_has(
    client, project, live_terminals
):
    for name in ["Terminal 2", None]:
        body = {"projectId": project.pk, **({"tabName": name} if name else {})}
        assert (await post(client, "/api/terminal/create", body)).status_code == 201
    tabs = (await client.get(f"/api/workspace/projects/{project.pk}/terminals")).json()
    assert [t["tabName"] for t in tabs["terminals"]] == ["Terminal 2", "Terminal 3"]


async def test_the_session_count_is_only_your_own(client, session, other_user, live_terminals):
    listed = (await client.get("/api/terminal/list")).json()
    assert listed["memoryUsage"]["sessionCount"] == 1
    other = AsyncClient()
    await other.aforce_login(other_user)
    theirs = (await other.get("/api/terminal/list")).json()
    assert theirs["sessions"] == [] and theirs["memoryUsage"]["sessionCount"] == 0


async def test_another_users_ids_are_404_and_nothing_spawns(
    client, other_user, tmp_path, live_terminals
):
    theirs = await Project.objects.acreate(owner=other_user, name="theirs", path=str(tmp_path))
    before = len(terminals.all_terminals())
    assert_error(
        await post(client, "/api/terminal/create", {"projectId": theirs.pk}), 404, "not_found"
    )
    assert len(terminals.all_terminals()) == before
    assert_error(await client.get(f"/api/workspace/projects/{theirs.pk}/terminals"), 404)
    other_client = AsyncClient()
    await other_client.aforce_login(other_user)
    created = (await post(other_client, "/api/terminal/create", {"projectId": theirs.pk})).json()[
        "session"
    ]
    assert_error(await post(client, f"/api/terminal/{created['id']}/close"), 404)
    assert_error(await post(client, f"/api/terminal/{created['id']}/rename", {"tabName": "x"}), 404)
    assert terminals.get(created["id"]) is not None
    assert (await client.get("/api/terminal/list")).json()["sessions"] == []


async def test_login_required_everywhere(db):
    anonymous = AsyncClient()
    for method, url in [
        ("get", "/api/projects"),
        ("get", "/api/terminal/list"),
        ("post", "/api/terminal/create"),
        ("get", "/api/workspace/projects/1/terminals"),
        ("post", "/api/terminal/x/close"),
    ]:
        assert_error(await getattr(anonymous, method)(url), 401, "not_authenticated")
    page = await anonymous.get("/")
    assert page.status_code == 302 and page["Location"].startswith("/accounts/login/")


async def test_wrong_method_is_405_and_unknown_path_404(client):
    response = await client.delete("/api/projects")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response["Allow"]
    assert_error(await client.get("/api/terminal/create"), 405)
    assert_error(await client.get("/api/nope"), 404, "not_found")


async def test_csrf_is_enforced_on_posts(user):
    strict = AsyncClient(enforce_csrf_checks=True)
    await strict.aforce_login(user)
    error = assert_error(await post(strict, "/api/projects", {"name": "x"}), 403, "forbidden")
    assert "X-CSRFToken" in error["message"]
    page = await strict.get("/")
    token = page.cookies["csrftoken"].value
    ok = await post(strict, "/api/projects", {"name": "x"}, headers={"X-CSRFToken": token})
    assert ok.status_code == 201


async def test_health(db):
    response = await AsyncClient().get("/api/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"] == {"database": "ok", "channelLayer": "ok", "cache": "ok"}
    assert body["storage"]["DATABASE"] == {"pending": 0, "oldestPendingAge": 0.0}


async def test_metrics_report_live_terminals_and_pending_writes(session, settings):
    text = (await AsyncClient().get("/metrics")).content.decode()
    assert "termsys_live_terminals 1" in text
    assert 'termsys_storage_pending{mode="DATABASE"} 0' in text


async def test_post_with_an_ended_login_is_401_not_a_csrf_error(db):
    strict = AsyncClient(enforce_csrf_checks=True)
    assert_error(
        await post(strict, "/api/terminal/create", {"projectId": 1}), 401, "not_authenticated"
    )


async def test_health_names_the_failing_check(db, settings):
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",  # nothing listens on port 1
            "OPTIONS": {"socket_connect_timeout": 0.5},
        }
    }
    response = await AsyncClient().get("/api/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable" and body["failing"] == ["cache"]
    assert body["checks"]["database"] == "ok" and body["checks"]["cache"] != "ok"


def test_the_watch_page_links_back_to_the_sessions_admin_page_whatever_its_id(project):
    """Session ids hold underscores; the admin reads "_40" in a URL as "@", so its links must
    be quoted as the admin quotes them, or some sessions' "Back to admin" leads nowhere."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    client = Client()
    staff = get_user_model().objects.create_user("root-watch", password="x" * 12)
    staff.is_staff = staff.is_superuser = True
    staff.save()
    client.force_login(staff)
    session = TerminalSession.objects.create(
        id="session_1795303845870_40rs9i94", project=project, user=project.owner, state="exited"
    )
    page = client.get(f"/watch/{session.id}/").content.decode()
    back = re.search(r'href="([^"]+)"[^>]*>Back to admin', page).group(1)
    assert back == "/admin/sessions_app/terminalsession/session_5F1795303845870_5F40rs9i94/change/"
    detail = client.get(back)
    assert detail.status_code == 200 and session.id in detail.content.decode()


def test_the_page_refuses_no_project_name_the_server_accepts_and_no_more(db):
    """The name field's maxlength is the server's limit: a longer paste is cut where the
    server would refuse it, and nothing the server accepts is cut."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    from sessions_app.names import NAME_MAX

    client = Client()
    client.force_login(get_user_model().objects.create_user("maxlength", password="x" * 12))
    page = client.get("/").content.decode()
    field = re.search(r'<input name="name"[^>]*>', page).group()
    assert f'maxlength="{NAME_MAX}"' in field
    assert Project._meta.get_field("name").max_length == NAME_MAX


def test_the_watch_page_renders_at_the_owners_size(project):
    from django.contrib.auth import get_user_model
    from django.test import Client

    client = Client()
    staff = get_user_model().objects.create_user("watch-size", password="x" * 12)
    staff.is_staff = True
    staff.save()
    client.force_login(staff)
    session = TerminalSession.objects.create(
        project=project, user=project.owner, state="exited", cols=132, rows=41
    )
    page = client.get(f"/watch/{session.id}/").content.decode()
    data = json.loads(re.search(r'id="termsys-session"[^>]*>(.*?)</script>', page).group(1))
    assert (data["cols"], data["rows"]) == (132, 41)

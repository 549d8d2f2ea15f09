"""Session export: asciicast v3 and plain text, from ``manage.py sessions export`` and the API."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import AsyncClient

from sessions_app import export, storage
from sessions_app.models import OutputChunk, StorageMode, new_session_id
from sessions_app.storage import SessionRecord, get_storage
from tests.factories import ProjectFactory

pytestmark = pytest.mark.django_db(transaction=True)

# Colours, a title (OSC), cursor moves, UTF-8 text, and enough bytes for several chunks and
# frames, so frame and chunk boundaries fall inside multi-byte characters.
BATCHES = [
    b"\x1b]0;build\x07$ make\r\n",
    "\x1b[1;31merror\x1b[0m: naïve café ✓ 漢字\r\n".encode() * 3000,
    b"\x1b[2K\x1b[1Gprogress 100%\r\n",
    "λ done — ✓\r\n".encode() * 9000,
    b"\x1b[?25h$ ",
]
OUTPUT = b"".join(BATCHES)
ESCAPES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t \n \r (and \x1b)


@pytest.fixture
def stored(user, tmp_path):
    project = ProjectFactory(owner=user, path=str(tmp_path))
    provider = get_storage(StorageMode.DATABASE)
    record = provider.create(
        SessionRecord(
            id=new_session_id(),
            project_id=project.pk,
            user_id=user.pk,
            profile="system",
            tab_name="build & test",
            state="exited",
            storage_mode=StorageMode.DATABASE,
            cols=120,
            rows=40,
            exit_code=2,
        )
    )
    end = 0
    for batch in BATCHES:
        end = provider.append_output(record.id, end, batch)
    return storage.find(record.id)


def parse_cast(body: bytes) -> tuple[dict, list[list]]:
    lines = body.decode("utf-8").splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def test_cast_is_asciicast_v3_and_replays_the_output(stored):
    assert OutputChunk.objects.filter(session_id=stored.id).count() >= 2

    result = export.session_export(record=stored, format="cast")

    header, events = parse_cast(result.body)
    assert header["version"] == 3
    assert header["term"]["cols"] == 120 and header["term"]["rows"] == 40
    assert header["title"] == "build & test"
    assert header["timestamp"] == int(stored.created_at.timestamp())
    assert all(len(e) == 3 and isinstance(e[0], float | int) and e[0] >= 0 for e in events)
    assert "".join(e[2] for e in events if e[1] == "o") == OUTPUT.decode("utf-8")
    assert events[-1] == [0.0, "x", "2"]
    assert len(events) > 20  # cut into frames, not one blob
    assert result.content_type == "application/x-asciicast"
    assert result.filename == f"build-test-{stored.id}.cast"


def test_output_held_in_memory_plays_at_a_fixed_pace(user, tmp_path):
    project = ProjectFactory(owner=user, path=str(tmp_path))
    provider = get_storage(StorageMode.LOCAL)
    record = provider.create(
        SessionRecord(
            id=new_session_id(),
            project_id=project.pk,
            user_id=user.pk,
            profile="system",
            tab_name="mem",
            state="active",
            storage_mode=StorageMode.LOCAL,
        )
    )
    provider.append_output(record.id, 0, OUTPUT)

    _, events = parse_cast(
        export.session_export(record=provider.get(record.id), format="cast").body
    )

    assert "".join(e[2] for e in events) == OUTPUT.decode("utf-8")
    assert events[0][0] == 0.0 and {e[0] for e in events[1:]} == {export.FRAME_INTERVAL}


def test_text_has_no_escape_sequences(stored):
    result = export.session_export(record=stored, format="text")

    text = result.body.decode("utf-8")
    assert "\x1b" not in text and not ESCAPES.search(text)
    assert text.startswith("$ make\nerror: naïve café ✓ 漢字\n")
    assert "progress 100%\n" in text and text.endswith("λ done — ✓\n$ ")
    assert result.filename.endswith(".txt")


def test_unknown_format_is_refused(stored):
    with pytest.raises(export.UnknownFormat, match="Unknown export format 'html'"):
        export.session_export(record=stored, format="html")


def test_command_writes_a_file_or_stdout(stored, tmp_path):
    target = tmp_path / "out.cast"
    out = io.StringIO()
    call_command(
        "sessions", "export", stored.id, "--format", "cast", "--output", target, stdout=out
    )
    assert f"Exported {stored.id} (cast, " in out.getvalue()
    header, events = parse_cast(target.read_bytes())
    assert header["version"] == 3
    assert "".join(e[2] for e in events if e[1] == "o") == OUTPUT.decode("utf-8")

    out = io.StringIO()
    call_command("sessions", "export", stored.id, "--format", "text", stdout=out)
    assert out.getvalue() == export.session_export(record=stored, format="text").body.decode()

    with pytest.raises(CommandError, match="no session 'session_nope'"):
        call_command("sessions", "export", "session_nope", stdout=out)


@pytest.fixture
async def client(user):
    client = AsyncClient()
    await client.aforce_login(user)
    return client


def assert_error(response, status, code):
    assert response.status_code == status
    body = response.json()
    assert body["success"] is False and body["error"]["code"] == code
    assert body["error"]["message"] and "timestamp" in body["error"] and body["requestId"]
    return body


async def test_api_downloads_an_attachment(client, stored):
    response = await client.get(f"/api/terminal/{stored.id}/export?format=cast")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-asciicast"
    expected = f'attachment; filename="build-test-{stored.id}.cast"'
    assert response["Content-Disposition"] == expected
    header, events = parse_cast(response.content)
    assert header["version"] == 3
    assert "".join(e[2] for e in events if e[1] == "o") == OUTPUT.decode("utf-8")

    response = await client.get(f"/api/terminal/{stored.id}/export?format=text")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert response["Content-Disposition"].endswith('.txt"')
    assert b"\x1b" not in response.content


async def test_api_refuses_other_users_unknown_formats_and_strangers(client, stored, other_user):
    body = assert_error(
        await client.get(f"/api/terminal/{stored.id}/export?format=xml"), 400, "validation_failed"
    )
    assert body["error"]["details"]["field"] == "format"
    assert_error(await client.get("/api/terminal/session_nope/export"), 404, "not_found")

    other = AsyncClient()
    await other.aforce_login(other_user)
    assert_error(await other.get(f"/api/terminal/{stored.id}/export"), 404, "not_found")
    # another user's session is 404 whatever the format: nothing says it exists
    assert_error(await other.get(f"/api/terminal/{stored.id}/export?format=xml"), 404, "not_found")
    assert_error(
        await AsyncClient().get(f"/api/terminal/{stored.id}/export"), 401, "not_authenticated"
    )
    assert_error(await client.post(f"/api/terminal/{stored.id}/export"), 405, "method_not_allowed")


def test_an_imported_session_exports_its_legacy_output(user, tmp_path):
    lines = ["$ ls", "\x1b[34mdocs\x1b[0m  README.md", "$ exit"]
    state = tmp_path / "state.json"
    state.write_text(
        json.dumps(
            [
                {
                    "id": "t-1",
                    "projectId": "p",
                    "type": "system",
                    "tabName": "old",
                    "active": False,
                    "output": lines,
                    "currentPath": "/nowhere",
                    "pid": 1,
                    "createdAt": "2025-06-01T10:00:00Z",
                }
            ]
        )
    )
    call_command(
        "import_legacy_state", str(state), "--default-user", user.username, stdout=io.StringIO()
    )
    record = storage.find(storage.list_for_user(user.pk)[0].id)

    header, events = parse_cast(export.session_export(record=record, format="cast").body)
    text = export.session_export(record=record, format="text").body.decode()

    assert header["timestamp"] == 1748772000
    assert "".join(e[2] for e in events if e[1] == "o") == "\r\n".join(lines)
    assert text == "$ ls\ndocs  README.md\n$ exit"


def database_url() -> str:
    """This test database as ``DATABASE_URL``, for a command run in a process of its own."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("kind", ["cast", "text"])
def test_export_to_a_full_standard_output_is_a_clear_error(stored, tmp_path, kind):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(DATABASE_URL=database_url(), TERMSYS_VAR_DIR=str(tmp_path / "var"))
    root = Path(__file__).resolve().parent.parent
    with open("/dev/full", "w") as full:  # every write fails: No space left on device
        done = subprocess.run(
            [
                sys.executable,
                str(root / "manage.py"),
                "sessions",
                "export",
                stored.id,
                "--format",
                kind,
            ],
            cwd=root,
            env={**env, "TERMSYS_FLAG_TASKS": "0"},
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"CommandError: {stored.id}: cannot write the export to standard output: "
        "No space left on device"
    )


async def test_a_cast_replays_each_resize_where_it_happened(user, session, connect):
    """The header has the size the terminal started at; each later size is an ``r`` event
    between the output printed before it and after it, so a player wraps lines as they were."""
    import asyncio

    from channels.db import database_sync_to_async

    from sessions_app import terminals
    from sessions_app.models import SessionEvent

    async def resized(count: int) -> None:
        events = SessionEvent.objects.filter(session_id=session.id, kind="resized")
        for _ in range(100):  # recorded once the size has held a second
            if await events.acount() >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"fewer than {count} resized events")

    term = await connect(user, session.id)
    await term.type("echo one-$((1))\r")
    await term.read_until(b"one-1")
    for cols, rows in ((90, 30), (100, 30)):  # a drag: only the size it ends at is recorded
        await term.send_json({"type": "resize", "cols": cols, "rows": rows})
    await resized(1)
    await term.type("echo two-$((2))\r")
    await term.read_until(b"two-2")
    await term.send_json({"type": "resize", "cols": 120, "rows": 40})
    await resized(2)
    await term.type("echo three-$((3))\r")
    await term.read_until(b"three-3")
    await terminals.get(session.id).flush()

    record = await database_sync_to_async(storage.find)(session.id)
    body = (await database_sync_to_async(export.session_export)(record=record, format="cast")).body
    header, events = parse_cast(body)
    assert (header["term"]["cols"], header["term"]["rows"]) == (80, 24)
    assert [e[2] for e in events if e[1] == "r"] == ["100x30", "120x40"]
    played = "".join(e[2] if e[1] == "o" else f"<{e[2]}>" for e in events)
    assert played.index("one-1") < played.index("<100x30>") < played.index("two-2")
    assert played.index("two-2") < played.index("<120x40>") < played.index("three-3")
    assert (record.cols, record.rows) == (120, 40)

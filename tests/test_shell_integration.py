"""Shell integration: the prompt hook's marks, parsed from output split anywhere; command
events, titles and masking with real bash sessions."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import re

import pytest
from channels.db import database_sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command

from featureflags import services as flag_services
from sessions_app import services, shellint
from sessions_app.models import OutputChunk, SessionEvent, TerminalSession
from sessions_app.shellint import ShellEvent, ShellParser
from termsys.env import env_regex_list

pytestmark = pytest.mark.django_db(transaction=True)

ESC, BEL, ST = b"\x1b", b"\x07", b"\x1b\\"
STREAM = b"".join(
    [
        b"plain text \x1b[1;31mred\x1b[0m ",
        ESC + b"]7;file://vm/srv/my%20dir/%C3%A9" + BEL,
        ESC + b"]633;A;aid=12" + BEL + b"$ " + ESC + b"]633;B" + BEL,
        b"echo 'a;b' x\r\n",
        ESC + b"]633;E;echo 'a\\x3bb\\\\c'\\x0a x" + BEL + ESC + b"]633;C" + BEL,
        b"output\r\n",
        ESC + b"]2;custom title" + ST,
        ESC + b"]0;other \xc3\xa9" + BEL,
        ESC + b"]1;icon" + BEL,  # an OSC we do not report
        ESC + b"]0;abandoned",  # cut short by the next sequence
        ESC + b"]133;D;1;aid=7;duration=250" + ST,
        ESC + b"]633;D" + BEL,
        ESC + b"]8;;http://example.com" + ST + b"link" + ESC + b"]8;;" + ST,
        b"tail",
    ]
)
EXPECTED = [
    ShellEvent("cwd", "/srv/my dir/\u00e9", host="vm"),
    ShellEvent("prompt", aid="12"),
    ShellEvent("input"),
    ShellEvent("command_line", "echo 'a;b\\c'\n x"),
    ShellEvent("executed"),
    ShellEvent("title", "custom title"),
    ShellEvent("title", "other \u00e9"),
    ShellEvent("finished", code=1, duration_ms=250, aid="7"),
    ShellEvent("finished", code=None),
]


def test_parser_reads_every_mark():
    assert ShellParser().feed(STREAM) == EXPECTED


@pytest.mark.parametrize("pieces", [2, 3])
def test_parser_gives_the_same_events_whatever_byte_a_read_ends_at(pieces):
    """Every split point (and, for three pieces, every pair of them) gives the same events."""
    size = len(STREAM)
    step = 1 if pieces == 2 else 7
    for first in range(size + 1):
        cuts = [[first]] if pieces == 2 else [[first, s] for s in range(first, size + 1, step)]
        for points in cuts:
            parser = ShellParser()
            events = []
            bounds = [0, *points, size]
            for a, b in itertools.pairwise(bounds):
                events += parser.feed(STREAM[a:b])
            assert events == EXPECTED, points


def test_parser_byte_by_byte_and_an_overlong_osc():
    parser = ShellParser()
    events = []
    for i in range(len(STREAM)):
        events += parser.feed(STREAM[i : i + 1])
    assert events == EXPECTED
    huge = ESC + b"]2;" + b"x" * (shellint.MAX_OSC_BYTES + 10) + BEL + ESC + b"]633;C" + BEL
    parser = ShellParser()
    events = []
    for start in range(0, len(huge), 4096):
        events += parser.feed(huge[start : start + 4096])
    assert events == [ShellEvent("executed")]
    assert parser._carry == b""


def test_mask_and_titles(settings):
    assert shellint.mask("echo password=hunter2") == "echo password=****"
    assert shellint.mask("curl -H 'Authorization: Bearer abc.def'") == (
        "curl -H 'Authorization: Bearer ****'"
    )
    assert shellint.mask("export GITHUB_TOKEN=ghp_x api_key: 'v v'") == (
        "export GITHUB_TOKEN=**** api_key: ****"
    )
    assert shellint.mask("aws AKIAABCDEFGHIJKLMNOP") == "aws ****"
    assert shellint.mask("git clone https://me:pw@host/r") == "git clone https://me:****@host/r"
    assert shellint.mask("ls -la") == "ls -la"
    settings.TERMSYS_MASK_PATTERNS = [r"sk-\w+"]
    assert shellint.mask("key sk-abc and password=x") == "key **** and password=x"
    assert shellint.clean_title("  \x1b\x07 \n") == ""
    assert shellint.clean_title("vim notes.md\nsecond line") == "vim notes.md"
    home = shellint._home()
    assert shellint.cwd_title(home + "/proj/api") == "~/proj/api"
    assert shellint.cwd_title("/srv") == "/srv"


def test_mask_patterns_setting_is_validated():
    assert env_regex_list("X", ["a"], environ={}) == ["a"]
    assert env_regex_list("X", ["a"], environ={"X": '["b(c)"]'}) == ["b(c)"]
    for bad in ("[", '{"a": 1}', '["("]'):
        with pytest.raises(ImproperlyConfigured, match="TERMSYS_MASK_PATTERNS"):
            env_regex_list("TERMSYS_MASK_PATTERNS", [], environ={"TERMSYS_MASK_PATTERNS": bad})


# --- real bash ----------------------------------------------------------------------------------


@database_sync_to_async
def enable(*names: str) -> None:
    flag_services.ensure_product_flags()
    for name in names:
        flag_services.flag_enable(name, actor="test", source="command", reason="test")


@database_sync_to_async
def command_events(session_id: str) -> list[dict]:
    return [e.data for e in SessionEvent.objects.filter(session_id=session_id, kind="command")]


@database_sync_to_async
def title_events(session_id: str) -> list[str]:
    events = SessionEvent.objects.filter(session_id=session_id, kind="title")
    return [e.data["title"] for e in events]


async def wait_title_events(session_id: str, count: int, timeout: float = 10) -> list[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await title_events(session_id)
        if len(found) >= count or loop.time() > deadline:
            return found
        await asyncio.sleep(0.05)


async def wait_commands(session_id: str, count: int, timeout: float = 10) -> list[dict]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await command_events(session_id)
        if len(found) >= count or loop.time() > deadline:
            return found
        await asyncio.sleep(0.05)


async def start(user, project, *flags: str):
    await enable(*flags)
    return await services.session_create(user=user, project_id=project.pk, tab_name="main")


async def run(term, line: str, marker: str) -> None:
    """Type ``line`` and wait for the output of ``echo`` + marker."""
    await term.type(f"{line}\r")
    await term.type(f"echo {marker}-$((40+2))\r")
    await term.read_until(f"{marker}-42\r\n".encode())


async def test_commands_are_recorded_with_cwd_exit_code_and_duration(
    user, project, live_terminals, connect
):
    os.mkdir(os.path.join(project.path, "my dir"))
    session = await start(user, project, "activity_tracking")
    term = await connect(user, session.id)
    await term.read_until(b"\x1b]633;B")
    for line in ("cd 'my dir'", "true", "false", "sleep 0.2"):
        await term.type(f"{line}\r")
        await term.read_until(b"\x1b]633;D", timeout=10)
        term.output.clear()
    events = await wait_commands(session.id, 4)
    sub = os.path.join(project.path, "my dir")
    assert [(e["command"], e["cwd"], e["exitCode"]) for e in events] == [
        ("cd 'my dir'", project.path, 0),
        ("true", sub, 0),
        ("false", sub, 1),
        ("sleep 0.2", sub, 0),
    ]
    assert events[3]["durationMs"] >= 200
    assert all(isinstance(e["durationMs"], int) for e in events)
    record = await database_sync_to_async(TerminalSession.objects.get)(pk=session.id)
    assert record.cwd == sub  # from OSC 7, at once
    assert record.title == ""  # dynamic_titles is off


async def test_no_command_events_without_the_flag(user, project, live_terminals, connect):
    session = await start(user, project)
    term = await connect(user, session.id)
    await run(term, "true; false", "DONE")
    await asyncio.sleep(0.5)
    assert await command_events(session.id) == []


async def test_a_password_typed_at_a_prompt_is_stored_nowhere(
    user, project, live_terminals, connect
):
    secret = "hunter2-Zq9xVv"
    session = await start(user, project, "activity_tracking", "dynamic_titles")
    term = await connect(user, session.id)
    await term.type("read -s -p 'Password: ' pw; echo got-${#pw}\r")
    await term.read_until(b"\x1b]633;C\x07Password: ")  # read's prompt, not the echo
    await term.type(f"{secret}\r")
    await term.read_until(f"got-{len(secret)}".encode())
    await term.read_until(b"\x1b]633;B")
    events = await wait_commands(session.id, 1)
    assert events[0]["command"] == "read -s -p 'Password: ' pw; echo got-${#pw}"
    await services.session_kill(session_id=session.id)  # output stored, events written

    @database_sync_to_async
    def stored() -> tuple[str, list[bytes]]:
        dump = io.StringIO()
        call_command("dumpdata", stdout=dump)
        return dump.getvalue(), [bytes(c.data) for c in OutputChunk.objects.all()]

    dump, chunks = await stored()
    assert secret not in dump
    assert chunks and not any(secret.encode() in data for data in chunks)
    assert b"got-14" in b"".join(chunks)


async def test_secrets_in_command_lines_are_masked(user, project, live_terminals, connect):
    session = await start(user, project, "activity_tracking", "dynamic_titles")
    term = await connect(user, session.id)
    await run(term, "echo password=hunter2", "DONE")
    events = await wait_commands(session.id, 2)
    assert events[0]["command"] == "echo password=****"
    await services.session_kill(session_id=session.id)
    record = await database_sync_to_async(TerminalSession.objects.get)(pk=session.id)
    assert "hunter2" not in str([e for e in await command_events(session.id)])
    assert "hunter2" not in record.title


async def wait_title(term, title: str, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = []
    while True:
        message = await term.control("title", timeout=max(0.01, deadline - loop.time()))
        seen.append(message["title"])
        if message["title"] == title:
            return
        assert loop.time() < deadline, seen


async def stored_title(session_id: str, title: str, timeout: float = 5) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        record = await database_sync_to_async(TerminalSession.objects.get)(pk=session_id)
        if record.title == title or loop.time() > deadline:
            return record.title
        await asyncio.sleep(0.05)


async def test_a_cd_reaches_every_client_as_the_working_directory(
    user, project, live_terminals, connect
):
    """A tab names its shell's directory in its tooltip: it is told at once, not at the next
    refresh of the tab list; and the session keeps it (a revival starts there)."""
    session = await start(user, project)
    first, second = await connect(user, session.id), await connect(user, session.id)
    where = os.path.join(project.path, "sub dir")
    os.mkdir(where)
    await first.type(f"cd '{where}'\r")
    for term in (first, second):
        assert (await term.control("cwd"))["cwd"] == where
    for _ in range(100):
        record = await database_sync_to_async(TerminalSession.objects.get)(pk=session.id)
        if record.cwd == where:
            break
        await asyncio.sleep(0.05)
    assert record.cwd == where
    await first.type("cd .\r")  # the same directory: nothing new to tell
    await run(first, "true", "SAME")
    assert [m for m in first.controls if m.get("type") == "cwd"] == []


async def test_titles_follow_the_command_and_the_cwd(user, project, live_terminals, connect):
    session = await start(user, project, "dynamic_titles")
    term = await connect(user, session.id)
    assert await stored_title(session.id, shellint.cwd_title(project.path)) != ""
    await term.type("sleep 1\r")
    await wait_title(term, "sleep 1")
    assert await stored_title(session.id, "sleep 1") == "sleep 1"
    await wait_title(term, shellint.cwd_title(project.path))
    await term.type("printf '\\033]2;custom\\007'\r")
    await wait_title(term, "custom")
    assert await stored_title(session.id, "custom") == "custom"
    await term.type("printf '\\033]2;\\007'\r")  # an empty title: the tab name
    await wait_title(term, "main")
    assert await stored_title(session.id, "") == ""
    await asyncio.sleep(shellint.TITLE_EVENT_SECONDS + 0.3)
    assert await title_events(session.id) == []  # only with activity_tracking


async def test_settled_titles_are_recorded_as_events(user, project, live_terminals, connect):
    """A title that holds is a ``title`` event, masked; one soon replaced is not."""
    session = await start(user, project, "activity_tracking", "dynamic_titles")
    term = await connect(user, session.id)
    home = shellint.cwd_title(project.path)
    assert await wait_title_events(session.id, 1) == [home]
    spam = "".join(f"\\033]2;t{i}\\007" for i in range(200))
    await term.type(f"printf '{spam}'; printf '\\033]0;deploy password=hunter2\\007'\r")
    await wait_title(term, "deploy password=****")
    assert await wait_title_events(session.id, 2) == [home, "deploy password=****"]
    await term.type("sleep 2\r")
    await wait_title(term, home)
    events = await wait_title_events(session.id, 4)
    assert events == [home, "deploy password=****", "sleep 2", home]
    record = await database_sync_to_async(TerminalSession.objects.get)(pk=session.id)
    assert record.title == home  # the session's own title (searched) is kept as before


async def test_titles_stay_the_tab_name_without_the_flag(user, project, live_terminals, connect):
    session = await start(user, project)
    term = await connect(user, session.id)
    await run(term, "sleep 0.3; printf '\\033]2;custom\\007'", "DONE")
    await asyncio.sleep(0.5)
    assert [m for m in term.controls if m.get("type") == "title"] == []
    record = await database_sync_to_async(TerminalSession.objects.get)(pk=session.id)
    assert record.title == ""


async def test_the_hook_keeps_what_an_rc_file_put_in_prompt_command(
    user, project, live_terminals, connect, settings, tmp_path
):
    rc = tmp_path / "rc"
    rc.write_text('PROMPT_COMMAND="printf RC-%s $((6*7)); ${PROMPT_COMMAND}"\n')
    settings.TERMSYS_PROFILES = {"system": ["/bin/bash", "--noprofile", "--rcfile", str(rc)]}
    session = await start(user, project, "activity_tracking")
    term = await connect(user, session.id)
    await run(term, "true", "DONE")
    await term.read_until(b"RC-42")
    events = await wait_commands(session.id, 2)
    assert [e["command"] for e in events] == ["true", "echo DONE-$((40+2))"]


def aids(output: bytes) -> list[bytes]:
    """Return the shell each prompt in ``output`` was shown by."""
    return re.findall(rb"\x1b]633;A;aid=(\d+)\x07", output)


async def test_a_bash_started_in_the_session_gets_the_hook(
    user, project, live_terminals, connect, tmp_path
):
    """Two shells deep and back: each one's commands and cwd; a shell's own command (``bash``)
    when it ends, whether by ``exit`` or Ctrl-D; ``exit`` itself not recorded."""
    sub = os.path.join(project.path, "inner")
    os.mkdir(sub)
    rc = tmp_path / "rc"
    rc.write_text('PROMPT_COMMAND="printf RC-%s $((6*7)); ${PROMPT_COMMAND}"\n')
    session = await start(user, project, "activity_tracking", "dynamic_titles")
    term = await connect(user, session.id)
    await term.read_until(b"\x1b]633;B")

    async def at_prompt(line: str) -> bytes:
        """Type ``line``; return the output up to the next prompt."""
        term.output.clear()
        await term.type(line)
        return await term.read_until(b"\x1b]633;B\x07")

    outer = aids(term.output)[-1]
    second = aids(await at_prompt("bash --norc\r"))
    assert len(second) == 1 and second[0] != outer
    await at_prompt("cd inner\r")
    await wait_title(term, shellint.cwd_title(sub))  # titles follow the inner shell
    third = aids(await at_prompt(f"bash --rcfile {rc}\r"))
    assert len(third) == 1 and third[0] not in (outer, second[0])
    output = await at_prompt("false\r")  # marked once: the hook is installed once
    assert [output.count(m) for m in (b"633;E", b"633;D", b"633;A", b"RC-42")] == [1, 1, 1, 1]
    assert aids(await at_prompt("exit 3\r")) == second
    await at_prompt("true\r")
    assert aids(await at_prompt("\x04")) == [outer]  # Ctrl-D
    await run(term, "true", "DONE")  # the session's shell goes on as before
    events = await wait_commands(session.id, 7)
    assert [(e["command"], e["cwd"], e["exitCode"]) for e in events] == [
        ("cd inner", project.path, 0),
        ("false", sub, 1),
        (f"bash --rcfile {rc}", sub, 3),
        ("true", sub, 0),
        ("bash --norc", project.path, 0),
        ("true", project.path, 0),
        ("echo DONE-$((40+2))", project.path, 0),
    ]
    assert events[4]["durationMs"] >= events[2]["durationMs"] + events[3]["durationMs"]
    # The session's cwd is its own shell's, where a revived shell would start.
    record = await database_sync_to_async(TerminalSession.objects.get)(pk=session.id)
    assert record.cwd == project.path


async def test_other_shells_and_scripts_started_in_the_session(
    user, project, live_terminals, connect
):
    """sh (dash) and a bash script inherit the hook's variables: no error, no marks of theirs."""
    session = await start(user, project, "activity_tracking")
    term = await connect(user, session.id)
    await term.read_until(b"\x1b]633;B")
    outer = aids(term.output)
    term.output.clear()
    await term.type("sh\r")
    await term.read_until(b"\x07# " if os.geteuid() == 0 else b"\x07$ ")  # C mark, sh's prompt
    await term.type("echo in-sh-$((40+2)); exit\r")
    await term.read_until(b"in-sh-42")
    await run(term, "bash -c 'echo script-$((40+2))'", "DONE")
    output = bytes(term.output)
    assert b"script-42" in output
    assert not re.search(rb"not found|rror|TERMSYS|__termsys", output), output
    assert set(aids(output)) == set(outer)
    events = await wait_commands(session.id, 3)
    assert [e["command"] for e in events] == [
        "sh",
        "bash -c 'echo script-$((40+2))'",
        "echo DONE-$((40+2))",
    ]


async def test_other_shells_record_nothing(user, project, live_terminals, connect, settings):
    settings.TERMSYS_PROFILES = {"system": ["/bin/sh", "-i"]}
    session = await start(user, project, "activity_tracking", "dynamic_titles")
    term = await connect(user, session.id)
    await run(term, "true", "DONE")
    await asyncio.sleep(0.5)
    assert await command_events(session.id) == []
    assert b"\x1b]633" not in term.output and b"TERMSYS" not in term.output

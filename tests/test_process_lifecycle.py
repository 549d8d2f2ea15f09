"""Ending a session leaves nothing behind: no process, no zombie, no descriptor, no cgroup.

Real PTYs running real bash. The processes a shell starts write their own pid to a file in the
project directory, so the test knows them without asking the code under test; whatever
happens, they are killed by pid at the end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from channels.db import database_sync_to_async

from sessions_app import cgroups, services, terminals
from sessions_app.models import TerminalSession

pytestmark = pytest.mark.django_db(transaction=True)

SLEEP_SECONDS = "1000"
# Each writes its own pid, then becomes `sleep 1000`, the way a user would start it.
ESCAPES = {
    "background": "sh -c 'echo $$ > background.pid; exec sleep 1000' &",
    "setsid": "setsid sh -c 'echo $$ > setsid.pid; exec sleep 1000' &",
    "nohup": "nohup sh -c 'echo $$ > nohup.pid; exec sleep 1000' &",
    "double-fork": "( sh -c 'echo $$ > double-fork.pid; exec sleep 1000' & ) &",
    "disown": "sh -c 'echo $$ > disown.pid; exec sleep 1000' & disown",
}
# Leaves the process tree and clears its environment: only a cgroup still knows it.
ENV_CLEARED = {
    "env-cleared": (
        "setsid env -i PATH=/usr/bin:/bin sh -c 'echo $$ > env-cleared.pid; exec sleep 1000' &"
    )
}
# Ignores SIGHUP and SIGTERM (ignored signals stay ignored across exec).
STUBBORN = {
    "stubborn": "setsid sh -c \"trap '' HUP TERM; echo \\$\\$ > stubborn.pid; exec sleep 1000\" &"
}
# PID 1 reaps orphaned processes, on some machines only every few seconds.
ORPHAN_REAP_SECONDS = 30


def _stat(pid: int) -> list[str] | None:
    """Return /proc/<pid>/stat fields after the command name, or None when the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].decode().split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _is_our_sleep(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().split(b"\0")[:2] == [b"sleep", SLEEP_SECONDS.encode()]
    except OSError:
        return False


def _fd_count() -> int:
    """Descriptors open in this process, except database and cache connections: worker threads
    open and reuse those on their own schedule, they belong to no session."""
    return sum(1 for entry in _fd_listing() if not _is_connection(entry))


def _is_connection(entry: str) -> bool:
    return (
        entry.endswith((".sqlite3", ".sqlite3-wal", ".sqlite3-shm"))
        or "(port 5432)" in entry
        or "(port 6379)" in entry
    )


def _fd_listing() -> list[str]:
    """Return ``fd->target`` for each open descriptor; a TCP socket shows its peer's port."""
    peers = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                peers[fields[9]] = int(fields[2].rsplit(":", 1)[1], 16)
        except OSError:
            continue
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        inode = target.removeprefix("socket:[").removesuffix("]")
        found.append(f"{fd}->{target}" + (f" (port {peers[inode]})" if inode in peers else ""))
    return found


async def _eventually(check: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


class Escapees:
    """Processes started from a session's shell, known by the pids they wrote."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pids: dict[str, int] = {}

    async def start(self, term, commands: dict[str, str]) -> None:
        for command in commands.values():
            await term.type(command + "\r")
        await term.type("echo STARTED-$((6*7))\r")
        await term.read_until(b"STARTED-42")
        files = {name: self.directory / f"{name}.pid" for name in commands}
        assert await _eventually(lambda: all(_pid_in(f) is not None for f in files.values())), (
            f"not every process wrote its pid: {[n for n, f in files.items() if not f.exists()]}"
        )
        for name, path in files.items():
            self.pids[name] = _pid_in(path)
        assert await _eventually(lambda: all(_is_our_sleep(pid) for pid in self.pids.values()))

    def running(self) -> dict[str, int]:
        return {
            name: pid
            for name, pid in self.pids.items()
            if (fields := _stat(pid)) is not None and fields[0] != "Z"
        }

    def present(self) -> dict[str, str]:
        """Return name -> state of each process still in /proc (a zombie is ``Z``)."""
        return {
            name: fields[0] for name, pid in self.pids.items() if (fields := _stat(pid)) is not None
        }

    def kill_leftovers(self) -> None:
        for pid in self.pids.values():
            if _is_our_sleep(pid):
                os.kill(pid, signal.SIGKILL)


def _pid_in(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@pytest.fixture
def escapees(project):
    started = Escapees(Path(project.path))
    yield started
    started.kill_leftovers()


@pytest.fixture(params=["cgroup", "tracking"])
def process_finding(request, settings) -> str:
    """Run a test once with a cgroup per session (where possible) and once without."""
    if request.param == "cgroup":
        settings.TERMSYS_CGROUP_ROOT = None  # auto-detect
        if cgroups.sessions_parent() is None:
            pytest.skip("this machine does not let the server create cgroups (see the log)")
    else:
        settings.TERMSYS_CGROUP_ROOT = ""
    return request.param


async def _state_of(session_id: str) -> TerminalSession:
    return await database_sync_to_async(TerminalSession.objects.get)(pk=session_id)


async def _assert_all_gone(escapees: Escapees, shell_pid: int) -> None:
    assert _stat(shell_pid) is None, "the shell is gone and reaped by the server"
    assert escapees.running() == {}, "every process the shell started was ended"
    held = [
        name
        for name, pid in escapees.pids.items()
        if (fields := _stat(pid)) is not None and int(fields[1]) == os.getpid()
    ]
    assert held == [], "the server holds no zombie of its own"
    reaped = await _eventually(lambda: escapees.present() == {}, ORPHAN_REAP_SECONDS)
    assert reaped, (
        f"orphans still in /proc after {ORPHAN_REAP_SECONDS} s: {escapees.present()}; "
        "pid 1 of this machine does not reap orphans (run the server under an init that does, "
        "e.g. tini or `docker run --init`)"
    )


async def test_closing_a_session_ends_every_process_its_shell_started(
    user, project, live_terminals, connect, escapees, process_finding
):
    record = await services.session_create(user=user, project_id=project.pk)
    term = await connect(user, record.id)
    await escapees.start(term, ESCAPES)
    shell = record.pid
    setsid_session = int(_stat(escapees.pids["setsid"])[3])
    assert setsid_session != int(_stat(shell)[3]), "setsid left the shell's session"

    closed = await services.session_close(user=user, session_id=record.id)

    assert closed.state == "killed"
    await _assert_all_gone(escapees, shell)


async def test_a_shell_that_ignores_hangup_and_terminate_is_killed(
    user, project, live_terminals, connect, escapees, process_finding
):
    record = await services.session_create(user=user, project_id=project.pk)
    term = await connect(user, record.id)
    await term.type("trap '' HUP TERM\r")
    await escapees.start(term, STUBBORN)

    closed = await services.session_close(user=user, session_id=record.id)

    assert closed.state == "killed"
    assert closed.exit_code == 128 + signal.SIGKILL, "only SIGKILL ended the shell"
    await _assert_all_gone(escapees, record.pid)


async def test_cgroup_holds_every_process_and_is_removed_on_close(
    user, project, settings, live_terminals, connect, escapees
):
    settings.TERMSYS_CGROUP_ROOT = None
    parent = cgroups.sessions_parent()
    if parent is None:
        pytest.skip("this machine does not let the server create cgroups (see the log)")
    record = await services.session_create(user=user, project_id=project.pk)
    directory = parent / record.id
    term = await connect(user, record.id)
    await escapees.start(term, {**ESCAPES, **ENV_CLEARED})
    members = {int(pid) for pid in (directory / "cgroup.procs").read_text().split()}
    assert {record.pid, *escapees.pids.values()} <= members

    await services.session_close(user=user, session_id=record.id)

    assert not directory.exists(), "the session's cgroup is removed on close"
    await _assert_all_gone(escapees, record.pid)


async def test_a_session_ending_by_itself_leaves_nothing_running(
    user, project, settings, live_terminals, connect, escapees, process_finding
):
    record = await services.session_create(user=user, project_id=project.pk)
    parent = cgroups.sessions_parent()
    term = await connect(user, record.id)
    await escapees.start(term, ESCAPES)
    await term.type("exit 0\r")
    assert (await term.control("exit"))["exitCode"] == 0

    assert await _eventually(lambda: escapees.running() == {}), escapees.running()
    if parent is not None:
        assert await _eventually(lambda: not (parent / record.id).exists())
    await _assert_all_gone(escapees, record.pid)


async def test_without_usable_cgroups_sessions_still_end_everything(
    user, project, settings, tmp_path, live_terminals, connect, escapees, caplog
):
    not_a_cgroup = tmp_path / "plain-directory"  # writable, but no cgroup.kill in it
    settings.TERMSYS_CGROUP_ROOT = str(not_a_cgroup)
    with caplog.at_level("INFO", logger="sessions_app.cgroups"):
        record = await services.session_create(user=user, project_id=project.pk)
    assert cgroups.sessions_parent() is None
    assert any(
        "TERMSYS_SESSION_ID" in r.message and "cgroup.kill" in r.message for r in caplog.records
    ), "one log line says how processes are found, and why not by cgroup"
    term = await connect(user, record.id)
    await escapees.start(term, ESCAPES)

    await services.session_close(user=user, session_id=record.id)

    await _assert_all_gone(escapees, record.pid)
    assert list(not_a_cgroup.iterdir()) == [], "nothing is left in the directory"


async def _run_session(user, project, connect, escapees: Escapees, ending: str) -> None:
    """Create a session that starts escaping processes, then end it the way ``ending`` says."""
    escapees.pids.clear()
    for leftover in Path(project.path).glob("*.pid"):
        leftover.unlink()
    record = await services.session_create(user=user, project_id=project.pk)
    term = await connect(user, record.id)
    await escapees.start(term, ESCAPES)
    if ending == "exits":
        await term.type("exit\r")
        await term.control("exit")
    await term.close()
    if ending == "closed":
        await services.session_close(user=user, session_id=record.id)
    expected = {"closed": "killed", "exits": "exited", "idle": "killed"}[ending]
    for _ in range(600):
        if (await _state_of(record.id)).state == expected and terminals.get(record.id) is None:
            break
        await asyncio.sleep(0.05)
    assert (await _state_of(record.id)).state == expected
    assert await _eventually(lambda: escapees.running() == {}, 30), escapees.running()


async def _settled_fd_count() -> int:
    """Return the fewest descriptors open over half a second (a worker may hold one briefly)."""
    counts = []
    for _ in range(10):
        counts.append(_fd_count())
        await asyncio.sleep(0.05)
    return min(counts)


@pytest.mark.parametrize("ending", ["closed", "exits", "idle"])
async def test_file_descriptors_return_to_their_count_before_the_session(
    user, project, settings, live_terminals, connect, escapees, ending
):
    if ending == "idle":
        settings.TERMSYS_IDLE_TIMEOUT = 1
    # The first session opens what the server keeps for the next ones too (database and cache
    # connections, worker threads); the second must leave the count where the first left it.
    await _run_session(user, project, connect, escapees, ending)
    escapees.kill_leftovers()
    assert await _eventually(lambda: escapees.present() == {}, ORPHAN_REAP_SECONDS)
    before, listing = await _settled_fd_count(), _fd_listing()

    await _run_session(user, project, connect, escapees, ending)

    returned = await _eventually(lambda: _fd_count() <= before, 30)
    assert returned, (
        f"{before} fds before, {_fd_count()} after: "
        f"{ {e for e in set(_fd_listing()) ^ set(listing) if not _is_connection(e)} }"
    )


def test_stopping_the_server_leaves_no_cgroup_of_a_hung_up_shell(db, tmp_path):
    """Sessions still open when the server stops are hung up on; their cgroups go with them."""
    from tests.live import Browserless, serving

    parent = cgroups.sessions_parent()
    if parent is None:
        pytest.skip("this machine does not let the server create cgroups (see the log)")
    root = parent / f"live-{os.getpid()}-{time.monotonic_ns()}"  # this test's own cgroups
    root.mkdir()
    try:
        with serving(tmp_path, TERMSYS_CGROUP_ROOT=str(root)) as server:
            client = Browserless(server)
            client.login()
            status, body = client.api("POST", "/api/projects", {"name": "stopping"})
            assert status == 201, body
            status, body = client.api(
                "POST", "/api/terminal/create", {"projectId": body["project"]["id"]}
            )
            assert status == 201, body
            session = body["session"]
            assert (root / session["id"]).is_dir()
            server.stop()  # SIGTERM: the server hangs up on its shells and exits
            assert _stat(session["pid"]) is None or _stat(session["pid"])[0] == "Z"
            assert not (root / session["id"]).exists(), "the hung-up shell's cgroup is removed"
    finally:
        for child in root.iterdir():
            if child.is_dir():
                (child / "cgroup.kill").write_text("1")
                time.sleep(0.1)
                child.rmdir()
        root.rmdir()


def test_a_relative_cgroup_root_stops_start_up_with_its_name(tmp_path):
    from tests.test_settings import start

    result = start({"TERMSYS_CGROUP_ROOT": "sys/fs/cgroup"}, tmp_path)
    assert result.returncode != 0
    assert "TERMSYS_CGROUP_ROOT='sys/fs/cgroup' must be an absolute path" in result.stderr


def _signal_bits(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} for {pid}")


def test_a_shell_starts_with_default_signals_whatever_the_server_ignores(tmp_path):
    """A server started under nohup ignores SIGHUP (and a supervisor may ignore or block
    more); a shell must not inherit that, or hanging up would not end its jobs and Ctrl-C or
    Ctrl-\\ would do nothing."""
    from sessions_app.pty import PtyProcess

    ignored = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)
    before = {signum: signal.signal(signum, signal.SIG_IGN) for signum in ignored}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        pty = PtyProcess.spawn(["sleep", "60"], cwd=str(tmp_path), env={}, cols=80, rows=24)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for signum, handler in before.items():
            signal.signal(signum, handler)
    try:
        mask = sum(1 << (signum - 1) for signum in ignored)
        assert _signal_bits(pty.pid, "SigIgn") & mask == 0
        assert _signal_bits(pty.pid, "SigBlk") == 0
        os.kill(pty.pid, signal.SIGHUP)  # a hang-up ends it
        for _ in range(100):
            if pty.poll() is not None:
                break
            time.sleep(0.05)
        assert pty.poll() is not None
    finally:
        pty.terminate()
        pty.close()

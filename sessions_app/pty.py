"""Real PTY processes: spawn, read, write, resize, and terminate with escalation."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pwd
import signal
import struct
import subprocess
import termios
import time
from dataclasses import dataclass
from pathlib import Path

from sessions_app import conf
from sessions_app.errors import SpawnFailed

logger = logging.getLogger(__name__)

# Only these variables of the server's environment reach a shell; everything else (SECRET_KEY,
# DATABASE_URL, REDIS_URL, DJANGO_*, cloud credentials, ...) stays out.
ENV_ALLOW = ("PATH", "LANG", "LANGUAGE", "TZ", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "LC_COLLATE")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
MARKER_VARIABLE = "TERMSYS_SESSION_ID"


def shell_environment(*, cwd: str, session_id: str) -> dict[str, str]:
    """Return the environment for a shell, built from an allow-list."""
    env = {name: os.environ[name] for name in ENV_ALLOW if name in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("LANG", "C.UTF-8")
    try:
        account = pwd.getpwuid(os.getuid())
        env.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name)
    except KeyError:
        env["HOME"] = cwd
    env.update(
        SHELL=conf.login_shell(),
        TERM="xterm-256color",
        COLORTERM="truecolor",
        PWD=cwd,
    )
    env[MARKER_VARIABLE] = session_id
    return env


def _set_controlling_tty() -> None:  # runs in the child between fork and exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _winsize(cols: int, rows: int) -> bytes:
    return struct.pack("HHHH", rows, cols, 0, 0)


@dataclass
class PtyProcess:
    """A process running on the slave side of a PTY, leader of its own session and group."""

    pid: int
    fd: int  # master side, non-blocking
    pidfd: int  # readable when the process exits
    process: subprocess.Popen
    env_marker: bytes | None = None  # NAME=value every process of this PTY inherits

    @classmethod
    def spawn(
        cls, argv: list[str], *, cwd: str, env: dict[str, str], cols: int, rows: int
    ) -> PtyProcess:
        """Start ``argv`` on a new PTY; raise SpawnFailed with the reason when it cannot start."""
        if not Path(cwd).is_dir():
            raise SpawnFailed(f"Working directory {cwd} does not exist or is not a directory.")
        master, slave = os.openpty()
        try:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, _winsize(cols, rows))
            process = subprocess.Popen(
                argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=_set_controlling_tty,  # noqa: PLW1509 - a single ioctl, no locks
                close_fds=True,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            os.close(master)
            raise SpawnFailed(
                f"Cannot start {argv[0]!r}: {exc.strerror}.", details={"argv": argv}
            ) from None
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        marker = (
            f"{MARKER_VARIABLE}={env[MARKER_VARIABLE]}".encode()
            if env.get(MARKER_VARIABLE)
            else None
        )
        return cls(
            pid=process.pid,
            fd=master,
            pidfd=os.pidfd_open(process.pid),
            process=process,
            env_marker=marker,
        )

    def read(self, size: int = conf.READ_BYTES) -> bytes | None:
        """Return available output, b"" at end of output, None when nothing is ready."""
        try:
            return os.read(self.fd, size)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno == errno.EIO:  # every slave fd is closed
                return b""
            raise

    def write(self, data: bytes) -> int:
        """Write what the PTY accepts now; return the number of bytes written."""
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0

    def resize(self, cols: int, rows: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, _winsize(cols, rows))

    def poll(self) -> int | None:
        """Reap the process if it has exited; return its exit code (128+N for signal N)."""
        code = self.process.poll()
        if code is None:
            return None
        return 128 - code if code < 0 else code

    def terminate(self, *, grace: float = 0.5) -> int | None:
        """End the process, its group and every descendant: SIGHUP, then SIGTERM, then SIGKILL.

        Blocks up to about ``3 * grace`` seconds; call it from a worker thread.
        """
        targets = self.processes()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGKILL):
            _signal_all(self.pid, targets, sig)
            _signal_all(self.pid, targets, signal.SIGCONT)  # a stopped job must run to die
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.poll()
                targets = {pid for pid in targets if is_running(pid)}
                if not targets:
                    return self.poll()
                time.sleep(0.02)
        self.process.wait(timeout=5)
        return self.poll()

    def hangup(self) -> None:
        """Send SIGHUP to the process group without waiting (server shutdown)."""
        _signal_all(self.pid, set(), signal.SIGHUP)
        _signal_all(self.pid, set(), signal.SIGCONT)

    def processes(self) -> set[int]:
        """Return every process this PTY's shell started, including ones that left its tree.

        ``setsid``, ``nohup`` and double forks reparent a process away from the shell, but it
        keeps the environment it inherited, and with it TERMSYS_SESSION_ID.
        """
        found = descendants(self.pid) | {self.pid}
        if self.env_marker:
            found |= processes_with_env(self.env_marker)
        return found

    def close(self) -> None:
        for fd in (self.fd, self.pidfd):
            try:
                os.close(fd)
            except OSError:
                pass


def processes_with_env(entry: bytes) -> set[int]:
    """Return the pids of our processes whose environment holds ``entry`` (``NAME=value``)."""
    found = set()
    own = os.getpid()
    for proc in os.scandir("/proc"):
        if not proc.name.isdigit() or int(proc.name) == own:
            continue
        try:
            with open(f"/proc/{proc.name}/environ", "rb") as fh:
                if entry in fh.read().split(b"\0"):
                    found.add(int(proc.name))
        except OSError:
            continue
    return found


def _signal_all(pgid: int, pids: set[int], sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def is_running(pid: int) -> bool:
    """Return True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def descendants(root: int) -> set[int]:
    """Return the pids of every process below ``root`` in the process tree (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found

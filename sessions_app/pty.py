"""Real PTY processes: spawn, read, write, resize, and terminate with escalation.

Ending a session ends every process its shell started. They are found through the session's
cgroup where the machine allows one (see cgroups.py), and always also through the shell's
process tree and the TERMSYS_SESSION_ID variable every process inherits.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import fcntl
import logging
import os
import pwd
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sessions_app import conf, shellhook
from sessions_app.cgroups import SessionCgroup
from sessions_app.errors import SpawnFailed

logger = logging.getLogger(__name__)

# Only these variables of the server's environment reach a shell; everything else (SECRET_KEY,
# DATABASE_URL, REDIS_URL, DJANGO_*, cloud credentials, ...) stays out.
ENV_ALLOW = ("PATH", "LANG", "LANGUAGE", "TZ", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "LC_COLLATE")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
MARKER_VARIABLE = "TERMSYS_SESSION_ID"
# exec() errors that say the command itself cannot be run
_CANNOT_EXEC = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ENOEXEC, errno.ELOOP}
)


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
    env.update(shellhook.hook_environment())  # bash: OSC 7 and 633 marks
    return env


# Signals a shell must start with at their default action. exec() keeps an ignored signal
# ignored and a blocked one blocked: a server started under nohup (SIGHUP ignored) or by a
# supervisor that ignores SIGINT/SIGQUIT would hand that on to every shell and its jobs, so a
# hang-up would not end them and Ctrl-C or Ctrl-\ would do nothing.
_RESET_SIGNALS = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGPIPE,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
    signal.SIGALRM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
# libc's signal(), loaded here: Python's signal.signal() works only in the main thread, and the
# child runs setup in whichever thread spawned it.
_libc_signal = ctypes.CDLL(None, use_errno=True).signal
_libc_signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
_libc_signal.restype = ctypes.c_void_p


def _child_setup(cgroup_procs: int | None) -> Callable[[], None]:
    """Return what the child runs between fork and exec: default signal actions and no
    blocked signals, join the cgroup, take the PTY.

    Joining before exec means nothing the shell starts is ever outside the cgroup.
    """

    def setup() -> None:
        for signum in _RESET_SIGNALS:
            _libc_signal(signum, None)  # SIG_DFL is 0
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        if cgroup_procs is not None:
            try:
                os.write(cgroup_procs, b"0")  # "0": the writing process itself
            except OSError:
                pass  # not in the cgroup: its processes are still tracked
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    return setup


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
    cgroup: SessionCgroup | None = None  # holds every process of this PTY, where available
    _ended: bool = field(default=False, repr=False)  # terminate() ran to the end
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def spawn(
        cls, argv: list[str], *, cwd: str, env: dict[str, str], cols: int, rows: int
    ) -> PtyProcess:
        """Start ``argv`` on a new PTY; raise SpawnFailed with the reason when it cannot start."""
        if not Path(cwd).is_dir():
            raise SpawnFailed(f"Working directory {cwd} does not exist or is not a directory.")
        session_id = env.get(MARKER_VARIABLE) or f"pty-{os.getpid()}-{time.monotonic_ns()}"
        cgroup = SessionCgroup.create(session_id)
        cgroup_procs = cgroup.open_procs() if cgroup is not None else None
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
                # a write and an ioctl, no locks taken
                preexec_fn=_child_setup(cgroup_procs),  # noqa: PLW1509
                close_fds=True,
            )
        except BaseException as exc:
            os.close(master)
            if cgroup is not None:
                cgroup.remove()
            # the command cannot be run (missing, not executable, not a program): the
            # profile's fault, not the server's
            if isinstance(exc, OSError) and exc.errno in _CANNOT_EXEC:
                raise SpawnFailed(
                    f"Cannot start {argv[0]!r}: {exc.strerror}.", details={"argv": argv}
                ) from None
            raise
        finally:
            os.close(slave)
            if cgroup_procs is not None:
                os.close(cgroup_procs)
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
            cgroup=cgroup,
        )

    def read(self, size: int = conf.READ_BYTES) -> bytes | None:
        """Return available output, b"" at end of output, None when nothing is ready."""
        if self._closed:
            return b""
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
        if self._closed:  # its descriptor number may already be another file's
            raise OSError(errno.EBADF, f"the PTY of process {self.pid} is closed")
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0

    def resize(self, cols: int, rows: int) -> None:
        if self._closed:
            return
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, _winsize(cols, rows))

    def poll(self) -> int | None:
        """Reap the process if it has exited; return its exit code (128+N for signal N)."""
        code = self.process.poll()
        if code is None:
            return None
        return 128 - code if code < 0 else code

    def terminate(self, *, grace: float = 0.5) -> int | None:
        """End the process, its group and every descendant: SIGHUP, then SIGTERM, then SIGKILL.

        Processes that left the shell's tree are ended too, and the session's cgroup is
        removed. Blocks up to about ``3 * grace`` seconds; call it from a worker thread.
        """
        try:
            self._end_processes(grace)
            self.process.wait(timeout=5)
        finally:
            self._release_cgroup()
            self._ended = True
        return self.poll()

    def _end_processes(self, grace: float) -> None:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGKILL):
            self.poll()
            targets = {pid for pid in self.processes() if is_running(pid)}
            if not targets:
                return
            if sig == signal.SIGKILL and self.cgroup is not None:
                self.cgroup.kill()
            self._signal(targets, sig)
            self._signal(targets, signal.SIGCONT)  # a stopped job must run to die
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.poll()
                members = self.cgroup.pids() if self.cgroup is not None else set()
                targets = {pid for pid in targets | members if is_running(pid)}
                if not targets:
                    break
                time.sleep(0.02)

    def _signal(self, pids: set[int], sig: int) -> None:
        # The shell's pid names its process group only until the shell is reaped; after that
        # the number may be reused, so only processes found otherwise are signalled.
        if self.process.returncode is None:
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _release_cgroup(self) -> None:
        if self.cgroup is None:
            return
        if self.cgroup.remove():
            self.cgroup = None
        else:
            logger.warning(
                "cgroup %s still holds processes %s; it is removed once they are gone",
                self.cgroup.path,
                sorted(self.cgroup.pids()),
            )

    def hangup(self) -> None:
        """Send SIGHUP to the process group without waiting (server shutdown)."""
        self._signal(set(), signal.SIGHUP)
        self._signal(set(), signal.SIGCONT)
        if self.cgroup is not None:
            _hung_up.append(self.cgroup)

    def processes(self) -> set[int]:
        """Return every process this PTY's shell started, including ones that left its tree.

        ``setsid``, ``nohup`` and double forks reparent a process away from the shell, but it
        stays in the session's cgroup and keeps the environment it inherited, and with it
        TERMSYS_SESSION_ID. The tree is only followed while the shell is not reaped: after
        that its pid may belong to another process.
        """
        found: set[int] = set()
        if self.process.returncode is None:
            found |= descendants(self.pid) | {self.pid}
        if self.cgroup is not None:
            found |= self.cgroup.pids()
        if self.env_marker:
            found |= processes_with_env(self.env_marker)
        return found

    def close(self) -> None:
        """Release the PTY; end what a shell that exited by itself left running.

        The session is over either way: background jobs, ``nohup`` and ``setsid`` processes
        it started get the same SIGHUP, SIGTERM, SIGKILL, in a thread of their own.
        """
        if self._closed:
            return
        self._closed = True
        for fd in (self.fd, self.pidfd):
            try:
                os.close(fd)
            except OSError:
                pass
        if not self._ended:
            threading.Thread(
                target=self._end_leftovers, name=f"pty-{self.pid}-leftovers", daemon=True
            ).start()

    def _end_leftovers(self) -> None:
        try:
            self.terminate()
        except Exception:
            logger.exception("could not end the processes left by pid %s", self.pid)


_hung_up: list[SessionCgroup] = []


@atexit.register  # registered before terminals' hang-up handler, so it runs after it
def _remove_hung_up_cgroups() -> None:
    """At server exit, remove the cgroups of the shells the hang-up ended (within a second)."""
    deadline = time.monotonic() + 1.0
    kept = [c for c in _hung_up if not c.remove(timeout=max(0.0, deadline - time.monotonic()))]
    if kept:
        logger.info(
            "%d session cgroup(s) keep processes that ignored the hang-up: %s",
            len(kept),
            ", ".join(str(c.path) for c in kept),
        )


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

"""One cgroup (v2) per session, where the machine allows it.

A shell's children can leave its process tree (``setsid``, ``nohup``, double forks) and even
clear their environment, but not their cgroup: the kernel puts every process they start in it
too. Closing a session then ends all of them with one write to ``cgroup.kill``, which also
catches a process forking at that moment. Where cgroups cannot be written (not root, no
cgroup2 mount, read-only, Linux before 5.14 without ``cgroup.kill``) the caller falls back to
tracking processes by their ancestry and environment; ``TERMSYS_CGROUP_ROOT`` chooses.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from sessions_app import conf

logger = logging.getLogger(__name__)

# Auto-detection creates the sessions' cgroups in this child of the server's own cgroup, so
# whatever limits and accounting apply to the server apply to its shells too.
PARENT_NAME = "termsys"
# A session cgroup left empty (its removal failed, or its server died) is removed by the next
# server process that starts using the same parent, once it is at least this old.
STALE_AFTER_SECONDS = 60
_NAME_OK = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")

# configured value (None: auto-detect) -> parent directory, or None when cgroups are not used
_parents: dict[str | None, Path | None] = {}
_unremoved: set[Path] = set()


def sessions_parent() -> Path | None:
    """Return the directory to create session cgroups in, or None to track processes instead.

    Decided once per configured value; the decision is logged at INFO.
    """
    configured = conf.cgroup_root()
    if configured not in _parents:
        parent, reason = _choose_parent(configured)
        _parents[configured] = parent
        if parent is not None:
            logger.info(
                "Session processes are ended through one cgroup per session under %s "
                "(cgroup.kill).",
                parent,
            )
            _remove_stale(parent)
        else:
            logger.log(
                logging.WARNING if configured else logging.INFO,
                "Session processes are ended by tracking the shell's process tree and the "
                "TERMSYS_SESSION_ID variable in their environment; no cgroup: %s.",
                reason,
            )
    return _parents[configured]


def _choose_parent(configured: str | None) -> tuple[Path | None, str]:
    if configured == "":
        return None, "TERMSYS_CGROUP_ROOT is empty"
    if configured is None:
        found = _own_cgroup_dir()
        if found is None:
            return None, "no cgroup2 mount holds this process's cgroup"
        parent = found / PARENT_NAME
    else:
        parent = Path(configured)
    try:
        parent.mkdir(exist_ok=True)
        probe = parent / f"probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.mkdir()
        try:
            if not (probe / "cgroup.kill").exists():
                return None, f"{parent} has no cgroup.kill (cgroup v2 on Linux 5.14 or later)"
        finally:
            probe.rmdir()
    except OSError as exc:
        return None, f"cannot create a cgroup in {parent}: {exc.strerror or exc}"
    return parent, ""


def _own_cgroup_dir() -> Path | None:
    """Return the directory of this process's cgroup in the cgroup2 hierarchy, if mounted."""
    try:
        own = next(
            line[3:].strip()
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.startswith("0::")
        )
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except (OSError, StopIteration):
        return None
    for line in mounts:
        fields, _, rest = line.partition(" - ")
        if not rest.startswith("cgroup2 "):
            continue
        parts = fields.split()
        root, mount_point = parts[3], parts[4]
        if own == root or own.startswith(root.rstrip("/") + "/"):
            relative = own[len(root.rstrip("/")) :].lstrip("/")
            return Path(mount_point) / relative if relative else Path(mount_point)
    return None


def _remove_stale(parent: Path) -> None:
    """Remove empty session cgroups that an earlier server process left behind."""
    horizon = time.time() - STALE_AFTER_SECONDS
    try:
        children = [entry for entry in os.scandir(parent) if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for entry in children:
        try:
            if entry.stat(follow_symlinks=False).st_mtime < horizon:
                os.rmdir(entry.path)  # refused (EBUSY) while a process is in it
        except OSError:
            continue


@dataclass(frozen=True)
class SessionCgroup:
    """The cgroup a session's shell and everything it starts run in."""

    path: Path

    @classmethod
    def create(cls, name: str) -> SessionCgroup | None:
        """Create the cgroup ``name``; return None when cgroups are not used or it fails."""
        parent = sessions_parent()
        if parent is None or not _NAME_OK.match(name):
            return None
        for path in list(_unremoved):
            if _try_rmdir(path):
                _unremoved.discard(path)
        path = parent / name
        try:
            path.mkdir(exist_ok=True)  # a revived session takes its cgroup back
        except OSError as exc:
            logger.warning("could not create cgroup %s (%s); tracking its processes", path, exc)
            return None
        return cls(path)

    def open_procs(self) -> int | None:
        """Return a write-only descriptor of cgroup.procs: a child writes "0" to it to join."""
        try:
            return os.open(self.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            logger.warning("could not open %s/cgroup.procs: %s", self.path, exc)
            return None

    def pids(self) -> set[int]:
        """Return the pids of the live processes in the cgroup (zombies are not members)."""
        try:
            text = (self.path / "cgroup.procs").read_text()
        except OSError:
            return set()
        return {int(pid) for pid in text.split()}

    def kill(self) -> None:
        """SIGKILL every process in the cgroup, including one forking right now."""
        try:
            (self.path / "cgroup.kill").write_text("1")
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                logger.warning("could not kill cgroup %s: %s", self.path, exc)

    def remove(self, *, timeout: float = 5.0) -> bool:
        """Remove the cgroup once its last process has exited; return whether it is gone.

        One that cannot be removed in time is retried when the next session cgroup is created,
        and by the next server process once it is empty.
        """
        deadline = time.monotonic() + timeout
        while not _try_rmdir(self.path):
            if time.monotonic() >= deadline:
                _unremoved.add(self.path)
                return False
            time.sleep(0.01)
        return True


def _try_rmdir(path: Path) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True

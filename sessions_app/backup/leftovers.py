"""Working files of backups and restores, and what a killed one leaves behind.

``backup create`` works in a hidden directory ``.backup-*`` and writes its archive to a hidden
temporary file ``.termsys-backup-*.tmp`` (``archive.Writer``); a restore extracts into
``.restore-*``. Each is locked (``flock``) by its process for as long as it is used, so one that
nobody holds is a leftover of a process that was killed: the next create, restore or prune in
that directory removes it, once it has been left alone for ``GRACE`` seconds (a new one is
locked a moment after it is made). Only the current user's are touched: a shared ``--output``
directory may hold other users'.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

GRACE = 60  # seconds a leftover is left alone after its last change
PATTERNS = (".backup-*", ".restore-*", ".termsys-backup-*.tmp")

logger = logging.getLogger(__name__)


class Unwritable(Exception):
    """The directory cannot be written in (missing rights, read-only, full, not a directory)."""

    def __init__(self, directory: Path, error: OSError) -> None:
        super().__init__(f"{directory}: {error.strerror or error}")
        self.directory = directory
        self.error = error


@contextlib.contextmanager
def workdir(directory: Path, prefix: str) -> Iterator[Path]:
    """Make a private directory in ``directory``, locked while it is used, removed after.

    Raise ``Unwritable`` if it cannot be made.
    """
    try:
        holder = tempfile.TemporaryDirectory(dir=directory, prefix=prefix)
    except OSError as exc:
        raise Unwritable(directory, exc) from exc
    with holder as name:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield Path(name)
        finally:
            os.close(fd)


def clean(directory: Path) -> list[str]:
    """Remove the leftovers of killed backups and restores in ``directory``; return their
    names."""
    try:
        found = sorted({path for pattern in PATTERNS for path in directory.glob(pattern)})
    except OSError:
        return []
    removed = []
    for path in found:
        try:
            if _remove_if_left(path):
                removed.append(path.name)
        except OSError as exc:
            logger.warning("leftover %s not removed: %s", path, exc)
    if removed:
        logger.info("removed leftovers of killed backups or restores: %s", ", ".join(removed))
    return removed


def _remove_if_left(path: Path) -> bool:
    found = path.lstat()
    if found.st_uid != os.geteuid() or stat.S_ISLNK(found.st_mode):
        return False
    if time.time() - found.st_mtime < GRACE:
        return False
    directory = stat.S_ISDIR(found.st_mode)
    flags = os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its process is still at work
        if directory:
            shutil.rmtree(path)
        else:
            path.unlink()
        return True
    finally:
        os.close(fd)

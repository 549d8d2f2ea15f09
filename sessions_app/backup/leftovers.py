"""Working directories of backups and restores.

``backup create`` works in a hidden directory ``.backup-*``, a restore in ``.restore-*``: made
with ``workdir``, which names the directory when it cannot be made there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


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

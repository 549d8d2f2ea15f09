"""The engine-native member of a backup: for operators, verified by checksum, not restored.

SQLite: a copy made with the online backup API. PostgreSQL: ``pg_dump -Fc`` of the same
snapshot the portable form was read from (``--snapshot``). Either runs beside the export of the
portable form (``start``, then ``Pending.wait``): a thread of its own for SQLite, whose backup
API lets go of the GIL, and a process for ``pg_dump``.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path

from django.db import connection

PG_DUMP_TIMEOUT = 3600


class NativeUnavailable(Exception):
    """The native copy could not be made; the archive is still complete without it."""


def member_name() -> str:
    return "native/db.sqlite3" if connection.vendor == "sqlite" else "native/db.pgdump"


def kind() -> str:
    return "sqlite-backup-api" if connection.vendor == "sqlite" else "pg_dump-custom"


def begin_snapshot() -> str | None:
    """Make the current (outermost, still empty) transaction one consistent snapshot.

    Return PostgreSQL's exported snapshot id for pg_dump, or None on SQLite, whose read
    transaction is already a snapshot in WAL mode.
    """
    if connection.vendor != "postgresql" or connection.savepoint_ids:
        return None  # nested in a caller's transaction: its snapshot is what we get
    with connection.cursor() as cursor:
        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cursor.execute("SELECT pg_export_snapshot()")
        return cursor.fetchone()[0]


class Pending:
    """A native copy being written; ``wait`` returns once it is complete or raises why not."""

    def __init__(self) -> None:
        self.error: NativeUnavailable | None = None
        self.thread: threading.Thread | None = None
        self.process: subprocess.Popen[str] | None = None

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.process is not None:
            try:
                _, stderr = self.process.communicate(timeout=PG_DUMP_TIMEOUT)
            except subprocess.TimeoutExpired as exc:
                self.process.kill()
                self.process.communicate()
                raise NativeUnavailable(f"pg_dump did not finish: {exc}") from exc
            if self.process.returncode != 0:
                raise NativeUnavailable(
                    f"pg_dump failed ({self.process.returncode}): {stderr.strip()}"
                )
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        """Stop a copy whose archive will not be written (the export failed)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.communicate()
        if self.thread is not None:
            self.thread.join()


def start(path: Path, snapshot: str | None) -> Pending:
    """Start writing the native copy of the database to ``path``; raise if it cannot start."""
    pending = Pending()
    if connection.vendor == "sqlite":
        name = _sqlite_name()

        def copy() -> None:
            try:
                _sqlite_backup(name, path)
            except NativeUnavailable as exc:
                pending.error = exc

        pending.thread = threading.Thread(target=copy, name="backup-native", daemon=True)
        pending.thread.start()
    elif connection.vendor == "postgresql":
        pending.process = _pg_dump(path, snapshot)
    else:
        raise NativeUnavailable(f"no native copy for the {connection.vendor} engine")
    return pending


def write(path: Path, snapshot: str | None) -> None:
    """Write the native copy of the database to ``path``."""
    start(path, snapshot).wait()


def _sqlite_name() -> str:
    name = str(connection.settings_dict["NAME"])
    if name == ":memory:" or name.startswith("file:"):
        raise NativeUnavailable(f"the SQLite database {name!r} is not a plain file")
    return name


def _sqlite_backup(name: str, path: Path) -> None:
    # A connection of its own: the backup API would wait forever on Django's connection,
    # which holds the transaction's write lock. That lock also keeps other writers out,
    # so this copy shows the same data as the portable form read inside the transaction.
    source = sqlite3.connect(name, timeout=20, check_same_thread=False)
    target = sqlite3.connect(path)
    try:
        source.backup(target)
    except sqlite3.Error as exc:
        raise NativeUnavailable(f"SQLite backup API failed: {exc}") from exc
    finally:
        target.close()
        source.close()


def _pg_dump(path: Path, snapshot: str | None) -> subprocess.Popen[str]:
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise NativeUnavailable("pg_dump is not on PATH")
    db = connection.settings_dict
    argv = [pg_dump, "--format=custom", "--no-password", f"--file={path}"]
    if snapshot:
        argv.append(f"--snapshot={snapshot}")
    for option, key in (("--host", "HOST"), ("--port", "PORT"), ("--username", "USER")):
        if db.get(key):
            argv.append(f"{option}={db[key]}")
    argv.append(f"--dbname={db['NAME']}")
    env = dict(os.environ)
    if db.get("PASSWORD"):
        env["PGPASSWORD"] = str(db["PASSWORD"])
    sslmode = (db.get("OPTIONS") or {}).get("sslmode")
    if sslmode:
        env["PGSSLMODE"] = str(sslmode)
    try:
        return subprocess.Popen(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    except OSError as exc:
        raise NativeUnavailable(f"pg_dump did not run: {exc}") from exc

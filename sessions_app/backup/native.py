"""The engine-native member of a backup: for operators, verified by checksum.

SQLite: the database file itself, copied into the archive while the backup's transaction keeps
it unchanged (``sqlite-file``: the write-ahead log was checkpointed first and is empty, so the
file alone is the database), or where it is not, a copy made with the online backup API
(``sqlite-backup-api``). ``restore`` into SQLite loads either when the schemas match
(``sqlite_native``). PostgreSQL: ``pg_dump -Fc`` of the same snapshot the portable form was
read from (``--snapshot``), for operators (``pg_restore``); ``restore`` does not use it. Either
runs beside the export of the portable form (``start``, then ``Pending.wait``): the kernel's
copy and a hashing thread, the backup API's thread, or a process for ``pg_dump``.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path

from django.db import DatabaseError, connection

from sessions_app.backup.archive import Writer

PG_DUMP_TIMEOUT = 3600
# gzip level of pg_dump's table data: its default (6) took 4.7 s of CPU at 10k sessions, level
# 1 1.8 s, for a copy 45% larger (51 → 74 MB); it runs beside the export, on the same 2 cores.
PG_DUMP_COMPRESS = 1
SQLITE_FILE = "sqlite-file"
SQLITE_BACKUP_API = "sqlite-backup-api"


class NativeUnavailable(Exception):
    """The native copy could not be made; the archive is still complete without it."""


def member_name() -> str:
    return "native/db.sqlite3" if connection.vendor == "sqlite" else "native/db.pgdump"


def kind() -> str:
    return SQLITE_BACKUP_API if connection.vendor == "sqlite" else "pg_dump-custom"


def prepare() -> None:
    """Before the backup's transaction: on SQLite, checkpoint the write-ahead log into the
    database file and empty it, so that the file alone is the database (``start``)."""
    if connection.vendor != "sqlite" or connection.in_atomic_block:
        return
    try:
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except DatabaseError:  # busy: the backup API copy is the fallback
        pass


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
    """A native copy being written; ``wait`` returns once it is in the archive or raises why
    not. SQLite's file copy must be waited for inside the transaction that keeps it whole."""

    def __init__(self, writer: Writer, path: Path) -> None:
        self.writer, self.path = writer, path
        self.kind = kind()
        self.error: NativeUnavailable | None = None
        self.thread: threading.Thread | None = None
        self.process: subprocess.Popen[str] | None = None
        self.added = False  # already handed to the writer

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
        if not self.added:
            self.writer.add(member_name(), self.path)
        self.writer.wait(member_name())

    def cancel(self) -> None:
        """Stop a copy whose archive will not be written (the export failed)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.communicate()
        if self.thread is not None:
            self.thread.join()


def start(writer: Writer, path: Path, snapshot: str | None) -> Pending:
    """Start putting the native copy of the database into ``writer`` (``path``: a temporary
    file, where one is needed); raise if it cannot start."""
    pending = Pending(writer, path)
    if connection.vendor == "sqlite":
        name = _sqlite_name()
        if _sqlite_file_is_whole(name):
            pending.kind, pending.added = SQLITE_FILE, True
            writer.add(member_name(), Path(name), own_process=True)
            return pending

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


def _sqlite_name() -> str:
    name = str(connection.settings_dict["NAME"])
    if name == ":memory:" or name.startswith("file:"):
        raise NativeUnavailable(f"the SQLite database {name!r} is not a plain file")
    return name


def _sqlite_file_is_whole(name: str) -> bool:
    """Whether the database file alone holds this transaction's data and stays unchanged
    until it ends: the write-ahead log is empty (``prepare``) and, read from the file only,
    this transaction keeps any checkpoint from writing into it; without a write-ahead log,
    its read lock keeps writers out."""
    if not connection.in_atomic_block:
        return False
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM sqlite_master")  # the snapshot starts here
        cursor.execute("PRAGMA journal_mode")
        mode = str(cursor.fetchone()[0]).lower()
    if mode != "wal":
        return mode in ("delete", "truncate", "persist")
    wal = Path(f"{name}-wal")
    return not wal.exists() or wal.stat().st_size == 0


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
    argv = [
        pg_dump,
        "--format=custom",
        f"--compress={PG_DUMP_COMPRESS}",
        "--no-password",
        f"--file={path}",
    ]
    if snapshot:
        argv.append(f"--snapshot={snapshot}")
    for option, key in (("--host", "HOST"), ("--port", "PORT"), ("--username", "USER")):
        if db.get(key):
            argv.append(f"{option}={db[key]}")
    # The search documents are derived, and the archive holds them in a form restore loads
    # (searchindex); in pg_dump's copy they were its costliest part (their vectors as text).
    from sessions_app.backup.portable import derived_models
    from sessions_app.backup.swap import SIDE

    for model in derived_models():
        argv.append(f"--exclude-table-data={model._meta.db_table}")
    # A restore killed mid-way leaves its table of documents loaded beside until the next
    # restore drops it; it is no table of termsys's, and pg_restore would bring it back.
    argv.append(f"--exclude-table={SIDE}")
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

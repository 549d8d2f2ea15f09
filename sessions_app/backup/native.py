"""The engine-native member of a backup: for operators, verified by checksum, not restored.

SQLite: a copy made with the online backup API. PostgreSQL: ``pg_dump -Fc`` of the same
snapshot the portable form was read from (``--snapshot``).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
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


def write(path: Path, snapshot: str | None) -> None:
    """Write the native copy of the database to ``path``."""
    if connection.vendor == "sqlite":
        _sqlite_backup(path)
    elif connection.vendor == "postgresql":
        _pg_dump(path, snapshot)
    else:
        raise NativeUnavailable(f"no native copy for the {connection.vendor} engine")


def _sqlite_backup(path: Path) -> None:
    # A connection of its own: the backup API would wait forever on Django's connection,
    # which holds the transaction's write lock. That lock also keeps other writers out,
    # so this copy shows the same data as the portable form read inside the transaction.
    name = str(connection.settings_dict["NAME"])
    if name == ":memory:" or name.startswith("file:"):
        raise NativeUnavailable(f"the SQLite database {name!r} is not a plain file")
    source = sqlite3.connect(name, timeout=20)
    target = sqlite3.connect(path)
    try:
        source.backup(target)
    except sqlite3.Error as exc:
        raise NativeUnavailable(f"SQLite backup API failed: {exc}") from exc
    finally:
        target.close()
        source.close()


def _pg_dump(path: Path, snapshot: str | None) -> None:
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
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=PG_DUMP_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeUnavailable(f"pg_dump did not run: {exc}") from exc
    if done.returncode != 0:
        raise NativeUnavailable(f"pg_dump failed ({done.returncode}): {done.stderr.strip()}")

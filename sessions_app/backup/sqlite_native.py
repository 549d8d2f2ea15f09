"""Restore into SQLite from an archive's native SQLite copy.

Two ways, both after ``restore`` verified the archive and took its safety backup:

- ``page_copy``: when the copy's schema is this database's, down to the SQL of every table,
  index and trigger (the same migrations, the same page size and text encoding), its pages are
  copied over this database's with SQLite's backup API: one write transaction, committed at its
  end or not at all, with no row decoded, inserted or deleted, and the search index (the FTS5
  tables) copied as it was instead of tokenised again. Before, on the extracted copy (a
  temporary file): login sessions are deleted, and every backed-up model's rows are counted
  against the manifest. Restore's portable load of 10k sessions took 9.7-14 s; this about 2 s.
- ``rows``: otherwise (another schema, or PostgreSQL), the copy is read as a database of its
  own through a temporary connection alias, model by model with the columns it has, and loaded
  as the portable form is (``portable.load_model``: defaults for missing columns, natural keys).
  This is how an archive holding only the native copy (a safety backup made on SQLite) loads
  into a newer schema or another engine.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connection, connections
from django.db.utils import load_backend

from sessions_app.backup import native

ALIAS = "termsys_backup_native"
logger = logging.getLogger(__name__)
# Pages the backup API copies per step (16 MiB of 4 KiB pages): between steps, a restore looks
# at Ctrl-C (``page_copy``); a step costs nothing measurable beside its pages.
PAGES_PER_STEP = 4096


def candidate(manifest: dict[str, Any], same_migrations: bool) -> bool:
    """Whether ``page_copy`` may apply (to be confirmed by ``unfit`` on the extracted copy)."""
    found = manifest.get("native") or {}
    return (
        connection.vendor == "sqlite"
        and bool(found.get("member"))
        and found.get("kind") in (native.SQLITE_FILE, native.SQLITE_BACKUP_API)
        and same_migrations
        and _plain_file()
    )


def has_copy(manifest: dict[str, Any]) -> bool:
    found = manifest.get("native") or {}
    return bool(found.get("member")) and found.get("kind") in (
        native.SQLITE_FILE,
        native.SQLITE_BACKUP_API,
    )


def _plain_file() -> bool:
    name = str(connection.settings_dict["NAME"])
    return name != ":memory:" and not name.startswith("file:")


def _shape(db: sqlite3.Connection) -> tuple[Any, ...]:
    schema = db.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
    ).fetchall()
    return (
        schema,
        db.execute("PRAGMA page_size").fetchone()[0],
        db.execute("PRAGMA encoding").fetchone()[0],
    )


def unfit(path: Path) -> str | None:
    """Return why the copy at ``path`` cannot replace this database page for page, or None."""
    with closing(sqlite3.connect(path)) as copy:
        theirs = _shape(copy)
    connection.ensure_connection()
    ours = _shape(connection.connection)
    if theirs[0] != ours[0]:
        return "its schema differs from this database's"
    if theirs[1:] != ours[1:]:
        return f"page size and encoding {theirs[1:]}, this database's {ours[1:]}"
    return None


def prepare(path: Path, counts: dict[str, int], login_sessions: str) -> dict[str, int]:
    """Delete the login sessions in the copy at ``path``; return the row count of each of
    ``counts``' tables there that differs from it (table → rows found)."""
    with closing(sqlite3.connect(path, isolation_level=None)) as copy:
        copy.execute("BEGIN IMMEDIATE")
        copy.execute(f'DELETE FROM "{login_sessions}"')
        copy.execute("COMMIT")
        differ = {}
        for table, expected in counts.items():
            found = copy.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
            if found != expected:
                differ[table] = found
        copy.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the file alone is the copy again
    return differ


class _Stopped(Exception):
    pass


def page_copy(path: Path, stop: Callable[[], bool] = lambda: False) -> None:
    """Replace this database's pages with the copy's in one transaction, then checkpoint.

    The backup API writes every page through the write-ahead log and commits as its last step
    ends. It runs ``PAGES_PER_STEP`` pages at a time; after each step but the last, ``stop()``
    true raises KeyboardInterrupt, and ending the backup before its last step rolls back its
    transaction: nothing changed (SQLite's ``sqlite3_backup_finish``). The checkpoint moves
    the pages into the database file now rather than in the next writer's commit.
    """

    def step(status: int, remaining: int, total: int) -> None:
        if status != sqlite3.SQLITE_DONE and stop():
            raise _Stopped

    connection.ensure_connection()
    target = connection.connection
    with closing(sqlite3.connect(path)) as copy:
        try:
            copy.backup(target, pages=PAGES_PER_STEP, progress=step)
        except _Stopped:
            raise KeyboardInterrupt from None
    try:
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except DatabaseError as exc:  # committed already: the next checkpoint moves the pages
        logger.warning("checkpoint after the page copy: %s", exc)


@contextmanager
def opened(path: Path) -> Iterator[str]:
    """Open the copy at ``path`` as the connection alias ``ALIAS`` for reading rows."""
    settings = connections.configure_settings(  # fills in the defaults of every key
        {
            DEFAULT_DB_ALIAS: connections.settings[DEFAULT_DB_ALIAS],
            ALIAS: {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path)},
        }
    )[ALIAS]
    # A connection of this thread only, not a configured database: nothing else (no router,
    # no test runner, no other thread) takes it for one of the project's.
    connections[ALIAS] = load_backend(settings["ENGINE"]).DatabaseWrapper(settings, ALIAS)
    try:
        yield ALIAS
    finally:
        connections[ALIAS].close()
        del connections[ALIAS]


def columns_in(alias: str, table: str) -> list[str]:
    """Return the column names of ``table`` in the database of ``alias``."""
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT name FROM pragma_table_info(%s)", [table])
        return [name for (name,) in cursor.fetchall()]

"""Restore into SQLite from an archive's native SQLite copy.

Three ways, all after ``restore`` verified the archive and took its safety backup:

- ``swap_in``: when the copy's schema is this database's, down to the SQL of every table,
  index and trigger (the same migrations, the same page size and text encoding), and no one
  has the database open, the copy (extracted to a temporary file on the same file system, its
  login sessions deleted and every backed-up model's rows counted against the manifest) is
  renamed over the database file: the kernel's atomic ``rename``, with no page written again.
  "No one" is the kernel's word, a write lease on the file (``F_SETLEASE``, taken by a process
  of its own, ``_SWAP``), which it grants only while no descriptor or mapping of the file is
  open in any process, and which holds back every ``open`` of it until it is released; the
  write-ahead log and rollback journal must be empty (a log holding frames would be replayed
  onto the new file by its next opener). A process that was waiting in ``open`` meanwhile gets
  the old file, whose header is zeroed first: SQLite reports "file is not a database" there,
  never reads the old data nor writes into the log.
- ``page_copy``: otherwise, with the same schema (a server has the database open), its pages
  are copied over this database's with SQLite's backup API: one write transaction, committed at
  its end or not at all, with no row decoded, inserted or deleted, and the search index (the FTS5
  tables) copied as it was instead of tokenised again; every page goes through the write-ahead
  log and then into the file. Restore's portable load of 10k sessions took 9.7-14 s; this 6.5-7
  s on the disk of 2026-12-07, the swap under a tenth of a second plus the copy's ``fsync``.
- ``rows``: otherwise (another schema, or PostgreSQL), the copy is read as a database of its
  own through a temporary connection alias, model by model with the columns it has, and loaded
  as the portable form is (``portable.load_model``: defaults for missing columns, natural keys).
  This is how an archive holding only the native copy (a safety backup made on SQLite) loads
  into a newer schema or another engine.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import threading
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


def _read_only(path: Path) -> sqlite3.Connection:
    """Open the copy at ``path``, which no one else uses, to read it only: without the
    write-ahead log's files, which need room beside it (its log is empty or absent)."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True)


def shape_here() -> tuple[Any, ...]:
    """This database's schema, page size and encoding, for ``unfit`` (in another thread)."""
    connection.ensure_connection()
    return _shape(connection.connection)


def unfit(path: Path, ours: tuple[Any, ...]) -> str | None:
    """Return why the copy at ``path`` cannot replace this database (``ours``, from
    ``shape_here``) page for page, or None."""
    with closing(_read_only(path)) as copy:
        theirs = _shape(copy)
    if theirs[0] != ours[0]:
        return "its schema differs from this database's"
    if theirs[1:] != ours[1:]:
        return f"page size and encoding {theirs[1:]}, this database's {ours[1:]}"
    return None


def prepare(path: Path, counts: dict[str, int], login_sessions: str) -> dict[str, int]:
    """Delete the login sessions in the copy at ``path``; return the row count of each of
    ``counts``' tables there that differs from it (table → rows found). The copy is on disk
    (fsynced) when it returns, ready to be renamed over the database (``swap_in``)."""
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
    _fsync(path)
    return differ


def swap_in(path: Path, commit: Callable[[], None] = lambda: None) -> str | None:
    """Make the copy at ``path`` (prepared: ``prepare``) this database's file by renaming it
    over the file, if no one has the database open (see the module's docstring); return None
    once it is, or why not, and then nothing changed. ``commit()`` is called just before the
    rename, the point of no return: a KeyboardInterrupt before it leaves everything as it was.
    Closes this thread's connection (the next query opens the new file).

    The lease is held, and the file renamed, by a process of its own (``_SWAP``): a descriptor
    of the database opened and closed in this one would drop the POSIX locks that every
    connection of this process holds on it, SQLite's (https://sqlite.org/howtocorrupt.html,
    2.2), when the lease is refused because they have it open.
    """
    name = Path(str(connection.settings_dict["NAME"]))
    if connection.in_atomic_block:
        return "inside a transaction"
    try:
        copied = path.stat()
        if copied.st_dev != name.stat().st_dev:
            return "the copy is on another file system than the database"
    except OSError as exc:
        return f"cannot look at the files: {exc}"
    connection.close()  # this thread's: any open descriptor of the file refuses the lease
    swapper = subprocess.Popen(
        [sys.executable, "-c", _SWAP, str(name), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert swapper.stdin is not None and swapper.stdout is not None
    try:
        said = swapper.stdout.readline().strip()
        if said == "ready":
            commit()
            swapper.stdin.write("go\n")
            swapper.stdin.flush()
            said = swapper.stdout.readline().strip()
    finally:
        swapper.stdin.close()  # before "go": the process ends and nothing changed
    try:
        swapped = name.stat().st_ino == copied.st_ino  # the file system's word, not the child's
    except OSError as exc:
        swapped = False
        logger.warning("after swapping %s in: %s", name, exc)
    if swapped:
        # It exits as the replaced file's last reference closes: freeing 600 MiB of blocks
        # took 0.5 s on a disk mounted with ``discard``. Reaped meanwhile, in a thread.
        threading.Thread(target=_reap, args=(swapper, name), name="backup-free").start()
        return None
    errors = swapper.stderr.read().strip() if swapper.stderr else ""
    swapper.wait()
    if said.startswith("refused "):
        return said.removeprefix("refused ")
    return f"the swap failed: {errors or f'exit status {swapper.returncode}'}"


def _reap(process: subprocess.Popen[str], name: Path) -> None:
    errors = process.stderr.read() if process.stderr else ""
    process.wait()
    for line in errors.splitlines():
        logger.warning("after swapping %s in: %s", name, line)


# Run by ``swap_in`` in a process of its own. argv: database, copy. Says "ready" once it holds
# a write lease on the database file and the log and journal are empty (else "refused <why>"
# and ends); on "go" it renames the copy over the database, then (still under the lease, only
# reported on stderr if they fail) fsyncs the directory, zeroes the replaced file's header and
# removes its empty log and shared memory index, says "swapped", and ends.
_SWAP = r"""
import errno, fcntl, os, signal, stat, sys
name, path = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGIO, signal.SIG_IGN)  # the lease's notice of an open; it would end us
def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
def refuse(why):
    say("refused " + why)
    sys.exit(0)
try:
    fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
except OSError as exc:
    refuse("cannot open the database file: %s" % exc.strerror)
try:
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
except OSError as exc:
    if exc.errno in (errno.EAGAIN, errno.EBUSY):
        refuse("the database is open (a running server?)")
    refuse("no lease on the database file (%s)" % exc.strerror)
for suffix in ("-wal", "-journal"):
    try:
        if os.stat(name + suffix).st_size:
            refuse("its %s file holds data the database file does not" % suffix[1:])
    except FileNotFoundError:
        pass
held = os.fstat(fd)
try:
    if (held.st_uid, held.st_gid) != (os.getuid(), os.getgid()):
        os.chown(path, held.st_uid, held.st_gid)  # as root only: the lease needs it
    os.chmod(path, stat.S_IMODE(held.st_mode))
except OSError as exc:
    refuse("cannot give the copy the database file's owner and mode: %s" % exc.strerror)
say("ready")
if sys.stdin.readline().strip() != "go":
    sys.exit(0)
try:
    os.replace(path, name)
except OSError as exc:
    refuse("renaming the copy failed: %s" % exc.strerror)
def fsync_directory():
    dir_fd = os.open(os.path.dirname(name) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
steps = [
    ("fsync of the directory", fsync_directory),
    ("zeroing the replaced file's header", lambda: os.pwrite(fd, bytes(100), 0)),
]
for suffix in ("-wal", "-shm", "-journal"):
    steps.append(("removing " + suffix, lambda suffix=suffix: os.unlink(name + suffix)))
for what, step in steps:
    try:
        step()
    except FileNotFoundError:
        pass
    except OSError as exc:
        sys.stderr.write("%s: %s\n" % (what, exc))
say("swapped")
"""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    with closing(_read_only(path)) as copy:
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

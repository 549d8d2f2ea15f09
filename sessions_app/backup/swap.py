"""A restore's stored search documents, loaded beside it into a table of their own (PostgreSQL).

Loading the archive's documents is seconds of the server's work: their ``COPY``, then their
indexes, the GIN index of the vectors the longest, each built by one backend. Inside the
restore's transaction that work can only come before or after the rows' load. So where the
documents table allows it (``shape``), the restore loads them on a connection of its own into a
new table shaped like it (``SIDE``: the same columns, defaults, identity, checks and storage),
commits it, and builds its indexes and keys under temporary names: no one else uses it. The
indexes build from two connections at once (``_build_indexes``): first the two halves of the
GIN index of the vectors (migration 0009_search_vector_halves), most of the work, one on each;
then the btree indexes, those of the primary and unique keys among them, which are then added
on them. Meanwhile the restore's transaction waits for its
safety backup and loads the rows. At its end (``swap_in``) it drops the documents table, gives
the new one, its indexes, constraints and identity sequence the old names, and adds the old
table's foreign keys, triggers, statistics objects and grants from their definitions (the
statistics they gather come with the next ANALYZE, autovacuum's): the schema is as it was and
migrations find every name. That commits or rolls back with the restore; whatever fails, the
old table is left as it was and the new one dropped (``locked``).

The swap is used only where it loses nothing: this role owns the table; no view, rule, policy,
publication or other table's foreign key depends on it, nor a statistics object with a target
of its own; no column default
needs a sequence besides the identity; it is neither partitioned nor inherited, has no storage
parameters or column grants, and is in the first schema of the search path; its indexes are
defined in the form copied here. Otherwise ``shape`` says what stands in the way and the
documents load in the restore's own transaction, as before (``derived``).

Restores that swap hold an advisory lock while they do, so that one never drops another's new
table; the next one drops a table left by a restore that was killed.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

from django.core.management.color import no_style
from django.db import DatabaseError, connection, transaction

from sessions_app.backup import derived, pgcopy, portable

SIDE = "termsys_restore_documents"  # the table the documents load into
TEMPORARY = "termsys_restore_"  # prefix of its indexes' and constraints' names until the swap
LOCK = 0x7465726D_73797321  # pg_advisory_lock key of restores that swap ("termsys!")
# A key that may be added on a unique index built beforehand (``ADD CONSTRAINT … USING INDEX``).
PLAIN_KEY = re.compile(r"(PRIMARY KEY|UNIQUE) \([^()]*\)")
INDEX_BUILDERS = 2  # connections building the indexes, each one index at a time
# The commits of the new table's load and builds return without waiting for their write-ahead
# log to reach the disk (the documents' COPY writes a few hundred MB of it): the table matters
# only once the restore's own commit, which waits, has made it the documents table, and the log
# is flushed in order, so that commit's flush carries theirs. After a crash before it the next
# restore drops the table.
UNFLUSHED = "SET LOCAL synchronous_commit = off"
# What a table may have that the swap re-creates (pg_depend's classid of each dependent).
KEPT = ("pg_class", "pg_type", "pg_constraint", "pg_trigger", "pg_attrdef", "pg_statistic_ext")

logger = logging.getLogger(__name__)


@dataclass
class Key:
    """A primary, unique or exclusion key of the documents table."""

    name: str
    definition: str  # as pg_get_constraintdef gives it: "PRIMARY KEY (id)"
    # Its index's "USING …" (a plain, immediate primary or unique key only): that index is
    # built with the others, then the key is added on it; else the key is added as defined.
    using: str | None = None


@dataclass
class Shape:
    """What the documents table has that the new table must have too, by name."""

    table: str
    constraints: list[Key] = field(default_factory=list)  # primary, unique and exclusion keys
    indexes: list[tuple[str, bool, str]] = field(default_factory=list)  # name, unique, USING …
    foreign_keys: list[tuple[str, str]] = field(default_factory=list)  # (name, definition)
    triggers: list[str] = field(default_factory=list)  # CREATE TRIGGER statements
    statistics: list[str] = field(default_factory=list)  # CREATE STATISTICS statements
    sequences: list[tuple[str, str]] = field(default_factory=list)  # identity (column, name)
    grants: list[str] = field(default_factory=list)  # GRANT statements

    def temporary(self, kind: str, n: int) -> str:
        return f"{TEMPORARY}{kind}{n}"

    def named(self, text: str) -> str:
        """``text`` (an error) with the temporary names of the new table, its keys and its
        indexes replaced by the names they were to take."""

        def real(match: re.Match[str]) -> str:
            kind, n = match.group(1), int(match.group(2))
            if kind in "ku" and n < len(self.constraints):
                return self.constraints[n].name
            if kind == "i" and n < len(self.indexes):
                return self.indexes[n][0]
            return match.group(0)

        return re.sub(rf"{TEMPORARY}([kiu])(\d+)\b", real, text).replace(SIDE, self.table)


def shape(table: str) -> Shape | str:
    """Return what ``table`` has to be re-created after the swap, or why it cannot be swapped."""
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.oid, c.relkind, c.relispartition OR c.relhassubclass OR EXISTS "
            "(SELECT 1 FROM pg_inherits WHERE inhrelid = c.oid), c.relrowsecurity, "
            "c.relhasrules, c.reloptions IS NOT NULL, pg_has_role(c.relowner, 'MEMBER'), "
            "n.nspname = current_schema(), "
            "EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = c.oid AND attacl IS NOT NULL) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.oid = %s::regclass",
            [quote(table)],
        )
        oid, kind, inherits, security, rules, options, owner, here, column_grants = (
            cursor.fetchone()
        )
        for reason, found in [
            ("it is not a plain table", kind != "r"),
            ("it is partitioned or inherited", inherits),
            ("it has row security", security),
            ("it has rules", rules),
            ("it has storage parameters", options),
            ("this role does not own it", not owner),
            ("it is not in the first schema of the search path", not here),
            ("it has column grants", column_grants),
        ]:
            if found:
                return reason
        cursor.execute(
            "SELECT DISTINCT classid::regclass::text FROM pg_depend WHERE refobjid = %s::oid "
            "AND refclassid = 'pg_class'::regclass AND classid::regclass::text <> ALL(%s) "
            "UNION ALL SELECT 'a foreign key of ' || conrelid::regclass::text FROM pg_constraint "
            "WHERE confrelid = %s::oid AND conrelid <> %s::oid "
            "UNION ALL SELECT 'a serial sequence' FROM pg_depend WHERE refobjid = %s::oid "
            "AND classid = 'pg_class'::regclass AND deptype = 'a' "
            "AND objid IN (SELECT oid FROM pg_class WHERE relkind = 'S') "
            "UNION ALL SELECT 'a trigger that is not always on' FROM pg_trigger "
            "WHERE tgrelid = %s::oid AND NOT tgisinternal AND tgenabled <> 'O'",
            [oid, list(KEPT), oid, oid, oid, oid],
        )
        depends = [name for (name,) in cursor.fetchall()]
        if depends:
            return f"{', '.join(depends)} depends on it"
        found = Shape(table=table)
        cursor.execute(
            "SELECT k.conname, k.contype, pg_get_constraintdef(k.oid), k.condeferrable, "
            "pg_get_indexdef(k.conindid), format('CREATE UNIQUE INDEX %%I ON %%I.%%I USING ', "
            "i.relname, n.nspname, t.relname) FROM pg_constraint k "
            "JOIN pg_class t ON t.oid = k.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace "
            "LEFT JOIN pg_class i ON i.oid = k.conindid "
            "WHERE k.conrelid = %s::oid AND k.contype IN ('p', 'u', 'x', 'f') ORDER BY k.conname",
            [oid],
        )
        for name, kind, definition, deferrable, index, head in cursor.fetchall():
            if kind == "f":
                found.foreign_keys.append((name, definition))
                continue
            key = Key(name, definition)
            if (
                kind in ("p", "u")
                and not deferrable
                and PLAIN_KEY.fullmatch(definition)
                and index
                and index.startswith(head)
            ):
                key.using = index[len(head) :]
            found.constraints.append(key)
        cursor.execute(
            "SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisunique, "
            "format('INDEX %%I ON %%I.%%I USING ', c.relname, n.nspname, t.relname) "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace "
            "WHERE i.indrelid = %s::oid "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid) "
            "ORDER BY c.relname",
            [oid],
        )
        for name, definition, unique, named in cursor.fetchall():
            head = f"CREATE {'UNIQUE ' if unique else ''}{named}"
            if not definition.startswith(head):
                return f"index {name} is defined in a form this restore does not copy"
            found.indexes.append((name, unique, definition[len(head) :]))
        cursor.execute(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = %s::oid "
            "AND NOT tgisinternal ORDER BY tgname",
            [oid],
        )
        found.triggers = [definition for (definition,) in cursor.fetchall()]
        cursor.execute(
            "SELECT pg_get_statisticsobjdef(oid), stxstattarget FROM pg_statistic_ext "
            "WHERE stxrelid = %s::oid ORDER BY stxname",
            [oid],
        )
        for definition, target in cursor.fetchall():
            if target != -1:
                return "a statistics object of it has a statistics target"
            found.statistics.append(definition)
        cursor.execute(
            "SELECT attname, pg_get_serial_sequence(%s, attname) FROM pg_attribute "
            "WHERE attrelid = %s::oid AND attidentity <> '' ORDER BY attnum",
            [quote(table), oid],
        )
        found.sequences = [(column, sequence) for column, sequence in cursor.fetchall()]
        cursor.execute(
            "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END, "
            "a.privilege_type, a.is_grantable FROM pg_class c, aclexplode(c.relacl) a "
            "LEFT JOIN pg_roles r ON r.oid = a.grantee WHERE c.oid = %s::oid "
            "AND a.grantee <> c.relowner",
            [oid],
        )
        found.grants = [
            f"GRANT {privilege} ON {quote(table)} TO {grantee}"
            + (" WITH GRANT OPTION" if grantable else "")
            for grantee, privilege, grantable in cursor.fetchall()
        ]
    return found


def _create(found: Shape) -> None:
    """Create ``SIDE`` like the documents table and commit (its lock on that table let go:
    the restore empties it meanwhile)."""
    quote = connection.ops.quote_name
    side = quote(SIDE)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {side}")  # a killed restore's (the lock is ours)
        cursor.execute(
            f"CREATE TABLE {side} (LIKE {quote(found.table)} INCLUDING DEFAULTS "
            "INCLUDING IDENTITY INCLUDING GENERATED INCLUDING CONSTRAINTS INCLUDING STORAGE "
            "INCLUDING COMPRESSION INCLUDING COMMENTS)"
        )


def _build(found: Shape, names: list[str], blocks: Iterator[bytes], backends: list[int]) -> int:
    """Load ``blocks`` (binary COPY of ``names``) into ``SIDE`` and commit, then build its
    indexes (``_build_indexes``) and keys under temporary names; return how many rows it has."""
    started = time.perf_counter()
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(UNFLUSHED)
        derived.pg_setting("default_toast_compression", "lz4")  # as the restore's own load
        pgcopy.copy_in(SIDE, names, blocks)
    copied = time.perf_counter()
    try:
        _build_indexes(found, backends)
        rows = _add_keys(found)
    except DatabaseError as exc:  # "… is duplicated", named as the operator knows it
        raise type(exc)(found.named(str(exc))) from exc
    logger.info(
        "search documents beside: %d copied in %.2f s, keys and indexes built in %.2f s",
        rows,
        copied - started,
        time.perf_counter() - copied,
    )
    return rows


def _add_keys(found: Shape) -> int:
    """Add ``SIDE``'s keys (on their unique indexes where built) and commit; return how many
    rows it has."""
    quote = connection.ops.quote_name
    side = quote(SIDE)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(UNFLUSHED)
        cursor.execute(f"SET LOCAL maintenance_work_mem = '{derived.INDEX_BUILD_MEMORY}'")
        for n, key in enumerate(found.constraints):
            temporary = quote(found.temporary("k", n))
            if key.using is None:
                cursor.execute(f"ALTER TABLE {side} ADD CONSTRAINT {temporary} {key.definition}")
                continue
            # Its unique index is built: the key takes it (and gives it its name).
            kind = key.definition.split(" (", 1)[0]
            index = quote(found.temporary("u", n))
            cursor.execute(
                f"ALTER TABLE {side} ADD CONSTRAINT {temporary} {kind} USING INDEX {index}"
            )
        cursor.execute(f"SELECT count(*) FROM {side}")
        return cursor.fetchone()[0]


def _index_builds(found: Shape) -> list[str]:
    """The ``CREATE INDEX`` statements of ``SIDE``'s indexes, those of its keys among them,
    the costliest first: any but btree (the vectors' GIN halves) before the btrees."""
    quote = connection.ops.quote_name
    side = quote(SIDE)
    builds = [
        (
            key.using,
            f"CREATE UNIQUE INDEX {quote(found.temporary('u', n))} ON {side} USING {key.using}",
        )
        for n, key in enumerate(found.constraints)
        if key.using is not None
    ]
    for n, (_, unique, using) in enumerate(found.indexes):
        kind = "UNIQUE INDEX" if unique else "INDEX"
        builds.append(
            (using, f"CREATE {kind} {quote(found.temporary('i', n))} ON {side} USING {using}")
        )
    builds.sort(key=lambda build: build[0].startswith("btree "))  # stable: in order otherwise
    return [statement for _, statement in builds]


def _build_indexes(found: Shape, backends: list[int]) -> None:
    """Build ``SIDE``'s indexes from this connection and others (``INDEX_BUILDERS`` in all),
    each index in a transaction of its own: ``CREATE INDEX`` lets others build beside it, and
    the server builds a GIN index in one process (before PostgreSQL 18): the GIN index's two
    halves build side by side, then the others.
    After an error no build starts; it is raised once those under way have ended."""
    todo: queue.SimpleQueue[str] = queue.SimpleQueue()
    for statement in _index_builds(found):
        todo.put(statement)
    failed: list[BaseException] = []

    def builder() -> None:
        while not failed:
            try:
                statement = todo.get_nowait()
            except queue.Empty:
                return
            try:
                with transaction.atomic(), connection.cursor() as cursor:
                    cursor.execute(UNFLUSHED)
                    cursor.execute(
                        f"SET LOCAL maintenance_work_mem = '{derived.INDEX_BUILD_MEMORY}'"
                    )
                    cursor.execute(statement)
            except BaseException as exc:
                failed.append(exc)
                raise

    def helper() -> None:
        pid = None
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                pid = cursor.fetchone()[0]
            backends.append(pid)
            builder()
        finally:
            if pid in backends:  # not to be cancelled once gone: its id may be reused
                backends.remove(pid)
            connection.close()  # this thread's own

    with ThreadPoolExecutor(INDEX_BUILDERS - 1, thread_name_prefix="backup-index-beside") as pool:
        helping = [pool.submit(helper) for _ in range(INDEX_BUILDERS - 1)]
        try:
            builder()
        finally:
            for future in helping:
                future.exception()
    if failed:
        raise failed[0]


def detach(found: Shape) -> None:
    """In the restore's transaction: drop the documents table's foreign keys, so that the
    tables they name are emptied without emptying it (it is dropped at the swap)."""
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        for name, _ in found.foreign_keys:
            cursor.execute(f"ALTER TABLE {quote(found.table)} DROP CONSTRAINT {quote(name)}")


def swap_in(found: Shape, model: Any) -> None:
    """In the restore's transaction: replace the documents table with ``SIDE``, by name."""
    quote = connection.ops.quote_name
    table = quote(found.table)
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE {table}")
        cursor.execute(f"ALTER TABLE {quote(SIDE)} RENAME TO {table}")
        for column, sequence in found.sequences:
            cursor.execute("SELECT pg_get_serial_sequence(%s, %s)", [found.table, column])
            (made,) = cursor.fetchone()
            cursor.execute(f"ALTER SEQUENCE {made} RENAME TO {quote(sequence.split('.')[-1])}")
        for n, key in enumerate(found.constraints):
            temporary = quote(found.temporary("k", n))
            cursor.execute(
                f"ALTER TABLE {table} RENAME CONSTRAINT {temporary} TO {quote(key.name)}"
            )
        for n, (name, _, _) in enumerate(found.indexes):
            cursor.execute(f"ALTER INDEX {quote(found.temporary('i', n))} RENAME TO {quote(name)}")
        for name, definition in found.foreign_keys:
            cursor.execute(f"ALTER TABLE {table} ADD CONSTRAINT {quote(name)} {definition}")
        for statement in found.triggers + found.statistics + found.grants:
            cursor.execute(statement)
        # The documents came with their ids: the next one takes an id past them.
        for statement in connection.ops.sequence_reset_sql(no_style(), [model]):
            cursor.execute(statement)


@dataclass
class Loading:
    """The documents loading into ``SIDE`` in a thread, on a connection of its own (and
    more while the indexes build)."""

    future: Future[int]
    backends: list[int]  # those connections' process ids, once known

    def result(self) -> int:
        return self.future.result()

    def stop(self) -> None:
        """Cancel the load if it still runs (the restore failed) and wait for it to end."""
        if not self.future.done() and self.backends:
            try:
                with connection.cursor() as cursor:
                    for backend in list(self.backends):
                        cursor.execute("SELECT pg_cancel_backend(%s)", [backend])
            except DatabaseError as exc:  # it ends by itself, and its table is dropped after
                logger.warning("the search documents' load beside goes on: %s", exc)
        self.future.exception()


def start(found: Shape, names: list[str], member: Callable[[], IO[bytes]]) -> Loading:
    """Load the documents (``member``: their gzipped binary COPY) into ``SIDE`` beside.

    Returns once ``SIDE`` exists: creating it reads the documents table, which the restore
    empties later in its transaction, to then wait for this load (a deadlock the other way).
    """
    pool = ThreadPoolExecutor(1, thread_name_prefix="backup-documents")
    backends: list[int] = []
    created = threading.Event()

    def run() -> int:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                backends.append(cursor.fetchone()[0])
            _create(found)
            created.set()
            return _build(found, names, portable.inflated(member()), backends)
        finally:
            created.set()
            connection.close()  # this thread's own

    future = pool.submit(run)
    pool.shutdown(wait=False)
    created.wait()
    return Loading(future, backends)


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Hold the restores' swap lock; at the end drop ``SIDE`` if it is still there (the restore
    failed, or was killed before: the one that comes next finds it)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", [LOCK])
    try:
        yield
    finally:
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"DROP TABLE IF EXISTS {connection.ops.quote_name(SIDE)}")
                cursor.execute("SELECT pg_advisory_unlock(%s)", [LOCK])
        except DatabaseError as exc:  # the connection is gone, and its lock with it
            logger.warning("%s is left for the next restore to drop: %s", SIDE, exc)


def drop_left() -> bool:
    """Drop ``SIDE`` if a killed restore left it and no restore is using it (their lock is
    free); return whether it was dropped."""
    side = connection.ops.quote_name(SIDE)
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [side])
        if not cursor.fetchone()[0]:
            return False
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [LOCK])
        if not cursor.fetchone()[0]:
            return False  # a restore is loading documents into it
    try:
        with transaction.atomic(), connection.cursor() as cursor:  # a savepoint if nested
            cursor.execute(f"DROP TABLE IF EXISTS {side}")
    except DatabaseError as exc:
        logger.warning("%s, left by a killed restore, is not dropped: %s", SIDE, exc)
        return False
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [LOCK])
    return True

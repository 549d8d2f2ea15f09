"""Derived data during a restore: the search index is rebuilt once, not row by row.

The search triggers (``searchdoc_*``, migration 0004_search) write a search document for every
chunk, event and session inserted; over a restore's bulk load that costs more than the load.
Inside the restore's transaction they are dropped (SQLite) or disabled (PostgreSQL) on the
tables being loaded and on the derived tables, and ``search_index_rebuild`` writes the index in
one statement afterwards. Triggers of any other name are left alone.

Indexes are cheaper built once than kept up row by row, so inside the same transaction:

- PostgreSQL: the derived tables' indexes that back no constraint (the GIN index of the
  search vectors among them) are dropped before the load and created again, from their own
  definitions, after the rebuild;
- SQLite: an FTS5 table whose external content is a derived table is emptied with
  ``delete-all`` (instead of a ``delete`` per document through its triggers) and filled with
  ``rebuild`` after the documents are written.

Both read the schema as it is, so they follow columns and indexes added to those tables later.
An error anywhere rolls all of it back with the restore.

On PostgreSQL the load runs with ``session_replication_role = replica`` where the role may set
it: every trigger is off, the search triggers and the foreign keys' own, which otherwise queue
one check per loaded row for the commit. The foreign keys touching the loaded tables are then
checked once each, by a query over the whole table (``check_foreign_keys``). Without that right
the search triggers are disabled by name, as before, and the foreign keys check each row. Large
values are compressed with lz4 instead of pglz for the load, where the server has it (the
output chunks' COPY: 1.6 s → 0.8 s at 10k sessions); reading either needs nothing.

A restore that has the documents as the archive stored them (``stored``: the search index of
an archive from this schema, see ``services``) loads them with the triggers off instead of
writing them again, which on PostgreSQL means not computing ``to_tsvector`` over every text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.backends.utils import CursorWrapper

logger = logging.getLogger(__name__)

TRIGGER_PREFIX = "searchdoc_"
# Memory for building the deferred indexes (PostgreSQL, this transaction only).
INDEX_BUILD_MEMORY = "256MB"
FTS5_HASHSIZE = 64 * 1024 * 1024  # bytes of terms FTS5 holds before writing a segment
FTS5_DEFAULT_HASHSIZE = 1024 * 1024  # SQLite's, for a table that never set its own
FTS5_CONTENT = re.compile(r"content\s*=\s*['\"]?([A-Za-z0-9_]+)", re.IGNORECASE)
FOREIGN_KEY_BROKEN = (
    "{table} row(s) name a {parent} row that is not there ({constraint}: {columns})"
)


def _rebuild() -> int | None:
    try:
        from sessions_app.search.index import search_index_rebuild
    except ImportError:  # no search index in this code
        return None
    return search_index_rebuild()


@dataclass
class _Off:
    triggers: list[tuple[str, str]] = field(default_factory=list)  # (table or name, sql/name)
    derived_triggers: list[tuple[str, str]] = field(default_factory=list)
    indexes: list[str] = field(default_factory=list)  # PostgreSQL: CREATE INDEX statements
    fts: list[str] = field(default_factory=list)  # SQLite: FTS5 tables over derived tables
    replica: bool = False  # PostgreSQL: every trigger off for this transaction
    built: int = 0  # indexes created again


@contextmanager
def triggers_off(
    tables: list[str],
    derived_tables: list[str] | None = None,
    stored: Callable[[], int] | None = None,
    first: bool = False,
) -> Iterator[bool]:
    """Turn the search triggers of ``tables`` off, then on again and rebuild the index.

    The derived tables' own triggers and indexes are deferred the same way and built once
    after the rebuild. ``stored`` (PostgreSQL) loads the documents instead of the rebuild,
    with their triggers off too; ``first``: before the rows (and their indexes are built then),
    rather than after; it yields whether that happened. Run inside a transaction: an error in
    between rolls it all back too.
    """
    derived_tables = list(derived_tables or [])
    off = _turn_off(tables, derived_tables, stored is not None)
    rebuilt = None
    # First only with every trigger off: otherwise the documents' foreign-key checks would be
    # due before the sessions they name are loaded (the index builds check them).
    first = first and stored is not None and off.replica
    if first and stored is not None:
        _empty(derived_tables)
        rebuilt = stored()
        _build_indexes(off)
    yield first
    if stored is not None and not first:
        rebuilt = stored()
    _turn_on(off, tables + derived_tables)
    if stored is None:
        rebuilt = _rebuild()
    with connection.cursor() as cursor:
        for name in off.fts:
            _sqlite_fts_rebuild(cursor, name)
        for _, sql in off.derived_triggers:
            cursor.execute(sql)
    _build_indexes(off)
    logger.info(
        "triggers off during the load: %s; documents %s: %s; deferred indexes: %d; "
        "FTS5 tables rebuilt: %d",
        "all (replica)" if off.replica else len(off.triggers) + len(off.derived_triggers),
        "loaded as stored" if stored is not None else "rebuilt",
        rebuilt,
        off.built,
        len(off.fts),
    )


def _empty(tables: list[str]) -> None:
    """Empty the derived ``tables`` (nothing refers to them): TRUNCATE, or DELETE without the
    right to."""
    quote = connection.ops.quote_name
    try:
        with transaction.atomic(), connection.cursor() as cursor:  # a savepoint
            cursor.execute(f"TRUNCATE {', '.join(quote(table) for table in tables)}")
    except DatabaseError:
        with connection.cursor() as cursor:
            for table in tables:
                cursor.execute(f"DELETE FROM {quote(table)}")


def _build_indexes(off: _Off) -> None:
    """Create the derived tables' indexes dropped for the load (once)."""
    with connection.cursor() as cursor:
        if off.indexes:
            # Deferred foreign-key checks (the rebuild's, or a load's without the replica role)
            # are pending trigger events: check them now, CREATE INDEX waits for none.
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
            cursor.execute("SET CONSTRAINTS ALL DEFERRED")
            cursor.execute(f"SET LOCAL maintenance_work_mem = '{INDEX_BUILD_MEMORY}'")
        for statement in off.indexes:
            cursor.execute(statement)
    off.built += len(off.indexes)
    off.indexes = []


def _turn_off(tables: list[str], derived_tables: list[str], stored: bool) -> _Off:
    off = _Off()
    if connection.vendor == "sqlite":
        off.triggers = _sqlite_drop_triggers(tables)
        off.fts = _sqlite_fts_over(derived_tables)
        if off.fts:
            # Only the triggers that keep those FTS5 tables: 'rebuild' does their work once.
            off.derived_triggers = _sqlite_drop_triggers(derived_tables, mentioning=off.fts)
            with connection.cursor() as cursor:
                for name in off.fts:
                    quoted = connection.ops.quote_name(name)
                    cursor.execute(f"INSERT INTO {quoted}({quoted}) VALUES ('delete-all')")
    elif connection.vendor == "postgresql":
        off.replica = pg_setting("session_replication_role", "replica")
        if not off.replica:
            off.triggers = _pg_disable_triggers(tables + (derived_tables if stored else []))
        off.indexes = _pg_drop_indexes(derived_tables)
        pg_setting("default_toast_compression", "lz4")
    return off


def _turn_on(off: _Off, loaded: list[str]) -> None:
    """Check what the triggers did not, and turn them on again (not the derived tables')."""
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        if off.replica:
            cursor.execute("SET LOCAL session_replication_role = origin")
            check_foreign_keys(loaded)
        if off.triggers and connection.vendor == "postgresql":
            # Deferred foreign-key checks are pending trigger events, which ALTER TABLE refuses
            # to run over: check them now (a violation still rolls the restore back).
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
            cursor.execute("SET CONSTRAINTS ALL DEFERRED")
        for first, second in off.triggers:
            if connection.vendor == "sqlite":
                cursor.execute(second)
            else:
                cursor.execute(f"ALTER TABLE {quote(first)} ENABLE TRIGGER {quote(second)}")


def pg_setting(name: str, value: str) -> bool:
    """``SET LOCAL name = value`` if this role may and the server knows the value."""
    try:
        with transaction.atomic(), connection.cursor() as cursor:  # a savepoint
            cursor.execute(f"SET LOCAL {name} = {value}")
    except DatabaseError as exc:
        logger.info("restore without %s = %s: %s", name, value, exc)
        return False
    return True


def check_foreign_keys(tables: list[str]) -> None:
    """Raise IntegrityError if a foreign key from or to one of ``tables`` is broken.

    One query per constraint over the whole table, for loads that ran with every trigger off
    (a row-by-row check of 100k rows costs more than all of these together).
    """
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT k.conname, k.conrelid::regclass::text, k.confrelid::regclass::text,
                   array(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY AS u(n, i)
                         JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n
                         ORDER BY u.i),
                   array(SELECT a.attname FROM unnest(k.confkey) WITH ORDINALITY AS u(n, i)
                         JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.n
                         ORDER BY u.i)
            FROM pg_constraint k
            JOIN pg_class c ON c.oid = k.conrelid
            JOIN pg_class p ON p.oid = k.confrelid
            WHERE k.contype = 'f' AND (
                (c.relname = ANY(%s) AND pg_table_is_visible(c.oid))
                OR (p.relname = ANY(%s) AND pg_table_is_visible(p.oid))
            )
            """,
            [tables, tables],
        )
        for name, table, parent, child_columns, parent_columns in cursor.fetchall():
            present = " AND ".join(f"c.{quote(column)} IS NOT NULL" for column in child_columns)
            match = " AND ".join(
                f"p.{quote(theirs)} = c.{quote(ours)}"
                for ours, theirs in zip(child_columns, parent_columns, strict=True)
            )
            cursor.execute(
                f"SELECT 1 FROM {table} c WHERE {present} "
                f"AND NOT EXISTS (SELECT 1 FROM {parent} p WHERE {match}) LIMIT 1"
            )
            if cursor.fetchone() is not None:
                raise IntegrityError(
                    FOREIGN_KEY_BROKEN.format(
                        table=table,
                        parent=parent,
                        constraint=name,
                        columns=", ".join(child_columns),
                    )
                )


def _sqlite_drop_triggers(
    tables: list[str], mentioning: list[str] | None = None
) -> list[tuple[str, str]]:
    """Drop the search triggers of ``tables`` (those whose SQL names one of ``mentioning``,
    if given); return (name, CREATE statement) of each."""
    if not tables:
        return []
    pattern = TRIGGER_PREFIX.replace("_", r"\_") + "%"
    marks = ", ".join(["%s"] * len(tables))
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
            rf"AND name LIKE %s ESCAPE '\' AND tbl_name IN ({marks})",
            [pattern, *tables],
        )
        found = [
            (name, sql)
            for name, sql in cursor.fetchall()
            if mentioning is None or any(other in sql for other in mentioning)
        ]
        for name, _ in found:
            cursor.execute(f"DROP TRIGGER {connection.ops.quote_name(name)}")
    return found


def _sqlite_fts_rebuild(cursor: CursorWrapper, name: str) -> None:
    """Fill the FTS5 table ``name`` from its content table, ``FTS5_HASHSIZE`` at a time.

    FTS5 writes a segment each time the terms it holds pass ``hashsize`` (1 MiB by default) and
    keeps merging them; a larger size for the rebuild writes far fewer (the rebuild of 10k
    sessions' output: about 1.5 s instead of 2.7 s). The table's own setting is put back.
    """
    quote = connection.ops.quote_name
    cursor.execute(f"SELECT v FROM {quote(name + '_config')} WHERE k = 'hashsize'")
    found = cursor.fetchone()
    previous = int(found[0]) if found else FTS5_DEFAULT_HASHSIZE
    setting = f"INSERT INTO {quote(name)}({quote(name)}, rank) VALUES ('hashsize', %s)"
    cursor.execute(setting, [max(previous, FTS5_HASHSIZE)])
    cursor.execute(f"INSERT INTO {quote(name)}({quote(name)}) VALUES ('rebuild')")
    cursor.execute(setting, [previous])


def _sqlite_fts_over(tables: list[str]) -> list[str]:
    """Return the FTS5 tables whose external content is one of ``tables``."""
    if not tables:
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND sql LIKE %s",
            ["CREATE VIRTUAL TABLE % USING fts5%"],
        )
        found = cursor.fetchall()
    return [
        name
        for name, sql in found
        if (match := FTS5_CONTENT.search(sql or "")) and match.group(1) in tables
    ]


def _pg_disable_triggers(tables: list[str]) -> list[tuple[str, str]]:
    """Disable the search triggers of ``tables``; return (table, trigger) of each."""
    pattern = TRIGGER_PREFIX.replace("_", r"\_") + "%"
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "WHERE NOT t.tgisinternal AND t.tgname LIKE %s AND c.relname = ANY(%s) "
            "AND pg_table_is_visible(c.oid)",
            [pattern, tables],
        )
        found = cursor.fetchall()
        quote = connection.ops.quote_name
        try:
            with transaction.atomic():  # a savepoint: without owner rights, keep them on
                for table, name in found:
                    cursor.execute(f"ALTER TABLE {quote(table)} DISABLE TRIGGER {quote(name)}")
        except DatabaseError as exc:
            logger.warning("search triggers stay on during the load (slower): %s", exc)
            return []
    return found


def _pg_drop_indexes(tables: list[str]) -> list[str]:
    """Drop the indexes of ``tables`` that back no constraint; return how to create them."""
    if not tables:
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
            "WHERE c.relname = ANY(%s) AND pg_table_is_visible(c.oid) "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)",
            [tables],
        )
        found = cursor.fetchall()
        try:
            with transaction.atomic():  # a savepoint: without owner rights, keep them
                for name, _ in found:
                    cursor.execute(f"DROP INDEX {name}")
        except DatabaseError as exc:
            logger.warning("search indexes stay during the load (slower): %s", exc)
            return []
    return [definition for _, definition in found]

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
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from django.db import DatabaseError, connection, transaction
from django.db.backends.utils import CursorWrapper

logger = logging.getLogger(__name__)

TRIGGER_PREFIX = "searchdoc_"
# Memory for building the deferred indexes (PostgreSQL, this transaction only).
INDEX_BUILD_MEMORY = "256MB"
FTS5_HASHSIZE = 64 * 1024 * 1024  # bytes of terms FTS5 holds before writing a segment
FTS5_DEFAULT_HASHSIZE = 1024 * 1024  # SQLite's, for a table that never set its own
FTS5_CONTENT = re.compile(r"content\s*=\s*['\"]?([A-Za-z0-9_]+)", re.IGNORECASE)


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


@contextmanager
def triggers_off(tables: list[str], derived_tables: list[str] | None = None) -> Iterator[None]:
    """Turn the search triggers of ``tables`` off, then on again and rebuild the index.

    The derived tables' own triggers and indexes are deferred the same way and built once
    after the rebuild. Run inside a transaction: an error in between rolls it all back too.
    """
    derived_tables = list(derived_tables or [])
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
        off.triggers = _pg_disable_triggers(tables)
        off.indexes = _pg_drop_indexes(derived_tables)
    yield
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
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
    rebuilt = _rebuild()
    with connection.cursor() as cursor:
        for name in off.fts:
            _sqlite_fts_rebuild(cursor, name)
        for _, sql in off.derived_triggers:
            cursor.execute(sql)
        if off.indexes:
            # As above: the rebuild's foreign-key checks are pending; CREATE INDEX waits for none.
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
            cursor.execute("SET CONSTRAINTS ALL DEFERRED")
            cursor.execute(f"SET LOCAL maintenance_work_mem = '{INDEX_BUILD_MEMORY}'")
        for statement in off.indexes:
            cursor.execute(statement)
    logger.info(
        "search triggers off during the load: %d; index rebuilt: %s; deferred indexes: %d; "
        "FTS5 tables rebuilt: %d",
        len(off.triggers) + len(off.derived_triggers),
        rebuilt,
        len(off.indexes),
        len(off.fts),
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

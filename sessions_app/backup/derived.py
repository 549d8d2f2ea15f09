"""Derived data during a restore: the search index is rebuilt once, not row by row.

The search triggers (``searchdoc_*``, migration 0004_search) write a search document for every
chunk, event and session inserted; over a restore's bulk load that costs more than the load.
Inside the restore's transaction they are dropped (SQLite) or disabled (PostgreSQL) on the
tables being loaded, and ``search_index_rebuild`` writes the index in one statement afterwards.
Triggers of any other name are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import DatabaseError, connection, transaction

logger = logging.getLogger(__name__)

TRIGGER_PREFIX = "searchdoc_"


def _rebuild() -> int | None:
    try:
        from sessions_app.search.index import search_index_rebuild
    except ImportError:  # no search index in this code
        return None
    return search_index_rebuild()


@contextmanager
def triggers_off(tables: list[str]) -> Iterator[None]:
    """Turn the search triggers of ``tables`` off, then on again and rebuild the index.

    Run inside a transaction: an error in between rolls the trigger changes back too.
    """
    quote = connection.ops.quote_name
    pattern = TRIGGER_PREFIX.replace("_", r"\_") + "%"
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            marks = ", ".join(["%s"] * len(tables))
            cursor.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
                rf"AND name LIKE %s ESCAPE '\' AND tbl_name IN ({marks})",
                [pattern, *tables],
            )
            found = cursor.fetchall()
            for name, _ in found:
                cursor.execute(f"DROP TRIGGER {quote(name)}")
        elif connection.vendor == "postgresql":
            cursor.execute(
                "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                "WHERE NOT t.tgisinternal AND t.tgname LIKE %s AND c.relname = ANY(%s) "
                "AND pg_table_is_visible(c.oid)",
                [pattern, tables],
            )
            found = cursor.fetchall()
            try:
                with transaction.atomic():  # a savepoint: without owner rights, keep them on
                    for table, name in found:
                        cursor.execute(f"ALTER TABLE {quote(table)} DISABLE TRIGGER {quote(name)}")
            except DatabaseError as exc:
                logger.warning("search triggers stay on during the load (slower): %s", exc)
                found = []
        else:
            found = []
    yield
    with connection.cursor() as cursor:
        if found and connection.vendor == "postgresql":
            # Deferred foreign-key checks are pending trigger events, which ALTER TABLE refuses
            # to run over: check them now (a violation still rolls the restore back).
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
            cursor.execute("SET CONSTRAINTS ALL DEFERRED")
        for first, second in found:
            if connection.vendor == "sqlite":
                cursor.execute(second)
            else:
                cursor.execute(f"ALTER TABLE {quote(first)} ENABLE TRIGGER {quote(second)}")
    rebuilt = _rebuild()
    logger.info("search triggers off during the load: %d; index rebuilt: %s", len(found), rebuilt)

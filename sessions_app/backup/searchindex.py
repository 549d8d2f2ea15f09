"""The search index in an archive (PostgreSQL): the documents as one binary COPY stream.

The documents are derived from the sessions, events and output (migration 0004_search), so the
portable form leaves them out and a restore can always write them again. On PostgreSQL that
means ``to_tsvector`` over all the stored text, 15-33 s at 10k sessions; the stored vectors load
in about a second. So an archive made on PostgreSQL also holds the documents as they are, every
column including ``vector``, as ``COPY ... TO STDOUT (FORMAT BINARY)`` wrote them, gzipped; a
restore loads them when they fit: PostgreSQL of the same major version (binary COPY's formats),
the same migrations as the archive (the same columns, and vectors made the same way), and the
same columns and types in the table. Otherwise it rebuilds the index, as a version 1 archive's
restore always did.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from django.core.management.color import no_style
from django.db import connection, transaction

from sessions_app.backup import pgcopy

MEMBER = "derived/sessions_app.searchdocument.pgcopy.gz"  # gzip; zstd: ``member_name``
FORMAT = pgcopy.FORMAT
MODEL = "sessions_app.searchdocument"
LEFT_OUT = "left out on request"
NOT_HERE = "kept only on PostgreSQL (SQLite rebuilds its FTS5 index from the restored output)"


def _table() -> str:
    from sessions_app.models import SearchDocument

    return SearchDocument._meta.db_table


def columns() -> list[list[str]]:
    """Return the documents table's stored columns as [name, type], in table order."""
    return pgcopy.table_columns(_table())


def member_name(codec: str) -> str:
    """Return the member's name in an archive, compressed by ``codec`` (gzip or zstd)."""
    return MEMBER if codec == "gzip" else MEMBER.removesuffix(".gz") + ".zst"


def write(path: Path, codec: str = "gzip") -> dict[str, Any]:
    """Write the documents to ``path`` (compressed by ``codec``); return the manifest's
    ``search_index`` entry."""
    from sessions_app.backup.portable import compressor

    found = columns()
    names = [name for name, _ in found]
    with path.open("wb") as out, compressor(out, codec=codec) as writer:
        rows = pgcopy.copy_out(_table(), names, writer)
    return {
        "model": MODEL,
        "member": member_name(codec),
        "compression": codec,
        "format": FORMAT,
        "table": _table(),
        "columns": found,
        "rows": rows,
        "server_version": pgcopy.server_version(),
    }


def start(
    path: Path,
    snapshot: str | None,
    codec: str = "gzip",
    then: Callable[[], None] | None = None,
) -> Future:
    """Write the documents to ``path`` in a thread of its own, on a connection of its own that
    reads ``snapshot`` (the backup's: the same data as the rest of the archive); the future's
    result is the manifest entry. Beside the JSON export: it is mostly the server's work and
    the compressor's, which lets go of the GIL. ``then`` is called when that connection is
    closed (its lock on the documents let go), whether or not it succeeded."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="backup-index")

    def run() -> dict[str, Any]:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                if snapshot:
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    cursor.execute("SET TRANSACTION SNAPSHOT %s", [snapshot])
                return write(path, codec)
        finally:
            connection.close()  # this thread's own
            if then is not None:
                then()

    future = pool.submit(run)
    pool.shutdown(wait=False)
    return future


def absent(reason: str) -> dict[str, Any]:
    return {"model": MODEL, "member": None, "reason": reason}


def unusable(entry: dict[str, Any] | None, same_migrations: bool) -> str | None:
    """Return why the archive's documents cannot be loaded here, or None if they can."""
    if not entry or not entry.get("member"):
        return (entry or {}).get("reason") or "the archive has no search index"
    if connection.vendor != "postgresql" or entry.get("format") != FORMAT:
        return f"stored as {entry.get('format')}, this database is {connection.vendor}"
    if entry["server_version"] // 10000 != pgcopy.server_version() // 10000:
        return f"made on PostgreSQL {entry['server_version'] // 10000}"
    if not same_migrations:
        return "made with other migrations"
    if entry["columns"] != columns():
        return "the documents table has other columns"
    return None


def loader(member: IO[bytes], entry: dict[str, Any]) -> Callable[[], int]:
    """Return what loads the archive's documents (with their triggers off); it returns how
    many there are."""
    from sessions_app.backup.portable import inflated
    from sessions_app.models import SearchDocument

    def load() -> int:
        pgcopy.copy_in(entry["table"], [name for name, _ in entry["columns"]], inflated(member))
        # The documents came with their ids: the triggers' next document takes an id past
        # them, not one the database had counted to before (a fresh database: 1).
        reset = connection.ops.sequence_reset_sql(no_style(), [SearchDocument])
        with connection.cursor() as cursor:
            for statement in reset:
                cursor.execute(statement)
            cursor.execute(f"SELECT count(*) FROM {connection.ops.quote_name(entry['table'])}")
            return cursor.fetchone()[0]

    return load

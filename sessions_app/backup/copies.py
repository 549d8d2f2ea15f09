"""An archive's rows as PostgreSQL binary COPY streams: the safety backup's form there, and in
every archive made there beside the portable form (``start``: from the same snapshot).

A restore on PostgreSQL first backs up the data it replaces (``services``). In the portable
form that is every row encoded to JSON by Python, about as long as the restore's own load and
on the same two cores; and it left the search documents out, so restoring it (undoing a
restore) computed ``to_tsvector`` over all the text again. As binary COPY the rows are the
server's work, compressed by zstd threads that let go of the GIL, and the documents come along
as the search index member (``searchindex``) does.

Binary COPY carries each value in its type's own binary format, and ids as they are. So an
archive's copies load only where they mean the same rows: PostgreSQL of the same major version,
the same migrations, each table with the same columns of the same types, and the same content
type and permission ids (rows refer to them by id, where the portable form uses natural keys).
A safety backup restored into the database it was taken from meets all of these; anywhere else
``unusable`` says which one it does not. An ordinary archive restored where they do not fit
loads its portable form instead: the server's ``COPY`` takes the copies as they are, where the
portable form is decoded and formatted by Python, about a CPU-second at 10k sessions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import orjson
from django.db import connection, models, transaction

from sessions_app.backup import archive, pgcopy, portable

FORMAT = pgcopy.FORMAT
# Their compression (archive version 4; 3 wrote gzip, which restore still reads): zstd level 1
# writes them in less than half gzip level 1's time and size (10k sessions: 29 MiB where gzip
# wrote 69), while the restore they are the safety backup of waits for them.
CODEC = "zstd"
ONLY_COPIES = (
    "{file}: the archive holds its rows only as PostgreSQL binary COPY (a safety backup), "
    "which loads only into the database it was taken from or one just like it, and {why}; "
    "nothing changed."
)


def member_name(n: int, model: type[models.Model]) -> str:
    return f"copy/{n:03d}-{model._meta.label_lower}.pgcopy.zst"


def describe() -> dict[str, Any]:
    """Return the manifest's ``copies`` entry: what the copies need of a database to load."""
    return {
        "format": FORMAT,
        "compression": CODEC,
        "server_version": pgcopy.server_version(),
        "natural_keys": natural_keys(),
    }


def natural_keys() -> str:
    """Return a digest of this database's content type and permission ids and what they name."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, app_label, model FROM django_content_type ORDER BY id")
        content_types = cursor.fetchall()
        cursor.execute("SELECT id, content_type_id, codename FROM auth_permission ORDER BY id")
        permissions = cursor.fetchall()
    return hashlib.sha256(orjson.dumps([content_types, permissions])).hexdigest()


def write(
    model: type[models.Model], path: Path, compress: Callable[[IO[bytes]], Any]
) -> list[list[str]]:
    """Write ``model``'s rows to ``path`` (binary COPY through ``compress``); return
    their columns, as [name, type] (as the database has them)."""
    table = model._meta.db_table
    found = pgcopy.table_columns(table)
    with path.open("wb") as out, compress(out) as writer:
        pgcopy.copy_out(table, [name for name, _ in found], writer)
    return found


def start(
    models_at: list[tuple[type[models.Model], Path]],
    snapshot: str,
    compress: Callable[[IO[bytes]], Any],
) -> Future[list[list[list[str]]]]:
    """Write each model's copy to its path (``write``) in a thread of its own, on a connection
    of its own that reads ``snapshot`` (the backup's: the same data as the portable form it is
    written beside, mostly the server's and the compressor's work, which let go of the GIL).
    The future's result is each model's columns, in order."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="backup-copies")

    def run() -> list[list[list[str]]]:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                cursor.execute("SET TRANSACTION SNAPSHOT %s", [snapshot])
                return [write(model, path, compress) for model, path in models_at]
        finally:
            connection.close()  # this thread's own

    future = pool.submit(run)
    pool.shutdown(wait=False)
    return future


def unusable(
    manifest: dict[str, Any], same_migrations: bool, current: list[type[models.Model]]
) -> str | None:
    """Return why the archive's copies cannot be loaded here, or None if they can."""
    described = manifest.get("copies")
    if not described:
        return "it holds no binary copies"
    if connection.vendor != "postgresql" or described.get("format") != FORMAT:
        return f"this database is {connection.vendor}"
    made, here = described["server_version"] // 10000, pgcopy.server_version() // 10000
    if made != here:
        return f"it was made on PostgreSQL {made}, this is {here}"
    if not same_migrations:
        return "its migrations are not this database's"
    if described["natural_keys"] != natural_keys():
        return "its content type and permission ids are not this database's"
    tables = {model._meta.label_lower: model._meta.db_table for model in current}
    for entry in manifest["models"]:
        copied = entry.get("copy")
        if copied is None:
            return f"{entry['model']} has no binary copy"
        table = tables.get(entry["model"])
        if table is not None and copied["columns"] != pgcopy.table_columns(table):
            return f"{table} has other columns here"
    return None


def loader(
    opened: archive.Archive, model: type[models.Model], entry: dict[str, Any]
) -> Callable[[portable.Progress], portable.LoadReport]:
    """Return what loads ``model``'s copy (with the restore's triggers off) and reports it."""

    def load(progress: portable.Progress) -> portable.LoadReport:
        copied = entry["copy"]
        names = [name for name, _ in copied["columns"]]
        blocks = portable.inflated(opened.member(copied["member"]))
        pgcopy.copy_in(model._meta.db_table, names, blocks)
        progress(entry["rows"])
        return portable.LoadReport(model._meta.label_lower, rows=entry["rows"])

    return load

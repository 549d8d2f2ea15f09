"""PostgreSQL's binary COPY for a backup's rows: parsed and formatted in C by psycopg.

In the text form a binary column travels as hex (twice its size, encoded by the server and
decoded by the client, or the other way round) and every value is formatted and parsed as text;
the binary form carries values as they are. Only for columns whose Python values are the same
either way (``portable.binary_copy_ok``); the others keep Django's query and the text COPY.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from django.db import connection

# An archive member of binary COPY data (``searchindex``, ``copies``).
FORMAT = "postgresql-binary-copy"
# Rows per progress report while streaming.
BATCH_ROWS = 1000


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(connection.ops.quote_name(name) for name in names)


def column_types(table: str, names: list[str]) -> list[int]:
    """Return the type OIDs of ``table``'s columns ``names``, in that order, as the database
    has them (not as the model says: a migration may have changed a type since)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT attname, atttypid FROM pg_attribute WHERE attrelid = %s::regclass "
            "AND attnum > 0 AND NOT attisdropped",
            [connection.ops.quote_name(table)],
        )
        found = dict(cursor.fetchall())
    missing = [name for name in names if name not in found]
    if missing:
        raise LookupError(f"{table} has no column {', '.join(missing)}")
    return [found[name] for name in names]


def table_columns(table: str) -> list[list[str]]:
    """Return ``table``'s stored columns (not generated ones) as [name, type], in table order."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
            "AND attgenerated = '' ORDER BY attnum",
            [connection.ops.quote_name(table)],
        )
        return [[name, kind] for name, kind in cursor.fetchall()]


def read(table: str, names: list[str], order_by: str) -> Iterator[tuple[Any, ...]]:
    """Yield the rows of ``table`` (columns ``names``, ordered by ``order_by``) as tuples."""
    types = column_types(table, names)
    quote = connection.ops.quote_name
    sql = (
        f"COPY (SELECT {_quoted(names)} FROM {quote(table)} ORDER BY {quote(order_by)}) "
        "TO STDOUT (FORMAT BINARY)"
    )
    with connection.cursor() as cursor, cursor.cursor.copy(sql) as copy:
        copy.set_types(types)
        yield from copy.rows()


def copy_sql(table: str, names: list[str], *, binary: bool) -> str:
    """Return the ``COPY ... FROM STDIN`` loading ``table``'s columns ``names``."""
    form = " (FORMAT BINARY)" if binary else ""
    return f"COPY {connection.ops.quote_name(table)} ({_quoted(names)}) FROM STDIN{form}"


def write(
    table: str, names: list[str], rows: Iterable[list[Any]], done: Callable[[int], None]
) -> None:
    """Insert ``rows`` (Python values in ``names`` order) into ``table``; call ``done`` every
    ``BATCH_ROWS`` rows."""
    types = column_types(table, names)
    with (
        connection.cursor() as cursor,
        cursor.cursor.copy(copy_sql(table, names, binary=True)) as copy,
    ):
        copy.set_types(types)
        write_rows(copy, rows, done)


def write_rows(copy: Any, rows: Iterable[Any], done: Callable[[int], None]) -> None:
    """Write ``rows`` to a psycopg ``Copy``; call ``done`` every ``BATCH_ROWS`` rows and for
    the rest at the end."""
    count = 0
    for values in rows:
        copy.write_row(values)
        count += 1
        if count == BATCH_ROWS:
            done(count)
            count = 0
    done(count)


def copy_out(table: str, names: list[str], out: IO[bytes]) -> int:
    """Write ``table``'s rows as one binary COPY stream to ``out``; return how many."""
    sql = f"COPY {connection.ops.quote_name(table)} ({_quoted(names)}) TO STDOUT (FORMAT BINARY)"
    with connection.cursor() as cursor:
        with cursor.cursor.copy(sql) as copy:
            buffer: list[bytes] = []
            size = 0
            for block in copy:
                buffer.append(bytes(block))
                size += len(block)
                if size >= 1024 * 1024:
                    out.write(b"".join(buffer))
                    buffer, size = [], 0
            if buffer:
                out.write(b"".join(buffer))
        return cursor.cursor.rowcount


def copy_in(table: str, names: list[str], blocks: Iterable[bytes]) -> None:
    """Load a binary COPY stream of ``table``'s columns ``names`` (from ``copy_out``)."""
    sql = f"COPY {connection.ops.quote_name(table)} ({_quoted(names)}) FROM STDIN (FORMAT BINARY)"
    with connection.cursor() as cursor, cursor.cursor.copy(sql) as copy:
        for block in blocks:
            copy.write(block)


def server_version() -> int:
    """Return the server's version number (``server_version_num``: 150020 for 15.20)."""
    return int(connection.pg_version)  # type: ignore[attr-defined]

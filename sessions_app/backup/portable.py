"""The portable form of a backup: one JSON-lines member per model, loadable into either engine.

Each line is one row: an object keyed by column attname. Binary columns are base64, dates and
times ISO 8601, decimals and UUIDs strings, JSON columns their JSON. Foreign keys to content
types and permissions (ids that ``migrate`` assigns differently in every database) are stored
by natural key: ``[app_label, model]`` and ``[app_label, model, codename]``.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import IO, Any

import orjson
import pybase64
import zstandard
from django.apps import apps
from django.conf import settings
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.core.management.color import no_style
from django.db import DEFAULT_DB_ALIAS, connection, connections, models
from django.utils.dateparse import parse_duration
from django.utils.duration import duration_iso_string
from isal import isal_zlib

from sessions_app.backup import pgcopy

# Models a backup leaves out, and why (shown by ``backup verify`` and in the manifest).
SKIPPED = {
    "contenttypes.contenttype": "recreated by migrate; references are stored by natural key",
    "auth.permission": "recreated by migrate; links to permissions are stored by natural key",
    "sessions.session": "login sessions: everyone signs in again after a restore",
}
# Models whose rows the database derives from others (triggers): not stored, rebuilt on load.
DERIVED = {
    "sessions_app.searchdocument": "the search index, rebuilt from the restored sessions, "
    "events and output once they are loaded (in the form the restoring engine keeps it)",
}
BATCH_ROWS = 1000
COMPRESS_THREADS = 4
GZIP_WBITS = 31  # zlib's gzip container: header, deflate, CRC-32 and size
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # the first bytes of a zstd frame
ZSTD_LEVEL = 1
MISSING = object()  # a natural key this database does not have

Progress = Callable[[int], None]


def backup_models() -> list[type[models.Model]]:
    """Return every model whose rows a backup holds, each after the models it refers to."""
    found = [
        model
        for model in apps.get_models(include_auto_created=True)
        if model._meta.managed
        and not model._meta.proxy
        and model._meta.label_lower not in SKIPPED
        and model._meta.label_lower not in DERIVED
    ]
    return dependency_order(found)


def derived_models() -> list[type[models.Model]]:
    """Return the models of DERIVED this code has: emptied before a restore loads, not loaded."""
    return [m for m in apps.get_models() if m._meta.label_lower in DERIVED]


def dependency_order(found: list[type[models.Model]]) -> list[type[models.Model]]:
    """Order ``found`` so that each model comes after those its foreign keys point at."""
    remaining = list(found)
    ordered: list[type[models.Model]] = []
    while remaining:
        for model in remaining:
            parents = {
                f.related_model
                for f in model._meta.concrete_fields
                if f.is_relation and f.related_model is not model
            }
            if not any(parent in remaining for parent in parents):
                break
        else:  # a cycle: take the first; foreign keys are deferred to the commit on both engines
            model = remaining[0]
        ordered.append(model)
        remaining.remove(model)
    return ordered


def columns(model: type[models.Model]) -> list[models.Field]:
    """Return the stored columns of ``model`` a backup carries (generated ones are computed)."""
    return [f for f in model._meta.concrete_fields if not getattr(f, "generated", False)]


def _natural_keys(using: str) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    content_types = {
        pk: [app, model]
        for pk, app, model in ContentType.objects.using(using).values_list(
            "pk", "app_label", "model"
        )
    }
    permissions = {
        pk: [*content_types.get(ct, ["?", "?"]), codename]
        for pk, ct, codename in Permission.objects.using(using).values_list(
            "pk", "content_type", "codename"
        )
    }
    return content_types, permissions


def dumps(row: dict[str, Any]) -> bytes:
    """Return one JSON line's bytes (orjson; the standard library for what orjson refuses,
    integers past 64 bits in a JSON column)."""
    try:
        return orjson.dumps(row)
    except TypeError:
        return json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode()


def _encoder(column: models.Field, keys: tuple[dict, dict]) -> Callable[[Any], Any] | None:
    """Return how to write ``column``'s values to JSON, or None when they go as they are."""
    if column.is_relation and column.related_model is ContentType:
        return lambda value: None if value is None else keys[0].get(value)
    if column.is_relation and column.related_model is Permission:
        return lambda value: None if value is None else keys[1].get(value)
    kind = column.get_internal_type()
    if kind == "BinaryField":
        # pybase64 (SIMD): 14 times binascii's speed here, the same text.
        return lambda value: None if value is None else pybase64.b64encode(value).decode("ascii")
    if kind in ("DateTimeField", "DateField", "TimeField"):
        return lambda value: None if value is None else value.isoformat()
    if kind in ("DecimalField", "UUIDField"):
        return lambda value: None if value is None else str(value)
    if kind == "DurationField":
        return lambda value: None if value is None else duration_iso_string(value)
    return None


@dataclass
class Export:
    model: str
    table: str
    rows: int
    fields: list[str]


def binary_copy_ok(column: models.Field) -> bool:
    """Whether ``column``'s values read by PostgreSQL's binary COPY are what Django's query
    returns: the exact built-in integer, text, boolean, binary and (aware) time fields, and
    foreign keys to them."""
    field = column
    if type(column) in (models.ForeignKey, models.OneToOneField):
        field = column.target_field
    kind = type(field)
    if kind is models.DateTimeField:
        return bool(settings.USE_TZ)
    return kind in _PLAIN or kind is models.BinaryField


def rows_of(
    model: type[models.Model], using: str = DEFAULT_DB_ALIAS, names: list[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Yield every row of ``model`` in the portable form (a dict by attname), by primary key.

    ``names`` limits the columns (a native copy of an older schema lacks some).
    """
    cols = [c for c in columns(model) if names is None or c.attname in names]
    names = [c.attname for c in cols]
    keys = _natural_keys(using)
    encoders = [_encoder(c, keys) for c in cols]
    database = connections[using]
    plain_copy = all(binary_copy_ok(c) for c in cols)
    if using == DEFAULT_DB_ALIAS and database.vendor == "postgresql" and plain_copy:
        # Read in C by psycopg, bytes as they are (not hex), and not through a server-side
        # cursor's FETCH per batch: the export of the output chunks in about half the time.
        found: Iterator[tuple[Any, ...]] = pgcopy.read(
            model._meta.db_table, [c.column for c in cols], model._meta.pk.column
        )
    else:
        query = model._base_manager.using(using).order_by("pk").values_list(*names)
        found = query.iterator(chunk_size=2000)
    plain = [(n, enc) for n, enc in zip(names, encoders, strict=True)]
    for values in found:
        yield {n: v if enc is None else enc(v) for (n, enc), v in zip(plain, values, strict=True)}


def export_model(model: type[models.Model], out: IO[bytes], progress: Progress) -> Export:
    """Write every row of ``model`` as gzipped JSON lines to ``out``; return what was written."""
    names = [c.attname for c in columns(model)]
    rows = 0
    with _Compressor(out) as writer:
        for row in rows_of(model):
            writer.write(dumps(row))
            writer.write(b"\n")
            rows += 1
            if rows % BATCH_ROWS == 0:
                progress(BATCH_ROWS)
    progress(rows % BATCH_ROWS)
    return Export(model._meta.label_lower, model._meta.db_table, rows, names)


class _Compressor:
    """Gzip level 1 on every core: each block of about 1 MiB is compressed by a thread pool
    into a gzip member of its own, and the members are written in order. A file of several
    members is one gzip stream to every reader (``gzip``, ``zcat``, version 1 of this code).
    The deflate is Intel's ISA-L (``isal``): the same gzip format, 4.4 times zlib's level 1
    here (1040 against 235 MB/s on terminal output, the same size), which made compressing
    most of ``backup create``'s CPU time. It lets go of the GIL, so blocks compress side by
    side and beside the encoding of the next rows, where one stream could use one core only.
    ``codec="zstd"``: zstd level 1 frames instead (one stream to ``zstd -d``; for PostgreSQL's
    binary copies, more than twice as fast as zlib's gzip here, and less than half the size)."""

    BLOCK = 1024 * 1024

    def __init__(self, out: IO[bytes], workers: int | None = None, codec: str = "gzip") -> None:
        self.compress = _zstd_block if codec == "zstd" else _gzip_block
        self.out = out
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.members = 0
        self.workers = workers or max(1, min(COMPRESS_THREADS, os.cpu_count() or 1))
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="backup-gzip")
        self.pending: deque[Future[bytes]] = deque()

    def write(self, data: bytes) -> None:
        self.buffer.append(data)
        self.buffered += len(data)
        if self.buffered >= self.BLOCK:
            self._put()

    def _put(self) -> None:
        block = b"".join(self.buffer)
        self.buffer, self.buffered = [], 0
        self.pending.append(self.pool.submit(self.compress, block))
        self.members += 1
        while len(self.pending) > 2 * self.workers:  # bounded: memory stays a few blocks
            self.out.write(self.pending.popleft().result())

    def __enter__(self) -> _Compressor:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                if self.buffer or not self.members:  # an empty model is one empty member
                    self._put()
                while self.pending:
                    self.out.write(self.pending.popleft().result())
        finally:
            for future in self.pending:
                future.cancel()
            self.pool.shutdown(wait=True)


def read_rows(
    member: IO[bytes], model: type[models.Model] | None = None
) -> Iterator[dict[str, Any]]:
    """Yield the rows of a gzipped JSON-lines member (one gzip member or several).

    orjson decodes them, except for a model with a JSON column: orjson reads an integer past
    64 bits as a float, and a JSON column may hold one; the standard library keeps it exact.
    """
    exact = model is None or any(
        c.get_internal_type() == "JSONField" for c in model._meta.concrete_fields
    )
    loads = json.loads if exact else orjson.loads
    for line in _lines(_Decompressed(member)):
        yield loads(line)


def inflated(member: IO[bytes]) -> Iterator[bytes]:
    """Yield the decompressed bytes of a gzip stream in blocks (one gzip member or several)."""
    return iter(_Decompressed(member))


def compressor(out: IO[bytes], workers: int | None = None, codec: str = "gzip") -> _Compressor:
    """Return a writer that gzips (or ``codec``: zstd) what it is given to ``out`` on every
    core (or ``workers`` threads)."""
    return _Compressor(out, workers, codec)


def _gzip_block(block: bytes) -> bytes:
    return isal_zlib.compress(block, 1, GZIP_WBITS)


_zstd = threading.local()  # a compressor per thread: one is not to be shared between them


def _zstd_block(block: bytes) -> bytes:
    if not hasattr(_zstd, "compressor"):
        _zstd.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return _zstd.compressor.compress(block)


def _lines(blocks: Iterator[bytes]) -> Iterator[bytes]:
    tail = b""
    for block in blocks:
        lines = (tail + block).split(b"\n") if tail else block.split(b"\n")
        tail = lines.pop()
        yield from lines
    if tail:
        yield tail


class _Decompressed:
    """The decompressed bytes of a gzip (or zstd: by its first bytes) stream, inflated by a
    thread of its own one block ahead (ISA-L's inflate, about twice zlib's, and zstd let go of
    the GIL: inflating overlaps with decoding and inserting rows)."""

    READ = 1024 * 1024

    def __init__(self, member: IO[bytes]) -> None:
        self.member = member
        self.blocks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=4)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="backup-gunzip", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            raw = self.member.read(self.READ)
            zstd = raw.startswith(ZSTD_MAGIC)
            start: Callable[[], Any] = (
                zstandard.ZstdDecompressor().decompressobj
                if zstd
                else partial(isal_zlib.decompressobj, GZIP_WBITS)
            )
            inflate, fed = start(), False
            while not self.stop.is_set() and raw:
                while raw:
                    block, fed = inflate.decompress(raw), True
                    if block:
                        self.blocks.put(block)
                    if not inflate.eof:
                        break
                    raw = inflate.unused_data  # the next member (frame) starts here
                    inflate, fed = start(), False
                raw = self.member.read(self.READ)
            if fed and not self.stop.is_set():
                where = "a zstd frame" if zstd else "a gzip member"
                raise EOFError(f"the stream ends inside {where}: it is cut short")
            self.blocks.put(None)
        except BaseException as exc:  # handed to the reader
            self.blocks.put(exc)

    def __iter__(self) -> Iterator[bytes]:
        try:
            while (block := self.blocks.get()) is not None:
                if isinstance(block, BaseException):
                    raise block
                yield block
        finally:
            self.stop.set()
            while self.thread.is_alive():  # let a thread blocked on a full queue end
                try:
                    self.blocks.get(timeout=0.1)
                except queue.Empty:
                    pass
            self.thread.join()


@dataclass
class LoadReport:
    model: str
    rows: int = 0
    dropped: list[str] = field(default_factory=list)  # why rows were left out
    defaulted: list[str] = field(default_factory=list)  # columns the archive lacks
    ignored: list[str] = field(default_factory=list)  # archive columns this code lacks


def _decoder(column: models.Field) -> Callable[[Any], Any]:
    if column.is_relation and column.related_model is ContentType:
        ids = {
            (a, m): pk for pk, a, m in ContentType.objects.values_list("pk", "app_label", "model")
        }
        return lambda value: None if value is None else ids.get(tuple(value), MISSING)
    if column.is_relation and column.related_model is Permission:
        ids = {
            (a, m, c): pk
            for pk, a, m, c in Permission.objects.values_list(
                "pk", "content_type__app_label", "content_type__model", "codename"
            )
        }
        return lambda value: None if value is None else ids.get(tuple(value), MISSING)
    kind = column.get_internal_type()
    if kind == "DurationField":
        return lambda value: None if value is None else parse_duration(value)
    if kind in ("BinaryField", "DateTimeField", "DateField", "TimeField", "DecimalField"):
        return lambda value: None if value is None else column.to_python(value)
    if kind == "UUIDField":
        return column.to_python
    return lambda value: value


def _default(column: models.Field) -> Any:
    if getattr(column, "auto_now", False) or getattr(column, "auto_now_add", False):
        from django.utils import timezone

        return timezone.now()
    return column.get_default()


# Field classes whose value in the archive is already what the database driver takes.
_PLAIN = (
    models.AutoField,
    models.BigAutoField,
    models.SmallAutoField,
    models.IntegerField,
    models.BigIntegerField,
    models.SmallIntegerField,
    models.PositiveIntegerField,
    models.PositiveSmallIntegerField,
    models.PositiveBigIntegerField,
    models.BooleanField,
    models.CharField,
    models.TextField,
    models.SlugField,
    models.EmailField,
)


def _quick(column: models.Field, database: Any) -> tuple[bool, Callable[[Any], Any] | None]:
    """Return (True, convert) when ``column``'s archived values need no Field machinery on the
    way to the database (``convert`` None: as they are), else (False, None).

    Only the exact built-in classes: a subclass may convert in ``get_prep_value``. Everything
    else, and naive times, go through ``to_python`` and ``get_db_prep_save`` as before.
    """
    field = column
    if type(column) in (models.ForeignKey, models.OneToOneField):
        if column.related_model in (ContentType, Permission):
            return False, None  # natural keys, and rows they drop
        field = column.target_field
    kind = type(field)
    if kind in _PLAIN:
        return True, None
    if kind is models.BinaryField:
        # pybase64 (SIMD): 7 times binascii's speed here; like it, it skips what is not base64.
        return True, lambda value: None if value is None else pybase64.b64decode(value)
    if kind is models.DateTimeField:
        adapt = database.ops.adapt_datetimefield_value
        slow = column.to_python

        def when(value: Any) -> Any:
            if value is None:
                return None
            moment = datetime.fromisoformat(value)
            if moment.tzinfo is None:  # as get_prep_value would: warn, then take it as local
                return column.get_db_prep_save(slow(value), database)
            return adapt(moment)

        return True, when
    return False, None


@dataclass
class LoadPlan:
    """How the archived rows of one model become database values (``load_plan``).

    Made where the connection may be used (decoders look natural keys up); ``values`` only
    converts, so it may run in another thread (``ahead``).
    """

    model: type[models.Model]
    report: LoadReport
    cols: list[models.Field]
    straight: bool  # every value goes from the archive to the driver as it is, or nearly
    steps: list[tuple[str, Callable[[Any], Any] | None]]
    decoders: list[Callable[[Any], Any]]
    defaults: dict[str, Any]
    database: Any  # the DatabaseWrapper the values are prepared for

    @property
    def binary_copy(self) -> bool:
        """Whether PostgreSQL's binary COPY takes these values (see ``pgcopy``)."""
        return self.straight and self.database.vendor == "postgresql" and settings.USE_TZ

    def values(self, rows: Iterator[dict]) -> Iterator[list[Any]]:
        """Yield each row's values in ``cols`` order; rows that cannot load are reported in
        ``report.dropped`` and left out."""
        if self.straight:
            steps = self.steps
            for row in rows:
                yield [row[n] if convert is None else convert(row[n]) for n, convert in steps]
            return
        model, report, database = self.model._meta.label_lower, self.report, self.database
        for row in rows:
            values = []
            for column, decode in zip(self.cols, self.decoders, strict=True):
                name = column.attname
                value = decode(row[name]) if name in row else self.defaults[name]
                if value is MISSING:  # a content type or permission this database lacks
                    if not column.null:
                        report.dropped.append(f"{model} {row}: {name}")
                        break
                    value = None
                values.append(column.get_db_prep_save(value, database))
            else:
                yield values


def load_plan(model: type[models.Model], archived_fields: list[str]) -> LoadPlan:
    """Return how to load ``model``'s rows archived with ``archived_fields``."""
    report = LoadReport(model._meta.label_lower)
    cols = columns(model)
    names = [c.attname for c in cols]
    report.defaulted = [n for n in names if n not in archived_fields]
    report.ignored = [n for n in archived_fields if n not in names]
    database = connections[DEFAULT_DB_ALIAS]
    quick = [_quick(c, database) for c in cols]
    # Most rows by far: every value goes straight from the archive to the database.
    straight = not report.defaulted and all(fast for fast, _ in quick)
    return LoadPlan(
        model=model,
        report=report,
        cols=cols,
        straight=straight,
        steps=[(name, convert) for name, (_, convert) in zip(names, quick, strict=True)],
        # Here, not while COPY holds the connection: decoders may look natural keys up.
        decoders=[] if straight else [_decoder(c) for c in cols],
        defaults={c.attname: _default(c) for c in cols if c.attname in report.defaulted},
        database=database,
    )


def load_model(
    model: type[models.Model], archived_fields: list[str], rows: Iterator[dict], progress: Progress
) -> LoadReport:
    """Insert ``rows`` into ``model``'s table with plain INSERTs: no save(), no auto_now."""
    plan = load_plan(model, archived_fields)

    def done(count: int) -> None:
        plan.report.rows += count
        progress(count)

    if plan.binary_copy:
        # Values as the driver takes them: binary COPY (see pgcopy), about twice as fast.
        pgcopy.write(model._meta.db_table, [c.column for c in plan.cols], plan.values(rows), done)
    else:
        _insert(model, plan.cols, plan.values(rows), done)
    return plan.report


def _insert(
    model: type[models.Model], cols: list[models.Field], rows: Iterator[list[Any]], done: Progress
) -> None:
    """Insert ``rows`` (database values in ``cols`` order); call ``done`` every batch."""
    quote = connection.ops.quote_name
    table = quote(model._meta.db_table)
    column_list = ", ".join(quote(c.column) for c in cols)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # COPY: one statement streaming every row, several times faster than INSERTs.
            with cursor.cursor.copy(f"COPY {table} ({column_list}) FROM STDIN") as copy:
                pgcopy.write_rows(copy, rows, done)
        else:
            sql = f"INSERT INTO {table} ({column_list}) VALUES ({', '.join(['%s'] * len(cols))})"
            batch: list[list[Any]] = []
            for values in rows:
                batch.append(values)
                if len(batch) >= BATCH_ROWS:
                    cursor.executemany(sql, batch)
                    done(len(batch))
                    batch = []
            if batch:
                cursor.executemany(sql, batch)
                done(len(batch))


def count_rows(model: type[models.Model]) -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {connection.ops.quote_name(model._meta.db_table)}")
        return cursor.fetchone()[0]


def delete_rows(model: type[models.Model]) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {connection.ops.quote_name(model._meta.db_table)}")


def reset_sequences(found: list[type[models.Model]]) -> None:
    """Point PostgreSQL's id sequences past the loaded ids (a no-op on SQLite)."""
    statements = connection.ops.sequence_reset_sql(no_style(), found)
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def write_member(model: type[models.Model], path: Path, progress: Progress) -> Export:
    with path.open("wb") as out:
        return export_model(model, out, progress)

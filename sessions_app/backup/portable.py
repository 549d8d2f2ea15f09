"""The portable form of a backup: one JSON-lines member per model, loadable into either engine.

Each line is one row: an object keyed by column attname. Binary columns are base64, dates and
times ISO 8601, decimals and UUIDs strings, JSON columns their JSON. Foreign keys to content
types and permissions (ids that ``migrate`` assigns differently in every database) are stored
by natural key: ``[app_label, model]`` and ``[app_label, model, codename]``.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from django.apps import apps
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.core.management.color import no_style
from django.db import connection, models
from django.utils.dateparse import parse_duration
from django.utils.duration import duration_iso_string

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


def _natural_keys() -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    content_types = {
        pk: [app, model]
        for pk, app, model in ContentType.objects.values_list("pk", "app_label", "model")
    }
    permissions = {
        pk: [*content_types.get(ct, ["?", "?"]), codename]
        for pk, ct, codename in Permission.objects.values_list("pk", "content_type", "codename")
    }
    return content_types, permissions


def _encoder(column: models.Field, keys: tuple[dict, dict]) -> Callable[[Any], Any]:
    if column.is_relation and column.related_model is ContentType:
        return lambda value: None if value is None else keys[0].get(value)
    if column.is_relation and column.related_model is Permission:
        return lambda value: None if value is None else keys[1].get(value)
    kind = column.get_internal_type()
    if kind == "BinaryField":
        return lambda value: None if value is None else base64.b64encode(value).decode("ascii")
    if kind in ("DateTimeField", "DateField", "TimeField"):
        return lambda value: None if value is None else value.isoformat()
    if kind in ("DecimalField", "UUIDField"):
        return lambda value: None if value is None else str(value)
    if kind == "DurationField":
        return lambda value: None if value is None else duration_iso_string(value)
    return lambda value: value


@dataclass
class Export:
    model: str
    table: str
    rows: int
    fields: list[str]


def export_model(model: type[models.Model], out: IO[bytes], progress: Progress) -> Export:
    """Write every row of ``model`` as gzipped JSON lines to ``out``; return what was written."""
    cols = columns(model)
    names = [c.attname for c in cols]
    keys = _natural_keys()
    encoders = [_encoder(c, keys) for c in cols]
    rows = 0
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    with _Compressor(out) as writer:
        query = model._base_manager.order_by("pk").values_list(*names)
        for values in query.iterator(chunk_size=2000):
            row = {n: enc(v) for n, enc, v in zip(names, encoders, values, strict=True)}
            writer.write(dumps(row).encode() + b"\n")
            rows += 1
            if rows % BATCH_ROWS == 0:
                progress(BATCH_ROWS)
    progress(rows % BATCH_ROWS)
    return Export(model._meta.label_lower, model._meta.db_table, rows, names)


class _Compressor:
    """Gzip (level 1) written by a thread of its own: zlib lets go of the GIL, so compressing
    one block overlaps with reading and encoding the next rows."""

    BLOCK = 1024 * 1024

    def __init__(self, out: IO[bytes]) -> None:
        self.gz = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0)
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.blocks: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="backup-gzip", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        ended = False
        try:
            while (block := self.blocks.get()) is not None:
                self.gz.write(block)
            ended = True
            self.gz.close()
        except BaseException as exc:  # handed to the writer at the next block or at close
            self.error = exc
            while not ended and self.blocks.get() is not None:  # let the writer finish
                pass

    def write(self, data: bytes) -> None:
        self.buffer.append(data)
        self.buffered += len(data)
        if self.buffered >= self.BLOCK:
            self._put()

    def _put(self) -> None:
        if self.error is not None:
            raise self.error
        self.blocks.put(b"".join(self.buffer))
        self.buffer, self.buffered = [], 0

    def __enter__(self) -> _Compressor:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.buffer and exc[0] is None:
            self._put()
        self.blocks.put(None)
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error


def read_rows(member: IO[bytes]) -> Iterator[dict[str, Any]]:
    with gzip.GzipFile(fileobj=member, mode="rb") as gz:
        for line in io.BufferedReader(gz, buffer_size=1024 * 1024):  # type: ignore[arg-type]
            yield json.loads(line)


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


def load_model(
    model: type[models.Model], archived_fields: list[str], rows: Iterator[dict], progress: Progress
) -> LoadReport:
    """Insert ``rows`` into ``model``'s table with plain INSERTs: no save(), no auto_now."""
    report = LoadReport(model._meta.label_lower)
    cols = columns(model)
    names = [c.attname for c in cols]
    report.defaulted = [n for n in names if n not in archived_fields]
    report.ignored = [n for n in archived_fields if n not in names]
    decoders = [_decoder(c) for c in cols]
    defaults = {c.attname: _default(c) for c in cols if c.attname in report.defaulted}
    quote = connection.ops.quote_name
    table = quote(model._meta.db_table)
    column_list = ", ".join(quote(c.column) for c in cols)

    def prepared() -> Iterator[list[Any]]:
        for row in rows:
            values = []
            for column, decode in zip(cols, decoders, strict=True):
                name = column.attname
                value = decode(row[name]) if name in row else defaults[name]
                if value is MISSING:  # a content type or permission this database lacks
                    if not column.null:
                        report.dropped.append(f"{model._meta.label_lower} {row}: {name}")
                        break
                    value = None
                values.append(column.get_db_prep_save(value, connection))
            else:
                yield values

    def done(count: int) -> None:
        report.rows += count
        progress(count)

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # COPY: one statement streaming every row, several times faster than INSERTs.
            count = 0
            with cursor.cursor.copy(f"COPY {table} ({column_list}) FROM STDIN") as copy:
                for values in prepared():
                    copy.write_row(values)
                    count += 1
                    if count == BATCH_ROWS:
                        done(count)
                        count = 0
            done(count)
        else:
            sql = f"INSERT INTO {table} ({column_list}) VALUES ({', '.join(['%s'] * len(cols))})"
            batch: list[list[Any]] = []
            for values in prepared():
                batch.append(values)
                if len(batch) >= BATCH_ROWS:
                    cursor.executemany(sql, batch)
                    done(len(batch))
                    batch = []
            if batch:
                cursor.executemany(sql, batch)
                done(len(batch))
    return report


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

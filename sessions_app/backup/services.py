"""Create, verify, restore, list and prune backups (``manage.py backup`` calls these)."""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import IO, Any

from django.conf import settings
from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction

from sessions_app.backup import (
    archive,
    copies,
    interrupts,
    leftovers,
    load,
    migrations,
    native,
    portable,
    searchindex,
    sqlite_native,
    swap,
)

logger = logging.getLogger(__name__)

APP_VERSION = "0.1.0"
NAME_PREFIX = "termsys-backup-"
SAFETY_LABEL = "safety"

NOTHING_TO_LOAD = (
    "{file}: the archive holds neither the portable form, nor a SQLite copy, nor binary copies; "
    "nothing changed."
)
SAFETY_FAILED = "the safety backup failed ({error}); nothing was restored, nothing changed."
SAFETY_WITHOUT_ROWS = "{file} holds no loadable copy of the rows ({why})"
NO_ROWS = (
    "{file}: the archive holds no loadable copy of its rows ({why}): restore could not load it."
)
WRITE_FAILED = "{error} writing {path}"
NOT_WRITTEN = "; no archive was written (its temporary files are removed)."
UNWRITABLE = (
    "cannot write in the backup directory {dir} ({error}); give a directory this user can "
    "write in (--output DIR, or TERMSYS_BACKUP_DIR)."
)
NATIVE_PREPARE_FAILED = (
    "{file}: preparing its SQLite copy in {dir} failed ({error}); nothing was restored, "
    "nothing changed."
)
PAGE_COPY_FAILED = (
    "{file}: copying its SQLite pages failed ({error}); the copy was rolled back, nothing changed."
)
INTERRUPTED = (
    "{file}: interrupted before the data was replaced; nothing was restored, nothing changed."
)
INTERRUPTED_SAFETY = " The safety backup written meanwhile is {safety}."
INTERRUPT_TOO_LATE = (
    "Ctrl-C came once the data was being replaced (past the point of no return): the restore "
    "was completed, not interrupted."
)
LEFTOVERS_REMOVED = "removed leftovers of killed backups or restores in {dir}: {names}"
SIDE_DROPPED = "dropped {table}, left by a restore that was killed"
NATIVE_LEFT_OUT = "left out on request (restore loads the portable form)"
UNKNOWN_MODEL = "{model}: in the archive, not in this code; its {rows} rows are left out"


class BackupError(Exception):
    """A backup operation refused or failed; the message says why, and that nothing changed."""


class RestoreInterrupted(BackupError):
    """Ctrl-C stopped a restore before its point of no return: nothing changed."""


class Reporter:
    """Progress of a long operation; the command shows a bar on a terminal, lines otherwise."""

    def stage(self, name: str, total: int) -> None:
        """Start a stage of ``total`` units (rows or bytes)."""

    def advance(self, units: int) -> None:
        """``units`` more of the current stage are done."""

    def note(self, text: str) -> None:
        logger.info("%s", text)


def backup_dir() -> Path:
    return Path(settings.TERMSYS_BACKUP_DIR)


def app_version() -> str:
    """Return ``git describe`` of the checkout when there is one, else the release version."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=settings.BASE_DIR,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return APP_VERSION
    described = done.stdout.strip()
    return f"{APP_VERSION}+{described}" if done.returncode == 0 and described else APP_VERSION


def flush_pending_writes(reporter: Reporter) -> None:
    """Write out output this process still holds for storage (when a server runs in it).

    A backup taken from another process sees what the server had stored: up to 0.25 s of
    DATABASE output, and HYBRID output still in the journal (seconds when the database lags).
    """
    from sessions_app import storage

    # Only providers this process has opened hold anything; opening one here would not help.
    for mode, provider in list(getattr(storage, "_providers", {}).items()):
        figures = provider.pending()
        if figures.get("count"):
            reporter.note(f"flushing {figures['count']} pending {mode} writes")
        provider.flush()


def _file_name(directory: Path, label: str, now: datetime) -> Path:
    """The archive's name; ``archive.Writer`` adds ``-2``, ``-3``, ... if it is taken."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.")[:40]
    stem = NAME_PREFIX + now.strftime("%Y%m%dT%H%M%SZ") + (f"-{slug}" if slug else "")
    return directory / f"{stem}{archive.SUFFIX}"


def rows_missing(manifest: dict[str, Any]) -> str | None:
    """Return why the archive of ``manifest`` does not hold every model's rows in a form
    ``restore`` loads (the portable form, a SQLite copy, or binary copies), or None."""
    listed = manifest.get("members") or {}
    models = manifest.get("models") or []
    forms = []
    if manifest.get("portable", True):
        absent = [e["model"] for e in models if e.get("member") not in listed]
        if not absent:
            return None
        forms.append(f"the portable form lacks {', '.join(absent)}")
    if sqlite_native.has_copy(manifest):
        if manifest["native"]["member"] in listed:
            return None
        forms.append("its SQLite copy is not among its members")
    if manifest.get("copies"):
        absent = [e["model"] for e in models if (e.get("copy") or {}).get("member") not in listed]
        if not absent:
            return None
        forms.append(f"the binary copies lack {', '.join(absent)}")
    return "; ".join(forms) or "neither the portable form, nor a SQLite copy, nor binary copies"


def clean_leftovers(directory: Path, reporter: Reporter) -> list[str]:
    """Remove what killed backups and restores left in ``directory`` (``leftovers``); say so."""
    removed = leftovers.clean(directory)
    if removed:
        reporter.note(LEFTOVERS_REMOVED.format(dir=directory, names=", ".join(removed)))
    return removed


@dataclass
class Created:
    path: Path
    manifest: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def backup_create(
    *,
    output_dir: Path | None = None,
    label: str = "",
    native_copy: bool = True,
    portable_form: bool = True,
    search_index: bool = True,
    binary_copies: bool = True,
    documents_read: Callable[[], None] | None = None,
    compress_threads: int | None = None,
    reporter: Reporter | None = None,
) -> Created:
    """Write an archive of the whole database to ``output_dir`` (default: the backup dir).

    ``native_copy=False`` leaves the engine's own copy out; ``portable_form=False`` the JSON
    lines (kept if there is no native copy: an archive always holds the data once);
    ``search_index=False`` PostgreSQL's stored search documents (see ``searchindex``);
    ``binary_copies`` adds PostgreSQL's binary COPY of every model (``copies``: what a restore
    into this database, or one just like it, loads; written beside the portable form; ignored
    on SQLite). ``documents_read`` is called once the search documents have been read, or are
    not to be (a restore beside waits for it before it replaces them, see ``load.Beside``);
    ``compress_threads`` limits the compression threads of the binary copies (default: a
    thread per core, up to ``portable.COMPRESS_THREADS``).
    """
    reporter = reporter or Reporter()
    directory = Path(output_dir) if output_dir is not None else backup_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise BackupError(f"cannot create the backup directory {directory}: {exc}") from exc
    clean_leftovers(directory, reporter)
    flush_pending_writes(reporter)
    now = datetime.now(UTC)
    path = _file_name(directory, label, now)
    try:
        return _create(
            directory=directory,
            path=path,
            now=now,
            label=label,
            native_copy=native_copy,
            portable_form=portable_form,
            search_index=search_index,
            binary_copies=binary_copies,
            documents_read=documents_read,
            compress_threads=compress_threads,
            reporter=reporter,
        )
    except leftovers.Unwritable as exc:
        error = exc.error.strerror or exc.error
        raise BackupError(UNWRITABLE.format(dir=directory, error=error)) from exc
    except OSError as exc:
        error = exc.strerror or str(exc)
        raise BackupError(WRITE_FAILED.format(error=error, path=path) + NOT_WRITTEN) from exc
    except archive.ArchiveError as exc:
        raise BackupError(f"{exc}{NOT_WRITTEN}") from exc


def _create(
    *,
    directory: Path,
    path: Path,
    now: datetime,
    label: str,
    native_copy: bool,
    portable_form: bool,
    search_index: bool,
    binary_copies: bool,
    documents_read: Callable[[], None] | None,
    compress_threads: int | None,
    reporter: Reporter,
) -> Created:
    warnings: list[str] = []
    found = portable.backup_models()
    members = {
        model: f"data/{i:03d}-{model._meta.label_lower}.jsonl.gz" for i, model in enumerate(found)
    }
    index_wanted = search_index and connection.vendor == "postgresql"
    copied = (
        {model: copies.member_name(i, model) for i, model in enumerate(found)}
        if binary_copies and connection.vendor == "postgresql"
        else {}
    )
    index_codec = copies.CODEC if copied else "gzip"  # the documents as the copies beside them
    native.prepare()
    with leftovers.workdir(directory, ".backup-") as tmp:
        writer: archive.Writer | None = None
        pending: native.Pending | None = None
        try:
            with transaction.atomic():
                snapshot = native.begin_snapshot()  # the first statement of the transaction
                totals = {model: portable.count_rows(model) for model in found}
                manifest = _manifest(
                    now=now,
                    label=label,
                    totals=totals,
                    members=members,
                    with_portable=portable_form,
                    copied=copied,
                )
                names = [
                    *members.values(),
                    *copied.values(),
                    native.member_name(),
                    searchindex.member_name(index_codec),
                ]
                writer = archive.Writer(path, archive.manifest_bound(manifest, names))
                pending, manifest["native"] = _native_start(
                    native_copy, writer, Path(tmp) / "native", snapshot, warnings
                )
                _fill(
                    writer=writer,
                    manifest=manifest,
                    found=found,
                    members=members,
                    copied=copied,
                    work=Path(tmp),
                    pending=pending,
                    snapshot=snapshot,
                    index_wanted=index_wanted,
                    index_codec=index_codec,
                    documents_read=documents_read,
                    compress=partial(
                        portable.compressor, workers=compress_threads, codec=copies.CODEC
                    ),
                    reporter=reporter,
                    warnings=warnings,
                )
            written = {**manifest, "members": writer.members}
            if (why := rows_missing(written)) is not None:  # never an archive without the data
                raise archive.ArchiveError(NO_ROWS.format(file=path, why=why))
            reporter.note(f"writing {path}")
            path = writer.finish(manifest)
        except BaseException:
            if pending is not None:  # pg_dump or the backup API copy, writing into ``tmp``
                pending.cancel()
            if writer is not None:
                writer.abort()
            raise
    for warning in warnings:
        logger.warning("%s", warning)
    return Created(path, archive.read_manifest(path), warnings)


def _fill(
    *,
    writer: archive.Writer,
    manifest: dict[str, Any],
    found: list[type[Any]],
    members: dict[type[Any], str],
    copied: dict[type[Any], str],
    work: Path,
    pending: native.Pending | None,
    snapshot: str | None,
    index_wanted: bool,
    index_codec: str,
    documents_read: Callable[[], None] | None,
    compress: Callable[[IO[bytes]], Any],
    reporter: Reporter,
    warnings: list[str],
) -> None:
    """Put the members into ``writer`` (inside the backup's transaction) and complete the
    manifest's description of them."""
    if not manifest["portable"] and pending is None and not copied:  # the data, at least once
        _as_portable(manifest, found, members)
    read = documents_read or (lambda: None)
    index = None
    if index_wanted and snapshot:  # beside the export, reading the same snapshot
        index = searchindex.start(work / "search-index", snapshot, index_codec, then=read)
    elif not index_wanted:
        read()
    beside = _copies_beside(
        manifest, found=found, copied=copied, work=work, snapshot=snapshot, compress=compress
    )
    try:
        if index is not None and documents_read is not None:
            index.exception()  # first, alone: a restore waits for it (``load.Beside``)
        _write_rows(
            writer,
            manifest,
            found,
            members=members,
            copied={} if beside is not None else copied,
            compress=compress,
            work=work,
            reporter=reporter,
        )
    finally:  # wait for what runs beside, also when the export failed
        _ended(beside, "binary copies", reporter)
        _ended(index, "search index", reporter)
    _add_copies(beside, writer, manifest, found=found, copied=copied, work=work)
    if index_wanted:
        if index is not None:
            manifest["search_index"] = index.result()
        else:  # in a caller's transaction
            manifest["search_index"] = searchindex.write(work / "search-index", index_codec)
            read()
        writer.add(manifest["search_index"]["member"], work / "search-index")
    if pending is not None:
        reporter.note(f"native copy ({pending.kind})")
        try:
            pending.wait()  # SQLite's file: inside the transaction that keeps it whole
            manifest["native"]["kind"] = pending.kind
        except native.NativeUnavailable as exc:
            manifest["native"] = _native_missing(exc, warnings)
            if not manifest["portable"] and not copied:
                # It was to be the only copy of the rows (a safety backup on SQLite): the
                # portable form instead, read in the same transaction, so the same data.
                reporter.note("the portable form instead")
                _as_portable(manifest, found, members)
                _write_rows(
                    writer,
                    manifest,
                    found,
                    members=members,
                    copied={},
                    compress=compress,
                    work=work,
                    reporter=reporter,
                )


def _spooled(work: Path, member: str) -> Path:
    """Where a member is written in ``work`` before it goes into the archive."""
    return work / member.replace("/", "_")


def _copies_beside(
    manifest: dict[str, Any],
    *,
    found: list[type[Any]],
    copied: dict[type[Any], str],
    work: Path,
    snapshot: str | None,
    compress: Callable[[IO[bytes]], Any],
) -> Future[list[list[list[str]]]] | None:
    """Start writing the binary copies beside the portable form (``copies.start``), reading
    the backup's snapshot; None where there are none, or nothing for them to be beside."""
    if not (copied and manifest["portable"] and snapshot):
        return None
    at = [(model, _spooled(work, copied[model])) for model in found]
    return copies.start(at, snapshot, compress)


def _add_copies(
    beside: Future[list[list[list[str]]]] | None,
    writer: archive.Writer,
    manifest: dict[str, Any],
    *,
    found: list[type[Any]],
    copied: dict[type[Any], str],
    work: Path,
) -> None:
    """Put the copies written beside (if they were) into ``writer``, with their columns."""
    if beside is None:
        return
    for model, entry, columns in zip(found, manifest["models"], beside.result(), strict=True):
        entry["copy"]["columns"] = columns
        writer.add(copied[model], _spooled(work, copied[model]))


def _ended(future: Future[Any] | None, what: str, reporter: Reporter) -> None:
    """Wait for ``future`` (if any) to end, saying so; its error is raised by ``result``."""
    if future is not None:
        reporter.note(what)
        future.exception()


def _as_portable(
    manifest: dict[str, Any], found: list[type[Any]], members: dict[type[Any], str]
) -> None:
    manifest["portable"] = True
    for entry, model in zip(manifest["models"], found, strict=True):
        entry["member"] = members[model]


def _write_rows(
    writer: archive.Writer,
    manifest: dict[str, Any],
    found: list[type[Any]],
    *,
    members: dict[type[Any], str],
    copied: dict[type[Any], str],
    compress: Callable[[IO[bytes]], Any],
    work: Path,
    reporter: Reporter,
) -> None:
    """Write the models' rows: the portable form, binary copies, or both (as the manifest and
    ``copied`` say)."""
    if manifest["portable"]:
        reporter.stage("export", sum(entry["rows"] for entry in manifest["models"]))
        for model in found:
            local = _spooled(work, members[model])
            portable.write_member(model, local, reporter.advance)
            writer.add(members[model], local)
    if copied:
        reporter.note("binary copies")
        for model, entry in zip(found, manifest["models"], strict=True):
            local = _spooled(work, copied[model])
            entry["copy"]["columns"] = copies.write(model, local, compress)
            writer.add(copied[model], local)


def _manifest(
    *,
    now: datetime,
    label: str,
    totals: dict[type[Any], int],
    members: dict[type[Any], str],
    with_portable: bool,
    copied: dict[type[Any], str],
) -> dict[str, Any]:
    """Return the manifest of an archive about to be written (``members`` comes last)."""
    return {
        "format": archive.FORMAT,
        "version": archive.VERSION,
        "app_version": app_version(),
        "created_at": now.isoformat(),
        "label": label,
        "database": {
            "vendor": connection.vendor,
            "engine": connection.settings_dict["ENGINE"],
            "server_version": _server_version(),
        },
        "migrations": migrations.applied(),
        "portable": with_portable,
        "models": [
            {
                "model": model._meta.label_lower,
                "table": model._meta.db_table,
                "rows": totals[model],
                "fields": [c.attname for c in portable.columns(model)],
                "member": members[model] if with_portable else None,
                "copy": {"member": copied[model], "columns": None} if copied else None,
            }
            for model in totals
        ],
        "copies": copies.describe() if copied else None,
        "skipped": portable.SKIPPED,
        "derived": portable.DERIVED,
        "search_index": searchindex.absent(
            searchindex.LEFT_OUT if connection.vendor == "postgresql" else searchindex.NOT_HERE
        ),
        "native": {"member": None, "kind": None, "reason": NATIVE_LEFT_OUT},
    }


def _native_start(
    wanted: bool, writer: archive.Writer, path: Path, snapshot: str | None, warnings: list[str]
) -> tuple[native.Pending | None, dict[str, Any]]:
    """Start the native copy beside the export (pg_dump reads the same snapshot)."""
    if not wanted:
        return None, {"member": None, "kind": None, "reason": NATIVE_LEFT_OUT}
    try:
        pending = native.start(writer, path, snapshot)
    except native.NativeUnavailable as exc:
        return None, _native_missing(exc, warnings)
    return pending, {"member": native.member_name(), "kind": pending.kind}


def _native_missing(exc: Exception, warnings: list[str]) -> dict[str, Any]:
    warnings.append(f"no native copy in the archive: {exc}")
    return {"member": None, "kind": None, "reason": str(exc)}


def _server_version() -> str:
    if connection.vendor == "sqlite":
        import sqlite3

        return sqlite3.sqlite_version
    return str(getattr(connection, "pg_version", "") or "")


def backup_verify(path: Path, *, reporter: Reporter | None = None) -> dict[str, Any]:
    """Check every member of the archive against its manifest; return the manifest."""
    reporter = reporter or Reporter()
    path = Path(path)
    reporter.stage("verify", path.stat().st_size if path.is_file() else 0)
    try:
        with archive.verified(path, reporter.advance) as opened:
            manifest = opened.manifest
    except archive.ArchiveError as exc:
        raise BackupError(str(exc)) from exc
    if (why := rows_missing(manifest)) is not None:
        raise BackupError(NO_ROWS.format(file=path, why=why))
    return manifest


@dataclass
class ModelChange:
    model: str
    current: int
    archived: int


@dataclass
class Restored:
    path: Path
    manifest: dict[str, Any]
    changes: list[ModelChange]
    missing_migrations: list[str]
    data_migrations: list[str]
    warnings: list[str] = field(default_factory=list)
    safety: Path | None = None
    dry_run: bool = False
    rows_from: str = ""  # which of the archive's forms the rows were loaded from
    index: str = ""  # how the search index came back


def backup_restore(
    path: Path,
    *,
    dry_run: bool = False,
    safety_dir: Path | None = None,
    reporter: Reporter | None = None,
) -> Restored:
    """Replace the data of every backed-up model with the archive's, all or nothing.

    Verify every checksum, refuse an archive from newer code, take a safety backup, then in
    one transaction: delete, insert, reset sequences and compare row counts with the manifest.
    An archive from older code is loaded into this schema (columns it lacks take their
    defaults); data migrations it had not run are listed, not re-run. Ctrl-C stops it until
    the data is being replaced, and is ignored from then on (``interrupts``): RestoreInterrupted
    means that nothing changed.
    """
    reporter = reporter or Reporter()
    path = Path(path)
    reporter.stage("verify", path.stat().st_size if path.is_file() else 0)
    with contextlib.nullcontext() if dry_run else interrupts.guarded():
        try:
            with archive.verified(path, reporter.advance) as opened:
                return _restore(opened, dry_run, safety_dir, reporter)
        except archive.ArchiveError as exc:
            raise BackupError(str(exc)) from exc
        except KeyboardInterrupt as exc:  # before the point of no return
            raise RestoreInterrupted(INTERRUPTED.format(file=path)) from exc


def _restore(
    opened: archive.Archive, dry_run: bool, safety_dir: Path | None, reporter: Reporter
) -> Restored:
    manifest, file = opened.manifest, opened.path
    try:
        comparison = migrations.compare(manifest["migrations"], file)
    except migrations.MigrationMismatch as exc:
        raise BackupError(str(exc)) from exc
    current = portable.backup_models()
    by_label = {model._meta.label_lower: model for model in current}
    archived = {entry["model"]: entry for entry in manifest["models"]}
    warnings = [
        UNKNOWN_MODEL.format(model=label, rows=entry["rows"])
        for label, entry in archived.items()
        if label not in by_label
    ]
    changes = [
        ModelChange(
            label,
            portable.count_rows(model),
            archived[label]["rows"] if label in archived else 0,
        )
        for label, model in by_label.items()
    ]
    result = Restored(
        file,
        manifest,
        changes,
        comparison.missing,
        comparison.data_migrations,
        warnings,
        dry_run=dry_run,
    )
    same_migrations = manifest["migrations"] == migrations.applied()
    copies_unusable = copies.unusable(manifest, same_migrations, current)
    if (
        not manifest.get("portable", True)
        and not sqlite_native.has_copy(manifest)
        and copies_unusable is not None
    ):
        if manifest.get("copies"):
            raise BackupError(copies.ONLY_COPIES.format(file=file, why=copies_unusable))
        raise BackupError(NOTHING_TO_LOAD.format(file=file))
    if dry_run:
        return result
    work = Path(safety_dir) if safety_dir is not None else backup_dir()
    try:
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise BackupError(SAFETY_FAILED.format(error=exc)) from exc
    clean_leftovers(work, reporter)
    drop_side_table(reporter)
    try:
        with leftovers.workdir(work, ".restore-") as tmp:
            _replace(
                opened,
                result,
                current=current,
                same_migrations=same_migrations,
                copied=copies_unusable is None,
                tmp=tmp,
                safety_dir=safety_dir,
                reporter=reporter,
            )
    except KeyboardInterrupt as exc:  # before the point of no return (``interrupts``)
        message = INTERRUPTED.format(file=file)
        if result.safety is not None:
            message += INTERRUPTED_SAFETY.format(safety=result.safety)
        raise RestoreInterrupted(message) from exc
    except leftovers.Unwritable as exc:
        error = exc.error.strerror or exc.error
        raise BackupError(UNWRITABLE.format(dir=work, error=error)) from exc
    except load.LoadError as exc:
        raise BackupError(str(exc)) from exc
    ContentType.objects.clear_cache()
    _forget_cached_flags()
    if interrupts.requested():
        result.warnings.append(INTERRUPT_TOO_LATE)
    return result


def drop_side_table(reporter: Reporter) -> bool:
    """On PostgreSQL, drop the documents table a killed restore left (``swap.SIDE``) unless a
    restore is using it; say so."""
    if connection.vendor != "postgresql" or not swap.drop_left():
        return False
    reporter.note(SIDE_DROPPED.format(table=swap.SIDE))
    return True


def _replace(
    opened: archive.Archive,
    result: Restored,
    *,
    current: list[type[Any]],
    same_migrations: bool,
    copied: bool,
    tmp: Path,
    safety_dir: Path | None,
    reporter: Reporter,
) -> None:
    """Take the safety backup and replace the data, in the fastest way that fits:

    - SQLite, the archive's SQLite copy of this very schema: its pages (``sqlite_native``),
      extracted from the archive while the safety backup is written;
    - PostgreSQL, the archive's binary copies when they fit here (``copied``, see ``copies``),
      else the portable form (either way, with the stored search documents, the safety backup
      is written beside their load and index builds, ``load.load``);
    - an archive holding only a SQLite copy, of another schema or for PostgreSQL: its rows.
    """
    manifest = opened.manifest
    page_copy = sqlite_native.candidate(manifest, same_migrations)
    native_rows = not copied and not manifest.get("portable", True)
    beside = None
    if page_copy or native_rows:
        if _from_sqlite_copy(
            opened,
            result,
            current=current,
            same_migrations=same_migrations,
            page_copy=page_copy,
            copy=tmp / "native.sqlite3",
            safety_dir=safety_dir,
            reporter=reporter,
        ):
            return
    elif connection.vendor == "postgresql" and _index_fits(manifest, same_migrations):
        beside = _safety_beside(safety_dir)
    else:
        result.safety = _safety_backup(safety_dir, reporter)
    try:
        loaded = load.load(
            opened,
            load.from_members(opened),
            current,
            same_migrations,
            reporter,
            beside=beside,
            members=True,
            copied=copied,
        )
    finally:
        if beside is not None:
            beside.exception()  # done, whatever happened to the restore
    if beside is not None:
        result.safety = beside.result()
    result.warnings.extend(loaded.warnings)
    result.rows_from = "binary copies" if copied else "the portable form"
    result.index = loaded.index


def _from_sqlite_copy(
    opened: archive.Archive,
    result: Restored,
    *,
    current: list[type[Any]],
    same_migrations: bool,
    page_copy: bool,
    copy: Path,
    safety_dir: Path | None,
    reporter: Reporter,
) -> bool:
    """Take the safety backup while the archive's SQLite copy is extracted to ``copy`` (and,
    for ``page_copy``, checked and prepared: ``sqlite_native``), then replace the data from
    the copy: swapped in or page for page when its schema is this database's, else row by row
    for an archive without the portable form. Return False when the portable form is to be
    loaded instead (the safety backup is taken then)."""
    manifest, file = opened.manifest, opened.path
    ours = sqlite_native.shape_here() if page_copy else ()
    counts = _copy_counts(manifest, current)

    def extract() -> tuple[str | None, dict[str, int]]:
        opened.extract(manifest["native"]["member"], copy)
        if not page_copy:
            return None, {}
        if (why := sqlite_native.unfit(copy, ours)) is not None:
            return why, {}
        return None, sqlite_native.prepare(copy, counts, load.LOGIN_SESSIONS_TABLE)

    with ThreadPoolExecutor(1, thread_name_prefix="backup-extract") as pool:  # both I/O
        extracting = pool.submit(extract)
        try:
            result.safety = _safety_backup(safety_dir, reporter)
        finally:
            extracting.exception()
    if page_copy:
        reporter.note("checking the native copy")
    with _preparing(file, copy.parent):
        why, differ = extracting.result()
    if page_copy and why is None:
        if _load_pages(opened, copy, differ, reporter):
            result.rows_from = "the SQLite copy, swapped in as the database file"
            result.index = "as it was in the copy"
        else:
            result.rows_from = "the SQLite copy, page for page"
            result.index = "copied with its pages"
        return True
    if page_copy:
        logger.info("%s: the native copy is loaded row by row: %s", file, why)
    if manifest.get("portable", True):
        return False
    with sqlite_native.opened(copy) as alias:
        loaded = load.load(opened, load.from_native(alias), current, same_migrations, reporter)
    result.warnings.extend(loaded.warnings)
    result.rows_from, result.index = "the SQLite copy, row by row", loaded.index
    return True


def _index_fits(manifest: dict[str, Any], same_migrations: bool) -> bool:
    return searchindex.unusable(manifest.get("search_index"), same_migrations) is None


def _safety_beside(safety_dir: Path | None) -> load.Beside:
    """Start the safety backup in a thread, on a connection of its own (closed after)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="backup-safety")
    read = threading.Event()

    def run() -> Path:
        try:
            # The copies with one zstd thread: the restore's server work has the other core (the
            # documents, read first while the restore waits for them, with every core).
            return _safety_backup(safety_dir, Reporter(), documents_read=read.set, threads=1)
        finally:
            connection.close()  # this thread's own

    future = pool.submit(run)
    pool.shutdown(wait=False)
    return load.Beside(future, read)


def _safety_backup(
    safety_dir: Path | None,
    reporter: Reporter,
    documents_read: Callable[[], None] | None = None,
    threads: int | None = None,
) -> Path:
    """Back up the current data before a restore replaces it; the archive is restorable.

    SQLite: the database file only (the native copy, which a restore into the same schema
    copies back page for page); PostgreSQL: binary copies and the search documents only
    (``copies``: they load into this database, and are the server's work to write).
    """
    reporter.note("safety backup of the current data")
    sqlite = connection.vendor == "sqlite"
    try:
        created = backup_create(
            output_dir=safety_dir or backup_dir(),
            label=SAFETY_LABEL,
            native_copy=sqlite,
            portable_form=False,
            binary_copies=not sqlite,
            documents_read=documents_read,
            compress_threads=threads,
            reporter=reporter,
        )
    except Exception as exc:
        raise BackupError(SAFETY_FAILED.format(error=_short(exc))) from exc
    if (why := rows_missing(created.manifest)) is not None:  # ``backup_create`` prevents it
        error = SAFETY_WITHOUT_ROWS.format(file=created.path, why=why)
        raise BackupError(SAFETY_FAILED.format(error=error))
    return created.path


def _short(exc: Exception) -> str:
    """A failed create's message without what it adds for an operator of ``create``."""
    return str(exc).removesuffix(NOT_WRITTEN)


@contextlib.contextmanager
def _preparing(file: Path, tmp: Path) -> Iterator[None]:
    """Turn a failure to extract or prepare the archive's SQLite copy into a BackupError."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        error = getattr(exc, "strerror", None) or exc
        raise BackupError(
            NATIVE_PREPARE_FAILED.format(file=file, dir=tmp.parent, error=error)
        ) from exc


def _copy_counts(manifest: dict[str, Any], current: list[type[Any]]) -> dict[str, int]:
    """The rows the manifest says each backed-up model's table has (table → rows)."""
    labels = {model._meta.label_lower for model in current}
    return {e["table"]: e["rows"] for e in manifest["models"] if e["model"] in labels}


def _load_pages(
    opened: archive.Archive, copy: Path, differ: dict[str, int], reporter: Reporter
) -> bool:
    """Restore SQLite from the archive's SQLite copy (``sqlite_native``), prepared, its rows
    counted (``differ``: the tables whose count is not the manifest's): renamed over the
    database file where no one has it open (return True), else page for page (False)."""
    manifest, file = opened.manifest, opened.path
    if differ:
        table, found = next(iter(differ.items()))
        entry = next(e for e in manifest["models"] if e["table"] == table)
        raise BackupError(
            load.COUNT_MISMATCH.format(
                file=file, model=entry["model"], found=found, expected=entry["rows"]
            )
        )
    reporter.note("swapping the native copy in")
    try:
        why = sqlite_native.swap_in(copy, commit=interrupts.point_of_no_return)
    except OSError as exc:  # before the rename: nothing changed
        why = f"{exc.strerror or exc}"
    if why is None:
        return True
    logger.info("%s: the native copy is loaded page for page: %s", file, why)
    reporter.note("loading the native copy")
    interrupts.point_of_no_return()  # Ctrl-C from here: looked at between the copy's steps
    try:
        sqlite_native.page_copy(copy, stop=interrupts.requested)
    except sqlite3.Error as exc:
        raise BackupError(PAGE_COPY_FAILED.format(file=file, error=exc)) from exc
    return False


def _forget_cached_flags() -> None:
    """Drop waffle's cached flags, switches and samples: they describe the replaced data."""
    from waffle import get_waffle_flag_model
    from waffle.models import Sample, Switch

    for model in (get_waffle_flag_model(), Switch, Sample):
        for obj in model.objects.all():
            obj.flush()


@dataclass
class Listed:
    """An archive in the backup directory, as ``backup_list`` found it."""

    path: Path
    size: int
    manifest: dict[str, Any] | None  # None: unreadable (not an archive, or no manifest)
    error: str | None  # why it is unreadable, damaged, or fails verification; None: fine

    @property
    def created(self) -> str:
        if self.manifest and self.manifest.get("created_at"):
            return str(self.manifest["created_at"])
        return datetime.fromtimestamp(_lstat(self.path).st_mtime, UTC).isoformat()


def _lstat(path: Path) -> Any:
    """``stat`` of the file, or of the link itself when it points nowhere."""
    try:
        return path.stat()
    except OSError:
        return path.lstat()


def backup_list(directory: Path | None = None, *, verify: bool = False) -> list[Listed]:
    """Return the archives in ``directory`` (default: the backup dir), newest first.

    Each is checked against its manifest: every member there with its size, the manifest
    matching its sha256 (the tar headers only: quick at any size). ``verify``: every member's
    sha256 too, which reads every archive whole (``backup_verify``).
    """
    directory = Path(directory) if directory is not None else backup_dir()
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob(f"{NAME_PREFIX}*{archive.SUFFIX}"):
        try:
            size = _lstat(path).st_size
        except OSError:  # gone meanwhile
            continue
        try:
            manifest = archive.read_manifest(path)
        except archive.ArchiveError as exc:
            found.append(Listed(path, size, None, _reason(path, exc)))
            continue
        found.append(Listed(path, size, manifest, _damage(path, full=verify)))
    return sorted(found, key=lambda item: (item.created, item.path.name), reverse=True)


def _damage(path: Path, *, full: bool) -> str | None:
    """Return why the archive at ``path`` fails its checks (``full``: checksums too), or None."""
    try:
        if full:
            with archive.verified(path) as opened:
                manifest = opened.manifest
        else:
            manifest = archive.checked(path)
    except archive.ArchiveError as exc:
        return _reason(path, exc)
    why = rows_missing(manifest)
    return None if why is None else f"it holds no loadable copy of its rows ({why})"


def _reason(path: Path, exc: Exception) -> str:
    """An archive's error without the file name and "nothing changed": for a listing."""
    text = str(exc).removeprefix(f"{path}: ")
    return text.removesuffix("; nothing changed.").removesuffix(" Nothing changed.")


@dataclass
class Pruned:
    deleted: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    left: list[Listed] = field(default_factory=list)  # unreadable or damaged: for an operator
    leftovers: list[str] = field(default_factory=list)


def backup_prune(
    *, keep: int, directory: Path | None = None, reporter: Reporter | None = None
) -> Pruned:
    """Keep the newest ``keep`` archives that verify (every checksum); delete the older ones.

    An archive that is unreadable, damaged or fails verification is never counted as kept, nor
    deleted: ``list`` shows it for an operator. Also removes the leftovers of killed backups and
    restores (``leftovers``) and, on PostgreSQL, a killed restore's documents table.
    """
    if keep < 1:
        raise BackupError(f"--keep must be 1 or more, got {keep}: prune never deletes them all")
    reporter = reporter or Reporter()
    directory = Path(directory) if directory is not None else backup_dir()
    done = Pruned()
    if directory.is_dir():
        done.leftovers = clean_leftovers(directory, reporter)
    drop_side_table(reporter)
    for item in backup_list(directory):
        if item.manifest is None or item.error is not None:
            done.left.append(item)
        elif len(done.kept) < keep:
            reporter.note(f"verifying {item.path.name}")
            item.error = _damage(item.path, full=True)
            if item.error is None:
                done.kept.append(item.path)
            else:
                done.left.append(item)
        else:
            item.path.unlink(missing_ok=True)
            done.deleted.append(item.path)
    return done

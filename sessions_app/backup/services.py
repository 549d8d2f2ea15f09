"""Create, verify, restore, list and prune backups (``manage.py backup`` calls these)."""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from sessions_app.backup import archive, derived, migrations, native, portable

logger = logging.getLogger(__name__)

APP_VERSION = "0.1.0"
NAME_PREFIX = "termsys-backup-"
SAFETY_LABEL = "safety"
LOGIN_SESSIONS_TABLE = "django_session"

COUNT_MISMATCH = (
    "{file}: after loading, {model} has {found} rows, the archive says {expected}; the restore "
    "was rolled back and nothing changed."
)
LOAD_FAILED = "{file}: loading {model} failed ({error}); the restore was rolled back."
SAFETY_FAILED = "the safety backup failed ({error}); nothing was restored, nothing changed."
NATIVE_LEFT_OUT = "left out on request (restore loads the portable form)"
UNKNOWN_MODEL = "{model}: in the archive, not in this code; its {rows} rows are left out"


class BackupError(Exception):
    """A backup operation refused or failed; the message says why, and that nothing changed."""


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
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.")[:40]
    stem = NAME_PREFIX + now.strftime("%Y%m%dT%H%M%SZ") + (f"-{slug}" if slug else "")
    path, n = directory / f"{stem}{archive.SUFFIX}", 1
    while path.exists():
        n += 1
        path = directory / f"{stem}-{n}{archive.SUFFIX}"
    return path


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
    reporter: Reporter | None = None,
) -> Created:
    """Write an archive of the whole database to ``output_dir`` (default: the backup dir).

    ``native_copy=False`` leaves the engine's own copy out (``restore`` does not use it).
    """
    reporter = reporter or Reporter()
    directory = Path(output_dir) if output_dir is not None else backup_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise BackupError(f"cannot create the backup directory {directory}: {exc}") from exc
    flush_pending_writes(reporter)
    now = datetime.now(UTC)
    path = _file_name(directory, label, now)
    warnings: list[str] = []
    found = portable.backup_models()
    with tempfile.TemporaryDirectory(dir=directory, prefix=".backup-") as tmp:
        files: dict[str, Path] = {}
        described: list[dict[str, Any]] = []
        with transaction.atomic():
            snapshot = native.begin_snapshot()  # the first statement of the transaction
            native_path = Path(tmp) / "native"
            pending, native_info = _native_start(native_copy, native_path, snapshot, warnings)
            try:
                state = migrations.applied()
                totals = {model: portable.count_rows(model) for model in found}
                reporter.stage("export", sum(totals.values()))
                for index, model in enumerate(found):
                    member = f"data/{index:03d}-{model._meta.label_lower}.jsonl.gz"
                    local = Path(tmp) / member.replace("/", "_")
                    exported = portable.write_member(model, local, reporter.advance)
                    files[member] = local
                    described.append({**exported.__dict__, "member": member})
            except BaseException:
                if pending is not None:
                    pending.cancel()
                raise
            if pending is not None:
                reporter.note(f"native copy ({native.kind()})")
                try:
                    pending.wait()
                    files[native_info["member"]] = native_path
                except native.NativeUnavailable as exc:
                    native_info = _native_missing(exc, warnings)
        manifest = {
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
            "migrations": state,
            "models": described,
            "skipped": portable.SKIPPED,
            "derived": portable.DERIVED,
            "native": native_info,
        }
        reporter.note(f"writing {path}")
        archive.write(path, manifest, files)
    for warning in warnings:
        logger.warning("%s", warning)
    return Created(path, archive.read_manifest(path), warnings)


def _native_start(
    wanted: bool, path: Path, snapshot: str | None, warnings: list[str]
) -> tuple[native.Pending | None, dict[str, Any]]:
    """Start the native copy beside the export (pg_dump reads the same snapshot)."""
    if not wanted:
        return None, {"member": None, "kind": None, "reason": NATIVE_LEFT_OUT}
    try:
        pending = native.start(path, snapshot)
    except native.NativeUnavailable as exc:
        return None, _native_missing(exc, warnings)
    return pending, {"member": native.member_name(), "kind": native.kind()}


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
            return opened.manifest
    except archive.ArchiveError as exc:
        raise BackupError(str(exc)) from exc


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
    defaults); data migrations it had not run are listed, not re-run.
    """
    reporter = reporter or Reporter()
    path = Path(path)
    reporter.stage("verify", path.stat().st_size if path.is_file() else 0)
    try:
        with archive.verified(path, reporter.advance) as opened:
            return _restore(opened, dry_run, safety_dir, reporter)
    except archive.ArchiveError as exc:
        raise BackupError(str(exc)) from exc


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
    if dry_run:
        return result
    reporter.note("safety backup of the current data")
    try:
        result.safety = backup_create(
            output_dir=safety_dir or backup_dir(),
            label=SAFETY_LABEL,
            native_copy=False,  # what undoing this restore needs is the portable form
            reporter=reporter,
        ).path
    except Exception as exc:
        raise BackupError(SAFETY_FAILED.format(error=exc)) from exc
    loading = [(by_label[e["model"]], e) for e in manifest["models"] if e["model"] in by_label]
    tables = [model._meta.db_table for model in current]
    derived_tables = [model._meta.db_table for model in portable.derived_models()]
    with transaction.atomic(), derived.triggers_off(tables, derived_tables):
        reporter.note("emptying the tables")
        for model in [*portable.derived_models(), *reversed(current)]:
            portable.delete_rows(model)
        with connection.cursor() as cursor:  # ids in old login sessions may now be other users
            cursor.execute(f"DELETE FROM {connection.ops.quote_name(LOGIN_SESSIONS_TABLE)}")
        reporter.stage("load", sum(entry["rows"] for _, entry in loading))
        for model, entry in loading:
            try:
                rows = portable.read_rows(opened.member(entry["member"]))
                report = portable.load_model(model, entry["fields"], rows, reporter.advance)
            except archive.ArchiveError:
                raise
            except Exception as exc:
                message = LOAD_FAILED.format(file=file, model=entry["model"], error=exc)
                raise BackupError(message) from exc
            warnings.extend(report.dropped)
            if report.defaulted:
                warnings.append(
                    f"{report.model}: not in the archive, defaulted: {', '.join(report.defaulted)}"
                )
            if report.ignored:
                warnings.append(
                    f"{report.model}: columns this code lacks, left out: "
                    f"{', '.join(report.ignored)}"
                )
            expected = entry["rows"] - len(report.dropped)
            found = portable.count_rows(model)
            if found != expected:
                raise BackupError(
                    COUNT_MISMATCH.format(
                        file=file, model=entry["model"], found=found, expected=expected
                    )
                )
        portable.reset_sequences(current)
        transaction.on_commit(_forget_cached_flags)
        reporter.note("rebuilding the search index")
    return result


def _forget_cached_flags() -> None:
    """Drop waffle's cached flags, switches and samples: they describe the replaced data."""
    from waffle import get_waffle_flag_model
    from waffle.models import Sample, Switch

    for model in (get_waffle_flag_model(), Switch, Sample):
        for obj in model.objects.all():
            obj.flush()


@dataclass
class Listed:
    path: Path
    size: int
    manifest: dict[str, Any] | None
    error: str | None

    @property
    def created(self) -> str:
        if self.manifest and self.manifest.get("created_at"):
            return str(self.manifest["created_at"])
        return datetime.fromtimestamp(self.path.stat().st_mtime, UTC).isoformat()


def backup_list(directory: Path | None = None) -> list[Listed]:
    """Return the archives in ``directory`` (default: the backup dir), newest first."""
    directory = Path(directory) if directory is not None else backup_dir()
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob(f"{NAME_PREFIX}*{archive.SUFFIX}"):
        try:
            found.append(Listed(path, path.stat().st_size, archive.read_manifest(path), None))
        except archive.ArchiveError as exc:
            found.append(Listed(path, path.stat().st_size, None, str(exc)))
    return sorted(found, key=lambda item: (item.created, item.path.name), reverse=True)


def backup_prune(*, keep: int, directory: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` readable archives; return the deleted paths.

    Unreadable files are never counted as kept nor deleted: ``list`` shows them for an operator.
    """
    if keep < 1:
        raise BackupError(f"--keep must be 1 or more, got {keep}: prune never deletes them all")
    deleted = []
    readable = [item for item in backup_list(directory) if item.manifest is not None]
    for item in readable[keep:]:
        item.path.unlink(missing_ok=True)
        deleted.append(item.path)
    return deleted

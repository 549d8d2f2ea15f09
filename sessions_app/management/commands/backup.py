"""Create, list, verify, restore and prune backups of termsys's database.

An archive is one tar file (mode 0600): a manifest, the data as JSON lines per model (what
``restore`` loads, into SQLite or PostgreSQL alike), on PostgreSQL also as binary copies (what
a restore into the same database loads, faster), and the engine's own copy for operators; a
restore's safety backup holds the data in the fastest form that loads back where it was made
(SQLite's database file, PostgreSQL's binary copies).
``restore`` verifies every checksum, refuses archives from newer code, takes a safety backup
and replaces the data in one transaction, or changes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper

from sessions_app.backup import interrupts, services
from sessions_app.backup.services import BackupError

BAR_WIDTH = 30
LINE_STEPS = 4  # plain progress: a line at each quarter of a stage

CONFIRM = "Replace ALL data of this database with {file}? Type 'yes' to go on: "
NO_TTY = (
    "restore replaces all data; there is no terminal to confirm on. Pass --yes to restore "
    "without asking. Nothing changed."
)
DECLINED = "Not restored; nothing changed."
NO_BACKUPS = "No backups in {dir}."
INTERRUPTED_BEFORE = "interrupted; nothing was restored, nothing changed."
INTERRUPTED_STATUS = 130  # a shell's status for a command ended by Ctrl-C (128 + SIGINT)
UNREADABLE = "{name}  unreadable: {error}"
DAMAGED = "{name}  DAMAGED ({error}): do not rely on it"
PRUNE_LEFT = "left {name} for an operator: {error}"


class Progress(services.Reporter):
    """A bar redrawn in place on a terminal; a line per quarter of each stage otherwise."""

    def __init__(self, out: OutputWrapper, tty: bool) -> None:
        self.out, self.tty = out, tty
        self.name, self.total, self.done, self.shown = "", 0, 0, -1

    def stage(self, name: str, total: int) -> None:
        self._end()
        self.name, self.total, self.done, self.shown = name, total, 0, -1
        self._show()

    def advance(self, units: int) -> None:
        self.done += units
        self._show()

    def note(self, text: str) -> None:
        self._end()
        self.out.write(text)

    def finish(self) -> None:
        self._end()

    def _show(self) -> None:
        fraction = min(1.0, self.done / self.total) if self.total else 1.0
        if self.tty:
            filled = int(fraction * BAR_WIDTH)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            self.out.write(f"\r{self.name:<8} [{bar}] {fraction:4.0%}", ending="")
            self.out.flush()
            self.shown = 0
            return
        step = int(fraction * LINE_STEPS)
        if step != self.shown:
            self.shown = step
            self.out.write(f"{self.name}: {self.done}/{self.total} ({fraction:.0%})")

    def _end(self) -> None:
        if self.tty and self.shown >= 0:
            self.out.write("")
        self.shown = -1


def printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (``\\x1b``, ``\\n``):
    a label or file name is shown, never acted on by the terminal."""
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def size_label(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


class Command(BaseCommand):
    help = (
        "Back up and restore termsys's database: create, list, verify, restore, prune. "
        "Archives go to TERMSYS_BACKUP_DIR (default $TERMSYS_VAR_DIR/backups)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
        create = sub.add_parser("create", help="Write an archive of the whole database.")
        create.add_argument("--output", type=Path, help="Directory (default TERMSYS_BACKUP_DIR).")
        create.add_argument("--label", default="", help="Kept in the manifest and the file name.")
        create.add_argument(
            "--no-native",
            action="store_true",
            help="Leave out the engine's own copy (restore does not need it): smaller, faster.",
        )
        listing = sub.add_parser("list", help="The archives in TERMSYS_BACKUP_DIR, newest first.")
        listing.add_argument(
            "--verify",
            action="store_true",
            help="Check every member's sha256 too (reads every archive whole).",
        )
        verify = sub.add_parser("verify", help="Check every member of an archive (sha256).")
        verify.add_argument("file", type=Path)
        restore = sub.add_parser("restore", help="Replace all data with an archive's.")
        restore.add_argument("file", type=Path)
        restore.add_argument(
            "--dry-run", action="store_true", help="Verify and show what would change."
        )
        restore.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")
        prune = sub.add_parser("prune", help="Delete all but the newest N archives.")
        prune.add_argument("--keep", type=int, required=True, help="How many to keep (1+).")

    def handle(self, *args: Any, subcommand: str, **options: Any) -> None:
        self.progress = Progress(self.stdout, self.stdout.isatty())
        try:
            getattr(self, f"handle_{subcommand}")(**options)
        except services.RestoreInterrupted as exc:
            self.progress.finish()
            raise CommandError(str(exc), returncode=INTERRUPTED_STATUS) from exc
        except BackupError as exc:
            self.progress.finish()
            raise CommandError(str(exc)) from exc
        self.progress.finish()

    def handle_create(
        self, *, output: Path | None, label: str, no_native: bool, **options: Any
    ) -> None:
        created = services.backup_create(
            output_dir=output, label=label, native_copy=not no_native, reporter=self.progress
        )
        self.progress.finish()
        for warning in created.warnings:
            self.stdout.write(self.style.WARNING(warning))
        rows = sum(entry["rows"] for entry in created.manifest["models"])
        size = size_label(created.path.stat().st_size)
        self.stdout.write(self.style.SUCCESS(f"Created {created.path} ({rows} rows, {size})."))

    def handle_list(self, *, verify: bool, **options: Any) -> None:
        found = services.backup_list(verify=verify)
        if not found:
            self.stdout.write(NO_BACKUPS.format(dir=services.backup_dir()))
            return
        for item in found:
            name = printable(item.path.name)
            if item.manifest is None:
                error = printable(item.error or "")
                self.stdout.write(self.style.ERROR(UNREADABLE.format(name=name, error=error)))
                continue
            if item.error is not None:
                error = printable(item.error)
                self.stdout.write(self.style.ERROR(DAMAGED.format(name=name, error=error)))
                continue
            manifest = item.manifest
            sessions = next(
                (m["rows"] for m in manifest["models"] if m["model"].endswith(".terminalsession")),
                0,
            )
            label = printable(str(manifest.get("label") or "-"))
            self.stdout.write(
                f"{name}  {item.created[:19]}  {manifest['database']['vendor']}  "
                f"{sessions} sessions  {size_label(item.size)}  {label}"
            )

    def handle_verify(self, *, file: Path, **options: Any) -> None:
        manifest = services.backup_verify(file, reporter=self.progress)
        self.progress.finish()
        rows = sum(entry["rows"] for entry in manifest["models"])
        native = manifest["native"].get("kind") or "none"
        forms = [
            name
            for name, present in (
                ("portable form", manifest.get("portable", True)),
                ("binary copies", manifest.get("copies")),
            )
            if present
        ]
        self.stdout.write(
            self.style.SUCCESS(
                f"{file}: OK: {len(manifest['members'])} members match their sha256; "
                f"{rows} rows in {len(manifest['models'])} models; rows as: "
                f"{', '.join(forms) or 'the native copy only'}; native copy: {native}; "
                f"made {manifest['created_at'][:19]} by termsys {manifest['app_version']} "
                f"on {manifest['database']['vendor']}."
            )
        )

    def handle_restore(self, *, file: Path, dry_run: bool, yes: bool, **options: Any) -> None:
        try:
            if not self._confirmed(file, dry_run=dry_run, yes=yes):
                return
        except KeyboardInterrupt:
            self.progress.finish()
            raise CommandError(
                f"{file}: {INTERRUPTED_BEFORE}", returncode=INTERRUPTED_STATUS
            ) from None
        # Ctrl-C stops the restore until the data is being replaced; from then on it is
        # ignored to the end of this report (``interrupts``).
        with interrupts.guarded():
            done = services.backup_restore(file, reporter=self.progress)
            self.progress.finish()
            for warning in done.warnings:
                self.stdout.write(self.style.WARNING(warning))
            rows = sum(change.archived for change in done.changes)
            self.stdout.write(
                self.style.SUCCESS(
                    f"Restored {file}: {rows} rows from {done.rows_from}, search index "
                    f"{done.index}; row counts match the manifest. The data before "
                    f"is in {done.safety}. Login sessions were cleared: everyone signs in again."
                )
            )

    def _confirmed(self, file: Path, *, dry_run: bool, yes: bool) -> bool:
        """Verify, show what would change and ask; return whether to restore."""
        plan = services.backup_restore(file, dry_run=True, reporter=self.progress)
        self.progress.finish()
        self._show_plan(plan)
        if dry_run:
            self.stdout.write(self.style.WARNING("Dry run: nothing changed."))
            return False
        if yes:
            return True
        if not sys.stdin.isatty():
            raise CommandError(NO_TTY)
        try:
            answer = input(CONFIRM.format(file=file))
        except EOFError:  # Ctrl-D: no answer is not a yes
            answer = ""
            self.stdout.write("")
        if answer.strip().lower() != "yes":
            self.stdout.write(DECLINED)
            return False
        return True

    def _show_plan(self, plan: services.Restored) -> None:
        manifest = plan.manifest
        self.stdout.write(
            f"{plan.path}: verified; made {manifest['created_at'][:19]} by termsys "
            f"{manifest['app_version']} on {manifest['database']['vendor']}"
            + (f", label {manifest['label']!r}" if manifest.get("label") else "")
        )
        for change in plan.changes:
            if change.current or change.archived:
                self.stdout.write(f"  {change.model}: {change.current} rows → {change.archived}")
        if plan.missing_migrations:
            self.stdout.write(
                self.style.WARNING(
                    "The archive is from an older schema; it is loaded into this one (missing "
                    f"columns take their defaults). Newer migrations: "
                    f"{', '.join(plan.missing_migrations)}"
                )
            )
        if plan.data_migrations:
            self.stdout.write(
                self.style.WARNING(
                    f"Data migrations not re-run on the restored data: "
                    f"{', '.join(plan.data_migrations)}"
                )
            )
        for warning in plan.warnings:
            self.stdout.write(self.style.WARNING(warning))

    def handle_prune(self, *, keep: int, **options: Any) -> None:
        done = services.backup_prune(keep=keep, reporter=self.progress)
        self.progress.finish()
        for path in done.deleted:
            self.stdout.write(f"deleted {printable(path.name)}")
        for item in done.left:
            name, error = printable(item.path.name), printable(item.error or "")
            self.stdout.write(self.style.WARNING(PRUNE_LEFT.format(name=name, error=error)))
        self.stdout.write(
            f"Pruned {len(done.deleted)} archive(s); kept the newest {len(done.kept)} that "
            f"verify (--keep {keep})."
        )

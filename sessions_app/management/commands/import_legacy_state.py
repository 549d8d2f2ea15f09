"""Import the previous system's JSON state (a list of sessions, or ``{"sessions": [...]}``).

The decisions (users, projects, ids, ended state) live in ``legacy.services``; this command reads
the file, passes the options and prints the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from legacy import services
from legacy.parsing import LegacyFormatError

REFUSED = "{file}: nothing imported; {count} malformed record(s) (--skip-invalid imports the rest):"
BAD_MAPPING = "{option} takes OLD=NEW, got {value!r}"
REPORT = "read {read}, imported {imported}, skipped {skipped}, already present {present}"
DRY_RUN = "Dry run: nothing changed. Run again without --dry-run to import."
SEEN_BEFORE = "This file (sha256 {sha}) was imported before, first on {when}."
MAX_LISTED = 50


def parse_mapping(values: list[str], option: str) -> dict[str, str]:
    """Return ``{OLD: NEW}`` from ``OLD=NEW`` arguments."""
    mapping = {}
    for value in values:
        old, sep, new = value.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise CommandError(BAD_MAPPING.format(option=option, value=value))
        mapping[old.strip()] = new.strip()
    return mapping


class Command(BaseCommand):
    help = (
        "Import the previous system's JSON state: every session ends up exited (end reason "
        "'imported') with its output stored. All or nothing unless --skip-invalid; re-running "
        "a file changes nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", help="The legacy state JSON file.")
        parser.add_argument(
            "--dry-run", action="store_true", help="Check and count, change nothing."
        )
        parser.add_argument(
            "--skip-invalid",
            action="store_true",
            help="Import the well-formed records and report the others (default: import none).",
        )
        parser.add_argument(
            "--default-user",
            metavar="USERNAME",
            help="Owner of records without a userId (an existing termsys user).",
        )
        parser.add_argument(
            "--map-user",
            action="append",
            default=[],
            metavar="OLD=NEW",
            help="Legacy userId OLD belongs to termsys user NEW (repeatable).",
        )
        parser.add_argument(
            "--create-users",
            action="store_true",
            help="Create a user 'legacy-<userId>' (inactive, unusable password) for each legacy "
            "user neither mapped nor matching a termsys username.",
        )
        parser.add_argument(
            "--map-project",
            action="append",
            default=[],
            metavar="OLD=NAME",
            help="Legacy projectId OLD goes to the user's project NAME instead of "
            "'legacy-<projectId>' (repeatable; created when missing).",
        )
        parser.add_argument(
            "--progress-every",
            type=int,
            default=100,
            metavar="N",
            help="Print a progress line every N sessions (default 100).",
        )

    def handle(self, *args: Any, file: str, **options: Any) -> None:
        if options["progress_every"] < 1:
            every = options["progress_every"]
            raise CommandError(f"--progress-every must be 1 or more, got {every}")
        try:
            raw = Path(file).read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read {file}: {exc.strerror or exc}") from exc
        try:
            report = services.legacy_state_import(
                raw=raw,
                file_name=file,
                default_user=options["default_user"],
                user_map=parse_mapping(options["map_user"], "--map-user"),
                project_map=parse_mapping(options["map_project"], "--map-project"),
                create_users=options["create_users"],
                skip_invalid=options["skip_invalid"],
                dry_run=options["dry_run"],
                progress=self._progress,
                progress_every=options["progress_every"],
            )
        except LegacyFormatError as exc:
            raise CommandError(f"{file}: {exc}") from exc
        except services.LegacyImportError as exc:
            raise CommandError(f"{file}: nothing imported; {exc}") from exc
        except services.LegacyImportRefused as exc:
            lines = [REFUSED.format(file=file, count=len(exc.problems))]
            lines += [f"  - {problem}" for problem in exc.problems[:MAX_LISTED]]
            if len(exc.problems) > MAX_LISTED:
                lines.append(f"  … and {len(exc.problems) - MAX_LISTED} more")
            lines.append(f"read {exc.read}, imported 0, malformed {len(exc.problems)}")
            raise CommandError("\n".join(lines)) from exc
        self._report(report)

    def _progress(self, done: int, total: int) -> None:
        self.stdout.write(f"  {done}/{total} sessions")

    def _report(self, report: services.ImportReport) -> None:
        if report.previous_run:
            self.stdout.write(SEEN_BEFORE.format(sha=report.sha256[:12], when=report.previous_run))
        for problem in report.problems[:MAX_LISTED]:
            self.stdout.write(self.style.WARNING(f"skipped {problem}"))
        if len(report.problems) > MAX_LISTED:
            self.stdout.write(f"… and {len(report.problems) - MAX_LISTED} more skipped")
        for username in report.users_created:
            self.stdout.write(f"user {username}: created (inactive, no usable password)")
        for name in report.projects_created:
            self.stdout.write(f"project {name}: created")
        if report.new_ids:
            self.stdout.write(
                f"{report.new_ids} legacy id(s) not in termsys's pattern got a new session id "
                "(the legacy id is kept in the import ledger)"
            )
        summary = REPORT.format(
            read=report.read,
            imported=report.imported,
            skipped=report.skipped,
            present=report.already_present,
        )
        if report.dry_run:
            self.stdout.write(f"would import: {summary}")
            self.stdout.write(self.style.WARNING(DRY_RUN))
        else:
            self.stdout.write(self.style.SUCCESS(summary))

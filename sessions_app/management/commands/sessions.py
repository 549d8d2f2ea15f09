"""``manage.py sessions``: work with stored terminal sessions from the command line.

Subcommands are methods ``handle_<name>``; ``search`` runs a search query (the language of
``GET /api/sessions/search``); ``export`` writes a session's retained output as an asciicast v3
recording or as plain text.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sessions_app import export, selectors
from sessions_app.errors import NotFound

NO_SESSION = "no session {session_id!r}"
NO_OUTPUT = "{session_id}: no stored output here ({error}); export it from the page instead"
STDOUT_FAILED = "{session_id}: cannot write the export to standard output: {error}"


class Command(BaseCommand):
    help = (
        "Work with stored terminal sessions: search them; export one as asciicast v3 (.cast) "
        "or text."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
        export_ = sub.add_parser(
            "export", help="Write a session's retained output as .cast (asciicast v3) or text."
        )
        export_.add_argument("session_id", metavar="ID")
        export_.add_argument("--format", choices=export.FORMATS, default="cast")
        export_.add_argument("--output", help="Write to this file instead of stdout.")
        search = sub.add_parser(
            "search", help='Search stored sessions with the query language ("phrase", project:).'
        )
        search.add_argument("query", metavar="QUERY")
        search.add_argument("--user", help="Only this user's sessions (default: everyone's).")
        search.add_argument("--limit", type=int, default=20, help="At most this many hits.")
        search.add_argument("--order", choices=("newest", "rank"), default="newest")

    def handle(self, *args: Any, subcommand: str, **options: Any) -> None:
        getattr(self, f"handle_{subcommand}")(**options)

    def handle_search(
        self, *, query: str, user: str | None, limit: int, order: str, **options: Any
    ) -> None:
        from django.contrib.auth import get_user_model

        from sessions_app.errors import ValidationFailed
        from sessions_app.search.engine import sessions_search

        owner = None
        if user is not None:
            owner = get_user_model().objects.filter(username=user).first()
            if owner is None:
                raise CommandError(f"no user {user!r}")
        try:
            page = sessions_search(
                user=owner, text=query, limit=limit, order=order, check_flag=False
            )
        except ValidationFailed as exc:
            raise CommandError(exc.message) from None
        for hit in page.hits:
            tab = hit.session.title or hit.session.tab_name or hit.session.id
            self.stdout.write(
                f"{hit.at:%Y-%m-%d %H:%M} {hit.project_name} / {tab} "
                f"({hit.session.id}, {hit.source})"
            )
            text = hit.snippet.replace("<mark>", "[").replace("</mark>", "]")
            self.stdout.write(f"    {html.unescape(text)}")
        more = " (more: raise --limit)" if page.next_cursor else ""
        self.stdout.write(self.style.SUCCESS(f"{len(page.hits)} hit(s){more}."))

    def handle_export(
        self, *, session_id: str, format: str, output: str | None, **options: Any
    ) -> None:
        record = selectors.session_find(session_id=session_id)
        if record is None:
            raise CommandError(NO_SESSION.format(session_id=session_id))
        try:
            result = export.session_export(record=record, format=format)
        except NotFound as exc:
            raise CommandError(NO_OUTPUT.format(session_id=session_id, error=exc)) from exc
        if output is None:
            try:
                self.stdout.write(result.body.decode("utf-8"), ending="")
                self.stdout.flush()  # a full disk or a closed pipe shows here, not at exit
            except OSError as exc:
                self._drop_stdout()
                failed = STDOUT_FAILED.format(session_id=session_id, error=exc.strerror or exc)
                raise CommandError(failed) from exc
            return
        try:
            Path(output).write_bytes(result.body)
        except OSError as exc:
            raise CommandError(f"cannot write {output}: {exc.strerror or exc}") from exc
        self.stdout.write(
            f"Exported {session_id} ({format}, {len(result.body)} bytes) to {output}."
        )

    def _drop_stdout(self) -> None:
        """Point standard output at /dev/null: what it still buffers would fail again as
        Python exits, after the error was reported (as the ``signal`` docs advise for EPIPE)."""
        try:
            fd = self.stdout.fileno()
        except (AttributeError, OSError, ValueError):
            return  # not a file (a test's StringIO)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)

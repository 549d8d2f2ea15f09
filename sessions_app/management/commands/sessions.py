"""``manage.py sessions``: work with stored terminal sessions from the command line.

Subcommands are methods ``handle_<name>``; ``list`` lists the stored sessions (newest activity
first), with the ids the others take; ``search`` runs a search query (the language of
``GET /api/sessions/search``); ``export`` writes a session's retained output as an asciicast v3
recording or as plain text.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sessions_app import export, selectors, terminals
from sessions_app.errors import NotFound
from sessions_app.models import SessionState

NO_SESSION = "no session {session_id!r}"
NO_USER = "no user {user!r}"
STATES = ("live", *SessionState.values)  # live: creating, active or detached
NO_OUTPUT = "{session_id}: no stored output here ({error}); export it from the page instead"
STDOUT_FAILED = "{session_id}: cannot write the export to standard output: {error}"


class Command(BaseCommand):
    help = (
        "Work with stored terminal sessions: list or search them; export one as asciicast v3 "
        "(.cast) or text."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
        list_ = sub.add_parser(
            "list", help="List stored sessions, newest activity first, with their ids."
        )
        list_.add_argument("--user", help="Only this user's sessions (default: everyone's).")
        list_.add_argument("--project", help="Only sessions of projects of this name.")
        list_.add_argument("--state", choices=STATES, help="Only sessions in this state.")
        list_.add_argument("--limit", type=int, default=50, help="At most this many (50).")
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

    def handle_list(
        self,
        *,
        user: str | None,
        project: str | None,
        state: str | None,
        limit: int,
        **options: Any,
    ) -> None:
        from sessions_app.models import TerminalSession

        if limit < 1:
            raise CommandError(f"--limit must be at least 1, not {limit}")
        found = TerminalSession.objects.select_related("project", "user")
        owner = _user(user)
        if owner is not None:
            found = found.filter(user=owner)
        if project is not None:
            found = found.filter(project__name__iexact=project)
        if state == "live":
            found = found.live()
        elif state is not None:
            found = found.filter(state=state)
        total = found.count()
        for record in found.order_by("-last_activity", "-created_at")[:limit]:
            shown = record.tab_name if record.tab_named else record.title or record.tab_name
            notes = [record.state]
            if record.is_live and record.node and not terminals.node_is_alive(record.node):
                notes.append("its server process is gone")  # marked exited at its next start
            if record.closed_at:
                notes.append("tab closed")
            notes.append(_size(record.output_bytes))
            self.stdout.write(
                f"{record.last_activity:%Y-%m-%d %H:%M} {record.user.get_username()} "
                f"{record.project.name} / {shown} ({', '.join(notes)}) {record.id}"
            )
        more = f" of {total} (raise --limit)" if total > limit else ""
        self.stdout.write(self.style.SUCCESS(f"{min(total, limit)} session(s){more}."))

    def handle_search(
        self, *, query: str, user: str | None, limit: int, order: str, **options: Any
    ) -> None:
        from sessions_app.errors import ValidationFailed
        from sessions_app.search.engine import sessions_search

        owner = _user(user)
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


def _user(username: str | None) -> Any:
    """Return the user called ``username`` (None for None), or raise a CommandError."""
    if username is None:
        return None
    from django.contrib.auth import get_user_model

    owner = get_user_model().objects.filter(username=username).first()
    if owner is None:
        raise CommandError(NO_USER.format(user=username))
    return owner


def _size(count: int) -> str:
    """``count`` bytes of output, as a person reads it."""
    if count < 1024:
        return f"{count} bytes"
    size = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"

"""A restore's row load: in one transaction, empty every backed-up table and load the rows.

The rows come from the archive's portable form (JSON lines), its PostgreSQL binary copies
when they fit (a safety backup, ``copies``), or, for an archive that holds only SQLite's native
copy, from that copy read as a database of its own (``sqlite_native.opened``). Each model is
loaded by ``portable.load_model`` (the copies: by ``copies.loader``) and its row count compared
with the manifest; the search index is written once at the end (``derived``), or, on
PostgreSQL, loaded as the archive stored it when it fits (``searchindex``), beside the rows into
a table swapped in at the end where it may be (``swap``). Any error rolls everything back.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from django.db import DatabaseError, connection, models, transaction

from sessions_app.backup import (
    ahead,
    archive,
    copies,
    derived,
    interrupts,
    portable,
    searchindex,
    sqlite_native,
    swap,
)

COUNT_MISMATCH = (
    "{file}: after loading, {model} has {found} rows, the archive says {expected}; the restore "
    "was rolled back and nothing changed."
)
LOAD_FAILED = "{file}: loading {model} failed ({error}); the restore was rolled back."
CHECK_FAILED = "{file}: {error}; the restore was rolled back and nothing changed."
LOGIN_SESSIONS_TABLE = "django_session"
DOCUMENTS_POLL = 0.05  # seconds between looks at a safety backup that may have failed

logger = logging.getLogger(__name__)

Rows = Callable[[type[models.Model], dict[str, Any]], tuple[Iterator[dict[str, Any]], list[str]]]


class LoadError(Exception):
    """The load failed and was rolled back; the message says why."""


@dataclass
class Beside:
    """The safety backup, written beside the load on a connection of its own (``services``).

    It reads the search documents that the load replaces first: the load takes them over
    (TRUNCATE, DROP INDEX: locks that wait for its reading transaction, which would wait for
    them in turn if it came second) only once they are read (``documents``).
    """

    future: Future[Any]
    documents: threading.Event

    def documents_read(self) -> None:
        """Wait until the documents are read or the backup has ended (raise if it failed)."""
        while not self.documents.wait(DOCUMENTS_POLL):
            if self.future.done():
                self.future.result()
                return

    def result(self) -> Any:
        return self.future.result()

    def exception(self) -> BaseException | None:
        return self.future.exception()


@dataclass
class Loaded:
    warnings: list[str] = field(default_factory=list)
    index: str = ""  # how the search index came back


def from_members(opened: archive.Archive) -> Rows:
    """Rows from the archive's JSON-lines members."""

    def rows(
        model: type[models.Model], entry: dict[str, Any]
    ) -> tuple[Iterator[dict[str, Any]], list[str]]:
        return portable.read_rows(opened.member(entry["member"]), model), entry["fields"]

    return rows


def _then(load: Callable[[], int], then: Callable[[], None]) -> Callable[[], int]:
    """Return ``load`` followed by ``then``."""

    def both() -> int:
        loaded = load()
        then()
        return loaded

    return both


@contextlib.contextmanager
def _formatted_ahead(
    opened: archive.Archive,
    loading: list[tuple[type[models.Model], dict[str, Any]]],
    *,
    wanted: bool,
) -> Iterator[ahead.Ahead | None]:
    """Prepare to format the rows ahead (``start``: once the documents are in, while their
    indexes build), and stop that at the end; None if not ``wanted`` or if a plan fails (the
    load then reports why)."""
    formatting = None
    if wanted:
        try:
            with transaction.atomic():  # a savepoint: a failed query leaves the restore usable
                formatting = ahead.Ahead(_ahead_jobs(opened, loading))
        except Exception as exc:
            logger.info("rows not formatted ahead: %s", exc)
    try:
        yield formatting
    finally:
        if formatting is not None:
            formatting.close()


def _ahead_jobs(
    opened: archive.Archive, loading: list[tuple[type[models.Model], dict[str, Any]]]
) -> list[ahead.Job]:
    """The models' loads, formatted ahead from the members (read apart: another thread)."""

    def reader(model: type[models.Model], member: str) -> ahead.Rows:
        return lambda: portable.read_rows(opened.member_apart(member), model)

    return [
        ahead.job(portable.load_plan(model, entry["fields"]), reader(model, entry["member"]))
        for model, entry in loading
    ]


def from_native(alias: str) -> Rows:
    """Rows from a native SQLite copy opened as ``alias``: the columns it has of each model."""

    def rows(
        model: type[models.Model], entry: dict[str, Any]
    ) -> tuple[Iterator[dict[str, Any]], list[str]]:
        present = set(sqlite_native.columns_in(alias, model._meta.db_table))
        names = [
            c.attname
            for c in portable.columns(model)
            if c.column in present and c.attname in entry["fields"]
        ]
        return portable.rows_of(model, using=alias, names=names), entry["fields"]

    return rows


def _empty(current: list[type[models.Model]], derived_loaded: bool) -> None:
    """Empty the backed-up, derived (unless already loaded) and login-session tables (login
    sessions: their user ids may now be other users). PostgreSQL: TRUNCATE where it may (no
    table left out refers to the table, and the role may), DELETE the others."""
    quote = connection.ops.quote_name
    targets = [m._meta.db_table for m in reversed(current)] + [LOGIN_SESSIONS_TABLE]
    if not derived_loaded:
        targets = [m._meta.db_table for m in portable.derived_models()] + targets
    deleted = targets
    if connection.vendor == "postgresql":
        truncated = _truncatable(targets)
        try:
            with transaction.atomic(), connection.cursor() as cursor:  # a savepoint
                if truncated:
                    cursor.execute(f"TRUNCATE {', '.join(quote(t) for t in truncated)}")
            deleted = [table for table in targets if table not in truncated]
        except DatabaseError:
            pass  # not the owner: row by row
    with connection.cursor() as cursor:
        for table in deleted:
            cursor.execute(f"DELETE FROM {quote(table)}")


def _truncatable(tables: list[str]) -> set[str]:
    """Return those of ``tables`` that TRUNCATE may empty together: no table outside the set
    has a foreign key to one of them (the search documents, when loaded first, refer to the
    sessions, which refer to projects and users)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, p.relname FROM pg_constraint k "
            "JOIN pg_class c ON c.oid = k.conrelid JOIN pg_class p ON p.oid = k.confrelid "
            "WHERE k.contype = 'f' AND pg_table_is_visible(p.oid)"
        )
        references = cursor.fetchall()
    found = set(tables)
    while True:
        blocked = {parent for child, parent in references if parent in found and child not in found}
        if not blocked:
            return found
        found -= blocked


def load(
    opened: archive.Archive,
    rows: Rows,
    current: list[type[models.Model]],
    same_migrations: bool,
    reporter: Any,
    *,
    beside: Beside | None = None,
    members: bool = False,
    copied: bool = False,
) -> Loaded:
    """Replace the data of ``current`` models with the archive's, all or nothing.

    ``beside``: the safety backup, running in a thread of its own on a connection of its own;
    waited for (and its error raised, rolling back) before any backed-up row is touched. On
    PostgreSQL with stored documents, their load and index builds (the server's work) run
    meanwhile: where the documents table may be swapped (``swap``), on a connection of their
    own into a table of their own, swapped in once the rows are loaded; else in this
    transaction, once the safety backup has read them (``Beside``). When ``rows`` are the
    archive's members (``members``), a thread formats them as COPY data ahead of their load
    (``ahead``). ``copied``: load the archive's binary copies instead of ``rows`` (``copies``:
    they fit).
    """
    manifest, file = opened.manifest, opened.path
    by_label = {model._meta.label_lower: model for model in current}
    loading = [(by_label[e["model"]], e) for e in manifest["models"] if e["model"] in by_label]
    tables = [model._meta.db_table for model in current]
    derived_tables = [model._meta.db_table for model in portable.derived_models()]
    index = manifest.get("search_index")
    why_not = searchindex.unusable(index, same_migrations)
    stored = None
    if why_not is None and index is not None:
        stored = searchindex.loader(opened.member(index["member"]), index)
    done = Loaded(index="loaded as stored" if stored else f"rebuilt ({why_not})")
    shape = _swappable(index) if stored is not None and beside is not None else None
    first = stored is not None and beside is not None and shape is None
    try:
        with contextlib.ExitStack() as stack:
            if shape is not None:
                stored = _beside(stack, opened, index, shape, reporter)
            stack.enter_context(transaction.atomic())
            # Runs just before the commit: Ctrl-C from then on is recorded, not obeyed.
            stack.callback(interrupts.point_of_no_return)
            formatting = stack.enter_context(
                _formatted_ahead(
                    opened, loading, wanted=(first or bool(shape)) and members and not copied
                )
            )
            if formatting is not None and shape is None:
                stored = _then(stored, formatting.start)  # while the indexes build
            if beside is not None and shape is None:
                reporter.note("safety backup reading the documents")
                beside.documents_read()  # before this transaction locks them
            if first:
                reporter.note("search index")
            with derived.triggers_off(
                tables, [] if shape is not None else derived_tables, stored, first=first
            ) as loaded_first:
                if beside is not None:
                    reporter.note("waiting for the safety backup")
                    beside.result()
                if formatting is not None and shape is not None:
                    # Not sooner: its Python would slow the safety backup's and the documents'.
                    formatting.start()
                reporter.note("emptying the tables")
                if shape is not None:
                    swap.detach(shape)
                _empty(current, derived_loaded=loaded_first or shape is not None)
                _load_models(
                    opened,
                    loading=loading,
                    rows=rows,
                    done=done,
                    reporter=reporter,
                    copied=copied,
                    formatting=formatting,
                )
                portable.reset_sequences(current)
                reporter.note(_after_rows(loaded_first, shape is not None, stored is not None))
    except DatabaseError as exc:  # a foreign key broken, found when checked after the load
        error = str(exc).strip().removesuffix(".")  # the server's DETAIL ends with one
        raise LoadError(CHECK_FAILED.format(file=file, error=error)) from exc
    return done


def _load_models(
    opened: archive.Archive,
    *,
    loading: list[tuple[type[models.Model], dict[str, Any]]],
    rows: Rows,
    done: Loaded,
    reporter: Any,
    copied: bool,
    formatting: ahead.Ahead | None,
) -> None:
    """Load each model's rows: its binary copies (``copied``), its COPY data formatted ahead,
    or ``rows``."""
    reporter.stage("load", sum(entry["rows"] for _, entry in loading))
    for n, (model, entry) in enumerate(loading):
        send = None  # its rows, loaded here from ``rows``
        if copied:
            send = copies.loader(opened, model, entry)
        elif formatting is not None:
            send = partial(formatting.send, n)
        _load_model(
            file=opened.path,
            rows=rows,
            model=model,
            entry=entry,
            done=done,
            reporter=reporter,
            send=send,
        )


def _after_rows(loaded_first: bool, beside: bool, stored: bool) -> str:
    """The progress note for what the restore does after the rows: it names where time goes."""
    if loaded_first:
        return "checking foreign keys, committing"
    if beside:
        return "waiting for the search index beside, swapping it in"
    return "search index" if stored else "rebuilding the search index"


def _swappable(index: dict[str, Any] | None) -> swap.Shape | None:
    """The documents table's shape, if the stored documents can load beside (``swap``)."""
    if index is None or connection.vendor != "postgresql":
        return None
    found = swap.shape(index["table"])
    if isinstance(found, str):
        logger.info("search documents loaded in the restore's transaction: %s", found)
        return None
    return found


def _beside(
    stack: contextlib.ExitStack,
    opened: archive.Archive,
    index: dict[str, Any],
    shape: swap.Shape,
    reporter: Any,
) -> Callable[[], int]:
    """Start loading the stored documents beside (``swap``); return what, in the restore's
    transaction, waits for them and swaps them in. ``stack`` ends it: stopped if the restore
    failed, the lock let go."""
    from sessions_app.models import SearchDocument

    reporter.note("search index beside")
    stack.enter_context(swap.locked())
    names = [name for name, _ in index["columns"]]
    side = swap.start(shape, names, lambda: opened.member_apart(index["member"]))
    stack.callback(side.stop)

    def swapped() -> int:
        loaded = side.result()
        swap.swap_in(shape, SearchDocument)
        return loaded

    return swapped


def _load_model(
    *,
    file: object,
    rows: Rows,
    model: type[models.Model],
    entry: dict[str, Any],
    done: Loaded,
    reporter: Any,
    send: Callable[[Any], portable.LoadReport] | None = None,
) -> None:
    """Load one model (``send``: its rows formatted ahead) and compare its row count."""
    try:
        if send is not None:
            report = send(reporter.advance)
        else:
            found_rows, archived_fields = rows(model, entry)
            report = portable.load_model(model, archived_fields, found_rows, reporter.advance)
    except archive.ArchiveError:
        raise
    except Exception as exc:
        message = LOAD_FAILED.format(file=file, model=entry["model"], error=exc)
        raise LoadError(message) from exc
    done.warnings.extend(report.dropped)
    if report.defaulted:
        done.warnings.append(
            f"{report.model}: not in the archive, defaulted: {', '.join(report.defaulted)}"
        )
    if report.ignored:
        done.warnings.append(
            f"{report.model}: columns this code lacks, left out: {', '.join(report.ignored)}"
        )
    expected = entry["rows"] - len(report.dropped)
    found = portable.count_rows(model)
    if found != expected:
        raise LoadError(
            COUNT_MISMATCH.format(file=file, model=entry["model"], found=found, expected=expected)
        )

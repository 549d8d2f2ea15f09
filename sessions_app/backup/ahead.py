"""A restore's rows formatted as COPY data in a thread, while the server builds the index.

On PostgreSQL a restore with the archive's stored search documents loads and indexes them
(``load``): seconds of the server's work (the GIN index cannot be built in parallel before
PostgreSQL 18), first in the restore's own backend, or beside it in a table swapped in at the
end (``swap``). Meanwhile (in the first case while they load, in the second once the safety
backup is written) a thread of this module decodes the portable form and formats each model's
rows as the COPY data its load sends (binary or text, as ``portable.load_model`` chooses), up
to ``AHEAD_BYTES`` in memory. Once the backed-up tables are emptied, each model's data is sent
as it is, and what is not formatted yet follows as the thread formats it. The rows, values,
dropped rows and counts are those of a load without it; only when the client's work happens
changes. An error in the thread fails that model's load, which rolls the restore back.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from django.db import connection, models
from psycopg.copy import Copy, Writer

from sessions_app.backup import pgcopy
from sessions_app.backup.portable import LoadPlan, LoadReport, Progress

# COPY data formatted ahead of the load and not sent yet, at most (bytes).
AHEAD_BYTES = 256 * 1024 * 1024
BLOCK = 1024 * 1024

Rows = Callable[[], Iterator[dict[str, Any]]]


class _Stopped(Exception):
    """The restore no longer needs the rows (it failed, or is done)."""


@dataclass
class Job:
    """One model to format: its plan, its archived rows and the COPY it is sent with."""

    plan: LoadPlan
    rows: Rows
    table: str
    names: list[str]  # database columns, in ``plan.cols`` order
    types: list[int] | None  # binary COPY: the columns' type OIDs


class _Spool(Writer):
    """One model's COPY data, in blocks, from the formatting thread to the sender."""

    def __init__(self, ahead: Ahead) -> None:
        self.ahead = ahead
        self.buffer = bytearray()
        self.blocks: deque[tuple[bytes, int]] = deque()  # (data, rows it completes)
        self.rows = 0  # formatted, not yet handed over
        self.finished = False
        self.error: BaseException | None = None

    def write(self, data: Any) -> None:  # called by psycopg's Copy, in the thread
        self.buffer += data
        if len(self.buffer) >= BLOCK:
            self._hand_over()

    def finish(self, exc: BaseException | None = None) -> None:
        if exc is None and (self.buffer or self.rows):
            self._hand_over()

    def _hand_over(self) -> None:
        block, self.buffer = bytes(self.buffer), bytearray()
        with self.ahead.changed:
            while self.ahead.used >= AHEAD_BYTES and not self.ahead.stopped:
                self.ahead.changed.wait()
            if self.ahead.stopped:
                raise _Stopped
            self.blocks.append((block, self.rows))
            self.rows = 0
            self.ahead.used += len(block)
            self.ahead.changed.notify_all()

    def drain(self) -> Iterator[tuple[bytes, int]]:
        """Yield the blocks as they are formatted, until the model's last (the sender)."""
        changed = self.ahead.changed
        while True:
            with changed:
                while not self.blocks and not self.finished:
                    changed.wait()
                if self.blocks:
                    block, rows = self.blocks.popleft()
                    self.ahead.used -= len(block)
                    changed.notify_all()
                elif self.error is not None:
                    raise self.error
                else:
                    return
            yield block, rows


class Ahead:
    """Format ``jobs`` (in load order) in a thread; ``send`` each one's data in turn."""

    def __init__(self, jobs: list[Job]) -> None:
        self.changed = threading.Condition()
        self.used = 0
        self.stopped = False
        self.jobs = jobs
        self.spools = [_Spool(self) for _ in jobs]
        # psycopg's Copy with a writer of its own formats only, never using the connection;
        # made here all the same (reading the connection's encoding and adapters), one cursor
        # each (a Copy sets the types of its cursor's adapters).
        self.cursors = [connection.connection.cursor() for _ in jobs]
        self.copies = []
        for job, spool, cursor in zip(jobs, self.spools, self.cursors, strict=True):
            copy = Copy(cursor, binary=job.types is not None, writer=spool)
            if job.types is not None:
                copy.set_types(job.types)
            self.copies.append(copy)
        self.thread = threading.Thread(target=self._run, name="backup-ahead", daemon=True)

    def start(self) -> None:
        """Start formatting: once the server works alone (the GIL is then the thread's)."""
        self.thread.start()

    def _run(self) -> None:
        failed: BaseException | None = None
        for job, spool, copy in zip(self.jobs, self.spools, self.copies, strict=True):
            try:
                if failed is None:
                    self._format(job, spool, copy)
            except BaseException as exc:  # handed to the sender of this model
                failed = exc
            with self.changed:
                spool.finished = True
                if failed is not None:
                    spool.error = failed
                self.changed.notify_all()

    def _format(self, job: Job, spool: _Spool, copy: Copy) -> None:
        rows = job.rows()
        values = job.plan.values(rows)
        try:
            with copy:
                for row in values:
                    copy.write_row(row)
                    spool.rows += 1
                    if self.stopped:
                        raise _Stopped
        finally:
            values.close()
            close = getattr(rows, "close", None)
            if close is not None:
                close()  # stops the member's inflating thread

    def send(self, number: int, done: Progress) -> LoadReport:
        """Send job ``number``'s rows to its table (its COPY), calling ``done`` with rows sent."""
        job, spool = self.jobs[number], self.spools[number]
        sql = pgcopy.copy_sql(job.table, job.names, binary=job.types is not None)
        with connection.cursor() as cursor, cursor.cursor.copy(sql) as copy:
            for block, rows in spool.drain():
                copy.write(block)
                if rows:
                    job.plan.report.rows += rows
                    done(rows)
        return job.plan.report

    def close(self) -> None:
        """Stop formatting (what is left is not needed) and wait for the thread."""
        with self.changed:
            self.stopped = True
            self.changed.notify_all()
        if self.thread.is_alive():
            self.thread.join()
        for cursor in self.cursors:
            cursor.close()


def job(plan: LoadPlan, rows: Rows) -> Job:
    """Return the job of loading ``plan``'s model with COPY (PostgreSQL)."""
    model: type[models.Model] = plan.model
    names = [c.column for c in plan.cols]
    types = pgcopy.column_types(model._meta.db_table, names) if plan.binary_copy else None
    return Job(plan, rows, model._meta.db_table, names, types)

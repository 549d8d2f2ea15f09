"""Project snapshots: what the page needs to show a project's terminals, in one answer.

A snapshot is the project's open terminals with each one's newest output. A terminal that
runs in this process gives its output from memory (no database); any other from its storage
provider. The page writes each tail into its terminal and attaches with ``?offset=<end>``,
so the WebSocket sends only what came after: switching project costs one request, once.

The user's recently shown projects are remembered per process (a small LRU): their providers
are told to keep them warm (``prefetch`` / ``resume_project``) and to let go of a project that
falls out (``suspend_project``). Those calls may touch the database, so they run in a worker
thread of this module, in order, off the request.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import queue
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from channels.db import database_sync_to_async
from django.contrib.auth.models import AbstractBaseUser
from django.db import connections

from sessions_app import conf, selectors, services, storage, terminals
from sessions_app.errors import NotFound, ValidationFailed
from sessions_app.states import LIVE_STATES
from sessions_app.storage import Scrollback, SessionRecord, get_storage

logger = logging.getLogger(__name__)

DEFAULT_TAIL_BYTES = 256 * 1024
RECENT_PROJECTS = 5
WARM_SECONDS = 30.0
_WHOLE_NUMBER = re.compile(r"[0-9]{1,12}")
MSG_BAD_TAIL = "tail must be a whole number of bytes from 0 to {limit} (TERMSYS_SCROLLBACK_BYTES)."


def parse_tail(value: str | None) -> int:
    """Return the ``tail`` query parameter as a byte count, or raise ValidationFailed."""
    limit = conf.scrollback_bytes()
    if value is None or value == "":
        return min(DEFAULT_TAIL_BYTES, limit)
    # str.isdigit() also holds for "²" (int() refuses it) and "٣" (int() reads 3): ASCII only
    if not _WHOLE_NUMBER.fullmatch(value) or int(value) > limit:
        raise ValidationFailed(
            MSG_BAD_TAIL.format(limit=limit),
            details={"field": "tail", "value": value[:40], "max": limit},
        )
    return int(value)


# --- scrollback ---------------------------------------------------------------------------------


def _stored_tail(record: SessionRecord, max_bytes: int) -> Scrollback:
    try:
        return get_storage(record.storage_mode).read_scrollback(record.id, max_bytes=max_bytes)
    except NotFound:  # listed by one provider, unknown to its own (LOCAL after a restart)
        end = record.output_bytes
        return Scrollback(data=b"", start=end, end=end, pruned=end > 0)


class Base64(bytes):
    """Base64 text (ASCII): JSON carries it as a string with nothing to escape."""


def encode_json(body: dict[str, Any]) -> bytes:
    """Return ``body`` as JSON, splicing Base64 values in as they are.

    A snapshot is mostly base64 text; json.dumps would scan every byte of it for characters
    to escape, which costs more than producing it. Only the small rest goes through dumps.
    """
    blobs: list[bytes] = []
    marker = f"@base64-{secrets.token_hex(8)}-"

    def placeholder(value: object) -> str:
        if not isinstance(value, Base64):
            raise TypeError(f"{type(value).__name__} is not JSON serializable")
        blobs.append(value)
        return f"{marker}{len(blobs) - 1}"

    text = json.dumps(body, default=placeholder)
    first, *rest = text.split(f'"{marker}')
    parts = [first.encode()]
    for piece in rest:
        index, after = piece.split('"', 1)
        parts += [b'"', blobs[int(index)], b'"', after.encode()]
    return b"".join(parts)


def _scrollback_json(scrollback: Scrollback) -> dict[str, Any]:
    return {
        "data": Base64(binascii.b2a_base64(scrollback.data, newline=False)),
        "offset": scrollback.start,
        "end": scrollback.end,
        "pruned": scrollback.pruned,
    }


def _is_orphan(record: SessionRecord) -> bool:
    """Return whether a session looks live but its server process is gone."""
    return (
        record.state in LIVE_STATES
        and terminals.get(record.id) is None
        and bool(record.node)
        and not terminals.node_is_alive(record.node)
    )


def _load(
    user: AbstractBaseUser, project_id: int, tail_bytes: int
) -> tuple[int, list[SessionRecord], dict[str, Scrollback]]:
    """Return the project's open sessions and the stored tails of those not live here.

    Two queries when every session is live in this process: the project (ownership) and
    the session list. Orphans (their server died) are reconciled first, which is rare.
    """
    project = selectors.project_get(user=user, project_id=project_id)
    records = storage.list_for_project(project.pk)
    if any(_is_orphan(r) for r in records):
        services.sessions_reconcile(user=user)
        records = storage.list_for_project(project.pk)
    stored = {r.id: _stored_tail(r, tail_bytes) for r in records if terminals.get(r.id) is None}
    return project.pk, records, stored


async def _live_tail(terminal: terminals.LiveTerminal, max_bytes: int) -> Scrollback:
    history = None
    if terminal.needs_history(None, max_bytes):  # memory let go of it; storage has it
        history = await database_sync_to_async(terminal.storage.read_scrollback)(
            terminal.session_id, max_bytes=max_bytes
        )
    if asyncio.get_running_loop() is terminal.loop:
        return terminal.tail(max_bytes, history)

    async def read() -> Scrollback:
        return terminal.tail(max_bytes, history)

    return await terminals.call_on_owner_loop(terminal, read)


async def project_snapshot(
    *, user: AbstractBaseUser, project_id: int, tail_bytes: int
) -> dict[str, Any]:
    """Return the project's open terminals, each with its newest ``tail_bytes`` of output.

    Each terminal is ``api.session_json`` plus ``scrollback``: ``data`` (Base64, see
    ``encode_json``), ``offset`` and ``end`` (the byte range of the session's output it holds)
    and ``pruned`` (output before ``offset`` exists, or existed, but is not included).
    Raises NotFound for a project that is not the user's.
    """
    # Imported here: api.py imports this module, and session_json is the API's one shape.
    from sessions_app.api import session_json

    pk, records, stored = await database_sync_to_async(_load)(user, project_id, tail_bytes)
    result = []
    for record in records:
        scrollback = stored.get(record.id)
        if scrollback is None:
            terminal = terminals.get(record.id)
            if terminal is not None:
                scrollback = await _live_tail(terminal, tail_bytes)
            else:  # it ended and left the registry since the list was read
                scrollback = await database_sync_to_async(_stored_tail)(record, tail_bytes)
        result.append({**session_json(record), "scrollback": _scrollback_json(scrollback)})
    recent_projects.touch(user.pk, pk, {r.storage_mode for r in records})
    active = sum(1 for r in records if r.state in LIVE_STATES)
    return {"projectId": pk, "terminals": result, "activeCount": active}


# --- recently used projects -------------------------------------------------------------------


class RecentProjects:
    """Each user's last ``size`` projects shown, and the provider hooks that follow from it.

    A project shown is resumed and the user's other recent ones prefetched, each at most
    once per ``warm_seconds``: warming is a database read in HYBRID, and re-reading what is
    already in memory on every switch measurably slowed switching down (bench/README.md).
    A project that falls out of the list is suspended.
    """

    def __init__(
        self,
        size: int = RECENT_PROJECTS,
        *,
        warm_seconds: float = WARM_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = size
        self.warm_seconds = warm_seconds
        self._clock = clock
        self._lock = threading.Lock()
        # user id -> project id -> storage modes of its sessions, most recent last
        self._by_user: dict[int, OrderedDict[int, frozenset[str]]] = {}
        self._warmed: dict[int, float] = {}  # project id -> when it was last warmed
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._queued = 0

    def recent(self, user_id: int) -> list[int]:
        """Return the user's recent project ids, most recent first."""
        with self._lock:
            return list(reversed(self._by_user.get(user_id, {})))

    def touch(self, user_id: int, project_id: int, modes: Iterable[str]) -> None:
        """Record that ``project_id`` is on screen; warm it and the other recent ones."""
        modes = frozenset(modes) | {conf.storage_mode()}
        now = self._clock()
        with self._lock:
            lru = self._by_user.setdefault(user_id, OrderedDict())
            if next(reversed(lru), None) == project_id and lru[project_id] == modes:
                return  # already the project on screen: nothing changes
            lru[project_id] = modes
            lru.move_to_end(project_id)
            evicted = []
            while len(lru) > self.size:
                evicted.append(lru.popitem(last=False))
            for pid, _ in evicted:
                self._warmed.pop(pid, None)
            resume = self._cold(project_id, now)
            others = [(p, m) for p, m in lru.items() if p != project_id and self._cold(p, now)]
            for pid in [project_id] * resume + [p for p, _ in others]:
                self._warmed[pid] = now
        if evicted or resume or others:
            self._submit(
                lambda: self._apply(project_id if resume else None, modes, others, evicted)
            )

    def _cold(self, project_id: int, now: float) -> bool:
        warmed = self._warmed.get(project_id)
        return warmed is None or now - warmed >= self.warm_seconds

    @staticmethod
    def _apply(
        project_id: int | None,
        modes: frozenset[str],
        others: list[tuple[int, frozenset[str]]],
        evicted: list[tuple[int, frozenset[str]]],
    ) -> None:
        for pid, pmodes in evicted:
            for mode in sorted(pmodes):
                get_storage(mode).suspend_project(pid)
        if project_id is not None:
            for mode in sorted(modes):
                get_storage(mode).resume_project(project_id)
        by_mode: dict[str, list[int]] = {}
        for pid, pmodes in others:
            for mode in pmodes:
                by_mode.setdefault(mode, []).append(pid)
        for mode, ids in sorted(by_mode.items()):
            get_storage(mode).prefetch(ids)

    def _submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._queued += 1
            self._idle.clear()
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(
                    target=self._run, name="termsys-workspace", daemon=True
                )
                self._worker.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is not None:
                    job()
            except Exception:
                logger.exception("warming recent projects failed")
            finally:
                # This thread's connection would otherwise stay open between rare jobs.
                connections.close_all()
                with self._lock:
                    self._queued -= 1
                    if self._queued == 0:
                        self._idle.set()

    def wait_idle(self, timeout: float = 10) -> bool:
        """Wait until every queued hook has run (for tests); return False on timeout."""
        return self._idle.wait(timeout)

    def clear(self) -> None:
        with self._lock:
            self._by_user.clear()
            self._warmed.clear()


recent_projects = RecentProjects()

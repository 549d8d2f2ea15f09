"""Shell integration: what a session's output reports, and what termsys does with it.

``ShellParser`` reads the marks the prompt hook writes (see shellhook.py; also the ``133``
spelling of them) and OSC 0/2 titles set by any program, from the output stream split at any
byte; ``ShellTracker`` turns them into ``command`` events, titles (and ``title`` events) and
the session's cwd, following shells started inside the session's shell by the ``aid`` their
marks carry. The marks stay in the output clients see (terminals ignore OSC they do not know).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import pwd
import re
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from django.conf import settings

from sessions_app.dbthread import db_call
from sessions_app.storage import get_storage

if TYPE_CHECKING:
    from sessions_app.terminals import LiveTerminal

logger = logging.getLogger(__name__)

# An OSC longer than this is not one of ours (nor a title): it is dropped, not buffered.
MAX_OSC_BYTES = 16 * 1024
TITLE_MAX = 200
COMMAND_MAX = 4096
MASK = "****"
# Flags are looked up at most this often per terminal; titles stored at most this often.
FLAG_SECONDS = 1.0
TITLE_SECONDS = 0.25
# A title is recorded as a ``title`` event once it has held this long, or, while titles keep
# changing, once this long after the first one not recorded.
TITLE_EVENT_SECONDS = 1.0
TITLE_EVENT_MAX_SECONDS = 30.0
# Shells inside shells tracked at most (a deeper one loses the outermost).
MAX_SHELLS = 8

# --- parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShellEvent:
    """One thing the output stream reported.

    ``kind``: ``cwd`` (text: the path, host: who reported it), ``title``, ``prompt`` (A),
    ``input`` (B: the command line is being typed), ``command_line`` (E; text),
    ``executed`` (C), ``finished`` (D; code: the exit code or None; duration_ms: as the
    shell measured it, or None). ``aid`` (A and D): which shell wrote the mark, when it says.
    """

    kind: str
    text: str = ""
    code: int | None = None
    host: str = ""
    duration_ms: int | None = None
    aid: str = ""


_MARKS = {b"A": "prompt", b"B": "input", b"C": "executed", b"D": "finished", b"E": "command_line"}
_UNESCAPE_RE = re.compile(r"\\(\\|x[0-9a-fA-F]{2})")


def _unescape(text: str) -> str:
    return _UNESCAPE_RE.sub(lambda m: "\\" if m[1] == "\\" else chr(int(m[1][1:], 16)), text)


def _decode_osc(payload: bytes) -> ShellEvent | None:
    """Return the event an OSC payload (between ``ESC ]`` and its terminator) reports."""
    code, _, rest = payload.partition(b";")
    if code in (b"0", b"2"):
        return ShellEvent("title", rest.decode("utf-8", "replace"))
    if code == b"7":
        try:
            url = urlsplit(rest.decode("utf-8", "replace"))
        except ValueError:
            return None
        if url.scheme != "file" or not url.path.startswith("/"):
            return None
        return ShellEvent("cwd", unquote(url.path, errors="replace"), host=url.hostname or "")
    if code not in (b"133", b"633"):
        return None
    mark, _, args = rest.partition(b";")
    kind = _MARKS.get(mark)
    if kind == "finished":
        status, *params = args.split(b";")
        duration = _param(params, b"duration=")
        return ShellEvent(
            kind,
            code=int(status) if status.isdigit() else None,
            duration_ms=int(duration) if duration.isdigit() else None,
            aid=_param(params, b"aid=").decode("ascii", "replace"),
        )
    if kind == "command_line":
        line = args.partition(b";")[0].decode("utf-8", "replace")
        return ShellEvent(kind, _unescape(line))
    if kind == "prompt":
        return ShellEvent(kind, aid=_param(args.split(b";"), b"aid=").decode("ascii", "replace"))
    return ShellEvent(kind) if kind else None


def _param(params: list[bytes], name: bytes) -> bytes:
    return next((p[len(name) :] for p in params if p.startswith(name)), b"")


class ShellParser:
    """Find OSC sequences in output read in pieces, whatever byte a piece ends at.

    Only an OSC still open at the end of a piece is kept (at most MAX_OSC_BYTES); a piece with
    no ESC in it costs one ``memchr``.
    """

    __slots__ = ("_carry",)

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, data: bytes) -> Sequence[ShellEvent]:
        """Return the events in ``data`` (and what earlier pieces left open)."""
        if self._carry:
            data = self._carry + data
            self._carry = b""
        elif b"\x1b" not in data:  # most reads: one memchr
            return ()
        # The two-byte search is ~100 times slower than memchr: only when both bytes occur.
        start = data.find(b"\x1b]") if b"]" in data else -1
        if start < 0:
            if data[-1:] == b"\x1b":
                self._carry = b"\x1b"
            return []
        return self._scan(data, start)

    def _scan(self, data: bytes, start: int) -> list[ShellEvent]:
        events: list[ShellEvent] = []
        size = len(data)
        while start >= 0:
            body = start + 2
            limit = body + MAX_OSC_BYTES
            bel = data.find(b"\x07", body, limit)
            esc = data.find(b"\x1b", body, bel if bel >= 0 else limit)
            if esc >= 0:  # ESC \ ends the OSC; any other ESC abandons it
                if esc + 1 == size:
                    self._carry = data[start:]
                    return events
                if data[esc + 1] == 0x5C:
                    event = _decode_osc(data[body:esc])
                    if event is not None:
                        events.append(event)
                    start = data.find(b"\x1b]", esc + 2)
                else:
                    start = data.find(b"\x1b]", esc)
                continue
            if bel < 0:
                if size < limit:  # still open: wait for the rest
                    self._carry = data[start:]
                    return events
                start = data.find(b"\x1b]", limit)  # too long to be ours: skip it
                continue
            event = _decode_osc(data[body:bel])
            if event is not None:
                events.append(event)
            start = data.find(b"\x1b]", bel + 1)
        if data[-1:] == b"\x1b":
            self._carry = b"\x1b"
        return events


# --- masking and titles -----------------------------------------------------------------------


@lru_cache(maxsize=8)
def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p) for p in patterns)


def mask(text: str) -> str:
    """Replace the secrets TERMSYS_MASK_PATTERNS finds in ``text`` with ``****``.

    A pattern's match is replaced, or only what its first group matched when it has groups.
    """
    for pattern in _compiled(tuple(settings.TERMSYS_MASK_PATTERNS)):
        if pattern.groups:

            def keep_rest(m: re.Match[str]) -> str:
                whole, (a, b) = m[0], m.span(1)
                if a < 0:
                    return whole
                return whole[: a - m.start()] + MASK + whole[b - m.start() :]

            text = pattern.sub(keep_rest, text)
        else:
            text = pattern.sub(MASK, text)
    return text


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean_title(text: str) -> str:
    """Return a title fit to show and store: one line, no control characters, masked."""
    text = text.strip().splitlines()[0] if text.strip() else ""
    text = _CONTROL_RE.sub("", text).replace("\ufffd", "").strip()
    return mask(text)[:TITLE_MAX].strip()


@lru_cache(maxsize=1)
def _home() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir.rstrip("/")
    except KeyError:
        return ""


def cwd_title(path: str) -> str:
    """Return ``path`` with the home directory shown as ``~`` (``~/proj/api``)."""
    home = _home()
    if home and (path == home or path.startswith(home + "/")):
        return "~" + path[len(home) :]
    return path


def _is_local(host: str) -> bool:
    return host in ("", "localhost", socket.gethostname())


# --- the live session's side ------------------------------------------------------------------


@dataclass
class _Running:
    line: str
    cwd: str
    started: float


@dataclass
class _Shell:
    """A shell in the session (the session's own, or one started inside it)."""

    aid: str  # as its marks name it ("": not known yet)
    running: _Running | None = None


class ShellTracker:
    """What one live terminal's shell reports: commands, titles, its working directory.

    ``feed`` runs on the terminal's output path for every read; it only parses and queues.
    Flags, storage and clients are dealt with in a task of the terminal.
    """

    def __init__(self, terminal: LiveTerminal) -> None:
        self.terminal = terminal
        self.parser = ShellParser()
        self.cwd = ""  # as the shell last reported it
        self._shells = [_Shell("")]  # the innermost last: the one whose prompt was shown last
        self._command_line: str | None = None
        self._program_title = False  # a program set the title since the last command started
        self._actions: deque[tuple[str, Any]] = deque()
        self._task: asyncio.Task | None = None
        self._flags_at = -FLAG_SECONDS
        self.activity = False
        self.titles = False
        self.tab_name = ""
        self.title: str | None = None  # the title stored and shown ("": the tab name)
        self._wanted_title: str | None = None
        self._title_handle: asyncio.TimerHandle | None = None
        self._title_at = -TITLE_SECONDS
        self._event_title: str | None = None  # the title last recorded as an event
        self._event_handle: asyncio.TimerHandle | None = None
        self._event_since = 0.0  # when the first title not recorded yet was shown

    def feed(self, data: bytes) -> None:
        """Parse a piece of output; queue what it reports."""
        events = self.parser.feed(data)
        if not events:
            return
        now = time.monotonic()
        for event in events:
            self._on_event(event, now)
        if self._actions and (self._task is None or self._task.done()):
            self._task = self.terminal._spawn(self._process())

    def _shell(self, aid: str) -> _Shell:
        """Return the shell whose mark names ``aid``, forgetting the shells it outlived.

        Shells started in it that ended without a D mark (``exit``, Ctrl-D) are forgotten, and
        with them their last command: ``exit`` is not recorded.
        """
        shells = self._shells
        if aid:
            for i in range(len(shells) - 1, -1, -1):
                if shells[i].aid == aid:
                    del shells[i + 1 :]
                    break
        return shells[-1]

    def _on_prompt(self, aid: str) -> None:
        if not aid:
            return
        shell = self._shell(aid)
        if shell.aid == aid:
            shell.running = None  # a command its shell never reported finished (exec)
        elif shell.running is not None:  # a shell started by the running command
            self._shells.append(_Shell(aid))
            del self._shells[:-MAX_SHELLS]
            if not self._program_title and self.cwd:
                self._actions.append(("title", cwd_title(self.cwd)))
        else:
            shell.aid = aid

    def _on_event(self, event: ShellEvent, now: float) -> None:
        kind = event.kind
        if kind == "command_line":
            self._command_line = event.text
        elif kind == "prompt":
            self._on_prompt(event.aid)
        elif kind == "executed":
            line = (self._command_line or "")[:COMMAND_MAX]
            self._command_line = None
            self._shells[-1].running = _Running(line, self.cwd or self.terminal.cwd, now)
            self._program_title = False
            if line.strip():
                self._actions.append(("title", line))
        elif kind == "finished":
            shell = self._shell(event.aid)
            running, shell.running = shell.running, None
            if running is not None:
                duration = event.duration_ms
                if duration is None:  # measured here: later by the time the C mark took
                    duration = round((now - running.started) * 1000)
                self._actions.append(("command", (running, event.code, duration)))
        elif kind == "cwd":
            self.cwd = event.text
            at_prompt = self._shells[-1].running is None
            # The session's cwd is its own shell's (housekeeping reads that one's from /proc
            # too): not a nested shell's, nor one a program reports while it runs.
            if at_prompt and len(self._shells) == 1 and _is_local(event.host):
                self._actions.append(("cwd", event.text))
            if at_prompt and not self._program_title:
                self._actions.append(("title", cwd_title(event.text)))
        elif kind == "title":
            self._program_title = True
            self._actions.append(("title", event.text))

    async def _process(self) -> None:
        while self._actions:
            actions = list(self._actions)
            self._actions.clear()
            try:
                await self._refresh_flags()
                await self._apply(actions)
            except Exception as exc:  # the database is down: what it reported is dropped
                logger.warning(
                    "shell integration of %s: %d report(s) not recorded: %s",
                    self.terminal.session_id,
                    len(actions),
                    exc,
                )

    async def _refresh_flags(self) -> None:
        if time.monotonic() - self._flags_at < FLAG_SECONDS:
            return
        self._flags_at = time.monotonic()
        self.activity, self.titles, self.tab_name = await db_call(
            _read_flags, self.terminal.session_id, self.terminal.user_id
        )

    async def _apply(self, actions: list[tuple[str, Any]]) -> None:
        commands = []
        cwd = None
        title = None
        for kind, value in actions:
            if kind == "command":
                running, code, duration = value
                commands.append(
                    {
                        "command": mask(running.line),
                        "cwd": running.cwd,
                        "exitCode": code,
                        "durationMs": duration,
                    }
                )
            elif kind == "cwd":
                cwd = value
            elif kind == "title":
                title = value
        terminal = self.terminal
        if commands and self.activity:
            await db_call(_add_commands, terminal.storage_mode, terminal.session_id, commands)
        if cwd is not None and cwd != terminal.cwd:
            terminal.cwd_changed(cwd)
            await db_call(_record_cwd, terminal.storage_mode, terminal.session_id, cwd)
        if title is not None and self.titles:
            self._want_title(clean_title(title))

    def _want_title(self, title: str) -> None:
        """Show and store ``title`` ("": the tab name), at most every TITLE_SECONDS."""
        self._wanted_title = title
        if self._title_handle is not None:
            return
        delay = max(0.0, self._title_at + TITLE_SECONDS - time.monotonic())
        self._title_handle = self.terminal.loop.call_later(
            delay, self._publish_title, context=contextvars.Context()
        )

    def _publish_title(self) -> None:
        self._title_handle = None
        title, self._wanted_title = self._wanted_title, None
        if title is None or title == self.title or self.terminal.ended:
            return
        self._title_at = time.monotonic()
        self.title = title
        self.terminal.broadcast({"type": "title", "title": title or self.tab_name})
        self.terminal._spawn(self._store_title(title))
        self._want_title_event()

    def _want_title_event(self) -> None:
        """Record the title as an event once it has settled (see TITLE_EVENT_SECONDS)."""
        now = time.monotonic()
        if self._event_handle is None:
            self._event_since = now
        else:
            self._event_handle.cancel()
        delay = min(TITLE_EVENT_SECONDS, self._event_since + TITLE_EVENT_MAX_SECONDS - now)
        self._event_handle = self.terminal.loop.call_later(
            max(0.0, delay), self._record_title_event, context=contextvars.Context()
        )

    def _record_title_event(self) -> None:
        self._event_handle = None
        title = self.title
        if title is None or title == self._event_title or self.terminal.ended:
            return
        if self.activity:  # a title is often the command line: recorded as commands are
            self._event_title = title
            self.terminal._spawn(self._store_title_event(title))

    async def _store_title_event(self, title: str) -> None:
        await self._title_to_storage(_add_title_event, title, "record")

    async def _store_title(self, title: str) -> None:
        await self._title_to_storage(_record_title, title, "store")

    async def _title_to_storage(self, write: Any, title: str, verb: str) -> None:
        terminal = self.terminal
        try:
            await db_call(write, terminal.storage_mode, terminal.session_id, title)
        except Exception:
            logger.warning("could not %s the title of %s", verb, terminal.session_id)

    async def drain(self) -> None:
        """Wait until what the shell reported so far is stored (the terminal is ending).

        A title that has not settled yet is stored on the session, not recorded as an event.
        """
        if self._task is not None and not self._task.done():
            await self._task
        if self._event_handle is not None:
            self._event_handle.cancel()
            self._event_handle = None
        if self._title_handle is not None:
            self._title_handle.cancel()
            self._title_handle = None
            if self._wanted_title is not None and self._wanted_title != self.title:
                self.title, self._wanted_title = self._wanted_title, None
                await self._store_title(self.title)


def _read_flags(session_id: str, user_id: int) -> tuple[bool, bool, str]:
    from featureflags.evaluation import flag_is_active_for
    from sessions_app import storage

    record = storage.find(session_id)
    return (
        flag_is_active_for(user_id, "activity_tracking"),
        flag_is_active_for(user_id, "dynamic_titles"),
        record.tab_name if record is not None else "",
    )


def _add_commands(mode: str, session_id: str, commands: list[dict[str, Any]]) -> None:
    provider = get_storage(mode)
    for data in commands:
        provider.add_event(session_id, "command", data)


def _record_cwd(mode: str, session_id: str, cwd: str) -> None:
    get_storage(mode).update(session_id, cwd=cwd)


def _record_title(mode: str, session_id: str, title: str) -> None:
    get_storage(mode).update(session_id, title=title)


def _add_title_event(mode: str, session_id: str, title: str) -> None:
    get_storage(mode).add_event(session_id, "title", {"title": title})

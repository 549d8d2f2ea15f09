"""Projects, terminal sessions, their events and their stored output."""

from __future__ import annotations

import secrets
import string
import time

from django.conf import settings
from django.db import models

from sessions_app.states import LIVE_STATES, SessionState

SESSION_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_session_id() -> str:
    """Return ``session_<epoch ms>_<8 random [a-z0-9]>`` from a cryptographic source."""
    suffix = "".join(secrets.choice(SESSION_ID_ALPHABET) for _ in range(8))
    return f"session_{int(time.time() * 1000):013d}_{suffix}"


class StorageMode(models.TextChoices):
    LOCAL = "LOCAL"
    DATABASE = "DATABASE"
    HYBRID = "HYBRID"


class Project(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="projects"
    )
    name = models.CharField(max_length=100)
    path = models.CharField(
        max_length=1024, help_text="Working directory of the project's terminals."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "id"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="project_unique_name_per_owner")
        ]

    def __str__(self) -> str:
        return self.name


class TerminalSessionQuerySet(models.QuerySet):
    def live(self) -> TerminalSessionQuerySet:
        return self.filter(state__in=LIVE_STATES)

    def open(self) -> TerminalSessionQuerySet:
        """Sessions still shown as tabs: not closed by their user."""
        return self.filter(closed_at__isnull=True)


class TerminalSession(models.Model):
    id = models.CharField(primary_key=True, max_length=40, default=new_session_id, editable=False)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="sessions")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="terminal_sessions"
    )
    profile = models.CharField(max_length=32, default="system")
    tab_name = models.CharField(max_length=100, blank=True)
    tab_named = models.BooleanField(
        default=False,
        help_text="The user chose the tab name (rename): the tab shows it, not the process title.",
    )
    title = models.CharField(max_length=200, blank=True)
    state = models.CharField(
        max_length=16, choices=SessionState.choices, default=SessionState.CREATING
    )
    cwd = models.CharField(max_length=1024, blank=True)
    pid = models.IntegerField(null=True, blank=True)
    node = models.CharField(
        max_length=200, blank=True, help_text="The server process that owns the PTY."
    )
    storage_mode = models.CharField(
        max_length=16, choices=StorageMode.choices, default=StorageMode.DATABASE
    )
    version = models.PositiveIntegerField(default=1)
    cols = models.PositiveSmallIntegerField(default=80)
    rows = models.PositiveSmallIntegerField(default=24)
    output_bytes = models.BigIntegerField(
        default=0, help_text="Offset of the end of the stored output."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_activity = models.DateTimeField(auto_now_add=True)
    exit_code = models.IntegerField(null=True, blank=True)
    end_reason = models.CharField(
        max_length=32,
        blank=True,
        help_text="Why the shell ended: exited, killed, idle, server_restarted (revivable).",
    )
    closed_at = models.DateTimeField(null=True, blank=True)

    objects = TerminalSessionQuerySet.as_manager()

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            models.Index(fields=["project", "state"], name="session_project_state"),
            models.Index(fields=["user", "state"], name="session_user_state"),
            models.Index(fields=["state", "last_activity"], name="session_state_activity"),
        ]

    def __str__(self) -> str:
        return f"{self.tab_name or self.id} ({self.state})"

    @property
    def is_live(self) -> bool:
        return self.state in LIVE_STATES


class SessionEvent(models.Model):
    class Kind(models.TextChoices):
        CREATED = "created"
        STARTED = "started"
        ATTACHED = "attached"
        DETACHED = "detached"
        RESIZED = "resized"
        RENAMED = "renamed"
        TITLE = "title"
        COMMAND = "command"
        EXITED = "exited"
        KILLED = "killed"
        CLOSED = "closed"
        ERROR = "error"
        MODE_CHANGED = "mode_changed"
        REVIVED = "revived"

    session = models.ForeignKey(TerminalSession, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=32, choices=Kind.choices)
    at = models.DateTimeField(auto_now_add=True)
    data = models.JSONField(default=dict, blank=True)
    key = models.CharField(
        max_length=64,
        null=True,
        blank=True,
        unique=True,
        help_text="Idempotency key of an event written behind from a journal.",
    )

    class Meta:
        ordering = ["at", "id"]
        indexes = [models.Index(fields=["session", "at"], name="event_session_at")]

    def __str__(self) -> str:
        return f"{self.kind} @ {self.at:%Y-%m-%d %H:%M:%S}"


class OutputChunk(models.Model):
    session = models.ForeignKey(TerminalSession, on_delete=models.CASCADE, related_name="chunks")
    seq = models.PositiveIntegerField()
    offset = models.BigIntegerField(
        help_text="Offset of the chunk's first byte in the session's output."
    )
    data = models.BinaryField()
    text = models.TextField(
        blank=True, help_text="The output with escape sequences removed, for search."
    )
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["session", "seq"]
        constraints = [models.UniqueConstraint(fields=["session", "seq"], name="chunk_unique_seq")]
        indexes = [models.Index(fields=["session", "offset"], name="chunk_session_offset")]

    def __str__(self) -> str:
        return f"{self.session_id}#{self.seq}"


class SearchDocument(models.Model):
    """Text a search can find, kept by database triggers (migration 0004_search), never Python.

    One row per output chunk (on PostgreSQL, per 32K-character part of one), per ``command``
    event and per session (its title, tab name and project name). PostgreSQL adds a stored
    ``vector`` column with a GIN index; SQLite keeps the FTS5 table ``sessions_app_search_fts``.
    """

    class Source(models.TextChoices):
        OUTPUT = "output"
        COMMAND = "command"
        SESSION = "session"

    session = models.ForeignKey(
        TerminalSession, on_delete=models.CASCADE, related_name="search_documents"
    )
    source = models.CharField(max_length=8, choices=Source.choices)
    source_id = models.BigIntegerField(null=True, help_text="The chunk's or event's id.")
    part = models.PositiveSmallIntegerField(default=0)
    at = models.DateTimeField()
    body = models.TextField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["source", "source_id", "part"], name="searchdoc_unique_source"
            )
        ]
        indexes = [
            models.Index(fields=["session", "source"], name="searchdoc_session_source"),
            models.Index(fields=["at", "id"], name="searchdoc_at"),
        ]

    def __str__(self) -> str:
        return f"{self.source} {self.source_id}#{self.part} of {self.session_id}"

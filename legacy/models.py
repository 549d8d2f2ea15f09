"""The import ledger: which legacy state files and which legacy sessions are already here."""

from __future__ import annotations

from django.db import models


class LegacyImport(models.Model):
    """One legacy state file, keyed by its sha256, with the totals of the runs that changed data."""

    sha256 = models.CharField(max_length=64, unique=True)
    file_name = models.CharField(max_length=1024)
    records = models.PositiveIntegerField(help_text="Records in the file.")
    imported = models.PositiveIntegerField(help_text="Sessions imported from it, all runs.")
    first_run_at = models.DateTimeField(auto_now_add=True)
    last_run_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-first_run_at", "id"]

    def __str__(self) -> str:
        return f"{self.file_name} ({self.sha256[:12]})"


class LegacySession(models.Model):
    """A legacy session id and the termsys session it became (kept if that is deleted later)."""

    legacy_id = models.CharField(max_length=200, unique=True)
    session = models.OneToOneField(
        "sessions_app.TerminalSession",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="legacy",
    )
    session_key = models.CharField(
        max_length=40, help_text="The termsys session id, kept after the session is deleted."
    )
    source = models.ForeignKey(LegacyImport, on_delete=models.PROTECT, related_name="sessions")
    record_index = models.PositiveIntegerField(help_text="Position of the record in the file.")
    imported_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["imported_at", "id"]

    def __str__(self) -> str:
        return f"{self.legacy_id} -> {self.session_key}"

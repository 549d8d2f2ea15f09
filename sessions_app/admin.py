"""Admin: projects and sessions with filters, events inline, a read-only watch link, and a
kill action. Deleting a session or a project ends its shells first."""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.html import format_html

from sessions_app import names, services
from sessions_app.errors import TermsysError, ValidationFailed
from sessions_app.models import Project, SessionEvent, TerminalSession
from sessions_app.states import LIVE_STATES


class ProjectForm(forms.ModelForm):
    def clean_name(self) -> str:
        """Hold a name typed here to the rule of every other place a project is named."""
        try:
            return names.name_clean(
                self.cleaned_data.get("name"), field="name", refused=names.PROJECT_NAME_SEPARATORS
            )
        except ValidationFailed as exc:
            raise forms.ValidationError(exc.message) from None


MSG_RUNS_ELSEWHERE = (
    "Terminal session {session} runs in another server process ({node}): kill it there first."
)


def _running_elsewhere(sessions: QuerySet[TerminalSession]) -> list[str]:
    """What a delete of ``sessions`` cannot end from this process, for the admin to refuse."""
    found = []
    for session_id in sessions.filter(state__in=LIVE_STATES).values_list("pk", flat=True):
        node = services.session_running_elsewhere(session_id=session_id)
        if node is not None:
            found.append(MSG_RUNS_ELSEWHERE.format(session=session_id, node=node))
    return found


def _end_shells(request: HttpRequest, sessions: QuerySet[TerminalSession]) -> None:
    """Kill the sessions that run (their history stays until the delete removes it)."""
    actor = request.user.get_username()
    for session_id in list(sessions.filter(state__in=LIVE_STATES).values_list("pk", flat=True)):
        try:
            async_to_sync(services.session_kill)(session_id=session_id, actor=actor)
        except TermsysError as exc:
            messages.warning(request, exc.message)


class EndsShellsOnDelete:
    """Admin mixin: deleting objects first ends the shells of the sessions they hold (a
    deleted session's shell would run on, listed and limited by nothing), and refuses what
    runs in another server process.

    The shells are ended before the admin's delete transaction begins: ending one stores its
    last output, which on SQLite would wait for that transaction's lock.
    """

    def sessions_of(self, objs: Any) -> QuerySet[TerminalSession]:
        raise NotImplementedError

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> tuple:
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        elsewhere = _running_elsewhere(self.sessions_of(objs))
        return deleted, counts, perms_needed, [*protected, *elsewhere]

    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict | None = None
    ) -> HttpResponse:
        if request.method == "POST" and request.POST.get("post"):  # the delete, confirmed
            obj = self.get_object(request, unquote(object_id))
            if obj is not None and self.has_delete_permission(request, obj):
                sessions = self.sessions_of([obj])
                if not _running_elsewhere(sessions):
                    _end_shells(request, sessions)
        return super().delete_view(request, object_id, extra_context)

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        self._forget(self.sessions_of([obj]))
        super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        sessions = self.sessions_of(queryset)
        _end_shells(request, sessions)  # the bulk action runs outside a transaction
        self._forget(sessions)
        super().delete_queryset(request, queryset)

    @staticmethod
    def _forget(sessions: QuerySet[TerminalSession]) -> None:
        services.sessions_forget(session_ids=list(sessions.values_list("pk", flat=True)))


@admin.register(Project)
class ProjectAdmin(EndsShellsOnDelete, admin.ModelAdmin):
    form = ProjectForm
    list_display = ("name", "owner", "path", "created_at")
    list_filter = ("owner",)
    search_fields = ("name", "path", "owner__username")

    def sessions_of(self, objs: Any) -> QuerySet[TerminalSession]:
        return TerminalSession.objects.filter(project__in=[p.pk for p in objs])


class SessionEventInline(admin.TabularInline):
    model = SessionEvent
    extra = 0
    can_delete = False
    fields = ("at", "kind", "data")
    readonly_fields = fields
    ordering = ("-at", "-id")

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(TerminalSession)
class TerminalSessionAdmin(EndsShellsOnDelete, admin.ModelAdmin):
    list_display = (
        "id",
        "tab_name",
        "project",
        "user",
        "state",
        "storage_mode",
        "pid",
        "last_activity",
        "watch_link",
    )
    list_filter = ("state", "storage_mode", "project", "user")
    search_fields = ("id", "tab_name", "title", "project__name", "user__username")
    readonly_fields = ["watch_link", *(f.name for f in TerminalSession._meta.fields)]
    inlines = [SessionEventInline]
    actions = ["kill_sessions"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def sessions_of(self, objs: Any) -> QuerySet[TerminalSession]:
        return TerminalSession.objects.filter(pk__in=[s.pk for s in objs])

    @admin.display(description="Terminal")
    def watch_link(self, session: TerminalSession) -> str:
        label = "Watch (read-only)" if session.state in LIVE_STATES else "View history"
        url = reverse("watch", args=[session.pk])
        return format_html('<a href="{}" target="_blank" rel="noopener">{}</a>', url, label)

    @admin.action(description="Kill selected sessions (end their processes, keep history)")
    def kill_sessions(self, request: HttpRequest, queryset: QuerySet[TerminalSession]) -> None:
        killed = 0
        for session in queryset.filter(state__in=LIVE_STATES):
            try:
                async_to_sync(services.session_kill)(
                    session_id=session.pk, actor=request.user.get_username()
                )
            except TermsysError as exc:
                self.message_user(request, exc.message, messages.WARNING)
            else:
                killed += 1
        self.message_user(request, f"Killed {killed} session(s).", messages.SUCCESS)

"""Admin: projects and sessions with filters, events inline, a read-only watch link, and a
kill action."""

from __future__ import annotations

from asgiref.sync import async_to_sync
from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
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


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    form = ProjectForm
    list_display = ("name", "owner", "path", "created_at")
    list_filter = ("owner",)
    search_fields = ("name", "path", "owner__username")


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
class TerminalSessionAdmin(admin.ModelAdmin):
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

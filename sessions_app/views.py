"""The workspace page, and the staff's read-only view of a terminal."""

from __future__ import annotations

from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, HttpResponsePermanentRedirect
from django.shortcuts import render
from django.templatetags.static import static
from django.views.decorators.csrf import ensure_csrf_cookie

from sessions_app import conf, names, selectors
from sessions_app.api import session_size
from sessions_app.errors import NotFound
from sessions_app.models import Project
from sessions_app.search.engine import search_enabled


@login_required
@ensure_csrf_cookie
def workspace(request: HttpRequest) -> HttpResponse:
    context = {
        "profiles": sorted(conf.profiles()),
        "search_enabled": search_enabled(request.user),
        "name_max": names.NAME_MAX,  # what the server accepts, for the fields' maxlength
    }
    return render(request, "workspace.html", context)


@staff_member_required
def watch(request: HttpRequest, session_id: str) -> HttpResponse:
    """A read-only view of any user's terminal, for staff (linked from the admin)."""
    try:
        record = selectors.session_get_for_viewer(user=request.user, session_id=session_id)
    except NotFound:
        raise Http404(f"No session {session_id}.") from None
    owner = get_user_model().objects.filter(pk=record.user_id).first()
    project = Project.objects.filter(pk=record.project_id).first()
    cols, rows = session_size(record)
    session = {
        "id": record.id,
        "tabName": record.tab_name,
        "state": record.state,
        "mode": record.storage_mode,
        "exitCode": record.exit_code,
        # the owner's size: the viewer renders at it, not at its own window's
        "cols": cols,
        "rows": rows,
    }
    context = {
        "session": session,
        "owner": owner.get_username() if owner else "?",
        "project": project.name if project else "?",
    }
    return render(request, "watch.html", context)


def favicon(request: HttpRequest) -> HttpResponse:
    """Send browsers that ask for /favicon.ico (on pages without an icon link: the admin's) to
    the icon."""
    return HttpResponsePermanentRedirect(static("termsys/favicon.svg"))

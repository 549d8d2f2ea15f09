"""The workspace page."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie

from sessions_app import conf


@login_required
@ensure_csrf_cookie
def workspace(request: HttpRequest) -> HttpResponse:
    return render(request, "workspace.html", {"profiles": sorted(conf.profiles())})

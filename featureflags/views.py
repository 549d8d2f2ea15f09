"""The rollback-status page (in the admin) and its JSON twin, ``GET /api/health/rollback-status``.

Both show the same facts, read by ``featureflags.selectors.rollback_status``. They are for
staff only: unlike ``/api/health`` they name who changed which flag and why.
"""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from django.contrib import admin
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils.cache import add_never_cache_headers

from featureflags import selectors
from featureflags.selectors import ChangeRow, FlagStatus, RollbackRow, RollbackStatus
from sessions_app.api import api, ok
from sessions_app.errors import Forbidden

REFRESH_MS = 2500
MSG_STAFF_ONLY = "The rollback status is for staff only; log in with a staff account."


def status_page(request: HttpRequest) -> HttpResponse:
    """Render the rollback-status page, or with ``?fragment=1`` only its body (the page
    fetches that every few seconds and swaps it in, keeping the scroll position)."""
    status = selectors.rollback_status()
    context = {"status": status, "refresh_ms": REFRESH_MS, "refresh_seconds": REFRESH_MS / 1000}
    if request.GET.get("fragment"):
        return render(request, "admin/featureflags/status_body.html", context)
    context.update(admin.site.each_context(request), title="Rollback status")
    return render(request, "admin/featureflags/status.html", context)


@api("GET")
async def rollback_status(request: HttpRequest) -> JsonResponse:
    """Return every flag's state and history, live sessions per storage mode, the safeguard's
    figures and whether the rollback of storage_hybrid is complete."""
    if not request.user.is_staff:
        raise Forbidden(MSG_STAFF_ONLY)
    status = await database_sync_to_async(selectors.rollback_status)()
    response = ok(request, status_json(status))
    add_never_cache_headers(response)
    return response


def _iso(value: Any) -> str | None:
    return value.isoformat() if value else None


def change_json(row: ChangeRow) -> dict[str, Any]:
    return {
        "at": _iso(row.at),
        "actor": row.actor,
        "source": row.source,
        "reason": row.reason,
        "changed": {k: {"before": a, "after": b} for k, (a, b) in row.changed.items()},
    }


def rollback_json(row: RollbackRow) -> dict[str, Any]:
    return {
        "at": _iso(row.at),
        "actor": row.actor,
        "source": row.source,
        "reason": row.reason,
        "automatic": row.automatic,
    }


def flag_json(flag: FlagStatus) -> dict[str, Any]:
    return {
        "name": flag.name,
        "note": flag.note,
        "state": flag.state,
        "label": flag.label,
        "percent": None if flag.percent is None else float(flag.percent),
        "everyone": flag.everyone,
        "rolledBack": flag.rolled_back,
        "rolledBackAt": _iso(flag.rolled_back_at),
        "overrides": flag.overrides,
        "ramp": {
            "steps": selectors.plain(flag.ramp_steps),
            "step": flag.ramp_step,
            "stepAt": _iso(flag.ramp_step_at),
        },
        "modified": _iso(flag.modified),
        "mode": flag.mode,
        "liveSessionsInMode": flag.live_in_mode,
        "rollbackComplete": flag.rollback_complete,
        "changes": [change_json(c) for c in flag.changes],
        "rollbacks": [rollback_json(r) for r in flag.rollbacks],
    }


def status_json(status: RollbackStatus) -> dict[str, Any]:
    return {
        "generatedAt": _iso(status.generated_at),
        "stableMode": status.stable_mode,
        "emergencyRollback": status.emergency_rollback,
        "liveSessions": status.live_sessions,
        "rollbackComplete": status.rollback_complete,
        "flags": [flag_json(f) for f in status.flags],
        "safeguard": status.safeguard.raw if status.safeguard else None,
    }

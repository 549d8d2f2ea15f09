"""The JSON HTTP API. Views translate requests to service calls and results to JSON."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.request import RawPostDataException
from django.utils import timezone

from sessions_app import conf, names, selectors, services, terminals, workspace
from sessions_app.errors import (
    MethodNotAllowed,
    NotAuthenticated,
    NotFound,
    TermsysError,
    UnsupportedMediaType,
    ValidationFailed,
)
from sessions_app.health import health_checks, storage_figures
from sessions_app.middleware import MSG_SEND_JSON, client_error
from sessions_app.models import Project
from sessions_app.storage import SessionRecord

View = Callable[..., Awaitable[HttpResponse]]


def _iso(value: Any) -> str | None:
    return value.isoformat() if value else None


def session_size(record: SessionRecord) -> tuple[int, int]:
    """Return the session's terminal size (cols, rows): its live PTY's when this process runs
    it, else the last size stored (at start, detach and exit)."""
    terminal = terminals.get(record.id)
    if terminal is not None:
        return terminal.cols, terminal.rows
    return record.cols, record.rows


def session_json(record: SessionRecord) -> dict[str, Any]:
    cols, rows = session_size(record)
    return {
        "id": record.id,
        "projectId": record.project_id,
        "type": record.profile,
        "tabName": record.tab_name,
        # the user chose tabName (rename): the tab shows it rather than the title
        "tabNamed": record.tab_named,
        "title": record.title or record.tab_name,
        "state": record.state,
        "cwd": record.cwd,
        "pid": record.pid,
        "mode": record.storage_mode,
        "exitCode": record.exit_code,
        "endReason": record.end_reason,
        # the size its output was drawn at: a page writes the history in at this size
        "cols": cols,
        "rows": rows,
        # its shell died with the server (a restart): POST .../revive starts a new one in place
        "revivable": record.state == "exited" and record.end_reason == "server_restarted",
        "createdAt": _iso(record.created_at),
        "lastActivity": _iso(record.last_activity),
    }


def project_json(project: Project) -> dict[str, Any]:
    return {
        "id": project.pk,
        "name": project.name,
        "path": project.path,
        "createdAt": _iso(project.created_at),
    }


def request_id(request: HttpRequest) -> str:
    if not hasattr(request, "termsys_request_id"):
        request.termsys_request_id = uuid.uuid4().hex  # type: ignore[attr-defined]
    return request.termsys_request_id  # type: ignore[attr-defined]


def error_response(request: HttpRequest, error: TermsysError) -> JsonResponse:
    body = {
        "success": False,
        "error": {
            "code": error.code,
            "message": error.message,
            "details": error.details,
            "timestamp": timezone.now().isoformat(),
        },
        "requestId": request_id(request),
    }
    response = JsonResponse(body, status=error.status)
    response["X-Request-ID"] = request_id(request)
    return response


def ok(request: HttpRequest, body: dict[str, Any], status: int = 200) -> JsonResponse:
    response = JsonResponse({"success": True, **body}, status=status)
    response["X-Request-ID"] = request_id(request)
    return response


MSG_BODY_NOT_JSON = "Request body is not valid JSON: {problem}."
MSG_BODY_NOT_OBJECT = "Request body must be a JSON object."
MSG_RENAME_WITHOUT_NAME = (
    'tabName is required: a name of 1-{max} characters, or "" (or null) for the tab to show '
    "the title of what runs in it again."
)
MSG_JSON_CONSTANT = "{constant} is not a JSON value (JSON has no NaN or Infinity)"
MSG_LONE_SURROGATE = (
    "{field} is not valid Unicode: it holds a lone surrogate U+{code:04X} at character "
    "{position}; send text as UTF-8, and escape only complete surrogate pairs."
)
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _refuse_constant(constant: str) -> None:
    raise ValueError(MSG_JSON_CONSTANT.format(constant=constant))


def _check_unicode(data: dict[str, Any]) -> None:
    """Raise ValidationFailed naming the first field whose text (or key) is not valid Unicode.

    Python's JSON decoder turns an escaped lone surrogate (backslash-u D800) into a string that
    no database (nor UTF-8) can store. Walked with a stack: bodies may nest deeply.
    """
    stack: list[tuple[str, Any]] = [(str(key), value) for key, value in data.items()]
    stack += [(f"{key!r} (a key)", key) for key in data]
    while stack:
        field, value = stack.pop()
        if isinstance(value, str):
            bad = _LONE_SURROGATE.search(value)
            if bad:
                name = _LONE_SURROGATE.sub("\N{REPLACEMENT CHARACTER}", field)
                raise ValidationFailed(
                    MSG_LONE_SURROGATE.format(
                        field=name, code=ord(bad.group()), position=bad.start() + 1
                    ),
                    details={"field": name},
                )
        elif isinstance(value, dict):
            stack += [(f"{field}.{key}", item) for key, item in value.items()]
            stack += [(f"{field}.{key!r} (a key)", key) for key in value]
        elif isinstance(value, list):
            stack += [(f"{field}[{index}]", item) for index, item in enumerate(value)]


def json_body(request: HttpRequest) -> dict[str, Any]:
    """Return the request's JSON object body, or raise a 400/413/415 that says what is wrong."""
    if request.content_type.startswith("multipart/"):
        raise UnsupportedMediaType(MSG_SEND_JSON.format(kind=request.content_type))
    try:
        raw = request.body
    except (RequestDataTooBig, RawPostDataException) as exc:  # too big; read as a form first
        error = client_error(exc)
        assert error is not None
        raise error from None
    if not raw:
        return {}
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise ValidationFailed(MSG_BODY_NOT_JSON.format(problem=exc)) from None
    if not isinstance(data, dict):
        raise ValidationFailed(MSG_BODY_NOT_OBJECT)
    _check_unicode(data)
    return data


def api(*methods: str) -> Callable[[View], View]:
    """Require a logged-in user and one of ``methods``; turn errors into the JSON error shape."""

    def decorate(view: View) -> View:
        @wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            try:
                if request.method not in methods:
                    raise MethodNotAllowed(
                        f"{request.method} is not allowed here; use {', '.join(methods)}."
                    )
                user = await request.auser()
                if not user.is_authenticated:
                    raise NotAuthenticated("Log in first.")
                request.user = user
                response = await view(request, *args, **kwargs)
            except TermsysError as error:
                response = error_response(request, error)
            if response.status_code == 405:
                response["Allow"] = ", ".join(methods)
            return response

        wrapper.csrf_exempt = False  # type: ignore[attr-defined]
        return wrapper

    return decorate


@api("GET", "POST")
async def projects(request: HttpRequest) -> JsonResponse:
    if request.method == "POST":
        data = await sync_to_async(json_body)(request)
        project = await database_sync_to_async(services.project_create)(
            owner=request.user, name=data.get("name"), path=data.get("path")
        )
        return ok(request, {"project": project_json(project)}, status=201)
    rows = await database_sync_to_async(selectors.project_list)(user=request.user)
    return ok(request, {"projects": [project_json(p) for p in rows]})


@api("POST")
async def terminal_create(request: HttpRequest) -> JsonResponse:
    data = await sync_to_async(json_body)(request)
    record = await services.session_create(
        user=request.user,
        project_id=data.get("projectId"),
        profile=data.get("type"),
        tab_name=data.get("tabName"),
    )
    return ok(
        request,
        {"session": session_json(record), "connectionUrl": f"/ws/terminals/{record.id}/"},
        status=201,
    )


def _memory_usage(user: Any) -> dict[str, int]:
    """Return the server process's resident set and data segment (heap + stacks), in bytes, and
    how many of ``user``'s terminals it runs (never other users')."""
    try:
        with open("/proc/self/statm") as fh:
            fields = fh.read().split()
        rss, data = int(fields[1]), int(fields[5])
    except (OSError, IndexError, ValueError):
        rss = data = 0
    page = os.sysconf("SC_PAGE_SIZE")
    yours = sum(1 for t in terminals.all_terminals() if t.user_id == user.pk)
    return {"rss": rss * page, "heap": data * page, "sessionCount": yours}


def _list_sessions(user: Any) -> list[SessionRecord]:
    services.sessions_reconcile(user=user)
    return selectors.session_list(user=user)


@api("GET")
async def terminal_list(request: HttpRequest) -> JsonResponse:
    records = await database_sync_to_async(_list_sessions)(request.user)
    return ok(
        request,
        {
            "sessions": [session_json(r) for r in records],
            "memoryUsage": _memory_usage(request.user),
        },
    )


def _project_terminals(user: Any, project_id: int) -> list[SessionRecord]:
    services.sessions_reconcile(user=user)
    return selectors.project_sessions(user=user, project_id=project_id)


@api("GET")
async def project_terminals(request: HttpRequest, project_id: int) -> JsonResponse:
    records = await database_sync_to_async(_project_terminals)(request.user, project_id)
    active = sum(1 for r in records if r.state in ("creating", "active", "detached"))
    return ok(
        request,
        {
            "projectId": project_id,
            "terminals": [session_json(r) for r in records],
            "activeCount": active,
        },
    )


@api("GET")
async def project_snapshot(request: HttpRequest, project_id: int) -> HttpResponse:
    tail = workspace.parse_tail(request.GET.get("tail"))
    snapshot = await workspace.project_snapshot(
        user=request.user, project_id=project_id, tail_bytes=tail
    )
    response = HttpResponse(
        workspace.encode_json({"success": True, **snapshot}), content_type="application/json"
    )
    response["X-Request-ID"] = request_id(request)
    return response


@api("POST")
async def terminal_close(request: HttpRequest, session_id: str) -> JsonResponse:
    record = await services.session_close(user=request.user, session_id=session_id)
    return ok(request, {"session": session_json(record)})


@api("POST")
async def terminal_revive(request: HttpRequest, session_id: str) -> JsonResponse:
    data = await sync_to_async(json_body)(request)
    cols, rows = data.get("cols", 80), data.get("rows", 24)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (cols, rows)):
        raise ValidationFailed("cols and rows must be whole numbers.", details={"field": "cols"})
    record = await services.session_revive(
        user=request.user,
        session_id=session_id,
        cols=max(conf.MIN_COLS, min(conf.MAX_COLS, cols)),
        rows=max(conf.MIN_ROWS, min(conf.MAX_ROWS, rows)),
    )
    return ok(
        request,
        {"session": session_json(record), "connectionUrl": f"/ws/terminals/{record.id}/"},
    )


@api("POST")
async def terminal_rename(request: HttpRequest, session_id: str) -> JsonResponse:
    data = await sync_to_async(json_body)(request)
    if "tabName" not in data:  # null or "" is a choice: follow the title again
        message = MSG_RENAME_WITHOUT_NAME.format(max=names.NAME_MAX)
        raise ValidationFailed(message, details={"field": "tabName"})
    record = await database_sync_to_async(services.session_rename)(
        user=request.user, session_id=session_id, tab_name=data["tabName"]
    )
    return ok(request, {"session": session_json(record)})


def _export(user: Any, session_id: str, format: str) -> Any:
    from sessions_app import export

    record = selectors.session_get(user=user, session_id=session_id)
    try:
        return export.session_export(record=record, format=format)
    except export.UnknownFormat as exc:
        raise ValidationFailed(
            str(exc), details={"field": "format", "allowed": list(export.FORMATS)}
        ) from None


@api("GET")
async def terminal_export(request: HttpRequest, session_id: str) -> HttpResponse:
    """Download the session's retained output: ``?format=cast`` (asciicast v3) or ``text``."""
    result = await database_sync_to_async(_export)(
        request.user, session_id, request.GET.get("format", "cast")
    )
    response = HttpResponse(result.body, content_type=result.content_type)
    response["Content-Disposition"] = f'attachment; filename="{result.filename}"'
    response["X-Request-ID"] = request_id(request)
    return response


async def health(request: HttpRequest) -> JsonResponse:
    """Report whether the database, the channel layer and the cache answer (no login needed)."""
    if request.method != "GET":
        return error_response(request, MethodNotAllowed("Use GET."))
    checks = await health_checks()
    healthy = all(check["ok"] for check in checks.values())
    body = {
        "status": "ok" if healthy else "unavailable",
        "checks": {name: "ok" if c["ok"] else c["error"] for name, c in checks.items()},
        "storage": storage_figures(),
    }
    if not healthy:
        failing = [name for name, c in checks.items() if not c["ok"]]
        body["failing"] = failing
    return JsonResponse(body, status=200 if healthy else 503)


def not_found(request: HttpRequest) -> JsonResponse:
    return error_response(request, NotFound(f"No API endpoint {request.path}."))


def _search(user: Any, params: Any) -> dict[str, Any]:
    from sessions_app.search.engine import sessions_search

    page = sessions_search(
        user=user,
        text=params.get("q", ""),
        limit=params.get("limit"),
        cursor=params.get("cursor") or None,
        order=params.get("order") or None,
    )
    hits = [
        {
            "session": session_json(hit.session),
            "project": {"id": hit.project_id, "name": hit.project_name},
            "time": _iso(hit.at),
            "source": hit.source,
            "snippet": hit.snippet,
        }
        for hit in page.hits
    ]
    return {"hits": hits, "nextCursor": page.next_cursor}


@api("GET")
async def sessions_search(request: HttpRequest) -> JsonResponse:
    """Search the user's sessions: ``?q=…&limit=&cursor=&order=newest|rank``."""
    body = await database_sync_to_async(_search)(request.user, request.GET)
    return ok(request, body)

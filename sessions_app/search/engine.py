"""Run a parsed query against the search index: PostgreSQL tsquery or SQLite FTS5 MATCH.

Hits are documents (an output chunk or a part of one, a command line, a session's names),
newest first (in the order they were recorded: document ids, which the triggers assign as
output, commands and sessions are written) or by relevance, in pages joined by an opaque
keyset cursor: a page never repeats or skips a hit because newer output arrived in between.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection

from sessions_app.errors import Forbidden, ValidationFailed
from sessions_app.models import SearchDocument
from sessions_app.search.query import And, Node, Not, Or, Query, Term, parse
from sessions_app.states import LIVE_STATES
from sessions_app.storage.base import RECORD_FIELDS, SessionRecord

SEARCH_FLAG = "session_search"
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
ORDERS = ("newest", "rank")
# Must match the translate() in migration 0004_search: PostgreSQL indexes text with these
# characters turned into spaces, so a query is normalised the same way before parsing.
PG_SPLIT_FROM = "/._-@:=+,;~"
SNIPPET_BEFORE, SNIPPET_AFTER = 60, 160
# PostgreSQL, newest first: below this many estimated matches, collect them from the GIN index
# and sort; above, walk the documents newest first and stop after a page (see _pg_document_id)
PG_FEW_MATCHES = 2000

SEARCH_DISABLED = "Search is not enabled for your account (feature flag session_search is off)."
BAD_CURSOR = "The cursor is not one this search returned; start again without it."
BAD_LIMIT = f"limit must be a whole number from 1 to {MAX_LIMIT}."
BAD_ORDER = "order must be one of: " + ", ".join(ORDERS) + "."


@dataclass(frozen=True)
class SearchHit:
    session: SessionRecord
    project_id: int
    project_name: str
    at: datetime
    source: str  # output, command or session
    snippet: str  # HTML: escaped text with the matches in <mark>


@dataclass(frozen=True)
class SearchPage:
    hits: tuple[SearchHit, ...]
    next_cursor: str | None


# ---------------------------------------------------------------- compiling


def _pg_tsquery(node: Node, params: list[Any]) -> str:
    if isinstance(node, Term):
        params.append(node.text)
        spaces = " " * len(PG_SPLIT_FROM)
        return f"phraseto_tsquery('simple', translate(%s, '{PG_SPLIT_FROM}', '{spaces}'))"
    if isinstance(node, Not):
        return f"(!! {_pg_tsquery(node.child, params)})"
    assert isinstance(node, And | Or)
    joiner = " && " if isinstance(node, And) else " || "
    return "(" + joiner.join(_pg_tsquery(c, params) for c in node.children) + ")"


def fts5_match(node: Node) -> str:
    """Return the FTS5 MATCH expression for ``node`` (NOT only ever subtracts, as FTS5 needs)."""
    if isinstance(node, Term):
        return '"' + node.text.replace('"', '""') + '"'
    if isinstance(node, Or):
        return "(" + " OR ".join(fts5_match(c) for c in node.children) + ")"
    if isinstance(node, And):
        kept = [fts5_match(c) for c in node.children if not isinstance(c, Not)]
        expression = "(" + " AND ".join(kept) + ")"
        for child in node.children:
            if isinstance(child, Not):
                expression = f"({expression} NOT {fts5_match(child.child)})"
        return expression
    raise AssertionError(f"a lone NOT reached the compiler: {node!r}")  # parse() refuses it


def _filters(query: Query, params: list[Any]) -> list[str]:
    """Return SQLite conditions on ``s`` (the session), ``p`` (its project) and ``d``."""
    where = []
    if query.projects:
        where.append("lower(p.name) IN (" + ", ".join(["lower(%s)"] * len(query.projects)) + ")")
        params.extend(query.projects)
    if query.states:
        where.append("s.state IN (" + ", ".join(["%s"] * len(query.states)) + ")")
        params.extend(query.states)
    if query.profiles:
        where.append("s.profile IN (" + ", ".join(["%s"] * len(query.profiles)) + ")")
        params.extend(query.profiles)
    if query.since is not None:
        where.append("d.at >= %s")
        params.append(connection.ops.adapt_datetimefield_value(query.since))
    return where


def _pg_filters(query: Query, user_id: int | None, params: list[Any]) -> list[str]:
    """Return PostgreSQL conditions on the document alone (migration 0005_search_filters)."""
    where = []
    if user_id is not None:
        where.append("d.user_id = %s")
        params.append(user_id)
    if query.projects:
        # Ids, not a subquery: the planner then estimates the project's documents, and for
        # one project may walk (project_id, id) backwards, which a join would not let it do.
        ids = _pg_project_ids(query.projects)
        where.append("d.project_id IN (" + ", ".join(["%s"] * len(ids)) + ")" if ids else "FALSE")
        params.extend(ids)
    if query.states:
        statuses = sorted({"active" if state in LIVE_STATES else state for state in query.states})
        where.append("d.status IN (" + ", ".join(["%s"] * len(statuses)) + ")")
        params.extend(statuses)
    if query.profiles:
        where.append("d.profile IN (" + ", ".join(["%s"] * len(query.profiles)) + ")")
        params.extend(query.profiles)
    if query.since is not None:
        where.append("d.at >= %s")
        params.append(query.since)
    return where


def _pg_project_ids(names: tuple[str, ...]) -> list[int]:
    """Return the ids of the projects with one of ``names``, any case, whoever owns them."""
    marks = ", ".join(["lower(%s)"] * len(names))
    with connection.cursor() as db:
        db.execute(f"SELECT id FROM sessions_app_project WHERE lower(name) IN ({marks})", names)
        return [row[0] for row in db.fetchall()]


def _select(query: Query, user_id: int | None, rank: bool) -> tuple[str, list[Any]]:
    """Return SQL selecting (id, score) of matching documents, and its parameters."""
    if connection.vendor == "postgresql":
        return _pg_select(query, user_id, rank)
    score, match_params, doc_id = "0.0", [], "d.id"
    source = "sessions_app_searchdocument d"
    if query.text is None:
        match = "d.source = 'session'"
    else:
        source = "sessions_app_search_fts f JOIN sessions_app_searchdocument d ON d.id = f.rowid"
        match = "sessions_app_search_fts MATCH %s"
        match_params.append(fts5_match(query.text))
        # ordered and bounded by the FTS table's own rowid, FTS5 walks its index backwards and
        # stops after a page instead of sorting every match (60 ms -> 0.1 ms at 10k sessions)
        doc_id = "f.rowid"
        if rank:
            score = "-bm25(sessions_app_search_fts)"  # bm25: lower is better
    filter_params: list[Any] = []
    owner = ["s.user_id = %s"] if user_id is not None else []
    where = [match, *owner, *_filters(query, filter_params)]
    sql = (
        f"SELECT {doc_id} AS id, {score} AS score FROM {source} "
        "JOIN sessions_app_terminalsession s ON s.id = d.session_id "
        "JOIN sessions_app_project p ON p.id = s.project_id "
        "WHERE " + " AND ".join(where)
    )
    owner_params = [user_id] if user_id is not None else []
    return sql, [*match_params, *owner_params, *filter_params]


def _pg_select(query: Query, user_id: int | None, rank: bool) -> tuple[str, list[Any]]:
    """Return PostgreSQL SQL selecting (id, score) of matching documents, and its parameters.

    Owner and filters are columns of the document, so no match is joined to its session.
    """
    score, score_params, match_params, doc_id = "0.0", [], [], "d.id"
    if query.text is None:
        match = "d.source = 'session'"
    else:
        tsquery = _pg_tsquery(query.text, match_params)
        match = f"d.vector @@ {tsquery}"
        doc_id = _pg_document_id(match, match_params) if not rank else doc_id
        if rank:
            # float8: a float4 read back as decimal text would not equal itself in the cursor
            score, score_params = f"ts_rank(d.vector, {tsquery})::float8", list(match_params)
    filter_params: list[Any] = []
    where = [match, *_pg_filters(query, user_id, filter_params)]
    sql = (
        f"SELECT {doc_id} AS id, {score} AS score FROM sessions_app_searchdocument d "
        "WHERE " + " AND ".join(where)
    )
    return sql, [*score_params, *match_params, *filter_params]


def _pg_document_id(match: str, params: list[Any]) -> str:
    """Return the id expression that steers PostgreSQL to the faster plan, newest first.

    The planner walks the primary key backwards and filters, which stops after a page for a
    common word, but reads every document for a rare one (its estimate spreads the few matches
    evenly). ``d.id + 0`` hides the ordering index, so the GIN index finds the matches and
    they are sorted: chosen when the planner's own estimate says they are few.
    """
    with connection.cursor() as db:
        db.execute(
            f"EXPLAIN (FORMAT JSON) SELECT 1 FROM sessions_app_searchdocument d WHERE {match}",
            params,
        )
        plan = db.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return "d.id + 0" if plan[0]["Plan"]["Plan Rows"] < PG_FEW_MATCHES else "d.id"


# ---------------------------------------------------------------- cursors


def _encode_cursor(order: str, key: Any, doc_id: int) -> str:
    raw = json.dumps([order, key, doc_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str, order: str) -> tuple[Any, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        kind, key, doc_id = json.loads(raw)
        if kind != order or not isinstance(doc_id, int):
            raise ValueError(kind)
        if (order == "newest") != (key is None) or not isinstance(key, int | float | None):
            raise ValueError(key)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ValidationFailed(BAD_CURSOR, details={"field": "cursor"}) from None
    return key, doc_id


# ---------------------------------------------------------------- snippets


def _term_pattern(terms: tuple[str, ...]) -> re.Pattern[str] | None:
    words = sorted(
        {w.lower() for t in terms for w in re.findall(r"[^\W_]+", t)}, key=len, reverse=True
    )
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in words)
    return re.compile(rf"(?<![^\W_])(?:{alternatives})(?![^\W_])", re.IGNORECASE)


def snippet(body: str, terms: tuple[str, ...]) -> str:
    """Return an HTML-escaped excerpt of ``body`` around the first match, matches in <mark>.

    Done here rather than by ts_headline: PostgreSQL's headline re-parses the original text,
    where `/srv/app/mod12.py` is one token, so it could not mark a path's parts.
    """
    pattern = _term_pattern(terms)
    first = pattern.search(body) if pattern else None
    start = max(0, first.start() - SNIPPET_BEFORE) if first else 0
    end = min(len(body), (first.end() if first else 0) + SNIPPET_AFTER)
    window = " ".join(body[start:end].split())
    parts, last = [], 0
    for match in pattern.finditer(window) if pattern else ():
        parts.append(html.escape(window[last : match.start()]))
        parts.append(f"<mark>{html.escape(match.group())}</mark>")
        last = match.end()
    parts.append(html.escape(window[last:]))
    return ("…" if start > 0 else "") + "".join(parts) + ("…" if end < len(body) else "")


# ---------------------------------------------------------------- running


def _record(session: Any) -> SessionRecord:
    return SessionRecord(**{name: getattr(session, name) for name in RECORD_FIELDS})


def search_enabled(user: AbstractBaseUser) -> bool:
    from featureflags.evaluation import flag_is_active_for

    return flag_is_active_for(user, SEARCH_FLAG)


def _limit(limit: int | str | None) -> int:
    if limit in (None, ""):
        return DEFAULT_LIMIT
    try:
        value = int(limit)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValidationFailed(BAD_LIMIT, details={"field": "limit"}) from None
    if not 1 <= value <= MAX_LIMIT:
        raise ValidationFailed(BAD_LIMIT, details={"field": "limit"})
    return value


def sessions_search(
    *,
    user: AbstractBaseUser | None,
    text: str,
    limit: int | str | None = None,
    cursor: str | None = None,
    order: str | None = None,
    check_flag: bool = True,
) -> SearchPage:
    """Return a page of ``user``'s hits for query ``text``; raise ValidationFailed on bad input.

    With ``check_flag`` (every request), a user without the ``session_search`` flag gets
    Forbidden. An operator's command passes False, and ``user=None`` to search everyone's.
    """
    if user is None and check_flag:
        raise Forbidden(SEARCH_DISABLED, details={"flag": SEARCH_FLAG})
    if check_flag and not search_enabled(user):
        raise Forbidden(SEARCH_DISABLED, details={"flag": SEARCH_FLAG})
    order = order or "newest"
    if order not in ORDERS:
        raise ValidationFailed(BAD_ORDER, details={"field": "order"})
    size = _limit(limit)
    query = parse(text or "")
    rank = order == "rank" and query.text is not None
    kind = "rank" if rank else "newest"  # a filters-only query has nothing to rank by
    inner, params = _select(query, user.pk if user is not None else None, rank)
    sql = f"SELECT id, score FROM ({inner}) hits"
    if cursor:
        key, doc_id = _decode_cursor(cursor, kind)
        if rank:
            sql += " WHERE (score < %s OR (score = %s AND id < %s))"
            params += [key, key, doc_id]
        else:
            sql += " WHERE id < %s"
            params.append(doc_id)
    sql += " ORDER BY score DESC, id DESC LIMIT %s" if rank else " ORDER BY id DESC LIMIT %s"
    params.append(size + 1)
    with connection.cursor() as db:
        db.execute(sql, params)
        rows = db.fetchall()
    more = len(rows) > size
    rows = rows[:size]
    docs = SearchDocument.objects.select_related("session__project").in_bulk(
        [row[0] for row in rows]
    )
    hits = []
    for doc_id, _ in rows:
        doc = docs[doc_id]
        hits.append(
            SearchHit(
                session=_record(doc.session),
                project_id=doc.session.project_id,
                project_name=doc.session.project.name,
                at=doc.at,
                source=doc.source,
                snippet=snippet(doc.body, query.terms),
            )
        )
    next_cursor = None
    if more and rows:
        last_id, last_score = rows[-1]
        next_cursor = _encode_cursor(kind, last_score if rank else None, last_id)
    return SearchPage(hits=tuple(hits), next_cursor=next_cursor)

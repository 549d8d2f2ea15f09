"""Run a search: parse the query, run the SQL ``compile`` writes for it, page and show the hits.

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
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection

from sessions_app.errors import Forbidden, ValidationFailed
from sessions_app.models import Project, SearchDocument, TerminalSession
from sessions_app.search.compile import select_sql
from sessions_app.search.query import parse
from sessions_app.storage.base import RECORD_FIELDS, SessionRecord

SEARCH_FLAG = "session_search"
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
ORDERS = ("newest", "rank")
SNIPPET_BEFORE, SNIPPET_AFTER = 60, 160

SEARCH_DISABLED = "Search is not enabled for your account (feature flag session_search is off)."
BAD_CURSOR = "The cursor is not one this search returned; start again without it."
BAD_LIMIT = f"limit must be a whole number from 1 to {MAX_LIMIT}."
BAD_ORDER = "order must be one of: " + ", ".join(ORDERS) + "."
_ID_MAX = 2**63 - 1  # document ids are 64-bit
_WHOLE_NUMBER = re.compile(r"[0-9]{1,3}")


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


# ---------------------------------------------------------------- cursors


def _encode_cursor(order: str, key: Any, doc_id: int) -> str:
    raw = json.dumps([order, key, doc_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _refuse_constant(constant: str) -> None:
    raise ValueError(constant)  # NaN, Infinity: never in a cursor this search wrote


def _decode_cursor(cursor: str, order: str) -> tuple[Any, int]:
    """Return (rank key, document id) from ``cursor``, or raise ValidationFailed.

    A cursor comes back from the client, so anything may be in it: a key or id past what the
    database stores (an int of 10**21 overflows SQLite's), JSON nested thousands deep, ...
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        kind, key, doc_id = json.loads(raw, parse_constant=_refuse_constant)
        if kind != order or type(doc_id) is not int or not 0 < doc_id <= _ID_MAX:
            raise ValueError(doc_id)
        if order == "newest":
            if key is not None:
                raise ValueError(key)
        elif type(key) is not float or not math.isfinite(key):  # scores are always floats
            raise ValueError(key)
    except (ValueError, TypeError, OverflowError, RecursionError, binascii.Error):
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


# What a hit shows, read with its page in the same query, as tuples: the ORM's model instances
# (or even its values_list) for a page of hits cost more than the search itself on a short one.
_DOC_FIELDS = ("at", "source", "body")


def _hit_columns() -> list[tuple[str, Any, list[Any]]]:
    """Return (SQL, column, converters) of a hit's document fields, project name, session."""
    quote = connection.ops.quote_name
    fields = [
        *(("d", SearchDocument._meta.get_field(name)) for name in _DOC_FIELDS),
        ("p", Project._meta.get_field("name")),
        *(("s", TerminalSession._meta.get_field(name)) for name in RECORD_FIELDS),
    ]
    columns = []
    for alias, field in fields:
        column = field.get_col(alias)
        converters = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        columns.append((f"{alias}.{quote(field.column)}", column, converters))
    return columns


def _convert(row: tuple[Any, ...], columns: list[tuple[str, Any, list[Any]]]) -> list[Any]:
    """Return ``row``'s values as the ORM reads them (SQLite returns datetimes as text)."""
    values = []
    for raw, (_, column, converters) in zip(row, columns, strict=True):
        value = raw
        for converter in converters:
            value = converter(value, column, connection)
        values.append(value)
    return values


def _page_sql(
    inner: str, params: list[Any], rank: bool, after: tuple[Any, int] | None, limit: int
) -> tuple[str, list[Any]]:
    """Return SQL selecting the (id, score) rows of ``inner`` past cursor ``after``, in order."""
    sql, params = f"SELECT id, score FROM ({inner}) hits", list(params)
    if after:
        key, doc_id = after
        if rank:
            sql += " WHERE (score < %s OR (score = %s AND id < %s))"
            params += [key, key, doc_id]
        else:
            sql += " WHERE id < %s"
            params.append(doc_id)
    sql += " ORDER BY score DESC, id DESC LIMIT %s" if rank else " ORDER BY id DESC LIMIT %s"
    return sql, [*params, limit]


def _hits_sql(page: str, rank: bool, columns: list[tuple[str, Any, list[Any]]]) -> str:
    """Return SQL reading ``page``'s (id, score) rows with what each hit shows, in order."""
    return (
        "SELECT h.id, h.score, " + ", ".join(sql for sql, _, _ in columns) + f" FROM ({page}) h "
        f"JOIN {SearchDocument._meta.db_table} d ON d.id = h.id "
        f"JOIN {TerminalSession._meta.db_table} s ON s.id = d.session_id "
        f"JOIN {Project._meta.db_table} p ON p.id = s.project_id "
        + ("ORDER BY h.score DESC, h.id DESC" if rank else "ORDER BY h.id DESC")
    )


def _hit(values: list[Any], terms: tuple[str, ...]) -> SearchHit:
    at, source, body, project_name, *fields = values
    session = SessionRecord(**dict(zip(RECORD_FIELDS, fields, strict=True)))
    return SearchHit(
        session=session,
        project_id=session.project_id,
        project_name=project_name,
        at=at,
        source=source,
        snippet=snippet(body, terms),
    )


def search_enabled(user: AbstractBaseUser) -> bool:
    from featureflags.evaluation import flag_is_active_for

    return flag_is_active_for(user, SEARCH_FLAG)


def _limit(limit: int | str | None) -> int:
    if limit in (None, ""):
        return DEFAULT_LIMIT
    if isinstance(limit, str):
        # ASCII digits only: int() also reads Arabic-Indic digits and "1_0"
        if not _WHOLE_NUMBER.fullmatch(limit):
            raise ValidationFailed(BAD_LIMIT, details={"field": "limit"})
        value = int(limit)
    elif type(limit) is int:
        value = limit
    else:
        raise ValidationFailed(BAD_LIMIT, details={"field": "limit"})
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
    after = _decode_cursor(cursor, kind) if cursor else None
    parts = select_sql(
        query,
        user_id=user.pk if user is not None else None,
        rank=rank,
        before=after[1] if after and not rank else None,
    )
    columns = _hit_columns()
    rows: list[tuple[Any, ...]] = []
    for inner, inner_params in parts:  # newest first: each part's documents older than the last's
        sql, params = _page_sql(inner, inner_params, rank, after, size + 1 - len(rows))
        with connection.cursor() as db:
            db.execute(_hits_sql(sql, rank, columns), params)
            rows += db.fetchall()
        if len(rows) > size:
            break
    more = len(rows) > size
    rows = rows[:size]
    hits = [_hit(_convert(row[2:], columns), query.terms) for row in rows]
    next_cursor = None
    if more and rows:
        last_id, last_score = rows[-1][:2]
        next_cursor = _encode_cursor(kind, last_score if rank else None, last_id)
    return SearchPage(hits=tuple(hits), next_cursor=next_cursor)

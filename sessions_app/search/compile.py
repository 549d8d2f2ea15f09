"""Compile a parsed query into SQL selecting (id, score) of the matching search documents.

PostgreSQL matches a tsquery against the documents' GIN-indexed vectors, and reads the owner and
filters from the documents themselves (migration 0005_search_filters); SQLite matches an FTS5
expression and joins each match to its session. The caller orders, pages and limits the rows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from django.db import connection

from sessions_app.models import Project
from sessions_app.search.query import And, Node, Not, Or, Query, Term
from sessions_app.states import LIVE_STATES

DOC = "sessions_app_searchdocument"
# Must match the translate() in migration 0004_search: PostgreSQL indexes text with these
# characters turned into spaces, so a query is normalised the same way before parsing.
PG_SPLIT_FROM = "/._-@:=+,;~"
_PG_SPLIT = str.maketrans(PG_SPLIT_FROM, " " * len(PG_SPLIT_FROM))
# PostgreSQL, newest first (see _pg_select): below this many estimated matches, collect them
# from the GIN index and sort; from it, walk the newest PG_WALK_DOCS documents and stop after a
# page, then sort the older matches if the page needs them; from PG_SORT_MAX, only walk.
PG_FEW_MATCHES = 2000
PG_WALK_DOCS = 10_000
PG_SORT_MAX = 20_000
# The documents' GIN index is two (migration 0009_search_vector_halves), over the documents whose
# id hashes even and odd, built side by side by a restore. A match the index is to answer names
# both, each by its condition as the migration wrote it.
VECTOR_HALVES = 2  # by the hash's lowest bit, as PG_VECTOR_HALF reads it
PG_VECTOR_HALF = "(hashint8(d.id) & 1) = {n}"
# SQLite: the covering index a match is joined through (migration 0006_search_speed)
SQLITE_JOIN_INDEX = "searchdoc_id_session"

Part = tuple[str, list[Any]]  # SQL selecting (id, score) of some matching documents, its values


# ---------------------------------------------------------------- PostgreSQL


def _is_phrase(term: Term) -> bool:
    """Return whether ``term`` is more than one word once PostgreSQL's separators split it."""
    return len(re.findall(r"[^\W_]+", term.text.translate(_PG_SPLIT))) > 1


def _has_phrase(node: Node) -> bool:
    if isinstance(node, Term):
        return _is_phrase(node)
    if isinstance(node, Not):
        return _has_phrase(node.child)
    assert isinstance(node, And | Or)
    return any(_has_phrase(child) for child in node.children)


def _pg_tsquery(node: Node, params: list[Any], *, relaxed: bool = False) -> str | None:
    """Return a tsquery expression for ``node``, its values appended to ``params``.

    ``relaxed``: a superset the GIN index answers without reading a single vector: a phrase
    becomes its words in any order, and a NOT of a phrase is left out (None: matches anything).
    """
    spaces = " " * len(PG_SPLIT_FROM)
    if isinstance(node, Term):
        params.append(node.text)
        function = "plainto_tsquery" if relaxed else "phraseto_tsquery"
        return f"{function}('simple', translate(%s, '{PG_SPLIT_FROM}', '{spaces}'))"
    if isinstance(node, Not):
        if relaxed and _has_phrase(node.child):
            return None
        return f"(!! {_pg_tsquery(node.child, params, relaxed=relaxed)})"
    assert isinstance(node, And | Or)
    parts = []
    for child in node.children:
        kept: list[Any] = []
        part = _pg_tsquery(child, kept, relaxed=relaxed)
        if part is None and isinstance(node, Or):
            return None  # unreachable while parse() refuses `a OR -b`; kept for safety
        if part is not None:
            parts.append(part)
            params.extend(kept)
    return "(" + (" && " if isinstance(node, And) else " || ").join(parts) + ")"


def _pg_filters(query: Query, user_id: int | None, params: list[Any]) -> list[str]:
    """Return PostgreSQL conditions on the document alone (migration 0005_search_filters)."""
    where = []
    if user_id is not None:
        where.append("d.user_id = %s")
        params.append(user_id)
    if query.projects:
        # Ids, not a subquery: the planner then estimates the project's documents, and for
        # one project may walk (project_id, id) backwards, which a join would not let it do.
        ids = _project_ids(query.projects, user_id)
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


def _pg_indexed(tsquery: str, params: list[Any]) -> tuple[str, list[Any]]:
    """Return ``d.vector @@ tsquery`` as the GIN index's halves answer it, with its values:
    a bitmap OR of the two, each arm implying its half's condition (where a plain match would
    leave the planner no index to use)."""
    arms = [
        f"({PG_VECTOR_HALF.format(n=n)} AND d.vector @@ {tsquery})" for n in range(VECTOR_HALVES)
    ]
    return "(" + " OR ".join(arms) + ")", params * VECTOR_HALVES


def _pg_estimate(match: str, params: list[Any]) -> float:
    """Return the planner's estimate of the documents ``match`` finds (filters left out)."""
    with connection.cursor() as db:
        db.execute(f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {DOC} d WHERE {match}", params)
        plan = db.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return plan[0]["Plan"]["Plan Rows"]


def _pg_select(query: Query, user_id: int | None, rank: bool, before: int | None) -> list[Part]:
    """Return the parts of PostgreSQL SQL selecting (id, score) of matching documents."""
    filter_params: list[Any] = []
    filters = _pg_filters(query, user_id, filter_params)
    if query.text is None:
        where = " AND ".join(["d.source = 'session'", *filters])
        return [(f"SELECT d.id AS id, 0.0 AS score FROM {DOC} d WHERE {where}", filter_params)]
    exact_params: list[Any] = []
    exact = _pg_tsquery(query.text, exact_params)
    assert exact is not None  # only a NOT of a phrase, relaxed, is left out
    match = _Match(exact, exact_params, filters, filter_params)
    if rank:
        # float8: a float4 read back as decimal text would not equal itself in the cursor
        score = f"ts_rank(d.vector, {exact})::float8"
        where, where_params = match.indexed()
        sql = f"SELECT d.id AS id, {score} AS score FROM {DOC} d WHERE {where}"
        return [(sql, [*exact_params, *where_params])]
    if _has_phrase(query.text):
        params: list[Any] = []
        relaxed = _pg_tsquery(query.text, params, relaxed=True)
        if relaxed:
            match = _Match(exact, exact_params, filters, filter_params, relaxed, params)
    estimate = _pg_estimate(f"d.vector @@ {match.relaxed}", match.relaxed_params)
    if estimate < PG_FEW_MATCHES:
        return [_pg_sorted(match, "", [], before)]
    walk = f"SELECT d.id AS id, 0.0 AS score FROM {DOC} d WHERE {match.where}"
    if estimate >= PG_SORT_MAX:
        return [(walk, match.params)]
    # Many matches: the planner walks the documents (or the owner's, or the project's) newest
    # first given ORDER BY id DESC LIMIT, and stops after a page. Matches that are all old (a
    # word common long ago) would have it read most of the table first, so the walk covers the
    # newest PG_WALK_DOCS documents only, and the older matches, if the page needs them, are
    # collected from the GIN index and sorted, as few matches are.
    start = _pg_window_start(before)
    return [
        (f"{walk} AND d.id >= %s", [*match.params, start]),
        _pg_sorted(match, " AND d.id < %s", [start], before),
    ]


@dataclass(frozen=True)
class _Match:
    """A tsquery with the filters; ``relaxed``: a superset the GIN index answers exactly."""

    exact: str
    exact_params: list[Any]
    filters: list[str]
    filter_params: list[Any]
    relaxed_query: str | None = None
    relaxed_query_params: list[Any] | None = None

    @property
    def where(self) -> str:
        return " AND ".join([f"d.vector @@ {self.exact}", *self.filters])

    @property
    def params(self) -> list[Any]:
        return [*self.exact_params, *self.filter_params]

    def indexed(self) -> Part:
        """``where`` as the GIN index answers it (``_pg_indexed``), with its values."""
        match, params = _pg_indexed(self.exact, self.exact_params)
        return " AND ".join([match, *self.filters]), [*params, *self.filter_params]

    @property
    def relaxed(self) -> str:
        return self.relaxed_query or self.exact

    @property
    def relaxed_params(self) -> list[Any]:
        return self.relaxed_query_params if self.relaxed_query else self.exact_params


def _pg_window_start(before: int | None) -> int:
    """Return the first document id of the newest PG_WALK_DOCS (older than ``before``)."""
    if before is None:
        with connection.cursor() as db:
            db.execute(f"SELECT coalesce(max(id), 0) + 1 FROM {DOC}")
            before = db.fetchone()[0]
    return before - PG_WALK_DOCS


def _pg_sorted(match: _Match, extra: str, extra_params: list[Any], before: int | None) -> Part:
    """Return SQL collecting ``match``'s documents from the GIN index, to be sorted.

    Newest first walking would read every document for a rare word (the planner's estimate
    spreads its few matches evenly), so ``d.id + 0`` hides the ordering index. A phrase (a path
    part such as `mod12.py` is one): the GIN index cannot tell it from its words in any order,
    so each candidate's positions would be read before sorting. Instead the index finds the
    candidates by their words alone, which it answers without reading a vector, they are
    sorted, and the phrase is checked newest first until a page is full. OFFSET 0 keeps the
    sort below the check (a subquery without it would be flattened and the check run on every
    candidate); the page's cursor goes inside too.
    """
    if match.relaxed_query is None:
        where, where_params = match.indexed()
        sql = f"SELECT d.id + 0 AS id, 0.0 AS score FROM {DOC} d WHERE {where}{extra}"
        return sql, [*where_params, *extra_params]
    cursor, cursor_params = (" AND d.id < %s", [before]) if before is not None else ("", [])
    relaxed, relaxed_params = _pg_indexed(match.relaxed, match.relaxed_params)
    candidates = " AND ".join([relaxed, *match.filters]) + extra + cursor
    sql = (
        f"SELECT c.id AS id, 0.0 AS score FROM ("
        f"SELECT d.id + 0 AS id FROM {DOC} d WHERE {candidates} ORDER BY 1 DESC OFFSET 0"
        f") c WHERE (SELECT x.vector FROM {DOC} x WHERE x.id = c.id) @@ {match.exact}"
    )
    params = [*relaxed_params, *match.filter_params, *extra_params, *cursor_params]
    return sql, [*params, *match.exact_params]


# ---------------------------------------------------------------- SQLite


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


def _sqlite_filters(query: Query, user_id: int | None, params: list[Any]) -> list[str]:
    """Return SQLite conditions on ``s`` (the session) and ``d`` (the document)."""
    where = []
    if query.projects:
        ids = _project_ids(query.projects, user_id)
        where.append("s.project_id IN (" + ", ".join(["%s"] * len(ids)) + ")" if ids else "0")
        params.extend(ids)
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


def _sqlite_select(query: Query, user_id: int | None, rank: bool) -> Part:
    """Return SQLite SQL selecting (id, score) of matching documents, and its parameters."""
    params: list[Any] = []
    if query.text is None:
        source, where, doc_id, score = f"{DOC} d", ["d.source = 'session'"], "d.id", "0.0"
    else:
        # The document's session_id and time come from a covering index: the row itself has
        # them after the body, which for output overflows into other pages, so reading them
        # there walked the overflow chain of every match (most of a filtered search's time).
        source = (
            f"sessions_app_search_fts f "
            f"JOIN {DOC} d INDEXED BY {SQLITE_JOIN_INDEX} ON d.id = f.rowid"
        )
        where = ["sessions_app_search_fts MATCH %s"]
        params.append(fts5_match(query.text))
        # ordered and bounded by the FTS table's own rowid, FTS5 walks its index backwards and
        # stops after a page instead of sorting every match (60 ms -> 0.1 ms at 10k sessions)
        doc_id = "f.rowid"
        score = "-bm25(sessions_app_search_fts)" if rank else "0.0"  # bm25: lower is better
    if user_id is not None:
        where.append("s.user_id = %s")
        params.append(user_id)
    where += _sqlite_filters(query, user_id, params)
    sql = (
        f"SELECT {doc_id} AS id, {score} AS score FROM {source} "
        "JOIN sessions_app_terminalsession s ON s.id = d.session_id "
        "WHERE " + " AND ".join(where)
    )
    return sql, params


# ---------------------------------------------------------------- both


def _project_ids(names: tuple[str, ...], user_id: int | None) -> list[int]:
    """Return the ids of ``user_id``'s projects (everyone's: None) named one of ``names``, in
    any case of any script.

    Compared in Python with str.casefold(): SQLite's lower() folds ASCII only (`ÄPFEL` did not
    find `äpfel`), and PostgreSQL's follows the database's locale; casefold is Unicode's full
    case folding (`STRASSE` finds `Straße`) on both. A user has few projects to read.
    """
    wanted = {name.casefold() for name in names}
    projects = Project.objects.all() if user_id is None else Project.objects.filter(owner=user_id)
    return [pk for pk, name in projects.values_list("id", "name") if name.casefold() in wanted]


def select_sql(
    query: Query, *, user_id: int | None, rank: bool, before: int | None = None
) -> list[Part]:
    """Return SQL selecting (id, score) of the documents ``query`` finds, in parts.

    Each part is a query and its parameters; newest first, every document a part finds is
    newer than any the next one finds, so a page is read from them in turn until full.
    ``user_id``: only that user's documents (None: everyone's). ``before``: newest first, the
    last document id of the previous page; the caller applies it too, this may use it earlier.
    """
    if connection.vendor == "postgresql":
        return _pg_select(query, user_id, rank, before)
    return [_sqlite_select(query, user_id, rank)]

"""Search: the query language, the index kept by triggers, the API, the page and the command.

Runs on whichever database the suite runs on (SQLite by default, PostgreSQL with
DATABASE_URL): `make test` runs both.
"""

from __future__ import annotations

import base64
import io
from datetime import timedelta
from unittest import mock

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.test import AsyncClient
from django.utils import timezone

from featureflags.models import Flag
from featureflags.services import ensure_product_flags
from sessions_app.errors import Forbidden, ValidationFailed
from sessions_app.models import SearchDocument, SessionEvent, TerminalSession
from sessions_app.search import compile as compiler
from sessions_app.search.engine import BAD_CURSOR, SEARCH_DISABLED, sessions_search
from sessions_app.search.query import And, Not, Or, Term, parse
from sessions_app.storage.base import RECORD_FIELDS, SessionRecord
from sessions_app.storage.database import CHUNK_MIN_BYTES, DatabaseStorage
from tests.factories import ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)


# ---------------------------------------------------------------- the query language


def test_parse_words_phrases_operators_and_filters():
    query = parse(
        '(deploy OR "git push") -error AND NOT warning project:api status:active type:system'
    )
    assert query.text == And(
        (
            Or((Term("deploy", 2), Term("git push", 12, phrase=True))),
            Not(Term("error", 25), 24),
            Not(Term("warning", 39), 35),
        )
    )
    assert query.projects == ("api",)
    assert set(query.states) == {"creating", "active", "detached"}
    assert query.profiles == ("system",)
    assert query.terms == ("deploy", "git push")


def test_parse_since_date_and_age():
    assert parse("since:2026-11-01").since.date().isoformat() == "2026-11-01"
    age = timezone.now() - parse("x since:7d").since
    assert timedelta(days=7) - timedelta(minutes=1) < age < timedelta(days=7, minutes=1)


def test_parse_filters_only_and_quoted_filter_value():
    query = parse('project:"my app" status:killed')
    assert query.text is None
    assert query.projects == ("my app",)
    assert query.states == ("killed",)


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ('say "hello', 5, "Unclosed quote"),
        ("(build OR test", 15, 'Expected ")" to close the "(" at position 1'),
        ("build )", 7, 'Unexpected ")"'),
        ("build OR", 9, "ends after 'OR'"),
        ("OR build", 1, "Unexpected 'OR'"),
        ("AND build", 1, "Unexpected 'AND'"),
        ("build AND", 10, "ends after 'AND'"),
        ("()", 1, "Empty parentheses"),
        ("-error", 1, "NOT needs a word to subtract from"),
        ("NOT error", 1, "NOT needs a word to subtract from"),
        ("build OR -error", 10, "NOT needs a word to subtract from"),
        ("colour:red", 1, "Unknown filter colour:"),
        ("x status:sleeping", 3, "Invalid status:sleeping"),
        ("x since:yesterday", 3, "Invalid since:yesterday"),
        ("x project:", 3, "Expected a value after project:"),
        ("(a OR project:api)", 7, "applies to the whole query"),
        ("a OR project:api", 3, "OR needs"),
        ("a -project:api", 4, "applies to the whole query"),
        ("a ___", 3, "no letters or digits"),
    ],
)
def test_parse_bad_syntax_names_the_position(text, position, fragment):
    with pytest.raises(ValidationFailed) as caught:
        parse(text)
    assert fragment in caught.value.message
    assert f"(at position {position})" in caught.value.message
    assert caught.value.details == {"field": "q", "position": position}


@pytest.mark.parametrize("text", ["", "   "])
def test_parse_empty_query(text):
    with pytest.raises(ValidationFailed, match="Type something") as caught:
        parse(text)
    assert caught.value.details == {"field": "q"}


def test_parse_too_long_a_query_names_where_it_goes_over():
    with pytest.raises(ValidationFailed, match="longer than 1000 characters") as caught:
        parse("a" * 1001)
    assert caught.value.details == {"field": "q", "position": 1001}


@pytest.mark.parametrize(
    ("text", "position", "code"),
    [("a\x00b", 2, "U+0000"), ("ab \x1b[1m", 4, "U+001B"), ("x\x7f", 2, "U+007F")],
)
def test_parse_refuses_characters_that_cannot_be_searched(text, position, code):
    with pytest.raises(ValidationFailed) as caught:
        parse(text)
    assert f"contains {code} (a control character), which cannot be searched for" in (
        caught.value.message
    )
    assert caught.value.details == {"field": "q", "position": position}


def test_tabs_and_newlines_in_a_query_separate_words():
    assert parse("deploy\tfailed\n").text == And((Term("deploy", 1), Term("failed", 8)))


def test_parse_bounds_how_deep_parentheses_and_not_nest():
    assert parse("(" * 20 + "a" + ")" * 20).text == Term("a", 21)
    with pytest.raises(ValidationFailed, match="nest more than 20 deep") as caught:
        parse("(" * 400 + "a" + ")" * 400)
    assert caught.value.details == {"field": "q", "position": 21}
    with pytest.raises(ValidationFailed, match="nest more than 20 deep"):
        parse("x " + "-(" * 11 + "a" + ")" * 11)


# ---------------------------------------------------------------- fixtures


def flag_on():
    ensure_product_flags()
    flag = Flag.objects.get(name="session_search")
    flag.everyone = True
    flag.save()


def make_session(user, project, *, output=b"", tab_name="main", state="active", **fields):
    session = TerminalSession.objects.create(
        user=user, project=project, tab_name=tab_name, state=state, **fields
    )
    if output:
        DatabaseStorage(scrollback_bytes=1 << 20).append_output(session.pk, 0, output)
    return session


def command(session, line, **data):
    SessionEvent.objects.create(
        session=session,
        kind="command",
        data={"command": line, "cwd": "/srv/app", "exitCode": 0, "durationMs": 12, **data},
    )


@pytest.fixture
def corpus():
    """Two users' sessions; a dict of the first user's, by name."""
    flag_on()
    alice, mallory = UserFactory(username="alice"), UserFactory(username="mallory")
    api = ProjectFactory(owner=alice, name="payments-api")
    web = ProjectFactory(owner=alice, name="webshop")
    theirs = ProjectFactory(owner=mallory, name="payments-api")
    sessions = {
        "build": make_session(
            alice,
            api,
            tab_name="build",
            output=(
                b"\x1b[32m$\x1b[0m python /srv/app/mod12.py\r\n"
                b"Traceback: undefined symbol frobnicate in <module>\r\n"
            ),
        ),
        "deploy": make_session(
            alice,
            web,
            tab_name="deploy",
            title="vim release-notes.md",
            state="exited",
            profile="claude",
            output=b"uploading assets\r\nfrobnicate done\r\n",
        ),
        "killed": make_session(
            alice, api, tab_name="scratch", state="killed", output=b"warning: disk nearly full\r\n"
        ),
    }
    command(sessions["deploy"], "git push origin release-2026")
    make_session(mallory, theirs, tab_name="build", output=b"frobnicate mallory-secret mod12.py\n")
    return {"user": alice, "other": mallory, "projects": {"api": api, "web": web}, **sessions}


def hits(user, text, **kwargs):
    return sessions_search(user=user, text=text, **kwargs).hits


def found(user, text, **kwargs):
    return {hit.session.tab_name for hit in hits(user, text, **kwargs)}


# ---------------------------------------------------------------- what is found


def test_finds_words_in_output(corpus):
    assert found(corpus["user"], "frobnicate") == {"build", "deploy"}
    assert found(corpus["user"], "FROBNICATE Traceback") == {"build"}


def test_finds_a_file_name_inside_a_path(corpus):
    (hit,) = hits(corpus["user"], "mod12.py")
    assert hit.session.id == corpus["build"].pk
    assert hit.source == "output"
    assert "/srv/app/<mark>mod12</mark>.<mark>py</mark>" in hit.snippet
    assert found(corpus["user"], "app/mod12.py") == {"build"}
    assert found(corpus["user"], "mod12") == {"build"}


def test_a_hit_carries_its_session_project_and_time(corpus):
    """What a hit shows is read with its page, as tuples: the same values the ORM gives."""
    build = TerminalSession.objects.get(pk=corpus["build"].pk)
    build.last_activity = timezone.now()
    build.save()
    (hit,) = hits(corpus["user"], "Traceback")
    assert hit.session == SessionRecord(**{name: getattr(build, name) for name in RECORD_FIELDS})
    assert hit.session.created_at.tzinfo is not None
    assert (hit.project_id, hit.project_name) == (build.project_id, "payments-api")
    document = SearchDocument.objects.get(session=build, source="output")
    assert (hit.at, hit.source) == (document.at, "output")


def test_phrase_matches_words_in_order(corpus):
    assert found(corpus["user"], '"undefined symbol"') == {"build"}
    assert found(corpus["user"], '"symbol undefined"') == set()


def test_finds_command_lines(corpus):
    (hit,) = hits(corpus["user"], '"git push"')
    assert hit.source == "command"
    assert hit.session.id == corpus["deploy"].pk
    assert hit.snippet == "<mark>git</mark> <mark>push</mark> origin release-2026"


def test_finds_titles_tab_names_and_project_names(corpus):
    assert found(corpus["user"], "release-notes.md") == {"deploy"}
    assert found(corpus["user"], "scratch") == {"scratch"}
    assert found(corpus["user"], "webshop") == {"deploy"}
    corpus["projects"]["web"].name = "storefront"
    corpus["projects"]["web"].save()
    assert found(corpus["user"], "webshop") == set()
    assert found(corpus["user"], "storefront") == {"deploy"}
    TerminalSession.objects.filter(pk=corpus["build"].pk).update(tab_name="compile")
    assert found(corpus["user"], "compile") == {"compile"}


def test_snippet_is_html_escaped(corpus):
    (hit,) = hits(corpus["user"], "Traceback")
    assert "&lt;module&gt;" in hit.snippet
    assert "<module>" not in hit.snippet
    assert "\x1b" not in hit.snippet


def test_filters(corpus):
    user = corpus["user"]
    assert found(user, "frobnicate project:payments-api") == {"build"}
    assert found(user, "frobnicate project:WEBSHOP") == {"deploy"}
    assert found(user, "frobnicate project:nowhere") == set()
    assert found(user, "frobnicate project:webshop project:payments-api") == {"build", "deploy"}
    assert found(user, "frobnicate status:exited") == {"deploy"}
    assert found(user, "frobnicate status:active") == {"build"}
    assert found(user, "status:killed") == {"scratch"}
    assert found(user, "frobnicate type:claude") == {"deploy"}
    assert found(user, "project:payments-api") == {"build", "scratch"}
    assert found(user, "frobnicate since:1d") == {"build", "deploy"}


def test_project_filter_ignores_case_in_every_script(corpus):
    user = corpus["user"]
    apples = ProjectFactory(owner=user, name="Äpfel")
    make_session(user, apples, tab_name="fruit", output=b"crunch\r\n")
    street = ProjectFactory(owner=user, name="Straße")
    make_session(user, street, tab_name="road", output=b"crunch\r\n")
    for name in ["Äpfel", "äpfel", "ÄPFEL", '"äPFEL"']:
        assert found(user, f"crunch project:{name}") == {"fruit"}, name
        assert found(user, f"project:{name}") == {"fruit"}, name
    assert found(user, "crunch project:STRASSE") == {"road"}
    assert found(user, "crunch project:straße") == {"road"}
    assert found(corpus["other"], "project:äpfel") == set()


def test_filters_follow_a_session_that_changes(corpus):
    """A session's state, project, profile and owner can change after its output was indexed."""
    user, other, build = corpus["user"], corpus["other"], corpus["build"]
    TerminalSession.objects.filter(pk=build.pk).update(state="detached")
    assert found(user, "frobnicate status:active") == {"build"}
    build.refresh_from_db()
    build.state = "exited"
    build.save()
    assert found(user, "frobnicate status:active") == set()
    assert found(user, "frobnicate status:exited") == {"build", "deploy"}
    assert found(user, "status:exited") == {"build", "deploy"}
    TerminalSession.objects.filter(pk=build.pk).update(state="creating")  # revived
    assert found(user, "mod12.py status:active") == {"build"}
    TerminalSession.objects.filter(pk=build.pk).update(project=corpus["projects"]["web"])
    assert found(user, "frobnicate project:webshop") == {"build", "deploy"}
    assert found(user, "frobnicate project:payments-api") == set()
    TerminalSession.objects.filter(pk=build.pk).update(profile="claude")
    assert found(user, "frobnicate type:claude") == {"build", "deploy"}
    TerminalSession.objects.filter(pk=build.pk).update(user=other)
    assert found(user, "frobnicate") == {"deploy"}
    assert [hit.session.id for hit in hits(other, "Traceback")] == [build.pk]


def test_new_output_of_a_changed_session_has_its_current_filters(corpus):
    user, build = corpus["user"], corpus["build"]
    TerminalSession.objects.filter(pk=build.pk).update(
        state="exited", project=corpus["projects"]["web"]
    )
    command(build, "make gizmo")
    assert found(user, "gizmo status:exited project:webshop") == {"build"}
    assert found(user, "gizmo status:active") == set()


def test_since_excludes_older_hits(corpus):
    user = corpus["user"]
    old = timezone.now() - timedelta(days=30)
    with mock.patch("django.utils.timezone.now", return_value=old):
        make_session(user, corpus["projects"]["api"], tab_name="old", output=b"frobnicate\n")
    assert found(user, "frobnicate") == {"build", "deploy", "old"}
    assert found(user, "frobnicate since:7d") == {"build", "deploy"}
    since = (old + timedelta(days=1)).date().isoformat()
    assert found(user, f"frobnicate since:{since}") == {"build", "deploy"}


def test_not_and_or(corpus):
    user = corpus["user"]
    assert found(user, "frobnicate -assets") == {"build"}
    assert found(user, "frobnicate AND NOT Traceback") == {"deploy"}
    assert found(user, "warning OR assets") == {"scratch", "deploy"}
    assert found(user, "(warning OR assets) -disk") == {"deploy"}


def test_another_users_sessions_are_never_found(corpus):
    assert "mallory-secret" not in str(hits(corpus["user"], "frobnicate"))
    assert found(corpus["user"], "mallory") == set()
    assert found(corpus["other"], "frobnicate") == {"build"}
    (hit,) = hits(corpus["other"], "frobnicate")
    assert hit.session.user_id == corpus["other"].pk


def test_newest_first_and_by_rank(corpus):
    user, project = corpus["user"], corpus["projects"]["api"]
    many = make_session(user, project, tab_name="many", output=b"gadget " * 50 + b"\n")
    once = make_session(user, project, tab_name="once", output=b"a gadget among words\n" * 1)
    newest = hits(user, "gadget")
    assert [h.session.id for h in newest] == [once.pk, many.pk]
    ranked = hits(user, "gadget", order="rank")
    assert [h.session.id for h in ranked] == [many.pk, once.pk]
    with pytest.raises(ValidationFailed, match="order must be one of"):
        hits(user, "gadget", order="oldest")


@pytest.mark.parametrize("order", ["newest", "rank"])
def test_cursor_pages_through_every_hit_once(corpus, order):
    user, project = corpus["user"], corpus["projects"]["api"]
    made = {
        make_session(user, project, tab_name=f"t{i}", output=b"widget " * (i + 1)).pk
        for i in range(7)
    }
    seen, cursor, pages, late = [], None, 0, None
    while True:
        page = sessions_search(user=user, text="widget", limit=3, cursor=cursor, order=order)
        seen += [hit.session.id for hit in page.hits]
        pages += 1
        # Output arriving between pages makes no repeat or gap. (By rank on SQLite it may:
        # bm25 weighs a word by how rare it is, so every new document moves every score.)
        if pages == 1 and order == "newest":
            late = make_session(user, project, tab_name="late", output=b"widget\n").pk
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert len(seen) == len(set(seen))
    assert set(seen) - {late} == made
    if order == "newest":  # newer than the first page: it belongs before it, not after
        assert late not in seen
        assert pages == 3
    with pytest.raises(ValidationFailed, match=BAD_CURSOR):
        sessions_search(user=user, text="widget", cursor="not-a-cursor")


def test_pruned_chunks_are_no_longer_found(corpus):
    user = corpus["user"]
    session = make_session(user, corpus["projects"]["api"], tab_name="long")
    storage = DatabaseStorage(scrollback_bytes=100 * 1024)
    filler = b"x" * max(CHUNK_MIN_BYTES + 1000, 60 * 1024)  # three of them pass the window
    end = storage.append_output(session.pk, 0, b"ancientword\n" + filler)
    assert found(user, "ancientword") == {"long"}
    for _ in range(2):
        end = storage.append_output(session.pk, end, filler + b"\nrecentword\n")
    assert found(user, "ancientword") == set()
    assert found(user, "recentword") == {"long"}


def test_output_growing_a_chunk_is_indexed(corpus):
    """Keystroke-sized batches grow the last chunk (an UPDATE); the new words are found."""
    user = corpus["user"]
    session = make_session(user, corpus["projects"]["api"], tab_name="typing")
    storage = DatabaseStorage(scrollback_bytes=1 << 20)
    end = 0
    for word in (b"first ", b"second ", b"third\n"):
        end = storage.append_output(session.pk, end, word)
    assert found(user, "first") == found(user, "third") == {"typing"}
    long_line = b"lorem ipsum " * 5000 + b"tailword /srv/deep/mod99.py\n"  # past 32K characters
    storage.append_output(session.pk, end, long_line)
    (hit,) = hits(user, "mod99.py")
    assert "/srv/deep/<mark>mod99</mark>.<mark>py</mark>" in hit.snippet


def test_deleting_a_session_deletes_its_documents(corpus):
    corpus["build"].delete()
    assert not SearchDocument.objects.filter(session_id=corpus["build"].pk).exists()
    assert found(corpus["user"], "mod12.py") == set()


def test_flag_off_is_forbidden(corpus):
    Flag.objects.filter(name="session_search").update(everyone=False)
    Flag.objects.get(name="session_search").save()  # clear waffle's cached copy
    with pytest.raises(Forbidden, match="session_search"):
        hits(corpus["user"], "frobnicate")


# ---------------------------------------------------------------- the API, page and command


@pytest.fixture
async def client(corpus):
    client = AsyncClient()
    await client.aforce_login(corpus["user"])
    return client


async def test_api_returns_hits(client, corpus):
    response = await client.get("/api/sessions/search", {"q": "mod12.py", "limit": "5"})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["success"] is True
    assert body["nextCursor"] is None
    (hit,) = body["hits"]
    assert hit["session"]["id"] == corpus["build"].pk
    assert hit["session"]["tabName"] == "build"
    assert hit["project"] == {"id": corpus["projects"]["api"].pk, "name": "payments-api"}
    assert hit["time"]
    assert "<mark>mod12</mark>" in hit["snippet"]


async def test_api_pages_with_cursor(client, corpus):
    first = (await client.get("/api/sessions/search", {"q": "frobnicate", "limit": 1})).json()
    assert len(first["hits"]) == 1 and first["nextCursor"]
    second = await client.get(
        "/api/sessions/search", {"q": "frobnicate", "limit": 1, "cursor": first["nextCursor"]}
    )
    body = second.json()
    assert body["nextCursor"] is None
    assert {first["hits"][0]["session"]["id"], body["hits"][0]["session"]["id"]} == {
        corpus["build"].pk,
        corpus["deploy"].pk,
    }


async def test_api_bad_syntax_is_400_with_position(client):
    response = await client.get("/api/sessions/search", {"q": "(deploy OR"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "validation_failed"
    assert "(at position 11)" in error["message"]
    assert error["details"] == {"field": "q", "position": 11}
    response = await client.get("/api/sessions/search", {"q": "x", "limit": "1000"})
    assert response.status_code == 400
    assert "limit" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("q", "position", "fragment"),
    [
        ("a\x00b", 2, "which cannot be searched for"),
        ("(" * 400 + "a" + ")" * 400, 21, "nest more than 20 deep"),
        ("x" * 1001, 1001, "longer than 1000 characters"),
    ],
)
async def test_api_a_query_that_cannot_be_run_is_400_with_position(client, q, position, fragment):
    response = await client.get("/api/sessions/search", {"q": q})
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "validation_failed"
    assert fragment in error["message"]
    assert error["details"] == {"field": "q", "position": position}


async def test_api_an_empty_query_names_the_field(client):
    response = await client.get("/api/sessions/search", {"q": " "})
    assert response.status_code == 400
    assert response.json()["error"]["details"] == {"field": "q"}


def _cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    ("order", "raw"),
    [
        ("newest", b'["newest",null,1000000000000000000000]'),
        ("newest", b'["newest",null,-5]'),
        ("newest", b'["newest",null,true]'),
        ("newest", b"[" * 3000 + b"]" * 3000),
        ("rank", b'["rank",1000000000000000000000,5]'),
        ("rank", b'["rank",1e999,5]'),
        ("rank", b'["rank",NaN,5]'),
        ("rank", b'["rank",' + b"9" * 400 + b",5]"),
        ("rank", b'["rank",false,5]'),
    ],
)
async def test_api_a_cursor_it_did_not_write_is_400(client, order, raw):
    response = await client.get(
        "/api/sessions/search", {"q": "frobnicate", "order": order, "cursor": _cursor(raw)}
    )
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["message"] == BAD_CURSOR and error["details"] == {"field": "cursor"}


@pytest.mark.parametrize("limit", ["\u0665", "\uff11\uff10", "1_0", " 5", "\u00b2", "5.0"])
async def test_api_limit_is_ascii_digits(client, limit):
    response = await client.get("/api/sessions/search", {"q": "frobnicate", "limit": limit})
    assert response.status_code == 400, response.content
    assert response.json()["error"]["details"] == {"field": "limit"}


async def test_api_flag_off_is_403(client):
    await Flag.objects.filter(name="session_search").aupdate(everyone=False)
    from django.core.cache import cache

    cache.clear()
    response = await client.get("/api/sessions/search", {"q": "frobnicate"})
    assert response.status_code == 403
    assert response.json()["error"]["message"] == SEARCH_DISABLED


async def test_api_needs_login(corpus):
    response = await AsyncClient().get("/api/sessions/search", {"q": "frobnicate"})
    assert response.status_code == 401


def test_page_shows_the_search_panel_only_with_the_flag(corpus):
    from django.test import Client

    page = Client()
    page.force_login(corpus["user"])
    html = page.get("/").content.decode()
    assert 'data-search-enabled="true"' in html
    assert 'id="search-panel"' in html
    Flag.objects.filter(name="session_search").update(everyone=False)
    from django.core.cache import cache

    cache.clear()
    html = page.get("/").content.decode()
    assert 'data-search-enabled="false"' in html
    assert 'id="search-panel"' not in html


def test_command_searches_as_a_user(corpus):
    out = io.StringIO()
    call_command("sessions", "search", "frobnicate", "--user", "alice", "--limit", "5", stdout=out)
    text = out.getvalue()
    assert "payments-api" in text and "webshop" in text
    assert "mallory" not in text
    assert "[frobnicate]" in text  # the match, marked for a terminal


# PostgreSQL's newest-first plans, as (few matches below, walk this many documents, sort up
# to this many matches): each plan forced in turn (SQLite has one plan and ignores them).
PLANS = {
    "walk": (0, compiler.PG_WALK_DOCS, 0),
    "sort": (10**9, compiler.PG_WALK_DOCS, 10**9),
    "walk newest 3, sort older": (0, 3, 10**9),
}


def use_plan(monkeypatch, plan):
    few, walk_docs, sort_max = PLANS[plan]
    monkeypatch.setattr(compiler, "PG_FEW_MATCHES", few)
    monkeypatch.setattr(compiler, "PG_WALK_DOCS", walk_docs)
    monkeypatch.setattr(compiler, "PG_SORT_MAX", sort_max)


@pytest.mark.parametrize("plan", PLANS)
def test_newest_first_is_the_same_whichever_plan(corpus, monkeypatch, plan):
    """PostgreSQL picks a plan by its estimate of the matches; all give the same pages."""
    use_plan(monkeypatch, plan)
    for i in range(5):
        make_session(
            corpus["user"], corpus["projects"]["api"], tab_name=f"w{i}", output=b"frobnicate"
        )
    for i in range(4):  # newer documents that do not match: the walk's window holds none
        make_session(corpus["user"], corpus["projects"]["api"], tab_name=f"x{i}", output=b"x")
    first = sessions_search(user=corpus["user"], text="frobnicate", limit=4)
    rest = sessions_search(user=corpus["user"], text="frobnicate", cursor=first.next_cursor)
    assert rest.next_cursor is None
    tabs = [h.session.tab_name for h in first.hits + rest.hits]
    assert tabs == ["w4", "w3", "w2", "w1", "w0", "deploy", "build"]


def test_rebuilding_the_index_orders_it_by_time(corpus):
    """After a table-by-table bulk load, a rebuild puts documents back in time order."""
    from sessions_app.search.index import search_index_rebuild

    query = "frobnicate OR push OR scratch"
    before = [h.snippet for h in hits(corpus["user"], query)]
    docs = list(SearchDocument.objects.order_by("-id"))  # as a load in the wrong order would
    SearchDocument.objects.all().delete()
    for doc in docs:
        doc.pk = None
    SearchDocument.objects.bulk_create(docs)
    assert [h.snippet for h in hits(corpus["user"], query)] == before[::-1]
    assert search_index_rebuild() == len(docs)
    times = list(SearchDocument.objects.order_by("id").values_list("at", flat=True))
    assert times == sorted(times)
    assert [h.snippet for h in hits(corpus["user"], query)] == before


@pytest.mark.parametrize("plan", PLANS)
def test_phrases_find_the_same_hits_whichever_plan(corpus, monkeypatch, plan):
    """A phrase's words apart or in another order are candidates, never hits, on any page.

    With few matches PostgreSQL finds a phrase's candidates by its words alone and checks the
    phrase on the newest first; here the newest candidates are not hits.
    """
    use_plan(monkeypatch, plan)
    user, api, web = corpus["user"], corpus["projects"]["api"], corpus["projects"]["web"]
    for i in range(5):
        state = "exited" if i % 2 else "active"
        make_session(user, api, tab_name=f"near{i}", state=state, output=b"run /opt/gizmo.py\n")
        make_session(user, web, tab_name=f"far{i}", output=b"gizmo here, py there\n")
    for i in range(4):
        make_session(user, api, tab_name=f"apart{i}", output=b"py, then gizmo\n")

    def every_page(text):
        seen, cursor = [], None
        while True:
            page = sessions_search(user=user, text=text, limit=2, cursor=cursor)
            seen += [hit.session.tab_name for hit in page.hits]
            if page.next_cursor is None:
                return seen
            cursor = page.next_cursor

    near = [f"near{i}" for i in reversed(range(5))]
    assert every_page("gizmo.py") == near
    assert every_page('"opt gizmo py"') == near
    assert every_page("gizmo.py status:exited") == ["near3", "near1"]
    assert every_page("gizmo.py project:webshop") == []
    assert every_page("gizmo.py project:payments-api status:active") == ["near4", "near2", "near0"]
    far = [f"far{i}" for i in reversed(range(5))]
    assert set(every_page('gizmo -"gizmo py"')) == {*far, *(f"apart{i}" for i in range(4))}
    assert every_page('gizmo.py OR "there py"') == near
    both = [tab for i in reversed(range(5)) for tab in (f"far{i}", f"near{i}")]
    assert every_page('"gizmo.py" OR "here py"') == both


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's GIN index")
@pytest.mark.parametrize(
    "text, rank", [("quokka", False), ("quokka", True), ("quokka.py", False)], ids=str
)
def test_postgresql_reads_both_halves_of_the_gin_index(corpus, monkeypatch, text, rank):
    """PostgreSQL's GIN index of the documents is two, over the documents whose id hashes even
    and odd (migration 0009_search_vector_halves, so that a restore builds them side by side).
    A search the index is to answer finds matches in both, through both: a match the halves
    cannot answer would read every document instead (seconds at 100k sessions)."""
    use_plan(monkeypatch, "sort")  # newest first from the index, not the walk
    user, api = corpus["user"], corpus["projects"]["api"]
    tabs, halves = set(), set()
    while halves != {0, 1}:  # the hash decides: sessions until each half has a match
        assert len(tabs) < 40
        make_session(user, api, tab_name=f"q{len(tabs)}", output=b"run /srv/quokka.py\n")
        tabs.add(f"q{len(tabs)}")
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT DISTINCT hashint8(id) & 1 FROM {compiler.DOC} WHERE body LIKE %s",
                ["%quokka%"],
            )
            halves = {half for (half,) in cursor.fetchall()}
    assert found(user, text, order="rank" if rank else "newest", limit=50) == tabs
    # Everyone's documents (no other index applies): the halves, if the match lets them answer.
    for sql, params in compiler.select_sql(parse(text), user_id=None, rank=rank):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL enable_seqscan = off")
            cursor.execute(f"EXPLAIN {sql}", params)
            plan = "\n".join(line for (line,) in cursor.fetchall())
        assert "searchdoc_vector_0" in plan and "searchdoc_vector_1" in plan, plan

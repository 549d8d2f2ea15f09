"""The search query language: parse a query string into an AST of text terms and filters.

    query   := or_expr
    or_expr := and_expr ("OR" and_expr)*
    and_expr:= unary (["AND"] unary)*
    unary   := "NOT" unary | "-" unary | atom
    atom    := "(" or_expr ")" | '"phrase"' | word | name ":" value

Filters (``project:``, ``status:``, ``since:``, ``type:``) narrow the whole query, so they
may only stand at its top level (joined by AND). ``NOT`` subtracts from something: a query
made only of negations finds nothing useful, and SQLite's FTS5 cannot express one, so it is
refused on both databases. Every error is a ValidationFailed naming the 1-based position.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.utils import timezone

from sessions_app.errors import ValidationFailed
from sessions_app.states import LIVE_STATES

MAX_QUERY_CHARS = 1000
# Parentheses and NOTs inside one another: the parser and the compilers recurse once per level.
MAX_NESTING = 20
FIELD = "q"  # the API's query parameter, named in every error's details
STATUSES: dict[str, tuple[str, ...]] = {
    "active": tuple(sorted(LIVE_STATES)),
    "exited": ("exited",),
    "killed": ("killed",),
}
FILTERS = ("project", "status", "since", "type")
KEYWORDS = ("AND", "OR", "NOT")
AGE_UNITS = {"h": "hours", "d": "days", "w": "weeks"}

EMPTY_QUERY = "Type something to search for."
TOO_LONG = f"The query is longer than {MAX_QUERY_CHARS} characters."
TOO_DEEP = f"Parentheses and NOT nest more than {MAX_NESTING} deep here"
UNSEARCHABLE = (
    "The query contains {char} ({what}), which cannot be searched for; remove it. Output is "
    "searched without control characters"
)
EXPECTED_TERM = 'a word, a "phrase", a filter or "("'


@dataclass(frozen=True)
class Term:
    """Words to find next to each other (one word, or a quoted phrase)."""

    text: str
    position: int
    phrase: bool = False


@dataclass(frozen=True)
class Not:
    child: Node
    position: int


@dataclass(frozen=True)
class And:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Filter:
    name: str
    value: str
    position: int


Node = Term | Not | And | Or | Filter


@dataclass(frozen=True)
class Query:
    """A parsed query: the text to match (None: filters only) and the filters' values."""

    text: Node | None
    projects: tuple[str, ...] = ()
    states: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()
    since: datetime | None = None
    terms: tuple[str, ...] = field(default=(), compare=False)  # positive terms, to highlight


@dataclass(frozen=True)
class _Token:
    kind: str  # word, phrase, filter, lparen, rparen, and, or, not, minus, end
    value: str
    position: int  # 1-based
    filter_name: str = ""


def _fail(message: str, position: int) -> ValidationFailed:
    return ValidationFailed(
        f"{message} (at position {position}).", details={"field": FIELD, "position": position}
    )


def _check_characters(text: str) -> None:
    """Refuse characters no document can hold: NUL and the other control characters (stored
    output has none: escape sequences are stripped), and lone surrogates (not valid Unicode).
    Whitespace control characters (tab, newline) separate words like a space."""
    for index, char in enumerate(text):
        category = unicodedata.category(char)
        if (category == "Cc" and not char.isspace()) or category == "Cs":
            what = "a lone surrogate" if category == "Cs" else "a control character"
            raise _fail(UNSEARCHABLE.format(char=f"U+{ord(char):04X}", what=what), index + 1)


_FILTER_RE = re.compile(r"([A-Za-z]+):(?!//)")


def _filter_token(text: str, match: re.Match[str]) -> tuple[_Token, int]:
    """Return the filter token starting at ``match`` and the index just after its value."""
    pos, n = match.start() + 1, len(text)
    name = match.group(1).lower()
    if name not in FILTERS:
        expected = ", ".join(f"{f}:" for f in FILTERS)
        raise _fail(f"Unknown filter {match.group(1)}:; expected one of {expected}", pos)
    i = match.end()
    if i < n and text[i] == '"':
        end = text.find('"', i + 1)
        if end < 0:
            raise _fail(f'Unclosed quote in {name}: expected a closing "', i + 1)
        value, i = text[i + 1 : end], end + 1
    else:
        start = i
        while i < n and not text[i].isspace() and text[i] not in '()"':
            i += 1
        value = text[start:i]
    if not value.strip():
        raise _fail(f"Expected a value after {name}:", pos)
    return _Token("filter", value.strip(), pos, name), i


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        pos = i + 1
        if ch.isspace():
            i += 1
        elif ch in "()":
            tokens.append(_Token("lparen" if ch == "(" else "rparen", ch, pos))
            i += 1
        elif ch == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise _fail('Unclosed quote: expected a closing " for the phrase started here', pos)
            tokens.append(_Token("phrase", text[i + 1 : end], pos))
            i = end + 1
        elif (
            ch == "-"
            and (not tokens or tokens[-1].kind != "minus")
            and (i + 1 < n and not text[i + 1].isspace() and text[i + 1] != ")")
        ):
            tokens.append(_Token("minus", ch, pos))
            i += 1
        else:
            match = _FILTER_RE.match(text, i)
            if match:
                token, i = _filter_token(text, match)
                tokens.append(token)
                continue
            start = i
            while i < n and not text[i].isspace() and text[i] not in '()"':
                i += 1
            word = text[start:i]
            kind = word.lower() if word in KEYWORDS else "word"
            tokens.append(_Token(kind, word, pos))
    tokens.append(_Token("end", "", len(text) + 1))
    return tokens


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.at = 0
        self.depth = 0  # parentheses open around the current token
        self.nesting = 0  # parentheses and NOTs around the current token
        self.filters: list[Filter] = []  # top-level filters, which narrow the whole query

    def peek(self) -> _Token:
        return self.tokens[self.at]

    def take(self) -> _Token:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def parse(self) -> Node | None:
        node = self.or_expr()
        token = self.peek()
        if token.kind == "rparen":
            raise _fail('Unexpected ")": there is no "(" to close', token.position)
        return node

    def or_expr(self) -> Node | None:
        children = [self.and_expr()]
        while self.peek().kind == "or":
            operator = self.take()
            children.append(self.and_expr())
            if children[-1] is None or children[0] is None:
                raise _fail(
                    f"OR needs {EXPECTED_TERM.replace(', a filter', '')} on each side",
                    operator.position,
                )
        if len(children) == 1:
            return children[0]
        return Or(tuple(c for c in children if c is not None))

    def and_expr(self) -> Node | None:
        children: list[Node] = []
        filtered = False
        while True:
            token = self.peek()
            if token.kind in ("end", "rparen", "or"):
                break
            if token.kind == "and":
                if not children and not filtered:
                    raise _fail(f"Unexpected 'AND': expected {EXPECTED_TERM}", token.position)
                self.take()
                if self.peek().kind in ("end", "rparen", "or", "and"):
                    self._unexpected(self.peek())
                continue
            if token.kind == "filter" and self.depth == 0:
                self.take()
                self.filters.append(Filter(token.filter_name, token.value, token.position))
                filtered = True
                continue
            children.append(self.unary())
        if not children:
            if filtered and self.depth == 0:
                return None
            self._unexpected(self.peek())
        return children[0] if len(children) == 1 else And(tuple(children))

    def _unexpected(self, token: _Token) -> None:
        if token.kind == "end":
            after = self.tokens[self.at - 1].value if self.at >= 1 else ""
            raise _fail(f"The query ends after {after!r}: expected {EXPECTED_TERM}", token.position)
        raise _fail(f"Unexpected {token.value!r}: expected {EXPECTED_TERM}", token.position)

    def _nest(self, token: _Token) -> None:
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            raise _fail(TOO_DEEP, token.position)

    def unary(self) -> Node:
        token = self.peek()
        if token.kind in ("not", "minus"):
            self.take()
            self._nest(token)
            node = Not(self.unary(), token.position)
            self.nesting -= 1
            return node
        return self.atom()

    def atom(self) -> Node:
        token = self.take()
        if token.kind == "lparen":
            if self.peek().kind == "rparen":
                raise _fail(
                    f'Empty parentheses: expected {EXPECTED_TERM} after "("', token.position
                )
            self._nest(token)
            self.depth += 1
            node = self.or_expr()
            self.depth -= 1
            self.nesting -= 1
            closing = self.peek()
            if closing.kind != "rparen":
                raise _fail(
                    f'Expected ")" to close the "(" at position {token.position}',
                    closing.position,
                )
            self.take()
            assert node is not None  # only top-level filters make an empty branch
            return node
        if token.kind in ("word", "phrase"):
            if not re.search(r"[^\W_]", token.value):
                raise _fail(
                    f"{token.value!r} has no letters or digits to search for", token.position
                )
            return Term(token.value, token.position, phrase=token.kind == "phrase")
        if token.kind == "filter":
            return Filter(token.filter_name, token.value, token.position)
        self.at -= 1
        self._unexpected(token)
        raise AssertionError("unreachable")


def _check_text(node: Node, *, top: bool) -> None:
    """Refuse filters inside OR/NOT/parentheses and negations with nothing to subtract from."""
    if isinstance(node, Filter):
        raise _fail(
            f"The filter {node.name}: applies to the whole query; put it outside OR, NOT and "
            "parentheses",
            node.position,
        )
    if isinstance(node, Not):
        raise _fail(
            "NOT needs a word to subtract from, as in `build -error`; a query of only "
            "negations would match nearly everything",
            node.position,
        )
    if isinstance(node, And):
        if not any(not isinstance(c, Not) for c in node.children):
            first = node.children[0]
            raise _fail("NOT needs a word to subtract from, as in `build -error`", first.position)
        for child in node.children:
            _check_text(child.child if isinstance(child, Not) else child, top=False)
    elif isinstance(node, Or):
        for child in node.children:
            _check_text(child, top=False)


def _since(value: str, position: int) -> datetime:
    age = re.fullmatch(r"(\d{1,5})([hdw])", value.lower())
    if age:
        return timezone.now() - timedelta(**{AGE_UNITS[age.group(2)]: int(age.group(1))})
    try:
        day = datetime.strptime(value, "%Y-%m-%d")
    except ValueError:
        raise _fail(
            f"Invalid since:{value}; expected a date like 2026-11-01 or an age like 7d, 12h, 2w",
            position,
        ) from None
    return timezone.make_aware(day, timezone.get_current_timezone())


def _positive_terms(node: Node | None) -> list[str]:
    if isinstance(node, Term):
        return [node.text]
    if isinstance(node, And | Or):
        return [t for child in node.children for t in _positive_terms(child)]
    return []


def parse(text: str) -> Query:
    """Parse ``text`` into a Query, or raise ValidationFailed saying where and what is wrong."""
    if len(text) > MAX_QUERY_CHARS:
        raise ValidationFailed(TOO_LONG, details={"field": FIELD, "position": MAX_QUERY_CHARS + 1})
    if not text.strip():
        raise ValidationFailed(EMPTY_QUERY, details={"field": FIELD})
    _check_characters(text)
    parser = _Parser(_tokens(text))
    text_node = parser.parse()
    if text_node is not None:
        _check_text(text_node if not isinstance(text_node, Not) else And((text_node,)), top=True)
    filters = parser.filters
    projects, states, profiles, since = [], [], [], None
    for f in filters:
        if f.name == "project":
            projects.append(f.value)
        elif f.name == "type":
            profiles.append(f.value)
        elif f.name == "status":
            if f.value.lower() not in STATUSES:
                raise _fail(
                    f"Invalid status:{f.value}; expected one of " + ", ".join(STATUSES),
                    f.position,
                )
            states.extend(STATUSES[f.value.lower()])
        else:
            moment = _since(f.value, f.position)
            since = moment if since is None else max(since, moment)
    return Query(
        text=text_node,
        projects=tuple(projects),
        states=tuple(states),
        profiles=tuple(profiles),
        since=since,
        terms=tuple(_positive_terms(text_node)),
    )

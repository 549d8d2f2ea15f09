"""Names users give things (projects, terminal tabs): one rule, checked in one place.

A name is shown in the page, the admin, search hits and file names, so it may hold any
visible text but nothing that hides, reorders or breaks the text around it: no control
characters (NUL, ESC, BEL, CR/LF, DEL, C1), no invisible format characters (right-to-left
overrides, zero-width spaces, BOM) but the two joiners that writing needs (ZWNJ in Persian and
Indic scripts, ZWJ in emoji sequences), no line or paragraph separators, and no lone surrogates
(which are not valid Unicode and cannot be stored). Spaces around a name are dropped before
anything is checked, at creation and at renaming alike.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from sessions_app.errors import ValidationFailed

NAME_MAX = 100
# Unicode general categories a name may not contain, with how a message describes them.
REFUSED_CATEGORIES = {
    "Cc": "a control character",
    "Cf": "an invisible formatting character",
    "Cs": "a lone surrogate, which is not valid Unicode",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}
# Format characters that are part of ordinary text: zero-width non-joiner and joiner.
JOINERS = "\u200c\u200d"
# Project names become directory names and appear in paths: no path separators either.
PROJECT_NAME_SEPARATORS = "/\\"

MSG_REQUIRED = "{field} is required: a name of 1-{max} characters."
MSG_NOT_TEXT = "{field} must be a string: a name of 1-{max} characters."
MSG_TOO_LONG = (
    "{field} must be at most {max} characters (spaces around it not counted); it has {length}."
)
MSG_REFUSED_CHARACTER = (
    "{field} must not contain {what}: U+{code:04X} at character {position}. Names may hold "
    "any visible text."
)
MSG_REFUSED_SEPARATOR = "{field} must not contain {char!r} (at character {position})."


def refused_character(text: str, *, also: str = "") -> tuple[int, str] | None:
    """Return the index of ``text``'s first character a name may not hold and why, or None."""
    for index, char in enumerate(text):
        what = None if char in JOINERS else REFUSED_CATEGORIES.get(unicodedata.category(char))
        if what is not None:
            return index, what
        if char in also:
            return index, ""
    return None


def name_clean(value: Any, *, field: str, refused: str = "") -> str:
    """Return ``value`` without surrounding spaces if it is a valid name, or raise
    ValidationFailed naming ``field``, what is wrong and what would be valid.

    ``refused``: characters refused besides the categories every name refuses.
    """
    if value is None:
        raise ValidationFailed(
            MSG_REQUIRED.format(field=field, max=NAME_MAX), details={"field": field}
        )
    if not isinstance(value, str):
        raise ValidationFailed(
            MSG_NOT_TEXT.format(field=field, max=NAME_MAX), details={"field": field}
        )
    name = value.strip()
    if not name:
        raise ValidationFailed(
            MSG_REQUIRED.format(field=field, max=NAME_MAX), details={"field": field}
        )
    bad = refused_character(name, also=refused)
    if bad is not None:
        index, what = bad
        char = name[index]
        position = len(value) - len(value.lstrip()) + index + 1  # in the text as sent
        details = {"field": field, "position": position, "codePoint": f"U+{ord(char):04X}"}
        if what:
            message = MSG_REFUSED_CHARACTER.format(
                field=field, what=what, code=ord(char), position=position
            )
        else:
            message = MSG_REFUSED_SEPARATOR.format(field=field, char=char, position=position)
        raise ValidationFailed(message, details=details)
    if len(name) > NAME_MAX:
        raise ValidationFailed(
            MSG_TOO_LONG.format(field=field, max=NAME_MAX, length=len(name)),
            details={"field": field, "max": NAME_MAX},
        )
    return name


def name_sanitize(text: str, *, refused: str = "", replacement: str = " ") -> str:
    """Return ``text`` with every character a name may not hold replaced, trimmed, cut to
    NAME_MAX: for names that come from elsewhere (a legacy import), never from a user."""

    def keep(char: str) -> bool:
        return char not in refused and (
            char in JOINERS or unicodedata.category(char) not in REFUSED_CATEGORIES
        )

    cleaned = "".join(char if keep(char) else replacement for char in text)
    return cleaned.strip()[:NAME_MAX].strip()

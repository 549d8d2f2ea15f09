"""Working directories of projects: the new one a project given no path gets, and the checks
an existing one given as a path must pass. Every refusal names the field ``path``."""

from __future__ import annotations

import os
import secrets
import unicodedata
from pathlib import Path
from typing import Any

from django.contrib.auth.models import AbstractBaseUser

from sessions_app import conf
from sessions_app.errors import Conflict, ValidationFailed
from sessions_app.models import Project

# Directories made for projects given no path (see directory_allocate)
SLUG_MAX_BYTES = 80
DIRECTORY_TRIES = 1000
MSG_NO_DIRECTORY = "No free directory {parent}/{base}-N for the project; give it a path."
PATH_MAX = Project._meta.get_field("path").max_length
MSG_PATH_NOT_TEXT = "Project path must be a string: an absolute path of an existing directory."
MSG_PATH_NO_HOME = (
    "Project path {path} starts with ~ but names no user of this machine; give an absolute path."
)
MSG_PATH_NOT_UNICODE = "Project path {path} is not valid Unicode (it holds a lone surrogate)."
MSG_PATH_RELATIVE = "Project path {path} must be absolute (start with / or ~)."
MSG_PATH_NOT_A_DIRECTORY = "Project path {path} does not exist or is not a directory."
MSG_PATH_UNUSABLE = "Project path {path} cannot be used: {reason}."
MSG_PATH_TOO_LONG = f"Project path {{path}} is longer than {PATH_MAX} characters."


def _slug(text: str, fallback: str) -> str:
    """Return ``text`` as one readable path component: letters, marks and digits of any script,
    ``.``, ``_`` and ``-``; every other run of characters one ``-``; ``fallback`` if nothing is
    left. Never ``.`` or ``..``, at most SLUG_MAX_BYTES of UTF-8."""
    text = unicodedata.normalize("NFKC", text)
    kept = "".join(c if unicodedata.category(c)[0] in "LMN" or c in "._-" else " " for c in text)
    slug = "-".join(kept.split()).strip("-.")
    slug = slug.encode()[:SLUG_MAX_BYTES].decode("utf-8", "ignore").strip("-.")
    return slug or fallback


def directory_allocate(*, owner: AbstractBaseUser, name: str, create: bool = True) -> Path:
    """Return a new directory for a project given no path, created unless ``create`` is False.

    It is TERMSYS_PROJECTS_ROOT/<owner>/<slug of the name>, with ``-2``, ``-3``, … added when
    a project of any user already points there or the directory already exists (left by a
    deleted project, or made by someone else): two projects never share a directory by
    accident, and a new project never finds another's files in its own. Creating it with
    ``mkdir`` (not ``exist_ok``) settles a race between two requests choosing the same one.
    """
    parent = conf.projects_root().resolve() / _slug(owner.get_username(), f"user-{owner.pk}")
    base = _slug(name, "project")
    taken = set(
        Project.objects.filter(path__startswith=str(parent / base)).values_list("path", flat=True)
    )
    if create:
        parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, DIRECTORY_TRIES + 2):
        suffix = f"-{n}" if n <= DIRECTORY_TRIES else f"-{secrets.token_hex(6)}"
        candidate = parent / (base if n == 1 else base + suffix)
        if str(candidate) in taken or (not create and os.path.lexists(candidate)):
            continue
        if not create:
            return candidate
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise Conflict(MSG_NO_DIRECTORY.format(parent=parent, base=base))


def existing_directory(path: Any) -> Path:
    """Return ``path`` (``~`` expanded, resolved) if it names an existing directory, or raise
    ValidationFailed naming the field ``path`` and what is wrong with it."""
    if not isinstance(path, str):
        raise ValidationFailed(MSG_PATH_NOT_TEXT, details={"field": "path"})
    shown = repr(path[:PATH_MAX]) + ("…" if len(path) > PATH_MAX else "")
    if any(unicodedata.category(char) == "Cs" for char in path):  # no database can store it
        raise ValidationFailed(MSG_PATH_NOT_UNICODE.format(path=shown), details={"field": "path"})
    try:
        directory = Path(path).expanduser()
    except RuntimeError:  # ~name of a user this machine does not have
        raise ValidationFailed(
            MSG_PATH_NO_HOME.format(path=shown), details={"field": "path"}
        ) from None
    if not directory.is_absolute():
        raise ValidationFailed(MSG_PATH_RELATIVE.format(path=shown), details={"field": "path"})
    try:
        if not directory.is_dir():
            raise ValidationFailed(
                MSG_PATH_NOT_A_DIRECTORY.format(path=shown), details={"field": "path"}
            )
        resolved = directory.resolve(strict=True)
    except (OSError, ValueError, RuntimeError) as exc:  # too long, a NUL, a symlink loop, …
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ValidationFailed(
            MSG_PATH_UNUSABLE.format(path=shown, reason=reason), details={"field": "path"}
        ) from None
    if len(str(resolved)) > PATH_MAX:
        raise ValidationFailed(MSG_PATH_TOO_LONG.format(path=shown), details={"field": "path"})
    return resolved

"""The one place that reads termsys's ``TERMSYS_*`` settings, with defaults and validation."""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

SYSTEM_PROFILE = "system"

# Output is read from the PTY in reads of this size; a short read means the PTY is drained.
READ_BYTES = 64 * 1024
# Largest binary (input) frame and text (control) frame a client may send.
MAX_INPUT_FRAME_BYTES = 256 * 1024
MAX_CONTROL_FRAME_BYTES = 16 * 1024
# Flow control: stop reading the PTY above the high-water mark of unacknowledged bytes.
FLOW_HIGH_WATER = 512 * 1024
FLOW_LOW_WATER = 128 * 1024
# Storage writes of output are batched: flushed after this delay or at this size.
OUTPUT_FLUSH_SECONDS = 0.25
# A flood that outran storage's window since its last batch (a provider that skips pruned
# output, DATABASE) is stored on this coarser grid instead: each batch replaces the whole
# window, so storing it four times a second cost a core's worth of writes and search indexing.
FLOOD_FLUSH_SECONDS = 1.0
OUTPUT_FLUSH_BYTES = 256 * 1024
# Terminal size bounds; anything outside is clamped.
MIN_COLS, MAX_COLS = 2, 1000
MIN_ROWS, MAX_ROWS = 1, 500


def validate_profiles(profiles: Any, *, source: str) -> None:
    """Raise ImproperlyConfigured unless ``profiles`` maps names to non-empty argv lists."""
    if not isinstance(profiles, dict):
        raise ImproperlyConfigured(f"{source} must be a JSON object of profile name -> argv list.")
    for name, argv in profiles.items():
        if not isinstance(name, str) or not name or len(name) > 32:
            raise ImproperlyConfigured(f"{source}: profile name {name!r} must be 1-32 characters.")
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(part, str) and part for part in argv)
        ):
            raise ImproperlyConfigured(
                f"{source}: profile {name!r} must be a non-empty list of strings, e.g. "
                f'["/bin/bash", "-l"]; got {argv!r}.'
            )


def login_shell() -> str:
    """Return the server user's login shell, falling back to /bin/sh."""
    try:
        shell = pwd.getpwuid(os.getuid()).pw_shell
    except KeyError:
        shell = ""
    return shell if shell and os.path.exists(shell) else "/bin/sh"


def profiles() -> dict[str, list[str]]:
    """Return every profile name -> argv; ``system`` is the login shell unless overridden."""
    configured: dict[str, list[str]] = dict(getattr(settings, "TERMSYS_PROFILES", {}) or {})
    result = {SYSTEM_PROFILE: [login_shell(), "-l"]}
    result.update(configured)
    return result


def storage_mode() -> str:
    return settings.TERMSYS_STORAGE_MODE


def scrollback_bytes() -> int:
    return settings.TERMSYS_SCROLLBACK_BYTES


def max_sessions_per_project() -> int:
    return settings.TERMSYS_MAX_SESSIONS_PER_PROJECT


def max_sessions_per_user() -> int:
    return settings.TERMSYS_MAX_SESSIONS_PER_USER


def idle_timeout() -> int:
    return settings.TERMSYS_IDLE_TIMEOUT


def scrollback_memory_bytes() -> int:
    return settings.TERMSYS_SCROLLBACK_MEMORY_BYTES


def ws_connects_per_minute() -> int:
    return settings.TERMSYS_WS_CONNECTS_PER_MINUTE


def ws_messages_per_second() -> int:
    return settings.TERMSYS_WS_MESSAGES_PER_SECOND


def local_max_bytes() -> int:
    return settings.TERMSYS_LOCAL_MAX_BYTES


def journal_dir() -> Path:
    return Path(settings.TERMSYS_JOURNAL_DIR)


def journal_max_bytes() -> int:
    return settings.TERMSYS_JOURNAL_MAX_BYTES


def journal_fsync() -> str:
    return settings.TERMSYS_JOURNAL_FSYNC


def projects_root() -> Path:
    return Path(settings.TERMSYS_PROJECTS_ROOT)


def cgroup_root() -> str | None:
    """Return where session cgroups go: None to auto-detect, "" to use none, else a path."""
    return settings.TERMSYS_CGROUP_ROOT

"""Storage providers and the factory that picks one; callers never branch on the mode."""

from __future__ import annotations

import threading

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

from sessions_app import conf
from sessions_app.storage.base import Scrollback, SessionRecord, StorageProvider, newest_versions

__all__ = [
    "Scrollback",
    "SessionRecord",
    "StorageProvider",
    "find",
    "get_storage",
    "list_for_project",
    "list_for_user",
    "mode_for_user",
]

_providers: dict[str, StorageProvider] = {}


def _build(mode: str) -> StorageProvider:
    if mode == "DATABASE":
        from sessions_app.storage.database import DatabaseStorage

        return DatabaseStorage(scrollback_bytes=conf.scrollback_bytes())
    if mode == "LOCAL":
        from sessions_app.storage.local import LocalStorage

        return LocalStorage(
            scrollback_bytes=conf.scrollback_bytes(), max_bytes=conf.local_max_bytes()
        )
    if mode == "HYBRID":
        from sessions_app.storage.hybrid import HybridStorage

        return HybridStorage(
            scrollback_bytes=conf.scrollback_bytes(),
            memory_max_bytes=conf.local_max_bytes(),
            journal_dir=conf.journal_dir(),
            journal_max_bytes=conf.journal_max_bytes(),
            fsync=conf.journal_fsync(),
        )
    raise ImproperlyConfigured(f"Unknown storage mode {mode!r}; allowed: {', '.join(MODES)}.")


MODES = ("LOCAL", "DATABASE", "HYBRID")
_lock = threading.Lock()


def get_storage(mode: str | None = None) -> StorageProvider:
    """Return the (cached, one per process) provider for ``mode``, by default the stable mode."""
    mode = mode or conf.storage_mode()
    provider = _providers.get(mode)
    if provider is None:
        with _lock:
            provider = _providers.get(mode)
            if provider is None:
                provider = _providers[mode] = _build(mode)
    return provider


def _in_use() -> list[StorageProvider]:
    """Return the providers to consult for reads: memory-first ones, then the database."""
    get_storage("DATABASE")
    return [_providers[m] for m in ("LOCAL", "HYBRID", "DATABASE") if m in _providers]


def find(session_id: str) -> SessionRecord | None:
    """Return a session from whichever provider holds its newest version."""
    found = [r for p in _in_use() if (r := p.get(session_id)) is not None]
    return max(found, key=lambda r: r.version) if found else None


def list_for_user(user_id: int) -> list[SessionRecord]:
    return newest_versions(*(p.list_by_user(user_id) for p in _in_use()))


def list_for_project(project_id: int) -> list[SessionRecord]:
    return newest_versions(*(p.list_by_project(project_id) for p in _in_use()))


def pending() -> dict[str, dict]:
    """Return write-behind figures of every provider in use, by mode."""
    return {p.mode: p.pending() for p in _in_use()}


def mode_for_user(user_id: int) -> str:
    """Return the storage mode a user's new sessions get (see featureflags)."""
    from featureflags.evaluation import storage_mode_for

    return storage_mode_for(user_id)


def start_server() -> None:
    """Open the providers a server needs at once: the stable mode, and HYBRID if its journal
    holds records from an earlier run (they are replayed and synced now, not on first use)."""
    get_storage()
    if any(conf.journal_dir().glob("journal-*.tsj")):
        get_storage("HYBRID")
    from featureflags.services import emergency_rollback, warn_if_cache_is_per_process

    warn_if_cache_is_per_process()
    emergency_rollback()


def _close_all() -> None:
    for provider in list(_providers.values()):
        close = getattr(provider, "close", None)
        if close is not None:
            close()
    _providers.clear()


@receiver(setting_changed)
def _reset_providers(*, setting: str, **kwargs: object) -> None:
    if setting.startswith("TERMSYS_"):
        _close_all()

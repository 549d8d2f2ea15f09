"""Storage providers and the factory that picks one; callers never branch on the mode."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

from sessions_app import conf
from sessions_app.storage.base import Scrollback, SessionRecord, StorageProvider

__all__ = ["Scrollback", "SessionRecord", "StorageProvider", "get_storage", "mode_for_user"]

_providers: dict[str, StorageProvider] = {}


def _build(mode: str) -> StorageProvider:
    if mode == "DATABASE":
        from sessions_app.storage.database import DatabaseStorage

        return DatabaseStorage(scrollback_bytes=conf.scrollback_bytes())
    raise ImproperlyConfigured(
        f"TERMSYS_STORAGE_MODE={mode!r} is not available in this version; use DATABASE."
    )


def get_storage(mode: str | None = None) -> StorageProvider:
    """Return the (cached) provider for ``mode``, by default the stable mode."""
    mode = mode or conf.storage_mode()
    provider = _providers.get(mode)
    if provider is None:
        provider = _providers[mode] = _build(mode)
    return provider


def mode_for_user(user_id: int) -> str:
    """Return the storage mode a user's new sessions get."""
    return conf.storage_mode()


@receiver(setting_changed)
def _reset_providers(*, setting: str, **kwargs: object) -> None:
    if setting.startswith("TERMSYS_"):
        _providers.clear()

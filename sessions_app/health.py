"""Health checks of what termsys depends on: the database, the channel layer, the cache."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.core.cache import cache
from django.db import connection

TIMEOUT = 3.0


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def _cache() -> None:
    key = f"termsys:health:{uuid.uuid4().hex}"
    cache.set(key, "1", 10)
    if cache.get(key) != "1":
        raise RuntimeError("value written was not read back")
    cache.delete(key)


async def _channel_layer() -> None:
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer configured")
    channel = await layer.new_channel("health.")
    await layer.send(channel, {"type": "health.ping"})
    message = await layer.receive(channel)
    if message.get("type") != "health.ping":
        raise RuntimeError("message sent was not received")


async def _run(check: Any) -> dict[str, Any]:
    try:
        await asyncio.wait_for(check(), TIMEOUT)
    except Exception as exc:  # any failure is reported by name, not raised
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:200] or "failed"}
    return {"ok": True}


def storage_figures() -> dict[str, dict[str, Any]]:
    """Return each storage mode's write-behind figures (pending count, oldest pending age)."""
    from sessions_app import storage

    return {
        mode: {
            "pending": v.get("count", 0),
            "oldestPendingAge": v.get("oldest_age", 0.0),
            **({"circuit": v["circuit"]} if "circuit" in v else {}),
        }
        for mode, v in storage.pending().items()
    }


async def health_checks() -> dict[str, dict[str, Any]]:
    names = ("database", "channelLayer", "cache")
    results = await asyncio.gather(
        _run(database_sync_to_async(_database)),
        _run(_channel_layer),
        _run(sync_to_async(_cache, thread_sensitive=False)),
    )
    return dict(zip(names, results, strict=True))

"""Rate limits of the terminal WebSocket (close code 4429).

Two limits, each a setting (``0`` turns it off): how many terminal sockets a user may open per
minute, counted in the cache (shared by every server process when the cache is Redis), and how
many frames one socket may send per second, a token bucket in the consumer.
"""

from __future__ import annotations

import logging
import time

from django.core.cache import cache

from sessions_app import conf

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60


def connect_allowed(user_id: int) -> bool:
    """Count a WebSocket opened by ``user_id``; return False past the per-minute limit.

    A fixed one-minute window per user. When the cache cannot answer, the connection is
    allowed: a cache outage must not lock users out of their terminals.
    """
    limit = conf.ws_connects_per_minute()
    if limit <= 0:
        return True
    key = f"termsys:ws-connects:{user_id}:{int(time.time()) // WINDOW_SECONDS}"
    try:
        cache.add(key, 0, timeout=WINDOW_SECONDS + 5)
        count = cache.incr(key)
    except Exception as exc:  # the cache is down or evicted the key: do not refuse
        logger.warning("connection rate limit not checked (cache: %s)", exc)
        return True
    return count <= limit


class TokenBucket:
    """Allow ``rate`` events per second on average, in bursts of up to ``rate``."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.updated = time.monotonic()

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(float(self.rate), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

"""The safeguard: watch each flag's cohort and roll the flag back by itself when it hurts.

Every server process records outcomes per flag cohort ("on": users the flag is on for, "off":
the others): HTTP requests (error = status 500 or more, latency), terminal WebSocket connects
(refused by a server error, time to accept) and storage failures of live terminals. Figures go
into the process's accumulator and are added, about once a second, to time buckets in the
shared cache (Redis in production), so every process's traffic counts.

A check (``check()``, every ``TERMSYS_SAFEGUARD_INTERVAL`` seconds, by the in-process task or
``manage.py flag_tasks``) reads the last interval of each flag that is on for someone: error
rate, p95 latency (from a latency histogram) and the in-memory output of the cohort's live
terminals. A figure over its threshold, with at least ``TERMSYS_SAFEGUARD_MIN_SAMPLES``
samples, is a breach; ``TERMSYS_SAFEGUARD_CHECKS`` breaches in a row roll the flag back
through ``flag_rollback``, with a reason that names the figure.

Error rate and latency must be over their thresholds even without the
``TERMSYS_SAFEGUARD_MIN_USERS`` - 1 users who contributed most to them (most errors, most slow
responses): a failure the flag causes hurts many of its users, while one user (a client stuck
retrying, or someone sending requests the server fails on) must not roll a flag back for
everyone. For that, each second's figures keep the ``HEAVY_USERS`` users with the most errors
and slow responses in that second, with their counts.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.cache import cache

logger = logging.getLogger(__name__)

PREFIX = "termsys:safeguard"
# Latency histogram bins (upper bounds, ms); the last bin holds everything slower.
BINS_MS = (1, 2, 3, 5, 7, 10, 15, 20, 25, 30, 40, 50, 60, 75, 100, 125, 150, 200, 250, 300)
BINS_MS += (400, 500, 750, 1000, 2000, 5000)
MAX_PENDING = 100_000  # outcomes a process keeps between flushes; beyond, the oldest go
COHORTS = ("on", "off")
KEEP_SECONDS = 3600
# Per flag, cohort and second: the users with the most errors and slow responses, with their
# counts (samples, errors, slow). More than TERMSYS_SAFEGUARD_MIN_USERS can ask to leave out.
HEAVY_USERS = 16
SAMPLES, ERRORS, SLOW = 0, 1, 2


def _settings() -> dict[str, Any]:
    return {
        "enabled": settings.TERMSYS_SAFEGUARD_ENABLED,
        "interval": settings.TERMSYS_SAFEGUARD_INTERVAL,
        "error_rate": settings.TERMSYS_SAFEGUARD_ERROR_RATE,
        "p95_ms": settings.TERMSYS_SAFEGUARD_P95_MS,
        "memory": settings.TERMSYS_SAFEGUARD_MEMORY_BYTES,
        "checks": settings.TERMSYS_SAFEGUARD_CHECKS,
        "min_samples": settings.TERMSYS_SAFEGUARD_MIN_SAMPLES,
        "min_users": settings.TERMSYS_SAFEGUARD_MIN_USERS,
    }


def watched_flags() -> list[Any]:
    """Flags the safeguard watches: on for some users (a percentage, everyone, or a ramp)."""
    from django.db.models import Q

    from featureflags.models import Flag

    return list(
        Flag.objects.filter(rolled_back=False).filter(
            Q(everyone=True) | Q(everyone__isnull=True, percent__gt=0)
        )
    )


# --- recording (every process) --------------------------------------------------------------


class _Accumulator:
    """Outcomes recorded in this process since the last flush (bounded)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcomes: deque[tuple[int, int, bool, float | None]] = deque(maxlen=MAX_PENDING)

    def add(self, user_id: int, ok: bool, latency_ms: float | None) -> None:
        with self._lock:
            self._outcomes.append((int(time.time()), user_id, ok, latency_ms))

    def take(self) -> list[tuple[int, int, bool, float | None]]:
        with self._lock:
            taken = list(self._outcomes)
            self._outcomes.clear()
        return taken


_pending = _Accumulator()


def record(user_id: int | None, *, ok: bool, latency_ms: float | None = None) -> None:
    """Record one outcome of a logged-in user (cheap: cohorts are worked out at flush)."""
    if user_id is not None and settings.TERMSYS_SAFEGUARD_ENABLED:
        _pending.add(user_id, ok, latency_ms)


Counts = list[int]  # [samples, errors, slow] of one user


def _tally(
    outcomes: list[tuple[int, int, bool, float | None]],
) -> tuple[dict[str, int], dict[str, dict[int, Counts]], dict[tuple[str, int], set[int]]]:
    """Count outcomes per watched flag, cohort and second; keep each second's heaviest users;
    collect each ramp step's users."""
    from featureflags.evaluation import flag_is_active_for

    slow_ms = settings.TERMSYS_SAFEGUARD_P95_MS
    counts: dict[str, int] = defaultdict(int)
    per_user: dict[str, dict[int, Counts]] = defaultdict(dict)
    exposed: dict[tuple[str, int], set[int]] = defaultdict(set)
    for flag in watched_flags():
        cohort_of: dict[int, str] = {}
        ramping = bool(flag.ramp) and flag.ramp_step is not None
        for second, user_id, ok, latency_ms in outcomes:
            cohort = cohort_of.get(user_id)
            if cohort is None:
                cohort = "on" if flag_is_active_for(user_id, flag.name) else "off"
                cohort_of[user_id] = cohort
            base = f"{flag.name}:{cohort}:{second}"
            mine = per_user[base].setdefault(user_id, [0, 0, 0])
            counts[f"{base}:n"] += 1
            mine[SAMPLES] += 1
            if not ok:
                counts[f"{base}:err"] += 1
                mine[ERRORS] += 1
            if latency_ms is not None:
                counts[f"{base}:b{bisect.bisect_left(BINS_MS, latency_ms)}"] += 1
                if latency_ms > slow_ms:
                    counts[f"{base}:slow"] += 1
                    mine[SLOW] += 1
            if ramping and cohort == "on":
                exposed[(flag.name, flag.ramp_step)].add(user_id)
    heavy = {base: _heaviest(users) for base, users in per_user.items()}
    return counts, {base: users for base, users in heavy.items() if users}, exposed


def _heaviest(users: dict[int, Counts]) -> dict[int, Counts]:
    """The ``HEAVY_USERS`` users with the most errors and slow responses (none without)."""
    hurt = [(u, c) for u, c in users.items() if c[ERRORS] or c[SLOW]]
    hurt.sort(key=lambda item: (item[1][ERRORS] + item[1][SLOW], item[1][SAMPLES]), reverse=True)
    return dict(hurt[:HEAVY_USERS])


def _add_heavy(key: str, users: dict[int, Counts]) -> None:
    """Add a flush's heaviest users of one second to those the cache holds for it.

    Read, add, write: two processes flushing the same second within the same instant can lose
    one's counts for that second; less of those users' share is then left out of that second
    (errors and samples themselves are counted exactly, with ``incr``).
    """
    held: dict[int, Counts] = cache.get(key) or {}
    for user_id, (samples, errors, slow) in users.items():
        total = held.setdefault(user_id, [0, 0, 0])
        total[SAMPLES] += samples
        total[ERRORS] += errors
        total[SLOW] += slow
    cache.set(key, _heaviest(held), timeout=KEEP_SECONDS)


def flush() -> None:
    """Add this process's recorded outcomes, per watched flag and cohort, to the shared time
    buckets; count the users each ramp step exposed. Never raises."""
    outcomes = _pending.take()
    if not outcomes:
        return
    try:
        counts, heavy, exposed = _tally(outcomes)
    except Exception:
        logger.warning("safeguard: outcomes not tallied (flags unreadable)", exc_info=True)
        return
    try:
        for key, value in counts.items():
            full = f"{PREFIX}:{key}"
            cache.add(full, 0, timeout=KEEP_SECONDS)
            cache.incr(full, value)
        for base, users in heavy.items():
            _add_heavy(f"{PREFIX}:{base}:heavy", users)
        for (flag, step), users in exposed.items():
            for user_id in users:
                if cache.add(f"{PREFIX}:seen:{flag}:{step}:{user_id}", 1, timeout=7 * 86400):
                    counter = f"{PREFIX}:exposed:{flag}:{step}"
                    cache.add(counter, 0, timeout=7 * 86400)
                    cache.incr(counter)
    except Exception:
        logger.warning("safeguard: figures not saved (cache unavailable)", exc_info=True)


def exposed_users(flag: str, step: int) -> int:
    """Distinct users the flag was on for while ramp step ``step`` was in effect."""
    try:
        return int(cache.get(f"{PREFIX}:exposed:{flag}:{step}") or 0)
    except Exception:
        return 0


# --- checking ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    samples: int
    errors: int
    p95_ms: float | None
    memory_bytes: int
    slow: int = 0  # samples slower than TERMSYS_SAFEGUARD_P95_MS
    heavy: dict[int, Counts] = field(default_factory=dict)  # user -> [samples, errors, slow]

    @property
    def error_rate(self) -> float:
        return 100.0 * self.errors / self.samples if self.samples else 0.0

    @property
    def error_users(self) -> int:
        """Users with an error in the window (as far as each second's heaviest users show)."""
        return sum(1 for counts in self.heavy.values() if counts[ERRORS])

    def without_heaviest(self, users: int, index: int) -> tuple[int, int]:
        """Return (samples, count) without the ``users`` users with the highest count, where
        ``index`` picks errors (ERRORS) or slow responses (SLOW)."""
        total = self.errors if index == ERRORS else self.slow
        top = sorted(self.heavy.values(), key=lambda c: c[index], reverse=True)[:users]
        top = [c for c in top if c[index]]
        samples = self.samples - sum(c[SAMPLES] for c in top)
        return max(samples, 0), max(total - sum(c[index] for c in top), 0)

    def as_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "errors": self.errors,
            "errorRate": round(self.error_rate, 3),
            "errorUsers": self.error_users,
            "p95Ms": self.p95_ms,
            "memoryBytes": self.memory_bytes,
        }


def _p95(bins: list[int]) -> float | None:
    """Estimate the 95th percentile from the histogram (linear within the bin it falls in)."""
    total = sum(bins)
    if not total:
        return None
    rank = 0.95 * total
    seen = 0
    for index, count in enumerate(bins):
        if count and seen + count >= rank:
            low = BINS_MS[index - 1] if index > 0 else 0
            high = BINS_MS[index] if index < len(BINS_MS) else BINS_MS[-1] * 2
            return low + (high - low) * (rank - seen) / count
        seen += count
    return None


def figures(flag: str, cohort: str, seconds: int, memory_bytes: int = 0) -> Figures:
    """Return the cohort's figures over the last ``seconds`` (from the shared cache)."""
    now = int(time.time())
    keys = []
    for second in range(now - seconds + 1, now + 1):
        base = f"{PREFIX}:{flag}:{cohort}:{second}"
        keys += [f"{base}:n", f"{base}:err", f"{base}:slow", f"{base}:heavy"]
        keys += [f"{base}:b{i}" for i in range(len(BINS_MS) + 1)]
    values = cache.get_many(keys)
    samples = errors = slow = 0
    bins = [0] * (len(BINS_MS) + 1)
    heavy: dict[int, Counts] = {}
    for key, value in values.items():
        kind = key.rsplit(":", 1)[1]
        if kind == "n":
            samples += int(value)
        elif kind == "err":
            errors += int(value)
        elif kind == "slow":
            slow += int(value)
        elif kind == "heavy":
            for user_id, counts in value.items():
                total = heavy.setdefault(user_id, [0, 0, 0])
                for index in (SAMPLES, ERRORS, SLOW):
                    total[index] += counts[index]
        else:
            bins[int(kind[1:])] += int(value)
    return Figures(
        samples=samples,
        errors=errors,
        p95_ms=_p95(bins),
        memory_bytes=memory_bytes,
        slow=slow,
        heavy=heavy,
    )


def _cohort_memory(flag: str) -> dict[str, int]:
    """In-memory output of this process's live terminals, per cohort of ``flag``."""
    from featureflags.evaluation import flag_is_active_for
    from sessions_app import terminals

    memory = {"on": 0, "off": 0}
    for terminal in terminals.all_terminals():
        cohort = "on" if flag_is_active_for(terminal.user_id, flag) else "off"
        memory[cohort] += terminal.memory_bytes()
    return memory


MSG_FEW_USERS = "{figure}, but from fewer than {users} users: not judged"


def _spread(figures_on: Figures, limits: dict[str, Any], index: int) -> float:
    """The share (%) of errors or slow responses without the users who contributed most."""
    samples, count = figures_on.without_heaviest(limits["min_users"] - 1, index)
    return 100.0 * count / samples if samples else 0.0


def _stays_over(figures_on: Figures, limits: dict[str, Any], index: int, share: float) -> bool:
    """Whether errors (slow responses) stay above ``share`` % without the heaviest users."""
    return limits["min_users"] <= 1 or _spread(figures_on, limits, index) > share


def _over(figures_on: Figures, limits: dict[str, Any]) -> list[tuple[str, bool]]:
    """Each figure over its threshold, and whether it stays over without the heaviest users."""
    found = []
    if figures_on.samples < limits["min_samples"]:
        return found
    if figures_on.error_rate > limits["error_rate"]:
        figure = f"error rate {figures_on.error_rate:.1f} % > {limits['error_rate']:g} %"
        found.append((figure, _stays_over(figures_on, limits, ERRORS, limits["error_rate"])))
    if figures_on.p95_ms is not None and figures_on.p95_ms > limits["p95_ms"]:
        figure = f"p95 latency {figures_on.p95_ms:.0f} ms > {limits['p95_ms']:g} ms"
        # p95 over the threshold: more than 5 % of the responses slower than it
        found.append((figure, _stays_over(figures_on, limits, SLOW, 5.0)))
    return found


def breach(figures_on: Figures, limits: dict[str, Any]) -> str | None:
    """Return what is over its threshold in the cohort's figures, or None.

    Error rate and p95 latency count only when they stay over their thresholds without the
    ``min_users`` - 1 users with the most errors (slow responses): one user cannot trip them.
    """
    if figures_on.memory_bytes > limits["memory"] > 0:
        return f"memory {figures_on.memory_bytes} bytes > {limits['memory']} bytes"
    return next((figure for figure, spread in _over(figures_on, limits) if spread), None)


def held_back(figures_on: Figures, limits: dict[str, Any]) -> str | None:
    """Return a figure over its threshold that too few users account for (so no breach)."""
    for figure, spread in _over(figures_on, limits):
        if not spread:
            return MSG_FEW_USERS.format(figure=figure, users=limits["min_users"])
    return None


_latest: dict[str, dict[str, Any]] = {}


def latest_figures() -> dict[str, dict[str, Any]]:
    """The last check's figures per flag and cohort, and its breach streak (for the status
    page); from the shared cache, so any process can show them."""
    try:
        return cache.get(f"{PREFIX}:latest") or dict(_latest)
    except Exception:
        return dict(_latest)


def check() -> list[str]:
    """Check every watched flag once; roll back those over a threshold for long enough.

    Return the names of the flags rolled back.
    """
    from featureflags.services import flag_rollback

    limits = _settings()
    if not limits["enabled"]:
        return []
    flush()
    rolled_back = []
    latest: dict[str, dict[str, Any]] = {}
    for flag in watched_flags():
        memory = _cohort_memory(flag.name)
        on = figures(flag.name, "on", limits["interval"], memory["on"])
        off = figures(flag.name, "off", limits["interval"], memory["off"])
        problem = breach(on, limits)
        streak_key = f"{PREFIX}:streak:{flag.name}"
        streak = (int(cache.get(streak_key) or 0) + 1) if problem else 0
        cache.set(streak_key, streak, timeout=KEEP_SECONDS)
        latest[flag.name] = {
            "on": on.as_json(),
            "off": off.as_json(),
            "breach": problem,
            "streak": streak,
            "checkedAt": time.time(),
        }
        note = None if problem else held_back(on, limits)
        if note:
            latest[flag.name]["note"] = note
        if problem and streak >= limits["checks"]:
            samples = figures(flag.name, "on", limits["interval"] * streak).samples
            reason = f"{problem} over {streak} checks, {samples} samples"
            try:
                flag_rollback(
                    flag.name,
                    actor="safeguard",
                    source="safeguard",
                    reason=reason,
                    automatic=True,
                )
            except Exception:
                logger.exception("safeguard could not roll back %s", flag.name)
            else:
                rolled_back.append(flag.name)
                cache.set(streak_key, 0, timeout=KEEP_SECONDS)
    _latest.clear()
    _latest.update(latest)
    try:
        cache.set(f"{PREFIX}:latest", latest, timeout=KEEP_SECONDS)
    except Exception:
        pass
    return rolled_back


def healthy(flag: str) -> bool:
    """Whether the flag's last check found nothing over a threshold."""
    entry = latest_figures().get(flag)
    return entry is not None and not entry.get("breach")


def reset() -> None:
    """Forget what this process recorded and last checked (tests)."""
    _pending.take()
    _latest.clear()

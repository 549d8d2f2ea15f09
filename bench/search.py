"""Search latency over N sessions of generated terminal output; prints figures only.

    .venv/bin/python bench/search.py                      # SQLite, 10k sessions
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/termsys_dev .venv/bin/python bench/search.py
    .venv/bin/python bench/search.py --sessions 100000 --runs 50

A scratch database is built each time: on SQLite a temporary file, on PostgreSQL the URL's
database name with ``_search_bench`` appended (dropped and created). One user owns every
session (the worst case: nothing is excluded by owner). Each session gets one output chunk
of 2-8 KB (shell prompts, paths, compiler and test output) and five command events, all
written through the triggers as production writes are; the oldest 5% of the chunks end with a
word no newer one has. Timed: the search call as the API
makes it (query parse, SQL, loading hits, snippets), ``limit=20``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = (
    "build test deploy install update config server client request response cache index "
    "module package import export function class method value result status output input "
    "started finished running waiting connected listening compiled linked skipped passed"
).split()
COMMANDS = [
    "git status",
    "git push origin main",
    "make test",
    "python manage.py migrate",
    "npm run build",
    "ls -la",
    "cd src",
    "pytest -q tests",
    "docker compose up -d",
    "tail -f var/log/app.log",
]
RARE = "frobnicator"  # in RARE_COUNT sessions only
RARE_COUNT = 3
OLD = "legacyword"  # in the oldest 5% of sessions only: many matches, none of them recent
OLD_SHARE = 20


def chunk_text(rng: random.Random, index: int, sessions: int) -> str:
    lines = []
    for _ in range(rng.randint(40, 160)):
        kind = rng.random()
        if kind < 0.2:
            lines.append(f"user@host:~/proj{index % 50}$ {rng.choice(COMMANDS)}")
        elif kind < 0.35:
            lines.append(f"/srv/app/pkg{rng.randint(0, 99)}/mod{rng.randint(0, 999)}.py")
        elif kind < 0.45:
            lines.append(f"error: {' '.join(rng.choices(WORDS, k=6))} (code {rng.randint(1, 99)})")
        else:
            lines.append(" ".join(rng.choices(WORDS, k=rng.randint(4, 12))))
    if index < RARE_COUNT:
        lines.insert(rng.randint(0, len(lines)), f"warning: {RARE} deprecated in /opt/x.py")
    if index < sessions // OLD_SHARE:
        lines.append(OLD)
    return "\n".join(lines) + "\n"


def setup_database(reuse: str | None) -> str:
    """Point DATABASE_URL at a scratch database (fresh unless ``reuse``); return a label."""
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql://")):
        import psycopg

        parts = urlsplit(url)
        name = parts.path.lstrip("/") + "_search_bench"
        admin = urlunsplit(parts._replace(path="/postgres"))
        if not reuse:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
                conn.execute(f'CREATE DATABASE "{name}"')
        os.environ["DATABASE_URL"] = urlunsplit(parts._replace(path="/" + name))
        return f"PostgreSQL ({name})"
    if reuse:
        path = Path(reuse)
    else:
        path = Path(tempfile.mkdtemp(prefix="termsys-search-bench-")) / "bench.sqlite3"
    os.environ["DATABASE_URL"] = f"sqlite:///{path}"
    return f"SQLite ({path})"


def populate(sessions: int, seed: int) -> tuple[object, float]:
    from django.contrib.auth import get_user_model

    from sessions_app.models import OutputChunk, Project, SessionEvent, TerminalSession

    rng = random.Random(seed)
    user = get_user_model().objects.create(username="bench")
    projects = [Project.objects.create(owner=user, name=f"proj{i}", path="/tmp") for i in range(50)]
    started = time.perf_counter()
    batch = 1000
    for first in range(0, sessions, batch):
        rows = [
            TerminalSession(
                id=f"session_{1700000000000 + i:013d}_{i:08d}"[:40],
                user=user,
                project=projects[i % len(projects)],
                tab_name=f"tab{i}",
                state=rng.choice(["active", "detached", "exited", "killed"]),
                profile=rng.choice(["system", "claude"]),
            )
            for i in range(first, min(first + batch, sessions))
        ]
        TerminalSession.objects.bulk_create(rows)
        chunks, events = [], []
        for i, row in enumerate(rows, start=first):
            text = chunk_text(rng, i, sessions)
            chunks.append(OutputChunk(session=row, seq=1, offset=0, data=text.encode(), text=text))
            events += [
                SessionEvent(
                    session=row,
                    kind="command",
                    data={"command": rng.choice(COMMANDS), "cwd": "/srv", "exitCode": 0},
                )
                for _ in range(5)
            ]
        OutputChunk.objects.bulk_create(chunks)
        SessionEvent.objects.bulk_create(events)
    return user, time.perf_counter() - started


def measure(user: object, text: str, order: str, runs: int) -> tuple[float, float, int]:
    from sessions_app.search.engine import sessions_search

    times, count = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        page = sessions_search(user=user, text=text, order=order, limit=20, check_flag=False)
        times.append((time.perf_counter() - start) * 1000)
        count = len(page.hits)
    times.sort()
    p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
    return statistics.median(times), p95, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--reuse",
        metavar="SQLITE_PATH_OR_YES",
        help="measure the database a previous run left (PostgreSQL: any value; SQLite: its "
        "file) after migrating it, instead of building a new one",
    )
    parser.add_argument(
        "--only",
        metavar="TEXT",
        help="measure only the cases whose name and order contain TEXT (e.g. newest)",
    )
    args = parser.parse_args()

    label = setup_database(args.reuse)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "termsys.settings")
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    started = time.perf_counter()
    call_command("migrate", verbosity=0)
    if args.reuse:
        from django.contrib.auth import get_user_model

        from sessions_app.models import SearchDocument

        user = get_user_model().objects.get(username="bench")
        docs = SearchDocument.objects.count()
        print(
            f"{label}: reused, {docs} documents, migrated in {time.perf_counter() - started:.1f} s"
        )
    else:
        user, took = populate(args.sessions, args.seed)
        docs = args.sessions * 7  # a chunk, five commands and the session's names each
        print(f"{label}: {args.sessions} sessions, {docs} documents indexed in {took:.1f} s")
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
    print(f"load average before: {' '.join(f'{n:.2f}' for n in os.getloadavg())}")
    print(f"{'query':44} {'order':7} {'p50 ms':>8} {'p95 ms':>8} {'hits':>5}")
    cases = [
        (f"{RARE} (rare word)", RARE, "newest"),
        ("error (common word)", "error", "newest"),
        (f"{OLD} (common, only in old sessions)", OLD, "newest"),
        ("error (common word)", "error", "rank"),
        ("mod12.py (path part)", "mod12.py", "newest"),
        ('"git push" (phrase, commands)', '"git push"', "newest"),
        ("error project:proj7 status:exited", "error project:proj7 status:exited", "newest"),
        ("mod12.py project:proj7 (path part, filter)", "mod12.py project:proj7", "newest"),
        ("build -deploy (NOT)", "build -deploy", "newest"),
    ]
    for name, text, order in cases:
        if args.only and args.only not in f"{name} {order}":
            continue
        p50, p95, hits = measure(user, text, order, args.runs)
        print(f"{name:44} {order:7} {p50:8.1f} {p95:8.1f} {hits:5d}")
    print(f"load average after: {' '.join(f'{n:.2f}' for n in os.getloadavg())}")


if __name__ == "__main__":
    main()

"""Backup create and restore at 1k and 10k sessions with scrollback. Prints figures; asserts
nothing.

Runs in a scratch database of its own (a SQLite file in a temporary directory, or with
DATABASE_URL set a PostgreSQL database ``termsys_bench_backup_<pid>`` it creates and drops),
fills it with SESSIONS sessions of one user, each with two events and SCROLLBACK KiB of
terminal-like output stored as the DATABASE storage stores it (in chunks that grow to 16 KiB,
``CHUNK_MIN_BYTES``: one chunk a session at the default 16 KiB; ``--chunk`` for others), with
the chunks' search text as the storage derives it (escape sequences removed), then times:

- ``create``: ``backup create`` (portable form, native copy and, on PostgreSQL, the stored
  search documents, into a temporary directory);
- ``verify``: reading every member and checking its sha256;
- ``restore``: ``backup restore`` of that archive, which includes verifying it again, the
  safety backup of the (same-sized) current data, and the load in one transaction;
- ``undo``: ``backup restore`` of the safety backup that restore wrote (putting back what the
  restore replaced: on SQLite the database file, on PostgreSQL binary copies with the search
  documents), itself with a safety backup.

Each is followed by where its time went, stage by stage (``Phases``: each stage or note of the
operation lasts until the next). On SQLite a restore's safety backup is the database file
(``native copy (sqlite-file)`` and ``writing`` in its line); on PostgreSQL it runs in a thread
beside the search documents' load and index builds: on a connection of their own into a table
swapped in at the end (``search index beside``; ``waiting for the search index beside,
swapping it in`` after the rows' ``load``) or, where the table cannot be swapped, in the
restore's transaction (``search index``), after which ``waiting for the safety backup`` is
what the restore still waited for it.

Run: .venv/bin/python bench/backup.py [--sizes 1000,10000] [--scrollback 16] [--chunk 16]
     DATABASE_URL=postgres://postgres@127.0.0.1:5432/termsys_dev .venv/bin/python bench/backup.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH = 2000


def terminal_output(n: int, size: int) -> bytes:
    """Return ``size`` bytes shaped like a shell's output: prompts, colours, paths, numbers."""
    lines = []
    total, i = 0, 0
    while total < size:
        line = (
            f"\x1b[32muser@host\x1b[0m:\x1b[34m~/proj/app{n % 97}\x1b[0m$ ls -la src/mod{i}.py\r\n"
            f"-rw-r--r-- 1 user user {1000 + (n * 7919 + i * 104729) % 90000:>6} Nov 21 "
            f"17:{i % 60:02d} src/mod{i}.py\r\n"
        ).encode()
        lines.append(line)
        total += len(line)
        i += 1
    return b"".join(lines)[:size]


def fill(sessions: int, scrollback: int, chunk: int) -> None:
    from django.contrib.auth import get_user_model
    from django.db import transaction

    from sessions_app.models import OutputChunk, Project, SessionEvent, TerminalSession
    from sessions_app.storage.base import plain_text

    user = get_user_model().objects.create(username="bench")
    project = Project.objects.create(owner=user, name="bench", path="/tmp")
    with transaction.atomic():
        for start in range(0, sessions, BATCH):
            batch = [
                TerminalSession(
                    id=f"session_{1700000000000 + n:013d}_bench{n % 1000:03d}",
                    project=project,
                    user=user,
                    tab_name=f"tab {n}",
                    state="exited",
                    output_bytes=scrollback,
                )
                for n in range(start, min(start + BATCH, sessions))
            ]
            TerminalSession.objects.bulk_create(batch)
            events, chunks = [], []
            for s in batch:
                events += [
                    SessionEvent(session=s, kind="created", data={}),
                    SessionEvent(session=s, kind="exited", data={"code": 0}),
                ]
                output = terminal_output(int(s.tab_name.split()[1]), scrollback)
                for seq, offset in enumerate(range(0, len(output), chunk)):
                    data = output[offset : offset + chunk]
                    chunks.append(
                        OutputChunk(
                            session=s, seq=seq, offset=offset, data=data, text=plain_text(data)
                        )
                    )
            SessionEvent.objects.bulk_create(events)
            OutputChunk.objects.bulk_create(chunks)


def empty() -> None:
    from django.db import connection, transaction

    from sessions_app.backup import portable

    with transaction.atomic():
        for model in [*portable.derived_models(), *reversed(portable.backup_models())]:
            portable.delete_rows(model)
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("VACUUM")


class Phases:
    """A reporter that times each stage and note of a backup operation (until the next)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float]] = []
        self.name, self.started = "", time.perf_counter()

    def _next(self, name: str) -> None:
        now = time.perf_counter()
        if self.name:
            self.spans.append((self.name, now - self.started))
        self.name, self.started = name, now

    def stage(self, name: str, total: int) -> None:
        self._next(name)

    def advance(self, units: int) -> None:
        pass

    def note(self, text: str) -> None:
        self._next(text.split(" /", maxsplit=1)[0][:40])

    def done(self) -> str:
        self._next("")
        return ", ".join(f"{name} {seconds:.2f}" for name, seconds in self.spans)


def run(sessions: int, scrollback: int, chunk: int, work: Path) -> None:
    from sessions_app.backup import services

    empty()
    started = time.perf_counter()
    fill(sessions, scrollback * 1024, chunk)
    filled = time.perf_counter() - started

    out = work / f"out-{sessions}"
    started = time.perf_counter()
    phases = Phases()
    created = services.backup_create(output_dir=out, label=f"bench {sessions}", reporter=phases)
    create_s = time.perf_counter() - started
    create_phases = phases.done()
    size = created.path.stat().st_size
    rows = sum(m["rows"] for m in created.manifest["models"])

    started = time.perf_counter()
    services.backup_verify(created.path)
    verify_s = time.perf_counter() - started

    safety_dir = work / f"safety-{sessions}"
    started = time.perf_counter()
    phases = Phases()
    services.backup_restore(created.path, safety_dir=safety_dir, reporter=phases)
    restore_s = time.perf_counter() - started
    restore_phases = phases.done()

    (safety,) = safety_dir.glob("*.tar")
    started = time.perf_counter()
    phases = Phases()
    services.backup_restore(safety, safety_dir=work / f"undo-{sessions}", reporter=phases)
    undo_s = time.perf_counter() - started
    undo_phases = phases.done()

    print(
        f"{sessions:>6} sessions x {scrollback} KiB  rows {rows:>7}  archive "
        f"{size / 1024**2:7.1f} MiB  fill {filled:6.2f} s  create {create_s:6.2f} s  "
        f"verify {verify_s:5.2f} s  restore {restore_s:6.2f} s  undo {undo_s:6.2f} s "
        f"(safety backup {safety.stat().st_size / 1024**2:.1f} MiB)",
        flush=True,
    )
    print(f"    create phases (s): {create_phases}", flush=True)
    print(f"    restore phases (s): {restore_phases}", flush=True)
    print(f"    undo phases (s): {undo_phases}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="session counts, comma-separated")
    parser.add_argument("--scrollback", type=int, default=16, help="KiB of output per session")
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="KiB per output chunk (default: the DATABASE storage's, 16; before 2026-12-07: 4)",
    )
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]

    sys.path.insert(0, str(ROOT))
    work = Path(tempfile.mkdtemp(prefix="termsys-bench-backup-"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "termsys.settings")
    os.environ.setdefault("TERMSYS_VAR_DIR", str(work / "var"))
    url = os.environ.get("DATABASE_URL", "")
    os.environ["TERMSYS_TEST_DB_NAME"] = (
        f"termsys_bench_backup_{os.getpid()}"
        if url.startswith("postgres")
        else str(work / "bench.sqlite3")
    )
    import django

    django.setup()
    from django.db import connection
    from django.test.utils import setup_databases, teardown_databases

    from sessions_app.storage.database import CHUNK_MIN_BYTES

    chunk = args.chunk * 1024 if args.chunk else CHUNK_MIN_BYTES

    old = setup_databases(verbosity=0, interactive=False)
    try:
        print(
            f"database: {connection.vendor} ({connection.settings_dict['NAME']}); output chunks "
            f"of {chunk // 1024} KiB; work {work}"
        )
        for sessions in sizes:
            run(sessions, args.scrollback, chunk, work)
    finally:
        connection.close()
        teardown_databases(old, verbosity=0)
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

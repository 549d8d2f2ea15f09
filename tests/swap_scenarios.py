"""Restores that swap the SQLite database file, run by ``test_backup`` in a process of their own.

The swap needs that no process has the database file open, the one restoring included; the test
process's threads (the servers of earlier tests) keep theirs open, so there it copies pages.
Here the embedded default runs on a database file of its own in DIR (``TERMSYS_VAR_DIR``).

Usage: python tests/swap_scenarios.py swap|wal DIR   (prints one JSON object)
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Opens the database (waiting while a restore holds its lease), then reads it.
OPENER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
print(db.execute("SELECT group_concat(name) FROM sessions_app_project").fetchone()[0])
"""

# Writes, then dies before any checkpoint: its frames stay in the write-ahead log only.
KILLED_WRITER = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA wal_autocheckpoint = 0")
db.execute("UPDATE sessions_app_project SET name = 'killed' WHERE name = 'api'")
os._exit(0)
"""


def read(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", OPENER, name], capture_output=True, text=True, check=False
    )


def names() -> list[str]:
    from sessions_app.models import Project

    return list(Project.objects.order_by("id").values_list("name", flat=True))


def seed() -> str:
    """Two projects, and the database file's name."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection

    from sessions_app.models import Project

    call_command("migrate", verbosity=0)
    owner = get_user_model().objects.create(username="ana")
    for name in ("api", "web"):
        Project.objects.create(owner=owner, name=name, path=f"/srv/{name}")
    return str(connection.settings_dict["NAME"])


def swap(work: Path) -> dict[str, Any]:
    """Back up, change the data, restore while another process opens the database."""
    from django.core.management import call_command

    from sessions_app.backup import interrupts
    from sessions_app.models import Project

    name = seed()
    before = names()
    call_command("backup", "create", "--output", str(work / "archives"), stdout=io.StringIO())
    (archive,) = (work / "archives").glob("*.tar")
    Project.objects.filter(name="api").update(name="changed")
    changed = names()
    inode = Path(name).stat().st_ino
    openers: list[subprocess.Popen[str]] = []
    point_of_no_return = interrupts.point_of_no_return

    def commit() -> None:  # just before the rename, under the lease: an open waits for it
        opener = subprocess.Popen(
            [sys.executable, "-c", OPENER, name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        openers.append(opener)
        deadline = time.monotonic() + 20
        while "break_lease" not in Path(f"/proc/{opener.pid}/wchan").read_text():
            if opener.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the open did not wait for the lease")
            time.sleep(0.01)
        point_of_no_return()

    interrupts.point_of_no_return = commit
    out = io.StringIO()
    call_command("backup", "restore", str(archive), "--yes", stdout=out, no_color=True)
    waited = {}
    for opener in openers:
        stdout, stderr = opener.communicate(timeout=30)
        waited = {"returncode": opener.returncode, "stdout": stdout, "stderr": stderr}
    wal = Path(f"{name}-wal")
    return {
        "before": before,
        "changed": changed,
        "printed": out.getvalue(),
        "waited": waited,
        "after": names(),
        "replaced": Path(name).stat().st_ino != inode,
        "wal_bytes": wal.stat().st_size if wal.exists() else 0,
        "opened_after": read(name).stdout.strip(),
    }


def wal(work: Path) -> dict[str, Any]:
    """A killed writer's frames in the log; then the swap of another file is asked for."""
    from django.db import connection

    from sessions_app.backup import sqlite_native

    name = seed()
    connection.close()  # the last connection: its close empties and removes the log
    subprocess.run([sys.executable, "-c", KILLED_WRITER, name], check=True)
    wal_bytes = Path(f"{name}-wal").stat().st_size
    other = work / "other.sqlite3"
    with __import__("sqlite3").connect(other) as db:
        db.execute("CREATE TABLE sessions_app_project (name TEXT)")
    inode = Path(name).stat().st_ino
    why = sqlite_native.swap_in(other)
    return {
        "wal_bytes": wal_bytes,
        "why": why,
        "kept": Path(name).stat().st_ino == inode and other.exists(),
        "after": names(),
    }


def main() -> None:
    scenario, work = sys.argv[1], Path(sys.argv[2])
    for key in ("DATABASE_URL", "REDIS_URL", "TERMSYS_TEST_DB_NAME", "TERMSYS_BACKUP_DIR"):
        os.environ.pop(key, None)
    os.environ["TERMSYS_VAR_DIR"] = str(work / "var")
    os.environ["DJANGO_SETTINGS_MODULE"] = "termsys.settings"
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    result = {"swap": swap, "wal": wal}[scenario](work)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

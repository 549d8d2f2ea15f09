"""Migration state of a database and of this code, and how an archive's state relates to it."""

from __future__ import annotations

from dataclasses import dataclass

from django.db import connection
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.operations import RunPython, RunSQL

NEWER = (
    "{file}: made by newer code: it has migrations this termsys does not know: {names}. "
    "Upgrade termsys to a version that has them, then restore. Nothing changed."
)
UNMIGRATED = (
    "This database lacks migrations this code has: {names}. Run manage.py migrate first, then "
    "restore. Nothing changed."
)


class MigrationMismatch(Exception):
    pass


def applied() -> dict[str, list[str]]:
    """Return the migrations applied to the database, per app, in name order."""
    loader = MigrationLoader(connection, ignore_no_migrations=True)
    state: dict[str, list[str]] = {}
    for app, name in sorted(loader.applied_migrations):
        state.setdefault(app, []).append(name)
    return state


@dataclass
class Comparison:
    missing: list[str]  # migrations of this code the archive's database had not applied
    data_migrations: list[str]  # of those, the ones that change data (not re-run by a restore)


def compare(archived: dict[str, list[str]], file: object) -> Comparison:
    """Compare an archive's migration state with this code and this database.

    Raise MigrationMismatch when the archive has a migration this code does not know, or when
    this database is not migrated to this code.
    """
    loader = MigrationLoader(connection, ignore_no_migrations=True)
    known = set(loader.disk_migrations)
    for migration in loader.disk_migrations.values():
        known.update(migration.replaces or [])
    archive = {(app, name) for app, names in archived.items() for name in names}
    unknown = sorted(archive - known)
    if unknown:
        names = ", ".join(f"{app}.{name}" for app, name in unknown)
        raise MigrationMismatch(NEWER.format(file=file, names=names))
    code = set(loader.graph.nodes)
    unapplied = sorted(code - set(loader.applied_migrations))
    if unapplied:
        names = ", ".join(f"{app}.{name}" for app, name in unapplied)
        raise MigrationMismatch(UNMIGRATED.format(names=names))
    missing = sorted(code - archive)
    data = [
        key
        for key in missing
        if any(isinstance(op, RunPython | RunSQL) for op in loader.graph.nodes[key].operations)
    ]
    return Comparison(
        missing=[f"{app}.{name}" for app, name in missing],
        data_migrations=[f"{app}.{name}" for app, name in data],
    )

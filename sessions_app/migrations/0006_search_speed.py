"""Search on SQLite: a covering index joining a full-text match to its session.

A match is a rowid of the FTS5 table; its document's ``session_id`` (to check the owner and the
filters) and ``at`` (``since:``) are stored after the body, which for output overflows into
other pages, so reading them walked each match's overflow chain. A filtered search reads
hundreds to thousands of matches for a page (35 ms at 100k sessions); through this index, which
holds the two columns by document id, it reads none of the bodies.

PostgreSQL needs nothing here: its documents carry the owner and the filters themselves
(migration 0005_search_filters).
"""

from django.db import migrations

SQLITE_FORWARD = [
    "CREATE INDEX searchdoc_id_session ON sessions_app_searchdocument (id, session_id, at)",
]
SQLITE_BACKWARD = [
    "DROP INDEX IF EXISTS searchdoc_id_session",
]


def _run(schema_editor, statements: list[str]) -> None:
    for statement in statements:
        schema_editor.execute(statement)


def forwards(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "sqlite":
        _run(schema_editor, SQLITE_FORWARD)


def backwards(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "sqlite":
        _run(schema_editor, SQLITE_BACKWARD)


class Migration(migrations.Migration):
    dependencies = [
        ("sessions_app", "0005_search_filters"),
    ]

    operations = [
        migrations.RunPython(forwards, backwards),
    ]

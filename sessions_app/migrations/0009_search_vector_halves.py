"""Search on PostgreSQL: the documents' GIN index becomes two, each over half the documents.

PostgreSQL before 18 builds a GIN index in one server process, and for the search documents
that build is most of what a restore waits for at its end (10k sessions: 2.3-3.5 s of one core
while the other idles). Two partial indexes, one over the documents whose id hashes even, one
over those whose id hashes odd, hold the same entries between them and build side by side from
two connections, each in about half the time (sessions_app/backup/swap.py). The hash, not the
id's own parity: documents are often written in a pattern (a session's, then its output's), and
by parity all output could fall in one half. A search names both halves: the match is written
``((hashint8(d.id) & 1) = 0 AND d.vector @@ q) OR ((hashint8(d.id) & 1) = 1 AND d.vector @@ q)``,
which the planner answers with a bitmap OR of the two (sessions_app/search/compile.py). The
statistics object on the halves' expression tells the planner that each condition holds for half
the documents: without it, it takes one in 200 and estimates a common word's matches a hundred
times too few (a ranked common word at 100k sessions then took 170 against 135 ms, its matches
read by one process instead of three).

The SQL below is a frozen copy; the live form is PG_VECTOR_HALF in sessions_app/search/compile.py.
Building the two takes about as long as the one index took. SQLite is unchanged.
"""

from django.db import migrations

DOC = "sessions_app_searchdocument"
HALVES = 2  # by the id's hash's lowest bit

PG_FORWARD = [
    *(
        f"CREATE INDEX searchdoc_vector_{n} ON {DOC} USING GIN (vector) "
        f"WITH (gin_pending_list_limit = 512) WHERE (hashint8(id) & 1) = {n}"
        for n in range(HALVES)
    ),
    "DROP INDEX searchdoc_vector",
    f"CREATE STATISTICS searchdoc_vector_half ON (hashint8(id) & 1) FROM {DOC}",
    f"ANALYZE {DOC}",
]

PG_BACKWARD = [
    "DROP STATISTICS IF EXISTS searchdoc_vector_half",
    f"CREATE INDEX searchdoc_vector ON {DOC} USING GIN (vector) WITH (gin_pending_list_limit = 512)",
    *(f"DROP INDEX searchdoc_vector_{n}" for n in range(HALVES)),
]


def _run(schema_editor, statements: list[str]) -> None:
    for statement in statements:
        schema_editor.execute(statement)


def forwards(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        _run(schema_editor, PG_FORWARD)


def backwards(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        _run(schema_editor, PG_BACKWARD)


class Migration(migrations.Migration):
    dependencies = [
        ("sessions_app", "0008_session_tab_named"),
    ]

    operations = [
        migrations.RunPython(forwards, backwards),
    ]

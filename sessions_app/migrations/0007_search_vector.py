"""Search on PostgreSQL: the documents' ``vector`` becomes a plain column kept by a trigger.

As a stored generated column (0004_search) it was computed by the server on every write of a
document, with no way to write it otherwise, so a restore tokenised all the stored text again:
``to_tsvector`` over the output of 10k sessions takes 15-33 s on these machines. As a plain
column a BEFORE trigger computes the same expression on insert and on a change of the body, and
a restore loads the vectors a backup stored (sessions_app/backup). The existing vectors stay as
they are (``DROP EXPRESSION`` rewrites nothing); searches are unchanged.

The SQL below is a frozen copy; the live one is in sessions_app/search/index.py.

SQLite is unchanged: its FTS5 table is not a generated column.
"""

from django.db import migrations

DOC = "sessions_app_searchdocument"
PG_SPLIT_FROM = "/._-@:=+,;~"
PG_VECTOR = (
    f"to_tsvector('simple'::regconfig, translate({{body}}, '{PG_SPLIT_FROM}', "
    f"'{' ' * len(PG_SPLIT_FROM)}'))"
)

PG_FORWARD = [
    f"ALTER TABLE {DOC} ALTER COLUMN vector DROP EXPRESSION",
    f"""
    CREATE FUNCTION termsys_search_document_vector() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.vector := {PG_VECTOR.format(body="NEW.body")};
        RETURN NEW;
    END $$
    """,
    # named "searchdoc_" like the other search triggers, which a restore finds by that prefix
    f"""
    CREATE TRIGGER searchdoc_document_vector BEFORE INSERT OR UPDATE OF body ON {DOC}
    FOR EACH ROW EXECUTE FUNCTION termsys_search_document_vector()
    """,
]

# Back to a generated column: PostgreSQL 15 cannot turn a plain column into one, so it is added
# again (every vector recomputed) with its storage and index as 0005_search_filters left them.
PG_BACKWARD = [
    f"DROP TRIGGER IF EXISTS searchdoc_document_vector ON {DOC}",
    "DROP FUNCTION IF EXISTS termsys_search_document_vector()",
    f"ALTER TABLE {DOC} DROP COLUMN vector",  # drops searchdoc_vector too
    f"ALTER TABLE {DOC} ADD COLUMN vector tsvector GENERATED ALWAYS AS "
    f"({PG_VECTOR.format(body='body')}) STORED",
    f"ALTER TABLE {DOC} ALTER COLUMN vector SET STORAGE MAIN",
    f"CREATE INDEX searchdoc_vector ON {DOC} USING GIN (vector) WITH (gin_pending_list_limit = 512)",
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
        ("sessions_app", "0006_search_speed"),
    ]

    operations = [
        migrations.RunPython(forwards, backwards),
    ]

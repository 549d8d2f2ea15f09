"""Search on PostgreSQL: copy each session's owner, project, status and profile onto its search
documents, so a search is answered from the document table alone.

A search's owner and filters used to join every match to its session: for a word with few
matches the planner's estimate of them is too high, and it hash-joined them to the whole session
table (most of a rare word's 35 ms at 100k sessions). With the columns here, newest first walks
``(user_id, id)`` or ``(project_id, id)`` backwards, or sorts the GIN index's few matches,
without touching sessions.

``status`` is the ``status:`` filter's value, not the session's state: ``active`` for every live
state, so attaching and detaching (active <-> detached) never rewrite the documents; only an end
(exited, killed, error) or a revive does. Triggers keep the copies right: a document takes its
session's values when inserted (also by a bulk load or ``search_index_rebuild``), and a session
changing owner, project, state or profile updates its documents.

SQLite is left as it was: its FTS5 table answers newest first by walking its own index, and the
columns, appended after the (often overflowing) body, would cost more to read there than the
join to sessions does.
"""

from django.db import migrations

DOC = "sessions_app_searchdocument"
SESSION = "sessions_app_terminalsession"
# Must match LIVE_STATES (sessions_app/states.py) and STATUSES (sessions_app/search/query.py).
PG_STATUS = (
    "CASE WHEN {s}.state IN ('creating', 'active', 'detached') THEN 'active' ELSE {s}.state END"
)
PG_COPIED = "user_id, project_id, status, profile"

PG_FORWARD = [
    f"""
    ALTER TABLE {DOC}
        ADD COLUMN user_id bigint,
        ADD COLUMN project_id bigint,
        ADD COLUMN status varchar(16),
        ADD COLUMN profile varchar(32)
    """,
    f"""
    CREATE FUNCTION termsys_search_document_session() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        SELECT s.user_id, s.project_id, {PG_STATUS.format(s="s")}, s.profile
        INTO NEW.user_id, NEW.project_id, NEW.status, NEW.profile
        FROM {SESSION} s WHERE s.id = NEW.session_id;
        RETURN NEW;
    END $$
    """,
    # named "searchdoc_" like the other search triggers, which a restore finds by that prefix
    f"""
    CREATE TRIGGER searchdoc_document_session BEFORE INSERT OR UPDATE OF session_id ON {DOC}
    FOR EACH ROW EXECUTE FUNCTION termsys_search_document_session()
    """,
    f"""
    CREATE FUNCTION termsys_search_session_filters() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        status_ varchar(16) := {PG_STATUS.format(s="NEW")};
    BEGIN
        UPDATE {DOC}
        SET user_id = NEW.user_id, project_id = NEW.project_id, status = status_,
            profile = NEW.profile
        WHERE session_id = NEW.id
            AND ({PG_COPIED}) IS DISTINCT FROM (NEW.user_id, NEW.project_id, status_, NEW.profile);
        RETURN NULL;
    END $$
    """,
    f"""
    CREATE TRIGGER searchdoc_session_filters AFTER UPDATE OF user_id, project_id, state, profile
    ON {SESSION} FOR EACH ROW
    WHEN (OLD.user_id IS DISTINCT FROM NEW.user_id OR OLD.project_id IS DISTINCT FROM NEW.project_id
          OR OLD.state IS DISTINCT FROM NEW.state OR OLD.profile IS DISTINCT FROM NEW.profile)
    EXECUTE FUNCTION termsys_search_session_filters()
    """,
    # Vectors inline in the row (tsvectors barely compress, so they were stored out of line,
    # uncompressed, in the TOAST table): ranking reads every match's vector, and a fetch from
    # the TOAST table cost more than the ranking itself (ranked at 10k sessions: ~1.6x faster).
    # The output's body, which only snippets read, stays out of line.
    f"ALTER TABLE {DOC} ALTER COLUMN vector SET STORAGE MAIN",
    # Backfill without the GIN index: updating 700k rows under it would re-insert every
    # document's words one by one; building it again afterwards is several times faster. The
    # update also writes each vector again (PostgreSQL recomputes a stored generated column on
    # every update of its row), so existing ones move inline too.
    "DROP INDEX searchdoc_vector",
    f"""
    UPDATE {DOC} d
    SET user_id = s.user_id, project_id = s.project_id, status = {PG_STATUS.format(s="s")},
        profile = s.profile
    FROM {SESSION} s WHERE s.id = d.session_id
    """,
    f"ALTER TABLE {DOC} ALTER COLUMN user_id SET NOT NULL, ALTER COLUMN project_id SET NOT NULL,"
    " ALTER COLUMN status SET NOT NULL, ALTER COLUMN profile SET NOT NULL",
    # A query scans the GIN index's whole pending list (recent insertions not yet merged),
    # by default up to 4 MB: a few ms on every search until (auto)vacuum merges it.
    f"CREATE INDEX searchdoc_vector ON {DOC} USING GIN (vector) WITH (gin_pending_list_limit = 512)",
    f"CREATE INDEX searchdoc_user_id ON {DOC} (user_id, id)",
    f"CREATE INDEX searchdoc_project_id ON {DOC} (project_id, id)",
]

PG_BACKWARD = [
    f"DROP TRIGGER IF EXISTS searchdoc_session_filters ON {SESSION}",
    f"DROP TRIGGER IF EXISTS searchdoc_document_session ON {DOC}",
    "DROP FUNCTION IF EXISTS termsys_search_session_filters()",
    "DROP FUNCTION IF EXISTS termsys_search_document_session()",
    f"ALTER TABLE {DOC} DROP COLUMN user_id, DROP COLUMN project_id, DROP COLUMN status,"
    " DROP COLUMN profile",  # drops their indexes too
    f"ALTER TABLE {DOC} ALTER COLUMN vector SET STORAGE EXTENDED",  # tsvector's default
    "ALTER INDEX searchdoc_vector RESET (gin_pending_list_limit)",
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
        ("sessions_app", "0004_search"),
    ]

    operations = [
        migrations.RunPython(forwards, backwards),
    ]

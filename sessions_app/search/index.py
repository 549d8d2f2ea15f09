"""Rebuild the search index from the stored output, commands and sessions, in time order.

Triggers keep the index as rows are written; a bulk load (a portable backup's restore) writes
chunks, events and sessions table by table, so their documents get ids in table order, and
"newest first" (document order) would follow the tables rather than time. This writes every
document again, oldest first, as migration 0004_search does for what was stored before it.
On PostgreSQL each document takes its session's owner, project, status and profile from a
trigger as it is written (migration 0005_search_filters), so the rebuild need not name them.
"""

from __future__ import annotations

from django.db import connection, transaction

from sessions_app.search.compile import PG_SPLIT_FROM

DOC = "sessions_app_searchdocument"
PG_PART_CHARS = 32768  # as in migration 0004_search's trigger

# A document's words on PostgreSQL (migration 0007_search_vector): a plain column that this
# trigger keeps, where it was a generated column before. A generated column is computed by the
# server whenever a row is written, so a restore had to tokenise all the text again (33 s at
# 10k sessions); a plain one can be loaded as a backup stored it.
PG_VECTOR = (
    "to_tsvector('simple'::regconfig, "
    f"translate({{body}}, '{PG_SPLIT_FROM}', '{' ' * len(PG_SPLIT_FROM)}'))"
)
PG_VECTOR_FUNCTION = f"""
CREATE OR REPLACE FUNCTION termsys_search_document_vector() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.vector := {PG_VECTOR.format(body="NEW.body")};
    RETURN NEW;
END $$
"""
# named "searchdoc_" like the other search triggers, which a restore finds by that prefix
PG_VECTOR_TRIGGER = f"""
CREATE TRIGGER searchdoc_document_vector BEFORE INSERT OR UPDATE OF body ON {DOC}
FOR EACH ROW EXECUTE FUNCTION termsys_search_document_vector()
"""

_PG = f"""
INSERT INTO {DOC} (session_id, source, source_id, part, at, body)
SELECT * FROM (
    SELECT c.session_id, 'output', c.id, g.i, c.at,
           substr(c.text, g.i * {PG_PART_CHARS} + 1, {PG_PART_CHARS})
    FROM sessions_app_outputchunk c,
         generate_series(0, greatest(0, (length(c.text) - 1) / {PG_PART_CHARS})) AS g(i)
    UNION ALL
    SELECT session_id, 'command', id, 0, at, data->>'command' FROM sessions_app_sessionevent
    WHERE kind = 'command' AND coalesce(data->>'command', '') <> ''
    UNION ALL
    SELECT s.id, 'session', NULL, 0, s.created_at, concat_ws(' ', s.title, s.tab_name, p.name)
    FROM sessions_app_terminalsession s JOIN sessions_app_project p ON p.id = s.project_id
) AS stored (session_id, source, source_id, part, at, body)
ORDER BY at, source_id, part
"""

_SQLITE = f"""
INSERT INTO {DOC} (session_id, source, source_id, part, at, body)
SELECT * FROM (
    SELECT session_id, 'output', id, 0, at, text FROM sessions_app_outputchunk
    UNION ALL
    SELECT session_id, 'command', id, 0, at, json_extract(data, '$.command')
    FROM sessions_app_sessionevent
    WHERE kind = 'command' AND coalesce(json_extract(data, '$.command'), '') <> ''
    UNION ALL
    SELECT s.id, 'session', NULL, 0, s.created_at,
           trim(s.title || ' ' || s.tab_name || ' ' || p.name)
    FROM sessions_app_terminalsession s JOIN sessions_app_project p ON p.id = s.project_id
) ORDER BY 5, 3
"""


@transaction.atomic
def search_index_rebuild() -> int:
    """Write every search document again, oldest first; return how many there are."""
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {DOC}")
        cursor.execute(_PG if connection.vendor == "postgresql" else _SQLITE)
        cursor.execute(f"SELECT count(*) FROM {DOC}")
        return cursor.fetchone()[0]

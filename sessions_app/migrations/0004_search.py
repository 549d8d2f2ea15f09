"""Full-text search: a document table kept by triggers; a GIN-indexed tsvector on PostgreSQL,
an external-content FTS5 table on SQLite."""

import django.db.models.deletion
from django.db import migrations, models

# Path separators and punctuation become spaces before PostgreSQL's parser sees the text, so
# `/srv/app/mod12.py` is indexed as srv, app, mod12, py; queries are normalised the same way
# (sessions_app/search/compile.py), and SQLite's unicode61 tokenizer already splits there.
PG_SPLIT_FROM = "/._-@:=+,;~"
PG_PART_CHARS = 32768  # tsvector positions stop at 16383: parts keep phrase positions exact

DOC = "sessions_app_searchdocument"

PG_FORWARD = [
    f"""
    ALTER TABLE {DOC} ADD COLUMN vector tsvector GENERATED ALWAYS AS (
        to_tsvector('simple'::regconfig, translate(body, '{PG_SPLIT_FROM}',
                                                   '{" " * len(PG_SPLIT_FROM)}'))
    ) STORED
    """,
    f"CREATE INDEX searchdoc_vector ON {DOC} USING GIN (vector)",
    f"""
    CREATE FUNCTION termsys_search_chunk() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        parts integer;
        piece text;
    BEGIN
        IF TG_OP = 'DELETE' THEN
            DELETE FROM {DOC} WHERE source = 'output' AND source_id = OLD.id;
            RETURN NULL;
        END IF;
        parts := greatest(1, ceil(length(NEW.text)::numeric / {PG_PART_CHARS})::integer);
        FOR i IN 0 .. parts - 1 LOOP
            piece := substr(NEW.text, i * {PG_PART_CHARS} + 1, {PG_PART_CHARS});
            -- a grown chunk (keystroke echoes merged in) re-indexes only its changed tail
            CONTINUE WHEN TG_OP = 'UPDATE'
                AND piece = substr(OLD.text, i * {PG_PART_CHARS} + 1, {PG_PART_CHARS});
            INSERT INTO {DOC} (session_id, source, source_id, part, at, body)
            VALUES (NEW.session_id, 'output', NEW.id, i, NEW.at, piece)
            ON CONFLICT (source, source_id, part) DO UPDATE SET body = EXCLUDED.body;
        END LOOP;
        IF TG_OP = 'UPDATE' THEN
            DELETE FROM {DOC} WHERE source = 'output' AND source_id = NEW.id AND part >= parts;
        END IF;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER searchdoc_chunk AFTER INSERT OR UPDATE OF text OR DELETE
    ON sessions_app_outputchunk FOR EACH ROW EXECUTE FUNCTION termsys_search_chunk()
    """,
    f"""
    CREATE FUNCTION termsys_search_event() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'INSERT' THEN
            DELETE FROM {DOC} WHERE source = 'command' AND source_id = OLD.id;
        END IF;
        IF TG_OP <> 'DELETE' AND NEW.kind = 'command'
                AND coalesce(NEW.data->>'command', '') <> '' THEN
            INSERT INTO {DOC} (session_id, source, source_id, part, at, body)
            VALUES (NEW.session_id, 'command', NEW.id, 0, NEW.at, NEW.data->>'command');
        END IF;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER searchdoc_event AFTER INSERT OR UPDATE OF kind, data OR DELETE
    ON sessions_app_sessionevent FOR EACH ROW EXECUTE FUNCTION termsys_search_event()
    """,
    f"""
    CREATE FUNCTION termsys_search_session() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        text_ text := concat_ws(' ', NEW.title, NEW.tab_name,
            (SELECT name FROM sessions_app_project WHERE id = NEW.project_id));
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO {DOC} (session_id, source, source_id, part, at, body)
            VALUES (NEW.id, 'session', NULL, 0, NEW.created_at, text_);
        ELSE
            UPDATE {DOC} SET body = text_ WHERE source = 'session' AND session_id = NEW.id;
        END IF;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER searchdoc_session AFTER INSERT OR UPDATE OF title, tab_name, project_id
    ON sessions_app_terminalsession FOR EACH ROW EXECUTE FUNCTION termsys_search_session()
    """,
    f"""
    CREATE FUNCTION termsys_search_project() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE {DOC} d SET body = concat_ws(' ', s.title, s.tab_name, NEW.name)
        FROM sessions_app_terminalsession s
        WHERE d.source = 'session' AND d.session_id = s.id AND s.project_id = NEW.id;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER searchdoc_project AFTER UPDATE OF name
    ON sessions_app_project FOR EACH ROW EXECUTE FUNCTION termsys_search_project()
    """,
    # What was stored before this migration, in time order: "newest first" is document order.
    f"""
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
    """,
]

PG_BACKWARD = [
    "DROP TRIGGER IF EXISTS searchdoc_chunk ON sessions_app_outputchunk",
    "DROP TRIGGER IF EXISTS searchdoc_event ON sessions_app_sessionevent",
    "DROP TRIGGER IF EXISTS searchdoc_session ON sessions_app_terminalsession",
    "DROP TRIGGER IF EXISTS searchdoc_project ON sessions_app_project",
    "DROP FUNCTION IF EXISTS termsys_search_chunk()",
    "DROP FUNCTION IF EXISTS termsys_search_event()",
    "DROP FUNCTION IF EXISTS termsys_search_session()",
    "DROP FUNCTION IF EXISTS termsys_search_project()",
]

FTS = "sessions_app_search_fts"
SESSION_BODY = "trim(s.title || ' ' || s.tab_name || ' ' || p.name)"
COMMAND = "json_extract(new.data, '$.command')"

SQLITE_FORWARD = [
    f"""
    CREATE VIRTUAL TABLE {FTS} USING fts5(
        body, content='{DOC}', content_rowid='id', tokenize='unicode61 remove_diacritics 2'
    )
    """,
    f"""
    CREATE TRIGGER searchdoc_fts_insert AFTER INSERT ON {DOC} BEGIN
        INSERT INTO {FTS}(rowid, body) VALUES (new.id, new.body);
    END
    """,
    f"""
    CREATE TRIGGER searchdoc_fts_delete AFTER DELETE ON {DOC} BEGIN
        INSERT INTO {FTS}({FTS}, rowid, body) VALUES ('delete', old.id, old.body);
    END
    """,
    f"""
    CREATE TRIGGER searchdoc_fts_update AFTER UPDATE OF body ON {DOC} BEGIN
        INSERT INTO {FTS}({FTS}, rowid, body) VALUES ('delete', old.id, old.body);
        INSERT INTO {FTS}(rowid, body) VALUES (new.id, new.body);
    END
    """,
    f"""
    CREATE TRIGGER searchdoc_chunk_insert AFTER INSERT ON sessions_app_outputchunk BEGIN
        INSERT INTO {DOC} (session_id, source, source_id, part, at, body)
        VALUES (new.session_id, 'output', new.id, 0, new.at, new.text);
    END
    """,
    f"""
    CREATE TRIGGER searchdoc_chunk_update AFTER UPDATE OF text ON sessions_app_outputchunk
    BEGIN
        UPDATE {DOC} SET body = new.text WHERE source = 'output' AND source_id = new.id;
    END
    """,
    f"""
    CREATE TRIGGER searchdoc_chunk_delete AFTER DELETE ON sessions_app_outputchunk BEGIN
        DELETE FROM {DOC} WHERE source = 'output' AND source_id = old.id;
    END
    """,
    f"""
    CREATE TRIGGER searchdoc_event_insert AFTER INSERT ON sessions_app_sessionevent
    WHEN new.kind = 'command' AND coalesce({COMMAND}, '') <> '' BEGIN
        INSERT INTO {DOC} (session_id, source, source_id, part, at, body)
        VALUES (new.session_id, 'command', new.id, 0, new.at, {COMMAND});
    END
    """,
    f"""
    CREATE TRIGGER searchdoc_event_update AFTER UPDATE OF kind, data
    ON sessions_app_sessionevent BEGIN
        DELETE FROM {DOC} WHERE source = 'command' AND source_id = old.id;
        INSERT INTO {DOC} (session_id, source, source_id, part, at, body)
        SELECT new.session_id, 'command', new.id, 0, new.at, {COMMAND}
        WHERE new.kind = 'command' AND coalesce({COMMAND}, '') <> '';
    END
    """,
    f"""
    CREATE TRIGGER searchdoc_event_delete AFTER DELETE ON sessions_app_sessionevent
    WHEN old.kind = 'command' BEGIN
        DELETE FROM {DOC} WHERE source = 'command' AND source_id = old.id;
    END
    """,
    f"""
    CREATE TRIGGER searchdoc_session_insert AFTER INSERT ON sessions_app_terminalsession BEGIN
        INSERT INTO {DOC} (session_id, source, source_id, part, at, body)
        SELECT s.id, 'session', NULL, 0, s.created_at, {SESSION_BODY}
        FROM sessions_app_terminalsession s JOIN sessions_app_project p ON p.id = s.project_id
        WHERE s.id = new.id;
    END
    """,
    f"""
    CREATE TRIGGER searchdoc_session_update
    AFTER UPDATE OF title, tab_name, project_id ON sessions_app_terminalsession BEGIN
        UPDATE {DOC} SET body = (
            SELECT {SESSION_BODY} FROM sessions_app_terminalsession s
            JOIN sessions_app_project p ON p.id = s.project_id WHERE s.id = new.id
        ) WHERE source = 'session' AND session_id = new.id;
    END
    """,
    f"""
    CREATE TRIGGER searchdoc_project_update AFTER UPDATE OF name ON sessions_app_project BEGIN
        UPDATE {DOC} SET body = (
            SELECT {SESSION_BODY} FROM sessions_app_terminalsession s
            JOIN sessions_app_project p ON p.id = s.project_id WHERE s.id = {DOC}.session_id
        ) WHERE source = 'session' AND session_id IN (
            SELECT id FROM sessions_app_terminalsession WHERE project_id = new.id
        );
    END
    """,
    f"""
    INSERT INTO {DOC} (session_id, source, source_id, part, at, body)
    SELECT * FROM (
        SELECT session_id, 'output', id, 0, at, text FROM sessions_app_outputchunk
        UNION ALL
        SELECT session_id, 'command', id, 0, at, json_extract(data, '$.command')
        FROM sessions_app_sessionevent
        WHERE kind = 'command' AND coalesce(json_extract(data, '$.command'), '') <> ''
        UNION ALL
        SELECT s.id, 'session', NULL, 0, s.created_at, {SESSION_BODY}
        FROM sessions_app_terminalsession s JOIN sessions_app_project p ON p.id = s.project_id
    ) ORDER BY 5, 3
    """,
]

SQLITE_BACKWARD = [
    *(
        f"DROP TRIGGER IF EXISTS {name}"
        for name in (
            "searchdoc_fts_insert",
            "searchdoc_fts_delete",
            "searchdoc_fts_update",
            "searchdoc_chunk_insert",
            "searchdoc_chunk_update",
            "searchdoc_chunk_delete",
            "searchdoc_event_insert",
            "searchdoc_event_update",
            "searchdoc_event_delete",
            "searchdoc_session_insert",
            "searchdoc_session_update",
            "searchdoc_project_update",
        )
    ),
    f"DROP TABLE IF EXISTS {FTS}",
]

STATEMENTS = {
    "postgresql": (PG_FORWARD, PG_BACKWARD),
    "sqlite": (SQLITE_FORWARD, SQLITE_BACKWARD),
}


def _run(schema_editor, direction: int) -> None:
    vendor = schema_editor.connection.vendor
    if vendor not in STATEMENTS:
        raise RuntimeError(f"search index: no SQL for database vendor {vendor!r}")
    for statement in STATEMENTS[vendor][direction]:
        schema_editor.execute(statement)


def forwards(apps, schema_editor) -> None:
    _run(schema_editor, 0)


def backwards(apps, schema_editor) -> None:
    _run(schema_editor, 1)


class Migration(migrations.Migration):
    dependencies = [
        ("sessions_app", "0003_end_reason"),
    ]

    operations = [
        migrations.CreateModel(
            name="SearchDocument",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "source",
                    models.CharField(
                        choices=[
                            ("output", "Output"),
                            ("command", "Command"),
                            ("session", "Session"),
                        ],
                        max_length=8,
                    ),
                ),
                (
                    "source_id",
                    models.BigIntegerField(help_text="The chunk's or event's id.", null=True),
                ),
                ("part", models.PositiveSmallIntegerField(default=0)),
                ("at", models.DateTimeField()),
                ("body", models.TextField()),
                (
                    "session",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="search_documents",
                        to="sessions_app.terminalsession",
                    ),
                ),
            ],
            options={
                "indexes": [
                    models.Index(fields=["session", "source"], name="searchdoc_session_source"),
                    models.Index(fields=["at", "id"], name="searchdoc_at"),
                ],
                "constraints": [
                    models.UniqueConstraint(
                        fields=("source", "source_id", "part"), name="searchdoc_unique_source"
                    )
                ],
            },
        ),
        migrations.RunPython(forwards, backwards),
    ]

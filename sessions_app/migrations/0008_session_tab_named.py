"""TerminalSession.tab_named: the user chose the tab's name (rename), so the tab shows it
rather than the process title.

On SQLite, Django adds a NOT NULL column by rebuilding the table, which would drop the search
triggers of 0004_search on it; a plain ADD COLUMN (a constant default) keeps them.
"""

from django.db import migrations, models

TABLE = "sessions_app_terminalsession"


def _field() -> models.BooleanField:
    field = models.BooleanField(default=False)
    field.set_attributes_from_name("tab_named")
    return field


def forwards(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "sqlite":
        column = schema_editor.quote_name("tab_named")
        schema_editor.execute(f"ALTER TABLE {TABLE} ADD COLUMN {column} bool NOT NULL DEFAULT 0")
    else:
        schema_editor.add_field(apps.get_model("sessions_app", "TerminalSession"), _field())


def backwards(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "sqlite":
        schema_editor.execute(
            f"ALTER TABLE {TABLE} DROP COLUMN {schema_editor.quote_name('tab_named')}"
        )
    else:
        schema_editor.remove_field(apps.get_model("sessions_app", "TerminalSession"), _field())


class Migration(migrations.Migration):
    dependencies = [
        ("sessions_app", "0007_search_vector"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(forwards, backwards)],
            state_operations=[
                migrations.AddField(
                    model_name="terminalsession",
                    name="tab_named",
                    field=models.BooleanField(
                        default=False,
                        help_text=(
                            "The user chose the tab name (rename): the tab shows it, not the "
                            "process title."
                        ),
                    ),
                ),
            ],
        ),
    ]

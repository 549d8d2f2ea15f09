"""Drop waffle's own flag tables: termsys's flag model replaced them (0003 copied the rows).

Left in place they would be orphans that still reference the user and group tables, which
would also stop Django from emptying those tables (``flush``) on PostgreSQL.
"""

from django.db import migrations


def forwards(apps, schema_editor):
    Old = apps.get_model("waffle", "Flag")
    if Old._meta.db_table in schema_editor.connection.introspection.table_names():
        schema_editor.delete_model(Old)


class Migration(migrations.Migration):
    dependencies = [("featureflags", "0003_product_flags")]
    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]

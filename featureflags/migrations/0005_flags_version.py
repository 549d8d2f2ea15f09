"""The flags' change marker: one row whose number moves after every flag change, read by
processes that cache flags in their own memory (``featureflags.marker``)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("featureflags", "0004_drop_waffle_flag_tables")]

    operations = [
        migrations.CreateModel(
            name="FlagsVersion",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("version", models.BigIntegerField(default=0)),
            ],
            options={"verbose_name": "flags version"},
        ),
    ]

"""Move the product's flags to termsys's flag model, keeping what an admin already set.

Each gets a salt of its own and ``superusers`` off: a percentage rollout means the same for
admins as for everyone else.
"""

import secrets

from django.db import migrations

FLAGS = {
    "storage_hybrid": "Moves a percentage of users to HYBRID storage (memory first, write-behind).",
    "dynamic_titles": "Tab titles follow the running command or the working directory.",
    "activity_tracking": "Records command events (command line, cwd, exit code, duration).",
    "session_search": "Shows the session search panel and enables the search API.",
}
COPIED = ("everyone", "testing", "staff", "authenticated", "languages", "rollout", "note")


def forwards(apps, schema_editor):
    Old = apps.get_model("waffle", "Flag")
    New = apps.get_model("featureflags", "Flag")
    FlagChange = apps.get_model("featureflags", "FlagChange")
    for old in Old.objects.all():
        if New.objects.filter(name=old.name).exists():
            continue
        new = New.objects.create(
            name=old.name,
            salt=secrets.token_hex(8),
            percent=old.percent,
            superusers=False if old.name in FLAGS else old.superusers,
            **{field: getattr(old, field) for field in COPIED},
        )
        new.users.set(old.users.all())
        new.groups.set(old.groups.all())
    for name, note in FLAGS.items():
        _, created = New.objects.get_or_create(
            name=name,
            defaults={
                "everyone": False,
                "note": note,
                "superusers": False,
                "salt": secrets.token_hex(8),
            },
        )
        if created:
            FlagChange.objects.create(
                flag=name,
                actor="migration",
                source="migration",
                reason="created off",
                before={},
                after={"everyone": False, "percent": None},
            )


class Migration(migrations.Migration):
    dependencies = [
        ("featureflags", "0002_flag_model"),
        ("waffle", "0004_update_everyone_nullbooleanfield"),
    ]
    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]

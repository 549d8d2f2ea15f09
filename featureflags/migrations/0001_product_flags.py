from django.db import migrations

FLAGS = {
    "storage_hybrid": "Moves a percentage of users to HYBRID storage (memory first, write-behind).",
    "dynamic_titles": "Tab titles follow the running command or the working directory.",
    "activity_tracking": "Records command events (command line, cwd, exit code, duration).",
    "session_search": "Shows the session search panel and enables the search API.",
}


def create_flags(apps, schema_editor):
    Flag = apps.get_model("waffle", "Flag")
    for name, note in FLAGS.items():
        Flag.objects.get_or_create(name=name, defaults={"everyone": False, "note": note})


def remove_flags(apps, schema_editor):
    apps.get_model("waffle", "Flag").objects.filter(name__in=FLAGS).delete()


class Migration(migrations.Migration):
    dependencies = [("waffle", "0004_update_everyone_nullbooleanfield")]
    operations = [migrations.RunPython(create_flags, remove_flags)]

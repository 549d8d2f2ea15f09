"""Create the first admin user with a random password, printed once, unless a user exists."""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

BAD_USERNAME = "--username {username!r}: {problems}"


class Command(BaseCommand):
    help = "Create an admin user with a random password if no user exists yet (used by 'make run')."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--username", default="admin", help="Name of the admin user (default: admin)."
        )

    def handle(self, *args: Any, username: str, **options: Any) -> None:
        User = get_user_model()
        # As the user model checks it (createsuperuser does too): required, at most 150
        # characters, letters, digits and @/./+/-/_ only.
        try:
            User._meta.get_field(User.USERNAME_FIELD).clean(username, None)
        except ValidationError as exc:
            problems = " ".join(exc.messages)
            raise CommandError(BAD_USERNAME.format(username=username, problems=problems)) from exc
        if User.objects.exists():
            return
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email="", password=password)
        bar = "=" * 64
        self.stdout.write(self.style.SUCCESS(bar))
        self.stdout.write(self.style.SUCCESS(f"  termsys admin created. Log in as: {username}"))
        self.stdout.write(self.style.SUCCESS(f"  password: {password}"))
        self.stdout.write(self.style.SUCCESS("  (shown only this once; change it in /admin/)"))
        self.stdout.write(self.style.SUCCESS(bar))

"""``manage.py bootstrap_admin``: the first admin, with a username Django would accept."""

from __future__ import annotations

import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

pytestmark = pytest.mark.django_db(transaction=True)


def bootstrap(*args: str) -> str:
    out = io.StringIO()
    call_command("bootstrap_admin", *args, stdout=out)
    return out.getvalue()


def test_the_first_admin_is_created_once():
    assert "Log in as: root" in bootstrap("--username", "root")
    assert get_user_model().objects.get(username="root").is_superuser
    assert bootstrap("--username", "other") == ""  # a user exists: nothing to do
    assert get_user_model().objects.count() == 1


@pytest.mark.parametrize(
    ("username", "problem"),
    [
        ("", "This field cannot be blank."),
        ("ana b/c", "Enter a valid username."),
        ("x" * 151, "Ensure this value has at most 150 characters (it has 151)."),
    ],
)
def test_a_username_django_would_refuse_is_refused(username, problem):
    with pytest.raises(CommandError) as caught:
        bootstrap("--username", username)
    assert str(caught.value).startswith(f"--username {username!r}: ")
    assert problem in str(caught.value)
    assert caught.value.returncode == 1
    assert not get_user_model().objects.exists()

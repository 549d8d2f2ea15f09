"""Start-up refuses a bad setting with a message that names it; good ones configure services."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def start(env: dict[str, str], tmp_path: Path, code: str = "import django; django.setup()"):
    environ = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    environ.update(DJANGO_SETTINGS_MODULE="termsys.settings", TERMSYS_VAR_DIR=str(tmp_path), **env)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("TERMSYS_STORAGE_MODE", "CLOUD", "allowed: LOCAL, DATABASE, HYBRID"),
        ("DATABASE_URL", "mysql://root@localhost/x", "expected a URL starting with postgres://"),
        ("DATABASE_URL", "postgres://host:notaport/db", "DATABASE_URL is not a valid URL"),
        ("REDIS_URL", "http://127.0.0.1:6379", "expected a URL starting with redis://"),
        (
            "TERMSYS_MAX_SESSIONS_PER_PROJECT",
            "0",
            "TERMSYS_MAX_SESSIONS_PER_PROJECT=0 is out of range; it must be at least 1",
        ),
        ("TERMSYS_SCROLLBACK_BYTES", "-5", "TERMSYS_SCROLLBACK_BYTES=-5 is out of range"),
        ("TERMSYS_IDLE_TIMEOUT", "soon", "TERMSYS_IDLE_TIMEOUT='soon' is not an integer"),
        (
            "TERMSYS_EMERGENCY_ROLLBACK",
            "maybe",
            "TERMSYS_EMERGENCY_ROLLBACK='maybe' is not a boolean",
        ),
        ("TERMSYS_PROFILES", "{broken", "TERMSYS_PROFILES is not valid JSON"),
        (
            "TERMSYS_PROFILES",
            '{"claude": "claude"}',
            "TERMSYS_PROFILES: profile 'claude' must be a non-empty list",
        ),
        ("DEBUG", "perhaps", "DEBUG='perhaps' is not a boolean"),
        ("TERMSYS_SAFEGUARD_P95_MS", "fast", "TERMSYS_SAFEGUARD_P95_MS='fast' is not a number"),
        ("TERMSYS_SAFEGUARD_ERROR_RATE", "150", "it must be from 0 to 100"),
        ("TERMSYS_SAFEGUARD_P95_MS", "nan", "TERMSYS_SAFEGUARD_P95_MS=nan is out of range"),
        ("TERMSYS_WS_MESSAGES_PER_SECOND", "-1", "it must be at least 0"),
    ],
)
def test_invalid_setting_stops_startup_naming_it(tmp_path, name, value, expected):
    result = start({name: value}, tmp_path)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert expected in result.stderr


def test_manage_py_reports_a_bad_setting_without_a_traceback(tmp_path):
    environ = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    environ.update(TERMSYS_VAR_DIR=str(tmp_path), TERMSYS_STORAGE_MODE="nope")
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("termsys: configuration error: TERMSYS_STORAGE_MODE='nope'")
    assert "Traceback" not in result.stderr


def test_embedded_defaults(tmp_path):
    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.DATABASES['default']['ENGINE'], s.CHANNEL_LAYERS['default']['BACKEND'], "
        "s.CACHES['default']['BACKEND'], s.DEBUG, s.TERMSYS_STORAGE_MODE, "
        "s.TERMSYS_MAX_SESSIONS_PER_PROJECT)"
    )
    result = start({}, tmp_path, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "django.db.backends.sqlite3",
        "channels.layers.InMemoryChannelLayer",
        "django.core.cache.backends.locmem.LocMemCache",
        "False",
        "DATABASE",
        "10",
    ]
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600


def test_service_urls_select_postgres_and_redis(tmp_path):
    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.DATABASES['default']['ENGINE'], s.DATABASES['default']['NAME'], "
        "s.CHANNEL_LAYERS['default']['BACKEND'], s.CACHES['default']['BACKEND'])"
    )
    result = start(
        {
            "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/termsys",
            "REDIS_URL": "redis://127.0.0.1:6379/3",
        },
        tmp_path,
        code,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "django.db.backends.postgresql",
        "termsys",
        "channels_redis.core.RedisChannelLayer",
        "django.core.cache.backends.redis.RedisCache",
    ]


def test_zero_turns_the_websocket_rate_limits_off(tmp_path):
    result = start(
        {"TERMSYS_WS_CONNECTS_PER_MINUTE": "0", "TERMSYS_WS_MESSAGES_PER_SECOND": "0"},
        tmp_path,
        "import django; django.setup(); from sessions_app import ratelimit; "
        "bucket = ratelimit.TokenBucket(0); "
        "print(ratelimit.connect_allowed(1), all(bucket.take() for _ in range(10000)))",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


@pytest.mark.parametrize("port", ["²", "0", "65536", "80a"])
def test_serve_refuses_a_port_that_is_not_ascii_digits_1_to_65535(port):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="is not a TCP port"):
        call_command("serve", "--port", port)

"""termsys settings, driven by environment variables with embedded defaults.

With nothing set, termsys runs embedded: SQLite in the project directory, an in-memory channel
layer and a local-memory cache. ``DATABASE_URL`` and ``REDIS_URL`` switch to PostgreSQL
(psycopg 3), channels-redis and Django's Redis cache. README.md documents every variable.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from termsys.env import (
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_json_object,
    env_list,
    env_regex_list,
    env_url,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("TERMSYS_VAR_DIR") or BASE_DIR / "var")

DEBUG = env_bool("DEBUG", False)


def _secret_key() -> str:
    """Return SECRET_KEY from the environment, or one kept in var/ for the embedded default."""
    key = os.environ.get("SECRET_KEY", "").strip()
    if key:
        return key
    key_file = VAR_DIR / "secret_key"
    if key_file.exists():
        return key_file.read_text().strip()
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(50)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "waffle",
    "sessions_app",
    "featureflags",
    "legacy",
]

# termsys's flag: deterministic percentages by user, rollback, audit (featureflags/models.py).
WAFFLE_FLAG_MODEL = "featureflags.Flag"
WAFFLE_CREATE_MISSING_FLAGS = False
WAFFLE_ENABLE_ADMIN_PAGES = False  # featureflags/admin.py registers the audited flag admin
# Every flag change must say why (admin, command, API); default: on unless DEBUG.
TERMSYS_FLAG_REASON_REQUIRED = env_bool("TERMSYS_FLAG_REASON_REQUIRED", not DEBUG)
# Safeguard checks and ramps run inside each server process (off: run manage.py flag_tasks).
TERMSYS_FLAG_TASKS = env_bool("TERMSYS_FLAG_TASKS", True)
# The flag safeguard (featureflags/safeguard.py): thresholds for a flag's cohort.
TERMSYS_SAFEGUARD_ENABLED = env_bool("TERMSYS_SAFEGUARD_ENABLED", True)
TERMSYS_SAFEGUARD_INTERVAL = env_int("TERMSYS_SAFEGUARD_INTERVAL", 10, minimum=1, maximum=3600)
TERMSYS_SAFEGUARD_ERROR_RATE = env_float("TERMSYS_SAFEGUARD_ERROR_RATE", 1.0, 0.0, 100.0)
TERMSYS_SAFEGUARD_P95_MS = env_float("TERMSYS_SAFEGUARD_P95_MS", 100.0, 1.0, 600_000.0)
TERMSYS_SAFEGUARD_CHECKS = env_int("TERMSYS_SAFEGUARD_CHECKS", 3, minimum=1, maximum=1000)
TERMSYS_SAFEGUARD_MIN_SAMPLES = env_int("TERMSYS_SAFEGUARD_MIN_SAMPLES", 100, maximum=10**9)
# Error rate and latency must stay over their thresholds without the N-1 heaviest users.
TERMSYS_SAFEGUARD_MIN_USERS = env_int("TERMSYS_SAFEGUARD_MIN_USERS", 3, minimum=1, maximum=10)

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "termsys.middleware.AsyncFileStreamMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "sessions_app.middleware.ApiErrorMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "featureflags.middleware.SafeguardMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "featureflags.middleware.VisitorIdMiddleware",
    "waffle.middleware.WaffleMiddleware",
]

ROOT_URLCONF = "termsys.urls"
ASGI_APPLICATION = "termsys.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- database -------------------------------------------------------------------------------

_database_url = env_url("DATABASE_URL", ("postgres", "postgresql", "sqlite"))
if _database_url:
    DATABASES = {
        "default": dj_database_url.parse(_database_url, conn_max_age=60, conn_health_checks=True)
    }
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        if not DATABASES["default"].get("NAME"):
            raise ImproperlyConfigured(
                "DATABASE_URL names no database; expected postgres://user@host:5432/dbname."
            )
        # Fail fast when the database is unreachable instead of hanging requests.
        DATABASES["default"].setdefault("OPTIONS", {}).setdefault("connect_timeout", 2)
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "termsys.sqlite3",
            "OPTIONS": {
                "timeout": 20,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }
DATABASES["default"].setdefault("TEST", {})
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not shared-cache memory: threads then wait on SQLite's busy timeout, as in production.
    # One per test process, so two test runs on one checkout do not share it.
    DATABASES["default"]["TEST"]["NAME"] = str(VAR_DIR / f"test-{os.getpid()}.sqlite3")
if os.environ.get("TERMSYS_TEST_DB_NAME"):
    DATABASES["default"]["TEST"]["NAME"] = os.environ["TERMSYS_TEST_DB_NAME"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- channel layer and cache ----------------------------------------------------------------

REDIS_URL = env_url("REDIS_URL", ("redis", "rediss", "unix"))
# Keys and channels of one termsys deployment in Redis start with this (several may share one).
REDIS_PREFIX = os.environ.get("TERMSYS_REDIS_PREFIX") or "termsys"
if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", REDIS_PREFIX):
    raise ImproperlyConfigured(
        f"TERMSYS_REDIS_PREFIX={REDIS_PREFIX!r} must be 1-64 letters, digits, '_', '.' or '-'."
    )
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # A blocking read waits up to 5 s for a message (channels_redis's BZPOPMIN);
                # redis-py's default socket timeout is 5 s too, so an idle receive would fail
                # with "Timeout reading" instead of coming back empty: give it room.
                "hosts": [{"address": REDIS_URL, "socket_timeout": 15}],
                "prefix": REDIS_PREFIX,
            },
        }
    }
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": REDIS_PREFIX,
            "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- auth, i18n, static ---------------------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"
CSRF_FAILURE_VIEW = "sessions_app.middleware.csrf_failure"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("BEHIND_PROXY", False) else None
)

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STATICFILES_DIRS = [
    BASE_DIR / "static",
    ("vendor", BASE_DIR / "node_modules" / "@xterm"),
]
WHITENOISE_USE_FINDERS = True

DATA_UPLOAD_MAX_MEMORY_SIZE = 1024 * 1024

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO").upper()},
    # The servers log every WebSocket opened and closed at INFO: only warnings and errors.
    "loggers": {
        "uvicorn": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
    },
}

# --- termsys ----------------------------------------------------------------------------------

STORAGE_MODES = ("LOCAL", "DATABASE", "HYBRID")
TERMSYS_STORAGE_MODE = env_choice("TERMSYS_STORAGE_MODE", "DATABASE", STORAGE_MODES)
TERMSYS_EMERGENCY_ROLLBACK = env_bool("TERMSYS_EMERGENCY_ROLLBACK", False)
TERMSYS_SCROLLBACK_BYTES = env_int(
    "TERMSYS_SCROLLBACK_BYTES", 1024 * 1024, minimum=4096, maximum=256 * 1024 * 1024
)
TERMSYS_SCROLLBACK_MEMORY_BYTES = env_int(
    "TERMSYS_SCROLLBACK_MEMORY_BYTES", 256 * 1024 * 1024, minimum=1024 * 1024, maximum=64 * 1024**3
)
# The safeguard's memory threshold for a flag cohort's live terminals (0: no threshold).
TERMSYS_SAFEGUARD_MEMORY_BYTES = env_int(
    "TERMSYS_SAFEGUARD_MEMORY_BYTES", TERMSYS_SCROLLBACK_MEMORY_BYTES, minimum=0
)
TERMSYS_MAX_SESSIONS_PER_PROJECT = env_int("TERMSYS_MAX_SESSIONS_PER_PROJECT", 10, maximum=1000)
TERMSYS_MAX_SESSIONS_PER_USER = env_int("TERMSYS_MAX_SESSIONS_PER_USER", 50, maximum=10000)
TERMSYS_IDLE_TIMEOUT = env_int("TERMSYS_IDLE_TIMEOUT", 30 * 60, maximum=30 * 24 * 3600)
TERMSYS_WS_CONNECTS_PER_MINUTE = env_int(
    "TERMSYS_WS_CONNECTS_PER_MINUTE", 600, minimum=0, maximum=10**6
)
TERMSYS_WS_MESSAGES_PER_SECOND = env_int(
    "TERMSYS_WS_MESSAGES_PER_SECOND", 1000, minimum=0, maximum=10**6
)
TERMSYS_PROFILES = env_json_object("TERMSYS_PROFILES") or {}
TERMSYS_LOCAL_MAX_BYTES = env_int(
    "TERMSYS_LOCAL_MAX_BYTES", 256 * 1024 * 1024, minimum=1024 * 1024, maximum=64 * 1024**3
)
TERMSYS_JOURNAL_DIR = Path(os.environ.get("TERMSYS_JOURNAL_DIR") or VAR_DIR / "journal")
TERMSYS_JOURNAL_MAX_BYTES = env_int(
    "TERMSYS_JOURNAL_MAX_BYTES", 256 * 1024 * 1024, minimum=1024 * 1024, maximum=64 * 1024**3
)
TERMSYS_JOURNAL_FSYNC = env_choice(
    "TERMSYS_JOURNAL_FSYNC", "INTERVAL", ("ALWAYS", "INTERVAL", "NEVER")
)
TERMSYS_PROJECTS_ROOT = Path(os.environ.get("TERMSYS_PROJECTS_ROOT") or VAR_DIR / "projects")
# Secrets masked in command lines and titles before they are stored (sessions_app/shellint.py):
# a match is replaced by ****, or only its first group when it has one.
DEFAULT_MASK_PATTERNS = [
    r"(?i)[\w.-]*(?:password|passwd|secret|token|api[_-]?key)[\w.-]*\s*[=:]\s*"
    r"(\"[^\"]*\"|'[^']*'|[^\s'\"]+)",
    r"(?i)\bbearer\s+([\w.~+/=-]+)",
    r"\b((?:AKIA|ASIA)[0-9A-Z]{16})\b",
    r"://[^/\s:@]+:([^/\s@]+)@",
    r"\b(gh[pousr]_\w{20,}|github_pat_\w{20,}|xox[abposr]-[\w-]{10,})",
]
TERMSYS_MASK_PATTERNS = env_regex_list("TERMSYS_MASK_PATTERNS", DEFAULT_MASK_PATTERNS)
# Where `manage.py backup create` writes archives and `list`/`prune` look (README "Backups").
TERMSYS_BACKUP_DIR = Path(os.environ.get("TERMSYS_BACKUP_DIR") or VAR_DIR / "backups")
# Unset: one cgroup per session under the server's own cgroup where possible; "": none.
TERMSYS_CGROUP_ROOT = os.environ.get("TERMSYS_CGROUP_ROOT")
if TERMSYS_CGROUP_ROOT and not os.path.isabs(TERMSYS_CGROUP_ROOT):
    raise ImproperlyConfigured(
        f"TERMSYS_CGROUP_ROOT={TERMSYS_CGROUP_ROOT!r} must be an absolute path of a cgroup v2 "
        "directory (e.g. /sys/fs/cgroup/termsys), or empty to use no cgroups."
    )

# Validate what the environment gave us now, so a bad value stops start-up with its name.
from sessions_app.conf import validate_profiles  # noqa: E402

validate_profiles(TERMSYS_PROFILES, source="TERMSYS_PROFILES")

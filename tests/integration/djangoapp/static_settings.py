"""The test app's settings plus what `collectstatic` needs for Django's admin files (README)."""

import os

from djangoapp.settings import *  # noqa: F403

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
]
# The admin's login page for an anonymous visitor needs no database: sessions live in signed cookies.
ROOT_URLCONF = "djangoapp.static_urls"
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
MIDDLEWARE = [
    *MIDDLEWARE,  # noqa: F405
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "/static/"
STATIC_ROOT = os.environ["DJANGOAPP_STATIC_ROOT"]
MEDIA_URL = "/media/"
MEDIA_ROOT = os.environ.get("DJANGOAPP_MEDIA_ROOT", "")
# Hashed names (base.3f1c2a9b7d0e.css) and a staticfiles.json manifest, as in production.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.ManifestStaticFilesStorage"},
}

"""The test app's settings plus what `collectstatic` needs for Django's admin files (README)."""

import os

from djangoapp.settings import *  # noqa: F403

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.staticfiles",
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

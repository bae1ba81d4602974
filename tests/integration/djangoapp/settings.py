"""Settings for the test app: what a Django site behind tlsproxy is told to set, and no more."""

import os

SECRET_KEY = "tlsproxy-integration-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["localhost", "app.test", "127.0.0.1"]
ROOT_URLCONF = "djangoapp.urls"
WSGI_APPLICATION = "djangoapp.wsgi.application"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
MIDDLEWARE = [
    "djangoapp.views.RecordHits",
    "django.middleware.csrf.CsrfViewMiddleware",
]

# The two lines the README tells Django users to set behind tlsproxy.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
USE_X_FORWARDED_HOST = True

# Uploads are streamed by the view; Django must not refuse them for size.
DATA_UPLOAD_MAX_MEMORY_SIZE = None

USE_TZ = True
LOGGING_CONFIG = None

# Every request that reaches Django is appended here (method, path, query), one line each, so a
# test can prove that a request the proxy refused never arrived.
HITS_LOG = os.environ.get("DJANGOAPP_HITS_LOG", "")

"""The test app's URLs plus Django's admin, whose pages load the collected static files."""

from django.contrib import admin
from django.urls import path
from djangoapp.urls import urlpatterns as app_urls

urlpatterns = [*app_urls, path("admin/", admin.site.urls)]

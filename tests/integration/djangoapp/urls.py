from django.urls import path
from djangoapp import views

urlpatterns = [
    path("whoami", views.whoami),
    path("form", views.form),
    path("upload", views.upload),
    path("body-hash", views.body_hash),
    path("download", views.download),
    path("download-fixed", views.download_fixed),
    path("slow", views.slow),
    path("events", views.events),
    path("own-hsts", views.own_hsts),
    path("cookie", views.cookie),
    path("health", views.health),
    path("json", views.json_rows),
    path("json-stream", views.json_stream),
    path("held", views.held),
    path("own-gzip", views.own_gzip),
    path("no-transform", views.no_transform),
]

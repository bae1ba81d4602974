"""Views that report what Django saw, so the tests can check what the proxy sent."""

import hashlib
import os
import time

from django.conf import settings
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.middleware.csrf import get_token
from django.utils.html import escape
from django.views.decorators.csrf import csrf_exempt
from djangoapp.pattern import blocks


class RecordHits:
    """Append every request Django sees to HITS_LOG before anything else runs (body not yet read)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if settings.HITS_LOG:
            line = f"{os.getpid()} {request.method} {request.get_full_path()}\n"
            fd = os.open(settings.HITS_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode("utf-8", "backslashreplace"))
            finally:
                os.close(fd)
        return self.get_response(request)


def whoami(request):
    return JsonResponse(
        {
            "is_secure": request.is_secure(),
            "scheme": request.scheme,
            "host": request.get_host(),
            "remote_addr": request.META.get("REMOTE_ADDR"),
            "x_forwarded_for": request.META.get("HTTP_X_FORWARDED_FOR"),
            "method": request.method,
            "path": request.get_full_path(),
            "meta": {k: v for k, v in request.META.items() if k.startswith("HTTP_")},
        }
    )


def form(request):
    if request.method == "POST":
        return HttpResponse(f"echo:{request.POST.get('field', '')}", content_type="text/plain")
    token = get_token(request)
    return HttpResponse(
        '<form method="post" action="/form">'
        f'<input type="hidden" name="csrfmiddlewaretoken" value="{escape(token)}">'
        '<input name="field"><button>send</button></form>'
    )


@csrf_exempt
def upload(request):
    # Django reads nothing from a body without Content-Length; gunicorn's wsgi.input de-chunks a
    # chunked body and ends it itself, so read that directly when there is no length.
    if request.META.get("CONTENT_LENGTH"):
        stream = request
    else:
        stream = request.META["wsgi.input"]
    h = hashlib.sha256()
    length = 0
    while True:
        chunk = stream.read(65536)
        if not chunk:
            break
        h.update(chunk)
        length += len(chunk)
    return JsonResponse(
        {
            "sha256": h.hexdigest(),
            "length": length,
            "content_length": request.META.get("CONTENT_LENGTH"),
            "transfer_encoding": request.META.get("HTTP_TRANSFER_ENCODING"),
        }
    )


@csrf_exempt
def body_hash(request):
    """What a plain Django view sees of the body: request.body, nothing gunicorn-specific."""
    body = request.body
    return JsonResponse(
        {
            "sha256": hashlib.sha256(body).hexdigest(),
            "length": len(body),
            "content_length": request.META.get("CONTENT_LENGTH"),
            "transfer_encoding": request.META.get("HTTP_TRANSFER_ENCODING"),
            "expect": request.META.get("HTTP_EXPECT"),
        }
    )


def _size(request):
    return int(request.GET.get("size", "0"))


def download(request):
    return StreamingHttpResponse(blocks(_size(request)), content_type="application/octet-stream")


def download_fixed(request):
    size = _size(request)
    response = StreamingHttpResponse(blocks(size), content_type="application/octet-stream")
    response["Content-Length"] = str(size)
    if request.GET.get("accel") == "no":
        response["X-Accel-Buffering"] = "no"
    return response


def events(request):
    """Server-sent events with a pause between them, streamed at once (X-Accel-Buffering: no)."""
    pause = float(request.GET.get("pause", "2"))

    def stream():
        yield b"data: first\n\n"
        time.sleep(pause)
        yield b"data: second\n\n"

    response = StreamingHttpResponse(stream(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


def slow(request):
    time.sleep(float(request.GET.get("seconds", "1")))
    return HttpResponse("slept", content_type="text/plain")


def own_hsts(request):
    response = HttpResponse("own hsts", content_type="text/plain")
    response["Strict-Transport-Security"] = "max-age=60"
    return response


def cookie(request):
    response = HttpResponse("cookie", content_type="text/plain")
    response.set_cookie("flavour", "oat", httponly=True, samesite="Lax")
    return response


def health(request):
    """200, or the status written in the file next to the hits log (HITS_LOG.health): a test flips it."""
    status = 200
    if settings.HITS_LOG:
        try:
            with open(settings.HITS_LOG + ".health") as f:
                status = int(f.read().strip() or "200")
        except FileNotFoundError:
            pass
    return HttpResponse(f"health {os.getpid()}", status=status, content_type="text/plain")


def _rows(count):
    return [{"id": i, "name": f"user{i}", "email": f"user{i}@example.com", "active": i % 3 == 0} for i in range(count)]


def json_rows(request):
    """A JSON answer of ?rows= rows, made whole (one JsonResponse)."""
    return JsonResponse(_rows(int(request.GET.get("rows", "100"))), safe=False)


def json_stream(request):
    """The same rows streamed a few at a time (no Content-Length: gunicorn sends it chunked)."""
    rows = _rows(int(request.GET.get("rows", "100")))

    def stream():
        yield b"["
        for start in range(0, len(rows), 50):
            chunk = ", ".join(JsonResponse(row).content.decode() for row in rows[start : start + 50])
            yield (", " if start else "").encode() + chunk.encode()
        yield b"]"

    return StreamingHttpResponse(stream(), content_type="application/json")


def held(request):
    """Streams a first part, then waits (30 s at most) for the file ?flag= before the second."""
    flag = request.GET["flag"]

    def stream():
        yield b"first part of a long report\n" * 40
        deadline = time.monotonic() + 30
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.02)
        yield b"second part\n" * 40

    response = StreamingHttpResponse(stream(), content_type="text/plain")
    response["X-Accel-Buffering"] = "no"
    return response


def own_gzip(request):
    """An answer the app compressed itself (GZipMiddleware-style): it must not be coded twice."""
    import gzip

    response = HttpResponse(gzip.compress(b"own gzip\n" * 500), content_type="text/plain")
    response["Content-Encoding"] = "gzip"
    return response


def no_transform(request):
    response = HttpResponse(b"keep me as I am\n" * 500, content_type="text/plain")
    response["Cache-Control"] = "no-transform"
    return response

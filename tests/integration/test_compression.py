"""Answers compressed by the real `twist tlsproxy` in front of Django under gunicorn, decoded by curl and httpx."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import zstandard

from tests.integration.conftest import APP_ENV, HERE, PKI, App, Proxy, gunicorn, start_proxy

pytestmark = pytest.mark.integration

CODINGS = ["gzip", "br", "zstd"]
VERSIONS = [False, True]
ROWS = 60000  # about 5 MB of JSON


@dataclass
class Setup:
    proxy: Proxy  # compress = true (the default)
    plain: Proxy  # compress = false
    app: App
    root: Path
    where: Path


@pytest.fixture(scope="module")
def setup(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """Django (with its admin, after collectstatic) under gunicorn, behind tlsproxy with compress and without."""
    where = tmp_path_factory.mktemp("compress")
    root = where / "staticfiles"
    env = {
        **os.environ,
        **APP_ENV,
        "DJANGO_SETTINGS_MODULE": "djangoapp.static_settings",
        "DJANGOAPP_STATIC_ROOT": str(root),
    }
    subprocess.run([sys.executable, "-m", "django", "collectstatic", "--noinput", "-v0"], env=env, cwd=HERE, check=True)
    settings = ("--env", "DJANGO_SETTINGS_MODULE=djangoapp.static_settings", "--env", f"DJANGOAPP_STATIC_ROOT={root}")
    static = {"/static/": str(root)}
    with (
        gunicorn("tcp", where, extra=settings) as app,
        start_proxy(where, app.url, pki, static=static) as proxy,
        start_proxy(where, app.url, pki, static=static, compress=False) as plain,
    ):
        yield Setup(proxy, plain, app, root, where)


def identity(proxy: Proxy, path: str) -> httpx.Response:
    with proxy.client() as client:
        got = client.get(path, headers={"accept-encoding": "identity"})
    assert got.status_code == 200, got.text[:300]
    assert "content-encoding" not in got.headers
    return got


def curl(proxy: Proxy, path: str, coding: str, http2: bool, *extra: str) -> tuple[bytes, bytes]:
    """curl --compressed asking for ``coding`` only: the head it saw and the body it decoded."""
    argv = ["curl", "-sS", "--cacert", str(proxy.pki.ca_pem), "--compressed", "-H", f"Accept-Encoding: {coding}"]
    argv += ["--http2" if http2 else "--http1.1", "-D", "-", "-o", "-", *extra, f"{proxy.origin()}{path}"]
    out = subprocess.run(argv, capture_output=True, check=True, timeout=60).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    return head.lower(), body


@pytest.mark.parametrize("http2", VERSIONS, ids=["h1", "h2"])
@pytest.mark.parametrize("coding", CODINGS)
def test_large_json_decodes_to_the_same_bytes_with_httpx(setup: Setup, coding: str, http2: bool) -> None:
    """A 5 MB JsonResponse comes back coded (Vary, no length) and httpx decodes it to Django's exact bytes."""
    path = f"/json?rows={ROWS}"
    expected = identity(setup.proxy, path).content
    assert len(expected) > 4_000_000
    with setup.proxy.client(http2=http2) as client:
        with client.stream("GET", path, headers={"accept-encoding": coding}) as got:
            raw = b"".join(got.iter_raw())
            assert got.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            assert got.headers["content-encoding"] == coding
            assert got.headers["vary"] == "Accept-Encoding"
            assert "content-length" not in got.headers
            if not http2:
                assert got.headers["transfer-encoding"] == "chunked"
        decoded = client.get(path, headers={"accept-encoding": coding})
    assert len(raw) < len(expected) // 4
    assert decoded.content == expected
    assert json.loads(decoded.content)[-1]["id"] == ROWS - 1


@pytest.mark.parametrize("http2", VERSIONS, ids=["h1", "h2"])
@pytest.mark.parametrize("coding", CODINGS)
def test_curl_compressed_decodes_to_the_same_bytes(setup: Setup, coding: str, http2: bool) -> None:
    """curl --compressed decodes the app's JSON (whole and streamed) and the admin page to the identity bytes."""
    for path in (f"/json?rows={ROWS}", "/json-stream?rows=20000", "/admin/login/"):
        head, body = curl(setup.proxy, path, coding, http2)
        assert f"content-encoding: {coding}".encode() in head, (path, head)
        assert b"vary: accept-encoding" in head or b"vary: cookie, accept-encoding" in head, head
        if path.startswith("/admin/"):
            assert b'<form action="/admin/login/' in body  # the page carries a fresh CSRF token each time
        else:
            assert body == identity(setup.proxy, path).content, path


@pytest.mark.parametrize("http2", VERSIONS, ids=["h1", "h2"])
@pytest.mark.parametrize("coding", CODINGS)
def test_static_file_without_sibling_coded_and_revalidated(setup: Setup, coding: str, http2: bool) -> None:
    """An admin JS file with no precompressed sibling is coded on the fly, weak ETag; that ETag gets a 304."""
    manifest = json.loads((setup.root / "staticfiles.json").read_text())
    path = "/static/" + manifest["paths"]["admin/js/core.js"]
    on_disk = (setup.root / path.removeprefix("/static/")).read_bytes()
    assert len(on_disk) > 1024
    with setup.proxy.client(http2=http2) as client:
        got = client.get(path, headers={"accept-encoding": coding})
        assert got.headers["content-encoding"] == coding
        assert got.content == on_disk
        assert got.headers["etag"].startswith('W/"')
        assert "accept-ranges" not in got.headers
        again = client.get(path, headers={"accept-encoding": coding, "if-none-match": got.headers["etag"]})
        assert again.status_code == 304


@pytest.mark.parametrize("http2", VERSIONS, ids=["h1", "h2"])
@pytest.mark.parametrize("coding", CODINGS)
def test_streamed_answer_is_decodable_before_it_ends(setup: Setup, coding: str, http2: bool) -> None:
    """A streaming answer (X-Accel-Buffering: no) is flushed as it comes: its first part decodes while the app waits."""
    flag = setup.where / f"flag-{coding}-{http2}"
    with setup.proxy.client(http2=http2) as client:
        with client.stream("GET", f"/held?flag={flag}", headers={"accept-encoding": coding}) as got:
            assert got.headers["content-encoding"] == coding
            seen = b""
            chunks = got.iter_bytes()
            while len(seen) < len(b"first part of a long report\n" * 40):
                seen += next(chunks)  # the app is still waiting for the flag here
            assert seen == b"first part of a long report\n" * 40
            flag.touch()
            rest = b"".join(chunks)
    assert rest == b"second part\n" * 40


@pytest.mark.parametrize(
    ("path", "encoding"),
    [("/events?pause=0", None), ("/own-gzip", "gzip"), ("/no-transform", None)],
)
def test_answers_that_must_pass_as_they_are(setup: Setup, path: str, encoding: str | None) -> None:
    """Event streams, the app's own gzip and no-transform answers are not coded by us."""
    with setup.proxy.client() as client:
        got = client.get(path, headers={"accept-encoding": "gzip, zstd"})
    assert got.status_code == 200
    assert got.headers.get("content-encoding") == encoding
    if path == "/own-gzip":
        assert got.content == b"own gzip\n" * 500  # decoded once: it was coded once
    if path == "/no-transform":
        assert got.content == b"keep me as I am\n" * 500


@pytest.mark.parametrize("http2", VERSIONS, ids=["h1", "h2"])
def test_compress_false_is_honoured(setup: Setup, http2: bool) -> None:
    """A site with compress = false relays the app's answer as sent, whatever the client accepts."""
    path = f"/json?rows={ROWS}"
    with setup.plain.client(http2=http2) as client:
        got = client.get(path, headers={"accept-encoding": "gzip, zstd"})
    assert "content-encoding" not in got.headers
    assert "vary" not in got.headers
    assert got.content == identity(setup.proxy, path).content


def test_zstd_frames_fit_browsers(setup: Setup) -> None:
    """The zstd frames of a 5 MB answer need at most an 8 MiB window, what browsers decode (RFC 9659)."""
    with setup.proxy.client() as client:
        with client.stream("GET", f"/json?rows={ROWS}", headers={"accept-encoding": "zstd"}) as got:
            raw = b"".join(got.iter_raw())
    assert zstandard.get_frame_parameters(raw).window_size <= 8 * 1024 * 1024


@pytest.mark.parametrize("http2", VERSIONS, ids=["h1", "h2"])
def test_head_has_the_fields_of_a_coded_get(setup: Setup, http2: bool) -> None:
    """HEAD gets the GET's coding, weak validators and no length, no body; the connection goes on in step."""
    with setup.proxy.client(http2=http2) as client:
        got = client.head(f"/json?rows={ROWS}", headers={"accept-encoding": "gzip"})
        after = client.get("/json?rows=2000", headers={"accept-encoding": "zstd"})
    assert (got.status_code, got.content) == (200, b"")
    assert got.headers["content-encoding"] == "gzip"
    assert got.headers["vary"] == "Accept-Encoding"
    assert "content-length" not in got.headers
    assert after.headers["content-encoding"] == "zstd"
    assert json.loads(after.content)[-1]["id"] == 1999

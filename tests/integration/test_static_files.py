"""Django's admin static files after a real `collectstatic`, served by the real `twist tlsproxy` (issue 15)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import APP_ENV, HERE, PKI, App, Proxy, gunicorn, start_proxy
from tests.integration.test_proxy_django import raw_get

pytestmark = pytest.mark.integration


@dataclass
class Setup:
    proxy: Proxy
    app: App
    root: Path
    media: Path
    css: str  # the hashed URL path of the admin's base.css

    def file(self, url_path: str) -> bytes:
        return (self.root / url_path.removeprefix("/static/")).read_bytes()


@pytest.fixture(scope="module")
def setup(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """collectstatic (ManifestStaticFilesStorage) into a tmp STATIC_ROOT, gunicorn, and tlsproxy serving it."""
    where = tmp_path_factory.mktemp("static")
    root, media = where / "staticfiles", where / "media"
    media.mkdir()
    env = {
        **os.environ,
        **APP_ENV,
        "DJANGO_SETTINGS_MODULE": "djangoapp.static_settings",
        "DJANGOAPP_STATIC_ROOT": str(root),
    }
    subprocess.run([sys.executable, "-m", "django", "collectstatic", "--noinput", "-v0"], env=env, cwd=HERE, check=True)
    manifest = json.loads((root / "staticfiles.json").read_text())
    css = "/static/" + manifest["paths"]["admin/css/base.css"]
    # A precompressed sibling, as whitenoise or `compress` would leave it.
    hashed = root / css.removeprefix("/static/")
    Path(f"{hashed}.gz").write_bytes(gzip.compress(hashed.read_bytes()))
    (root / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    (media / "upload.html").write_bytes(b"<script>alert(document.cookie)</script>")
    static = {"/static/": str(root), "/media/": {"root": str(media), "media": True}}
    # gunicorn runs the same settings, so its admin pages link the hashed files collectstatic wrote.
    settings = ("--env", "DJANGO_SETTINGS_MODULE=djangoapp.static_settings", "--env", f"DJANGOAPP_STATIC_ROOT={root}")
    with gunicorn("tcp", where, extra=settings) as app, start_proxy(where, app.url, pki, static=static) as proxy:
        yield Setup(proxy, app, root, media, css)


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
def test_admin_css_is_served_and_revalidated(setup: Setup, http2: bool) -> None:
    """The admin's hashed base.css comes back 200 text/css with the exact bytes, cached a year; then 304."""
    with setup.proxy.client(http2=http2) as client:
        first = client.get(setup.css, headers={"accept-encoding": "identity"})
        assert first.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert first.status_code == 200
        assert first.content == setup.file(setup.css)
        assert first.headers["content-type"] == "text/css; charset=utf-8"
        assert first.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert first.headers["strict-transport-security"] == "max-age=31536000; includeSubDomains"
        again = client.get(setup.css, headers={"if-none-match": first.headers["etag"], "accept-encoding": "identity"})
        assert (again.status_code, again.content) == (304, b"")
        since = client.get(
            setup.css, headers={"if-modified-since": first.headers["last-modified"], "accept-encoding": "identity"}
        )
        assert since.status_code == 304
        part = client.get(setup.css, headers={"range": "bytes=10-19", "accept-encoding": "identity"})
        assert part.status_code == 206
        assert part.content == setup.file(setup.css)[10:20]
        assert part.headers["content-range"] == f"bytes 10-19/{len(setup.file(setup.css))}"
        past = client.get(setup.css, headers={"range": "bytes=99999999-", "accept-encoding": "identity"})
        assert past.status_code == 416
    assert "/static/" not in setup.app.hits()


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
def test_head_has_the_length_and_no_body(setup: Setup, http2: bool) -> None:
    """HEAD answers 200 with the file's Content-Length and type, and no body."""
    with setup.proxy.client(http2=http2) as client:
        got = client.head(setup.css, headers={"accept-encoding": "identity"})
        after = client.get("/static/big.bin")  # the connection is still in step
    assert (got.status_code, got.content) == (200, b"")
    assert got.headers["content-length"] == str(len(setup.file(setup.css)))
    assert got.headers["content-type"] == "text/css; charset=utf-8"
    assert after.status_code == 200 and len(after.content) == 3 * 1024 * 1024


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
def test_a_large_file_streams_whole(setup: Setup, http2: bool) -> None:
    """A 3 MiB file (read in chunks in threads) arrives byte for byte over HTTP/1.1 and HTTP/2."""
    with setup.proxy.client(http2=http2) as client:
        got = client.get("/static/big.bin")
    assert got.status_code == 200
    assert hashlib.sha256(got.content).digest() == hashlib.sha256(setup.file("/static/big.bin")).digest()


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
def test_curl_compressed_decodes_to_the_same_bytes(setup: Setup, http2: bool) -> None:
    """curl --compressed gets the .gz sibling (Content-Encoding: gzip, Vary) and decodes it to the file."""
    proxy = setup.proxy
    url = f"{proxy.origin()}{setup.css}"
    argv = ["curl", "-sS", "--cacert", str(proxy.pki.ca_pem), "--compressed", "-D", "-", "-o", "-", url]
    argv.insert(1, "--http2" if http2 else "--http1.1")
    out = subprocess.run(argv, capture_output=True, check=True, timeout=30).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"content-encoding: gzip" in head.lower()
    assert b"vary: accept-encoding" in head.lower()
    assert body == setup.file(setup.css)


TRAVERSALS = [
    "/static/../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/%2E%2E/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
    "/static/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/static/..%5c..%5c..%5c..%5cetc%5cpasswd",
    "/static/..\\..\\..\\..\\etc\\passwd",
    "/static/%252e%252e/%252e%252e/%252e%252e/etc/passwd",
    "/static/..%252f..%252f..%252fetc%252fpasswd",
    "/static/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd",
    "/static/.%2e/.%2e/.%2e/.%2e/etc/passwd",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/admin/css/base.css%00.png",
    "/static/staticfiles.json%00",
    "/static/admin/../../../../etc/passwd",
    "/static/./../../../../etc/passwd",
    "/static/admin/",
    "/static/admin",
    "/static/.env",
    "/static/%2eenv",
    "/media/../staticfiles/staticfiles.json",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_traversals_are_refused(setup: Setup, path: str) -> None:
    """Every traversal encoding, sent as raw bytes, is 400 or 404 from tlsproxy and never leaks a file."""
    before = setup.app.hits()
    status, headers, body = raw_get(setup.proxy, path)
    assert status in (400, 404), (path, status)
    assert b"root:" not in body
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert setup.app.hits() == before  # answered by tlsproxy, not by Django


def test_uploaded_html_is_a_download(setup: Setup) -> None:
    """An HTML upload under a media prefix is application/octet-stream, attachment, nosniff."""
    status, headers, body = raw_get(setup.proxy, "/media/upload.html")
    assert status == 200
    assert body == (setup.media / "upload.html").read_bytes()
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"] == "attachment"
    assert headers["x-content-type-options"] == "nosniff"


def test_missing_static_file_is_ours_and_the_rest_goes_to_the_app(setup: Setup) -> None:
    """A missing file under /static/ is tlsproxy's 404 (the app never sees it); other paths still reach Django."""
    before = setup.app.hits()
    status, _, body = raw_get(setup.proxy, "/static/nope.css")
    assert status == 404 and b"no such file" in body
    assert setup.app.hits() == before
    status, _, _ = raw_get(setup.proxy, "/whoami")
    assert status == 200
    assert "/whoami" in setup.app.hits()


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
def test_every_file_of_the_admin_login_page_loads(setup: Setup, http2: bool) -> None:
    """The admin login page (from Django) links hashed CSS and JS that all come back 200 from tlsproxy, exact."""
    with setup.proxy.client(http2=http2) as client:
        page = client.get("/admin/login/")
        assert page.status_code == 200, page.text[:500]
        links = re.findall(r'(?:href|src)="(/static/[^"]+\.(?:css|js))"', page.text)
        assert f'"{setup.css}"' in page.text and len(links) >= 5
        for link in links:
            got = client.get(link, headers={"accept-encoding": "identity"})
            assert got.status_code == 200, link
            assert got.content == setup.file(link)
            kind = "text/css" if link.endswith(".css") else "text/javascript"
            assert got.headers["content-type"] == f"{kind}; charset=utf-8"
    assert "/admin/login/" in setup.app.hits()


def png_pixel(png: bytes, x: int, y: int) -> tuple[int, int, int]:
    """One pixel of a non-interlaced 8-bit RGB(A) PNG, as Chromium's screenshots are."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, data, width, channels = 8, b"", 0, 0
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, _, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, color in (2, 6), interlace) == (8, True, 0)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            data += body
        pos += 12 + length
    raw, stride, previous = zlib.decompress(data), width * channels, bytearray(width * channels)
    for row in range(y + 1):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        previous = line
    r, g, b = previous[x * channels : x * channels + 3]
    return r, g, b


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_chromium_shows_the_admin_login_styled(setup: Setup, tmp_path: Path) -> None:
    """Headless Chromium (HTTP/2) renders the login page with the admin's CSS: its header bar is Django's blue."""
    assert CHROMIUM is not None
    shot = tmp_path / "login.png"
    argv = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--ignore-certificate-errors", "--hide-scrollbars", "--force-prefers-reduced-motion",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=800,600",
        f"{setup.proxy.origin()}/admin/login/",
    ]  # fmt: skip
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run(argv, capture_output=True, env=env, timeout=90, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    # Unstyled, the page is white; Django's admin paints the login box's header #417690.
    # Three points of that header band, clear of its text, at an 800x600 window.
    pixels = [png_pixel(shot.read_bytes(), x, y) for x, y in ((215, 108), (585, 150), (400, 153))]
    assert all(abs(r - 0x41) < 12 and abs(g - 0x76) < 12 and abs(b - 0x90) < 12 for r, g, b in pixels), pixels

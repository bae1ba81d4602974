"""tlsproxy in front of a real Django app under real gunicorn, on TCP and on a unix socket (DESIGN 3, 4)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import (
    HSTS_VALUE,
    PKI,
    UPSTREAM_KINDS,
    App,
    Proxy,
    app_address,
    gunicorn,
    marker,
    start_proxy,
)
from tests.integration.djangoapp.pattern import digest

pytestmark = pytest.mark.integration

MB = 1024 * 1024


def raw_get(proxy: Proxy, path: str, host: str = "localhost", extra: bytes = b"") -> tuple[int, dict, bytes]:
    """A GET over a raw TLS connection with exactly these header bytes: (status, headers, body)."""
    authority = f"{host}:{proxy.port}"
    request = f"GET {path} HTTP/1.1\r\nHost: {authority}\r\n".encode() + extra + b"Connection: close\r\n\r\n"
    with proxy.raw(host) as conn:
        conn.send(request)
        reply = conn.read_response(timeout=10)
    status, headers, body = reply.parse()
    return status, {k.lower(): v for k, v in headers}, body


def whoami(proxy: Proxy, host: str = "localhost", extra: bytes = b"") -> dict:
    status, _, body = raw_get(proxy, "/whoami", host, extra)
    assert status == 200, body[:500]
    return json.loads(body)


def assert_forwarded_from_proxy(seen: dict, app: App, authority: str) -> None:
    """What Django must see for a direct client on 127.0.0.1 that reached us over TLS."""
    meta = seen["meta"]
    assert seen["is_secure"] is True
    assert seen["scheme"] == "https"
    assert seen["host"] == authority
    assert meta["HTTP_HOST"] == authority
    assert meta["HTTP_X_FORWARDED_PROTO"] == "https"
    assert meta["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
    assert meta["HTTP_X_FORWARDED_HOST"] == authority
    if app.kind == "tcp":
        assert seen["remote_addr"] == "127.0.0.1"
    assert "HTTP_X_FORWARDED_PROTOCOL" not in meta
    assert "HTTP_X_FORWARDED_SSL" not in meta


def test_app_answers_directly(app: App) -> None:
    """The fixture app itself serves /whoami over plain HTTP and, without the proxy, is not secure."""
    reply = app.get_directly("/whoami")
    assert b" 200 " in reply.split(b"\r\n", 1)[0]
    seen = json.loads(reply.partition(b"\r\n\r\n")[2])
    assert seen["is_secure"] is False
    assert "HTTP_X_FORWARDED_PROTO" not in seen["meta"]


@pytest.mark.parametrize("host", ["localhost", "app.test"])
def test_django_sees_https_client_and_original_host(proxy: Proxy, app: App, host: str) -> None:
    """Django sees is_secure(), the client's address in X-Forwarded-For, and the Host the client sent."""
    assert_forwarded_from_proxy(whoami(proxy, host), app, f"{host}:{proxy.port}")


def test_client_connection_close_is_honoured(proxy: Proxy) -> None:
    """After answering a request with "Connection: close" the proxy closes the connection."""
    request = f"GET /whoami HTTP/1.1\r\nHost: localhost:{proxy.port}\r\nConnection: close\r\n\r\n".encode()
    with proxy.raw() as conn:
        conn.send(request)
        response = conn.read_response(timeout=10)
        assert response.status == 200
        after = conn.read_until_closed(timeout=3)
    assert after.closed, "the connection stayed open after a Connection: close exchange"
    assert after.data == b""


SPOOFS = {
    "x-forwarded-proto": b"X-Forwarded-Proto: http\r\n",
    "underscore": b"X_Forwarded_Proto: http\r\n",
    "x-forwarded-for": b"X-Forwarded-For: 6.6.6.6\r\n",
    "x-forwarded-host": b"X-Forwarded-Host: evil.test\r\n",
    "x-forwarded-protocol": b"X-Forwarded-Protocol: http\r\n",
    "x-forwarded-ssl": b"X-Forwarded-Ssl: off\r\n",
    "all": b"X-Forwarded-Proto: http\r\nX_Forwarded_Proto: http\r\nX-Forwarded-For: 6.6.6.6\r\n"
    b"X-Forwarded-Host: evil.test\r\nX-Forwarded-Protocol: http\r\nX-Forwarded-Ssl: off\r\n",
}


@pytest.mark.parametrize("spoof", SPOOFS.values(), ids=SPOOFS.keys())
def test_client_forwarding_headers_never_reach_django(proxy: Proxy, app: App, spoof: bytes) -> None:
    """Client-sent forwarding and scheme headers (any spelling) change nothing and do not reach Django."""
    seen = whoami(proxy, "app.test", spoof)
    assert_forwarded_from_proxy(seen, app, f"app.test:{proxy.port}")
    values = " ".join(seen["meta"].values())
    assert "6.6.6.6" not in values
    assert "evil.test" not in values
    assert seen["remote_addr"] != "6.6.6.6"


@pytest.mark.parametrize(
    "connection",
    [
        b"Connection: X-Forwarded-Proto\r\n",
        b"Connection: keep-alive, X-Forwarded-For, X-Forwarded-Host\r\n",
        b"Connection: x-forwarded-proto\r\nConnection: X-Forwarded-For\r\n",
    ],
)
def test_connection_header_cannot_strip_proxy_headers(proxy: Proxy, app: App, connection: bytes) -> None:
    """A client's Connection header naming the forwarding headers cannot remove the proxy's own."""
    assert_forwarded_from_proxy(whoami(proxy, "localhost", connection), app, f"localhost:{proxy.port}")


def test_csrf_protected_form_post_succeeds(proxy: Proxy) -> None:
    """A CSRF-protected POST with the token, cookie, Origin and Referer passes Django's HTTPS checks."""
    origin = proxy.origin()
    with proxy.client() as client:
        page = client.get("/form")
        assert page.status_code == 200
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert token is not None
        cookie = page.cookies.get("csrftoken")
        assert cookie
        client.cookies.clear()
        headers = {"Origin": origin, "Referer": f"{origin}/form", "Cookie": f"csrftoken={cookie}"}
        posted = client.post("/form", data={"csrfmiddlewaretoken": token.group(1), "field": "hello"}, headers=headers)
        assert posted.status_code == 200, posted.text[:500]
        assert posted.text == "echo:hello"
        # The same POST without the token is refused, so the check above really ran.
        refused = client.post("/form", data={"field": "hello"}, headers=headers)
        assert refused.status_code == 403


def test_upload_32mb_arrives_intact(proxy: Proxy) -> None:
    """A 32 MB body with Content-Length reaches Django byte for byte."""
    body = os.urandom(32 * MB)
    with proxy.client() as client:
        response = client.post("/upload", content=body)
    assert response.status_code == 200, response.text[:500]
    got = response.json()
    assert got["length"] == len(body)
    assert got["sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_upload_arrives_intact(proxy: Proxy) -> None:
    """A chunked request body (no Content-Length) reaches Django byte for byte."""
    pieces = [os.urandom(MB) for _ in range(8)] + [os.urandom(12345)]

    def generate():
        yield from pieces

    with proxy.client() as client:
        response = client.post("/upload", content=generate())
    assert response.status_code == 200, response.text[:500]
    got = response.json()
    assert got["length"] == sum(len(p) for p in pieces)
    assert got["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()


@pytest.mark.parametrize("path", ["/download", "/download-fixed"])
def test_download_32mb_arrives_intact(proxy: Proxy, path: str) -> None:
    """A 32 MB response, streamed or with Content-Length, reaches the client byte for byte."""
    size = 32 * MB
    h = hashlib.sha256()
    length = 0
    with proxy.client() as client, client.stream("GET", f"{path}?size={size}") as response:
        assert response.status_code == 200
        if path == "/download-fixed":
            assert response.headers["content-length"] == str(size)
        for chunk in response.iter_raw():
            h.update(chunk)
            length += len(chunk)
    assert length == size
    assert h.hexdigest() == digest(size)


def test_body_over_max_body_size_gets_413(proxy: Proxy, app: App) -> None:
    """A 65 MB upload with Content-Length gets 413 from the proxy, never reaches Django, and harms no one."""
    m = marker()
    with proxy.client() as client:
        response = client.post(f"/upload?m={m}", content=b"x" * (65 * MB))
    assert response.status_code == 413
    assert "Traceback" not in response.text
    with proxy.client() as client:
        assert client.get("/whoami").status_code == 200
    assert m not in app.hits()


def test_hsts_added_exactly_once(proxy: Proxy) -> None:
    """Normal responses carry the configured HSTS value exactly once."""
    with proxy.client() as client:
        for path in ("/whoami", "/form", "/no-such-page"):
            response = client.get(path)
            assert response.headers.get_list("strict-transport-security") == [HSTS_VALUE], path


def test_app_hsts_is_kept(proxy: Proxy) -> None:
    """When the app sets its own Strict-Transport-Security, the proxy keeps it and adds none."""
    with proxy.client() as client:
        response = client.get("/own-hsts")
    assert response.status_code == 200
    assert response.headers.get_list("strict-transport-security") == ["max-age=60"]


def test_set_cookie_gets_secure(proxy: Proxy) -> None:
    """A Set-Cookie without Secure gets Secure added; its other attributes stay."""
    with proxy.client() as client:
        response = client.get("/cookie")
    assert response.status_code == 200
    cookies = response.headers.get_list("set-cookie")
    assert len(cookies) == 1
    attributes = [part.strip().lower() for part in cookies[0].split(";")]
    assert attributes[0] == "flavour=oat"
    assert attributes.count("secure") == 1
    assert "httponly" in attributes
    assert "samesite=lax" in attributes


def test_http2_works_the_same(proxy: Proxy, app: App) -> None:
    """Over ALPN h2 the response is HTTP/2 and Django sees the same secure, forwarded request."""
    with proxy.client(http2=True) as client:
        response = client.get("/whoami")
        assert response.http_version == "HTTP/2"
        assert response.status_code == 200
        assert response.headers.get_list("strict-transport-security") == [HSTS_VALUE]
        seen = response.json()
        assert_forwarded_from_proxy(seen, app, f"localhost:{proxy.port}")
        assert not any(k.startswith("HTTP_:") for k in seen["meta"])
        again = client.get("/download-fixed?size=1000000")
        assert again.http_version == "HTTP/2"
        assert hashlib.sha256(again.content).hexdigest() == digest(1000000)


def test_slow_upstream_gets_504(proxy: Proxy) -> None:
    """An app slower than upstream_timeout = 2 gets a clean 504 after those 2 seconds, not the app's 6."""
    with proxy.client() as client:
        assert client.get("/whoami").status_code == 200  # the handshake, outside the timing
        start = time.monotonic()
        response = client.get("/slow?seconds=6")
        elapsed = time.monotonic() - start
        assert response.status_code == 504
        assert 1.9 <= elapsed < 5, elapsed  # the timeout (plus at most a 0.25 s deadline tick), not the app
        assert "Traceback" not in response.text
    with proxy.client() as client:
        assert client.get("/whoami").status_code == 200


@pytest.mark.parametrize("kind", UPSTREAM_KINDS)
def test_upstream_down_gets_502_then_recovers(kind: str, pki, tmp_path: Path) -> None:
    """With nothing listening upstream every request gets a short clean 502; once the app starts, 200."""
    address = app_address(kind, tmp_path)
    with start_proxy(tmp_path, address[1], pki) as proxy:
        with proxy.client() as client:
            for _ in range(2):
                response = client.get("/whoami")
                assert response.status_code == 502
                assert response.headers["content-type"].split(";")[0] in ("text/html", "text/plain")
                assert "Traceback" not in response.text
                assert len(response.content) < 4096
        with gunicorn(kind, tmp_path, address=address), proxy.client() as client:
            assert client.get("/whoami").status_code == 200


@pytest.mark.parametrize("kind", UPSTREAM_KINDS)
def test_idle_upstream_keepalive_closed_is_retried(kind: str, pki, tmp_path: Path) -> None:
    """gunicorn closing an idle keep-alive connection (gthread, --keep-alive 1) never turns into a 502."""
    extra = ("--threads", "4", "--keep-alive", "1")
    with gunicorn(kind, tmp_path, worker_class="gthread", extra=extra) as app:
        with start_proxy(tmp_path, app.url, pki) as proxy, proxy.client() as client:
            first = client.get("/whoami")
            assert first.status_code == 200
            time.sleep(3)
            second = client.get("/whoami")
            assert second.status_code == 200, second.text[:500]
            with proxy.client() as other:
                assert other.get("/whoami").status_code == 200


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_redirect_from_name_goes_to_the_canonical_name(app: App, pki: PKI, tmp_path: Path, version: str) -> None:
    """A redirect_from name answers 301 to the site's first host, port, path and query kept; the app never sees it."""
    with start_proxy(tmp_path, app.url, pki, hosts=["localhost"], redirect_from=["app.test"]) as proxy:
        url = f"https://app.test:{proxy.port}/whoami?x=1&y=2"
        out = subprocess.run(
            ["curl", "-sS", version, "--cacert", str(pki.ca_pem), "--resolve", f"app.test:{proxy.port}:127.0.0.1",
             "-o", "/dev/null", "-w", "%{http_code} %{redirect_url} %{http_version}", url],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        assert out == f"301 https://localhost:{proxy.port}/whoami?x=1&y=2 {version[6:]}"
        followed = subprocess.run(
            ["curl", "-sS", version, "--cacert", str(pki.ca_pem), "--resolve", f"app.test:{proxy.port}:127.0.0.1",
             "-L", url],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        assert json.loads(followed)["host"] == f"localhost:{proxy.port}"

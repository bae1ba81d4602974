"""WebSocket over wss through tlsproxy to an ASGI app under uvicorn."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.integration.conftest import PKI, App, Proxy, start_proxy, uvicorn
from tests.integration.procs import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def asgi_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """The ASGI app (WebSocket echo, Django for HTTP) under uvicorn on TCP."""
    with uvicorn(tmp_path_factory.mktemp("asgi")) as app:
        yield app


@pytest.fixture(scope="module")
def ws_proxy(asgi_app: App, pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    with start_proxy(tmp_path_factory.mktemp("ws-proxy"), asgi_app.url, pki) as proxy:
        yield proxy


def test_websocket_echo_over_wss(ws_proxy: Proxy) -> None:
    """A wss client's text and binary messages come back echoed through the proxy."""
    uri = f"wss://localhost:{ws_proxy.port}/echo"
    with connect(uri, ssl=ws_proxy.pki.client_context(), open_timeout=10, close_timeout=5, proxy=None) as ws:
        ws.send("hello through tlsproxy")
        assert ws.recv(timeout=10) == "hello through tlsproxy"
        ws.send(b"\x00\x01binary\xff")
        assert ws.recv(timeout=10) == b"\x00\x01binary\xff"
        big = "x" * 300_000
        ws.send(big)
        assert ws.recv(timeout=10) == big


def test_websocket_handshake_is_forwarded_as_https(ws_proxy: Proxy) -> None:
    """The app sees the WebSocket handshake with the client's Host and X-Forwarded-Proto https."""
    uri = f"wss://localhost:{ws_proxy.port}/echo"
    extra = {"X-Forwarded-Proto": "http", "X-Forwarded-For": "6.6.6.6"}
    with connect(uri, ssl=ws_proxy.pki.client_context(), open_timeout=10, additional_headers=extra, proxy=None) as ws:
        ws.send("headers")
        headers = json.loads(ws.recv(timeout=10))
    assert headers["host"] == f"localhost:{ws_proxy.port}"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-for"] == "127.0.0.1"


def test_plain_http_still_works_beside_websocket(ws_proxy: Proxy) -> None:
    """Ordinary HTTP requests through the same proxy reach Django under uvicorn, seen as secure."""
    with ws_proxy.client() as client:
        response = client.get("/whoami")
    assert response.status_code == 200
    assert response.json()["is_secure"] is True


def test_websocket_through_a_path_route(asgi_app: App, pki: PKI, tmp_path: Path) -> None:
    """[site.routes] "/ws/" sends WebSockets and HTTP under it to uvicorn, path unchanged; the rest to the site."""
    nobody = f"http://127.0.0.1:{free_port()}"  # the site's own upstream: nothing listens there
    with start_proxy(tmp_path, nobody, pki, routes={"/ws/": asgi_app.url}) as proxy:
        uri = f"wss://localhost:{proxy.port}/ws/echo"
        with connect(uri, ssl=proxy.pki.client_context(), open_timeout=10, close_timeout=5, proxy=None) as ws:
            ws.send("through the route")
            assert ws.recv(timeout=10) == "through the route"
        with proxy.client() as client:
            routed = client.get("/ws/whoami")
            rest = client.get("/whoami")
    assert routed.status_code == 404  # Django under uvicorn answered: it has no /ws/whoami (path unchanged)
    assert rest.status_code == 502  # the site's own app is down


def test_websocket_with_a_browsers_accept_encoding(ws_proxy: Proxy) -> None:
    """A handshake that carries Chrome's Accept-Encoding (the compressing path) still becomes a clean tunnel."""
    uri = f"wss://localhost:{ws_proxy.port}/echo"
    extra = {"Accept-Encoding": "gzip, deflate, br, zstd"}
    with connect(uri, ssl=ws_proxy.pki.client_context(), open_timeout=10, additional_headers=extra, proxy=None) as ws:
        big = "y" * 200_000  # text a compressor would shrink: it must arrive as sent
        ws.send(big)
        assert ws.recv(timeout=10) == big
        ws.send(b"\x1f\x8b not gzip")
        assert ws.recv(timeout=10) == b"\x1f\x8b not gzip"

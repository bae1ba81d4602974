"""Ambiguous or oversized HTTP/1.1 requests are refused by the proxy itself and never reach Django.

Each request is written byte for byte on a raw TLS socket; a smuggled second request, where the
framing would allow one, carries the same marker so that neither reaching the app goes unseen.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import PKI, App, Proxy, marker, start_proxy
from tests.integration.procs import free_port

pytestmark = pytest.mark.integration


def _smuggled(host: str, m: str) -> bytes:
    return f"GET /whoami?smuggled={m} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def bad_requests(host: str, m: str) -> dict[str, bytes]:
    """The 400 cases: name -> exact bytes. ``host`` is the authority, ``m`` the marker."""
    path = f"/whoami?m={m}"
    smuggled = _smuggled(host, m)
    return {
        "content-length-and-chunked": (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {5 + len(smuggled)}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ).encode()
        + smuggled,
        "two-content-lengths": (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
        ).encode(),
        "content-length-plus": (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: +5\r\n\r\nhello").encode(),
        "content-length-negative": (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: -1\r\n\r\n").encode(),
        "chunked-on-http10": (
            f"POST {path} HTTP/1.0\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ).encode(),
        "missing-host": f"GET {path} HTTP/1.1\r\nAccept: */*\r\n\r\n".encode(),
        "two-hosts": f"GET {path} HTTP/1.1\r\nHost: {host}\r\nHost: evil.test\r\n\r\n".encode(),
        "obs-fold": f"GET {path} HTTP/1.1\r\nHost: {host}\r\nX-Folded: one\r\n two\r\n\r\n".encode(),
        "bare-lf": f"GET {path} HTTP/1.1\r\nHost: {host}\nX-After-Bare-Lf: yes\r\n\r\n".encode(),
    }


CASES = list(bad_requests("h", "m"))


def assert_fresh_connection_works(proxy: Proxy) -> None:
    request = f"GET /whoami HTTP/1.1\r\nHost: localhost:{proxy.port}\r\nConnection: close\r\n\r\n".encode()
    with proxy.raw() as conn:
        conn.send(request)
        reply = conn.read_response(timeout=10)
    status, _, body = reply.parse()
    assert status == 200, reply.data[:300]
    assert json.loads(body)["is_secure"] is True


@pytest.mark.parametrize("case", CASES)
def test_ambiguous_request_gets_400_and_close(proxy: Proxy, app: App, case: str) -> None:
    """An ambiguous request gets the proxy's 400, the connection closes, and nothing reaches Django."""
    m = marker()
    request = bad_requests(f"localhost:{proxy.port}", m)[case]
    with proxy.raw() as conn:
        reply = conn.exchange(request, timeout=5)
    assert reply.status_line.startswith("HTTP/1.1 400"), reply.data[:300]
    assert not reply.from_gunicorn, "gunicorn answered: the proxy passed the request on"
    assert reply.closed, "the connection stayed open after the 400"
    assert m not in app.hits()
    assert_fresh_connection_works(proxy)


def test_header_line_over_16k_gets_431_promptly(proxy: Proxy, app: App) -> None:
    """A header line over 16 KB gets 431 as soon as it is seen, not after a timeout, and is not forwarded."""
    m = marker()
    head = f"GET /whoami?m={m} HTTP/1.1\r\nHost: localhost:{proxy.port}\r\n".encode()
    big = b"X-Big: " + b"a" * (16 * 1024 + 1024) + b"\r\n"
    with proxy.raw() as conn:
        # The head is left unfinished on purpose: the proxy must not wait for its end.
        conn.send(head + big)
        reply = conn.read_response(timeout=6)
    assert reply.status_line.startswith("HTTP/1.1 431"), (reply.elapsed, reply.data[:300])
    assert reply.elapsed < 6  # promptly: header_timeout (10 s by default) is what a stall would take
    assert not reply.from_gunicorn
    assert m not in app.hits()
    assert_fresh_connection_works(proxy)


def test_more_than_100_headers_gets_431(proxy: Proxy, app: App) -> None:
    """A request with more than 100 header fields gets 431 and is not forwarded."""
    m = marker()
    fields = "".join(f"X-H{i}: {i}\r\n" for i in range(100))
    request = f"GET /whoami?m={m} HTTP/1.1\r\nHost: localhost:{proxy.port}\r\n{fields}\r\n".encode()
    with proxy.raw() as conn:
        reply = conn.exchange(request, timeout=5)
    assert reply.status_line.startswith("HTTP/1.1 431"), reply.data[:300]
    assert not reply.from_gunicorn
    assert m not in app.hits()
    assert_fresh_connection_works(proxy)


def test_request_line_over_8k_gets_414(proxy: Proxy, app: App) -> None:
    """A request line over 8 KB gets 414 and is not forwarded."""
    m = marker()
    request = f"GET /whoami?m={m}&pad={'a' * 8300} HTTP/1.1\r\nHost: localhost:{proxy.port}\r\n\r\n".encode()
    with proxy.raw() as conn:
        reply = conn.exchange(request, timeout=5)
    assert reply.status_line.startswith("HTTP/1.1 414"), reply.data[:300]
    assert not reply.from_gunicorn
    assert m not in app.hits()
    assert_fresh_connection_works(proxy)


def test_well_formed_keepalive_requests_pass(proxy: Proxy, app: App) -> None:
    """Two well-formed requests on one connection (one with a body) both reach Django: the 400s are not blanket."""
    m = marker()
    host = f"localhost:{proxy.port}"
    first = f"POST /upload?m={m} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\nhello".encode()
    second = f"GET /whoami?m={m}&n=2 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with proxy.raw() as conn:
        conn.send(first)
        one = conn.read_response(timeout=10)
        conn.send(second)
        two = conn.read_response(timeout=10)
    assert one.status == 200, one.data[:300]
    assert json.loads(one.parse()[2])["length"] == 5
    assert two.status == 200, two.data[:300]
    hits = app.hits()
    assert f"/upload?m={m}" in hits
    assert f"/whoami?m={m}&n=2" in hits


def test_300k_header_block_reads_431_every_time(proxy: Proxy, app: App) -> None:
    """A client still sending a 300 KB header block is not reset and reads the 431, 10 times out of 10."""
    m = marker()
    head = f"GET /whoami?m={m} HTTP/1.1\r\nHost: localhost:{proxy.port}\r\n".encode()
    fields = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(300))
    request = head + fields + b"\r\n"
    outcomes = []
    for _ in range(10):
        with proxy.raw() as conn:
            outcome = "sent"
            try:
                # Paced as a network would deliver it, so the client is still
                # sending when the proxy has answered.
                for i in range(0, len(request), 16384):
                    conn.send(request[i : i + 16384])
                    time.sleep(0.01)
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as e:
                outcome = f"reset while sending ({e!r})"
            reply = conn.read_response(timeout=10)
        outcomes.append((outcome, reply.status, reply.reset))
    assert outcomes == [("sent", 431, False)] * 10
    assert m not in app.hits()


@pytest.fixture(scope="module")
def short_body_proxy(app: App, pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """tlsproxy with body_timeout = 1, in front of the module's gunicorn."""
    with start_proxy(tmp_path_factory.mktemp("body-proxy"), app.url, pki, server={"body_timeout": 1}) as proxy:
        yield proxy


def test_stalled_body_gets_408_and_close(short_body_proxy: Proxy, app: App) -> None:
    """A request body that stops arriving is answered 408 and closed after body_timeout, not held."""
    m = marker()
    head = f"POST /upload?m={m} HTTP/1.1\r\nHost: localhost:{short_body_proxy.port}\r\nContent-Length: 100\r\n\r\n"
    with short_body_proxy.raw() as conn:
        conn.send(head.encode() + b"only ten b")
        reply = conn.read_until_closed(timeout=8)
    assert reply.status_line.startswith("HTTP/1.1 408"), (reply.elapsed, reply.data[:300])
    assert reply.closed and reply.elapsed < 5


def test_bad_chunk_size_after_dispatch_gets_400_and_close(short_body_proxy: Proxy, app: App) -> None:
    """A malformed chunk-size line after the request went to the handler is answered 400 and the connection closes."""
    m = marker()
    head = (
        f"POST /upload?m={m} HTTP/1.1\r\nHost: localhost:{short_body_proxy.port}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    with short_body_proxy.raw() as conn:
        conn.send(head.encode())
        time.sleep(0.2)  # the head and first chunk are taken before the bad line comes
        conn.send(b"zz\r\n")
        reply = conn.read_until_closed(timeout=8)
    assert reply.status_line.startswith("HTTP/1.1 400"), (reply.elapsed, reply.data[:300])
    assert reply.closed and reply.elapsed < 3


def test_plain_port_refusal_ends_at_once_for_the_client(app: App, pki: PKI, tmp_path: Path) -> None:
    """On the plain HTTP port a refused request's answer is followed by the end of the stream at once (half-close)."""
    http_port = free_port()
    server = {"http": [f"tcp:{http_port}:interface=127.0.0.1"]}
    with start_proxy(tmp_path, app.url, pki, server=server):
        with socket.create_connection(("127.0.0.1", http_port), timeout=5) as sock:
            start = time.monotonic()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            elapsed = time.monotonic() - start
    assert data.startswith(b"HTTP/1.1 400 "), data[:200]
    assert elapsed < 0.9  # not the second of quiet lingering waits for before closing

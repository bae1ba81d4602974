"""PROXY protocol on real listeners: a test client and Debian's HAProxy in front of `twist tlsproxy` and Django."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import PKI, App, gunicorn, proxy_config
from tests.integration.procs import Process, free_port, running, tlsproxy, wait_for_port

pytestmark = pytest.mark.integration

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
TRUSTED = "127.0.0.1"  # the test client and HAProxy connect from here
UNTRUSTED = "127.0.0.2"  # any 127/8 address is this machine; this one is not in trusted_proxies


def v1(src: str, sport: int = 40000) -> bytes:
    return b"PROXY TCP4 %s 127.0.0.1 %d 443\r\n" % (src.encode(), sport)


def v2(src: str, sport: int = 40000) -> bytes:
    payload = socket.inet_aton(src) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", sport, 443)
    payload += struct.pack("!BH", 0x05, 4) + b"abcd"  # a TLV (unique id), to be skipped
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(payload)) + payload


class Setup:
    def __init__(self, https: int, http: int, pki: PKI, process: Process, app: App) -> None:
        self.https, self.http, self.pki, self.process, self.app = https, http, pki, process, app

    def connect(self, port: int, source: str = TRUSTED) -> socket.socket:
        s = socket.socket()
        s.settimeout(5)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        return s

    def get(self, header: bytes = b"", source: str = TRUSTED, port: int | None = None, path: str = "/whoami") -> bytes:
        """One HTTPS GET, after ``header`` in clear (as a balancer sends it); the whole reply."""
        s = self.connect(port or self.https, source)
        s.sendall(header)
        tls = self.pki.client_context().wrap_socket(s, server_hostname="localhost")
        with tls:
            tls.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            return read_all(tls)


def read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = s.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            return out
        if not data:
            return out
        out += data


def whoami(reply: bytes) -> dict:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply[:300]
    return json.loads(body)


@pytest.fixture(scope="module")
def setup(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    where = tmp_path_factory.mktemp("proxyproto")
    with gunicorn("tcp", where) as app:
        https, http = free_port(), free_port()
        state = where / "state"
        state.mkdir(mode=0o700)
        server = {
            "https": [f"haproxy:tcp:{https}:interface=127.0.0.1"],
            "http": [f"haproxy:tcp:{http}:interface=127.0.0.1"],
            "trusted_proxies": [f"{TRUSTED}/32"],
            "handshake_timeout": 3,
        }
        config = where / "tlsproxy.toml"
        config.write_text(proxy_config(https, app.url, pki, state, server=server))
        with tlsproxy(config) as process:
            yield Setup(https, http, pki, process, app)


@pytest.mark.parametrize("header", [v1, v2])
def test_client_address_from_the_header_reaches_django(setup: Setup, header) -> None:  # type: ignore[no-untyped-def]
    """The address a trusted balancer's v1 or v2 header carries is Django's X-Forwarded-For."""
    seen = whoami(setup.get(header("203.0.113.7")))
    assert seen["x_forwarded_for"] == "203.0.113.7"
    assert seen["remote_addr"] == "127.0.0.1"  # the proxy itself: the client is in X-Forwarded-For
    assert seen["meta"]["HTTP_X_FORWARDED_PORT"] == "443"  # the balancer's port, from the header


def test_untrusted_direct_client_keeps_its_own_address(setup: Setup) -> None:
    """A peer outside trusted_proxies that sends no header is served as a direct client."""
    assert whoami(setup.get(source=UNTRUSTED))["x_forwarded_for"] == UNTRUSTED


@pytest.mark.parametrize(
    ("header", "source"),
    [
        (v1("203.0.113.7"), UNTRUSTED),  # an untrusted peer may not choose its address
        (v2("203.0.113.7"), UNTRUSTED),
        (b"PROXY TCP4 203.0.113.999 127.0.0.1 1 443\r\n", TRUSTED),  # malformed
        (V2_SIGNATURE + b"\x21\x11\xff\xff", TRUSTED),  # a v2 length over our bound
        (b"PROXY " + b"x" * 200, TRUSTED),  # no end within 107 bytes
    ],
)
def test_refused_fast_without_a_traceback(setup: Setup, header: bytes, source: str) -> None:
    """Bad or unwelcome headers close the connection at once; the log shows no traceback."""
    s = setup.connect(setup.https, source)
    started = time.monotonic()
    s.sendall(header)
    with s:
        assert read_all(s) == b""
    assert time.monotonic() - started < 1.5
    assert "Traceback" not in setup.process.output


def test_trusted_peer_without_header_is_refused(setup: Setup) -> None:
    """A trusted balancer's connection must start with a header: a bare TLS handshake is cut off."""
    with pytest.raises((ssl.SSLError, OSError)):
        setup.get(b"", source=TRUSTED)


def test_port_80_listener_reads_the_header_too(setup: Setup) -> None:
    """The plain HTTP listener takes the header from a trusted peer and refuses it (or its absence) otherwise."""
    request = b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    for header, source, answered in [
        (v2("198.51.100.23"), TRUSTED, True),
        (b"", TRUSTED, False),
        (v1("198.51.100.23"), UNTRUSTED, False),
        (b"", UNTRUSTED, True),
    ]:
        s = setup.connect(setup.http, source)
        with s:
            s.sendall(header + request)
            reply = read_all(s)
        assert reply.startswith(b"HTTP/1.1 301") == answered, (header, source, reply[:200])
        assert answered or reply == b""


HAPROXY_CFG = """\
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend v1
    bind 127.0.0.1:{v1_port}
    default_backend tlsproxy_v1
frontend v2
    bind 127.0.0.1:{v2_port}
    default_backend tlsproxy_v2
backend tlsproxy_v1
    server tlsproxy 127.0.0.1:{https} send-proxy
backend tlsproxy_v2
    server tlsproxy 127.0.0.1:{https} send-proxy-v2
"""


@pytest.fixture(scope="module")
def haproxy(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    binary = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if binary is None:
        pytest.skip("haproxy is not installed (scripts/test.sh installs it)")
    v1_port, v2_port = free_port(), free_port()
    cfg = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(v1_port=v1_port, v2_port=v2_port, https=setup.https))
    with running([binary, "-db", "-f", str(cfg)]):
        wait_for_port(v1_port)
        wait_for_port(v2_port)
        yield v1_port, v2_port


@pytest.mark.parametrize("which", [0, 1], ids=["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front(setup: Setup, haproxy: tuple[int, int], which: int) -> None:
    """Through HAProxy (send-proxy and send-proxy-v2), Django sees the client HAProxy saw."""
    client = "127.0.0.3"  # not trusted itself: only HAProxy (127.0.0.1) is
    seen = whoami(setup.get(source=client, port=haproxy[which]))
    assert seen["x_forwarded_for"] == client


def test_unknown_client_is_not_the_trusted_balancer(setup: Setup) -> None:
    """PROXY UNKNOWN: Django sees "unknown", and a forged X-Forwarded-For is dropped, not believed."""
    s = setup.connect(setup.https)
    s.sendall(b"PROXY UNKNOWN\r\n")
    with setup.pki.client_context().wrap_socket(s, server_hostname="localhost") as tls:
        tls.sendall(b"GET /whoami HTTP/1.0\r\nHost: localhost\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
        seen = whoami(read_all(tls))
    assert seen["x_forwarded_for"] == "unknown"

"""The command line's probes (tlsproxy.acme.selfcheck) against real sockets: served, otherwise, nobody, too slow.

Small servers in threads stand in for a proxy, including misbehaving ones that tlsproxy
itself never is; the real proxy is asked in test_acme_e2e.py.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.integration.procs import free_port
from tlsproxy.acme.alpn01 import challenge_certificate
from tlsproxy.acme.selfcheck import Answer, ListenerCheck, Unreachable, alpn01_served, http01_served

pytestmark = pytest.mark.integration

TOKEN = "tok-probe_1"
KEYAUTH = "tok-probe_1.thumbprint"
HOST = "probe.example"


@contextlib.contextmanager
def serving(handle: Callable[[socket.socket], None]) -> Iterator[tuple[str, int]]:
    """A TCP server on loopback calling ``handle`` for each connection, in threads."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def loop() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=_run, args=(handle, conn), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[:2]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _run(handle: Callable[[socket.socket], None], conn: socket.socket) -> None:
    with conn:
        try:
            handle(conn)
        except OSError:
            pass


def http_answer(status: str, body: bytes) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        assert request.startswith(f"GET /.well-known/acme-challenge/{TOKEN} HTTP/1.1\r\n".encode())
        assert f"\r\nHost: {HOST}\r\n".encode() in request
        conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)

    return handle


@pytest.mark.parametrize(
    ("status", "body", "served"),
    [
        ("200 OK", KEYAUTH.encode(), True),
        ("200 OK", KEYAUTH.encode() + b"\n", True),  # trailing whitespace is trimmed, as CAs do
        ("200 OK", b" " + KEYAUTH.encode(), False),
        ("200 OK", b"tok-probe_1.other", False),
        ("404 Not Found", KEYAUTH.encode(), False),
    ],
)
def test_http01_probe(status: str, body: bytes, served: bool) -> None:
    with serving(http_answer(status, body)) as address:
        assert http01_served(address, HOST, TOKEN, KEYAUTH) is served


def test_nobody_listening_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(Unreachable, match="refused"):
        http01_served(("127.0.0.1", free_port()), HOST, TOKEN, KEYAUTH)
    with pytest.raises(Unreachable):
        alpn01_served(str(tmp_path / "no.sock"), HOST, KEYAUTH)


def test_a_dripping_peer_cannot_hold_the_probe() -> None:
    """One byte every 0.3 s never times a single recv out; the probe's own deadline ends it."""
    stop = threading.Event()

    def drip(conn: socket.socket) -> None:
        conn.recv(4096)
        while not stop.is_set():
            conn.sendall(b"H")
            stop.wait(0.3)

    with serving(drip) as address:
        start = time.monotonic()
        try:
            assert http01_served(address, HOST, TOKEN, KEYAUTH, timeout=1.0) is False
        finally:
            stop.set()
        assert time.monotonic() - start < 2.0


def test_http01_probe_on_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "http.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        _run(http_answer("200 OK", KEYAUTH.encode()), conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert http01_served(str(path), HOST, TOKEN, KEYAUTH) is True
    finally:
        thread.join(5)
        listener.close()


def tls_server(tmp_path: Path, host: str, keyauth: str, alpn: list[str] | None) -> Callable[[socket.socket], None]:
    """A TLS responder serving the challenge certificate for ``host``/``keyauth`` to every handshake."""
    cert, key = challenge_certificate(host, keyauth)
    cert_path, key_path = tmp_path / f"{host}.pem", tmp_path / f"{host}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    if alpn is not None:
        context.set_alpn_protocols(alpn)

    def handle(conn: socket.socket) -> None:
        conn.settimeout(5)
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)  # the client closes after the handshake

    return handle


@pytest.mark.parametrize(
    ("served_host", "served_keyauth", "alpn", "served"),
    [
        (HOST, KEYAUTH, ["acme-tls/1"], True),
        (HOST, "tok-probe_1.other", ["acme-tls/1"], False),  # another answer's digest
        ("other.example", KEYAUTH, ["acme-tls/1"], False),  # a certificate for another name
        (HOST, KEYAUTH, None, False),  # acme-tls/1 not chosen
    ],
)
def test_alpn01_probe(
    tmp_path: Path, served_host: str, served_keyauth: str, alpn: list[str] | None, served: bool
) -> None:
    with serving(tls_server(tmp_path, served_host, served_keyauth, alpn)) as address:
        assert alpn01_served(address, HOST, KEYAUTH) is served


def test_alpn01_probe_refused_handshake_is_not_served() -> None:
    """A peer that cuts the handshake (as the proxy does for a name with no answer) is False, not an error."""

    def cut(conn: socket.socket) -> None:
        conn.recv(4096)

    with serving(cut) as address:
        assert alpn01_served(address, HOST, KEYAUTH) is False


def test_listener_check_combines_listeners(tmp_path: Path) -> None:
    answer = Answer("http-01", HOST, TOKEN, KEYAUTH)
    nobody = f"tcp:{free_port()}:interface=127.0.0.1"
    with (
        serving(http_answer("200 OK", KEYAUTH.encode())) as (_, good),
        serving(http_answer("404 Not Found", b"")) as (
            _,
            stale,
        ),
    ):
        check = ListenerCheck([nobody, f"tcp:{good}:interface=127.0.0.1"], [])
        assert check(answer) is True and check.last_error == ""
        check = ListenerCheck([nobody, f"tcp:{stale}:interface=127.0.0.1"], [])
        assert check(answer) is False and check.last_error == f"127.0.0.1:{stale} does not serve it yet"
    check = ListenerCheck([nobody], ["systemd:domain=INET6:index=0"])
    assert check(answer) is None and "refused" in check.last_error.lower()
    assert check(Answer("tls-alpn-01", HOST, TOKEN, KEYAUTH)) is None
    assert check.last_error == "no https listener address to ask"

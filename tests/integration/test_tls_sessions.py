"""Against `twist tlsproxy`: which site a TLS connection may serve, which sessions it resumes, plain HTTP."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme
from OpenSSL import SSL

from tests.integration.procs import free_port, running, tlsproxy
from tests.integration.test_tls_listener import Proxy, _write_leaf, proxy  # noqa: F401 (the fixture)
from tlsproxy.compat.openssl import lib as _lib

pytestmark = pytest.mark.integration


def request(port: int, server_name: str, host: str, *args: str) -> str:
    """One HTTP/1.1 GET over openssl s_client; everything s_client printed."""
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", server_name, "-ign_eof", *args],
        input=f"GET /index.html HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        capture_output=True,
        text=True,
        timeout=20,
    )
    return result.stdout


def test_host_of_another_certificate_is_421(proxy: Proxy) -> None:
    """SNI one.test with Host two.test (a certificate of its own) is answered 421, not by two.test's app."""
    out = request(proxy.https, "one.test", "two.test")
    assert "HTTP/1.1 421 Misdirected Request" in out, out
    assert "hello from the backend" not in out


def test_other_name_of_the_same_certificate_is_served(proxy: Proxy) -> None:
    """SNI one.test with Host www.one.test (same certificate) is served: coalescing keeps working."""
    out = request(proxy.https, "one.test", "www.one.test:443")
    assert "HTTP/1.1 200" in out, out
    assert "hello from the backend" in out


def test_h2_authority_of_another_certificate_is_421(proxy: Proxy) -> None:
    """Over HTTP/2 an :authority the connection's certificate does not cover is 421 too."""
    result = subprocess.run(
        ["curl", "-sS", "--http2", "--cacert", str(proxy.ca), "--resolve", f"one.test:{proxy.https}:127.0.0.1",
         "-H", "Host: two.test", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
         f"https://one.test:{proxy.https}/index.html"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.stdout == "2 421", (result.stdout, result.stderr)


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_session_of_one_site_never_serves_another(proxy: Proxy, version: str, tmp_path: Path) -> None:
    """A session made for one.test, offered under SNI two.test, is not resumed there."""
    session = tmp_path / "session.pem"
    first = request(proxy.https, "one.test", "one.test", version, "-sess_out", str(session))
    assert "New, TLS" in first and "HTTP/1.1 200" in first, first
    again = request(proxy.https, "one.test", "one.test", version, "-sess_in", str(session))
    assert "Reused, TLS" in again, again  # the session itself is good
    other = request(proxy.https, "two.test", "two.test", version, "-sess_in", str(session))
    assert "Reused, TLS" not in other, other
    assert "HTTP/1.1 200" in other, other


def test_plain_http_to_the_https_port(proxy: Proxy) -> None:
    """curl http:// to the HTTPS port gets a 400 page saying to use https://, not an empty reply."""
    result = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", f"http://127.0.0.1:{proxy.https}/"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n400"), result.stdout
    assert "plain HTTP request was sent to the HTTPS port" in result.stdout
    assert "https://" in result.stdout


def _pyopenssl_request(port: int, ctx: SSL.Context, session: SSL.Session | None = None) -> SSL.Connection:
    """One request over a real socket, then the socket is closed without close_notify."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.settimeout(None)  # pyOpenSSL wants a blocking socket; a stuck read still ends after 10 s:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
        conn = SSL.Connection(ctx, raw)
        conn.set_tlsext_host_name(b"one.test")
        if session is not None:
            conn.set_session(session)
        conn.set_connect_state()
        conn.do_handshake()
        conn.sendall(b"GET /index.html HTTP/1.1\r\nHost: one.test\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        # The client keeps its session resumable on its own side, and sends nothing.
        conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
    return conn


def test_session_id_survives_a_client_that_just_closes(proxy: Proxy) -> None:
    """A TLS 1.2 session id resumes after the first connection ended without close_notify."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_TICKET)  # session ids, as sslyze tests them
    first = _pyopenssl_request(proxy.https, ctx)
    session = first.get_session()
    assert not _lib.SSL_session_reused(first._ssl)
    # The proxy may take the next connection before it has seen the first one close:
    # try again for a while (once dropped from the cache, the session never comes back).
    deadline = time.monotonic() + 5
    while not _lib.SSL_session_reused(_pyopenssl_request(proxy.https, ctx, session)._ssl):
        assert time.monotonic() < deadline, "the session id was never resumed"
        time.sleep(0.1)


def test_ticket_keys_rotate(tmp_path: Path) -> None:
    """A ticket resumes before a rotation and after one (previous key), not after two; TLS 1.2 and 1.3.

    Rotations every 60 s (the shortest allowed): this test takes about two minutes.
    """
    ca = trustme.CA()
    _write_leaf(ca, tmp_path, "one", "one.test")
    https, upstream = free_port(), free_port()
    (tmp_path / "index.html").write_text("hello\n")
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[server]
https = ["tcp:{https}:interface=127.0.0.1"]
http = ["tcp:{free_port()}:interface=127.0.0.1"]

[tls]
ticket_key_rotation = 60

[[site]]
hosts = ["one.test"]
upstream = "http://127.0.0.1:{upstream}"
tls = "files"
cert = "{tmp_path}/one.pem"
key = "{tmp_path}/one.key"
"""
    )
    backend = [sys.executable, "-m", "http.server", str(upstream), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    versions = ("-tls1_2", "-tls1_3")
    with running(backend), tlsproxy(config) as proxy:
        for version in versions:
            first = request(https, "one.test", "one.test", version, "-sess_out", str(tmp_path / version))
            assert "New, TLS" in first and "HTTP/1.1 200" in first, first
            assert "Reused, TLS" in request(https, "one.test", "one.test", version, "-sess_in", str(tmp_path / version))
        proxy.wait_for_line("session ticket keys rotated", 90)
        for version in versions:
            again = request(https, "one.test", "one.test", version, "-sess_in", str(tmp_path / version))
            assert "Reused, TLS" in again and "HTTP/1.1 200" in again, again
        mark = len(proxy.lines)
        proxy.wait_for_line("session ticket keys rotated", 90, start=mark)
        for version in versions:
            late = request(https, "one.test", "one.test", version, "-sess_in", str(tmp_path / version))
            assert "New, TLS" in late and "HTTP/1.1 200" in late, late

"""What `twist tlsproxy` says when a listener cannot bind or the dev app is not up; what a reload hands listeners."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import trustme
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from tlsproxy import config as configuration
from tlsproxy import tap
from tlsproxy.config import parse_upstream
from tlsproxy.tap import ProxyService, cannot_listen


def failed(code: int) -> CannotListenError:
    return CannotListenError("", 443, OSError(code, os.strerror(code)))


def test_privileged_port_names_the_three_ways_out() -> None:
    """EACCES names the systemd socket units, CAP_NET_BIND_SERVICE and a port from 1024 up."""
    line = cannot_listen("https", "tcp:443", failed(errno.EACCES))
    assert line.startswith("cannot listen on tcp:443 (https): Permission denied; ")
    for way in ("deploy/systemd/tlsproxy.socket", "CAP_NET_BIND_SERVICE", "tcp:8443"):
        assert way in line


def test_port_in_use_and_foreign_address() -> None:
    """EADDRINUSE says another process has it; EADDRNOTAVAIL that the address is not this machine's."""
    assert "another process listens there" in cannot_listen("https", "tcp:8443", failed(errno.EADDRINUSE))
    foreign = cannot_listen("https", "tcp:1:interface=192.0.2.1", failed(errno.EADDRNOTAVAIL))
    assert "not one of this machine's" in foreign


def test_systemd_socket_not_passed() -> None:
    """A systemd: endpoint whose socket systemd did not pass points at the socket units or tcp:."""
    line = cannot_listen("https", "systemd:domain=INET6:name=https", KeyError("https"))
    assert line.startswith("cannot listen on systemd:domain=INET6:name=https (https): 'https'; systemd passed no")
    assert "deploy/systemd" in line and "tcp:PORT" in line


def test_other_failures_keep_their_own_words() -> None:
    """A failure that is neither a socket error nor systemd's is said as it is."""
    assert cannot_listen("https", "unix:/x", ValueError("bad")) == "cannot listen on unix:/x (https): bad"


def test_reload_hands_the_tls_listener_its_new_handshake_timeout(tmp_path: Path) -> None:
    """SIGHUP's reload gives the TLS listener the new handshake_timeout (a number, not the HTTP limits)."""
    leaf = trustme.CA().issue_cert("a.test")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    path = tmp_path / "config.toml"

    def write(handshake_timeout: float) -> None:
        path.write_text(
            f'[server]\nhttps = ["tcp:0:interface=127.0.0.1"]\nhttp = []\nstate_dir = "{tmp_path}"\n'
            f"handshake_timeout = {handshake_timeout}\n"
            f'[[site]]\nhosts = ["a.test"]\nupstream = "http://127.0.0.1:1"\ntls = "files"\n'
            f'cert = "{tmp_path / "cert.pem"}"\nkey = "{tmp_path / "key.pem"}"\n'
        )

    write(7)
    service = ProxyService(MemoryReactorClock(), configuration.load(str(path), environ={}), str(path))
    assert service.https_factory.handshake_timeout == 7
    write(3)
    service.reload()
    assert service.https_factory.handshake_timeout == 3
    assert service.https_app.limits.handshake_timeout == 3


@pytest.mark.parametrize(
    ("url", "where", "hint"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", "start your app (for Django: python manage.py runserver)"),
        ("http://127.0.0.1:9001", "127.0.0.1:9001", "python manage.py runserver 127.0.0.1:9001"),
    ],
)
def test_dev_start_warns_once_when_no_app_answers(url: str, where: str, hint: str) -> None:
    """tlsproxy dev dials its app through the reactor at start; a refused dial is one warning naming the fix."""
    upstream = parse_upstream(url)
    assert not isinstance(upstream, str)
    reactor = MemoryReactorClock()
    said: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(said.append)
    try:
        tap.warn_if_no_app(reactor, upstream)
        assert said == []  # nothing waited for, nothing said yet
        ((host, port, factory, timeout, _),) = reactor.tcpClients
        assert (host, port, timeout) == (upstream.host, upstream.port, tap.APP_DIAL_TIMEOUT)
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    finally:
        globalLogPublisher.removeObserver(said.append)
    warnings = [formatEvent(e) for e in said if e.get("log_level") == LogLevel.warn]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"tlsproxy dev: nothing answers on {where} yet: ") and hint in warnings[0]


def test_dev_start_says_nothing_when_the_app_answers() -> None:
    """A dial that connects is hung up at once and logs nothing."""
    upstream = parse_upstream("http://127.0.0.1:8000")
    assert not isinstance(upstream, str)
    reactor = MemoryReactorClock()
    said: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(said.append)
    try:
        tap.warn_if_no_app(reactor, upstream)
        factory = reactor.tcpClients[0][2]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
    finally:
        globalLogPublisher.removeObserver(said.append)
    assert transport.disconnecting
    assert [e for e in said if e.get("log_level") == LogLevel.warn] == []

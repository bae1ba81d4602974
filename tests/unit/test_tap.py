"""What `twist tlsproxy` says when a listener cannot bind: which one, why, and what to do."""

from __future__ import annotations

import errno
import os

from twisted.internet.error import CannotListenError

from tlsproxy.tap import cannot_listen


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

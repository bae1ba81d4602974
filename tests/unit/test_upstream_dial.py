"""Dialling the app on a real reactor: the bare-socket dial and the reactor's connectTCP agree.

UpstreamPool dials an IP address on a bare non-blocking socket (_SocketDial) and
anything else through connectTCP. Both paths run here against real loopback
sockets on a private epoll reactor, and must give the same outcomes: a connected
UpstreamConnection, ConnectionRefusedError (502) or TimeoutError (504).
"""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import error
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.config import Upstream
from tlsproxy.eventloop import send_now, streamline
from tlsproxy.proxy.upstream import UpstreamConnection, UpstreamPool, UpstreamTransport, describe_connect_failure


def have_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class DialContract:
    """The same expectations for both dial paths; ``bare`` says which one."""

    bare: bool

    def setUp(self) -> None:
        self.reactor = EPollReactor()
        streamline(self.reactor)
        self.addCleanup(self.reactor.removeAll)  # type: ignore[attr-defined]

    def pool(self, host: str, port: int, connect_timeout: float = 5.0) -> UpstreamPool:
        upstream = Upstream(url=f"http://{host}:{port}", host=host, port=port)
        pool = UpstreamPool(self.reactor, upstream, connect_timeout)
        if not self.bare:
            pool._family = None  # as for a host name: through connectTCP
        return pool

    def spin(self, until: Callable[[], bool], seconds: float = 5.0) -> None:
        end = time.monotonic() + seconds
        while not until():
            if time.monotonic() > end:
                raise AssertionError("not within the time")
            self.reactor.runUntilCurrent()
            self.reactor.doIteration(0.05)

    def outcome(self, pool: UpstreamPool, seconds: float = 5.0) -> Any:
        results: list[Any] = []
        pool.connect().addBoth(results.append)
        self.spin(lambda: bool(results), seconds)
        return results[0]

    def listener(self, family: int = socket.AF_INET, host: str = "127.0.0.1", backlog: int = 8) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(sock.close)  # type: ignore[attr-defined]
        sock.bind((host, 0))
        sock.listen(backlog)
        return sock

    def check_connected(self, family: int, host: str) -> None:
        server = self.listener(family, host)
        port = server.getsockname()[1]
        pool = self.pool(host, port)
        conn = self.outcome(pool)
        assert isinstance(conn, UpstreamConnection), conn
        assert conn.connected
        assert conn.transport.getPeer().port == port
        assert (type(conn.transport) is UpstreamTransport) == self.bare
        app, _ = server.accept()
        self.addCleanup(app.close)  # type: ignore[attr-defined]
        send_now(conn.transport, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        app.settimeout(5)
        assert app.recv(100) == b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
        # the app closes: the pool learns of it through the reactor
        pool.release(conn)
        assert pool._idle == [conn]
        app.close()
        self.spin(lambda: not conn.connected)
        assert pool._idle == []  # the pool forgot it

    def test_connects_ipv4(self) -> None:
        self.check_connected(socket.AF_INET, "127.0.0.1")

    def test_connects_ipv6(self) -> None:
        if not have_ipv6():
            raise self.skipTest("no IPv6 loopback here")  # type: ignore[attr-defined]
        self.check_connected(socket.AF_INET6, "::1")

    def test_closed_connections_leave_no_reference_cycles(self) -> None:
        """Dialled, used and closed by the app: freed by reference counting, nothing left for the GC."""
        self.check_connected(socket.AF_INET, "127.0.0.1")  # the first one creates lasting state
        gc.collect()
        gc.disable()
        try:
            for _ in range(3):
                self.check_connected(socket.AF_INET, "127.0.0.1")
            assert gc.collect() == 0
        finally:
            gc.enable()

    def test_refused_is_502(self) -> None:
        server = self.listener()
        port = server.getsockname()[1]
        server.close()  # nothing listens there now
        pool = self.pool("127.0.0.1", port)
        failure = self.outcome(pool)
        assert isinstance(failure, Failure) and failure.check(error.ConnectionRefusedError), failure
        answer = describe_connect_failure(failure, pool.upstream)
        assert answer.status == 502 and "refused" in str(answer).lower(), answer

    def test_failure_at_once_still_comes_later(self) -> None:
        """A connect() that fails at once (no route) is reported on a later turn, never within connect()."""
        pool = self.pool("255.255.255.255", 80)
        results: list[Any] = []
        pool.connect().addBoth(results.append)
        assert results == []
        self.spin(lambda: bool(results))
        assert isinstance(results[0], Failure) and results[0].check(error.ConnectError), results
        assert describe_connect_failure(results[0], pool.upstream).status == 502

    def full_accept_queue(self) -> int:
        """A listening port whose accept queue is full: later SYNs are dropped, connects hang."""
        server = self.listener(backlog=0)
        port = server.getsockname()[1]
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            self.addCleanup(s.close)  # type: ignore[attr-defined]
        return port

    def test_shutdown_during_dial_is_502(self) -> None:
        pool = self.pool("127.0.0.1", self.full_accept_queue())
        results: list[Any] = []
        pool.connect().addBoth(results.append)
        for _ in range(3):  # under way (connectTCP starts on the next turn)
            self.reactor.runUntilCurrent()
            self.reactor.doIteration(0.05)
        assert results == [] and self.reactor.getWriters()
        self.reactor.disconnectAll()  # what the reactor does at shutdown
        self.spin(lambda: bool(results))
        assert isinstance(results[0], Failure), results
        assert describe_connect_failure(results[0], pool.upstream).status == 502

    def test_timeout_is_504(self) -> None:
        """An app whose accept queue is full never completes the handshake: 504 after connect_timeout."""
        pool = self.pool("127.0.0.1", self.full_accept_queue(), connect_timeout=0.3)
        start = time.monotonic()
        failure = self.outcome(pool, seconds=5)
        assert isinstance(failure, Failure) and failure.check(error.TimeoutError), failure
        assert 0.3 <= time.monotonic() - start < 2.0
        assert describe_connect_failure(failure, pool.upstream).status == 504


class BareSocketDialTests(DialContract, SynchronousTestCase):
    bare = True

    def test_spurious_wakeup_keeps_waiting(self) -> None:
        """Told 'writable' while the connect is still under way: it asks again and keeps waiting."""
        pool = self.pool("127.0.0.1", self.full_accept_queue(), connect_timeout=0.3)
        results: list[Any] = []
        pool.connect().addBoth(results.append)
        (dial,) = self.reactor.getWriters()
        dial.doWrite()
        assert results == [] and dial in self.reactor.getWriters()
        self.spin(lambda: bool(results))
        assert isinstance(results[0], Failure) and results[0].check(error.TimeoutError), results

    def test_ipv6_scope_is_kept(self) -> None:
        """A link-local app address keeps its zone (fe80::1%lo): the socket address carries the scope id."""
        upstream = Upstream(url="http://[fe80::1%lo]:80", host="fe80::1%lo", port=80)
        pool = UpstreamPool(self.reactor, upstream, 5.0)
        assert pool._family == socket.AF_INET6
        assert pool._address[3] == socket.if_nametoindex("lo")


class ReactorDialTests(DialContract, SynchronousTestCase):
    bare = False


class ChoiceTests(SynchronousTestCase):
    def test_which_path(self) -> None:
        """Bare sockets only for an IP address on a real reactor."""
        epoll = EPollReactor()
        self.addCleanup(epoll.removeAll)

        def family(reactor: Any, url: str, host: str = "", unix: str = "") -> int | None:
            return UpstreamPool(reactor, Upstream(url=url, host=host, port=80, unix_path=unix), 5.0)._family

        self.assertEqual(family(epoll, "http://127.0.0.1", "127.0.0.1"), socket.AF_INET)
        self.assertEqual(family(epoll, "http://[::1]", "::1"), socket.AF_INET6)
        self.assertIsNone(family(epoll, "http://app", "app"))  # resolved by the reactor
        self.assertIsNone(family(epoll, "unix:/run/app.sock", unix="/run/app.sock"))
        self.assertIsNone(family(MemoryReactorClock(), "http://127.0.0.1", "127.0.0.1"))

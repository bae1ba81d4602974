"""Moving a resuming connection to the worker whose ticket key made its ticket."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace
from typing import Any

from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_tls_sessions import TLS12, TLS13, Sessions, reused
from tlsproxy.http.negotiate import NegotiatingFactory
from tlsproxy.http.server import Limits
from tlsproxy.metrics import Metrics
from tlsproxy.tls.handoff import Handoff, HandoffReceiver, movable_transport, owner_of
from tlsproxy.tls.hello import ClientHello
from tlsproxy.tls.policy import TLSPolicy
from tlsproxy.tls.sni import SniServer
from tlsproxy.tls.transport import TLSServerFactory


class TwoWorkersTests(Sessions):
    """Two SNI servers with keys of their own stand for two worker processes."""

    def setUp(self) -> None:
        super().setUp()
        self.other = SniServer(TLSPolicy(), self.sni.sni_map)  # same certificates, its own ticket keys
        self.metrics = Metrics()
        app = NegotiatingFactory(
            SimpleNamespace(handle=lambda exchange: None),  # type: ignore[arg-type]
            self.clock,
            Limits(),
            metrics=self.metrics,
        )
        self.other_factory = TLSServerFactory(self.other, app, Clock(), handshake_timeout=10)
        self.passed: list[tuple[Any, bytes]] = []
        names = [g.key_name for g in self.sni.tickets.generations]

        def handoff(protocol: Any, hello: ClientHello, data: bytes) -> bool:
            if getattr(protocol, "handed_in", False) or owner_of(hello, dict.fromkeys(names, 0)) != 0:
                return False
            self.passed.append((protocol, data))
            return True

        self.other_factory.handoff = handoff

    def test_resumes_on_the_worker_that_made_the_ticket(self) -> None:
        """Offered to another worker, a ticket's connection is passed on with its bytes and resumes there."""
        for version in (TLS12, TLS13):
            self.passed.clear()
            session = self.session("a.test", version)
            client = SSL.Connection(self.clients[version], None)
            client.set_connect_state()
            client.set_tlsext_host_name(b"a.test")
            client.set_session(session)
            try:
                client.do_handshake()
            except SSL.WantReadError:
                pass
            hello = client.bio_read(1 << 17)
            elsewhere = self.other_factory.buildProtocol(None)
            elsewhere.makeConnection(StringTransport())
            elsewhere.dataReceived(hello)
            self.assertEqual(len(self.passed), 1, version)
            self.assertTrue(elsewhere.handed_off)
            self.assertEqual(self.passed[0][1], hello)
            self.assertIsNone(elsewhere._timer)  # no handshake deadline left behind
            elsewhere.connectionLost(None)  # type: ignore[arg-type]
            self.assertEqual(self.metrics.handshake_failures.labels().value, 0)  # a move is no failure
            # The owner goes on with the bytes read, as if it had accepted the connection.
            owner = self.factory.buildProtocol(None)
            owner.handed_in = True
            tcp = StringTransport()
            owner.makeConnection(tcp)
            owner.dataReceived(hello)
            for _ in range(6):
                if tcp.value():
                    client.bio_write(tcp.value())
                    tcp.clear()
                try:
                    client.do_handshake()
                    client.recv(1 << 16)
                except SSL.WantReadError:
                    pass
                try:
                    owner.dataReceived(client.bio_read(1 << 17))
                except SSL.WantReadError:
                    pass
            self.assertTrue(owner.handshake_done, version)
            self.assertTrue(reused(client), version)

    def test_a_new_session_stays(self) -> None:
        """A hello with no ticket of another worker is served where it landed."""
        client, server = self.connect("a.test", TLS13)
        self.assertFalse(reused(client))
        self.assertEqual(self.passed, [])


class FakeTransport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lost = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def loseConnection(self) -> None:
        self.lost = True


class HandoffSocketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.receive, self.send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.client, self.accepted = socket.socketpair()
        for s in (self.receive, self.send, self.client, self.accepted):
            self.addCleanup(s.close)
        self.counter = Metrics().handed_off
        self.handoff = Handoff(0, {1: self.send}, self.counter, movable=lambda transport: True)
        self.handoff.update({0: [b"A" * 16], 1: [b"B" * 16]})

    def protocol(self) -> Any:
        return SimpleNamespace(transport=FakeTransport(self.accepted))

    def test_owner_by_key_name(self) -> None:
        """The first ticket whose 16-byte key name is known decides; unknown names decide nothing."""
        owners = {b"B" * 16: 1}
        self.assertEqual(owner_of(ClientHello("x", (b"C" * 40, b"B" * 16 + b"rest")), owners), 1)
        self.assertIsNone(owner_of(ClientHello("x", (b"C" * 40,)), owners))

    def test_socket_and_bytes_reach_the_owner(self) -> None:
        """The owner receives the very connection (same socket) and the bytes read; ours is closed, not shut."""
        protocol = self.protocol()
        self.assertTrue(self.handoff(protocol, ClientHello("x", (b"B" * 16 + b"t",)), b"hello bytes"))
        self.assertTrue(protocol.transport.lost)
        self.assertIs(protocol.transport._shouldShutdown, False)
        self.assertEqual(self.counter.labels().value, 1)
        data, fds, _, _ = socket.recv_fds(self.receive, 1024, 1)
        self.assertEqual(data, b"hello bytes")
        moved = socket.socket(fileno=fds[0])
        self.addCleanup(moved.close)
        moved.sendall(b"from the owner")
        self.assertEqual(self.client.recv(100), b"from the owner")

    def test_own_unknown_or_moved_once_stay(self) -> None:
        """Our own ticket, an unknown one, or a connection moved here once already: served here."""
        protocol = self.protocol()
        self.assertFalse(self.handoff(protocol, ClientHello("x", (b"A" * 16 + b"t",)), b"x"))
        self.assertFalse(self.handoff(protocol, ClientHello("x", (b"Z" * 16 + b"t",)), b"x"))
        protocol.handed_in = True
        self.assertFalse(self.handoff(protocol, ClientHello("x", (b"B" * 16 + b"t",)), b"x"))
        self.assertFalse(protocol.transport.lost)

    def test_owner_gone_stays(self) -> None:
        """If the owner's socket cannot take it, the connection is served where it landed."""
        self.receive.close()
        protocol = self.protocol()
        self.assertFalse(self.handoff(protocol, ClientHello("x", (b"B" * 16 + b"t",)), b"x"))
        self.assertFalse(protocol.transport.lost)

    def test_receiver_adopts_and_feeds_the_bytes(self) -> None:
        """The receiving worker adopts the socket with its factory, marks it moved, and feeds it the bytes."""
        built: list[Any] = []

        class Protocol:
            def __init__(self) -> None:
                self.data = b""

            def dataReceived(self, data: bytes) -> None:
                self.data += data

        class Factory:
            def buildProtocol(self, addr: Any) -> Any:
                built.append(Protocol())
                return built[-1]

        adopted: list[tuple[int, int]] = []

        class Reactor:
            def adoptStreamConnection(self, fd: int, family: int, factory: Any) -> None:
                adopted.append((os.fstat(fd).st_ino, family))
                factory.buildProtocol(None)

        receiver = HandoffReceiver(Reactor(), self.receive, Factory())
        socket.send_fds(self.send, [b"first bytes"], [self.accepted.fileno()])
        receiver.doRead()
        self.assertEqual(adopted, [(os.fstat(self.accepted.fileno()).st_ino, socket.AF_UNIX)])
        self.assertEqual(built[0].data, b"first bytes")
        self.assertTrue(built[0].handed_in)
        receiver.doRead()  # nothing more waiting: returns
        self.assertEqual(len(built), 1)

    def test_only_plain_tcp_connections_move(self) -> None:
        """A TCP connection moves; one behind a PROXY header (a wrapped transport) never: its address would be lost."""
        from twisted.internet import tcp
        from twisted.internet.testing import MemoryReactor

        from tlsproxy.proxyprotocol import ProxiedTransport

        connection = tcp.Server(self.accepted, None, ("127.0.0.1", 1), None, 1, MemoryReactor())  # type: ignore[arg-type]
        self.assertTrue(movable_transport(connection))
        self.assertFalse(movable_transport(ProxiedTransport(connection, None, None)))
        self.assertFalse(movable_transport(FakeTransport(self.accepted)))
        handoff = Handoff(0, {1: self.send})
        handoff.update({1: [b"B" * 16]})
        wrapped = SimpleNamespace(transport=ProxiedTransport(connection, None, None))
        self.assertFalse(handoff(wrapped, ClientHello("x", (b"B" * 16 + b"t",)), b"x"))

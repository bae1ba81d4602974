"""The TLS server transport against a real pyOpenSSL client, in memory (no sockets, fake clock)."""

from __future__ import annotations

from typing import Any

import trustme
from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.tlsutil import certified, challenge_context, client_context
from tlsproxy.certs.challenges import TLSALPN01Answers
from tlsproxy.http.h2 import H2ServerProtocol
from tlsproxy.http.negotiate import NegotiatingFactory
from tlsproxy.http.server import HTTP11ServerProtocol, Limits
from tlsproxy.tls.policy import TLSPolicy
from tlsproxy.tls.sni import SniMap, SniServer
from tlsproxy.tls.transport import TLSServerFactory, TLSServerProtocol


class Answer:
    """A handler that answers every request with the path it asked for."""

    def handle(self, exchange: Any) -> None:
        exchange.respond(200, b"OK", [(b"content-type", b"text/plain")], b"you asked for " + exchange.head.target)


class Count:
    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


class Metrics:
    def __init__(self) -> None:
        self.handshakes = Count()
        self.handshake_failures = Count()


class Client:
    """A pyOpenSSL client, its bytes carried by hand to and from the server under test."""

    def __init__(self, ctx: SSL.Context, name: str = "a.test") -> None:
        self.tls = SSL.Connection(ctx, None)
        self.tls.set_connect_state()
        self.tls.set_tlsext_host_name(name.encode())
        self.received = b""
        self.closed_by_server = False  # the server's close_notify arrived
        self.error: SSL.Error | None = None

    def step(self) -> None:
        try:
            self.tls.do_handshake()
            while True:
                self.received += self.tls.recv(65536)
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            self.closed_by_server = True
        except SSL.Error as e:
            self.error = e

    def outgoing(self) -> bytes:
        try:
            return self.tls.bio_read(1 << 20)
        except SSL.WantReadError:
            return b""


class TransportTests(SynchronousTestCase):
    def setUp(self) -> None:
        ca = trustme.CA()
        sni_map = SniMap([("a.test", ["a.test"])])
        self.alpn01 = TLSALPN01Answers()
        self.sni = SniServer(TLSPolicy(), sni_map, self.alpn01)
        sni_map.set_context("a.test", self.sni.context_for(certified(ca, "a.test")))
        self.clock = Clock()
        self.metrics = Metrics()
        self.app = NegotiatingFactory(Answer(), self.clock, Limits(), metrics=self.metrics)
        self.factory = TLSServerFactory(self.sni, self.app, self.clock, handshake_timeout=10)

    def connect(self, **client: Any) -> tuple[TLSServerProtocol, StringTransport, Client]:
        server = self.factory.buildProtocol(None)
        tcp = StringTransport()
        server.makeConnection(tcp)
        return server, tcp, Client(client_context(**client))

    def pump(self, server: TLSServerProtocol, tcp: StringTransport, client: Client, data: bytes = b"") -> None:
        """Move bytes both ways until neither side has anything more to say (``data`` is sent after the handshake)."""
        if data:
            self.pump(server, tcp, client)
            client.tls.sendall(data)
        for _ in range(20):
            client.step()
            to_server = client.outgoing()
            if to_server and not tcp.disconnecting:
                server.dataReceived(to_server)
            to_client = tcp.value()
            tcp.clear()
            if to_client:
                client.tls.bio_write(to_client)
            if not to_server and not to_client:
                client.step()
                return

    def test_http11_request_through_tls(self) -> None:
        """A request over TLS reaches the HTTP/1.1 protocol picked by ALPN, and its answer comes back."""
        server, tcp, client = self.connect(alpn=[b"http/1.1"])
        self.pump(server, tcp, client, b"GET /hello HTTP/1.1\r\nHost: a.test\r\n\r\n")
        self.assertIsInstance(server.wrapped, HTTP11ServerProtocol)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 OK\r\n"), client.received)
        self.assertTrue(client.received.endswith(b"you asked for /hello"))
        self.assertEqual(self.metrics.handshakes.value, 1)
        self.assertEqual(self.app.tracker.protocols, {server})

    def test_nagle_is_off(self) -> None:
        """Every accepted connection turns Nagle off, so a small record never waits for the client's ACK."""

        class TCP(StringTransport):
            no_delay: bool | None = None

            def setTcpNoDelay(self, enabled: bool) -> None:
                self.no_delay = enabled

        tcp = TCP()
        self.factory.buildProtocol(None).makeConnection(tcp)
        self.assertIs(tcp.no_delay, True)

    def test_no_alpn_means_http11(self) -> None:
        """A client that offers no ALPN speaks HTTP/1.1."""
        server, tcp, client = self.connect()
        self.pump(server, tcp, client, b"GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n")
        self.assertIsInstance(server.wrapped, HTTP11ServerProtocol)
        self.assertIn(b"you asked for /x", client.received)

    def test_h2_by_alpn(self) -> None:
        """A client that offers h2 gets the HTTP/2 protocol, which speaks first (its SETTINGS)."""
        server, tcp, client = self.connect(alpn=[b"h2", b"http/1.1"])
        self.pump(server, tcp, client)
        self.assertIsInstance(server.wrapped, H2ServerProtocol)
        self.assertTrue(client.received)  # the server's connection preface

    def test_acme_tls_alpn_closes_after_handshake(self) -> None:
        """A TLS-ALPN-01 handshake gets the challenge certificate, no HTTP, and a close."""
        self.alpn01.put("a.test", challenge_context("a.test"))
        server, tcp, client = self.connect(alpn=[b"acme-tls/1"])
        self.pump(server, tcp, client)
        self.assertIsNone(server.wrapped)
        self.assertEqual(client.tls.get_alpn_proto_negotiated(), b"acme-tls/1")
        self.assertTrue(client.closed_by_server)
        self.assertTrue(tcp.disconnecting)

    def test_lose_connection_sends_close_notify(self) -> None:
        """Closing sends close_notify before the TCP close, so the client sees a clean TLS end."""
        server, tcp, client = self.connect()
        self.pump(server, tcp, client, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        server.wrapped.drain()  # idle after its answer: closes
        self.pump(server, tcp, client)
        self.assertTrue(client.closed_by_server)
        self.assertTrue(tcp.disconnecting)

    def test_records_of_one_read_go_up_in_one_call(self) -> None:
        """Many records read at once reach the protocol above in calls of up to 128 KiB, in order, whole."""
        server, tcp, client = self.connect()
        self.pump(server, tcp, client)
        calls: list[bytes] = []
        server.wrapped.dataReceived = calls.append  # type: ignore[method-assign]
        small = bytes(range(256)) * 200  # 51,200 bytes: four records
        client.tls.sendall(small)
        server.dataReceived(client.outgoing())
        self.assertEqual(calls, [small])
        calls.clear()
        big = bytes(range(256)) * 1200  # 307,200 bytes: nineteen records
        client.tls.sendall(big)
        server.dataReceived(client.outgoing())
        self.assertEqual(b"".join(calls), big)
        self.assertEqual(len(calls), 3)
        self.assertTrue(all(len(c) <= 1 << 17 for c in calls))

    def test_data_then_close_notify_in_one_read(self) -> None:
        """Records and the client's close_notify read together: the data goes up first, then the close."""
        server, tcp, client = self.connect()
        self.pump(server, tcp, client)
        calls: list[bytes] = []
        server.wrapped.dataReceived = calls.append  # type: ignore[method-assign]
        client.tls.sendall(b"x" * 20000)
        client.tls.shutdown()
        server.dataReceived(client.outgoing())
        self.assertEqual(calls, [b"x" * 20000])
        self.assertTrue(tcp.disconnecting)

    def test_client_close_notify_closes(self) -> None:
        """The client's close_notify is answered and the connection closed."""
        server, tcp, client = self.connect()
        self.pump(server, tcp, client)
        client.tls.shutdown()
        self.pump(server, tcp, client)
        self.assertTrue(tcp.disconnecting)
        self.assertTrue(client.closed_by_server)

    def test_failed_handshake_sends_alert_and_counts(self) -> None:
        """A TLS 1.1 client gets an alert and a graceful close; the failure is counted once lost."""
        server, tcp, client = self.connect(max_version=SSL.TLS1_1_VERSION, ciphers="DEFAULT@SECLEVEL=0")
        self.pump(server, tcp, client)
        self.assertIsNotNone(client.error)
        self.assertTrue(tcp.disconnecting)
        self.assertIsNone(server.wrapped)
        server.connectionLost(Failure(Exception("closed")))
        self.assertEqual((self.metrics.handshakes.value, self.metrics.handshake_failures.value), (0, 1))
        self.assertEqual(self.app.tracker.protocols, set())

    def test_handshake_timeout(self) -> None:
        """A client that never finishes its handshake is cut after handshake_timeout."""
        server, tcp, _ = self.connect()
        self.clock.advance(9.9)
        self.assertFalse(server.aborted)
        self.clock.advance(0.1)
        self.assertTrue(server.aborted)

    def test_handshake_timeout_is_the_factorys(self) -> None:
        """The handshake deadline is the factory's number (a reload may change it), not the HTTP limits'."""
        self.app.limits = Limits(handshake_timeout=60)
        server, _, _ = self.connect()
        self.factory.handshake_timeout = 3
        late, _, _ = self.connect()
        self.clock.advance(2.9)
        self.assertFalse(server.aborted or late.aborted)
        self.clock.advance(0.1)
        self.assertEqual((server.aborted, late.aborted), (False, True))
        self.clock.advance(6.9)
        self.assertFalse(server.aborted)
        self.clock.advance(0.1)
        self.assertTrue(server.aborted)

    def test_no_timer_left_after_handshake(self) -> None:
        """Once the handshake is done the handshake timer is gone (only the HTTP idle timer remains)."""
        server, tcp, client = self.connect()
        self.pump(server, tcp, client)
        self.assertTrue(server.handshake_done)
        self.clock.advance(10)
        self.assertFalse(server.aborted)

    def test_cork_holds_writes_until_uncork(self) -> None:
        """Writes made while corked leave together when uncorked."""
        server, tcp, client = self.connect()
        self.pump(server, tcp, client)
        tcp.clear()
        server.cork()
        server.write(b"one ")
        server.write(b"two")
        self.assertEqual(tcp.value(), b"")
        server.uncork()
        self.pump(server, tcp, client)
        self.assertTrue(client.received.endswith(b"one two"))

    def test_drain_cuts_a_handshake_in_progress(self) -> None:
        """Shutting down cuts a connection still handshaking; the protocol above drains otherwise."""
        handshaking, _, _ = self.connect()
        handshaking.drain()
        self.assertTrue(handshaking.aborted)

    def test_producer_reaches_tcp(self) -> None:
        """The protocol above registers with the TCP transport, which pauses it when its buffer is full."""
        server, tcp, client = self.connect()
        self.pump(server, tcp, client)
        self.assertIs(tcp.producer, server.wrapped)
        server.pauseProducing()
        self.assertEqual(tcp.producerState, "paused")
        server.resumeProducing()
        self.assertEqual(tcp.producerState, "producing")

    def test_closed_connections_leave_no_reference_cycles(self) -> None:
        """A connection closed by the client is freed by reference counting: nothing is left for the GC."""
        import gc

        def one() -> None:
            server, tcp, client = self.connect()
            self.pump(server, tcp, client, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            tcp.producer = None  # as Twisted's TCP transport drops its producer when the connection is lost
            server.connectionLost(Failure(Exception("the client closed")))

        one()
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(5):
                one()
            gc.collect()
            left = {type(o).__name__ for o in gc.garbage}
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        self.assertEqual(left, set())

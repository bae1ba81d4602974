"""421 Misdirected Request: a request is only served for a host the connection's certificate covers."""

from __future__ import annotations

from types import SimpleNamespace

import trustme
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.tlsutil import certified, client_context
from tests.unit.test_proxy_handler import FakeExchange
from tests.unit.test_tls_transport import Client
from tlsproxy.certs.model import ServedNames, authority_host
from tlsproxy.config import Server, Site, parse_upstream
from tlsproxy.http.exchange import RequestHead
from tlsproxy.http.negotiate import NegotiatingFactory
from tlsproxy.http.server import Limits
from tlsproxy.proxy.handler import ProxyHandler
from tlsproxy.tls.policy import TLSPolicy
from tlsproxy.tls.sni import SniMap, SniServer
from tlsproxy.tls.transport import TLSServerFactory, TLSServerProtocol


class ServedNamesTests(SynchronousTestCase):
    def test_authority_host(self) -> None:
        """A Host value loses its port, its case and a trailing dot; IPv6 brackets are opened."""
        self.assertEqual(authority_host(b"A.Test:8443"), "a.test")
        self.assertEqual(authority_host(b"a.test."), "a.test")
        self.assertEqual(authority_host(b"[::1]:443"), "::1")
        self.assertEqual(authority_host(b"a.test:"), "a.test:")

    def test_covers_names_and_wildcards(self) -> None:
        """Exact names and one label under a wildcard are covered; anything else is not."""
        served = ServedNames(["a.test", "*.b.test"])
        self.assertTrue(served.covers(b"a.test"))
        self.assertTrue(served.covers(b"A.TEST:443"))
        self.assertTrue(served.covers(b"a.test."))
        self.assertTrue(served.covers(b"x.b.test"))
        self.assertFalse(served.covers(b"b.test"))
        self.assertFalse(served.covers(b"x.y.b.test"))
        self.assertFalse(served.covers(b"c.test"))
        self.assertFalse(served.covers(b""))
        self.assertFalse(served.covers(b"127.0.0.1"))


def exchange_for(host: bytes, served: ServedNames | None) -> FakeExchange:
    exchange = FakeExchange(RequestHead(b"GET", b"/", b"1.1", host, [(b"host", host)]))
    exchange.transport = SimpleNamespace(served_names=served)
    return exchange


class HandlerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.patch(FakeExchange, "clock", self.reactor)
        upstream = parse_upstream("http://127.0.0.1:8000")
        sites = [
            Site(hosts=("a.test", "www.a.test"), upstream=upstream, tls="files"),
            Site(hosts=("b.test",), upstream=upstream, tls="files"),
        ]
        self.handler = ProxyHandler(self.reactor, sites, Server())

    def test_other_certificates_host_is_421(self) -> None:
        """A connection served a.test's certificate gets 421 for b.test, and the app is not dialled."""
        exchange = exchange_for(b"b.test", ServedNames(["a.test", "www.a.test"]))
        self.handler.handle(exchange)
        self.assertEqual(exchange.status, 421)
        self.assertTrue(exchange.finished)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_other_name_of_same_certificate_is_served(self) -> None:
        """Coalescing: another name of the same certificate goes to the app."""
        exchange = exchange_for(b"www.a.test:443", ServedNames(["a.test", "www.a.test"]))
        self.handler.handle(exchange)
        self.assertIsNone(exchange.status)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_no_certificate_known_no_check(self) -> None:
        """Plain HTTP (no served certificate) is routed by Host as before."""
        exchange = exchange_for(b"b.test", None)
        self.handler.handle(exchange)
        self.assertIsNone(exchange.status)
        self.assertEqual(len(self.reactor.tcpClients), 1)


class TransportTests(SynchronousTestCase):
    def setUp(self) -> None:
        ca = trustme.CA()
        sni_map = SniMap([("a", ["a.test", "www.a.test"]), ("b", ["b.test"])])
        self.sni = SniServer(TLSPolicy(), sni_map)
        sni_map.set_context("a", self.sni.context_for(certified(ca, "a.test", "www.a.test")))
        sni_map.set_context("b", self.sni.context_for(certified(ca, "b.test")))
        app = NegotiatingFactory(SimpleNamespace(handle=lambda exchange: None), Clock(), Limits())  # type: ignore[arg-type]
        self.factory = TLSServerFactory(self.sni, app, Clock(), handshake_timeout=10)

    def handshake(self, name: str) -> TLSServerProtocol:
        server = self.factory.buildProtocol(None)
        tcp = StringTransport()
        server.makeConnection(tcp)
        client = Client(client_context(), name)
        for _ in range(10):
            client.step()
            data = client.outgoing()
            if data:
                server.dataReceived(data)
            if tcp.value():
                client.tls.bio_write(tcp.value())
                tcp.clear()
        self.assertTrue(server.handshake_done)
        return server

    def test_served_names_follow_the_server_name(self) -> None:
        """After the handshake the connection knows which certificate's names it was served."""
        served = self.handshake("www.a.test").served_names
        assert served is not None
        self.assertEqual(served.names, ("a.test", "www.a.test"))
        self.assertFalse(served.covers(b"b.test"))
        served = self.handshake("b.test").served_names
        assert served is not None
        self.assertEqual(served.names, ("b.test",))

"""/readyz: an app must answer an HTTP request within the deadline; dials left over are closed."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.admin import READINESS_TIMEOUT, AdminHandler
from tlsproxy.config import Balancing, Config, Server, Site, Upstream
from tlsproxy.proxy.balancer import Member, UpstreamGroup
from tlsproxy.proxy.upstream import UpstreamPool

UP = Upstream(url="http://app.internal:8000", host="app.internal", port=8000)


class _Sites:
    def context_of(self, name: str) -> object:
        return object()


class ReadinessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(self.reactor, UP, connect_timeout=30.0)
        config = Config(server=Server(), sites=(Site(hosts=("shop.example",), upstream=UP),))
        group = UpstreamGroup(self.reactor, [Member(UP, self.pool)], Balancing(), "shop.example")
        handler = SimpleNamespace(pools=[self.pool], groups=[group])
        generation = SimpleNamespace(config=config, sni_map=_Sites(), handler=handler)
        service = SimpleNamespace(ready=True, generation=generation, reactor=self.reactor)
        self.admin = AdminHandler(service, lambda: b"")

    def _accept(self, index: int = -1) -> tuple[Any, StringTransport]:
        """The app accepts the index-th dial: its protocol and the transport it writes to."""
        factory = self.reactor.tcpClients[index][2]
        protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 8000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_app_that_answers_is_ready(self) -> None:
        """An app that answers the probe's HEAD / with any status makes /readyz report no problem."""
        result = self.admin.readiness()
        protocol, transport = self._accept()
        sent = transport.value()
        self.assertTrue(sent.startswith(b"HEAD / HTTP/1.1\r\n"))
        self.assertIn(b"\r\nHost: shop.example\r\n", sent)
        self.assertIn(b"\r\nUser-Agent: tlsproxy-readiness\r\n", sent)
        protocol.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\n")
        self.assertEqual(self.successResultOf(result), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_app_that_accepts_and_hangs_is_not_ready(self) -> None:
        """An app that accepts but never answers is a problem after the deadline, and the probe's connection closes."""
        result = self.admin.readiness()
        protocol, transport = self._accept()
        self.assertNoResult(result)
        self.reactor.advance(READINESS_TIMEOUT)
        problems = self.successResultOf(result)
        self.assertEqual(len(problems), 1)
        self.assertIn("no answer within", problems[0])
        self.assertTrue(transport.disconnecting or getattr(transport, "disconnected", False))

    def test_dial_past_the_deadline_is_closed_when_it_completes(self) -> None:
        """A dial still running at the deadline is reported, and its connection closed once it is made."""
        result = self.admin.readiness()
        self.reactor.advance(READINESS_TIMEOUT)
        problems = self.successResultOf(result)
        self.assertEqual(len(problems), 1)
        self.assertEqual(problems[0], "upstream http://app.internal:8000: not connected within 2s")
        protocol, transport = self._accept()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_app_that_closes_without_answering_is_not_ready(self) -> None:
        """An app that closes the probe's connection without a response is reported with the reason."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        result = self.admin.readiness()
        protocol, transport = self._accept()
        protocol.connectionLost(Failure(ConnectionDone()))
        problems = self.successResultOf(result)
        self.assertEqual(len(problems), 1)
        self.assertIn("without answering", problems[0])
        self.assertTrue(problems[0].startswith("upstream http://app.internal:8000: "), problems[0])
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class StoreNoteTests(SynchronousTestCase):
    def _answer(self, store_problem: str | None) -> bytes:
        config = Config(server=Server(), sites=(Site(hosts=("shop.example",), upstream=UP),))
        certificates = [SimpleNamespace(store_problem=store_problem), SimpleNamespace()]
        generation = SimpleNamespace(
            config=config, sni_map=_Sites(), handler=SimpleNamespace(groups=[]), certificates=certificates
        )
        admin = AdminHandler(SimpleNamespace(ready=True, generation=generation), lambda: b"")
        sent: list[tuple[int, bytes]] = []
        admin._send = lambda exchange, status, body, *a: sent.append((status, body))  # type: ignore[method-assign]
        admin._ready(SimpleNamespace(), self.successResultOf(admin.readiness()))  # type: ignore[arg-type]
        return b"%d " % sent[0][0] + sent[0][1]

    def test_unreachable_store_is_said_but_stays_ready(self) -> None:
        """/readyz stays 200 while the shared store is unreachable, and its answer says so."""
        answer = self._answer("store redis redis://:***@r:6379/0: unreachable (refused)")
        self.assertTrue(answer.startswith(b"200 ready\n"))
        self.assertIn(b"note: store redis redis://:***@r:6379/0: unreachable (refused)", answer)

    def test_reachable_store_says_nothing(self) -> None:
        """With the store reachable (or no shared store) /readyz answers a plain "ready"."""
        self.assertEqual(self._answer(None), b"200 ready\n")

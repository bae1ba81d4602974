"""/readyz and /metrics show each upstream's state: up or down, requests in flight, failures."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_proxy_balancing import site
from tests.unit.test_proxy_handler import FakeExchange, head
from tlsproxy.admin import AdminHandler
from tlsproxy.config import Config, Server
from tlsproxy.metrics import Metrics
from tlsproxy.proxy.handler import ProxyHandler


class _Contexts:
    def context_of(self, name: str) -> object:
        return object()


class UpstreamStateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.patch(FakeExchange, "clock", self.reactor)
        the_site = site(8001, 8002)
        self.handler = ProxyHandler(self.reactor, [the_site], Server())
        generation = SimpleNamespace(config=Config(sites=(the_site,)), sni_map=_Contexts(), handler=self.handler)
        self.service = SimpleNamespace(ready=True, generation=generation, reactor=self.reactor)
        self.metrics = Metrics()
        self.metrics.watch_upstreams(lambda: [s for g in self.handler.groups for s in g.states()])
        self.admin = AdminHandler(self.service, self.metrics.render)

    def refuse(self, index: int) -> None:
        self.reactor.tcpClients[index][2].clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))

    def answer(self, index: int) -> None:
        protocol = self.reactor.tcpClients[index][2].buildProtocol(None)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def readyz(self) -> FakeExchange:
        exchange = FakeExchange(head(target=b"/readyz"))
        self.admin.handle(exchange)
        return exchange

    def test_ready_while_one_upstream_answers_and_both_are_listed(self) -> None:
        """/readyz is 200 while one of a site's upstreams answers; its body shows each upstream's state."""
        self.handler.handle(FakeExchange(head()))  # a request the balancer sends to 8001, refused
        self.refuse(0)
        exchange = self.readyz()
        self.refuse(-2)
        self.answer(-1)
        self.assertEqual(exchange.status, 200, exchange.body)
        body = exchange.body.decode()
        self.assertIn("upstream http://127.0.0.1:8001 (site app.test): down, 0 in flight, 1 failures", body)
        self.assertIn("upstream http://127.0.0.1:8002 (site app.test): up, 1 in flight, 0 failures", body)

    def test_not_ready_when_no_upstream_answers(self) -> None:
        """/readyz is 503 when none of a site's upstreams answers, with each one's reason."""
        exchange = self.readyz()
        self.refuse(0)
        self.refuse(1)
        self.assertEqual(exchange.status, 503)
        self.assertIn(b"Connection was refused", exchange.body)

    def test_metrics_show_up_in_flight_and_failures(self) -> None:
        """/metrics has tlsproxy_upstream_up, _in_flight and _failures_total for every upstream."""
        self.handler.handle(FakeExchange(head()))
        self.refuse(0)
        text = self.metrics.render().decode()
        labels = 'route="",site="app.test",upstream="http://127.0.0.1:{}"'
        self.assertIn("tlsproxy_upstream_up{" + labels.format(8001) + "} 0.0", text)
        self.assertIn("tlsproxy_upstream_up{" + labels.format(8002) + "} 1.0", text)
        self.assertIn("tlsproxy_upstream_in_flight{" + labels.format(8002) + "} 1.0", text)
        self.assertIn("tlsproxy_upstream_failures_total{" + labels.format(8001) + "} 1.0", text)

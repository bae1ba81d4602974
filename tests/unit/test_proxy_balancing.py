"""The proxy with several upstreams: failover, retry rules, all down, draining on reload, health checks."""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_proxy_handler import FakeExchange, head
from tlsproxy.config import Balancing, PathRoute, Server, Site, Upstream, parse_upstream
from tlsproxy.proxy.handler import STREAM_ABOVE, ProxyHandler
from tlsproxy.proxy.health import HealthChecks

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
OK_CLOSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"


def ups(*ports: int) -> tuple[Upstream, ...]:
    out = []
    for port in ports:
        upstream = parse_upstream(f"http://127.0.0.1:{port}")
        assert not isinstance(upstream, str)
        out.append(upstream)
    return tuple(out)


def site(*ports: int, **balancing: Any) -> Site:
    upstreams = ups(*ports)
    return Site(
        hosts=("app.test",),
        upstream=upstreams[0],
        upstreams=upstreams,
        tls="files",
        balancing=Balancing(**balancing),
    )


class ProxyCase(SynchronousTestCase):
    """A handler in front of two upstreams on a MemoryReactorClock, and ways to play the apps."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.patch(FakeExchange, "clock", self.reactor)
        self.server = Server(connect_timeout=5, upstream_timeout=30)
        self.handler = ProxyHandler(self.reactor, [site(8001, 8002)], self.server)

    def request(self, method: bytes = b"GET", body: bytes = b"", handler: ProxyHandler | None = None) -> FakeExchange:
        exchange = FakeExchange(head(method, body), body)
        (handler or self.handler).handle(exchange)
        return exchange

    def dialled(self) -> list[int]:
        return [port for _, port, *_ in self.reactor.tcpClients]

    def refuse(self, index: int = -1) -> None:
        self.reactor.tcpClients[index][2].clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))

    def accept(self, index: int = -1) -> tuple[Any, StringTransport]:
        protocol = self.reactor.tcpClients[index][2].buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport


class BalancingTests(ProxyCase):
    def test_refused_connect_goes_to_the_next_upstream_and_marks_it_down(self) -> None:
        """A refused connect sends the request on to the other upstream; later requests skip the refused one."""
        exchange = self.request()
        self.assertEqual(self.dialled(), [8001])
        self.refuse()
        self.assertEqual(self.dialled(), [8001, 8002])
        app, _ = self.accept()
        app.dataReceived(OK)
        self.assertEqual((exchange.status, exchange.body), (200, b"hi"))
        for _ in range(3):
            self.request()  # the first of these reuses the kept-alive connection to 8002
        self.assertEqual(self.dialled(), [8001, 8002, 8002, 8002], "8001 is out for fail_timeout")
        self.reactor.advance(Balancing().fail_timeout)
        self.request()
        self.assertEqual(self.dialled()[4:], [8001], "back after fail_timeout")

    def test_connect_timeout_goes_to_the_next_upstream(self) -> None:
        """A dial that timed out never reached the app: the request goes on to the other upstream."""
        exchange = self.request()
        self.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(error.TimeoutError()))
        self.accept()[0].dataReceived(OK)
        self.assertEqual((self.dialled(), exchange.status), ([8001, 8002], 200))
        self.assertFalse(self.handler.groups[0].members[0].available(self.reactor.seconds()))

    def test_stale_keep_alive_is_retried_on_the_same_upstream_and_not_held_against_it(self) -> None:
        """A kept-alive connection the app closed as we reused it: a fresh one to the same app, no failure counted."""
        first = self.request()
        app, _ = self.accept()
        app.dataReceived(OK)
        self.assertEqual(first.status, 200)
        second = self.request()  # least_conn in turn: 8002 (nothing idle there, a dial)
        self.accept()[0].dataReceived(OK)
        third = self.request()  # 8001 again: its idle connection is reused...
        self.assertEqual(self.dialled(), [8001, 8002])
        app.connectionLost(Failure(error.ConnectionDone()))  # ...and the app had just closed it
        self.assertEqual(self.dialled(), [8001, 8002, 8001])
        self.accept()[0].dataReceived(OK)
        self.assertEqual((second.status, third.status), (200, 200))
        self.assertEqual([m.failed_total for m in self.handler.groups[0].members], [0, 0])

    def test_post_whose_connect_failed_is_retried_with_its_body(self) -> None:
        """A POST that never reached the app (connect refused) goes to the next upstream, body and all."""
        exchange = self.request(b"POST", b"field=1")
        self.refuse()
        _, wire = self.accept()
        self.assertTrue(wire.value().startswith(b"POST /x HTTP/1.1\r\n"))
        self.assertTrue(wire.value().endswith(b"\r\n\r\nfield=1"))
        self.assertIsNone(exchange.status)

    def test_get_closed_unanswered_goes_to_the_next_upstream(self) -> None:
        """A GET whose fresh connection the app closed without a word is sent to the other upstream."""
        exchange = self.request()
        app, _ = self.accept()
        app.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.dialled(), [8001, 8002])
        app2, _ = self.accept()
        app2.dataReceived(OK)
        self.assertEqual(exchange.status, 200)

    def test_closes_unanswered_add_up_to_max_fails(self) -> None:
        """An app that accepts and closes unanswered is out after max_fails such closes: a connect forgives nothing."""
        self.handler = ProxyHandler(self.reactor, [site(8001, 8002, max_fails=2)], self.server)
        member = self.handler.groups[0].members[0]
        for _ in range(2):
            exchange = self.request()
            dialled = len(self.dialled())
            app, _ = self.accept()
            self.assertEqual(self.dialled()[-1], 8001)
            app.connectionLost(Failure(error.ConnectionDone()))
            self.assertEqual(self.dialled()[dialled:], [8002])
            self.accept()[0].dataReceived(OK_CLOSE)
            self.assertEqual(exchange.status, 200)
        self.assertFalse(member.available(self.reactor.seconds()), "two closes unanswered within fail_timeout")

    def test_an_answer_forgives_earlier_failures(self) -> None:
        """A failure followed by an answer from the same upstream starts the count again."""
        self.handler = ProxyHandler(self.reactor, [site(8001, 8002, max_fails=2)], self.server)
        member = self.handler.groups[0].members[0]
        self.request()
        self.accept()[0].connectionLost(Failure(error.ConnectionDone()))
        self.accept()[0].dataReceived(OK_CLOSE)
        self.assertEqual(member.failures, 1)
        self.request()
        self.assertEqual(self.dialled()[-1], 8001)
        self.accept()[0].dataReceived(OK_CLOSE)
        self.assertEqual(member.failures, 0)

    def test_post_closed_unanswered_is_not_retried(self) -> None:
        """A POST the app may have seen (closed without answering) is never sent twice: 502."""
        exchange = self.request(b"POST", b"field=1")
        app, _ = self.accept()
        app.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.dialled(), [8001])
        self.assertEqual(exchange.status, 502)

    def test_streamed_put_closed_unanswered_is_not_retried(self) -> None:
        """A PUT streamed to the app (request_buffering = false) cannot be replayed: 502, not a second try."""
        streaming = Site(
            hosts=("app.test",), upstream=ups(8001)[0], upstreams=ups(8001, 8002), tls="files", request_buffering=False
        )
        handler = ProxyHandler(self.reactor, [streaming], self.server)
        size = STREAM_ABOVE + 1
        exchange = FakeExchange(head(b"PUT", b"x" * size), b"x" * size)
        handler.handle(exchange)
        app, _ = self.accept()
        app.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual((self.dialled(), exchange.status), ([8001], 502))

    def test_every_upstream_tried_and_failed_reports_the_last_error(self) -> None:
        """A request tries each upstream once; when all refuse it gets the 502 of the last."""
        exchange = self.request()
        self.refuse()
        self.refuse()
        self.assertEqual((self.dialled(), exchange.status), ([8001, 8002], 502))
        self.assertIn(b"could not be reached", exchange.body)

    def test_all_down_is_503_at_once(self) -> None:
        """With every upstream out, a request gets 503 and Retry-After at once, without dialling anything."""
        self.request()
        self.refuse()
        self.refuse()
        exchange = self.request()
        self.assertEqual(self.dialled(), [8001, 8002], "nothing dialled for the second request")
        self.assertEqual(exchange.status, 503)
        self.assertIn((b"Retry-After", b"10"), exchange.headers)

    def test_in_flight_spreads_the_load_and_is_given_back(self) -> None:
        """least_conn: a second request while the first is in flight goes to the idle upstream; counts return to 0."""
        first, second = self.request(), self.request()
        self.assertEqual(self.dialled(), [8001, 8002])
        group = self.handler.groups[0]
        self.assertEqual([m.in_flight for m in group.members], [1, 1])
        for index, exchange in ((0, first), (1, second)):
            app, _ = self.accept(index)
            app.dataReceived(OK_CLOSE)
            self.assertEqual(exchange.status, 200)
        self.assertEqual([m.in_flight for m in group.members], [0, 0])
        failed = self.request()
        self.refuse()
        self.refuse()
        self.assertEqual(failed.status, 502)
        self.assertEqual([m.in_flight for m in group.members], [0, 0])

    def test_routes_take_lists_too(self) -> None:
        """A [site.routes] prefix with several upstreams fails over among its own, not the site's."""
        routed = Site(
            hosts=("app.test",),
            upstream=ups(8000)[0],
            tls="files",
            routes=(PathRoute("/x", ups(8001)[0], ups(8001, 8002)),),
        )
        handler = ProxyHandler(self.reactor, [routed], self.server)
        exchange = FakeExchange(head(target=b"/x/1"), b"")
        handler.handle(exchange)
        self.refuse()
        self.assertEqual(self.dialled(), [8001, 8002])


class DrainingTests(ProxyCase):
    def test_reload_drains_a_removed_upstream(self) -> None:
        """Reload without 8001: its request in flight finishes, its connection then closes; new ones avoid it."""
        in_flight = self.request()
        old_app, old_wire = self.accept()
        self.request()
        self.accept()
        new = ProxyHandler(self.reactor, [site(8002)], self.server)
        self.handler.close(new)
        # On a client connection opened before the reload (it holds the old handler), where
        # 8001 would be next in turn.
        later = self.request()
        self.assertEqual(self.dialled(), [8001, 8002, 8002])
        draining = [(st.url, st.up, st.in_flight, st.why) for st in new.groups[0].states()][1:]
        self.assertEqual(draining, [("http://127.0.0.1:8001", False, 1, "draining: removed by a reload")])
        old_app.dataReceived(OK)
        self.assertEqual((in_flight.status, in_flight.body), (200, b"hi"))
        self.assertTrue(old_wire.disconnecting, "the removed upstream's connection ends with its request")
        self.assertEqual([st.url for st in new.groups[0].states()], ["http://127.0.0.1:8002"], "drained")
        app, _ = self.accept()
        app.dataReceived(OK)
        self.assertEqual(later.status, 200)

    def test_reload_keeps_counting_requests_in_flight(self) -> None:
        """A request from before a reload still counts for its upstream in the new configuration, until it ends."""
        before = self.request()
        app, _ = self.accept()
        new = ProxyHandler(self.reactor, [site(8001, 8002)], self.server)
        self.handler.close(new)
        self.assertEqual([s.in_flight for s in new.groups[0].states()], [1, 0])
        self.request()  # least_conn: to the idle 8002, not to 8001 (first in turn)
        self.assertEqual(self.dialled(), [8001, 8002])
        app.dataReceived(OK)
        self.assertEqual(before.status, 200)
        self.assertEqual([s.in_flight for s in new.groups[0].states()], [0, 1])

    def test_reload_keeps_health(self) -> None:
        """An upstream that is down stays down across a reload that keeps it."""
        self.request()
        self.refuse()
        new = ProxyHandler(self.reactor, [site(8001, 8002)], self.server)
        self.handler.close(new)
        self.accept()
        self.request()
        self.assertEqual(self.dialled(), [8001, 8002, 8002])


class HealthCheckTests(ProxyCase):
    def test_checks_take_a_failing_upstream_out_and_bring_it_back(self) -> None:
        """health_path: a 500 takes 8001 out, requests go to 8002; a 200 at the next interval brings it back."""
        handler = ProxyHandler(
            self.reactor, [site(8001, 8002, health_path="/health", health_interval=5.0)], self.server
        )
        checks = HealthChecks(self.reactor, handler.groups)
        checks.startService()
        self.assertEqual(self.dialled(), [8001, 8002])
        app1, wire1 = self.accept(0)
        self.assertTrue(wire1.value().startswith(b"GET /health HTTP/1.1\r\nHost: app.test\r\n"))
        app1.dataReceived(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
        app2, _ = self.accept(1)
        app2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(wire1.disconnecting)
        self.assertIn(b"\r\nUser-Agent: tlsproxy-health-check\r\n", wire1.value())
        self.assertEqual([s.up for s in handler.groups[0].states()], [False, True])
        self.assertIn("GET /health answered 500", handler.groups[0].states()[0].why)
        for _ in range(2):
            self.request(handler=handler)
        self.assertEqual(self.dialled()[2:], [8002, 8002])
        self.reactor.advance(5.0)
        self.assertEqual(self.dialled()[4:], [8001, 8002])
        self.accept(4)[0].dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.accept(5)[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual([s.up for s in handler.groups[0].states()], [True, True])
        checks.stopService()
        self.reactor.advance(60)
        self.assertEqual(len(self.dialled()), 6, "no checks once stopped")

    def test_check_that_times_out_fails(self) -> None:
        """An app that accepts the check but says nothing within health_timeout is taken out."""
        handler = ProxyHandler(self.reactor, [site(8001, 8002, health_path="/health", health_timeout=1.0)], self.server)
        checks = HealthChecks(self.reactor, handler.groups)
        checks.startService()
        _, wire = self.accept(0)
        self.accept(1)[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.reactor.advance(1.0)
        states = handler.groups[0].states()
        self.assertEqual([s.up for s in states], [False, True])
        self.assertIn("no answer within 1s", states[0].why)
        self.assertTrue(wire.disconnecting or wire.disconnected)
        checks.stopService()

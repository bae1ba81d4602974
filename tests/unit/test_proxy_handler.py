"""The proxy relay against a MemoryReactorClock: dialling, failures, retries, timeouts."""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_reqbuffer import FakeThreads, scratch
from tlsproxy.config import HSTS, PathRoute, Server, Site, parse_upstream
from tlsproxy.deadline import Deadline
from tlsproxy.http.exchange import RequestHead
from tlsproxy.http.wire import split_fields
from tlsproxy.proxy.handler import ProxyHandler


class FakeExchange:
    """Records what the handler answers; the request body is given up front."""

    clock: Any = None  # set by the tests, for the deadline

    def __init__(self, head: RequestHead, body: bytes = b"") -> None:
        self.deadline = Deadline(self.clock)
        self.head = head
        self.client_address = "203.0.113.7"
        self.secure = True
        self.server_port = 443
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.finished = False
        self.aborted = False
        self.connection = self
        self.transport = None
        self._request_body = body
        self.body_ends = True

    def set_body_consumer(self, consumer: Any) -> None:
        if self._request_body:
            consumer.body_data(self._request_body)
        if self.body_ends:
            consumer.body_end()

    def pause_body(self) -> None: ...

    def resume_body(self) -> None: ...

    def set_observer(self, observer: Any) -> None:
        self.observer = observer

    @property
    def response_started(self) -> bool:
        return self.status is not None

    def start_response(self, status: int, reason: bytes, headers: list | bytes, content_length: int | None) -> None:
        self.status = status
        self.headers = split_fields(headers) if isinstance(headers, bytes) else headers

    def respond(self, status: int, reason: bytes, headers: list | bytes, body: bytes) -> None:
        self.start_response(status, reason, headers, len(body))
        self.write(body)
        self.finish()

    def write(self, data: bytes) -> None:
        self.body += data

    def finish(self) -> None:
        self.finished = True

    def abort(self) -> None:
        self.aborted = True

    producer: Any = None

    def register_producer(self, producer: Any) -> None:
        self.producer = producer

    def unregister_producer(self) -> None:
        self.producer = None


def head(method: bytes = b"GET", body: bytes = b"", host: bytes = b"app.test", target: bytes = b"/x") -> RequestHead:
    headers = [(b"host", host)]
    if body:
        headers.append((b"content-length", b"%d" % len(body)))
    return RequestHead(method, target, b"1.1", host, headers, len(body) if body else None)


class HandlerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.patch(FakeExchange, "clock", self.reactor)
        upstream = parse_upstream("http://127.0.0.1:8000")
        site = Site(hosts=("app.test",), upstream=upstream, tls="files", hsts=HSTS(max_age=60))
        self.server = Server(connect_timeout=5, upstream_timeout=30)
        self.handler = ProxyHandler(self.reactor, [site], self.server)

    def request(self, method: bytes = b"GET", body: bytes = b"") -> FakeExchange:
        exchange = FakeExchange(head(method, body), body)
        self.handler.handle(exchange)
        return exchange

    def connect(self, index: int = -1) -> tuple[Any, StringTransport]:
        """Complete the dial recorded at ``index``; the app's side of it."""
        factory = self.reactor.tcpClients[index][2]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_relays_request_and_response(self) -> None:
        """The app gets our framing and forwarding headers; the client gets the answer plus HSTS."""
        exchange = self.request()
        app, wire = self.connect()
        sent = wire.value()
        self.assertTrue(sent.startswith(b"GET /x HTTP/1.1\r\nhost: app.test\r\n"))
        self.assertIn(b"x-forwarded-proto: https\r\n", sent)
        self.assertIn(b"x-forwarded-for: 203.0.113.7\r\n", sent)
        app.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        self.assertEqual((exchange.status, exchange.body, exchange.finished), (200, b"hi", True))
        self.assertIn((b"strict-transport-security", b"max-age=60"), exchange.headers)

    def test_closed_handler_keeps_no_connection_of_a_request_in_flight(self) -> None:
        """After a reload closes the old handler, the app connection of a request in flight ends with it."""
        exchange = self.request()
        app, wire = self.connect()
        self.handler.close()
        app.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        self.assertEqual((exchange.status, exchange.body), (200, b"hi"))
        self.assertTrue(wire.disconnecting, "kept open in a pool nobody uses any more")

    def test_redirect_from_name_is_sent_to_the_canonical_name(self) -> None:
        """A request for a redirect_from name gets 301 (308 for POST) to the first host, port, path and query kept."""
        site = Site(
            hosts=("app.test", "www.app.test"),
            redirect_from=("www.app.test",),
            upstream=parse_upstream("http://127.0.0.1:8000"),
            tls="files",
        )
        handler = ProxyHandler(self.reactor, [site], self.server)
        exchange = FakeExchange(head(b"GET", b"", host=b"www.app.test:8443", target=b"/a?b=1"), b"")
        handler.handle(exchange)
        self.assertEqual(exchange.status, 301)
        self.assertIn((b"Location", b"https://app.test:8443/a?b=1"), exchange.headers)
        self.assertEqual(self.reactor.tcpClients, [], "the app never sees it")
        post = FakeExchange(head(b"POST", b"x", host=b"www.app.test", target=b"/f"), b"x")
        handler.handle(post)
        self.assertEqual(post.status, 308)
        self.assertIn((b"Location", b"https://app.test/f"), post.headers)
        same = FakeExchange(head(b"GET", b"", host=b"app.test"), b"")
        handler.handle(same)
        self.assertIsNone(same.status)  # proxied as usual
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_path_routes_pick_another_app_longest_prefix_first(self) -> None:
        """[site.routes]: /ws/ and /ws/admin/ go to their own apps with the path unchanged; the rest to the site's."""
        site = Site(
            hosts=("app.test",),
            upstream=parse_upstream("http://127.0.0.1:8000"),
            tls="files",
            routes=(
                PathRoute("/ws/admin/", parse_upstream("http://127.0.0.1:8002")),
                PathRoute("/ws/", parse_upstream("http://127.0.0.1:8001")),
            ),
        )
        handler = ProxyHandler(self.reactor, [site], self.server)
        cases = ((b"/ws/chat", 8001), (b"/ws/admin/x", 8002), (b"/wsx", 8000), (b"/", 8000))
        # Matched as the app will route the path (decoded once), so an encoded prefix goes where it reads.
        cases += ((b"/%77s/chat", 8001), (b"/ws/%61dmin/x?a=%2F", 8002), (b"/ws%2Fchat", 8001))
        for target, port in cases:
            handler.handle(FakeExchange(head(target=target), b""))
            self.assertEqual(self.reactor.tcpClients[-1][:2], ("127.0.0.1", port), target)
            _, wire = self.connect()
            self.assertTrue(wire.value().startswith(b"GET " + target + b" HTTP/1.1\r\n"))

    def test_connection_refused_is_502(self) -> None:
        """An app that refuses the connection gets a short 502 page."""
        exchange = self.request()
        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        self.assertEqual(exchange.status, 502)
        self.assertNotIn(b"Traceback", exchange.body)

    def test_connect_timeout_is_504(self) -> None:
        """Dialling that times out is a 504, and the dial used connect_timeout."""
        exchange = self.request()
        self.assertEqual(self.reactor.tcpClients[-1][3], self.server.connect_timeout)
        self.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(error.TimeoutError()))
        self.assertEqual(exchange.status, 504)

    def test_silent_app_is_504(self) -> None:
        """An app that never answers gets a 504 after upstream_timeout, and its connection is cut."""
        exchange = self.request()
        _, wire = self.connect()
        self.reactor.advance(self.server.upstream_timeout - 1)
        self.assertIsNone(exchange.status)
        self.reactor.advance(1)
        self.assertEqual(exchange.status, 504)
        self.assertTrue(wire.disconnecting or wire.disconnected)

    def test_reused_connection_closed_by_app_is_retried(self) -> None:
        """A GET that meets a keep-alive connection the app just closed is sent again on a fresh one."""
        first = self.request()
        app, _ = self.connect()
        app.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        self.assertEqual(first.status, 200)
        second = self.request()
        self.assertEqual(len(self.reactor.tcpClients), 1, "the pooled connection is reused")
        app.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(len(self.reactor.tcpClients), 2, "a fresh connection is dialled")
        fresh, wire = self.connect()
        self.assertTrue(wire.value().startswith(b"GET /x HTTP/1.1"))
        fresh.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
        self.assertEqual((second.status, second.body), (200, b"b"))

    def test_post_on_closed_connection_is_not_retried(self) -> None:
        """A POST is never sent twice: the same race gives a 502 instead."""
        first = self.request()
        app, _ = self.connect()
        app.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        self.assertEqual(first.status, 200)
        post = self.request(b"POST", b"form=1")
        app.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(post.status, 502)

    def test_body_over_limit_is_413_before_dialling(self) -> None:
        """A declared body over max_body_size gets 413 and the app is never dialled."""
        upstream = parse_upstream("http://127.0.0.1:8000")
        site = Site(hosts=("app.test",), upstream=upstream, tls="files", max_body_size=4)
        handler = ProxyHandler(self.reactor, [site], self.server)
        exchange = FakeExchange(head(b"POST", b"too long"), b"too long")
        handler.handle(exchange)
        self.assertEqual(exchange.status, 413)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_unknown_host_is_404(self) -> None:
        """A Host no site lists is 404, and nothing is dialled."""
        exchange = FakeExchange(RequestHead(b"GET", b"/", b"1.1", b"other.test", [(b"host", b"other.test")]))
        self.handler.handle(exchange)
        self.assertEqual(exchange.status, 404)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_client_gone_cuts_upstream(self) -> None:
        """When the client leaves mid-request, the app's connection is closed, not pooled."""
        exchange = self.request()
        _, wire = self.connect()
        exchange.observer.client_gone()
        self.assertTrue(wire.disconnecting or wire.disconnected)

    def test_cut_off_response_is_not_passed_as_complete(self) -> None:
        """An app that closes before its declared Content-Length is done: the client is cut, not misled."""
        exchange = self.request()
        app, _ = self.connect()
        app.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 10\r\n\r\n12345")
        app.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(exchange.aborted)
        self.assertFalse(exchange.finished)

    def test_close_delimited_response_ends_at_close(self) -> None:
        """A response with neither length nor chunking ends when the app closes."""
        exchange = self.request()
        app, _ = self.connect()
        app.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc")
        app.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual((exchange.body, exchange.finished, exchange.aborted), (b"abc", True, False))

    def test_early_answer_to_upload_does_not_pool_the_connection(self) -> None:
        """An app answering before the whole body arrived (401 to an upload) never gets its connection reused."""
        site = Site(
            hosts=("app.test",),
            upstream=parse_upstream("http://127.0.0.1:8000"),
            tls="files",
            request_buffering=False,
        )
        self.handler = ProxyHandler(self.reactor, [site], self.server)
        big = b"a" * (2 * 1024 * 1024)
        exchange = FakeExchange(head(b"POST", big), big[: 64 * 1024])
        exchange.head.content_length = len(big)
        exchange.body_ends = False
        self.handler.handle(exchange)
        app, wire = self.connect()
        app.dataReceived(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(exchange.status, 401)
        self.assertEqual(self.handler.pools[0]._idle, [])
        self.assertTrue(wire.disconnecting or wire.disconnected)
        second = self.request()
        self.assertEqual(len(self.reactor.tcpClients), 2, "the next request dials a fresh connection")
        self.assertIsNone(second.status)


class Records:
    """An access log that keeps (status, size) of every line."""

    def __init__(self) -> None:
        self.lines: list[tuple[int, int]] = []

    def log(self, exchange: Any, status: int, size: int, *fields: Any) -> None:
        self.lines.append((status, size))


class ResponseSideTests(SynchronousTestCase):
    """Buffered answers, the send timeout, framing surprises, and requests that end badly."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.patch(FakeExchange, "clock", self.reactor)
        self.server = Server(connect_timeout=5, upstream_timeout=30, send_timeout=20, buffer_dir=scratch(self))
        self.handler = self.make_handler()

    def make_handler(self, **site: Any) -> ProxyHandler:
        from tlsproxy.metrics import Metrics

        upstream = parse_upstream("http://127.0.0.1:8000")
        self.records = Records()
        self.metrics = Metrics()
        sites = [Site(hosts=("app.test",), upstream=upstream, tls="files", **site)]
        handler = ProxyHandler(self.reactor, sites, self.server, access_log=self.records, metrics=self.metrics)  # type: ignore[arg-type]
        handler.response_buffers.stall = 0.0  # these clients stop for good: slow at once, no pacing
        return handler

    def request(self, method: bytes = b"GET") -> FakeExchange:
        exchange = FakeExchange(head(method))
        self.handler.handle(exchange)
        return exchange

    def connect(self, index: int = -1) -> tuple[Any, StringTransport]:
        protocol = self.reactor.tcpClients[index][2].buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def count(self, status: int) -> float:
        child = self.metrics.requests.children.get(("app.test", str(status)))
        return child.value if child is not None else 0

    def big_answer(self, app: Any, size: int, extra: bytes = b"") -> bytes:
        body = bytes(range(256)) * (size // 256)
        app.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra))
        return body

    def test_client_that_keeps_up_paces_the_app(self) -> None:
        """A client whose socket is full for a moment pauses the app's connection instead of filling a file."""
        self.handler.response_buffers.stall = 0.5
        exchange = self.request()
        app, _ = self.connect()
        body = self.big_answer(app, 1024 * 1024)
        exchange.producer.pauseProducing()
        at = 0
        while at < len(body) and not app.response_paused:
            app.dataReceived(body[at : at + 65536])
            at += 65536
        self.assertTrue(app.response_paused, "the app waits for the client")
        self.assertEqual(self.handler.response_buffers.files, 0)
        self.reactor.advance(0.25)
        exchange.producer.resumeProducing()
        self.assertFalse(app.response_paused)
        app.dataReceived(body[at:])
        self.assertEqual(exchange.body, body)
        self.assertEqual((self.handler.response_buffers.files, self.handler.response_buffers.in_memory), (0, 0))

    def test_slow_client_frees_the_app_connection(self) -> None:
        """A client that stops reading does not pause the app: the whole answer is taken, the connection pooled."""
        exchange = self.request()
        app, wire = self.connect()
        body = self.big_answer(app, 1024 * 1024)
        app.dataReceived(body[:65536])
        exchange.producer.pauseProducing()  # the client's transport is full
        for at in range(65536, len(body), 65536):
            app.dataReceived(body[at : at + 65536])
        self.assertFalse(wire.disconnecting)
        self.assertFalse(app.response_paused, "the app is never paused for a slow client")
        self.assertEqual(self.handler.pools[0]._idle, [app], "the app's connection is free for the next request")
        self.assertFalse(exchange.finished)
        self.assertEqual(self.records.lines, [])
        exchange.producer.resumeProducing()
        self.assertEqual(exchange.body, body)
        self.assertTrue(exchange.finished)
        self.assertEqual(self.records.lines, [(200, len(body))])
        self.assertEqual((self.handler.response_buffers.files, self.handler.response_buffers.in_memory), (0, 0))

    def test_buffer_file_closed_when_the_client_caught_up(self) -> None:
        """A buffer the client emptied before the app's end still closes its file when the answer ends."""
        exchange = self.request()
        app, _ = self.connect()
        body = self.big_answer(app, 1024 * 1024)
        exchange.producer.pauseProducing()
        app.dataReceived(body[:600_000])
        self.assertEqual(self.handler.response_buffers.files, 1)
        exchange.producer.resumeProducing()
        app.dataReceived(body[600_000:])
        self.assertEqual(exchange.body, body)
        self.assertEqual((self.handler.response_buffers.files, self.handler.response_buffers.in_memory), (0, 0))

    def test_past_the_cap_the_app_waits(self) -> None:
        """Past max_response_buffer, the app is paused until the client reads (back-pressure as before)."""
        self.server = Server(upstream_timeout=30, max_response_buffer=300_000, buffer_dir=scratch(self))
        self.handler = self.make_handler()
        exchange = self.request()
        app, _ = self.connect()
        body = self.big_answer(app, 1024 * 1024)
        exchange.producer.pauseProducing()
        at = 0
        while not app.response_paused and at < len(body):
            app.dataReceived(body[at : at + 65536])
            at += 65536
        self.assertTrue(app.response_paused)
        self.assertLess(at, len(body))
        exchange.producer.resumeProducing()
        self.assertFalse(app.response_paused)
        app.dataReceived(body[at:])
        self.assertEqual(exchange.body, body)
        self.assertTrue(exchange.finished)

    def test_accel_buffering_no_streams_and_is_not_passed_on(self) -> None:
        """X-Accel-Buffering: no pauses the app for a slow client, and the client never sees the field."""
        exchange = self.request()
        app, _ = self.connect()
        self.big_answer(app, 1024 * 1024, b"X-Accel-Buffering: no\r\n")
        exchange.producer.pauseProducing()
        self.assertTrue(app.response_paused)
        self.assertIsNone(exchange.producer.relay)
        self.assertNotIn(b"x-accel-buffering", [name.lower() for name, _ in exchange.headers])

    def test_site_can_turn_buffering_off(self) -> None:
        """response_buffering = false: a slow client pauses the app."""
        self.handler = self.make_handler(response_buffering=False)
        exchange = self.request()
        app, _ = self.connect()
        self.big_answer(app, 1024 * 1024)
        exchange.producer.pauseProducing()
        self.assertTrue(app.response_paused)

    def test_accel_buffering_removed_from_whole_answers(self) -> None:
        """An answer that arrives whole also loses its X-Accel-Buffering field."""
        exchange = self.request()
        app, _ = self.connect()
        app.dataReceived(b"HTTP/1.1 200 OK\r\nX-Accel-Buffering: yes\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(exchange.body, b"ok")
        self.assertNotIn(b"x-accel-buffering", [name.lower() for name, _ in exchange.headers])

    def test_send_timeout_cuts_a_client_that_never_reads_unbuffered(self) -> None:
        """Unbuffered, a client that takes nothing for send_timeout is cut, and the app's connection freed."""
        exchange = self.request()
        app, wire = self.connect()
        self.big_answer(app, 1024 * 1024, b"X-Accel-Buffering: no\r\n")
        app.dataReceived(bytes(65536))
        exchange.producer.pauseProducing()
        self.reactor.advance(19)
        self.assertFalse(exchange.aborted)
        self.reactor.advance(1.5)
        self.assertTrue(exchange.aborted)
        self.assertTrue(wire.disconnecting or wire.disconnected)
        self.assertEqual(self.records.lines, [(200, 65536)])

    def test_send_timeout_restarts_with_progress(self) -> None:
        """A client that reads now and then is not cut: only send_timeout without progress is."""
        exchange = self.request()
        app, _ = self.connect()
        self.big_answer(app, 1024 * 1024, b"X-Accel-Buffering: no\r\n")
        for _ in range(4):
            exchange.producer.pauseProducing()
            self.reactor.advance(15)
            exchange.producer.resumeProducing()
            app.dataReceived(bytes(1000))
        self.assertFalse(exchange.aborted)

    def test_send_timeout_with_buffering_drops_the_buffer(self) -> None:
        """Buffered, the app is free at once; the client that never reads is cut later and its file closed."""
        exchange = self.request()
        app, _ = self.connect()
        body = self.big_answer(app, 1024 * 1024)
        exchange.producer.pauseProducing()
        app.dataReceived(body)
        self.assertEqual(self.handler.pools[0]._idle, [app])
        self.assertEqual(self.handler.response_buffers.files, 1)
        self.reactor.advance(21)
        self.assertTrue(exchange.aborted)
        self.assertEqual((self.handler.response_buffers.files, self.handler.response_buffers.in_memory), (0, 0))
        self.assertEqual(self.records.lines, [(200, 0)])

    def test_client_abort_is_recorded_as_499(self) -> None:
        """A client that leaves before the answer gets a 499 line and count; the app's connection is cut."""
        exchange = self.request()
        _, wire = self.connect()
        exchange.observer.client_gone()
        self.assertEqual(self.records.lines, [(499, 0)])
        self.assertEqual(self.count(499), 1)
        self.assertTrue(wire.disconnecting or wire.disconnected)

    def test_client_abort_mid_buffer_is_recorded_once(self) -> None:
        """A client that leaves while its answer is buffered: one 499, and the buffer's file closed."""
        exchange = self.request()
        app, _ = self.connect()
        body = self.big_answer(app, 1024 * 1024)
        exchange.producer.pauseProducing()
        app.dataReceived(body)
        exchange.observer.client_gone()
        exchange.observer.client_gone()
        self.assertEqual(self.records.lines, [(499, 0)])
        self.assertEqual((self.handler.response_buffers.files, self.handler.response_buffers.in_memory), (0, 0))

    def test_app_reset_mid_body_is_recorded(self) -> None:
        """An app that breaks off mid-answer: the client is cut, and the request is logged and counted (502)."""
        exchange = self.request()
        app, _ = self.connect()
        self.big_answer(app, 1000)
        app.dataReceived(bytes(10))
        app.connectionLost(Failure(error.ConnectionLost()))
        self.assertTrue(exchange.aborted)
        self.assertEqual(self.records.lines, [(502, 10)])
        self.assertEqual(self.count(502), 1)

    def test_204_with_content_length_is_not_reused(self) -> None:
        """After a 204 that announces a body, the app's connection is dropped: its late bytes answer nobody."""
        first = self.request()
        app, wire = self.connect()
        app.dataReceived(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(first.status, 204)
        self.assertTrue(wire.disconnecting or wire.disconnected)
        self.request()
        self.assertEqual(len(self.reactor.tcpClients), 2, "the next request dials a fresh connection")

    def test_head_answer_with_body_bytes_is_not_reused(self) -> None:
        """A HEAD answer followed by body bytes: the connection is cut, not pooled."""
        first = self.request(b"HEAD")
        app, wire = self.connect()
        app.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual(first.status, 200)
        self.assertTrue(wire.disconnecting or wire.disconnected)
        self.assertEqual(self.handler.pools[0]._idle, [])

    def test_304_without_length_is_reused(self) -> None:
        """A plain 304 (no length, no bytes after) keeps its connection for the next request."""
        self.request()
        app, wire = self.connect()
        app.dataReceived(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")
        self.assertEqual(self.handler.pools[0]._idle, [app])
        self.request()
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_oversized_head_in_one_read_is_502(self) -> None:
        """An app response head over 64 KiB is refused with 502 even when it arrives in one read."""
        exchange = self.request()
        app, wire = self.connect()
        big = b"X-Big: " + b"a" * 70000 + b"\r\n"
        app.dataReceived(b"HTTP/1.1 200 OK\r\n" + big + b"Content-Length: 2\r\n\r\nok")
        self.assertEqual(exchange.status, 502)
        self.assertTrue(wire.disconnecting or wire.disconnected)


class H2WindowTests(SynchronousTestCase):
    """An HTTP/2 client whose window stays at 0 holds the app no longer than send_timeout."""

    def setUp(self) -> None:
        from h2.config import H2Configuration
        from h2.connection import H2Connection

        from tlsproxy.http.h2 import H2ServerProtocol
        from tlsproxy.http.server import Limits

        self.reactor = MemoryReactorClock()
        site = Site(hosts=("app.test",), upstream=parse_upstream("http://127.0.0.1:8000"), tls="files")
        server = Server(upstream_timeout=30, send_timeout=20, buffer_dir=scratch(self))
        self.records = Records()
        self.handler = ProxyHandler(self.reactor, [site], server, access_log=self.records)  # type: ignore[arg-type]
        self.proto = H2ServerProtocol(self.handler, self.reactor, Limits())
        self.wire = StringTransport()
        self.proto.makeConnection(self.wire)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.events: list[Any] = []
        self.pump()
        headers = [(b":method", b"GET"), (b":path", b"/x"), (b":scheme", b"https"), (b":authority", b"app.test")]
        self.client.send_headers(1, headers, end_stream=True)
        self.pump()
        self.app = self.reactor.tcpClients[-1][2].buildProtocol(None)
        self.app_wire = StringTransport()
        self.app.makeConnection(self.app_wire)

    def pump(self) -> None:
        for _ in range(10):
            out = self.client.data_to_send()
            if out:
                self.proto.dataReceived(out)
            back = self.wire.value()
            self.wire.clear()
            if back:
                self.events += self.client.receive_data(back)
            if not out and not back:
                return

    def answer(self, extra: bytes) -> None:
        self.app.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n%s\r\n" % extra)
        for _ in range(4):
            self.app.dataReceived(bytes(65536))
        self.pump()

    def reset(self) -> bool:
        from h2.events import StreamReset

        return any(isinstance(e, StreamReset) for e in self.events)

    def test_zero_window_unbuffered_is_cut_after_send_timeout(self) -> None:
        """Streaming, the app waits on the client's window; after send_timeout the stream is reset, the app cut."""
        self.answer(b"X-Accel-Buffering: no\r\n")
        self.assertTrue(self.app.response_paused)
        self.reactor.advance(19)
        self.pump()
        self.assertFalse(self.reset())
        self.reactor.advance(1.5)
        self.pump()
        self.assertTrue(self.reset())
        self.assertTrue(self.app_wire.disconnecting or self.app_wire.disconnected)
        self.assertEqual([status for status, _ in self.records.lines], [200])

    def test_zero_window_buffered_frees_the_app_at_once(self) -> None:
        """Buffered, the app's connection is free while the window is 0; the stream goes after send_timeout."""
        self.answer(b"")
        for _ in range(12):
            self.app.dataReceived(bytes(65536))
        self.assertEqual(self.handler.pools[0]._idle, [self.app])
        self.reactor.advance(21)
        self.pump()
        self.assertTrue(self.reset())
        self.assertEqual((self.handler.response_buffers.files, self.handler.response_buffers.in_memory), (0, 0))


class GarbageTests(SynchronousTestCase):
    def test_finished_requests_leave_no_reference_cycles(self) -> None:
        """Each proxied request is freed by reference counting alone: nothing is left for the GC."""
        self.check_no_cycles(b"GET /x HTTP/1.1\r\nHost: app.test\r\n\r\n")

    def test_requests_with_bodies_leave_no_reference_cycles(self) -> None:
        """A request whose body was held (chunked, then sent with a length) is freed by reference counting too."""
        self.check_no_cycles(
            b"POST /x HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )

    def check_no_cycles(self, request: bytes) -> None:
        import gc

        from tlsproxy.http.server import HTTP11ServerProtocol, Limits

        reactor = MemoryReactorClock()
        site = Site(hosts=("app.test",), upstream=parse_upstream("http://127.0.0.1:8000"), tls="files")
        handler = ProxyHandler(reactor, [site], Server())
        client = HTTP11ServerProtocol(handler, reactor, Limits(), secure=True)
        client.makeConnection(StringTransport())
        response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
        client.dataReceived(request)
        app = reactor.tcpClients[-1][2].buildProtocol(None)
        app.makeConnection(StringTransport())
        app.dataReceived(response)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(50):
                client.dataReceived(request)
                app.dataReceived(response)
            gc.collect()
            left = [type(o).__name__ for o in gc.garbage]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        self.assertEqual(len(reactor.tcpClients), 1)  # the one pooled connection served them all
        self.assertEqual(left, [])


class OnlyWebSocketTests(SynchronousTestCase):
    def setUp(self) -> None:
        from tlsproxy.http.server import HTTP11ServerProtocol, Limits

        self.reactor = MemoryReactorClock()
        site = Site(hosts=("app.test",), upstream=parse_upstream("http://127.0.0.1:8000"), tls="files")
        self.client = HTTP11ServerProtocol(ProxyHandler(self.reactor, [site], Server()), self.reactor, Limits(), True)
        self.client_wire = StringTransport()
        self.client.makeConnection(self.client_wire)

    def app(self) -> tuple[Any, StringTransport]:
        app = self.reactor.tcpClients[-1][2].buildProtocol(None)
        wire = StringTransport()
        app.makeConnection(wire)
        return app, wire

    def test_h2c_upgrade_is_not_forwarded_and_a_101_is_refused(self) -> None:
        """Upgrade: h2c reaches the app as a plain request; a 101 to it is a 502, and no raw bytes flow."""
        self.client.dataReceived(
            b"GET /x HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
        )
        app, wire = self.app()
        sent = wire.value().lower()
        self.assertNotIn(b"upgrade", sent)
        self.assertNotIn(b"connection:", sent)
        app.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
        self.assertTrue(self.client_wire.value().startswith(b"HTTP/1.1 502 "), self.client_wire.value()[:40])
        wire.clear()
        self.client.dataReceived(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        self.assertEqual(wire.value(), b"")

    def test_websocket_upgrade_still_tunnels(self) -> None:
        """Upgrade: websocket is forwarded, and after the app's 101 bytes flow both ways."""
        self.client.dataReceived(
            b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        app, wire = self.app()
        self.assertIn(b"upgrade: websocket\r\n", wire.value())
        app.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        self.assertTrue(self.client_wire.value().startswith(b"HTTP/1.1 101 "))
        wire.clear()
        self.client.dataReceived(b"\x81\x05hello")
        self.assertEqual(wire.value(), b"\x81\x05hello")


class HostTests(SynchronousTestCase):
    setUp = HandlerTests.setUp

    def test_host_with_trailing_dot_reaches_its_site(self) -> None:
        """Host: app.test. is served by the site of app.test, not answered 404."""
        exchange = FakeExchange(RequestHead(b"GET", b"/x", b"1.1", b"app.test.", [(b"host", b"app.test.")]))
        self.handler.handle(exchange)
        self.assertIsNone(exchange.status)
        self.assertEqual(len(self.reactor.tcpClients), 1)


def chunked_head(method: bytes = b"POST", extra: list[tuple[bytes, bytes]] | None = None) -> RequestHead:
    headers = [(b"host", b"app.test"), (b"transfer-encoding", b"chunked"), *(extra or [])]
    return RequestHead(method, b"/x", b"1.1", b"app.test", headers, None, chunked=True)


class BufferingTests(SynchronousTestCase):
    """Request bodies are held whole, then sent with a Content-Length."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.patch(FakeExchange, "clock", self.reactor)
        self.server = Server(connect_timeout=5, upstream_timeout=30, body_timeout=20, state_dir=scratch(self))

    def handler(self, **site: Any) -> ProxyHandler:
        upstream = parse_upstream("http://127.0.0.1:8000")
        kw: dict[str, Any] = {"max_body_size": 10 * 1024 * 1024, **site}
        return ProxyHandler(
            self.reactor, [Site(hosts=("app.test",), upstream=upstream, tls="files", **kw)], self.server
        )

    def open_upload(self, handler: ProxyHandler, head: RequestHead) -> tuple[FakeExchange, Any]:
        exchange = FakeExchange(head)
        exchange.body_ends = False
        consumers: list[Any] = []
        exchange.set_body_consumer = consumers.append  # type: ignore[method-assign]
        handler.handle(exchange)
        return exchange, consumers[0] if consumers else None

    def app(self) -> tuple[Any, StringTransport]:
        protocol = self.reactor.tcpClients[-1][2].buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_chunked_body_reaches_the_app_whole_with_content_length(self) -> None:
        """The app is not contacted before the body's end, then gets it with Content-Length and no chunking."""
        _, consumer = self.open_upload(self.handler(), chunked_head())
        for piece in (b"a" * 700_000, b"b" * 700_000, b"c"):
            consumer.body_data(piece)
        self.assertEqual(self.reactor.tcpClients, [], "no app contact before the body is whole")
        consumer.body_end()
        _, wire = self.app()
        head, _, body = wire.value().partition(b"\r\n\r\n")
        self.assertIn(b"content-length: 1400001\r\n", head.lower() + b"\r\n")
        self.assertNotIn(b"transfer-encoding", head.lower())
        self.assertEqual(body, b"a" * 700_000 + b"b" * 700_000 + b"c")

    def test_unknown_length_is_buffered_even_with_buffering_off(self) -> None:
        """With request_buffering = false a body of unknown length still reaches the app whole, never empty."""
        _, consumer = self.open_upload(self.handler(request_buffering=False), chunked_head())
        consumer.body_data(b"x" * 2_000_000)
        self.assertEqual(self.reactor.tcpClients, [])
        consumer.body_end()
        _, wire = self.app()
        self.assertIn(b"content-length: 2000000\r\n", wire.value())
        self.assertTrue(wire.value().endswith(b"x" * 2_000_000))

    def test_buffering_off_streams_a_known_length(self) -> None:
        """With request_buffering = false a large body of known length goes to the app as it comes, 100 first."""
        headers = [(b"host", b"app.test"), (b"expect", b"100-continue")]
        head = RequestHead(b"POST", b"/x", b"1.1", b"app.test", headers, 3_000_000)
        exchange = FakeExchange(head)
        continues: list[bool] = []
        exchange.send_continue = lambda: continues.append(True)  # type: ignore[attr-defined]
        consumers: list[Any] = []
        exchange.set_body_consumer = consumers.append  # type: ignore[method-assign]
        self.handler(request_buffering=False).handle(exchange)
        self.assertEqual((consumers, continues), ([], [True]), "the body is taken only once the app is connected")
        _, wire = self.app()
        self.assertIn(b"content-length: 3000000\r\n", wire.value())
        self.assertNotIn(b"expect", wire.value().lower())
        consumers[0].body_data(b"x" * 1000)
        self.assertTrue(wire.value().endswith(b"\r\n\r\n" + b"x" * 1000), "streamed at once, not held")

    def test_chunked_body_over_the_limit_is_413(self) -> None:
        """A body of unknown length is refused with 413 as soon as it passes max_body_size, without the app."""
        exchange, consumer = self.open_upload(self.handler(max_body_size=1000), chunked_head())
        consumer.body_data(b"x" * 600)
        self.assertIsNone(exchange.status)
        consumer.body_data(b"x" * 600)
        self.assertEqual((exchange.status, self.reactor.tcpClients), (413, []))

    def test_expect_100_continue_is_answered_by_us(self) -> None:
        """Expect: 100-continue gets our 100 Continue once we take the body, and the app never sees Expect."""
        continues: list[bool] = []
        head = chunked_head(extra=[(b"expect", b"100-Continue")])
        exchange = FakeExchange(head, b"hello")
        exchange.send_continue = lambda: continues.append(True)  # type: ignore[attr-defined]
        self.handler().handle(exchange)
        self.assertEqual(continues, [True])
        _, wire = self.app()
        self.assertNotIn(b"expect", wire.value().lower())
        self.assertTrue(wire.value().endswith(b"\r\n\r\nhello"))

    def test_expect_over_the_limit_is_413_without_continue(self) -> None:
        """A Content-Length over max_body_size with Expect: 100-continue gets 413 and no 100."""
        continues: list[bool] = []
        headers = [(b"host", b"app.test"), (b"expect", b"100-continue"), (b"content-length", b"5000")]
        exchange = FakeExchange(RequestHead(b"POST", b"/x", b"1.1", b"app.test", headers, 5000))
        exchange.send_continue = lambda: continues.append(True)  # type: ignore[attr-defined]
        self.handler(max_body_size=1000).handle(exchange)
        self.assertEqual((exchange.status, continues), (413, []))

    def test_stalled_body_is_408(self) -> None:
        """A body that stops arriving is answered 408 after body_timeout, and the app is never contacted."""
        exchange, consumer = self.open_upload(self.handler(), chunked_head())
        consumer.body_data(b"x" * 10)
        self.reactor.advance(19)
        consumer.body_data(b"x" * 10)
        self.reactor.advance(19)
        self.assertIsNone(exchange.status, "bytes still arriving keep the request alive")
        self.reactor.advance(2)
        self.assertEqual((exchange.status, self.reactor.tcpClients), (408, []))

    def test_full_disk_is_507_and_frees_the_body(self) -> None:
        """A body that cannot be written gets a plain 507 page, and its buffer is given back."""
        handler = self.handler()

        def no_room(fd: int, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        handler.request_buffers.write = no_room  # type: ignore[method-assign]
        exchange, consumer = self.open_upload(handler, chunked_head())
        consumer.body_data(b"x" * 2_000_000)
        self.assertEqual(exchange.status, 507)
        self.assertIn(b"no room", exchange.body)
        self.assertNotIn(b"Traceback", exchange.body)
        buffers = handler.request_buffers
        self.assertEqual((buffers.held, buffers.files, self.reactor.tcpClients), (0, 0, []))
        consumer.body_data(b"x" * 10)
        consumer.body_end()
        self.assertEqual(self.reactor.tcpClients, [])


class SlowDiskTests(SynchronousTestCase):
    def test_slow_disk_is_not_a_408(self) -> None:
        """A whole body still being written by a slow disk is not timed out as the client's fault."""
        reactor = MemoryReactorClock()
        self.patch(FakeExchange, "clock", reactor)
        site = Site(hosts=("app.test",), upstream=parse_upstream("http://127.0.0.1:8000"), tls="files")
        handler = ProxyHandler(reactor, [site], Server(body_timeout=60, state_dir=scratch(self)))
        threads = FakeThreads()
        handler.request_buffers.run_in_thread = threads
        exchange = FakeExchange(chunked_head(), b"x" * 2_000_000)
        handler.handle(exchange)
        reactor.advance(120)
        self.assertEqual((exchange.status, reactor.tcpClients), (None, []))
        threads.run_all()
        self.assertEqual(len(reactor.tcpClients), 1, "dialled once the body is on disk")


class ContinueOnTheWireTests(SynchronousTestCase):
    """Expect: 100-continue through the real HTTP/1.1 server protocol."""

    def client(self) -> tuple[Any, StringTransport, MemoryReactorClock]:
        from tlsproxy.http.server import HTTP11ServerProtocol, Limits

        reactor = MemoryReactorClock()
        site = Site(hosts=("app.test",), upstream=parse_upstream("http://127.0.0.1:8000"), tls="files")
        handler = ProxyHandler(reactor, [site], Server(state_dir=scratch(self)))
        protocol = HTTP11ServerProtocol(handler, reactor, Limits(), secure=True)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport, reactor

    def test_100_continue_before_the_body_then_the_answer(self) -> None:
        """An HTTP/1.1 client waiting on Expect gets exactly one 100 Continue, and then the app's answer."""
        protocol, transport, reactor = self.client()
        protocol.dataReceived(
            b"POST /x HTTP/1.1\r\nHost: app.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        protocol.dataReceived(b"hello")
        app = reactor.tcpClients[-1][2].buildProtocol(None)
        wire = StringTransport()
        app.makeConnection(wire)
        self.assertNotIn(b"expect", wire.value().lower())
        app.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(transport.value().count(b"100 Continue"), 1)
        self.assertTrue(transport.value().endswith(b"\r\n\r\nok"))

    def test_no_100_for_http_10(self) -> None:
        """An HTTP/1.0 client never gets a 100 (RFC 9110 15.2), Expect or not."""
        protocol, transport, _ = self.client()
        protocol.dataReceived(
            b"POST /x HTTP/1.0\r\nHost: app.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        self.assertEqual(transport.value(), b"")

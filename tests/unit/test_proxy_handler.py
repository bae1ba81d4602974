"""The proxy relay against a MemoryReactorClock: dialling, failures, retries, timeouts."""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.config import HSTS, Server, Site, parse_upstream
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


def head(method: bytes = b"GET", body: bytes = b"") -> RequestHead:
    headers = [(b"host", b"app.test")]
    if body:
        headers.append((b"content-length", b"%d" % len(body)))
    return RequestHead(method, b"/x", b"1.1", b"app.test", headers, len(body) if body else None)


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

    def log(self, exchange: Any, status: int, size: int) -> None:
        self.lines.append((status, size))


class ResponseSideTests(SynchronousTestCase):
    """Buffered answers, the send timeout, framing surprises, and requests that end badly."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.patch(FakeExchange, "clock", self.reactor)
        self.server = Server(connect_timeout=5, upstream_timeout=30, send_timeout=20, buffer_dir=self.mktemp())
        self.handler = self.make_handler()

    def make_handler(self, **site: Any) -> ProxyHandler:
        from tlsproxy.metrics import Metrics

        upstream = parse_upstream("http://127.0.0.1:8000")
        self.records = Records()
        self.metrics = Metrics()
        sites = [Site(hosts=("app.test",), upstream=upstream, tls="files", **site)]
        return ProxyHandler(self.reactor, sites, self.server, access_log=self.records, metrics=self.metrics)  # type: ignore[arg-type]

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
        self.assertEqual((self.handler.buffers.files, self.handler.buffers.in_memory), (0, 0))

    def test_buffer_file_closed_when_the_client_caught_up(self) -> None:
        """A buffer the client emptied before the app's end still closes its file when the answer ends."""
        exchange = self.request()
        app, _ = self.connect()
        body = self.big_answer(app, 1024 * 1024)
        exchange.producer.pauseProducing()
        app.dataReceived(body[:600_000])
        self.assertEqual(self.handler.buffers.files, 1)
        exchange.producer.resumeProducing()
        app.dataReceived(body[600_000:])
        self.assertEqual(exchange.body, body)
        self.assertEqual((self.handler.buffers.files, self.handler.buffers.in_memory), (0, 0))

    def test_past_the_cap_the_app_waits(self) -> None:
        """Past max_response_buffer, the app is paused until the client reads (back-pressure as before)."""
        self.server = Server(upstream_timeout=30, max_response_buffer=300_000, buffer_dir=self.mktemp())
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
        self.assertEqual(self.handler.buffers.files, 1)
        self.reactor.advance(21)
        self.assertTrue(exchange.aborted)
        self.assertEqual((self.handler.buffers.files, self.handler.buffers.in_memory), (0, 0))
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
        self.assertEqual((self.handler.buffers.files, self.handler.buffers.in_memory), (0, 0))

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
        server = Server(upstream_timeout=30, send_timeout=20, buffer_dir=self.mktemp())
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
        self.assertEqual((self.handler.buffers.files, self.handler.buffers.in_memory), (0, 0))


class GarbageTests(SynchronousTestCase):
    def test_finished_requests_leave_no_reference_cycles(self) -> None:
        """Each proxied request is freed by reference counting alone: nothing is left for the GC."""
        import gc

        from tlsproxy.http.server import HTTP11ServerProtocol, Limits

        reactor = MemoryReactorClock()
        site = Site(hosts=("app.test",), upstream=parse_upstream("http://127.0.0.1:8000"), tls="files")
        handler = ProxyHandler(reactor, [site], Server())
        client = HTTP11ServerProtocol(handler, reactor, Limits(), secure=True)
        client.makeConnection(StringTransport())
        request = b"GET /x HTTP/1.1\r\nHost: app.test\r\n\r\n"
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

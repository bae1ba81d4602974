"""The HTTP/1.1 server protocol against a StringTransport: limits, smuggling, order."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.http import pages, server
from tlsproxy.http.negotiate import NegotiatingFactory
from tlsproxy.http.server import HTTP11ServerProtocol, Limits


class Recorder:
    """A handler that remembers requests and answers 200 with the body it read."""

    def __init__(self, answer: bool = True) -> None:
        self.exchanges: list = []
        self.answer = answer

    def handle(self, exchange) -> None:  # type: ignore[no-untyped-def]
        self.exchanges.append(exchange)
        if self.answer:
            exchange.set_body_consumer(BodyCollector(exchange))


class BodyCollector:
    def __init__(self, exchange) -> None:  # type: ignore[no-untyped-def]
        self.exchange = exchange
        self.body = b""

    def body_data(self, data: bytes) -> None:
        self.body += data

    def body_end(self) -> None:
        self.exchange.start_response(200, b"OK", [(b"X-Body", b"%d" % len(self.body))], len(self.body))
        self.exchange.write(self.body)
        self.exchange.finish()


class ServerTestCase(SynchronousTestCase):
    limits = Limits(max_request_line=200, max_header_size=1000, max_header_count=10, header_timeout=5, idle_timeout=30)

    def setUp(self) -> None:
        self.clock = Clock()
        self.handler = Recorder()
        self.proto = HTTP11ServerProtocol(self.handler, self.clock, self.limits, secure=False)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def feed(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        out = self.transport.value()
        self.transport.clear()
        return out

    def assertRefused(self, data: bytes, status: int) -> None:
        out = self.feed(data)
        self.assertTrue(out.startswith(b"HTTP/1.1 %d " % status), out[:80])
        self.assertIn(b"Connection: close", out)
        self.assertEqual(self.handler.exchanges, [])
        # It lingers briefly so the client can read the answer, then closes.
        self.clock.advance(self.limits.linger)
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)


class RequestTests(ServerTestCase):
    def test_simple_get(self) -> None:
        """A GET reaches the handler with its method, target, host and headers."""
        out = self.feed(b"GET /a?b=1 HTTP/1.1\r\nHost: Example.COM\r\nX-Thing: yes\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"))
        (exchange,) = self.handler.exchanges
        self.assertEqual(exchange.head.method, b"GET")
        self.assertEqual(exchange.head.target, b"/a?b=1")
        self.assertEqual(exchange.head.host, b"example.com")
        self.assertIn((b"x-thing", b"yes"), exchange.head.headers)

    def test_pipelined_requests_answered_in_order(self) -> None:
        """Two pipelined requests get two responses, in order."""
        out = self.feed(
            b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
            b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nz"
        )
        self.assertEqual(out.count(b"HTTP/1.1 200 OK"), 2)
        self.assertLess(out.index(b"X-Body: 3"), out.index(b"X-Body: 1"))

    def test_chunked_body(self) -> None:
        """A chunked request body is de-chunked for the handler."""
        out = self.feed(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        self.assertIn(b"X-Body: 5", out)
        self.assertTrue(out.endswith(b"abcde"))

    def test_http10_closes(self) -> None:
        """An HTTP/1.0 request without keep-alive is answered and the connection closed."""
        out = self.feed(b"GET / HTTP/1.0\r\n\r\n")
        self.assertIn(b"Connection: close", out)
        self.assertTrue(self.transport.disconnecting)

    def test_chunked_response_for_unknown_length(self) -> None:
        """A response of unknown length is chunked on HTTP/1.1."""
        self.handler.answer = False
        self.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        exchange = self.handler.exchanges[0]
        exchange.start_response(200, b"OK", [], None)
        exchange.write(b"hello")
        exchange.finish()
        out = self.transport.value()
        self.assertIn(b"Transfer-Encoding: chunked", out)
        self.assertTrue(out.endswith(b"5\r\nhello\r\n0\r\n\r\n"))

    def test_absolute_form_target(self) -> None:
        """An absolute-form target becomes origin-form, and its authority the host."""
        self.feed(b"GET http://other.test/x HTTP/1.1\r\nHost: ignored.test\r\n\r\n")
        head = self.handler.exchanges[0].head
        self.assertEqual((head.host, head.target), (b"other.test", b"/x"))


class UpgradeAndPipelineTests(ServerTestCase):
    def test_bytes_before_101_reach_the_tunnel(self) -> None:
        """What a client sends after an Upgrade head, before the 101, is kept for the tunnel."""
        self.handler.answer = False
        self.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nFIRST")
        self.assertEqual(self.feed(b"SECOND"), b"")
        exchange = self.handler.exchanges[0]
        exchange.start_response(101, b"Switching Protocols", [(b"upgrade", b"websocket")], None)
        peer = StringTransport()
        exchange.start_tunnel(peer)
        self.proto.dataReceived(b"THIRD")
        self.assertEqual(peer.value(), b"FIRSTSECONDTHIRD")

    def test_h2c_upgrade_is_served_as_a_plain_request(self) -> None:
        """Upgrade: h2c is no tunnel: the request is answered as HTTP/1.1 and the next bytes are the next request."""
        out = self.feed(
            b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        self.assertEqual([e.head.target for e in self.handler.exchanges], [b"/a", b"/b"])
        self.assertEqual(self.handler.exchanges[0].head.upgrade, b"")
        self.assertEqual(out.count(b"HTTP/1.1 200 "), 2)
        self.assertNotIn(b"Connection: close", out)

    def test_bad_pipelined_request_does_not_cut_response_in_flight(self) -> None:
        """A malformed request behind one being answered lets that answer finish, then closes."""
        self.handler.answer = False
        self.feed(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        self.feed(b"BROKEN \x00\r\n\r\n")
        exchange = self.handler.exchanges[0]
        exchange.start_response(200, b"OK", [], 4)
        self.clock.advance(10)
        self.assertFalse(self.transport.disconnecting)
        exchange.write(b"done")
        exchange.finish()
        self.assertTrue(self.transport.value().endswith(b"done"))
        # The client may still be sending: it lingers, then closes.
        self.clock.advance(self.limits.linger)
        self.assertTrue(self.transport.disconnecting)

    def test_app_resume_does_not_lift_the_pipeline_pause(self) -> None:
        """Reading stays paused while a pipelined request waits, whatever the app's back-pressure does."""
        self.handler.answer = False
        self.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        first = self.handler.exchanges[0]
        self.assertEqual(self.transport.producerState, "paused")
        first.pause_body()
        first.resume_body()
        self.assertEqual(self.transport.producerState, "paused")
        first.start_response(200, b"OK", [], 0)
        first.finish()
        self.assertEqual(len(self.handler.exchanges), 2)
        self.assertEqual(self.transport.producerState, "producing")


class SmugglingTests(ServerTestCase):
    def test_content_length_and_chunked(self) -> None:
        """Content-Length with Transfer-Encoding is refused."""
        self.assertRefused(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400
        )

    def test_duplicate_content_length(self) -> None:
        """Two Content-Length headers are refused, even when equal."""
        self.assertRefused(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400)

    def test_signed_content_length(self) -> None:
        """A signed Content-Length is refused."""
        self.assertRefused(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx", 400)

    def test_transfer_encoding_on_http10(self) -> None:
        """Transfer-Encoding on HTTP/1.0 is refused."""
        self.assertRefused(b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400)

    def test_unknown_transfer_coding(self) -> None:
        """A coding other than chunked is not implemented."""
        self.assertRefused(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501)

    def test_missing_host(self) -> None:
        """HTTP/1.1 without Host is refused."""
        self.assertRefused(b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400)

    def test_double_host(self) -> None:
        """Two Host headers are refused."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400)

    def test_obs_fold(self) -> None:
        """A folded header line is refused."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400)

    def test_bare_lf(self) -> None:
        """A bare LF line ending in the head is refused."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n", 400)

    def test_host_with_path_characters(self) -> None:
        """A Host with a slash or @ in it is refused."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: a/b@c\r\n\r\n", 400)

    def test_connect_refused(self) -> None:
        """CONNECT is not a reverse proxy's method."""
        self.assertRefused(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405)

    def test_http2_version_line(self) -> None:
        """An HTTP/2.0 request line over HTTP/1 is refused."""
        self.assertRefused(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505)


class LimitTests(ServerTestCase):
    def test_long_request_line(self) -> None:
        """A request line over the limit gets 414 at once."""
        self.assertRefused(b"GET /" + b"a" * 300, 414)

    def test_long_request_line_in_a_whole_head(self) -> None:
        """A request line over the limit gets 414 when the whole head comes in one read, too."""
        self.assertRefused(b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414)

    def short_line_server(self) -> tuple[HTTP11ServerProtocol, StringTransport]:
        """A server whose header lines may be 100 bytes at most."""
        proto = HTTP11ServerProtocol(self.handler, self.clock, Limits(max_header_line=100), secure=False)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_long_header_line_in_a_whole_head(self) -> None:
        """A header line over the limit gets 431 when the whole head comes in one read."""
        proto, transport = self.short_line_server()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: " + b"v" * 120 + b"\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "))

    def test_huge_header_line_answered_at_once(self) -> None:
        """A header line over the head limit gets 431 before it even ends."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 1500, 431)

    def test_complete_long_header_line_with_head_unfinished(self) -> None:
        """A whole header line over the line limit gets 431 even before the head ends."""
        proto, transport = self.short_line_server()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: " + b"v" * 120 + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "))

    def test_long_body_then_pipelined_head_is_not_a_long_line(self) -> None:
        """Body bytes before a pipelined head in one read do not count as a header line."""
        self.handler.answer = False
        proto, transport = self.short_line_server()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 300\r\n\r\n" + b"b" * 200)
        proto.dataReceived(b"b" * 100 + b"GET /next HTTP/1.1\r\nHost: a\r\n")
        self.assertEqual(transport.value(), b"")

    def test_too_many_headers(self) -> None:
        """More header fields than allowed gets 431."""
        self.assertRefused(
            b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(11)) + b"\r\n", 431
        )

    def test_slowloris_deadline_does_not_restart(self) -> None:
        """Trickling a head byte by byte does not extend the head deadline."""
        self.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        for _ in range(4):
            self.clock.advance(1)
            self.feed(b"a")
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(1)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 408 "))

    def test_idle_connection_closed(self) -> None:
        """A connection that never sends anything is closed after the idle timeout."""
        self.clock.advance(self.limits.idle_timeout)
        self.assertTrue(self.transport.disconnecting)

    def test_next_request_after_refusal_is_not_read(self) -> None:
        """After a refusal, bytes already sent for a next request are dropped, not answered."""
        out = self.feed(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(out.count(b"HTTP/1.1 "), 1)
        self.assertEqual(self.handler.exchanges, [])


class GoneObserver:
    """Remembers that the server told the handler its client is gone."""

    gone = False

    def client_gone(self) -> None:
        self.gone = True


class HalfClosingTransport(StringTransport):
    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class BodyDeadlineTests(ServerTestCase):
    limits = Limits(header_timeout=5, idle_timeout=30, body_timeout=20, linger=3)

    def dispatched(self, data: bytes) -> GoneObserver:
        out = self.feed(data)
        self.assertEqual(out, b"")
        observer = GoneObserver()
        self.handler.exchanges[0].set_observer(observer)
        return observer

    def test_stalled_body_answered_408_and_closed(self) -> None:
        """A body that stops arriving gets 408 after body_timeout, the handler lets go, the connection ends."""
        observer = self.dispatched(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        self.clock.advance(19)
        self.feed(b"de")  # bytes still coming: the deadline moves
        self.clock.advance(19)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(1.5)
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 408 "), out[:40])
        self.assertIn(b"Connection: close", out)
        self.assertTrue(observer.gone)
        self.clock.advance(self.limits.linger)
        self.assertTrue(self.transport.disconnecting)

    def test_stalled_body_after_response_started_is_cut(self) -> None:
        """A body that stalls once the answer has begun ends the connection at once."""
        self.handler.answer = False
        self.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        exchange = self.handler.exchanges[0]
        exchange.set_body_consumer(BodyCollector(exchange))
        exchange.start_response(200, b"OK", [], None)
        self.clock.advance(self.limits.body_timeout + 1)
        self.assertTrue(self.transport.disconnected)

    def test_body_not_timed_while_we_stopped_reading(self) -> None:
        """While the app's back-pressure pauses reading, the body deadline does not fire."""
        self.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        self.handler.exchanges[0].pause_body()
        self.clock.advance(self.limits.body_timeout * 3)
        self.assertEqual(self.transport.value(), b"")
        self.assertFalse(self.transport.disconnecting)

    def test_bad_chunk_size_after_dispatch_answered_400(self) -> None:
        """A malformed chunk-size line of a dispatched request gets a 400 and a close, and the handler lets go."""
        observer = self.dispatched(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        out = self.feed(b"zz\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:40])
        self.assertIn(b"Connection: close", out)
        self.assertTrue(observer.gone)
        self.clock.advance(self.limits.linger)
        self.assertTrue(self.transport.disconnecting)

    def test_bad_chunk_size_after_response_started_aborts(self) -> None:
        """A malformed chunk-size line once the answer has begun cuts the connection."""
        self.handler.answer = False
        self.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        exchange = self.handler.exchanges[0]
        exchange.set_body_consumer(BodyCollector(exchange))
        exchange.start_response(200, b"OK", [], None)
        self.feed(b"5;=\r\n")
        self.assertTrue(self.transport.disconnected)


class LingeringCloseTests(ServerTestCase):
    limits = Limits(max_header_size=1000, idle_timeout=30, linger=3, linger_quiet=1, linger_bytes=10000)

    def test_refused_client_still_sending_is_read_before_the_close(self) -> None:
        """After a 431 the connection reads and drops while the client sends, and closes gently once it is quiet."""
        out = self.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 1100)
        self.assertTrue(out.startswith(b"HTTP/1.1 431 "))
        for _ in range(4):
            self.clock.advance(0.5)
            self.assertEqual(self.feed(b"a" * 500), b"")
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.transport.producerState, "producing")
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.disconnected)  # a close, not an abort
        self.assertEqual(self.handler.exchanges, [])

    def test_lingering_is_bounded_in_time(self) -> None:
        """A refused client that never stops sending is cut when the linger time is over."""
        self.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 1100)
        for _ in range(5):
            self.clock.advance(0.5)
            self.feed(b"a")
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.5)
        self.feed(b"a")
        self.assertTrue(self.transport.disconnected)

    def test_lingering_is_bounded_in_bytes(self) -> None:
        """A refused client that keeps sending past linger_bytes is cut before the linger time ends."""
        self.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 1100)
        self.feed(b"a" * 6000)
        self.assertFalse(self.transport.disconnecting)
        self.feed(b"a" * 6000)
        self.assertTrue(self.transport.disconnected)

    def test_tcp_side_is_shut_down_while_lingering(self) -> None:
        """On a transport that can half-close, our side ends right after the answer, so the client sees its end."""
        self.transport = HalfClosingTransport()
        self.proto = HTTP11ServerProtocol(self.handler, self.clock, self.limits, secure=False)
        self.proto.makeConnection(self.transport)
        self.proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(self.transport.write_closed)
        self.assertFalse(self.transport.disconnecting)

    def test_early_answer_to_a_body_still_coming_lingers(self) -> None:
        """A handler's early 413 to a body still being sent is followed by lingering, not an instant close."""
        self.handler.answer = False
        self.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100)
        pages.send(self.handler.exchanges[0], 413)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 413 "))
        self.feed(b"x" * 500)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(self.limits.linger)
        self.assertTrue(self.transport.disconnecting)


class FakeTLS:
    """What NegotiatingFactory sees of a TLS connection."""

    negotiatedProtocol = b"http/1.1"
    handshake_done = True


class FirstHeadDeadlineTests(ServerTestCase):
    def test_silent_connection_closed_after_header_timeout(self) -> None:
        """A client that sends nothing is closed after header_timeout (not idle_timeout), without an answer."""
        self.clock.advance(self.limits.header_timeout - 0.5)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.5)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"")

    def test_first_head_deadline_counts_from_the_tls_connection(self) -> None:
        """Over TLS the first head is due header_timeout after the TCP connection, the handshake included."""
        app = NegotiatingFactory(Recorder(), self.clock, self.limits)
        tls = FakeTLS()
        app.connection_made(tls)
        self.clock.advance(3)  # the handshake
        proto = app.protocol_for(tls)
        assert isinstance(proto, HTTP11ServerProtocol)
        transport = StringTransport()
        proto.makeConnection(transport)
        app.handshake_done(tls, proto)
        proto.dataReceived(b"GET / HTTP/1.1\r\n")  # a head begun is no reason to wait longer
        self.clock.advance(self.limits.header_timeout - 3 - 0.5)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.5)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))

    def test_keep_alive_wait_is_idle_timeout(self) -> None:
        """Between requests on a kept-alive connection the wait is idle_timeout, as before."""
        self.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.clock.advance(self.limits.idle_timeout - 1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)


class TrickledHeadTests(SynchronousTestCase):
    limits = Limits(max_header_size=40000, max_header_line=40000, header_timeout=5, idle_timeout=30)

    def setUp(self) -> None:
        self.handler = Recorder()
        self.proto = HTTP11ServerProtocol(self.handler, Clock(), self.limits, secure=False)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def test_head_trickled_one_byte_per_read_costs_linear_work(self) -> None:
        """A 30 KiB head sent one byte per read is searched about once per byte, not once per read."""
        head = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 320) for i in range(95))
        head += b"\r\n"
        self.assertGreater(len(head), 30000)
        limit_work: list[int] = []
        real_check = server.check_head_limits

        def counting_check(data, *args):  # type: ignore[no-untyped-def]
            limit_work.append(len(data))
            return real_check(data, *args)

        self.patch(server, "check_head_limits", counting_check)
        scanners = []
        for i in range(len(head)):
            self.proto.dataReceived(head[i : i + 1])
            if self.proto._pending is not None and not scanners:
                scanners.append(self.proto._pending)
        self.assertEqual(len(self.handler.exchanges), 1)
        self.assertEqual(len(self.handler.exchanges[0].head.headers), 96)
        self.assertLessEqual(sum(limit_work), 2 * len(head))
        self.assertLessEqual(scanners[0].examined, 2 * len(head))

    def test_limits_hold_for_a_trickled_head(self) -> None:
        """Split into reads, a head still gets 414, 431 for a long line and 431 for too many fields."""
        cases = [
            (Limits(max_request_line=50), b"GET /" + b"a" * 60, 414),
            (Limits(max_header_line=50), b"GET / HTTP/1.1\r\nX: " + b"a" * 60, 431),
            (Limits(max_header_size=100), b"GET / HTTP/1.1\r\n" + b"X: aaaaaaaaaaaaaaaa\r\n" * 6, 431),
            (Limits(max_header_count=3), b"GET / HTTP/1.1\r\n" + b"X: a\r\n" * 5, 431),
        ]
        for limits, data, status in cases:
            proto = HTTP11ServerProtocol(Recorder(), Clock(), limits, secure=False)
            transport = StringTransport()
            proto.makeConnection(transport)
            for i in range(0, len(data), 7):
                proto.dataReceived(data[i : i + 7])
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 %d " % status), (status, transport.value()[:40]))

    def test_empty_lines_before_a_trickled_request_line_are_skipped(self) -> None:
        """CRLFs before the request line, split across reads, do not spoil the request."""
        for byte in b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n":
            self.proto.dataReceived(bytes([byte]))
        self.assertEqual(len(self.handler.exchanges), 1)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 "))


class PagesTests(SynchronousTestCase):
    def test_page_escapes_message(self) -> None:
        """Error pages escape what they show."""
        self.assertIn(b"&lt;script&gt;", pages.render(502, "<script>"))
        self.assertNotIn(b"Traceback", pages.render(500))

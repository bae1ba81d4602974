"""The HTTP/2 server protocol driven by the h2 library's own client, in memory."""

from __future__ import annotations

from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ResponseReceived
from h2.settings import SettingCodes
from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
from hyperframe.frame import Frame, HeadersFrame, PingFrame, SettingsFrame
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.eventloop import as_one_batch
from tlsproxy.http import pages
from tlsproxy.http.exchange import Headers, RequestHead
from tlsproxy.http.h2 import (
    _FORBIDDEN_IN_REQUEST,
    _REQUEST_PSEUDO,
    _WHITESPACE,
    CONNECTION_WINDOW,
    CONTROL_BURST,
    MAX_STREAMS,
    RESET_BURST,
    RESET_WINDOW,
    STREAM_WINDOW,
    H2ServerProtocol,
    MalformedRequest,
    ResponseEncoder,
    parse_request,
    py_parse_request,
)
from tlsproxy.http.server import Limits, valid_host
from tlsproxy.http.wire import RequestError, valid_field
from tlsproxy.speedups import speedups

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frames(data: bytes) -> list[Any]:
    """The HTTP/2 frames in ``data``."""
    out = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        out.append(frame)
        data = data[9 + length :]
    return out


class Holding:
    """A handler that keeps every exchange and never reads bodies on its own."""

    def __init__(self) -> None:
        self.exchanges: list[Any] = []

    def handle(self, exchange: Any) -> None:
        self.exchanges.append(exchange)


class H2Tests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.handler = Holding()
        self.limits = Limits(idle_timeout=30)
        self.server = H2ServerProtocol(self.handler, self.clock, self.limits)
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)
        # The client sends what it is told, however malformed: the server is under test.
        config = H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self.client = H2Connection(config)
        self.client.initiate_connection()
        self.events: list[Any] = []
        self.pump()

    def pump(self) -> None:
        """Move bytes both ways until neither side has anything to say."""
        for _ in range(10):
            to_server = self.client.data_to_send()
            if to_server:
                self.server.dataReceived(to_server)
            to_client = self.transport.value()
            self.transport.clear()
            if to_client:
                self.events += self.client.receive_data(to_client)
            if not to_server and not to_client:
                return

    def goaway_received(self) -> int | None:
        """The error code of the GOAWAY our client has received, if it has."""
        from h2.events import ConnectionTerminated

        codes = [e.error_code for e in self.events if isinstance(e, ConnectionTerminated)]
        return codes[-1] if codes else None

    def assert_closes_once_quiet(self) -> None:
        """After our GOAWAY for an error the connection stays open for a silent client only linger_quiet."""
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(self.limits.linger_quiet)
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.disconnected)

    def request(self, method: bytes = b"GET", extra: list | None = None, end: bool = True) -> int:
        stream = self.client.get_next_available_stream_id()
        headers = [(b":method", method), (b":path", b"/x"), (b":scheme", b"https"), (b":authority", b"app.test")]
        self.client.send_headers(stream, headers + (extra or []), end_stream=end)
        self.pump()
        return stream

    def test_settings_reach_the_client(self) -> None:
        """The client learns our stream window from the one SETTINGS frame we send."""
        self.assertEqual(self.client.remote_settings.initial_window_size, STREAM_WINDOW)
        self.assertEqual(self.client.remote_settings.max_header_list_size, self.limits.max_header_size)

    def test_body_over_64k_flows(self) -> None:
        """A request body larger than the default 64 KiB window is taken whole."""
        stream = self.request(b"POST", [(b"content-length", b"300000")], end=False)
        exchange = self.handler.exchanges[0]
        received = bytearray()

        class Sink:
            def body_data(self, data: bytes) -> None:
                received.extend(data)

            def body_end(self) -> None:
                pages.send(exchange, 200)

        exchange.set_body_consumer(Sink())
        sent = 0
        while sent < 300000:
            window = min(self.client.local_flow_control_window(stream), 300000 - sent, 16384)
            self.assertGreater(window, 0, f"stuck after {sent} bytes")
            self.client.send_data(stream, b"a" * window, end_stream=sent + window == 300000)
            sent += window
            self.pump()
        self.assertEqual(len(received), 300000)
        self.assertTrue(any(isinstance(e, ResponseReceived) for e in self.events))

    def test_body_longer_than_content_length_resets_only_its_stream(self) -> None:
        """DATA beyond the declared Content-Length is a stream error: that stream is reset, the connection goes on."""
        from h2.events import StreamReset

        bad = []
        for _ in range(300):  # 300 x 16,000 bytes: more than the whole connection window, if it leaked
            stream = self.request(b"POST", [(b"content-length", b"5")], end=False)
            self.client.send_data(stream, b"x" * 16000, end_stream=True)
            self.pump()
            bad.append(stream)
            if len(bad) % 100 == 0:  # each reset counts (MadeYouReset): a new budget, this is about the window
                self.clock.advance(RESET_WINDOW)
        resets = [(e.stream_id, e.error_code) for e in self.events if isinstance(e, StreamReset)]
        self.assertEqual(resets, [(stream, 1) for stream in bad])  # 1: PROTOCOL_ERROR
        self.assertFalse(self.transport.disconnecting)
        good = self.request()
        pages.send(self.handler.exchanges[-1], 200)
        self.pump()
        self.assertEqual([e.stream_id for e in self.events if isinstance(e, ResponseReceived)], [good])

    def test_reset_uploads_give_window_back(self) -> None:
        """Body bytes held for streams the client resets are acknowledged: the connection window never runs dry."""
        start = self.client.outbound_flow_control_window
        for _ in range(120):  # 120 x 48 KB: more than the whole connection window
            stream = self.request(b"POST", [(b"content-length", b"3000000")], end=False)
            for _ in range(3):
                self.client.send_data(stream, b"a" * 16000)
            self.client.reset_stream(stream)
            self.pump()
        self.assertGreater(self.client.outbound_flow_control_window, start // 2)

    def test_idle_timeout_after_reset(self) -> None:
        """A connection whose last stream was reset still closes after the idle timeout."""
        stream = self.request()
        self.client.reset_stream(stream)
        self.pump()
        self.clock.advance(self.limits.idle_timeout)
        self.assertTrue(self.transport.disconnecting)

    def test_requests_file_no_timer_apiece(self) -> None:
        """Twenty answered requests make no reactor timer each; the idle timeout still closes the connection after."""
        calls = []
        call_later = self.clock.callLater
        self.clock.callLater = lambda *a, **kw: calls.append(a) or call_later(*a, **kw)  # type: ignore[method-assign]
        for _ in range(20):
            self.clock.advance(1)
            self.request()
            self.handler.exchanges.pop().respond(200, b"OK", [], b"hi")
            self.pump()
        self.assertLess(len(calls), 5)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(self.limits.idle_timeout - 1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)

    def test_drain_lets_open_streams_answer(self) -> None:
        """On shutdown: GOAWAY first, the open stream still gets its answer, then the close."""
        stream = self.request()
        self.server.drain()
        first = frames(self.transport.value())
        self.transport.clear()
        self.assertEqual([type(f).__name__ for f in first], ["GoAwayFrame"])
        self.assertEqual(first[0].last_stream_id, stream)
        self.assertFalse(self.transport.disconnecting)
        pages.send(self.handler.exchanges[0], 200)
        after = frames(self.transport.value())
        self.assertIn(("HeadersFrame", stream), [(type(f).__name__, f.stream_id) for f in after])
        self.assertTrue(any("END_STREAM" in f.flags and f.stream_id == stream for f in after))
        self.assertTrue(self.transport.disconnecting)

    def test_malformed_pseudo_headers_refused(self) -> None:
        """A :path that is not origin-form, or a foreign :scheme, gets 400 and never reaches the app."""
        for path, scheme in ((b"http://evil.test/admin", b"https"), (b"*", b"https"), (b"/x", b"gopher")):
            stream = self.client.get_next_available_stream_id()
            fields = [(b":method", b"GET"), (b":path", path), (b":scheme", scheme), (b":authority", b"app.test")]
            self.client.send_headers(stream, fields, end_stream=True)
            self.pump()
            (status,) = [
                dict(e.headers)[b":status"]
                for e in self.events
                if isinstance(e, ResponseReceived) and e.stream_id == stream
            ]
            self.assertEqual(status, b"400")
        self.assertEqual(self.handler.exchanges, [])

    def status_of(self, stream: int) -> bytes | int:
        """The :status our client got on ``stream``, or the RST_STREAM (or GOAWAY) error code."""
        from h2.events import ConnectionTerminated, StreamReset

        for e in self.events:
            if isinstance(e, ConnectionTerminated):
                return int(e.error_code)
            if isinstance(e, ResponseReceived) and e.stream_id == stream:
                return dict(e.headers)[b":status"]
            if isinstance(e, StreamReset) and e.stream_id == stream:
                return int(e.error_code)
        raise AssertionError(f"no answer on stream {stream}")

    def send_fields(self, fields: list, end: bool = True) -> int:
        stream = self.client.get_next_available_stream_id()
        self.client.send_headers(stream, fields, end_stream=end)
        self.pump()
        return stream

    def test_malformed_fields_are_reset_and_never_reach_the_app(self) -> None:
        """Fields the HTTP/1.1 grammar refuses (CR/LF/NUL/CTL, non-token names, bad :path) reset only their stream."""
        base = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"app.test")]
        path = [(b":path", b"/x")]
        cases = {
            "crlf-in-value": [*path, (b"x-a", b"1\r\nhost: evil.test")],
            "lf-in-value": [*path, (b"x-a", b"1\nx-b: 2")],
            "nul-in-value": [*path, (b"x-a", b"a\x00b")],
            "ctl-in-value": [*path, (b"x-a", b"a\x01b")],
            "del-in-value": [*path, (b"x-a", b"a\x7fb")],
            "space-in-name": [*path, (b"x a", b"1")],
            "colon-in-name": [*path, (b"x:a", b"1")],
            "paren-in-name": [*path, (b"x(a)", b"1")],
            "upper-case-name": [*path, (b"X-A", b"1")],
            "empty-name": [*path, (b"", b"1")],
            "leading-space": [*path, (b"x-a", b" 1")],
            "trailing-tab": [*path, (b"x-a", b"1\t")],
            "space-in-path": [(b":path", b"/x HTTP/1.1")],
            "crlf-in-path": [(b":path", b"/x\r\nx: y")],
            "hash-in-path": [(b":path", b"/x#frag")],
            "ctl-in-path": [(b":path", b"/x\x01")],
            "crlf-in-authority": [*path, (b"x-a", b"1")],
            "connection": [*path, (b"connection", b"close")],
            "keep-alive": [*path, (b"keep-alive", b"300")],
            "proxy-connection": [*path, (b"proxy-connection", b"close")],
            "transfer-encoding": [*path, (b"transfer-encoding", b"chunked")],
            "upgrade": [*path, (b"upgrade", b"websocket")],
            "te-gzip": [*path, (b"te", b"gzip")],
            "two-content-lengths": [*path, (b"content-length", b"5"), (b"content-length", b"1100000")],
            "same-content-length-twice": [*path, (b"content-length", b"0"), (b"content-length", b"0")],
            "content-length-plus": [*path, (b"content-length", b"+0")],
            "unknown-pseudo": [*path, (b":protocol", b"websocket")],
            "pseudo-after-field": [(b"x-a", b"1"), (b":path", b"/x")],
            "repeated-path": path + path,
            "missing-path": [],
        }
        cases["crlf-in-authority"] = [(b":path", b"/x"), (b":authority", b"app.test\r\nx: y")]
        for name, fields in cases.items():
            self.setUp()  # each on a connection of its own: h2 may end one with GOAWAY (also a refusal)
            head = base if name != "crlf-in-authority" else base[:2]
            stream = self.send_fields(head + fields)
            self.assertEqual(self.status_of(stream), 1, name)  # 1: PROTOCOL_ERROR
            self.assertEqual(self.handler.exchanges, [], name)
        self.setUp()
        ok = self.send_fields(base + path + [(b"te", b"trailers"), (b"host", b"app.test"), (b"x-a", b"a\tb")])
        self.assertEqual([e.head.target for e in self.handler.exchanges], [b"/x"])
        pages.send(self.handler.exchanges[0], 200)
        self.pump()
        self.assertEqual(self.status_of(ok), b"200")

    def test_host_differing_from_authority_refused(self) -> None:
        """A host field naming another site than :authority gets 400 and never reaches the app."""
        fields = [(b":method", b"GET"), (b":path", b"/x"), (b":scheme", b"https"), (b":authority", b"app.test")]
        stream = self.send_fields([*fields, (b"host", b"evil.test")])
        self.assertEqual(self.status_of(stream), b"400")
        self.assertEqual(self.handler.exchanges, [])

    def test_rapid_reset_gets_goaway(self) -> None:
        """Requests reset as soon as they are sent (CVE-2023-44487) end the connection with ENHANCE_YOUR_CALM."""
        from h2.events import ConnectionTerminated

        for _ in range(RESET_BURST + 50):
            stream = self.client.get_next_available_stream_id()
            fields = [(b":method", b"GET"), (b":path", b"/x"), (b":scheme", b"https"), (b":authority", b"app.test")]
            self.client.send_headers(stream, fields, end_stream=True)
            self.client.reset_stream(stream)
            self.pump()
            if self.goaway_received() is not None:
                break
        (goaway,) = [e for e in self.events if isinstance(e, ConnectionTerminated)]
        self.assertEqual(goaway.error_code, 11)  # ENHANCE_YOUR_CALM
        self.assert_closes_once_quiet()
        self.assertLessEqual(len(self.handler.exchanges), RESET_BURST + 1)

    def test_provoked_resets_count_too(self) -> None:
        """Malformed requests that make us reset their streams (MadeYouReset) also end in ENHANCE_YOUR_CALM."""
        from h2.events import ConnectionTerminated

        fields = [(b":method", b"GET"), (b":path", b"/x"), (b":scheme", b"https"), (b":authority", b"app.test")]
        for _ in range(RESET_BURST + 50):
            self.send_fields([*fields, (b"connection", b"close")])
            if self.goaway_received() is not None:
                break
        self.assertEqual([e.error_code for e in self.events if isinstance(e, ConnectionTerminated)], [11])
        self.assert_closes_once_quiet()
        self.assertEqual(self.handler.exchanges, [])

    def test_resets_provoked_by_bad_frames_count_too(self) -> None:
        """Streams we reset for a WINDOW_UPDATE overflow or a body off its Content-Length count too (MadeYouReset)."""
        from h2.events import ConnectionTerminated

        fields = [(b":method", b"POST"), (b":path", b"/x"), (b":scheme", b"https"), (b":authority", b"app.test")]
        for provoke in ("window", "length"):
            self.setUp()
            for _ in range(RESET_BURST + 50):
                stream = self.send_fields([*fields, (b"content-length", b"1")], end=False)
                if provoke == "window":  # an increment past 2**31 - 1 on the stream: we reset it
                    self.server.dataReceived(b"\x00\x00\x04\x08\x00" + stream.to_bytes(4, "big") + b"\x7f\xff\xff\xff")
                else:  # two bytes where one was announced: we reset it
                    self.server.dataReceived(b"\x00\x00\x02\x00\x01" + stream.to_bytes(4, "big") + b"ab")
                self.pump()
                if self.goaway_received() is not None:
                    break
            codes = [e.error_code for e in self.events if isinstance(e, ConnectionTerminated)]
            self.assertEqual(codes, [11], provoke)

    def test_ping_flood_gets_goaway(self) -> None:
        """More PINGs in a window than any client needs (a flood from one that reads) end in ENHANCE_YOUR_CALM."""
        from hyperframe.frame import PingFrame

        batch = PingFrame(0).serialize() * 1000
        for _ in range(CONTROL_BURST // 1000 - 1):
            self.server.dataReceived(batch)
        self.clock.advance(RESET_WINDOW)  # a new window: the allowance starts again
        for _ in range(CONTROL_BURST // 1000 - 1):
            self.server.dataReceived(batch)
        self.assertFalse(self.transport.disconnecting)
        self.server.dataReceived(batch * 2)
        goaway = frames(self.transport.value())[-1]
        self.assertEqual((type(goaway).__name__, goaway.error_code), ("GoAwayFrame", 11))
        self.assert_closes_once_quiet()

    def test_answered_streams_earn_resets(self) -> None:
        """A client whose streams are answered may cancel as many as it was served without being cut off."""
        for _ in range(RESET_BURST * 2):
            self.request()
            pages.send(self.handler.exchanges[-1], 200)
            stream = self.request()
            self.client.reset_stream(stream)
            self.pump()
        self.assertFalse(self.transport.disconnecting)

    def test_reset_streams_keep_their_slot_until_the_app_answers(self) -> None:
        """A stream reset while the app works on it counts against MAX_STREAMS until the app answers (MadeYouReset)."""
        gone: list[int] = []

        class Observer:
            def __init__(self, stream_id: int) -> None:
                self.stream_id = stream_id

            def client_gone(self) -> None:
                gone.append(self.stream_id)

        class Observing(Holding):
            def handle(self, exchange: Any) -> None:
                exchange.set_observer(Observer(exchange.stream_id))
                super().handle(exchange)

        self.handler = self.server.handler = Observing()
        for _ in range(MAX_STREAMS):
            stream = self.request()
            self.client.reset_stream(stream)
            self.pump()
        self.assertEqual(len(self.handler.exchanges), MAX_STREAMS)
        refused = self.request()
        self.assertEqual(self.status_of(refused), 7)  # REFUSED_STREAM
        self.assertEqual(len(self.handler.exchanges), MAX_STREAMS)
        first = self.handler.exchanges[0]
        pages.send(first, 200)
        self.pump()
        self.assertEqual(gone, [first.stream_id])  # the app's answer is dropped, the request let go
        self.request()
        self.assertEqual(len(self.handler.exchanges), MAX_STREAMS + 1)

    def test_silent_connection_closed_after_header_timeout(self) -> None:
        """A client silent since the handshake is closed after header_timeout; one that spoke, after idle_timeout."""
        self.assertLess(self.limits.header_timeout, self.limits.idle_timeout)
        silent = H2ServerProtocol(self.handler, self.clock, self.limits)
        wire = StringTransport()
        silent.makeConnection(wire)
        self.clock.advance(self.limits.header_timeout)
        self.assertTrue(wire.disconnecting)
        self.assertFalse(self.transport.disconnecting, "the client of setUp sent its preface")
        self.clock.advance(self.limits.idle_timeout - self.limits.header_timeout)
        self.assertTrue(self.transport.disconnecting)

    def test_graceful_closes_end_in_an_abort(self) -> None:
        """An idle close, or a drain, that a non-reading client never lets finish is cut off after a grace."""
        self.clock.advance(self.limits.idle_timeout)
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(self.limits.idle_timeout + 1)
        self.assertTrue(self.transport.disconnected)

        self.setUp()
        self.request()
        self.server.drain()
        pages.send(self.handler.exchanges[0], 200)
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(self.limits.idle_timeout + 1)
        self.assertTrue(self.transport.disconnected)

    def test_protocol_error_close_is_cut_off_sooner(self) -> None:
        """After a protocol error the client gets only the short linger to take our GOAWAY."""
        self.server.dataReceived(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # WINDOW_UPDATE of 0
        self.assert_closes_once_quiet()
        self.clock.advance(self.limits.linger + 1)
        self.assertTrue(self.transport.disconnected)

    def test_after_goaway_for_an_error_what_the_client_sends_is_dropped(self) -> None:
        """After a protocol error we keep reading (so no reset destroys the GOAWAY) but act on nothing, then close."""
        from hyperframe.frame import PingFrame

        gone: list[int] = []

        class Observing(Holding):
            def handle(self, exchange: Any) -> None:
                exchange.set_observer(type("O", (), {"client_gone": lambda _: gone.append(exchange.stream_id)})())
                super().handle(exchange)

        self.handler = self.server.handler = Observing()
        stream = self.request()
        self.server.dataReceived(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # WINDOW_UPDATE of 0
        self.assertEqual([type(f).__name__ for f in frames(self.transport.value())], ["GoAwayFrame"])
        self.assertEqual(gone, [stream])  # the app stops working for a client we have given up
        self.transport.clear()
        for _ in range(3):  # the client had more in flight: read, not answered, not closed on
            self.clock.advance(self.limits.linger_quiet / 2)
            self.server.dataReceived(PingFrame(0).serialize() + self.client.data_to_send())
        self.assertEqual(self.transport.value(), b"")
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(self.limits.linger_quiet)
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.disconnected)

    def test_lingering_after_goaway_is_bounded(self) -> None:
        """A client that keeps sending after our GOAWAY is cut off after linger seconds, or linger_bytes."""
        from hyperframe.frame import PingFrame

        error = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # WINDOW_UPDATE of 0
        self.server.dataReceived(error)
        waited = 0.0
        while not self.transport.disconnected:
            self.clock.advance(self.limits.linger_quiet / 2)
            waited += self.limits.linger_quiet / 2
            self.server.dataReceived(PingFrame(0).serialize())
            self.assertLessEqual(waited, self.limits.linger + self.limits.linger_quiet)
        self.assertGreaterEqual(waited, self.limits.linger)

        self.setUp()
        self.server.dataReceived(error)
        self.server.dataReceived(b"\x00" * (self.limits.linger_bytes + 1))
        self.assertTrue(self.transport.disconnected)

    def test_client_that_does_not_read_is_not_read_and_then_cut_off(self) -> None:
        """While our writes back up we stop reading (its PINGs would queue answers); no progress for long: abort."""
        self.server.pauseProducing()  # the transport's buffer is full
        self.assertEqual(self.transport.producerState, "paused")
        self.clock.advance(self.limits.idle_timeout - 1)
        self.server.resumeProducing()  # it took some
        self.assertEqual(self.transport.producerState, "producing")
        self.server.pauseProducing()
        self.clock.advance(self.limits.idle_timeout - 1)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(2)
        self.assertTrue(self.transport.disconnected)

    def test_single_field_over_the_line_limit_gets_431(self) -> None:
        """A single 20 KB field is refused with 431, as HTTP/1.1 refuses a header line over 16 KB."""
        stream = self.request(extra=[(b"x-big", b"a" * 20 * 1024)])
        self.assertEqual(self.status_of(stream), b"431")
        self.assertEqual(self.handler.exchanges, [])

    def test_header_list_over_max_header_size_gets_431(self) -> None:
        """A header list larger than the SETTINGS_MAX_HEADER_LIST_SIZE we advertise gets 431, not the app."""
        fields = [(b"x-h%d" % i, b"v" * 1000) for i in range(40)]  # ~41 KB: over 32 KB, under h2's 64 KB
        stream = self.request(extra=fields)
        self.assertEqual(self.status_of(stream), b"431")
        self.assertEqual(self.handler.exchanges, [])

    def test_continuation_flood_is_cut_off_at_the_limit(self) -> None:
        """HEADERS then CONTINUATIONs without END_HEADERS (CVE-2024-27316) end the connection once past the limit."""
        from hyperframe.frame import ContinuationFrame, HeadersFrame

        headers = HeadersFrame(1)
        headers.data = b"\x82"  # :method GET, and no END_HEADERS
        self.server.dataReceived(headers.serialize())
        sent = 0
        while not any(type(f).__name__ == "GoAwayFrame" for f in frames(self.transport.value())):
            continuation = ContinuationFrame(1)
            continuation.data = b"\x00" * 16000
            self.server.dataReceived(continuation.serialize())
            sent += 16000
            self.assertLessEqual(sent, 2 * self.limits.max_header_size + 16000, "the block is still being held")
        goaway = frames(self.transport.value())[-1]
        self.assertEqual((type(goaway).__name__, goaway.error_code), ("GoAwayFrame", 11))  # ENHANCE_YOUR_CALM
        self.assertEqual(self.handler.exchanges, [])
        self.assert_closes_once_quiet()

    def test_hpack_bomb_is_bounded(self) -> None:
        """A small header block that decodes into a huge list (an HPACK bomb) ends the connection unanswered."""
        from h2.events import ConnectionTerminated

        stream = self.client.get_next_available_stream_id()
        fields = [(b":method", b"GET"), (b":path", b"/x"), (b":scheme", b"https"), (b":authority", b"app.test")]
        self.client.send_headers(stream, [*fields, *[(b"x-bomb", b"b" * 4000)] * 100], end_stream=True)
        block = self.client.data_to_send()
        self.assertLess(len(block), 10000)  # the value is sent once, then referenced: 400 KB decoded
        self.server.dataReceived(block)
        self.pump()
        self.assertTrue(any(isinstance(e, ConnectionTerminated) for e in self.events))
        self.assertEqual(self.handler.exchanges, [])

    def test_decoder_limit_follows_max_header_size(self) -> None:
        """The limit h2 decodes up to is ours: with max_header_size 100 KB, a 70 KB header list is served."""
        self.limits = Limits(idle_timeout=30, max_header_size=100_000)
        self.server = H2ServerProtocol(self.handler, self.clock, self.limits)
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.pump()
        fields = [(b"x-h%d" % i, b"%d" % i + b"v" * 1000) for i in range(70)]
        self.request(extra=fields)
        self.assertEqual(len(self.handler.exchanges), 1)

    def test_finished_streams_leave_no_timers_queued(self) -> None:
        """Streams whose handler set a 60 s deadline and then finished leave nothing on the timer wheel."""
        from tlsproxy.deadline import Timeouts

        wheel = Timeouts.of(self.clock)
        queued = sum(len(b) for b in wheel._buckets.values())
        for _ in range(300):
            self.request()
            exchange = self.handler.exchanges[-1]
            exchange.deadline.set(60, lambda: None)
            pages.send(exchange, 200)
            self.pump()
        self.assertLessEqual(sum(len(b) for b in wheel._buckets.values()) - queued, 1)

    def test_stream_deadlines_fire(self) -> None:
        """A stream's deadline fires when due, however many others moved or finished meanwhile."""
        fired: list[int] = []
        for _ in range(3):
            self.request()
        first, second, third = self.handler.exchanges
        first.deadline.set(10, lambda: fired.append(1))
        second.deadline.set(5, lambda: fired.append(2))
        third.deadline.set(1, lambda: fired.append(3))
        pages.send(third, 200)  # finished: its deadline goes with it
        second.deadline.set(20, lambda: fired.append(2))  # moved later
        self.clock.advance(6)
        self.assertEqual(fired, [])
        self.clock.advance(5)
        self.assertEqual(fired, [1])
        self.clock.advance(10)
        self.assertEqual(fired, [1, 2])

    def test_window_that_stays_shut_frees_the_app(self) -> None:
        """An answer stuck behind a client window of 0 for an idle timeout resets the stream and lets the app go."""

        gone: list[bool] = []

        class Observer:
            def client_gone(self) -> None:
                gone.append(True)

        self.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
        self.pump()
        stream = self.request()
        exchange = self.handler.exchanges[0]
        exchange.set_observer(Observer())
        exchange.start_response(200, b"OK", [], 100)
        exchange.write(b"x" * 100)
        self.pump()
        self.clock.advance(self.limits.idle_timeout - 1)
        self.assertEqual(gone, [])
        self.clock.advance(2)
        self.assertEqual(gone, [True])
        self.pump()
        self.assertEqual(self.status_of(stream), b"200")  # the head went out; then the reset
        from h2.events import StreamReset

        self.assertIn((stream, 8), [(e.stream_id, e.error_code) for e in self.events if isinstance(e, StreamReset)])
        self.assertEqual(self.server.streams, {})

    def test_unsized_upload_that_pauses_arrives_whole(self) -> None:
        """A 5 MB upload without content-length, read by a consumer that pauses every 256 KB, arrives whole."""
        from h2.events import ConnectionTerminated

        stream = self.request(b"POST", [], end=False)
        exchange = self.handler.exchanges[0]
        self.assertTrue(exchange.head.chunked)
        clock = self.clock
        got = bytearray()
        ended: list[bool] = []

        class Buffering:
            held = 0

            def body_data(self, data: bytes) -> None:
                got.extend(data)
                self.held += len(data)
                if self.held > 256 * 1024:
                    self.held = 0
                    exchange.pause_body()
                    clock.callLater(0.01, exchange.resume_body)  # the file write is done

            def body_end(self) -> None:
                ended.append(True)

        exchange.set_body_consumer(Buffering())
        total, sent = 5 * 1024 * 1024, 0
        while sent < total:
            window = min(self.client.local_flow_control_window(stream), total - sent, 16384)
            if window <= 0:
                self.clock.advance(0.01)
                self.pump()
                continue
            self.client.send_data(stream, b"u" * window, end_stream=sent + window == total)
            sent += window
            self.pump()
        self.clock.advance(0.01)
        self.pump()
        self.assertEqual((len(got), ended), (total, [True]))
        self.assertFalse(any(isinstance(e, ConnectionTerminated) for e in self.events))
        self.assertFalse(self.transport.disconnecting)

    def test_bodies_nobody_reads_are_bounded_per_connection(self) -> None:
        """Bodies held for streams whose handler takes nothing stay within the connection window, not 100 x 1 MB."""
        streams = []
        for _ in range(20):
            streams.append(self.request(b"POST", [(b"content-length", b"1000000")], end=False))
        for _ in range(80):
            progressed = False
            for stream in streams:
                window = min(self.client.local_flow_control_window(stream), 16384)
                if window > 0:
                    self.client.send_data(stream, b"b" * window)
                    progressed = True
            self.pump()
            if not progressed:
                break
        held = sum(sum(len(c) for c in e._body) for e in self.handler.exchanges)
        self.assertLessEqual(held, CONNECTION_WINDOW)
        self.assertEqual(self.client.outbound_flow_control_window, 0)  # the client was told to wait

    def test_whole_answer_is_one_write_with_end_stream_on_its_data(self) -> None:
        """HEADERS and the DATA frame carrying END_STREAM go out in one write, with no empty DATA frame after."""
        stream = self.request()
        writes: list[bytes] = []
        self.transport.write = writes.append  # type: ignore[method-assign]
        self.handler.exchanges[0].respond(200, b"OK", [(b"content-type", b"text/plain")], b"x" * 100)
        self.assertEqual(len(writes), 1)
        sent = frames(writes[0])
        self.assertEqual([type(f).__name__ for f in sent], ["HeadersFrame", "DataFrame"])
        self.assertEqual((sent[1].stream_id, sent[1].data, "END_STREAM" in sent[1].flags), (stream, b"x" * 100, True))

    def test_answers_given_during_one_read_share_one_write(self) -> None:
        """Ten requests in one read, each answered at once by the handler, cost one write."""

        class Answering:
            def handle(self, exchange: Any) -> None:
                exchange.respond(200, b"OK", [], b"hi")

        self.server.handler = Answering()
        streams = []
        for _ in range(10):
            stream = self.client.get_next_available_stream_id()
            self.client.send_headers(
                stream,
                [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"), (b":authority", b"app.test")],
                end_stream=True,
            )
            streams.append(stream)
        writes: list[bytes] = []
        self.transport.write = writes.append  # type: ignore[method-assign]
        self.server.dataReceived(self.client.data_to_send())
        self.assertEqual(len(writes), 1)
        ended = [f.stream_id for f in frames(writes[0]) if "END_STREAM" in f.flags]
        self.assertEqual(ended, streams)

    def test_answers_from_one_poll_share_one_write(self) -> None:
        """Answers given while one poll's events are handled (one per app connection) leave in one write after it."""
        first, second = self.request(), self.request()
        writes: list[bytes] = []
        self.transport.write = writes.append  # type: ignore[method-assign]

        def answer_both() -> None:
            for exchange in self.handler.exchanges:
                exchange.respond(200, b"OK", [], b"hi")
            self.assertEqual(writes, [])

        as_one_batch(answer_both)
        self.assertEqual(len(writes), 1)
        self.assertEqual([f.stream_id for f in frames(writes[0]) if "END_STREAM" in f.flags], [first, second])

    def test_answer_larger_than_the_window_ends_once_the_window_opens(self) -> None:
        """A whole answer bigger than the stream window waits for WINDOW_UPDATE and ends on its last DATA frame."""
        self.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1000})
        self.pump()
        stream = self.request()
        self.handler.exchanges[0].respond(200, b"OK", [], b"y" * 2500)
        sent = frames(self.transport.value())
        self.transport.clear()
        self.assertEqual(sum(len(f.data) for f in sent if type(f).__name__ == "DataFrame"), 1000)
        self.assertFalse(any("END_STREAM" in f.flags for f in sent))
        received = b""
        for _ in range(5):
            self.client.increment_flow_control_window(1000, stream)
            self.client.increment_flow_control_window(1000)
            self.server.dataReceived(self.client.data_to_send())
            more = frames(self.transport.value())
            self.transport.clear()
            received += b"".join(f.data for f in more if type(f).__name__ == "DataFrame")
            if any("END_STREAM" in f.flags for f in more):
                break
        self.assertEqual(len(received), 1500)
        self.assertTrue("END_STREAM" in more[-1].flags and more[-1].data)

    def test_answer_fields_are_cleaned_as_h2_would(self) -> None:
        """Connection-specific, TE and pseudo fields are dropped, blanks trimmed, credentials never indexed."""
        stream = self.request()
        fields = [
            (b"X-Kept", b" v "),
            (b"TE", b"gzip"),
            (b"Connection", b"close"),
            (b":path", b"/x"),
            (b"Authorization", b"Basic eA=="),
            (b"content-type", b"text/plain"),
        ]
        self.handler.exchanges[0].respond(200, b"OK", fields, b"x")
        self.pump()
        [got] = [e for e in self.events if isinstance(e, ResponseReceived)]
        self.assertEqual(got.stream_id, stream)
        self.assertEqual(
            list(got.headers),
            [
                (b":status", b"200"),
                (b"x-kept", b"v"),
                (b"authorization", b"Basic eA=="),
                (b"content-type", b"text/plain"),
                (b"content-length", b"1"),
            ],
        )
        self.assertIsInstance(got.headers[2], NeverIndexedHeaderTuple)


def test_frame_watch_across_any_split() -> None:
    """The header-block size and the count of control frames are the same however the bytes are cut into reads."""
    from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame, PriorityFrame, SettingsFrame

    from tlsproxy.http.h2 import FrameWatch

    headers = HeadersFrame(1)
    headers.data = b"h" * 100
    middle = ContinuationFrame(1)
    middle.data = b"c" * 300
    last = ContinuationFrame(1, flags=["END_HEADERS"])
    last.data = b"c" * 50
    data = DataFrame(1)
    data.data = b"d" * 5000
    control = [PingFrame(0), SettingsFrame(0), PriorityFrame(1), DataFrame(1)]  # 4 counted
    answers = [PingFrame(0, flags=["ACK"]), SettingsFrame(0, flags=["ACK"]), DataFrame(1, flags=["END_STREAM"])]
    frames = [data, *control, headers, middle, last, *answers, data]
    wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"".join(f.serialize() for f in frames)
    for size in (1, 7, 9, 10, 100, len(wire)):
        watch = FrameWatch()
        largest = max(watch.feed(wire[i : i + size]) for i in range(0, len(wire), size))
        assert (largest, watch.block, watch.control) == (450, -1, 4), size


_STATIC_NAMES = [b":status", b"content-type", b"date", b"server", b"set-cookie", b"cache-control", b"authorization"]
_names = st.one_of(st.sampled_from(_STATIC_NAMES), st.binary(min_size=1, max_size=40))
_values = st.one_of(st.sampled_from([b"", b"200", b"404", b"gzip, deflate", b"nginx"]), st.binary(max_size=300))
_fields = st.tuples(_names, _values, st.booleans())


@given(st.lists(st.lists(_fields, max_size=12), min_size=1, max_size=5), st.sampled_from([0, 100, 4096, 65536]))
def test_response_encoder_decodes_to_what_was_sent(blocks: list, table_size: int) -> None:
    """Whatever the fields and the client's table size, an HPACK decoder reads each block back as sent."""
    decoder = Decoder()
    decoder.max_allowed_table_size = table_size  # the client's SETTINGS_HEADER_TABLE_SIZE
    encoder = ResponseEncoder(cache_size=3)  # the cache is cleared on the way, too
    for block in blocks:
        fields = [NeverIndexedHeaderTuple(n, v) if secret else (n, v) for n, v, secret in block]
        got = decoder.decode(encoder.encode(fields), raw=True)
        assert [tuple(f) for f in got] == [(n, v) for n, v, _ in block]
        assert [isinstance(f, NeverIndexedHeaderTuple) for f in got] == [secret for _, _, secret in block]
        assert decoder.header_table_size == 0  # nothing was ever added to the client's table


def reference_parse_request(fields: Headers, ended: bool, limits: Limits) -> RequestHead:
    """parse_request as it was: one field at a time (the specification the fast one is held to)."""
    pseudo: dict[bytes, bytes] = {}
    headers: Headers = []
    hosts: list[bytes] = []
    content_length: int | None = None
    size = 0
    longest = 0
    for name, value in fields:
        field_size = len(name) + len(value)
        size += field_size + 32  # as SETTINGS_MAX_HEADER_LIST_SIZE counts (RFC 9113 6.5.2)
        if field_size > longest:
            longest = field_size
        if name[:1] == b":":
            if headers or name not in _REQUEST_PSEUDO or name in pseudo:
                raise MalformedRequest("misplaced, unknown or repeated pseudo-header")
            if not valid_field(b"p", value):
                raise MalformedRequest("control bytes in a pseudo-header")
            pseudo[name] = value
            continue
        if not valid_field(name, value) or name != name.lower():
            raise MalformedRequest("malformed field name or value")
        if value and (value[0] in _WHITESPACE or value[-1] in _WHITESPACE):
            raise MalformedRequest("whitespace around a field value")
        if name in _FORBIDDEN_IN_REQUEST:
            raise MalformedRequest("connection-specific field")
        if name == b"te" and value.lower() != b"trailers":
            raise MalformedRequest("TE other than trailers")
        if name == b"content-length":
            if content_length is not None:
                raise MalformedRequest("more than one content-length")
            if not value.isdigit() or len(value) > 18:
                raise MalformedRequest("malformed content-length")
            content_length = int(value)
        elif name == b"host":
            hosts.append(value)
        headers.append((name, value))
    method = pseudo.get(b":method", b"")
    if method == b"CONNECT":
        raise RequestError(405, "CONNECT is not supported: this is a reverse proxy")
    path = pseudo.get(b":path", b"")
    scheme = pseudo.get(b":scheme")
    if not method or not path or scheme is None:
        raise MalformedRequest("missing :method, :path or :scheme")
    if not valid_field(method, b""):
        raise MalformedRequest("malformed :method")
    if b" " in path or b"#" in path or b"\t" in path:
        raise MalformedRequest("space or # in :path")
    if ended and content_length:
        raise MalformedRequest("content-length without a body")
    if size > limits.max_header_size or longest + 2 > limits.max_header_line:
        raise RequestError(431, "header fields too large")
    if len(headers) > limits.max_header_count:
        raise RequestError(431, "too many header fields")
    if scheme not in (b"https", b"http"):
        raise RequestError(400, "unknown :scheme")
    if not (path[:1] == b"/" or (path == b"*" and method == b"OPTIONS")):
        raise RequestError(400, "malformed :path")
    if len(path) > limits.max_request_line:
        raise RequestError(414, ":path too long")
    authority = pseudo.get(b":authority", b"")
    if authority:
        if any(h.lower() != authority.lower() for h in hosts):
            raise RequestError(400, "host differs from :authority")
        host = authority
        headers = [(n, v) for n, v in headers if n != b"host"]
    elif len(hosts) == 1:
        host = hosts[0]
        headers = [(n, v) for n, v in headers if n != b"host"]
    else:
        raise RequestError(400, "no host, or more than one")
    if not valid_host(host):
        raise RequestError(400, "malformed host")
    return RequestHead(
        method=method,
        target=path,
        version=b"2",
        host=host.lower(),
        headers=[(b"host", host), *headers],
        content_length=None if ended else content_length,
        chunked=not ended and content_length is None,
    )


_valid_names = st.sampled_from([b"x-a", b"accept", b"host", b"te", b"content-length"])
_bad_names = st.sampled_from([b"connection", b"X-A", b"a:b", b"a\nb", b"", b"a b", b"a\x00"])
_name_bytes = st.one_of(_valid_names, _valid_names, _bad_names)
_odd_values = [b"", b"1", b"trailers", b"app.test", b" 1", b"1\t", b"a\tb", b"1\nx: 2", b"+0", b"5", b"a\rb"]
_value_bytes = st.one_of(st.sampled_from(_odd_values), st.sampled_from(_odd_values), st.binary(max_size=8))
_pseudo = st.sampled_from(
    [
        (b":method", b"GET"),
        (b":path", b"/x"),
        (b":scheme", b"https"),
        (b":authority", b"app.test"),
        (b":path", b"/y\n"),
        (b":method", b"G:T"),
        (b":method", b"G T"),
        (b":method", b""),
        (b":path", b"/a#b"),
        (b":path", b"/a\tb"),
        (b":path", b"/a b"),
        (b":path", b"/\x7f"),
    ]
)


def _outcome(parse: Any, fields: list, ended: bool, limits: Limits) -> Any:
    try:
        return parse(fields, ended, limits)
    except MalformedRequest:
        return "reset"
    except RequestError as e:
        return e.status


_BASE = [(b":method", b"GET"), (b":path", b"/x"), (b":scheme", b"https"), (b":authority", b"app.test")]


@given(
    st.one_of(st.permutations(_BASE), st.lists(_pseudo, max_size=5)),
    st.lists(st.tuples(_name_bytes, _value_bytes), max_size=6),
    st.lists(_pseudo, max_size=1),
    st.booleans(),
    st.sampled_from([Limits(), Limits(max_header_size=150, max_header_line=40, max_header_count=3)]),
)
@settings(max_examples=400)
def test_parse_request_agrees_with_the_field_by_field_version(
    first: list, fields: list, late: list, ended: bool, limits: Limits
) -> None:
    """The one-match field check refuses, answers and passes exactly what the field-by-field one did."""
    request = [*first, *fields, *late]
    assert _outcome(parse_request, request, ended, limits) == _outcome(reference_parse_request, request, ended, limits)


_c_names = st.sampled_from(
    [b"x-a", b"accept", b"host", b"te", b"content-length", b"cookie", b"upgrade", b"keep-alive", b"X", b"a b", b"\xc3"]
)
_c_values = st.sampled_from(
    [b"", b"0", b"1", b"trailers", b"TrAiLeRs", b"app.test", b"APP.test", b"other.test", b" 1", b"1\t", b"a\tb"]
)
_small = Limits(max_header_size=150, max_header_line=40, max_header_count=3, max_request_line=4)
_c_pseudo = st.sampled_from(
    [
        (b":method", b"GET"),
        (b":method", b"OPTIONS"),
        (b":method", b"CONNECT"),
        (b":path", b"/x"),
        (b":path", b"*"),
        (b":scheme", b"https"),
        (b":scheme", b"http"),
        (b":scheme", b"ftp"),
        (b":authority", b"app.test"),
        (b":authority", b""),
        (b":authority", b"a/b"),
        (b":status", b"200"),
    ]
)


@pytest.mark.skipif(speedups is None, reason="tlsproxy._speedups is not built (or turned off)")
@given(
    st.one_of(st.permutations(_BASE), st.lists(_c_pseudo, max_size=5)),
    st.lists(st.one_of(st.tuples(_c_names, _c_values), st.tuples(_name_bytes, _value_bytes)), max_size=6),
    st.lists(_c_pseudo, max_size=1),
    st.booleans(),
    st.sampled_from([Limits(), _small]),
)
@example(_BASE, [(b"content-length", b"1")], [], True, Limits())
@example(_BASE, [(b"content-length", b"0"), (b"te", b"TRAILERS")], [], True, Limits())
@example(_BASE, [(b"host", b"APP.test"), (b"x-a", b"1")], [], False, Limits())
@example(_BASE, [(b"host", b"other.test")], [], False, Limits())
@example(_BASE[:3], [(b"host", b"App.Test"), (b"accept", b"")], [], False, Limits())
@example([(b":method", b"OPTIONS"), (b":path", b"*"), (b":scheme", b"http")], [(b"host", b"a")], [], True, _small)
@settings(max_examples=600)
def test_c_request_head_passes_exactly_what_python_passes(
    first: list, fields: list, late: list, ended: bool, limits: Limits
) -> None:
    """The C head equals the Python one for every request Python passes, and is None for every other."""
    assert speedups is not None
    request = [*first, *fields, *late]
    c_head = speedups.h2_request_head(
        request, ended, limits.max_header_size, limits.max_header_line, limits.max_header_count, limits.max_request_line
    )
    expected = _outcome(py_parse_request, request, ended, limits)
    if isinstance(expected, RequestHead):
        assert c_head == expected
        assert type(c_head.content_length) is type(expected.content_length)
    else:
        assert c_head is None
    assert _outcome(parse_request, request, ended, limits) == expected


@pytest.mark.skipif(speedups is None, reason="tlsproxy._speedups is not built (or turned off)")
def test_c_request_head_takes_h2loads_request_and_leaves_odd_input_to_python() -> None:
    """h2load's request is parsed in C; a field that is not a tuple of bytes goes to the Python version."""
    assert speedups is not None
    fields = [*_BASE, (b"accept", b"*/*"), (b"user-agent", b"h2load")]
    head = speedups.h2_request_head(fields, True, 32768, 16384, 100, 8192)
    assert head == py_parse_request(fields, True, Limits())
    assert speedups.h2_request_head([*_BASE, [b"accept", b"*/*"]], True, 32768, 16384, 100, 8192) is None
    assert speedups.h2_request_head([*_BASE, (b"accept", "*/*")], True, 32768, 16384, 100, 8192) is None
    assert speedups.h2_request_head(tuple(fields), True, 32768, 16384, 100, 8192) is None


class ConformanceTests(SynchronousTestCase):
    """h2spec's key cases (RFC 9113), frame by frame on the wire: h2spec itself is not packaged."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.handler = Holding()
        self.limits = Limits(idle_timeout=30)
        self.server = H2ServerProtocol(self.handler, self.clock, self.limits)
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)
        self.encoder = Encoder()

    def send(self, *parts: Any, preface: bool = True) -> list[Any]:
        """Send the preface and an empty SETTINGS (unless told not to), then ``parts``; the frames we answer."""
        data = b"".join(p if isinstance(p, bytes) else p.serialize() for p in parts)
        if preface:
            data = PREFACE + SettingsFrame(0).serialize() + data
        self.transport.clear()
        self.server.dataReceived(data)
        return frames(self.transport.value())

    def headers(self, stream: int, extra: list | None = None, end: bool = True) -> HeadersFrame:
        frame = HeadersFrame(stream)
        fields = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"), (b":authority", b"app.test")]
        frame.data = self.encoder.encode(fields + (extra or []))
        frame.flags.add("END_HEADERS")
        if end:
            frame.flags.add("END_STREAM")
        return frame

    def assert_connection_error(self, answer: list[Any], code: int) -> None:
        """A GOAWAY with ``code`` came last, and the connection closes once the client is quiet."""
        self.assertEqual((type(answer[-1]).__name__, answer[-1].error_code), ("GoAwayFrame", code))
        self.clock.advance(self.limits.linger_quiet)
        self.assertTrue(self.transport.disconnecting)

    def assert_error(self, answer: list[Any], stream: int, code: int) -> None:
        """An error with ``code``: RST_STREAM on ``stream``, or GOAWAY (RFC 9113 5.4.1 lets either answer it)."""
        kinds = ("RstStreamFrame", "GoAwayFrame")
        errors = [(type(f).__name__, f.stream_id, f.error_code) for f in answer if type(f).__name__ in kinds]
        self.assertIn(errors[-1:], [[("RstStreamFrame", stream, code)], [("GoAwayFrame", 0, code)]])

    def assert_stream_error(self, answer: list[Any], stream: int, code: int) -> None:
        """RST_STREAM with ``code`` on ``stream``, and the connection goes on."""
        resets = [(f.stream_id, f.error_code) for f in answer if type(f).__name__ == "RstStreamFrame"]
        self.assertIn((stream, code), resets)
        self.assertFalse(any(type(f).__name__ == "GoAwayFrame" for f in answer))

    def test_invalid_preface(self) -> None:
        """3.4: a client that does not start with the preface is closed on (a GOAWAY MAY be left out), unanswered."""
        answer = self.send(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n" + b"x" * 20, preface=False)
        self.assertEqual([type(f).__name__ for f in answer if type(f).__name__ != "GoAwayFrame"], [])
        self.clock.advance(self.limits.linger_quiet)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.handler.exchanges, [])

    def test_settings_are_acknowledged(self) -> None:
        """6.5.3: the client's SETTINGS gets an ACK."""
        answer = self.send()
        self.assertIn(("SettingsFrame", {"ACK"}), [(type(f).__name__, set(f.flags)) for f in answer])

    def test_settings_ack_with_a_payload(self) -> None:
        """6.5: a SETTINGS ACK that carries a payload is a FRAME_SIZE_ERROR."""
        self.assert_connection_error(
            self.send(b"\x00\x00\x06\x04\x01\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64"), 6
        )

    def test_settings_of_odd_length(self) -> None:
        """6.5: a SETTINGS length that is not a multiple of 6 is a FRAME_SIZE_ERROR."""
        self.assert_connection_error(self.send(b"\x00\x00\x03\x04\x00\x00\x00\x00\x00\x00\x03\x00"), 6)

    def test_settings_on_a_stream(self) -> None:
        """6.5: SETTINGS with a stream identifier is a PROTOCOL_ERROR."""
        self.assert_connection_error(self.send(b"\x00\x00\x00\x04\x00\x00\x00\x00\x01"), 1)

    def test_settings_with_bad_values(self) -> None:
        """6.5.2: ENABLE_PUSH above 1 is a PROTOCOL_ERROR, a window above 2^31-1 a FLOW_CONTROL_ERROR."""
        self.assert_connection_error(self.send(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x02"), 1)
        self.setUp()
        self.assert_connection_error(self.send(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x04\x80\x00\x00\x00"), 3)

    def test_ping_of_wrong_length(self) -> None:
        """6.7: a PING whose length is not 8 is a FRAME_SIZE_ERROR; one of 8 is answered with an ACK."""
        answer = self.send(PingFrame(0, opaque_data=b"12345678"))
        self.assertIn((b"12345678", {"ACK"}), [(f.opaque_data, set(f.flags)) for f in answer if type(f) is PingFrame])
        self.assert_connection_error(self.send(b"\x00\x00\x06\x06\x00\x00\x00\x00\x00" + b"123456", preface=False), 6)

    def test_frame_over_max_frame_size(self) -> None:
        """4.2: a frame longer than SETTINGS_MAX_FRAME_SIZE (16,384 by default) is a FRAME_SIZE_ERROR."""
        self.send(self.headers(1, end=False))
        self.assertEqual(len(self.handler.exchanges), 1)
        answer = self.send(b"\x00\x40\x01\x00\x00\x00\x00\x00\x01" + b"a" * 16385, preface=False)
        self.assert_connection_error(answer, 6)

    def test_window_update_of_zero(self) -> None:
        """6.9: an increment of 0 is a PROTOCOL_ERROR: of the stream on a stream, of the connection on 0."""
        answer = self.send(self.headers(1, end=False), b"\x00\x00\x04\x08\x00\x00\x00\x00\x01\x00\x00\x00\x00")
        self.assert_error(answer, 1, 1)
        self.setUp()
        self.assert_connection_error(self.send(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00"), 1)

    def test_window_update_overflow(self) -> None:
        """6.9.1: a window above 2^31-1 is a FLOW_CONTROL_ERROR: of the stream, or of the connection."""
        full = b"\x00\x00\x04\x08\x00\x00\x00\x00%c\x7f\xff\xff\xff"
        answer = self.send(self.headers(1, end=False), full % 1)
        self.assert_error(answer, 1, 3)
        self.setUp()
        self.assert_connection_error(self.send(full % 0), 3)

    def test_window_update_of_wrong_length(self) -> None:
        """6.9: a WINDOW_UPDATE whose length is not 4 is a FRAME_SIZE_ERROR."""
        self.assert_connection_error(self.send(b"\x00\x00\x03\x08\x00\x00\x00\x00\x00\x00\x00\x01"), 6)

    def test_even_stream_id(self) -> None:
        """5.1.1: a client's stream identifiers are odd; HEADERS on an even one is a PROTOCOL_ERROR."""
        self.assert_connection_error(self.send(self.headers(2)), 1)
        self.assertEqual(self.handler.exchanges, [])

    def test_stream_id_going_down(self) -> None:
        """5.1.1: a new stream's identifier must exceed all before it; a lower one is a PROTOCOL_ERROR."""
        self.send(self.headers(5))
        self.assert_connection_error(self.send(self.headers(3), preface=False), 1)
        self.assertEqual(len(self.handler.exchanges), 1)

    def test_data_on_stream_zero(self) -> None:
        """6.1: DATA on stream 0 is a PROTOCOL_ERROR."""
        self.assert_connection_error(self.send(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00a"), 1)

    def test_data_on_an_idle_stream(self) -> None:
        """5.1: DATA on a stream never opened is a PROTOCOL_ERROR."""
        self.assert_connection_error(self.send(b"\x00\x00\x01\x00\x01\x00\x00\x00\x07a"), 1)

    def test_headers_on_a_closed_stream(self) -> None:
        """5.1: HEADERS on a stream that has ended both ways is a STREAM_CLOSED error; the app never sees it."""
        self.send(self.headers(1))
        pages.send(self.handler.exchanges[0], 200)
        answer = self.send(self.headers(1), preface=False)
        self.assert_error(answer, 1, 5)  # STREAM_CLOSED
        self.assertEqual(len(self.handler.exchanges), 1)

    def test_data_after_end_stream(self) -> None:
        """5.1: DATA on a stream the client half-closed is a STREAM_CLOSED error."""
        answer = self.send(self.headers(1), b"\x00\x00\x01\x00\x00\x00\x00\x00\x01a")
        self.assert_error(answer, 1, 5)

    def test_continuation_without_headers(self) -> None:
        """6.10: CONTINUATION that follows no open header block is a PROTOCOL_ERROR."""
        self.assert_connection_error(self.send(b"\x00\x00\x01\x09\x04\x00\x00\x00\x01\x82"), 1)

    def test_other_frame_inside_a_header_block(self) -> None:
        """6.10: a header block must continue with CONTINUATION on the same stream; a PING in it is an error."""
        open_block = self.headers(1)
        open_block.flags.discard("END_HEADERS")
        self.assert_connection_error(self.send(open_block, PingFrame(0)), 1)
        self.assertEqual(self.handler.exchanges, [])

    def test_pseudo_header_rules(self) -> None:
        """8.3: unknown, response, repeated, late or missing pseudo-fields and an empty :path reset the stream."""
        cases = [
            [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"), (b":foo", b"x")],
            [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"), (b":status", b"200")],
            [(b":method", b"GET"), (b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https")],
            [(b":method", b"GET"), (b"x-a", b"1"), (b":path", b"/"), (b":scheme", b"https")],
            [(b":method", b"GET"), (b":scheme", b"https")],
            [(b":method", b"GET"), (b":path", b""), (b":scheme", b"https")],
            [(b":path", b"/"), (b":scheme", b"https")],
        ]
        self.send()
        for i, fields in enumerate(cases):
            stream = 2 * i + 1
            frame = HeadersFrame(stream)
            frame.data = self.encoder.encode([*fields, (b"host", b"app.test")])
            frame.flags.add("END_HEADERS")
            frame.flags.add("END_STREAM")
            self.assert_stream_error(self.send(frame, preface=False), stream, 1)
        self.assertEqual(self.handler.exchanges, [])

"""The inbound fast path (H2ServerProtocol._split) against h2's receive_data: the same bytes in, the same bytes out."""

from __future__ import annotations

from typing import Any

from hpack import Encoder
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tlsproxy.http.h2 import H2ServerProtocol
from tlsproxy.http.server import Limits

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"app.test")]


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One frame's bytes, however malformed: the server is under test, not this."""
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


class Recorder:
    """Answers /a at once with a body, reads every request's body, and writes down all it saw."""

    def __init__(self) -> None:
        self.log: list[Any] = []

    def handle(self, exchange: Any) -> None:
        head = exchange.head
        sid = exchange.stream_id
        self.log.append(("request", sid, head.method, head.target, head.headers, head.content_length))
        log = self.log

        class Body:
            def body_data(self, data: bytes) -> None:
                log.append(("body", sid, data))

            def body_end(self) -> None:
                log.append(("end", sid))

        exchange.set_body_consumer(Body())
        if head.target == b"/a":
            exchange.respond(200, b"OK", [(b"content-type", b"text/plain")], b"hello")


# Request fields: plain, with a body, split cookies, and ones parse_request or h2 refuses.
FIELDS = [
    [(b":path", b"/a"), *GET],
    [(b":path", b"/b"), *GET],
    [
        (b":method", b"POST"),
        (b":path", b"/b"),
        (b":scheme", b"https"),
        (b":authority", b"x"),
        (b"content-length", b"4"),
    ],
    [(b":path", b"/a"), *GET, (b"cookie", b"a=1"), (b"accept", b"*/*"), (b"cookie", b"b=2")],
    [(b":path", b"/a"), *GET, (b"Upper", b"x")],
    [(b":path", b"/a"), *GET, (b"connection", b"close")],
    [(b":path", b"/b"), *GET, (b"content-length", b"x1")],
    [(b":status", b"100")],
    [(b":path", b"/a"), *GET, (b"te", b"gzip")],
]

item = st.one_of(
    st.tuples(st.just("request"), st.integers(0, len(FIELDS) - 1), st.booleans(), st.sampled_from([0, 0, 0, 8, 32])),
    st.tuples(st.just("data"), st.integers(-3, 0), st.binary(max_size=6), st.booleans()),
    st.tuples(st.just("data"), st.just(-1), st.binary(max_size=6), st.booleans()),
    st.tuples(st.just("ping"), st.booleans()),
    st.tuples(st.just("window"), st.integers(-3, 0), st.sampled_from([1, 1000, 0, 2**31 - 1])),
    st.tuples(st.just("reset"), st.integers(-3, 0), st.sampled_from([0, 8])),
    st.tuples(st.just("settings"), st.sampled_from([b"", b"\x00\x04\x00\x00\x10\x00", b"ack"])),
    st.tuples(st.just("priority"), st.integers(-3, 0)),
    st.tuples(st.just("open block"), st.booleans()),
    st.tuples(st.just("stale"), st.integers(-3, 0)),
    st.tuples(st.just("garbage"), st.integers(0, 12), st.integers(0, 255), st.integers(0, 12), st.binary(max_size=12)),
)


def client_bytes(items: list[Any]) -> tuple[bytes, bytes]:
    """The preface, SETTINGS and a first request; then ``items`` as frames, HPACK-coded in order by one encoder.

    The fast path starts once h2 has served a request, so ``items`` come in reads of their own.
    """
    encoder = Encoder()
    out = [PREFACE + frame(4, 0, 0, b"") + frame(1, 5, 1, encoder.encode(FIELDS[0]))]
    opened = [1]
    next_id = 3

    def pick(back: int) -> int:
        """The stream opened ``-back`` requests ago (-1: the last), or, for 0, the first (long answered)."""
        return opened[back] if -back <= len(opened) else 1

    for it in items:
        kind = it[0]
        if kind == "request":
            _, which, end, extra = it
            block = encoder.encode(FIELDS[which])
            if extra == 8:  # PADDED: a pad length of 2, then the pad
                block = b"\x02" + block + b"\x00\x00"
            elif extra == 32:  # PRIORITY: a dependency on stream 0, weight 16
                block = b"\x00\x00\x00\x00\x0f" + block
            out.append(frame(1, 4 | extra | (1 if end else 0), next_id, block))
            opened.append(next_id)
            next_id += 2
        elif kind == "data":
            out.append(frame(0, 1 if it[3] else 0, pick(it[1]), it[2]))
        elif kind == "ping":
            out.append(frame(6, 1 if it[1] else 0, 0, b"12345678"))
        elif kind == "window":
            out.append(frame(8, 0, pick(it[1]) if it[2] != 2**31 - 1 else 0, it[2].to_bytes(4, "big")))
        elif kind == "reset":
            out.append(frame(3, 0, pick(it[1]), it[2].to_bytes(4, "big")))
        elif kind == "settings":
            out.append(frame(4, 1, 0, b"") if it[1] == b"ack" else frame(4, 0, 0, it[1]))
        elif kind == "priority":
            out.append(frame(2, 0, pick(it[1]), b"\x00\x00\x00\x00\x0f"))
        elif kind == "open block":
            block = encoder.encode(FIELDS[1])
            out.append(frame(1, 1, next_id, block[:2]))
            out.append(frame(9, 4 if it[1] else 0, next_id, block[2:]))
            opened.append(next_id)
            next_id += 2
        elif kind == "stale":
            out.append(frame(1, 5, pick(it[1]), encoder.encode(FIELDS[1])))
        else:
            _, ftype, flags, stream, payload = it
            out.append(frame(ftype, flags, stream, payload))
    return out[0], b"".join(out[1:])


def serve(first: bytes, data: bytes, cuts: list[int], fast: bool) -> list[Any]:
    """What a server with or without the fast path does, read by read: ``first``, then ``data`` cut at ``cuts``."""
    handler = Recorder()
    server = H2ServerProtocol(handler, Clock(), Limits())
    server.fast_inbound = fast
    transport = StringTransport()
    server.makeConnection(transport)
    server.dataReceived(first)
    seen: list[Any] = [transport.value(), list(handler.log)]
    transport.clear()
    handler.log.clear()
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if cut <= start:
            continue
        server.dataReceived(data[start:cut])
        start = cut
        seen.append((transport.value(), transport.disconnecting, list(handler.log)))
        transport.clear()
        handler.log.clear()
    conn = server.conn
    streams = {
        i: (s.state_machine.state, s.inbound_flow_control_window, s.outbound_flow_control_window)
        for i, s in conn.streams.items()
    }
    seen.append((conn.state_machine.state, conn.highest_inbound_stream_id, conn.inbound_flow_control_window))
    seen.append((streams, sorted(server.streams)))
    return seen


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(item, max_size=14), st.lists(st.integers(0, 300), max_size=6))
@example([("request", 0, True, 0)] * 3, [])
@example([("request", 2, False, 0), ("data", -1, b"abcd", True), ("request", 0, True, 0)], [10, 11, 30])
@example([("request", 2, False, 0), ("data", -1, b"abcde", True), ("ping", False)], [])
@example([("request", 2, False, 0), ("data", -1, b"ab", False), ("data", -1, b"cd", True)], [24])
@example([("request", 1, False, 0), ("data", -1, b"ab", False), ("data", -1, b"", True), ("data", -1, b"", True)], [])
@example([("request", 0, False, 0), ("data", -1, b"abc", True), ("data", -2, b"x", False)], [])
@example([("request", 7, True, 0), ("request", 0, True, 0)], [])
@example([("request", 0, True, 0), ("open block", True), ("request", 3, True, 0)], [20])
@example([("request", 0, True, 0), ("garbage", 1, 4, 0, b""), ("request", 0, True, 0)], [])
def test_fast_path_and_h2_agree(items: list[Any], cuts: list[int]) -> None:
    """Any byte stream, cut anywhere: with and without the fast path the same bytes go out and the app sees the same."""
    first, data = client_bytes(items)
    assert serve(first, data, cuts, True) == serve(first, data, cuts, False)


def test_fast_path_takes_requests_past_h2() -> None:
    """After the first request, a request's HEADERS frame never reaches h2's receive_data, and its answer comes."""
    first, data = client_bytes([("request", 0, True, 0)] * 5)
    handler = Recorder()
    server = H2ServerProtocol(handler, Clock(), Limits())
    transport = StringTransport()
    server.makeConnection(transport)
    fed: list[bytes] = []
    receive = server.conn.receive_data
    server.conn.receive_data = lambda chunk: fed.append(chunk) or receive(chunk)  # type: ignore[method-assign]
    server.dataReceived(first)
    server.dataReceived(data)
    assert len(fed) == 1, "only the preface, SETTINGS and the first request went through h2"
    assert [e[1] for e in handler.log if e[0] == "request"] == [1, 3, 5, 7, 9, 11]
    assert transport.value().count(b"hello") == 6


def answers(first: bytes, data: bytes, fast: bool) -> tuple[list[Any], list[Any]]:
    """The frames answering ``data`` (after ``first``) as (type, stream, error code), and what the app saw."""
    from hyperframe.frame import Frame

    handler = Recorder()
    server = H2ServerProtocol(handler, Clock(), Limits())
    server.fast_inbound = fast
    transport = StringTransport()
    server.makeConnection(transport)
    server.dataReceived(first)
    transport.clear()
    handler.log.clear()
    server.dataReceived(data)
    out, raw = [], transport.value()
    while raw:
        f, length = Frame.parse_frame_header(memoryview(raw[:9]))
        f.parse_body(memoryview(raw[9 : 9 + length]))
        out.append((type(f).__name__, f.stream_id, getattr(f, "error_code", None)))
        raw = raw[9 + length :]
    return out, handler.log


def test_floods_and_malformed_requests_on_the_fast_path() -> None:
    """HPACK bombs, rapid resets, smuggling fields, bodies past Content-Length: h2's answers on the fast path too."""
    from tlsproxy.http.h2 import RESET_BURST

    bomb_block = Encoder().encode([(b"x-bomb", b"b" * 4000)], huffman=False) + b"\xbe" * 100  # 400 KB decoded
    first, _ = client_bytes([])
    cases = {
        "bomb": (frame(1, 5, 3, bomb_block), ("GoAwayFrame", 0, 11)),
        "rapid reset": (
            b"".join(
                frame(1, 4, 3 + 2 * i, b"\x82\x84\x87\x41\x08app.test") + frame(3, 0, 3 + 2 * i, b"\x00\x00\x00\x08")
                for i in range(RESET_BURST + 5)
            ),
            ("GoAwayFrame", 0, 11),
        ),
        "connection field": (
            frame(1, 5, 3, b"\x82\x84\x87\x41\x08app.test" + b"\x00\x0aconnection\x05close"),
            ("RstStreamFrame", 3, 1),
        ),
        "body past content-length": (
            frame(1, 4, 3, b"\x83\x84\x87\x41\x08app.test" + b"\x00\x0econtent-length\x011") + frame(0, 1, 3, b"ab"),
            ("RstStreamFrame", 3, 1),
        ),
    }
    for name, (data, expected) in cases.items():
        fast, app = answers(first, data, True)
        assert (fast, app) == answers(first, data, False), name
        assert fast[-1] == expected, name
        if name in ("bomb", "connection field"):
            assert app == [], name

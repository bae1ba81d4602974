"""HTTP/2 server protocol on the ``h2`` state machine, feeding the same handlers.

Each stream becomes an :class:`H2Exchange`, which looks to a handler exactly
like an HTTP/1.1 exchange.  Flow control is the back-pressure: a request
body's bytes are acknowledged only while the handler is taking them, and a
response waits for window updates (pausing the app's connection) when the
client's window is spent.
"""

from __future__ import annotations

import re
from collections import deque
from operator import add
from typing import Any

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import FlowControlError, ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hpack import (
    Decoder,
    HPACKDecodingError,
    InvalidTableIndex,
    InvalidTableSizeError,
    NeverIndexedHeaderTuple,
    OversizedHeaderListError,
)
from hyperframe.frame import GoAwayFrame
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tlsproxy.compat.h2 import (
    StreamErrorConnection,
    answer_headers_frames,
    data_frame_header,
    hpack_huffman,
    hpack_static_table,
    inbound_ready,
    receive_data_frame,
    receive_request_headers,
    use_decoder,
)
from tlsproxy.deadline import Deadline
from tlsproxy.eventloop import at_batch_end
from tlsproxy.http import pages
from tlsproxy.http.exchange import BodyConsumer, ExchangeObserver, Handler, Headers, RequestHead, ResponseFields
from tlsproxy.http.server import Limits, client_address_of, valid_host
from tlsproxy.http.wire import RequestError, split_fields, valid_field
from tlsproxy.speedups import speedups

MAX_STREAMS = 100
STREAM_WINDOW = 1024 * 1024
# The connection's receive window.  Body bytes are acknowledged only as a
# handler takes them (and not while it has paused the body), so this bounds
# what one client can make us hold unread, over all its streams together.
CONNECTION_WINDOW = 4 * 1024 * 1024 + 65535
# Rapid reset (CVE-2023-44487) and MadeYouReset (CVE-2025-8671): a client may
# have RESET_BURST more streams reset (by itself, or by us for its errors)
# than it had answered within one RESET_WINDOW; past that it gets GOAWAY
# with ENHANCE_YOUR_CALM.
RESET_BURST = 200
RESET_WINDOW = 10.0
# Frames that carry no request (PING, SETTINGS, PRIORITY, empty DATA) a
# client may send within one RESET_WINDOW; a flood of them is all cost.
CONTROL_BURST = 10_000

# Connection-specific fields are forbidden in HTTP/2 (RFC 9113 8.2.2); we
# frame responses ourselves, so the app's Content-Length goes too.
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"content-length"}
)
# Never to be sent in an answer either: TE is a request field (RFC 9113 8.2.2).
_NOT_IN_RESPONSE = _CONNECTION_SPECIFIC | {b"te"}
# Kept out of any compression context (RFC 7541 7.1.3), as h2 itself would.
_SENSITIVE = frozenset({b"authorization", b"proxy-authorization"})
_REQUEST_PSEUDO = frozenset({b":method", b":path", b":scheme", b":authority"})
_FORBIDDEN_IN_REQUEST = _CONNECTION_SPECIFIC - {b"content-length"}
_WHITESPACE = (0x09, 0x20)
_BLANK = (b" ", b"\t")


_DATA, _HEADERS, _PRIORITY, _SETTINGS, _PUSH_PROMISE, _PING, _CONTINUATION = 0x0, 0x1, 0x2, 0x4, 0x5, 0x6, 0x9
_END_HEADERS = 0x4
_ACK = _END_STREAM = 0x1
# A HEADERS frame's END_HEADERS, PADDED and PRIORITY flags: the fast path takes END_HEADERS alone.
_PADDED = 0x8
_HEADERS_SHAPE = _END_HEADERS | _PADDED | 0x20
# Whether new connections take requests' HEADERS and DATA frames past h2's receive_data (H2ServerProtocol._split).
FAST_INBOUND = True


class FrameWatch:
    """What a client's frames ask of us, read from their 9-byte headers alone.

    h2 buffers HEADERS and CONTINUATION frames until END_HEADERS before it
    decodes (or counts) anything; endless CONTINUATIONs (CVE-2024-27316)
    would be held that long, so the open header block is measured as it
    grows.  And frames that cost us work but carry no request (PING and
    SETTINGS that want an answer, PRIORITY, empty DATA) are counted, so a
    flood of them can be told from use.
    """

    __slots__ = ("_head", "_skip", "bad_ack", "block", "control")

    def __init__(self) -> None:
        self._skip = 24  # the client's connection preface
        self._head = b""  # a frame header split between reads
        self.block = -1  # bytes of the open header block; -1: none open
        self.control = 0  # frames that carry no request, so far
        # A SETTINGS ACK with a payload: a FRAME_SIZE_ERROR (RFC 9113 6.5), which h2 calls a PROTOCOL_ERROR.
        self.bad_ack = False

    def feed(self, data: bytes) -> int:
        """Take the next bytes from the client; the largest a header block grew in them (-1: none open)."""
        n = len(data)
        pos = self._skip
        if pos >= n:
            self._skip = pos - n
            return self.block
        block = largest = self.block
        head = self._head
        while pos < n:
            if head or n - pos < 9:
                part = data[pos : pos + 9 - len(head)]
                head += part
                pos += len(part)
                if len(head) < 9:
                    break
                frame, head = head, b""
            else:
                frame = data[pos : pos + 9]
                pos += 9
            length = int.from_bytes(frame[:3], "big")
            kind = frame[3]
            if (
                kind == _PRIORITY
                or ((kind == _PING or kind == _SETTINGS) and not frame[4] & _ACK)
                or (kind == _DATA and not length and not frame[4] & _END_STREAM)
            ):
                self.control += 1
            elif kind == _SETTINGS and length:
                self.bad_ack = True
            if kind == _CONTINUATION:
                header_frame = block >= 0
                if header_frame:
                    block += length
            elif kind == _HEADERS or kind == _PUSH_PROMISE:
                header_frame = True
                block = length
            else:
                header_frame = False
            if block > largest:
                largest = block
            if header_frame and frame[4] & _END_HEADERS:
                block = -1
            pos += length
        self._head = head
        self._skip = pos - n if pos > n else 0
        self.block = block
        return largest


_STATIC = hpack_static_table()
_STATIC_FIELD: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _i, _field in enumerate(_STATIC, 1):
    _STATIC_FIELD.setdefault(_field, _i)
    _STATIC_NAME.setdefault(_field[0], _i)
_huffman = hpack_huffman()


def _hpack_integer(value: int, prefix: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) in a ``prefix``-bit prefix, its first byte ORed into ``first``."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_string(data: bytes) -> bytes:
    """An HPACK string literal (RFC 7541 5.2), Huffman-coded when that is shorter."""
    coded = _huffman(data)
    if len(coded) < len(data):
        return _hpack_integer(len(coded), 7, 0x80) + coded
    return _hpack_integer(len(data), 7, 0) + data


def _hpack_field(name: bytes, value: bytes, sensitive: bool) -> bytes:
    """One field: a static-table index, or a literal that is never added to a table."""
    if not sensitive:
        index = _STATIC_FIELD.get((name, value))
        if index is not None:
            return _hpack_integer(index, 7, 0x80)
    first = 0x10 if sensitive else 0x00  # never indexed, or without indexing (RFC 7541 6.2.3, 6.2.2)
    index = _STATIC_NAME.get(name)
    if index is not None:
        return _hpack_integer(index, 4, first) + _hpack_string(value)
    return bytes((first,)) + _hpack_string(name) + _hpack_string(value)


class ResponseEncoder:
    """HPACK for our answers without a dynamic table, as nginx does it.

    h2's encoder runs the full dynamic-table logic in Python for every field
    of every answer, a sixth of the cost of an HTTP/2 request.  Without a
    dynamic table a field's encoding never changes, so it is cached.  The
    first block sets the client's table for our answers to size 0 (RFC 7541
    6.3), which is within any SETTINGS_HEADER_TABLE_SIZE it sends, now or
    later.  The client's own table for its requests is a separate one, which
    h2's decoder keeps.
    """

    __slots__ = ("_cache", "_cache_size", "_started", "header_table_size")

    def __init__(self, cache_size: int = 1024) -> None:
        self._cache_size = cache_size
        self.header_table_size = 4096  # h2 stores the client's setting here: we use none of it
        self._started = False
        self._cache: dict[tuple[bytes, bytes], bytes] = {}

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        cache = self._cache
        parts = []
        if not self._started:
            self._started = True
            parts.append(b"\x20")  # dynamic table size update: 0
        for field in headers:
            if type(field) is tuple:
                code = cache.get(field)
                if code is None:
                    if len(cache) >= self._cache_size:
                        cache.clear()
                    code = cache[field] = _hpack_field(field[0], field[1], False)
            else:
                code = _hpack_field(field[0], field[1], isinstance(field, NeverIndexedHeaderTuple))
            parts.append(code)
        return b"".join(parts)


if speedups is not None:
    speedups.configure_hpack(HPACKDecodingError, InvalidTableIndex, OversizedHeaderListError, InvalidTableSizeError)


def request_decoder() -> Any:
    """An HPACK decoder for a client's header blocks: the C one when it is built, hpack's otherwise.

    hpack's Decoder, in Python, was a fifth of the HTTP/2 path's time per
    request (bench/README.md); the C one does the same (and raises the same
    hpack errors) for every input, which tests/unit/test_hpack.py checks.
    """
    if speedups is not None:
        return speedups.HpackDecoder()
    return Decoder()


# Request fields as parse_request takes them: a name is a lower-case token,
# a value visible bytes, spaces and tabs with none at either end; names (and
# values) joined by "\n".  Each class is a single-byte run that cannot hold
# the "\n", so a match (or a failed one) costs linear time.
_H2_NAME = rb"[!#$%&'*+\-.^_`|~0-9a-z]+"
_H2_VALUE = rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
_H2_NAMES = re.compile(rb"(?:" + _H2_NAME + rb"\n)*" + _H2_NAME)
_H2_VALUES = re.compile(rb"(?:" + _H2_VALUE + rb"\n)*" + _H2_VALUE)
# valid_field's grammar for a pseudo-field's value and for :method, and
# what :path must not hold.  Matches, not ``b" " in path``: CPython 3.11
# tries a bytes operand of ``in`` as an integer first, and formats (then
# drops) a TypeError each time: over a thousand instructions more than a
# search (measured with callgrind).
_H2_PSEUDO_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_H2_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NOT_IN_PATH = re.compile(rb"[ #\t]")
_SPECIAL_IN_REQUEST = _FORBIDDEN_IN_REQUEST | {b"te", b"content-length", b"host"}


def _refuse_field(headers: Headers) -> None:
    """Raise for the first field of ``headers`` that breaks the grammar, saying how."""
    for name, value in headers:
        if not valid_field(name, value) or name != name.lower():
            raise MalformedRequest("malformed field name or value")
        if value and (value[0] in _WHITESPACE or value[-1] in _WHITESPACE):
            raise MalformedRequest("whitespace around a field value")
    raise MalformedRequest("malformed field")  # pragma: no cover - the two agree (a property test)


class MalformedRequest(Exception):
    """A request RFC 9113 (8.1.1) calls malformed: its stream is reset with PROTOCOL_ERROR, nothing is answered."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def parse_request(fields: Headers, ended: bool, limits: Limits) -> RequestHead:
    """The head of one stream's request, held to the same field grammar as an HTTP/1.1 head.

    The C version (``h2_request_head``) takes a request it would pass, and
    gives None for anything else; then :func:`py_parse_request`, the
    specification, decides and says why.  It was an eighth of the HTTP/2
    path (bench/README.md).
    """
    if speedups is not None:
        lim = limits
        head: RequestHead | None = speedups.h2_request_head(
            fields, ended, lim.max_header_size, lim.max_header_line, lim.max_header_count, lim.max_request_line
        )
        if head is not None:
            return head
    return py_parse_request(fields, ended, limits)


def py_parse_request(fields: Headers, ended: bool, limits: Limits) -> RequestHead:
    """The head of one stream's request, held to the same field grammar as an HTTP/1.1 head.

    Ours, not the h2 library's: versions differ in what they let through
    (CR/LF in a value reached the app as a second request with some), and a
    field the app sees must be one the HTTP/1.1 side would have passed.
    Raises :class:`MalformedRequest` (reset the stream) or ``RequestError``
    (answer with its status).
    """
    pseudo: dict[bytes, bytes] = {}
    headers: Headers = []
    size = longest = 0
    for field in fields:
        name, value = field
        if name[:1] != b":":
            headers.append(field)
            continue
        field_size = len(name) + len(value)
        size += field_size + 32  # as SETTINGS_MAX_HEADER_LIST_SIZE counts (RFC 9113 6.5.2)
        if field_size > longest:
            longest = field_size
        if headers or name not in _REQUEST_PSEUDO or name in pseudo:
            raise MalformedRequest("misplaced, unknown or repeated pseudo-header")
        if _H2_PSEUDO_VALUE.fullmatch(value) is None:
            raise MalformedRequest("control bytes in a pseudo-header")
        pseudo[name] = value
    hosts: list[bytes] = []
    content_length: int | None = None
    if headers:
        # All names against the grammar in one match, all values in another,
        # not one per field.  Neither class holds "\n", so a name or value
        # with one in it shows as a "\n" too many.
        names, values = zip(*headers, strict=True)
        name_block = b"\n".join(names)
        value_block = b"\n".join(values)
        count = len(headers)
        if (
            _H2_NAMES.fullmatch(name_block) is None
            or _H2_VALUES.fullmatch(value_block) is None
            or name_block.count(b"\n") != count - 1
            or value_block.count(b"\n") != count - 1
        ):
            _refuse_field(headers)
        size += len(name_block) + len(value_block) - 2 * (count - 1) + 32 * count
        field_size = max(map(add, map(len, names), map(len, values)))
        if field_size > longest:
            longest = field_size
        for name, value in headers:
            if name not in _SPECIAL_IN_REQUEST:
                continue
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
    method = pseudo.get(b":method", b"")
    if method == b"CONNECT":
        raise RequestError(405, "CONNECT is not supported: this is a reverse proxy")
    path = pseudo.get(b":path", b"")
    scheme = pseudo.get(b":scheme")
    if not method or not path or scheme is None:
        raise MalformedRequest("missing :method, :path or :scheme")
    if _H2_METHOD.fullmatch(method) is None:
        raise MalformedRequest("malformed :method")
    if _NOT_IN_PATH.search(path) is not None:
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
        if hosts and any(h.lower() != authority.lower() for h in hosts):
            raise RequestError(400, "host differs from :authority")
        host = authority
    elif len(hosts) == 1:
        host = hosts[0]
    else:
        raise RequestError(400, "no host, or more than one")
    if hosts:  # the one host field is put first below
        headers = [field for field in headers if field[0] != b"host"]
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


class _Connection(StreamErrorConnection):
    """h2's server connection, with one malformed request a stream error, not a connection error.

    A request whose DATA frames do not add up to its Content-Length is
    malformed, which RFC 9113 (8.1.1) makes a stream error: that stream is
    reset and the client's other streams go on.  h2 raises it from inside its
    frame loop, where any ProtocolError ends the whole connection with
    GOAWAY, so it is caught here, at the DATA frame.
    """

    # Streams reset here, for the protocol to forget after receive_data (an
    # event would do, but h2's event constructors differ between versions).
    reset_here: list[int]

    def body_length_error(self, frame: Any) -> tuple[list[Any], list[Any]]:
        self.reset_stream(frame.stream_id, ErrorCodes.PROTOCOL_ERROR)
        # Nobody will take these bytes: give their connection window back.
        self.acknowledge_received_data(frame.flow_controlled_length, frame.stream_id)
        self.reset_here.append(frame.stream_id)
        return [], []


class StreamDeadline(Deadline):
    """A stream's deadline, kept by its connection rather than filed on the timer wheel.

    A Deadline on the wheel stays there until its time comes, cleared or
    not: a stream that lived for a millisecond would leave its entry for the
    whole upstream timeout (200,000 of them under h2load).  The connection
    files one entry, for the earliest of its streams, and looks through them
    when it comes; a finished stream leaves nothing behind.
    """

    __slots__ = ("_proto",)

    def __init__(self, proto: H2ServerProtocol) -> None:  # not Deadline's: no wheel of its own
        self._proto = proto
        self._when: float | None = None
        self._action: Any = None
        self._bucket = None

    def set(self, seconds: float, action: Any) -> float:
        now = self._proto.clock.seconds()
        self._when = now + seconds
        self._action = action
        self._proto.stream_due_at(self._when)
        return now


class H2Exchange:
    """One HTTP/2 stream as a handler sees it."""

    request_id = ""  # the access log's (tlsproxy/proxy/accesslog.py)
    started = 0.0

    def __init__(self, proto: H2ServerProtocol, stream_id: int, head: RequestHead, ended: bool) -> None:
        self._proto = proto
        self.stream_id = stream_id
        self.head = head
        self.client_address = proto.client_address
        self.secure = True
        self.server_port = proto.server_port
        self._consumer: BodyConsumer | None = None
        self._observer: ExchangeObserver | None = None
        self._body: list[bytes] = []
        self._body_done = ended
        self._paused = False
        self._unacked = 0
        self._started = False
        self._finished = False
        self._end_pending = False
        # The client reset the stream while the app works on it: the answer
        # is dropped, but the stream keeps its slot until the app gives it.
        self._reset = False
        self._outbound: deque[bytes] = deque()
        self._producer: IPushProducer | None = None
        self._producer_paused = False
        self.no_body = head.method == b"HEAD"
        self.transport = proto.transport
        # Streams run side by side, each with a deadline of its own.
        self.deadline: Deadline = StreamDeadline(proto)
        # Since when our answer has waited for a window that does not open.
        self._stalled_since: float | None = None

    # -- request body --------------------------------------------------------

    def set_body_consumer(self, consumer: BodyConsumer) -> None:
        self._consumer = consumer
        body, self._body = self._body, []
        for chunk in body:
            consumer.body_data(chunk)
        self._ack()
        if self._body_done:
            consumer.body_end()

    def _body_data(self, data: bytes, flow_length: int) -> None:
        self._unacked += flow_length
        if self._consumer is not None:
            self._consumer.body_data(data)
            self._ack()
        else:
            self._body.append(data)

    def _body_end(self) -> None:
        if self._body_done:  # h2's StreamEnded after a request that ended with its HEADERS: said already
            return
        self._body_done = True
        if self._consumer is not None:
            self._consumer.body_end()

    def _ack(self) -> None:
        if self._unacked and not self._paused:
            unacked, self._unacked = self._unacked, 0
            self._proto.acknowledge(self.stream_id, unacked)

    def pause_body(self) -> None:
        self._paused = True

    def resume_body(self) -> None:
        self._paused = False
        self._ack()

    def set_observer(self, observer: ExchangeObserver) -> None:
        self._observer = observer

    def send_continue(self) -> None:
        """An interim 100 (a HEADERS frame without END_STREAM) for a client waiting on ``expect: 100-continue``."""
        if not self._started and not self._body_done and not self._reset:
            self._proto.send_headers(self.stream_id, [(b":status", b"100")], False)

    # -- response ------------------------------------------------------------

    @property
    def response_started(self) -> bool:
        return self._started

    def start_response(self, status: int, reason: bytes, headers: ResponseFields, content_length: int | None) -> None:
        self._started = True
        if self._reset:
            # The app has answered a stream the client gave up: its slot is free.
            self._finished = True
            observer = self._observer
            self._proto._forget(self)
            if observer is not None:
                observer.client_gone()
            return
        fields: Headers = [(b":status", b"%d" % status)]
        if isinstance(headers, bytes):
            headers = split_fields(headers)
        # h2's outbound normalisation and checks are off (see H2ServerProtocol): this is all of them.
        for name, value in headers:
            name = name.lower()
            if name in _NOT_IN_RESPONSE or name[:1] == b":":
                continue
            if value[:1] in _BLANK or value[-1:] in _BLANK:
                value = value.strip(b" \t")
            if name in _SENSITIVE:
                fields.append(NeverIndexedHeaderTuple(name, value))
            else:
                fields.append((name, value))
        if content_length is not None and status not in (204, 304):
            fields.append((b"content-length", b"%d" % content_length))
        end = self.no_body or status in (204, 304)
        self._proto.send_headers(self.stream_id, fields, end)
        if end:
            self._finished = True
            self._proto.stream_done(self)

    def respond(self, status: int, reason: bytes, headers: ResponseFields, body: bytes) -> None:
        """A whole answer: HEADERS and one DATA frame that ends the stream, in one write if the window allows."""
        proto = self._proto
        proto.hold()
        try:
            self.start_response(status, reason, headers, len(body))
            if not self._finished:
                self._end_pending = True  # the last DATA frame carries END_STREAM
            self.write(body)
            self.finish()
        finally:
            proto.release()

    def write(self, data: bytes) -> None:
        if self._finished or not data or self.no_body:
            return
        self._outbound.append(data)
        self._flush()

    def finish(self) -> None:
        if self._finished:
            return
        self._end_pending = True
        self._flush()

    def _flush(self) -> None:
        proto = self._proto
        ended = False  # END_STREAM went out on the last DATA frame
        while self._outbound:
            window = proto.window(self.stream_id)
            if window <= 0:
                if self._producer is not None and not self._producer_paused:
                    self._producer_paused = True
                    self._producer.pauseProducing()
                if self._stalled_since is None:
                    self._stalled_since = now = proto.clock.seconds()
                    proto.stream_due_at(now + proto.limits.idle_timeout)
                return
            self._stalled_since = None
            chunk = self._outbound.popleft()
            if len(chunk) > window:
                self._outbound.appendleft(chunk[window:])
                chunk = chunk[:window]
            ended = self._end_pending and not self._outbound and not self._finished
            proto.send_data(self.stream_id, chunk, ended)
        if self._producer is not None and self._producer_paused and not proto.transport_paused:
            self._producer_paused = False
            self._producer.resumeProducing()
        if self._end_pending and not self._finished:
            self._finished = True
            if not ended:
                proto.end_stream(self.stream_id)
            proto.stream_done(self)

    def abort(self) -> None:
        if not self._finished:
            self._finished = True
            self._proto.reset_stream(self.stream_id, ErrorCodes.INTERNAL_ERROR)
            self._proto.stream_done(self)

    def _window_stalled(self) -> None:
        """The client has kept our window shut for an idle timeout: give up the stream and the app's connection."""
        if self._finished:
            return
        self._finished = True
        observer = self._observer
        self._proto.reset_stream(self.stream_id, ErrorCodes.CANCEL)
        self._proto._forget(self)
        if observer is not None:
            observer.client_gone()

    def register_producer(self, producer: IPushProducer) -> None:
        self._producer = producer
        if self._proto.transport_paused:
            self._producer_paused = True
            producer.pauseProducing()

    def unregister_producer(self) -> None:
        self._producer = None

    def start_tunnel(self, peer: Any) -> None:  # pragma: no cover - no Upgrade in HTTP/2
        raise RuntimeError("HTTP/2 has no Upgrade")

    def _client_gone(self) -> None:
        if not self._finished:
            self._finished = True
            if self._observer is not None:
                self._observer.client_gone()


class H2ServerProtocol(Protocol):
    """Serve HTTP/2 streams to the handler, one :class:`H2Exchange` each."""

    log = Logger()
    transport: Any

    def __init__(self, handler: Handler, clock: IReactorTime, limits: Limits) -> None:
        self.handler = handler
        self.clock = clock
        self.limits = limits
        self.client_address = ""
        self.server_port = 0
        self.transport_paused = False
        self.streams: dict[int, H2Exchange] = {}
        # h2's own header checks are off: parse_request does them, the same
        # whatever h2's version, and refuses one stream rather than the
        # connection.  Outbound, start_response does what h2 would (lower-case
        # names, no connection-specific fields, no pseudo-fields from the app,
        # no surrounding blanks, credentials never indexed), once.
        self.conn = _Connection(
            H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=False,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self._encoder = self.conn.encoder = ResponseEncoder()  # type: ignore[assignment]
        # Frames written without h2 (answer_headers_frames), in order with h2's own, until the next write.
        self._pending: list[bytes] = []
        use_decoder(self.conn, request_decoder())
        self.conn.reset_here = []
        # The idle (or header) timeout, on the timer wheel: it moves twice per
        # request, and a callLater and cancel each time cost more than the rest
        # of the connection's bookkeeping for it.
        self._idle_deadline = Deadline(clock)
        self._closed = False
        self._draining = False
        self._closing: Deadline | None = None  # armed by _close: the abort if a close takes too long
        # After GOAWAY for an error: bytes still to drop (-1: not lingering), until when, and when the last came.
        self._linger_left = -1
        self._linger_until = self._linger_last = 0.0
        self._lingering = Deadline(clock)
        self._reading_paused = False
        self._stall = Deadline(clock)  # armed while the client takes none of our bytes
        self.tracker: Any = None
        self._resets = 0
        self._streams_timer = Deadline(clock)  # for the earliest thing due on any stream
        self._streams_due_at: float | None = None
        self._frames = FrameWatch()
        self.fast_inbound = FAST_INBOUND
        self._rest = b""  # part of a frame header, held by the fast path for the next read
        # While above zero, frames wait in h2's buffer for one TLS write (see hold).
        self._held = 0
        self._flush_queued = False  # a _batch_flush is queued for the end of this poll
        self._control_base = 0  # the count of control frames when this window began
        self._max_block = 2 * limits.max_header_size
        self._served = 0
        self._heard = False
        self._reset_window_start = self._control_window_start = clock.seconds()

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_address = client_address_of(peer)
        self.server_port = getattr(self.transport.getHost(), "port", 0)
        # Our settings must be in place before initiate_connection sends
        # them: a later update_settings would send a second SETTINGS frame
        # that the peer applies after (and over) the first.
        self.conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.max_header_size,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        # h2 keeps its own limit for the decoded list (the settings object
        # above replaced the one it reads): make it ours.  A list over
        # max_header_size is answered 431 (parse_request); one past twice
        # that, or an encoded block that large, ends the connection, for
        # HPACK state cannot be kept without decoding all of it.
        self.conn.decoder.max_header_list_size = self._max_block
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.transport.registerProducer(self, True)
        self._flush()
        self._idle()

    def handshakeCompleted(self) -> None:
        pass

    def _idle(self) -> None:
        if self.streams:
            self._idle_deadline.clear()
        else:
            # A connection whose client has not sent a byte since the handshake
            # (not even its preface) is not an idle keep-alive client: it gets
            # header_timeout, as a silent HTTP/1.1 connection does.
            wait = self.limits.idle_timeout if self._heard else self.limits.header_timeout
            self._idle_deadline.set(wait, self._idle_timeout)

    def _idle_timeout(self) -> None:
        if self._closing is not None:
            return
        self._closed = True
        self.conn.close_connection()
        self._flush()
        self._close()

    # -- inbound ---------------------------------------------------------------

    def hold(self) -> None:
        """Keep frames in h2's buffer until the matching :meth:`release`, to write them as one.

        Each TLS write is a record and a send(): three per answer (HEADERS,
        DATA, END_STREAM) cost more than the HTTP/2 work for it.  What is
        held is bounded by what one read or one answer produces.
        """
        self._held += 1

    def release(self) -> None:
        self._held -= 1
        if not self._held:
            self._flush_soon()

    def _flush_soon(self) -> None:
        """Write what h2 holds once this poll's events are handled (at once outside a poll).

        With many streams, the app's answers to one client arrive together:
        each is written in the same TLS write, not one write apiece.
        """
        if not self._flush_queued:
            if at_batch_end(self._batch_flush):
                self._flush_queued = True
            else:
                self._flush()

    def _batch_flush(self) -> None:
        self._flush_queued = False
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            if self._linger_left >= 0:
                self._linger_drop(data)
            return
        if not self._heard:
            self._heard = True
            self._idle()  # from header_timeout to idle_timeout
        self._held += 1
        try:
            self._received(data)
        finally:
            self.release()

    def _received(self, data: bytes) -> None:
        watch = self._frames
        before = watch.control
        if watch.feed(data) > self._max_block:
            self.log.info("HTTP/2 client {client} sent a header block over the limit", client=self.client_address)
            self._calm_down()
            return
        if watch.control != before and self._too_many_control_frames(before):
            return
        if watch.bad_ack:
            self.log.info("HTTP/2 client {client} sent a SETTINGS ACK with a payload", client=self.client_address)
            try:
                self.conn.close_connection(error_code=ErrorCodes.FRAME_SIZE_ERROR)
            except ProtocolError:
                pass
            self._error_close()
            return
        if self._rest:
            data = self._rest + data
            self._rest = b""
        events = self._split(data) if self.fast_inbound and inbound_ready(self.conn) else self._h2_receive(data)
        if events is not None:
            self._handle(events)

    def _h2_receive(self, data: bytes) -> list[Any] | None:
        """h2's events for ``data``; None (and the connection closing) for a protocol error."""
        try:
            events: list[Any] = self.conn.receive_data(data)
        except ProtocolError as e:
            self._protocol_error(e)
            return None
        return events

    def _protocol_error(self, error: ProtocolError) -> None:
        self.log.info("HTTP/2 protocol error from {client}: {error}", client=self.client_address, error=error)
        self._error_close()

    def _split(self, data: bytes) -> list[Any] | None:
        """The inbound fast path: requests' HEADERS and DATA frames taken past h2's receive_data, the rest through it.

        h2's frame objects, state machines and events were half the cost of
        an HTTP/2 request (bench/README.md).  A whole HEADERS frame that
        opens a new stream (END_HEADERS, no padding or priority) is decoded
        and h2's state moved for it by ``receive_request_headers``; an
        unpadded DATA frame within the windows and the Content-Length of an
        open request by ``receive_data_frame``.  Runs of any other frames
        (and of those two where h2 must decide) go to h2 as they came, in
        order.  As h2 does, every
        frame of the read is taken before any event is handled, and a
        protocol error drops the read's events.  Part of a frame header at the
        end waits here for the next read; a frame whose header is whole but
        its payload not goes to h2, which checks the header at once and then
        takes the next read whole.
        The events are h2's, and (stream id, fields or body bytes,
        END_STREAM) for the frames taken here.
        """
        conn = self.conn
        events: list[Any] = []
        n = len(data)
        pos = 0
        slow = -1  # where the run of frames for h2 began
        limit = conn.max_inbound_frame_size
        rest = True  # keep a partial frame header at the end for the next read
        while n - pos >= 9:
            length = int.from_bytes(data[pos : pos + 3], "big")
            end = pos + 9 + length
            if length > limit:
                rest = False  # h2 refuses it now, not once it is whole
                break
            if end > n:
                # h2 checks a frame's header (its type against its stream) as
                # soon as it has one: let it have this one now.
                rest = False
                break
            flags = data[pos + 4]
            kind = data[pos + 3]
            if (kind == _HEADERS and flags & _HEADERS_SHAPE == _END_HEADERS) or (kind == _DATA and not flags & _PADDED):
                if slow >= 0:
                    more = self._h2_receive(data[slow:pos])
                    if more is None:
                        return None
                    events += more
                    slow = -1
                    if not inbound_ready(conn):
                        rest = False
                        break
                stream_id = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                if kind == _DATA:
                    if receive_data_frame(conn, stream_id, length, bool(flags & _END_STREAM)):
                        events.append((stream_id, data[pos + 9 : end], flags & _END_STREAM))
                    else:
                        slow = pos
                else:
                    try:
                        fields = receive_request_headers(
                            conn, stream_id, data[pos + 9 : end], bool(flags & _END_STREAM)
                        )
                    except ProtocolError as e:
                        self._protocol_error(e)
                        return None
                    if fields is None:
                        slow = pos
                    else:
                        events.append((stream_id, fields, flags & _END_STREAM))
            elif slow < 0:
                slow = pos
            pos = end
        if slow < 0:
            slow = pos
        if rest:
            tail = data[slow:pos]
            self._rest = data[pos:]
        else:
            tail = data[slow:]
        if tail:
            more = self._h2_receive(tail)
            if more is None:
                return None
            events += more
        return events

    def _handle(self, events: list[Any]) -> None:
        """Act on a read's events, in order: h2's, and the requests the fast path took."""
        for event in events:
            if type(event) is tuple:
                stream_id, what, ended = event
                if type(what) is bytes:  # a DATA frame: h2's DataReceived, then StreamEnded with END_STREAM
                    exchange = self.streams.get(stream_id)
                    if exchange is not None:
                        exchange._body_data(what, len(what))
                    else:
                        self.conn.acknowledge_received_data(len(what), stream_id)
                    if ended:
                        exchange = self.streams.get(stream_id)
                        if exchange is not None:
                            exchange._body_end()
                    continue
                self._request(stream_id, what, bool(ended))
                if self._closed:
                    return
            elif isinstance(event, RequestReceived):
                self._request(event.stream_id, event.headers, event.stream_ended is not None)
                if self._closed:
                    return
            elif isinstance(event, DataReceived):
                exchange = self.streams.get(event.stream_id)
                if exchange is not None:
                    exchange._body_data(event.data, event.flow_controlled_length)
                else:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                exchange = self.streams.get(event.stream_id)
                if exchange is not None:
                    exchange._body_end()
            elif isinstance(event, StreamReset):
                exchange = self.streams.get(event.stream_id)
                if exchange is not None:
                    if exchange._observer is not None and exchange._body_done and not exchange._started:
                        # The whole request may be at the app already: keep
                        # counting it against MAX_STREAMS until it answers.
                        exchange._reset = True
                    else:
                        exchange._client_gone()
                        self._forget(exchange)
                # The client's reset, or h2's for the client's error (a
                # WINDOW_UPDATE overflow): both count (MadeYouReset).
                self._count_reset()
                if self._closed:
                    return
            elif isinstance(event, WindowUpdated):
                targets = list(self.streams.values()) if event.stream_id == 0 else [self.streams.get(event.stream_id)]
                for exchange in targets:
                    if exchange is not None:
                        exchange._flush()
            elif isinstance(event, ConnectionTerminated):
                self._closed = True
                self._flush()
                self._close()
                return
        if self.conn.reset_here:
            reset_here = list(self.conn.reset_here)
            self.conn.reset_here.clear()
            for stream_id in reset_here:
                exchange = self.streams.get(stream_id)
                if exchange is not None:
                    exchange._client_gone()
                    self._forget(exchange)
                self._count_reset()  # reset for the client's error, a body off its Content-Length
                if self._closed:
                    return

    def _request(self, stream_id: int, fields: Headers, ended: bool) -> None:
        if len(self.streams) >= MAX_STREAMS:
            # Streams the client reset still count while the app works on
            # them, so h2's own count of open streams is not ours.
            self.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            self._count_reset()
            return
        problem = 0
        try:
            head = parse_request(fields, ended, self.limits)
        except MalformedRequest as e:
            self.log.info("malformed HTTP/2 request from {client}: {why}", client=self.client_address, why=e.detail)
            self.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
            self._count_reset()
            return
        except RequestError as e:
            problem = e.status
            head = RequestHead(method=b"-", target=b"-", version=b"2", host=b"")
        exchange = H2Exchange(self, stream_id, head, ended)
        self.streams[stream_id] = exchange
        self._idle()
        if self._draining:
            try:
                self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            except (StreamClosedError, ProtocolError):
                pass
            self._forget(exchange)
            return
        if problem:
            pages.send(exchange, problem)
            return
        try:
            self.handler.handle(exchange)
        except Exception:
            self.log.failure("handler failed for {method} {target}", method=head.method, target=head.target)
            if not exchange.response_started:
                pages.send(exchange, 500)
            else:
                exchange.abort()

    # -- outbound (called by exchanges) ---------------------------------------

    def window(self, stream_id: int) -> int:
        """What may go out on the stream now: h2's local_flow_control_window within a frame; 0 once h2 forgot it."""
        conn = self.conn
        stream = conn.streams.get(stream_id)
        if stream is None:
            return 0
        return min(conn.outbound_flow_control_window, stream.outbound_flow_control_window, conn.max_outbound_frame_size)

    def send_headers(self, stream_id: int, fields: Headers, end: bool) -> None:
        conn = self.conn
        try:
            frames = None
            if fields[0][1][:1] != b"1":  # a final answer (h2 has rules of its own for 1xx)
                frames = answer_headers_frames(conn, stream_id, fields, self._encoder, end)
            if frames is None:
                conn.send_headers(stream_id, fields, end_stream=end)
            else:
                held = conn.data_to_send()  # before ours: a stream's DATA must follow its HEADERS
                if held:
                    self._pending.append(held)
                self._pending.append(frames)
        except (StreamClosedError, ProtocolError):
            return
        if not self._held:
            self._flush_soon()

    def send_data(self, stream_id: int, data: bytes, end: bool = False) -> None:
        conn = self.conn
        try:
            header = data_frame_header(conn, stream_id, data, end)
            if header is None:
                conn.send_data(stream_id, data, end_stream=end)
            else:
                held = conn.data_to_send()
                if held:
                    self._pending.append(held)
                self._pending.append(header)
                self._pending.append(data)
        except (StreamClosedError, ProtocolError, FlowControlError):
            return
        if not self._held:
            self._flush_soon()

    def end_stream(self, stream_id: int) -> None:
        try:
            self.conn.end_stream(stream_id)
        except (StreamClosedError, ProtocolError):
            return
        if not self._held:
            self._flush_soon()

    def reset_stream(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self.conn.reset_stream(stream_id, code)
        except (StreamClosedError, ProtocolError):
            return
        if not self._held:
            self._flush_soon()

    def acknowledge(self, stream_id: int, length: int) -> None:
        try:
            self.conn.acknowledge_received_data(length, stream_id)
        except (StreamClosedError, ProtocolError):
            return
        if not self._held:
            self._flush_soon()

    def drain(self) -> None:
        """Shutting down: GOAWAY, let open streams finish, then close.

        The GOAWAY is written by hand: h2's close_connection would put its
        state machine in CLOSED, and the streams still open could no longer
        send their answers.
        """
        self._draining = True
        if self._closed:
            return
        self._flush()  # what h2 holds goes before the GOAWAY
        goaway = GoAwayFrame(0)
        goaway.last_stream_id = self.conn.highest_inbound_stream_id
        goaway.error_code = ErrorCodes.NO_ERROR
        self.transport.write(goaway.serialize())
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        if self._draining and not self.streams and not self._closed:
            self._closed = True
            self.conn.close_connection()
            self._flush()
            self._close()

    def stream_due_at(self, when: float) -> None:
        """A stream has something due at ``when``: make sure the connection's one timer comes by then."""
        due = self._streams_due_at
        if due is None or when < due:
            self._streams_due_at = when
            self._streams_timer.set(when - self.clock.seconds(), self._streams_due)

    def _streams_due(self) -> None:
        """Run what has come due on any stream (its deadline, or a send stalled on a shut window)."""
        self._streams_due_at = None
        now = self.clock.seconds() + 1e-9
        stall = self.limits.idle_timeout
        later: float | None = None
        for exchange in list(self.streams.values()):
            deadline = exchange.deadline
            when = deadline._when
            if when is not None:
                if when <= now:
                    action = deadline._action
                    deadline._when = deadline._action = None
                    if action is not None:
                        action()
                elif later is None or when < later:
                    later = when
            since = exchange._stalled_since
            if since is not None and exchange.stream_id in self.streams:
                if since + stall <= now:
                    exchange._window_stalled()
                elif later is None or since + stall < later:
                    later = since + stall
        if later is not None:
            self.stream_due_at(later)

    def _count_reset(self) -> None:
        """One more stream reset by the client or for its error; GOAWAY if they come too fast."""
        now = self.clock.seconds()
        if now - self._reset_window_start >= RESET_WINDOW:
            self._reset_window_start = now
            self._resets = self._served = 0
        self._resets += 1
        if self._resets > RESET_BURST + self._served and not self._closed:
            self.log.info(
                "HTTP/2 client {client} reset {n} streams: GOAWAY", client=self.client_address, n=self._resets
            )
            self._calm_down()

    def _too_many_control_frames(self, before: int) -> bool:
        """GOAWAY if this read took the window's PING, SETTINGS, PRIORITY and empty DATA frames past CONTROL_BURST."""
        now = self.clock.seconds()
        if now - self._control_window_start >= RESET_WINDOW:
            self._control_window_start = now
            self._control_base = before  # this read's frames count in the new window
        if self._frames.control - self._control_base <= CONTROL_BURST:
            return False
        self.log.info("HTTP/2 client {client} flooded control frames: GOAWAY", client=self.client_address)
        self._calm_down()
        return True

    def _calm_down(self) -> None:
        """GOAWAY with ENHANCE_YOUR_CALM, and close."""
        self._closed = True
        try:
            self.conn.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM)
        except ProtocolError:
            pass
        self._error_close()

    def _error_close(self) -> None:
        """After our GOAWAY for the client's error: read and drop what it still sends, then close.

        A socket closed with unread bytes is reset by the kernel, and the
        reset can destroy the GOAWAY before the client has read why.  So, as
        HTTP/1.1 does after an error answer, what the client still sends is
        dropped until it has been quiet for linger_quiet, within linger
        seconds and linger_bytes; past either it is cut off.
        """
        self._closed = True
        self._flush()
        self._idle_deadline.stop()
        streams, self.streams = self.streams, {}
        for exchange in streams.values():  # nothing more will reach the client: let the app go
            exchange._client_gone()
            exchange.deadline.stop()
        limits = self.limits
        self._linger_left = limits.linger_bytes
        self._linger_last = now = self.clock.seconds()
        self._linger_until = now + limits.linger
        self._lingering.set(min(limits.linger_quiet, limits.linger), self._linger_timeout)

    def _linger_drop(self, data: bytes) -> None:
        """Lingering: drop what the client sent; cut it off if it sends too much, or for too long."""
        self._linger_left -= len(data)
        now = self.clock.seconds()
        if self._linger_left < 0 or now >= self._linger_until:
            self._lingering.stop()
            self.transport.abortConnection()
            return
        self._linger_last = now
        self._lingering.set(min(self.limits.linger_quiet, self._linger_until - now), self._linger_timeout)

    def _linger_timeout(self) -> None:
        if self.clock.seconds() - self._linger_last >= self.limits.linger_quiet - 1e-6:
            self._linger_left = -1
            self._close(self.limits.linger)  # it is quiet: no unread bytes to turn the close into a reset
            return
        self.log.info("HTTP/2 client {client} kept sending after our GOAWAY: cut off", client=self.client_address)
        self.transport.abortConnection()

    def stream_done(self, exchange: H2Exchange) -> None:
        self._served += 1
        if not exchange._body_done:
            # We answered before the body ended: tell the client to stop sending.
            try:
                self.conn.reset_stream(exchange.stream_id, ErrorCodes.NO_ERROR)
            except (StreamClosedError, ProtocolError):
                pass
        self._forget(exchange)

    def _forget(self, exchange: H2Exchange) -> None:
        """A stream is over: give back its unread window, re-arm idle, maybe close."""
        exchange.deadline.stop()
        exchange._observer = None  # it refers back to the exchange: no cycle left for the GC
        if self.streams.pop(exchange.stream_id, None) is None:
            return
        # Body bytes the handler never took (or took while paused) still count
        # against the connection's window until acknowledged.
        held = exchange._unacked
        exchange._unacked = 0
        exchange._body = []
        if held:
            try:
                self.conn.acknowledge_received_data(held, exchange.stream_id)
            except (StreamClosedError, ProtocolError):
                pass
        if not self._held:
            self._flush_soon()
        self._idle()
        self._close_if_drained()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if self._pending:
            self._pending.append(data)
            data = b"".join(self._pending)
            self._pending.clear()
        if data:
            self.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._closed = True
        if self._closing is not None:
            self._closing.stop()
        self._lingering.stop()
        self._stall.stop()
        self._streams_timer.stop()
        if self.tracker is not None:
            self.tracker.remove(self)
        self._idle_deadline.stop()
        streams, self.streams = self.streams, {}
        for exchange in streams.values():
            exchange._client_gone()
            exchange.deadline.stop()

    def _close(self, grace: float | None = None) -> None:
        """Close after what is written has gone; abort if the client has not taken it within ``grace``.

        A graceful close waits for the client to read: one that never does
        would hold the connection (and what it did not read) for ever.  The
        default grace is one more idle timeout.
        """
        if self._closing is not None:
            return
        self._idle_deadline.stop()
        # A transport waits for its producer to unregister before it closes
        # (TLS would never send close_notify): unregister first.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        self._closing = Deadline(self.clock)
        self._closing.set(self.limits.idle_timeout if grace is None else grace, self._abort)

    def _stalled(self) -> None:
        self.log.info(
            "HTTP/2 client {client} took nothing for {s:g}s: cut off",
            client=self.client_address,
            s=self.limits.idle_timeout,
        )
        self.transport.abortConnection()

    def _abort(self) -> None:
        self.log.info("HTTP/2 client {client} did not read our last bytes: cut off", client=self.client_address)
        self.transport.abortConnection()

    # IPushProducer on our transport.
    def pauseProducing(self) -> None:
        """The client is not taking what we write: stop reading from it too.

        Each PING or SETTINGS it sends queues an answer; a client that sends
        them and never reads would otherwise grow our buffer without bound.
        If it takes nothing for an idle timeout, it is cut off.
        """
        self.transport_paused = True
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
            self._stall.set(self.limits.idle_timeout, self._stalled)
        for exchange in self.streams.values():
            if exchange._producer is not None and not exchange._producer_paused:
                exchange._producer_paused = True
                exchange._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport_paused = False
        if self._reading_paused:
            self._reading_paused = False
            self._stall.clear()
            if not self._closed:
                self.transport.resumeProducing()
        self.hold()
        try:
            for exchange in list(self.streams.values()):
                exchange._flush()
        finally:
            self.release()

    def stopProducing(self) -> None:
        pass

"""HTTP/1.1 server protocol: a strict parse, hard limits, and one request at a time.

:mod:`tlsproxy.http.wire` parses each head once it is whole and frames the
bodies; this module adds the connection's side of the rules: limits on the
request line and head answered while the head is still arriving (414/431),
and a deadline for the whole head that does not restart with every byte, so
slowloris clients are cut off.

Requests on one connection are answered in order: while a response is being
written, a pipelined request waits in a queue and reading pauses.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tlsproxy.deadline import Deadline
from tlsproxy.http import pages
from tlsproxy.http.exchange import BodyConsumer, ExchangeObserver, Handler, RequestHead, ResponseFields
from tlsproxy.http.wire import (
    LAST_CHUNK,
    ChunkedBody,
    FramingError,
    HeadScanner,
    LengthBody,
    RequestError,
    check_head_limits,
    chunk,
    parse_request_head,
    valid_host,
)

__all__ = ["HTTP11Factory", "HTTP11ServerProtocol", "Limits", "RequestError", "client_address_of", "valid_host"]

_REASONS = pages.REASONS
_NO_BODY_STATUS = (204, 304)


@dataclass(frozen=True)
class Limits:
    """Sizes and deadlines that bound what one client can make us hold."""

    max_request_line: int = 8192
    max_header_size: int = 32768
    max_header_count: int = 100
    max_header_line: int = 16384
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    handshake_timeout: float = 10.0
    body_timeout: float = 60.0  # longest wait for the next bytes of a request body
    # After an error answer, what the client still sends is dropped until it
    # has been quiet for linger_quiet, for at most linger seconds and bytes.
    linger: float = 5.0
    linger_quiet: float = 1.0
    linger_bytes: int = 4 * 1024 * 1024


class HTTP11Exchange:
    """One request on an HTTP/1.1 connection, as a handler sees it."""

    # State every exchange starts with; one is made per request, so an
    # instance stores only what changes.
    _consumer: BodyConsumer | None = None
    _observer: ExchangeObserver | None = None
    _body: list[bytes] | None = None  # read before the handler took the body
    _held = 0
    _started = False
    _finished = False
    _chunked_out = False
    tunnel: Any = None
    request_id = ""  # the access log's (tlsproxy/proxy/accesslog.py)
    started = 0.0

    def __init__(self, proto: HTTP11ServerProtocol, head: RequestHead, keep_alive: bool) -> None:
        self._proto = proto
        self.transport = proto.transport  # the client's (for corking a burst of writes)
        # While a request is answered the connection's own deadline is free:
        # the handler times the app with it.
        self.deadline = proto._timer
        self.head = head
        self.client_address = proto.client_address
        self.secure = proto.secure
        self.server_port = proto.server_port
        self.keep_alive = keep_alive
        self.no_body = head.method == b"HEAD"
        self._body_done = not (head.chunked or head.content_length)

    # -- request body --------------------------------------------------------

    def set_body_consumer(self, consumer: BodyConsumer) -> None:
        self._consumer = consumer
        body, self._body = self._body, None
        for piece in body or ():
            consumer.body_data(piece)
        if self._body_done:
            consumer.body_end()
        else:
            self._proto.resume_reading("buffer")

    def _body_data(self, data: bytes) -> None:
        if self._consumer is not None:
            self._consumer.body_data(data)
            return
        # Until the handler takes the body, at most ~64 KiB is held.
        if self._body is None:
            self._body = []
        self._body.append(data)
        self._held += len(data)
        if self._held > 65536:
            self._proto.pause_reading("buffer")

    def _body_end(self) -> None:
        if self._body_done:
            return
        self._body_done = True
        if self._consumer is not None:
            self._consumer.body_end()

    def pause_body(self) -> None:
        self._proto.pause_reading("app")

    def resume_body(self) -> None:
        self._proto.resume_reading("app")

    def set_observer(self, observer: ExchangeObserver) -> None:
        self._observer = observer

    def send_continue(self) -> None:
        """Ask a client waiting on ``Expect: 100-continue`` for its body (the handler will read it)."""
        if not self._started and not self._body_done and self.head.version == b"1.1":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- response ------------------------------------------------------------

    @property
    def response_started(self) -> bool:
        return self._started

    def _head_bytes(self, status: int, reason: bytes, headers: ResponseFields, content_length: int | None) -> bytes:
        """The response head, with our own framing; decides chunking and keep-alive."""
        if self._started:
            raise RuntimeError("response already started")
        self._started = True
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or _REASONS.get(status, b"Unknown"))]
        if isinstance(headers, bytes):
            lines.append(headers)
        else:
            for name, value in headers:
                lines += (name, b": ", value, b"\r\n")
        if status == 101:
            lines.append(b"\r\n")
            return b"".join(lines)
        if self._proto._draining or not self._body_done:
            # Shutting down, or an answer before the whole request body
            # arrived: the connection cannot serve another request.
            self.keep_alive = False
        if status in _NO_BODY_STATUS or status < 200:
            self.no_body = True
            if content_length is not None and status == 304:
                lines.append(b"Content-Length: %d\r\n" % content_length)
        elif content_length is not None:
            lines.append(b"Content-Length: %d\r\n" % content_length)
        elif self.head.version == b"1.1":
            if not self.no_body:
                self._chunked_out = True
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            self.keep_alive = False
        if not self.keep_alive:
            lines.append(b"Connection: close\r\n")
        elif self.head.version == b"1.0":
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def start_response(self, status: int, reason: bytes, headers: ResponseFields, content_length: int | None) -> None:
        self.transport.write(self._head_bytes(status, reason, headers, content_length))

    def respond(self, status: int, reason: bytes, headers: ResponseFields, body: bytes) -> None:
        """A whole response at once: head and body leave in one write, then it is finished."""
        head = self._head_bytes(status, reason, headers, len(body))
        self.transport.write(head if self.no_body else head + body)
        self._finished = True
        self._proto.exchange_finished(self)

    def write(self, data: bytes) -> None:
        if self._finished or not data:
            return
        if self.tunnel is not None:
            self.transport.write(data)
        elif self.no_body:
            return
        elif self._chunked_out:
            self.transport.write(chunk(data))
        else:
            self.transport.write(data)

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._chunked_out:
            self.transport.write(LAST_CHUNK)
        self._proto.exchange_finished(self)

    def abort(self) -> None:
        """Give up on this response: the client's connection is cut."""
        if not self._finished:
            self._finished = True
            self._proto.abort_connection()

    def register_producer(self, producer: IPushProducer) -> None:
        self._proto.response_producer = producer
        if self._proto.transport_paused:
            producer.pauseProducing()

    def unregister_producer(self) -> None:
        self._proto.response_producer = None

    def start_tunnel(self, peer: Any) -> None:
        """After a 101: every byte from the client now goes to ``peer.write``."""
        self.tunnel = peer
        self._proto.start_tunnel(self, peer)

    def _client_gone(self) -> None:
        if not self._finished and self._observer is not None:
            self._observer.client_gone()


@implementer(IHandshakeListener, IPushProducer)
class HTTP11ServerProtocol(Protocol):
    """Parse requests, enforce the limits, hand each request to the handler."""

    log = Logger()
    transport: Any  # a TCP or TLS transport (Protocol types it as ITransport | None)

    # Per-connection state that starts the same on every connection.
    response_producer: IPushProducer | None = None
    transport_paused = False
    tracker: Any = None
    client_address = ""
    server_port = 0
    started: float | None = None  # when the client connected, if before this protocol took over
    _current: HTTP11Exchange | None = None  # its body is being read
    _active: HTTP11Exchange | None = None  # being answered
    _body: LengthBody | ChunkedBody | None = None  # framing of _current's body
    _pending: HeadScanner | None = None  # an unfinished head
    _head_armed = False  # the head deadline runs for the unfinished head
    _closing = False
    _linger_next = False  # the client may still be sending when we close: linger
    _linger_left = -1  # bytes still to drop while lingering (-1: not lingering)
    _linger_until = 0.0  # when lingering ends however the client behaves
    _linger_last = 0.0  # when it last sent something
    _draining = False
    _tunnel: Any = None
    _upgrade_rest = b""
    _upgrading = False

    def __init__(self, handler: Handler, clock: IReactorTime, limits: Limits, secure: bool) -> None:
        self.handler = handler
        self.clock = clock
        self.limits = limits
        self.secure = secure
        self._queue: deque[HTTP11Exchange] = deque()
        self._paused_for: set[str] = set()
        self._timer = Deadline(clock)
        self._body_timer = Deadline(clock)  # the client's silence within a request body

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_address = client_address_of(peer)
        self.server_port = getattr(self.transport.getHost(), "port", 0)
        self.transport.registerProducer(self, True)
        # Over TLS this protocol is made once the handshake is over (the TLS
        # listener times the handshake): the first head is due either way.
        self._await_first_head()

    def handshakeCompleted(self) -> None:
        pass

    def _await_first_head(self) -> None:
        """The first request head is due header_timeout after the client connected.

        A client that has sent nothing yet is not an idle keep-alive client:
        holding it for idle_timeout would let silent connections pile up.
        """
        elapsed = self.clock.seconds() - self.started if self.started is not None else 0.0
        self._head_armed = True
        self._timer.set(max(self.limits.header_timeout - elapsed, 0.0), self._head_timeout)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._timer.stop()
        self._body_timer.stop()
        if self.tracker is not None:
            self.tracker.remove(self)
        if self._tunnel is not None:
            self._tunnel.loseConnection()
            self._tunnel = None
        for exchange in (self._active, *self._queue):
            if exchange is not None:
                exchange._client_gone()
        self._active = self._current = None
        self._queue.clear()

    # -- timers --------------------------------------------------------------

    def _idle_timeout(self) -> None:
        self._close()

    def _head_timeout(self) -> None:
        if self._pending is None:
            self._close()  # not a byte of a request: nobody to answer
            return
        self._refuse(RequestError(408, "the request head did not arrive in time"))

    def _body_timeout(self) -> None:
        if self._body is None or self._closing:
            return
        if self._paused_for:
            # We stopped reading (the app, or a request ahead, is slower):
            # not the client's silence.
            self._body_timer.set(self.limits.body_timeout, self._body_timeout)
            return
        self._body_failed(RequestError(408, "the request body stalled"))

    def _linger_timeout(self) -> None:
        if self.clock.seconds() - self._linger_last >= self.limits.linger_quiet - 1e-6:
            self._close()  # it stopped sending: nothing unread is left to turn the close into a reset
            return
        self.log.debug("lingering close of {client} timed out", client=self.client_address)
        self.transport.abortConnection()

    # -- parsing -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.write(data)
            return
        if self._closing:
            if self._linger_left >= 0:
                # Lingering: read and drop what a refused client still sends.
                self._linger_left -= len(data)
                now = self.clock.seconds()
                if self._linger_left < 0 or now >= self._linger_until:
                    self.transport.abortConnection()
                    return
                self._linger_last = now
                self._timer.set(min(self.limits.linger_quiet, self._linger_until - now), self._linger_timeout)
            return
        if self._upgrading:
            # Bytes after an Upgrade head belong to the tunnel (if the app
            # agrees to it); keep them until it starts.
            self._upgrade_rest += data
            return
        try:
            self._receive(data)
        except RequestError as e:
            self._refuse(e)
        except FramingError as e:
            self._body_failed(RequestError(400, str(e)))

    def _receive(self, data: bytes) -> None:
        """Take heads and bodies out of ``data`` until it is used up."""
        while data:
            body = self._body
            if body is not None:
                pieces: list[bytes] = []
                used = body.feed(data, pieces)
                exchange = self._current
                assert exchange is not None
                for piece in pieces:
                    exchange._body_data(piece)
                if body.done:
                    self._body = self._current = None
                    self._body_timer.clear()
                    exchange._body_end()
                else:
                    self._body_timer.set(self.limits.body_timeout, self._body_timeout)
                if used == len(data) or self._closing:
                    return
                data = data[used:]
                continue
            pending = self._pending
            if pending is not None:
                end = pending.feed(data)
                if end < 0:
                    self._arm_head_deadline()
                    return
                self._pending = None
                buffered = bytes(pending.buffer)
                raw, rest = buffered[pending.start : end], buffered[end + 2 :]
            else:
                if data[:2] == b"\r\n":
                    # Empty lines before a request line are ignored (RFC 9112 2.2).
                    data = _skip_empty_lines(data)
                    if not data:
                        return
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    limits = self.limits
                    scanner = HeadScanner(
                        limits.max_request_line, limits.max_header_line, limits.max_header_size, limits.max_header_count
                    )
                    self._pending = scanner
                    scanner.feed(data)
                    self._arm_head_deadline()
                    return
                raw, rest = data[: end + 2], data[end + 4 :]
            self._head(raw, rest)
            if self._upgrading or self._closing:
                return
            data = rest

    def _arm_head_deadline(self) -> None:
        """Part of a head has come: start its deadline, unless a request is being answered."""
        if not self._head_armed and self._active is None and not self._queue:
            # A head that does not arrive in one read must arrive whole
            # within header_timeout, however slowly it trickles in.
            self._head_armed = True
            self._timer.set(self.limits.header_timeout, self._head_timeout)

    def _head(self, raw: bytes, rest: bytes) -> None:
        """A whole request head: validate it, then answer it or queue it."""
        limits = self.limits
        if len(raw) > limits.max_request_line or len(raw) > limits.max_header_line:
            # Long enough that a line (or the whole) could be over a limit.
            check_head_limits(raw, True, limits.max_request_line, limits.max_header_line, limits.max_header_size)
        head, keep_alive = parse_request_head(raw, limits.max_header_count)
        self._head_armed = False
        exchange = HTTP11Exchange(self, head, keep_alive and not self._closing)
        if head.chunked:
            self._body = ChunkedBody()
            self._current = exchange
            self._body_timer.set(limits.body_timeout, self._body_timeout)
        elif head.content_length:
            self._body = LengthBody(head.content_length)
            self._current = exchange
            self._body_timer.set(limits.body_timeout, self._body_timeout)
        elif head.upgrade:
            self._upgrading = True
            self._upgrade_rest = rest
        if self._active is None:
            self._timer.clear()
            self._dispatch(exchange)
        else:
            self._queue.append(exchange)
            self.pause_reading("queue")

    # -- answering -----------------------------------------------------------

    def _dispatch(self, exchange: HTTP11Exchange) -> None:
        self._active = exchange
        try:
            self.handler.handle(exchange)
        except Exception:
            self.log.failure(
                "handler failed for {method} {target}", method=exchange.head.method, target=exchange.head.target
            )
            if not exchange.response_started:
                pages.send(exchange, 500)
            else:
                exchange.abort()

    def exchange_finished(self, exchange: HTTP11Exchange) -> None:
        # The observer (the proxied request) refers back to the exchange:
        # dropping it here lets both go by reference counting, not the GC.
        exchange._observer = None
        if exchange is not self._active:
            return
        self._active = None
        self.response_producer = None
        if self._paused_for:
            # Whatever that exchange paused reading for is over with it.
            self.resume_reading("app")
            self.resume_reading("buffer")
        if not exchange.keep_alive or self._closing or self._draining:
            self._closing = True
            if self._linger_next or not exchange._body_done:
                self._linger()
            else:
                self._close()
            return
        if self._queue:
            self._dispatch(self._queue.popleft())
            if not self._queue:
                self.resume_reading("queue")
            return
        if self._paused_for:
            self.resume_reading("queue")
        if self._pending is not None:
            self._head_armed = True
            self._timer.set(self.limits.header_timeout, self._head_timeout)
        else:
            self._timer.set(self.limits.idle_timeout, self._idle_timeout)

    def _refuse(self, error: RequestError) -> None:
        """Answer a bad request with a short page, then stop reading and close."""
        if self._closing:
            return
        self.log.info(
            "refused request from {client}: {status} {detail}",
            client=self.client_address,
            status=error.status,
            detail=error.detail,
        )
        self._queue.clear()
        self._linger_next = True
        if self._active is not None:
            # A response is in flight: let it finish (exchange_finished then
            # closes); what the client sent after the bad request is dropped.
            self._closing = True
            return
        self._timer.clear()
        head = RequestHead(method=b"GET", target=b"/", version=b"1.1", host=b"")
        exchange = HTTP11Exchange(self, head, keep_alive=False)
        self._active = exchange
        self._closing = True
        pages.send(exchange, error.status)

    def _body_failed(self, error: RequestError) -> None:
        """A request body that breaks its framing or stalls: answer it if we still can, and close."""
        exchange = self._current
        self._body = self._current = None
        self._body_timer.clear()
        if exchange is None or exchange is not self._active:
            self._refuse(error)  # not handed to the handler yet: as any bad request
            return
        self.log.info(
            "request body from {client} failed: {status} {detail}",
            client=self.client_address,
            status=error.status,
            detail=error.detail,
        )
        self._queue.clear()
        self._closing = self._linger_next = True
        exchange._client_gone()  # the handler stops waiting for the body and lets the app go
        if exchange.response_started:
            exchange.abort()
        else:
            pages.send(exchange, error.status)

    def _linger(self) -> None:
        """Close after an answer to a client that may still be sending.

        Closing a socket with unread bytes resets the connection, and the reset
        can destroy our answer before the client reads it; so what it still
        sends is read and dropped until it is quiet, within a bounded time and
        size (and on TCP our side is shut down, so the client sees the end).
        """
        limits = self.limits
        self._linger_left = limits.linger_bytes
        self._linger_last = now = self.clock.seconds()
        self._linger_until = now + limits.linger
        self._body_timer.clear()
        self.resume_reading_fully()
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        self._timer.set(min(limits.linger_quiet, limits.linger), self._linger_timeout)

    def drain(self) -> None:
        """Shutting down: finish the response in flight, then close."""
        self._draining = True
        if self._active is None and self._tunnel is None:
            self._close()

    def abort_connection(self) -> None:
        self._closing = True
        self.transport.abortConnection()

    # -- upgrade tunnel ------------------------------------------------------

    def start_tunnel(self, exchange: HTTP11Exchange, peer: Any) -> None:
        self._timer.clear()
        self._tunnel = peer
        self._upgrading = False
        rest, self._upgrade_rest = self._upgrade_rest, b""
        if rest:
            peer.write(rest)
        self.resume_reading_fully()

    def _close(self) -> None:
        # A transport waits for its producer to unregister before it closes
        # (TLS would never send close_notify): unregister first.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # -- flow control --------------------------------------------------------

    # Reading from the client stops for any of three reasons, each lifted on
    # its own: "queue" (pipelined requests wait for their turn), "buffer" (a
    # body the handler has not taken yet) and "app" (the app reads slower).

    def pause_reading(self, reason: str) -> None:
        if not self._paused_for:
            self.transport.pauseProducing()
        self._paused_for.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self._paused_for:
            self._paused_for.discard(reason)
            if not self._paused_for:
                self.transport.resumeProducing()

    def resume_reading_fully(self) -> None:
        if self._paused_for:
            self._paused_for.clear()
            self.transport.resumeProducing()

    # IPushProducer, registered on our transport: the client cannot keep up.
    def pauseProducing(self) -> None:
        self.transport_paused = True
        if self.response_producer is not None:
            self.response_producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport_paused = False
        if self.response_producer is not None:
            self.response_producer.resumeProducing()

    def stopProducing(self) -> None:
        if self.response_producer is not None:
            self.response_producer.stopProducing()


def client_address_of(peer: Any) -> str:
    """The client's IP as the app should see it: IPv4-mapped IPv6 shown as IPv4."""
    host = getattr(peer, "host", "") or "unix"
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def _skip_empty_lines(data: bytes) -> bytes:
    while data[:2] == b"\r\n":
        data = data[2:]
    return data


class HTTP11Factory(Factory):
    """Build :class:`HTTP11ServerProtocol` instances sharing one handler."""

    noisy = False

    def __init__(
        self, handler: Handler, clock: IReactorTime, limits: Limits, secure: bool, tracker: Any = None
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.limits = limits
        self.secure = secure
        self.tracker = tracker

    def buildProtocol(self, addr: Any) -> HTTP11ServerProtocol:
        proto = HTTP11ServerProtocol(self.handler, self.clock, self.limits, self.secure)
        if self.tracker is not None:
            proto.tracker = self.tracker
            self.tracker.add(proto)
        return proto

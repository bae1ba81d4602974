"""HTTP/1.1 server protocol: a strict parse, hard limits, and one request at a time.

httptools (llhttp) does the byte-level parsing and already refuses the classic
smuggling shapes (Content-Length with Transfer-Encoding, duplicate or signed
Content-Length, obs-fold, bare LF).  This module adds the rules a proxy needs
on top: exactly one Host on HTTP/1.1, no Transfer-Encoding on HTTP/1.0 and no
coding but ``chunked``, limits on the request line and head answered at once
(414/431), and a deadline for the whole head that does not restart with every
byte, so slowloris clients are cut off.

Requests on one connection are answered in order: while a response is being
written the transport is paused, and anything a pipelining client already sent
waits in the parser's queue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import httptools
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tlsproxy.http import pages
from tlsproxy.http.deadline import Deadline
from tlsproxy.http.exchange import BodyConsumer, ExchangeObserver, Handler, Headers, RequestHead

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
    linger: float = 2.0


class RequestError(Exception):
    """The client sent something we refuse; answered with ``status`` and a close."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class HTTP11Exchange:
    """One request on an HTTP/1.1 connection, as a handler sees it."""

    __slots__ = (
        "_body",
        "_body_done",
        "_chunked_out",
        "_consumer",
        "_finished",
        "_held",
        "_observer",
        "_proto",
        "_started",
        "client_address",
        "connection",
        "head",
        "keep_alive",
        "no_body",
        "secure",
        "server_port",
        "tunnel",
    )

    def __init__(self, proto: HTTP11ServerProtocol, head: RequestHead, keep_alive: bool) -> None:
        self._proto = proto
        self.connection = proto  # lives as long as the client connection, one request at a time
        self.head = head
        self.client_address = proto.client_address
        self.secure = proto.secure
        self.server_port = proto.server_port
        self.keep_alive = keep_alive
        self.no_body = head.method == b"HEAD"
        self._consumer: BodyConsumer | None = None
        self._observer: ExchangeObserver | None = None
        self._body: list[bytes] = []
        self._held = 0
        self._body_done = not (head.chunked or head.content_length)
        self._started = False
        self._finished = False
        self._chunked_out = False
        self.tunnel: Any = None

    @property
    def transport(self) -> Any:
        """The client's transport (for corking a burst of writes)."""
        return self._proto.transport

    # -- request body --------------------------------------------------------

    def set_body_consumer(self, consumer: BodyConsumer) -> None:
        self._consumer = consumer
        body, self._body = self._body, []
        for chunk in body:
            consumer.body_data(chunk)
        if self._body_done:
            consumer.body_end()
        else:
            self._proto.resume_reading("buffer")

    def _body_data(self, data: bytes) -> None:
        if self._consumer is not None:
            self._consumer.body_data(data)
        else:
            # Until the handler takes the body, at most ~64 KiB is held.
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

    # -- response ------------------------------------------------------------

    @property
    def response_started(self) -> bool:
        return self._started

    def start_response(self, status: int, reason: bytes, headers: Headers, content_length: int | None) -> None:
        if self._started:
            raise RuntimeError("response already started")
        self._started = True
        proto = self._proto
        version = self.head.version
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or _REASONS.get(status, b"Unknown"))]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        if status == 101:
            lines.append(b"\r\n")
            proto.transport.writeSequence(lines)
            return
        if proto._draining:
            self.keep_alive = False
        if not self._body_done:
            # A response before the whole request body arrived: we cannot
            # reuse the connection without reading (and discarding) the rest.
            self.keep_alive = False
        if status in _NO_BODY_STATUS or status < 200:
            self.no_body = True
            if content_length is not None and status == 304:
                lines.append(b"Content-Length: %d\r\n" % content_length)
        elif content_length is not None:
            lines.append(b"Content-Length: %d\r\n" % content_length)
        elif version == b"1.1":
            if not self.no_body:
                self._chunked_out = True
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            self.keep_alive = False
        if not self.keep_alive:
            lines.append(b"Connection: close\r\n")
        elif version == b"1.0":
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        proto.transport.writeSequence(lines)

    def write(self, data: bytes) -> None:
        if self._finished or not data:
            return
        if self.tunnel is not None:
            self._proto.transport.write(data)
        elif self.no_body:
            return
        elif self._chunked_out:
            self._proto.transport.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            self._proto.transport.write(data)

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._chunked_out:
            self._proto.transport.write(b"0\r\n\r\n")
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

    def __init__(self, handler: Handler, clock: IReactorTime, limits: Limits, secure: bool) -> None:
        self.handler = handler
        self.clock = clock
        self.limits = limits
        self.secure = secure
        self.client_address = ""
        self.server_port = 0
        self.response_producer: IPushProducer | None = None
        self.transport_paused = False
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[HTTP11Exchange] = deque()
        self._current: HTTP11Exchange | None = None  # being parsed
        self._active: HTTP11Exchange | None = None  # being answered
        self._paused_for: set[str] = set()
        self._closing = False
        self._tunnel: Any = None
        self._timer = Deadline(clock)
        self._in_head = False
        self._head_bytes = 0
        self._url = b""
        self._headers: Headers = []
        self._header_bytes = 0
        self._draining = False
        self.tracker: Any = None
        self._line_bytes = 0
        self._head_lines = 0
        self._head_armed = False

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_address = client_address_of(peer)
        self.server_port = getattr(self.transport.getHost(), "port", 0)
        self.transport.registerProducer(self, True)
        if self.secure:
            self._set_timer(self.limits.handshake_timeout, self._handshake_timeout)
        else:
            self._set_timer(self.limits.idle_timeout, self._idle_timeout)

    def handshakeCompleted(self) -> None:
        self._set_timer(self.limits.idle_timeout, self._idle_timeout)

    upstream_deadline: Deadline | None = None

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._timer.stop()
        if self.upstream_deadline is not None:
            self.upstream_deadline.stop()
        if self.tracker is not None:
            self.tracker.remove(self)
        if self._tunnel is not None:
            self._tunnel.loseConnection()
            self._tunnel = None
        for exchange in (self._active, *self._queue):
            if exchange is not None:
                exchange._client_gone()
        self._active = None
        self._queue.clear()

    # -- timers --------------------------------------------------------------

    def _set_timer(self, seconds: float, action: Any) -> None:
        self._timer.set(seconds, action)

    def _cancel_timer(self) -> None:
        self._timer.clear()

    def _handshake_timeout(self) -> None:
        self.log.debug("TLS handshake from {client} timed out", client=self.client_address)
        self.transport.abortConnection()

    def _idle_timeout(self) -> None:
        self._close()

    def _head_timeout(self) -> None:
        self._refuse(RequestError(408, "the request head did not arrive in time"))

    # -- parsing -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.write(data)
            return
        if self._closing:
            return  # lingering: read and drop what a refused client still sends
        if self._upgrading:
            # Bytes after an Upgrade head belong to the tunnel (if the app
            # agrees to it); keep them until it starts.
            self._upgrade_rest += data
            return
        whole = self._in_head or self._current is None
        try:
            self._parser.feed_data(data)
            if self._in_head:
                self._head_bytes += len(data)
                self._check_head_size(data, whole)
                if not self._head_armed and self._active is None and not self._queue:
                    self._head_armed = True
                    self._set_timer(self.limits.header_timeout, self._head_timeout)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0]
            self._upgrading = True
            self._upgrade_rest = data[offset:]
        except RequestError as e:
            self._refuse(e)
        except httptools.HttpParserInvalidMethodError:
            self._refuse(RequestError(400, "invalid method"))
        except httptools.HttpParserError as e:
            # Our callbacks' exceptions come back wrapped; the cause says why.
            cause = e.__context__
            if isinstance(cause, RequestError):
                self._refuse(cause)
            elif cause is not None and not isinstance(cause, httptools.HttpParserError):
                self.log.failure("request parsing failed", Failure(cause))
                self._refuse(RequestError(500, "internal error"))
            else:
                self._refuse(RequestError(400, str(e) or "malformed request"))

    def _check_head_size(self, data: bytes, whole: bool) -> None:
        """Refuse an over-long line or head while it is still arriving.

        httptools reports a header only when the next one starts, so lines are
        measured here on the raw bytes.  ``whole`` says ``data`` holds nothing
        but head bytes (the read began at a message boundary or inside the head).
        """
        limits = self.limits
        if whole:
            lines = data.split(b"\n")
            for line in lines[:-1]:
                self._check_line(self._line_bytes + len(line))
                self._line_bytes = 0
                self._head_lines += 1
            self._line_bytes += len(lines[-1])
            self._check_line(self._line_bytes)
        if self._head_bytes > limits.max_request_line + limits.max_header_size:
            if len(self._url) > limits.max_request_line:
                raise RequestError(414, "request line too long")
            raise RequestError(431, "request head too large")

    def _check_line(self, length: int) -> None:
        if self._head_lines == 0:
            if length > self.limits.max_request_line + 1:
                raise RequestError(414, "request line too long")
        elif length > self.limits.max_header_line + 1:
            raise RequestError(431, "header line too long")

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._line_bytes = 0
        self._head_lines = 0
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        # The head deadline is armed only if the head does not arrive whole
        # in this read (see dataReceived): most never need it.
        self._head_armed = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_request_line:
            raise RequestError(414, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))
        self._header_bytes += len(name) + len(value) + 4
        if len(name) + len(value) > self.limits.max_header_line:
            raise RequestError(431, "header line too long")
        if len(self._headers) > self.limits.max_header_count:
            raise RequestError(431, "too many header fields")
        if self._header_bytes > self.limits.max_header_size:
            raise RequestError(431, "request head too large")

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        version = parser.get_http_version().encode("ascii")
        if version not in (b"1.1", b"1.0"):
            raise RequestError(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
        head = self._validate(parser.get_method(), self._url, version, self._headers)
        keep_alive = parser.should_keep_alive() and not self._closing and not head.upgrade
        exchange = HTTP11Exchange(self, head, keep_alive)
        self._current = exchange
        if self._active is None:
            self._cancel_timer()
            self._dispatch(exchange)
        else:
            self._queue.append(exchange)
            self.pause_reading("queue")

    def on_body(self, body: bytes) -> None:
        if self._current is not None:
            self._current._body_data(body)

    def on_message_complete(self) -> None:
        exchange, self._current = self._current, None
        if exchange is not None:
            exchange._body_end()

    # -- validation ----------------------------------------------------------

    def _validate(self, method: bytes, target: bytes, version: bytes, headers: Headers) -> RequestHead:
        hosts = []
        content_length = None
        chunked = False
        upgrade = b""
        for name, value in headers:
            if name == b"host":
                hosts.append(value)
            elif name == b"content-length":
                content_length = int(value)
            elif name == b"transfer-encoding":
                if version == b"1.0":
                    raise RequestError(400, "Transfer-Encoding is not allowed in HTTP/1.0")
                if value.strip().lower() != b"chunked":
                    raise RequestError(501, "only the chunked transfer coding is supported")
                chunked = True
            elif name == b"upgrade":
                upgrade = value
        if method == b"CONNECT":
            raise RequestError(405, "CONNECT is not supported: this is a reverse proxy")
        if target[:1] != b"/" and target != b"*":
            # Absolute form (RFC 9112 3.2.2): the authority replaces Host.
            scheme, sep, rest = target.partition(b"://")
            if not sep or scheme.lower() not in (b"http", b"https"):
                raise RequestError(400, "malformed request target")
            authority, slash, path = rest.partition(b"/")
            if not authority:
                raise RequestError(400, "malformed request target")
            target = slash + path if slash else b"/"
            hosts = [authority]
            headers = [(n, authority if n == b"host" else v) for n, v in headers]
        if len(hosts) > 1:
            raise RequestError(400, "more than one Host header")
        if not hosts:
            if version == b"1.1":
                raise RequestError(400, "HTTP/1.1 requests need a Host header")
            hosts = [b""]
        host = hosts[0].strip()
        if not valid_host(host):
            raise RequestError(400, "malformed Host header")
        if chunked:
            content_length = None
        if not self._parser.should_upgrade():
            upgrade = b""
        return RequestHead(method, target, version, host.lower(), headers, content_length, chunked, upgrade)

    # -- answering -----------------------------------------------------------

    def _dispatch(self, exchange: HTTP11Exchange) -> None:
        self._active = exchange
        if not exchange._body_done or exchange._consumer is None:
            # The handler decides when to read the body: until it attaches a
            # consumer, at most one read's worth is buffered.
            pass
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
        if exchange is not self._active:
            return
        self._active = None
        self.response_producer = None
        paused = self._paused_for
        if paused:
            # Whatever that exchange paused reading for is over with it.
            self.resume_reading("app")
            self.resume_reading("buffer")
        if not exchange.keep_alive or self._closing or self._draining:
            self._closing = True
            self._close()
            return
        if self._queue:
            self._dispatch(self._queue.popleft())
            if not self._queue:
                self.resume_reading("queue")
            return
        if paused:
            self.resume_reading("queue")
        if self._in_head:
            self._head_armed = True
            self._set_timer(self.limits.header_timeout, self._head_timeout)
        else:
            self._set_timer(self.limits.idle_timeout, self._idle_timeout)

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
        if self._active is not None:
            # A response is in flight: let it finish (exchange_finished then
            # closes); what the client sent after the bad request is dropped.
            self._closing = True
            return
        self._cancel_timer()
        head = RequestHead(method=b"GET", target=b"/", version=b"1.1", host=b"")
        exchange = HTTP11Exchange(self, head, keep_alive=False)
        self._active = exchange
        self._closing = True
        pages.send(exchange, error.status)
        # Linger a little so the client reads our answer before the close.
        self.resume_reading_fully()
        self._set_timer(self.limits.linger, self.transport.abortConnection)

    def drain(self) -> None:
        """Shutting down: finish the response in flight, then close."""
        self._draining = True
        if self._active is None and self._tunnel is None:
            self._close()

    def abort_connection(self) -> None:
        self._closing = True
        self.transport.abortConnection()

    # -- upgrade tunnel ------------------------------------------------------

    _upgrade_rest = b""
    _upgrading = False

    def start_tunnel(self, exchange: HTTP11Exchange, peer: Any) -> None:
        self._cancel_timer()
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


# Bytes a Host header may hold: visible ASCII except the delimiters of a URL.
_HOST_BYTES = bytes(b for b in range(0x21, 0x7F) if b not in b'/\\?#@"<>{}|^`')


def valid_host(host: bytes) -> bool:
    return not host.translate(None, _HOST_BYTES)


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

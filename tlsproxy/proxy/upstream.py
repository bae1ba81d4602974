"""Connections to the app: a keep-alive pool over TCP or a unix socket.

Each :class:`UpstreamConnection` carries one request at a time and reports the
response to its current :class:`ResponseSink`.  A connection goes back to the
pool only when both messages ended cleanly and the app did not ask to close.
"""

from __future__ import annotations

import errno
import os
import socket
from enum import IntEnum
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import error, tcp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tlsproxy.compat.twisted import break_connector_cycle
from tlsproxy.config import Upstream
from tlsproxy.deadline import Deadline
from tlsproxy.eventloop import plain_stream, send_now
from tlsproxy.http.wire import (
    ChunkedBody,
    FramingError,
    LengthBody,
    ResponseError,
    UntilClose,
    parse_response_head,
)
from tlsproxy.proxy.lifecycle import lifecycle

# An app's response head larger than this is refused (nginx's default proxy
# buffer for a head is 4-8 KiB; Django's heads are far smaller).
MAX_RESPONSE_HEAD = 65536


class ConnState(IntEnum):
    """Where an app connection is in its life (its moves: ``CONN_MOVES``)."""

    CONNECTING = 0  # built, not yet connected
    IDLE = 1  # connected, carrying no request: new, or waiting in the pool
    SENT = 2  # a request head went out; no byte of the answer yet
    HEAD = 3  # bytes came back, but no final head yet (a 100 or 103 may have)
    BODY = 4  # the final head went to the sink; its body is being read
    DONE = 5  # the answer ended: back to the pool, or closed, next
    TUNNEL = 6  # a 101: bytes go both ways unparsed
    CLOSING = 7  # we asked the transport to close (or to abort)
    CLOSED = 8  # the transport is gone


CONNECTING, IDLE, SENT, HEAD, BODY, DONE, TUNNEL, CLOSING, CLOSED = ConnState

# Every move an app connection may make (tlsproxy/proxy/lifecycle.py checks them in tests).
CONN_MOVES: dict[ConnState, frozenset[ConnState]] = {
    CONNECTING: frozenset({IDLE}),
    IDLE: frozenset({SENT, CLOSING, CLOSED}),
    SENT: frozenset({HEAD, CLOSING, CLOSED}),
    HEAD: frozenset({BODY, DONE, TUNNEL, CLOSING, CLOSED}),
    BODY: frozenset({DONE, CLOSING, CLOSED}),
    DONE: frozenset({IDLE, CLOSING}),
    TUNNEL: frozenset({CLOSING, CLOSED}),
    CLOSING: frozenset({CLOSING, CLOSED}),  # CLOSING again: an abort after a close
    CLOSED: frozenset(),
}
_LIVE = frozenset({IDLE, SENT, HEAD, BODY, DONE, TUNNEL, CLOSING})  # a transport to talk to


class UpstreamError(Exception):
    """The app could not be reached or broke off; ``status`` is 502 or 504."""

    def __init__(self, status: int, detail: str, *, before_response: bool, reused: bool = False) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.before_response = before_response
        self.reused = reused


class ResponseSink(TypingProtocol):
    def response_head(self, status: int, reason: bytes, fields: bytes, content_length: int | None) -> None: ...

    def response_whole(self, status: int, reason: bytes, fields: bytes, body: bytes) -> None:
        """Head and whole body at once (in place of response_head, response_data, response_end)."""

    def response_data(self, data: bytes) -> None: ...

    def response_end(self) -> None: ...

    def response_failed(self, error: UpstreamError) -> None: ...

    def response_upgraded(self, connection: UpstreamConnection, rest: bytes) -> None:
        """A 101: relay it by ``connection.tunnel_to(peer)``, or close the connection."""

    def client_transport(self) -> Any: ...


@implementer(IPushProducer)
@lifecycle("state", CONNECTING, CONN_MOVES)
class UpstreamConnection(Protocol):
    """One HTTP/1.1 connection to the app.

    Its progress is ``state`` alone (a :class:`ConnState`); what else it keeps
    are facts about the exchange in flight (the app's keep-alive, a HEAD
    request, the request body sent whole) and the flow control.
    """

    log = Logger()
    transport: Any

    # State every connection starts with (and every request resets).
    state: ConnState  # set first by the constructor (lifecycle.py says why not here)
    sink: ResponseSink | None = None  # who the answer in flight goes to
    reused = False  # it came from the pool: the app may have closed it as we sent
    connected = False  # Twisted's flag (makeConnection sets it); ``state`` is ours
    request_complete = False  # the request's body went out whole (its sender says so)
    response_paused = False
    ready: Deferred[UpstreamConnection] | None = None
    _body: LengthBody | ChunkedBody | UntilClose | None = None  # the response body being read
    _buf = b""  # an unfinished response head
    _head_only = False
    _keep_alive = False
    _tunnel: Any = None  # after a 101, who the app's bytes go to
    _corkable: Any = None  # the client's transport, if it can cork
    _corked: Any = None  # ... and corked for the rest of this read
    _request_producer: IPushProducer | None = None

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.state = CONNECTING

    # -- Protocol --------------------------------------------------------------

    def connectionMade(self) -> None:
        self.state = IDLE
        self.transport.registerProducer(self, True)
        ready, self.ready = self.ready, None
        if ready is not None and not ready.called:
            ready.callback(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        was = self.state
        self.state = CLOSED
        self.connected = False
        self.pool.forget(self)
        # Twisted's Connector and its Client refer to each other; breaking
        # that lets the connection go by reference counting, not the GC.
        break_connector_cycle(self.transport)
        if self._tunnel is not None:
            tunnel, self._tunnel = self._tunnel, None
            tunnel.finish()
            return
        sink, self.sink = self.sink, None
        if sink is not None:  # an answer was in flight (SENT, HEAD or BODY)
            if isinstance(self._body, UntilClose):
                # A response with neither Content-Length nor chunked coding
                # ends when the app closes: that close is its end.
                sink.response_end()
                return
            if was is SENT:
                detail = "the app closed the connection without answering"
            else:
                detail = "the app closed the connection in the middle of its response"
            sink.response_failed(UpstreamError(502, detail, before_response=was is SENT, reused=self.reused))

    def dataReceived(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.write(data)
            return
        if self.sink is None:
            # Bytes nobody asked for: this connection is no longer trustworthy.
            self._abort()
            return
        if self.state is SENT:
            self.state = HEAD
        try:
            self._receive(data)
        except (ResponseError, FramingError) as e:
            self._malformed(str(e))
        finally:
            corked = self._corked
            if corked is not None:
                self._corked = None
                corked.uncork()

    def _cork(self) -> None:
        """Everything this read produces for the client leaves in one write.

        (A whole answer in one read is one write anyway, and needs no cork.)
        """
        if self._corked is None and self._corkable is not None:
            self._corked = self._corkable
            self._corked.cork()

    def _receive(self, data: bytes) -> None:
        while data:
            sink = self.sink
            if sink is None:
                # More after the answer, in the same read: nobody asked for it.
                self._abort()
                return
            body = self._body
            if body is not None:
                self._cork()
                pieces: list[bytes] = []
                used = body.feed(data, pieces)
                for piece in pieces:
                    sink.response_data(piece)
                if not body.done:
                    return
                self._complete()
                data = data[used:]
                continue
            if self._buf:
                data = self._buf + data
                self._buf = b""
            end = data.find(b"\r\n\r\n")
            if end < 0 or end + 4 > MAX_RESPONSE_HEAD:
                # However it arrives (in pieces or in one read), a head over the limit is refused.
                if end >= 0 or len(data) > MAX_RESPONSE_HEAD:
                    raise ResponseError("the app's response head is too large")
                self._buf = data
                return
            status, reason, fields, length, chunked, keep_alive = parse_response_head(data[: end + 2])
            data = data[end + 4 :]
            if status < 200 and status != 101:
                continue  # interim responses (100 Continue, 103) are not passed on
            if status == 101:
                self._cork()
                self.sink = None
                self.state = TUNNEL
                sink.response_head(status, reason, fields, None)
                sink.response_upgraded(self, data)
                return
            self._keep_alive = keep_alive
            if self._head_only or status == 204 or status == 304:
                if length or chunked or data:
                    # A bodiless answer that announces (or brings) a body: the app's
                    # framing cannot be trusted, and its late bytes must never become
                    # the next request's answer.  This connection is not reused.
                    self._keep_alive = False
                sink.response_head(status, reason, fields, length)
                self._complete()
                if data:
                    self._abort()
                return
            if length is not None and len(data) == length:
                # The commonest answer: head and whole body in one read.
                self.sink = None
                sink.response_whole(status, reason, fields, data)
                self._complete()
                return
            self._cork()
            self.state = BODY
            if chunked:
                self._body = ChunkedBody()
            elif length is not None:
                sink.response_head(status, reason, fields, length)
                if not length:
                    self._complete()
                    continue
                self._body = LengthBody(length)
                continue
            else:
                self._body = UntilClose()
            sink.response_head(status, reason, fields, None)

    def _malformed(self, detail: str) -> None:
        sink, self.sink = self.sink, None
        before_response = self.state is not BODY
        self._abort()
        if sink is not None:
            sink.response_failed(UpstreamError(502, detail, before_response=before_response))

    def _abort(self) -> None:
        """Drop the connection now: what comes on it can no longer be trusted."""
        self.state = CLOSING
        self.transport.abortConnection()

    # -- requests --------------------------------------------------------------

    def send(self, head: bytes, sink: ResponseSink, head_only: bool) -> None:
        """Write a request head; the body (if any) follows through ``write``."""
        self.sink = sink
        client = sink.client_transport()
        self._corkable = client if hasattr(client, "cork") else None
        self._body = None
        self._buf = b""
        self._head_only = head_only
        self.state = SENT
        self.request_complete = False
        send_now(self.transport, head)

    def write(self, data: bytes) -> None:
        send_now(self.transport, data)

    def tunnel_to(self, peer: Any) -> None:
        """After a 101: the app's bytes go to ``peer.write`` as they come, its close to ``peer.finish``."""
        self._tunnel = peer

    def set_request_producer(self, producer: IPushProducer | None) -> None:
        """Who to pause when the app reads the request body slower than it comes."""
        self._request_producer = producer

    def _complete(self) -> None:
        self._body = None
        sink, self.sink = self.sink, None
        if self.state is CLOSING or self.state is CLOSED:
            return  # the sink closed this connection while it was told of the answer
        self.state = DONE
        # Back to the pool only if both messages ended: a request body the
        # app answered early (a 401 to an upload) is still half on the wire.
        keep = self._keep_alive and self.request_complete
        if sink is not None:
            sink.response_end()
            if self.state is not DONE:
                return  # ... or of its end
        if keep:
            self.state = IDLE
            self.pool.release(self)
        else:
            self.state = CLOSING
            self.transport.loseConnection()

    def close(self) -> None:
        self.sink = None
        if self.state in _LIVE:
            self._abort()

    # IPushProducer: the app cannot take the request body as fast as it comes.
    def pauseProducing(self) -> None:
        if self._request_producer is not None:
            self._request_producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self._request_producer is not None:
            self._request_producer.resumeProducing()

    def stopProducing(self) -> None:
        pass

    # Our side of the back-pressure: the client is slower than the app.
    def pause_response(self) -> None:
        if self.state in _LIVE:
            self.response_paused = True
            self.transport.pauseProducing()

    def resume_response(self) -> None:
        if self.state in _LIVE:
            self.response_paused = False
            self.transport.resumeProducing()

    def loseConnection(self) -> None:
        if self.state in _LIVE:
            self.state = CLOSING
            self.transport.loseConnection()


class _Dialer(ClientFactory):
    """Builds one connection and fires ``ready`` with it once it is connected."""

    noisy = False

    def __init__(self, pool: UpstreamPool, ready: Deferred[UpstreamConnection]) -> None:
        self.pool = pool
        self.ready = ready

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        connection = UpstreamConnection(self.pool)
        connection.ready = self.ready
        return connection

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(reason)


@plain_stream
class UpstreamTransport(tcp.Connection):
    """An established TCP connection to the app, dialled by :class:`_SocketDial`."""

    def __init__(self, sock: socket.socket, protocol: UpstreamConnection, reactor: Any, peer: Any) -> None:
        super().__init__(sock, protocol, reactor)
        self._peer = peer
        self.connected = True

    def getPeer(self) -> Any:
        return self._peer

    def getHost(self) -> Any:
        host, port = self.socket.getsockname()[:2]
        return type(self._peer)("TCP", host, port)

    def logPrefix(self) -> str:
        return "UpstreamConnection"


_UNDER_WAY = frozenset({errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK, errno.EINTR})


def _connect_failure(code: int) -> Failure:
    """What connectTCP reports for a failed connect() with this errno (refused, no route, ...)."""
    return Failure(error.getConnectError((code, os.strerror(code))))


class _SocketDial:
    """One non-blocking connect() on a bare socket, as the reactor sees it until it is done.

    It does what the reactor's connectTCP does for an address that needs no
    resolving, with less machinery: no connector, no timer heap entry (the
    deadline is on the timer wheel).  The outcomes are the same, and come as
    they do there, on a later turn of the reactor: an
    :class:`UpstreamConnection` on a TCP transport, or a Failure from
    ``error.getConnectError`` (refused, unreachable) or ``error.TimeoutError``.
    """

    def __init__(self, pool: UpstreamPool, ready: Deferred[UpstreamConnection]) -> None:
        self.pool = pool
        self.ready = ready
        self.reactor = pool.reactor
        self.sock: socket.socket | None = None
        self.address: tuple[Any, ...] = ()
        self._fd = -1
        self._deadline: Deadline | None = None

    def start(self, family: int, address: tuple[Any, ...]) -> None:
        self.address = address
        try:
            sock = self.sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            self._fd = sock.fileno()
            code = sock.connect_ex(address)
        except OSError as e:  # no socket to be had (EMFILE), or an address refused outright
            code = e.errno or errno.EINVAL
        if code in _UNDER_WAY:
            self._deadline = Deadline(self.reactor)
            self._deadline.set(self.pool.connect_timeout, self._timed_out)
            self.reactor.addWriter(self)
        elif code in (0, errno.EISCONN):
            self.reactor.callLater(0, self._connected)  # as connectTCP: never within pool.connect()
        else:
            self.reactor.callLater(0, self._fail, _connect_failure(code))

    def _attempt(self) -> None:
        """connect() again: done, still under way (a spurious wake-up), or failed."""
        assert self.sock is not None
        try:
            code = self.sock.connect_ex(self.address)
        except OSError as e:
            code = e.errno or errno.EINVAL
        if code in (0, errno.EISCONN):
            self._connected()
        elif code not in _UNDER_WAY:
            self._fail(_connect_failure(code))

    # -- what the reactor calls -------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "UpstreamDial"

    def doWrite(self) -> None:
        """Writable: the connect() may be done; asking again tells (a wake-up can be spurious)."""
        if self.sock is not None:
            self._attempt()

    doRead = doWrite

    def connectionLost(self, reason: Failure) -> None:
        """The reactor saw an error or a hang-up on the socket, or is shutting down."""
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if self.sock is not None else 0
        self._fail(_connect_failure(code) if code else reason)

    # -- outcomes ----------------------------------------------------------------

    def _connected(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return  # timed out or failed meanwhile
        self.reactor.removeWriter(self)
        if self._deadline is not None:
            self._deadline.clear()
        host, port = self.address[:2]
        peer = (IPv6Address if sock.family == socket.AF_INET6 else IPv4Address)("TCP", host, port)
        connection = UpstreamConnection(self.pool)
        connection.ready = self.ready
        transport = UpstreamTransport(sock, connection, self.reactor, peer)
        transport.startReading()
        connection.makeConnection(transport)

    def _timed_out(self) -> None:
        self._fail(Failure(error.TimeoutError()))

    def _fail(self, reason: Failure) -> None:
        self.reactor.removeWriter(self)
        if self._deadline is not None:
            self._deadline.clear()
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        if not self.ready.called:
            self.ready.errback(reason)


class UpstreamPool:
    """Idle keep-alive connections to one upstream, newest first."""

    log = Logger()

    def __init__(self, reactor: Any, upstream: Upstream, connect_timeout: float, max_idle: int = 64) -> None:
        self.reactor = reactor
        self.upstream = upstream
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: list[UpstreamConnection] = []
        self.closed = False  # a reload replaced this pool's configuration
        # An IP address on a real reactor is dialled on a bare socket (see _SocketDial); a
        # host name (resolved by the reactor), a unix socket or a fake reactor goes through
        # the reactor's connectTCP/connectUNIX.
        self._family: int | None = None
        self._address: tuple[Any, ...] = ()
        if isinstance(reactor, PosixReactorBase) and not upstream.is_unix:
            family = socket.AF_INET if isIPAddress(upstream.host) else None
            if family is None and isIPv6Address(upstream.host):
                family = socket.AF_INET6
            if family is not None:
                # Numeric only (no lookup): the whole sockaddr, so an IPv6 scope (fe80::1%eth0) is kept.
                flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
                found = socket.getaddrinfo(upstream.host, upstream.port, family, socket.SOCK_STREAM, 0, flags)
                self._family, self._address = family, found[0][4]

    def describe(self) -> str:
        return self.upstream.url

    def acquire(self, fresh: bool = False) -> UpstreamConnection | Deferred[UpstreamConnection]:
        """An idle connection now, or a Deferred for a new one."""
        while self._idle and not fresh:
            conn = self._idle.pop()
            if conn.state is IDLE:
                conn.reused = True
                if conn.response_paused:
                    conn.resume_response()
                return conn
        return self.connect()

    def connect(self) -> Deferred[UpstreamConnection]:
        ready: Deferred[UpstreamConnection] = Deferred()
        upstream = self.upstream
        if self._family is not None:
            _SocketDial(self, ready).start(self._family, self._address)
            return ready
        factory = _Dialer(self, ready)
        if upstream.is_unix:
            self.reactor.connectUNIX(upstream.unix_path, factory, timeout=self.connect_timeout)
        else:
            self.reactor.connectTCP(upstream.host, upstream.port, factory, timeout=self.connect_timeout)
        return ready

    def release(self, conn: UpstreamConnection) -> None:
        if self.closed or len(self._idle) >= self.max_idle:
            # A closed pool belongs to an old configuration: its connections
            # end with the requests they were serving, or none would ever end.
            conn.loseConnection()
            return
        conn.set_request_producer(None)
        self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        """Close the idle connections now, and each busy one when its request is done."""
        self.closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.loseConnection()


def describe_connect_failure(failure: Failure, upstream: Upstream) -> UpstreamError:
    """502 for refused or unreachable, 504 when dialling timed out."""
    if failure.check(error.TimeoutError):
        return UpstreamError(504, f"connecting to {upstream.url} timed out", before_response=True)
    return UpstreamError(502, f"cannot connect to {upstream.url}: {failure.getErrorMessage()}", before_response=True)

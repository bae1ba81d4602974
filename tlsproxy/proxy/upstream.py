"""Connections to the app: a keep-alive pool over TCP or a unix socket.

Each :class:`UpstreamConnection` carries one request at a time and reports the
response to its current :class:`ResponseSink`.  A connection goes back to the
pool only when both messages ended cleanly and the app did not ask to close.
"""

from __future__ import annotations

from typing import Any
from typing import Protocol as TypingProtocol

import httptools
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tlsproxy.config import Upstream
from tlsproxy.http.exchange import Headers
from tlsproxy.tls.transport import send_now


class UpstreamError(Exception):
    """The app could not be reached or broke off; ``status`` is 502 or 504."""

    def __init__(self, status: int, detail: str, *, before_response: bool, reused: bool = False) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.before_response = before_response
        self.reused = reused


class _Unsolicited(Exception):
    """The app sent a response after the one that was asked for."""


class ResponseSink(TypingProtocol):
    def response_head(self, status: int, reason: bytes, headers: Headers, content_length: int | None) -> None: ...

    def response_data(self, data: bytes) -> None: ...

    def response_end(self) -> None: ...

    def response_failed(self, error: UpstreamError) -> None: ...

    def response_upgraded(self, connection: UpstreamConnection, rest: bytes) -> None: ...

    def client_transport(self) -> Any: ...


@implementer(IPushProducer)
class UpstreamConnection(Protocol):
    """One HTTP/1.1 connection to the app."""

    log = Logger()
    transport: Any

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.sink: ResponseSink | None = None
        self.reused = False
        self.connected = False
        self._parser: Any = None
        self._status = 0
        self._headers: Headers = []
        self._got_bytes = False
        self._head_only = False
        self._headers_sent = False
        self._until_close = False
        self.request_complete = False
        self._keep_alive = False
        self._done = True
        self._tunnel: Any = None
        self._corkable: Any = None
        self._request_producer: IPushProducer | None = None

    # -- Protocol --------------------------------------------------------------

    ready: Deferred[UpstreamConnection] | None = None

    def connectionMade(self) -> None:
        self.connected = True
        self.transport.registerProducer(self, True)
        ready, self.ready = self.ready, None
        if ready is not None and not ready.called:
            ready.callback(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False
        self.pool.forget(self)
        if self._tunnel is not None:
            tunnel, self._tunnel = self._tunnel, None
            tunnel.finish()
            return
        sink, self.sink = self.sink, None
        if sink is not None and not self._done:
            if self._got_bytes:
                detail = "the app closed the connection in the middle of its response"
            else:
                detail = "the app closed the connection without answering"
            if self._headers_sent and self._until_close:
                # A response with neither Content-Length nor chunked coding
                # ends when the app closes: that close is its end.
                self._done = True
                sink.response_end()
                return
            sink.response_failed(UpstreamError(502, detail, before_response=not self._got_bytes, reused=self.reused))

    def dataReceived(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.write(data)
            return
        if self.sink is None:
            # Bytes nobody asked for: this connection is no longer trustworthy.
            self.transport.abortConnection()
            return
        self._got_bytes = True
        # Everything this read produces for the client leaves in one write.
        client = self._corkable
        if client is None:
            self._feed(data)
            return
        client.cork()
        try:
            self._feed(data)
        finally:
            client.uncork()

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0]
            sink, self.sink = self.sink, None
            self._done = True
            if sink is not None:
                self._tunnel = sink
                sink.response_upgraded(self, data[offset:])
        except httptools.HttpParserError as e:
            cause = e.__context__
            if cause is not None and not isinstance(cause, (httptools.HttpParserError, _Unsolicited)):
                self.log.failure("relaying the response failed", Failure(cause))
            sink, self.sink = self.sink, None
            self._done = True
            self.transport.abortConnection()
            if sink is not None:
                sink.response_failed(
                    UpstreamError(
                        502, f"the app sent a malformed response ({e})", before_response=not self._headers_sent
                    )
                )

    # -- requests --------------------------------------------------------------

    def send(self, head: bytes, sink: ResponseSink, head_only: bool) -> None:
        """Write a request head; the body (if any) follows through ``write``."""
        self.sink = sink
        client = sink.client_transport()
        self._corkable = client if hasattr(client, "cork") else None
        if self._parser is None:
            # One parser serves every response on the connection, except that
            # the answer to a HEAD ends after its head: a new one follows it.
            self._parser = httptools.HttpResponseParser(self)
        self._status = 0
        self._headers = []
        self._headers_sent = False
        self._until_close = False
        self._got_bytes = False
        self._head_only = head_only
        self._done = False
        self.request_complete = False
        send_now(self.transport, head)

    def write(self, data: bytes) -> None:
        send_now(self.transport, data)

    def set_request_producer(self, producer: IPushProducer | None) -> None:
        """Who to pause when the app reads the request body slower than it comes."""
        self._request_producer = producer

    # httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self._reason = reason

    _reason = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self._done:
            # More after the answer, in the same read: nobody asked for it.
            raise _Unsolicited()
        parser = self._parser
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # Interim responses (100 Continue, 103) are not passed on.
            self._headers = []
            return
        self._status = status
        self._keep_alive = parser.should_keep_alive()
        content_length = None
        chunked = False
        for name, value in self._headers:
            if name == b"content-length":
                content_length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
                content_length = None
        self._until_close = (
            content_length is None and not chunked and not self._head_only and status not in (101, 204, 304)
        )
        if self.sink is not None:
            self._headers_sent = True
            self.sink.response_head(status, self._reason, self._headers, content_length)
        if self._head_only and status != 101:
            self._complete()

    def on_body(self, body: bytes) -> None:
        if self.sink is not None and not self._head_only:
            self.sink.response_data(body)

    def on_message_complete(self) -> None:
        # A 101 ends the HTTP part; the parser then raises HttpParserUpgrade.
        if self._status and self._status != 101 and not self._done:
            self._complete()

    def _complete(self) -> None:
        self._done = True
        sink, self.sink = self.sink, None
        if self._head_only:
            self._parser = None
        # Back to the pool only if both messages ended: a request body the
        # app answered early (a 401 to an upload) is still half on the wire.
        keep = self._keep_alive and self.request_complete
        if sink is not None:
            sink.response_end()
        if keep and self.connected and self.sink is None:
            self.pool.release(self)
        elif self.connected:
            self.transport.loseConnection()

    def close(self) -> None:
        self._done = True
        self.sink = None
        if self.connected:
            self.transport.abortConnection()

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
    response_paused = False

    def pause_response(self) -> None:
        if self.connected:
            self.response_paused = True
            self.transport.pauseProducing()

    def resume_response(self) -> None:
        if self.connected:
            self.response_paused = False
            self.transport.resumeProducing()

    def loseConnection(self) -> None:
        if self.connected:
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


class UpstreamPool:
    """Idle keep-alive connections to one upstream, newest first."""

    log = Logger()

    def __init__(self, reactor: Any, upstream: Upstream, connect_timeout: float, max_idle: int = 64) -> None:
        self.reactor = reactor
        self.upstream = upstream
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: list[UpstreamConnection] = []

    def describe(self) -> str:
        return self.upstream.url

    def acquire(self, fresh: bool = False) -> UpstreamConnection | Deferred[UpstreamConnection]:
        """An idle connection now, or a Deferred for a new one."""
        while self._idle and not fresh:
            conn = self._idle.pop()
            if conn.connected:
                conn.reused = True
                if conn.response_paused:
                    conn.resume_response()
                return conn
        return self.connect()

    def connect(self) -> Deferred[UpstreamConnection]:
        ready: Deferred[UpstreamConnection] = Deferred()
        factory = _Dialer(self, ready)
        if self.upstream.is_unix:
            self.reactor.connectUNIX(self.upstream.unix_path, factory, timeout=self.connect_timeout)
        else:
            self.reactor.connectTCP(self.upstream.host, self.upstream.port, factory, timeout=self.connect_timeout)
        return ready

    def release(self, conn: UpstreamConnection) -> None:
        if len(self._idle) >= self.max_idle:
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
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.loseConnection()


def describe_connect_failure(failure: Failure, upstream: Upstream) -> UpstreamError:
    """502 for refused or unreachable, 504 when dialling timed out."""
    if failure.check(error.TimeoutError):
        return UpstreamError(504, f"connecting to {upstream.url} timed out", before_response=True)
    return UpstreamError(502, f"cannot connect to {upstream.url}: {failure.getErrorMessage()}", before_response=True)

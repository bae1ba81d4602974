"""TLS on each accepted connection, and the transport of the HTTP protocol above it.

:class:`TLSServerProtocol` takes the place of Twisted's ``TLSMemoryBIOProtocol``
on the HTTPS listener.  It does the same job (OpenSSL through pyOpenSSL,
with memory BIOs, between the TCP transport and the protocol above) with the
shape a proxy wants:

- One object per connection from accept to close.  The protocol above is
  picked when the handshake ends, by ALPN (``factory.app.protocol_for``), so
  there is no stand-in protocol to swap out.
- Writes go out at once: the encrypted bytes are sent on the socket when
  nothing is queued before them (Twisted's TCP transport would wait for the
  next reactor turn), and the HTTP layer can "cork" the transport while it
  relays one read of the app's answer, so head and body leave as one record.
- Plain attributes: Twisted's ``ProtocolWrapper`` forwards unknown attributes
  to the TCP transport through ``__getattr__``, which keeps CPython from
  caching any attribute read on the object.
- OpenSSL is called through pyOpenSSL's own cffi binding with one shared
  buffer, and "would block" is told by ``SSL_get_error`` rather than by
  pyOpenSSL raising ``WantReadError``; every other outcome goes through
  pyOpenSSL, so its errors (and those of our SNI and ALPN callbacks) are
  reported as usual.
- Closing sends close_notify and closes, without waiting for the peer's
  (nginx does the same); a peer's close_notify is answered and closes.

Renegotiation is refused by the TLS policy (and does not exist in TLS 1.3),
so an ``SSL_write`` never needs a read first: any failure to write is fatal.
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import RECEIVED_SHUTDOWN as SSL_RECEIVED_SHUTDOWN
from OpenSSL.SSL import SENT_SHUTDOWN as SSL_SENT_SHUTDOWN
from OpenSSL.SSL import Error
from twisted.internet.interfaces import IPushProducer, ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tlsproxy.certs.model import ServedNames
from tlsproxy.compat.openssl import connection_handles, raise_ssl_error
from tlsproxy.compat.openssl import ffi as _ffi
from tlsproxy.compat.openssl import lib as _lib
from tlsproxy.deadline import Deadline
from tlsproxy.eventloop import send_now
from tlsproxy.tls.hello import ClientHello, PlainHTTP, sniff
from tlsproxy.tls.policy import served_names

# One scratch buffer for every connection: all TLS I/O runs on the reactor
# thread, and each read is copied out before the next one starts.
_SCRATCH_SIZE = 1 << 17
_scratch = _ffi.new("char[]", _SCRATCH_SIZE)
_RECORD = 1 << 14  # the most plaintext one TLS record carries

# The OpenSSL calls of the hot paths, looked up once (an attribute of cffi's
# lib object is found afresh on every use).
_BIO_write = _lib.BIO_write
_BIO_read = _lib.BIO_read
_BIO_pending = _lib.BIO_get_mem_data  # with NULL: how many bytes the memory BIO holds
_SSL_read = _lib.SSL_read
_SSL_write = _lib.SSL_write
_SSL_pending = _lib.SSL_pending
_SSL_get_error = _lib.SSL_get_error
_SSL_do_handshake = _lib.SSL_do_handshake
_SSL_shutdown = _lib.SSL_shutdown
_WANT_READ = _lib.SSL_ERROR_WANT_READ
_ZERO_RETURN = _lib.SSL_ERROR_ZERO_RETURN
_NULL = _ffi.NULL
_unpack = _ffi.unpack  # char array -> bytes, in one call


_PLAIN_HTTP_BODY = (
    b'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>400 Bad Request</title></head>\n'
    b"<body><h1>400 Bad Request</h1>\n<p>The plain HTTP request was sent to the HTTPS port. "
    b"Use an https:// address.</p></body></html>\n"
)
PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html; charset=utf-8\r\nCache-Control: no-store\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY)
)


class TLSError(Exception):
    """The TLS layer failed (a bad record, an alert); the connection is cut."""


@implementer(ITransport, IPushProducer)
class TLSServerProtocol(Protocol):
    """The server side of TLS on one connection (see the module docstring)."""

    log = Logger()
    transport: Any  # the TCP transport below

    # State every connection starts with.
    wrapped: Any = None  # the protocol above, once the handshake picked it
    handshake_done = False
    disconnecting = False
    aborted = False
    lost = False
    connected = False
    _corked: list[bytes] | None = None
    _timer: Deadline | None = None  # the handshake's
    _tls: Any = None  # the SSL.Connection, made once the ClientHello is read
    _first: bytes = b""  # bytes read before that
    client_hello: ClientHello | None = None  # for the connection creator
    handed_off = False  # passed to the worker that made its session ticket
    # What the certificate this connection was served covers (None: not
    # known, no 421 check); a request for any other host gets 421.
    served_names: ServedNames | None = None

    def __init__(self, factory: TLSServerFactory) -> None:
        self.factory = factory

    # -- the TCP side ----------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        # Nagle's algorithm would hold a second small record (an HTTP/2 DATA
        # frame after its HEADERS) until the client ACKs the first, which a
        # client waiting for the rest delays by 40 ms: every answer on a
        # one-stream HTTP/2 connection took 40 ms.  nginx sets it too.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        factory = self.factory
        self._timer = Deadline(factory.clock)
        self._timer.set(factory.handshake_timeout, self._handshake_timed_out)
        factory.app.connection_made(self)

    def _start_tls(self, hello: ClientHello | None) -> None:
        """The ClientHello is read (or unreadable): make the TLS connection; the hello may pick its context."""
        self.client_hello = hello
        tls = self._tls = self.factory.creator.serverConnectionForTLS(self)
        tls.set_accept_state()
        self._ssl, self._into, self._from = connection_handles(tls)

    def _sniff(self, data: bytes) -> bytes | None:
        """Read ahead until the ClientHello is whole; then set TLS up and give back every byte read so far."""
        data = self._first + data
        seen = sniff(data)
        if seen is None:
            self._first = data
            return None
        self._first = b""
        if isinstance(seen, PlainHTTP):
            self.log.debug("plain HTTP from {peer} on the HTTPS port", peer=self.transport.getPeer())
            if self._timer is not None:
                self._timer.clear()
                self._timer = None
            self.disconnecting = True
            self.transport.write(PLAIN_HTTP_ANSWER)
            self.transport.loseConnection()
            return None
        hello = seen if isinstance(seen, ClientHello) else None
        handoff = self.factory.handoff
        if handoff is not None and hello is not None and hello.tickets and handoff(self, hello, data):
            # Another worker process made its ticket and serves it now (tlsproxy/tls/handoff.py).
            self.handed_off = self.disconnecting = True
            if self._timer is not None:
                self._timer.clear()
                self._timer = None
            return None
        self._start_tls(hello)
        return data

    def dataReceived(self, data: bytes) -> None:
        if self.aborted:
            return  # bytes read in the same poll as the abort
        if self._tls is None:
            if self.disconnecting:
                return  # after the plain HTTP answer
            first = self._sniff(data)
            if first is None:
                return
            data = first
        if _BIO_write(self._into, data, len(data)) <= 0:
            self._tls.bio_write(data)  # raises the appropriate error
        if self.handshake_done or self._handshake():
            self._read()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.handshake_done and not self.disconnecting:
            # The client went without close_notify.  OpenSSL would drop the
            # session from its cache when it frees a connection it never
            # shut down; since TLS 1.1 that is no reason not to resume it
            # (RFC 5246 7.2.1), and clients that just close are common.
            self._tls.set_shutdown(SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN)
        self.lost = True
        self.connected = False
        self._corked = None
        if self._timer is not None:
            self._timer.clear()
            self._timer = None
        wrapped = self.wrapped
        if wrapped is not None:
            # The protocol above refers to us as its transport: letting go of
            # it leaves no cycle, so the connection is freed by reference
            # counting rather than the garbage collector.
            self.wrapped = None
            wrapped.connectionLost(reason)
        self.factory.app.connection_lost(self)

    # -- handshake -------------------------------------------------------------

    def _handshake(self) -> bool:
        """Go on with the handshake; True once it is done and the protocol above is in place."""
        ssl = self._ssl
        result = _SSL_do_handshake(ssl)
        if result <= 0:
            if _SSL_get_error(ssl, result) == _WANT_READ:
                self._flush()
                return False
            self._tls_failed(result, "handshake", graceful=True)
            return False
        self.handshake_done = True
        # The context the SNI callback settled on; for a resumed TLS 1.2
        # session that is the site of the session's own server name.
        self.served_names = served_names(self._tls.get_context())
        if self._timer is not None:
            self._timer.clear()
            self._timer = None
        self._flush()  # our last flight and the session tickets
        wrapped = self.factory.app.protocol_for(self)
        if wrapped is None:
            self.loseConnection()
            return False
        self.wrapped = wrapped
        wrapped.makeConnection(self)
        self.factory.app.handshake_done(self, wrapped)
        return not self.lost and not self.aborted and not self.disconnecting

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self.log.debug("TLS handshake from {peer} timed out", peer=self.transport.getPeer())
        self.abortConnection()

    @property
    def negotiatedProtocol(self) -> bytes | None:
        """The ALPN protocol chosen in the handshake, or None."""
        return self._tls.get_alpn_proto_negotiated() or None

    # -- reading and writing records -------------------------------------------

    def _read(self) -> None:
        ssl = self._ssl
        into = self._into
        got = 0
        while True:
            # SSL_read gives one record (16 KiB at most) per call: the records
            # of one socket read are gathered and handed up together, so an
            # upload costs the protocol above one call per read, not per record.
            result = _SSL_read(ssl, _scratch + got if got else _scratch, _SCRATCH_SIZE - got)
            if result > 0:
                got += result
                # Another record (or the rest of this one) to read?  Asking
                # is cheaper than a read that finds nothing.
                more = _SSL_pending(ssl) or _BIO_pending(into, _NULL)
                if more and got <= _SCRATCH_SIZE - _RECORD:
                    continue
                self.wrapped.dataReceived(_unpack(_scratch, got))
                got = 0
                if self.lost or self.aborted:
                    return
                if not more:
                    break
                continue
            error = _SSL_get_error(ssl, result)  # before the protocol above makes calls of its own
            if got:
                self.wrapped.dataReceived(_unpack(_scratch, got))
                got = 0
                if self.lost or self.aborted:
                    return
            if error == _WANT_READ:
                break
            if error == _ZERO_RETURN:
                # The client's close_notify: answer it and close.
                self.loseConnection()
                return
            self._tls_failed(result, "read")
            return
        if _BIO_pending(self._from, _NULL) > 0:
            self._flush()  # reading produced records (a key update, an alert)

    def _flush(self) -> None:
        """Send what OpenSSL has written into the outgoing memory BIO."""
        bio = self._from
        pending = _BIO_pending(bio, _NULL)
        if pending <= 0:
            return
        buffer = _scratch if pending <= _SCRATCH_SIZE else _ffi.new("char[]", pending)
        got = _BIO_read(bio, buffer, pending)
        if got > 0:
            send_now(self.transport, _unpack(buffer, got))

    def _write(self, data: bytes) -> None:
        ssl = self._ssl
        total = len(data)
        written = _SSL_write(ssl, data, total)
        if written != total and not self._write_rest(data, written):
            return
        self._flush()

    def _write_rest(self, data: bytes, written: int) -> bool:
        """After an SSL_write that took less than all (one record's worth): the rest; False on failure."""
        ssl = self._ssl
        total = len(data)
        sent = 0
        with _ffi.from_buffer(data) as buffer:
            result = written
            while result > 0:
                sent += result
                if sent >= total:
                    return True
                result = _SSL_write(ssl, buffer + sent, total - sent)
        self._tls_failed(result, "write")
        return False

    def _tls_failed(self, result: int, doing: str, graceful: bool = False) -> None:
        """OpenSSL reported a failure: send any alert it wrote, then close (or cut) the connection.

        A failed handshake is closed gracefully, so the client reads the
        alert (a protocol version, no shared cipher) before the close.
        """
        try:
            raise_ssl_error(self._tls, result)  # pyOpenSSL's account of it
            reason: Failure = Failure(TLSError(f"TLS {doing} failed"))
        except Error:
            reason = Failure()
        self.log.debug(
            "TLS {doing} with {peer} failed: {error}", doing=doing, peer=self.transport.getPeer(), error=reason.value
        )
        self._flush()
        if graceful:
            self.disconnecting = True
            self.transport.loseConnection()
        else:
            self.abortConnection()

    # -- ITransport, for the protocol above -----------------------------------

    def write(self, data: bytes) -> None:
        corked = self._corked
        if corked is not None:
            corked.append(data)
        elif self.handshake_done and not self.disconnecting and not self.aborted:
            self._write(data)

    def writeSequence(self, iovec: Any) -> None:
        self.write(b"".join(iovec))

    def cork(self) -> None:
        """Hold writes until :meth:`uncork`, then send them as one."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        corked = self._corked
        if corked is None:
            return
        self._corked = None
        if corked:
            self.write(corked[0] if len(corked) == 1 else b"".join(corked))

    def loseConnection(self) -> None:
        """Send what is held, then close_notify, then close (without waiting for the client's)."""
        if self.disconnecting or self.lost:
            return
        self.uncork()
        self.disconnecting = True
        if self.handshake_done and not self.aborted:
            _SSL_shutdown(self._ssl)
            self._flush()
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.aborted = True
        self._corked = None
        if not self.lost:
            self.transport.abortConnection()

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        # The TCP transport pauses the producer itself when its buffer fills.
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    # -- IPushProducer: the protocol above pauses reading from the client ------

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    # -- shutting down --------------------------------------------------------

    def drain(self) -> None:
        """The server is stopping: a connection still handshaking is cut, others finish."""
        if self.wrapped is not None:
            self.wrapped.drain()
        else:
            self.abortConnection()


class TLSServerFactory(Factory):
    """Builds a :class:`TLSServerProtocol` for each accepted connection.

    ``creator`` makes each connection's ``SSL.Connection`` (SNI and ALPN live
    in its contexts); ``app`` picks the protocol above once the handshake is
    done and keeps count of the connections (see
    :class:`tlsproxy.http.negotiate.NegotiatingFactory`).  A connection not
    through its handshake ``handshake_timeout`` seconds after accept is cut:
    a plain number, which a reload may replace, so TLS reads no HTTP limits.
    """

    noisy = False
    # With worker processes: passes on a connection whose ticket another worker made.
    handoff: Any = None

    def __init__(self, creator: Any, app: Any, clock: Any, *, handshake_timeout: float) -> None:
        self.creator = creator
        self.app = app
        self.clock = clock
        self.handshake_timeout = handshake_timeout

    def buildProtocol(self, addr: Any) -> TLSServerProtocol:
        return TLSServerProtocol(self)

"""A leaner TLS transport for the proxy's hot path.

Twisted's default TLS transport queues every write for the next reactor
iteration (to merge small writes), and its TCP transport never sends at once:
each response then costs a timer, two epoll changes and an extra loop turn.
Here the HTTP layer "corks" the transport while it relays one chunk of the
app's answer, so head and body leave as one TLS record, and the encrypted
bytes go straight to the socket when nothing is queued before them.
"""

from __future__ import annotations

from typing import Any

from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

# One scratch buffer for every connection: all TLS I/O runs on the reactor
# thread, and each read is copied out before the next one starts.
_SCRATCH_SIZE = 1 << 17
_scratch = _ffi.new("char[]", _SCRATCH_SIZE)

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
_WANT_READ = _lib.SSL_ERROR_WANT_READ
_NULL = _ffi.NULL
_unpack = _ffi.unpack  # char array -> bytes, in one call


def send_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to a TCP or unix transport, on the socket at once if idle.

    Falls back to the transport's own buffering whenever anything is queued,
    the socket is full, or the transport is not a plain socket transport.
    """
    sock = getattr(transport, "socket", None)
    if (
        sock is not None
        and not transport.dataBuffer
        and not getattr(transport, "_tempDataBuffer", True)
        and transport.connected
        and not transport.disconnecting
    ):
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # let the transport's own write path see and report it
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


class LeanTLSProtocol(TLSMemoryBIOProtocol):
    """TLS transport with cork/uncork and direct sends."""

    _corked: list[bytes] | None = None

    def makeConnection(self, transport: Any) -> None:
        # As TLSMemoryBIOProtocol.makeConnection, but the transport's
        # interfaces are declared in one call rather than one per interface
        # (zope's directlyProvides was a measurable part of each handshake).
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            ProtocolWrapper.makeConnection(self, transport)
        self._checkHandshakeStatus()

    def cork(self) -> None:
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        corked = self._corked
        if corked is None:
            return
        self._corked = None
        if corked and not (self.disconnecting and self._producer is None):
            self._write(corked[0] if len(corked) == 1 else b"".join(corked))

    def write(self, data: bytes) -> None:
        corked = self._corked
        if corked is not None:
            corked.append(data)
        elif not (self.disconnecting and self._producer is None):
            self._write(data)

    def writeSequence(self, iovec: Any) -> None:
        self.write(b"".join(iovec))

    def loseConnection(self) -> None:
        self.uncork()
        super().loseConnection()

    def abortConnection(self) -> None:
        self._corked = None  # nothing more is to be sent
        super().abortConnection()

    # The hot calls below go to OpenSSL through pyOpenSSL's own cffi binding
    # with one shared buffer, and fall back on pyOpenSSL to raise its usual
    # exceptions whenever OpenSSL reports anything but success.  Attribute
    # reads on this class are slow (Twisted's ProtocolWrapper defines
    # __getattr__, which keeps CPython from caching them), so the hot paths
    # read each one once.

    def dataReceived(self, data: bytes) -> None:
        if not self._handshakeDone or self._appSendBuffer or self._lostTLSConnection:
            super().dataReceived(data)  # the handshake, or writes waiting on a read
            return
        connection = self._tlsConnection
        if _BIO_write(connection._into_ssl, data, len(data)) <= 0:
            connection.bio_write(data)  # raises the appropriate error
        self._flushReceiveBIO()

    def _checkHandshakeStatus(self) -> None:
        # As TLSMemoryBIOProtocol's, but a handshake that waits for the peer
        # (twice per connection) is told by SSL_get_error, not an exception.
        if self._aborted:
            return
        connection = self._tlsConnection
        ssl = connection._ssl
        result = _SSL_do_handshake(ssl)
        if result <= 0:
            if _SSL_get_error(ssl, result) == _WANT_READ:
                self._flushSendBIO()
                return
            try:
                connection._raise_ssl_error(ssl, result)  # raises, with pyOpenSSL's checks of its callbacks
            except WantReadError:
                self._flushSendBIO()
            except Error:
                self._tlsShutdownFinished(Failure())
            return
        self._handshakeDone = True
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        connection = self._tlsConnection
        ssl = connection._ssl
        total = len(data)
        written = _SSL_write(ssl, data, total)
        if written != total and not self._write_rest(connection, ssl, data, written):
            return
        # The records go out now (as _flushSendBIO would send them).
        bio = connection._from_ssl
        pending = _BIO_pending(bio, _NULL)
        if pending > 0:
            buffer = _scratch if pending <= _SCRATCH_SIZE else _ffi.new("char[]", pending)
            got = _BIO_read(bio, buffer, pending)
            if got > 0:
                send_now(self.transport, _unpack(buffer, got))

    def _write_rest(self, connection: Any, ssl: Any, data: bytes, written: int) -> bool:
        """After an SSL_write that took less than all: write the rest; False if the connection failed.

        pyOpenSSL turns on partial writes, so each SSL_write may take one
        record's worth; an error may also be a renegotiation that needs a read.
        """
        total = len(data)
        sent = 0
        with _ffi.from_buffer(data) as buffer:
            result = written
            while True:
                if result <= 0:
                    try:
                        connection._raise_ssl_error(ssl, result)
                    except WantReadError:
                        self._bufferedWrite(data[sent:])
                        return True
                    except Error:
                        self._tlsShutdownFinished(Failure())
                        return False
                else:
                    sent += result
                if sent >= total:
                    return True
                result = _SSL_write(ssl, buffer + sent, total - sent)

    def _flushSendBIO(self) -> None:
        # Ask the memory BIO how much it holds instead of catching WantReadError.
        bio = self._tlsConnection._from_ssl
        pending = _BIO_pending(bio, _NULL)
        if pending <= 0:
            return
        buffer = _scratch if pending <= _SCRATCH_SIZE else _ffi.new("char[]", pending)
        got = _BIO_read(bio, buffer, pending)
        if got > 0:
            send_now(self.transport, _unpack(buffer, got))

    def _flushReceiveBIO(self) -> None:
        connection = self._tlsConnection
        ssl = connection._ssl
        into = connection._into_ssl
        while not self._lostTLSConnection:
            result = _SSL_read(ssl, _scratch, 1 << 15)
            if result > 0:
                if not self._aborted:
                    self.wrappedProtocol.dataReceived(_unpack(_scratch, result))
                # Another record (or the rest of this one) to read?  Asking
                # is cheaper than the WantReadError a blind read would raise.
                if self._lostTLSConnection or (not _SSL_pending(ssl) and not _BIO_pending(into, _NULL)):
                    break
                continue
            if _SSL_get_error(ssl, result) == _WANT_READ:
                break  # the commonest case, without pyOpenSSL raising (and us catching) WantReadError
            try:
                connection._raise_ssl_error(ssl, result)
            except WantReadError:
                break
            except ZeroReturnError:
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                break  # not reached: OpenSSL reports every failed read
        # Reading may have produced records to send (alerts, session tickets).
        if _BIO_pending(connection._from_ssl, _NULL) > 0:
            self._flushSendBIO()


class LeanTLSFactory(TLSMemoryBIOFactory):
    protocol = LeanTLSProtocol
    noisy = False

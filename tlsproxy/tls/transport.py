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

from OpenSSL.SSL import WantReadError
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol


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

    def cork(self) -> None:
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        corked, self._corked = self._corked, None
        if corked:
            self.write(b"".join(corked))

    def write(self, data: bytes) -> None:
        if self._corked is not None:
            self._corked.append(data)
            return
        if self.disconnecting and self._producer is None:
            return
        self._write(data)

    def writeSequence(self, iovec: Any) -> None:
        self.write(b"".join(iovec))

    def loseConnection(self) -> None:
        self.uncork()
        super().loseConnection()

    def _flushSendBIO(self) -> None:
        try:
            data = self._tlsConnection.bio_read(2**17)
        except WantReadError:
            return
        send_now(self.transport, data)


class LeanTLSFactory(TLSMemoryBIOFactory):
    protocol = LeanTLSProtocol
    noisy = False

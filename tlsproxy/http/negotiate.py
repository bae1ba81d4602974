"""After the TLS handshake, hand the connection to HTTP/2 or HTTP/1.1 by ALPN.

An ``acme-tls/1`` handshake (TLS-ALPN-01 validation) carries no HTTP: it is
closed as soon as the handshake is done, as RFC 8737 asks.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from tlsproxy.http.exchange import Handler
from tlsproxy.http.server import HTTP11ServerProtocol, Limits
from tlsproxy.tls.policy import ACME_TLS_ALPN


@implementer(IHandshakeListener)
class ProtocolChooser(Protocol):
    """Stands in until the handshake ends, then puts the real protocol in place."""

    def __init__(self, factory: NegotiatingFactory) -> None:
        self.factory = factory
        self._timer: Any = None

    def connectionMade(self) -> None:
        self._timer = self.factory.clock.callLater(self.factory.limits.handshake_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tls = self.transport
        negotiated = tls.negotiatedProtocol
        if negotiated == ACME_TLS_ALPN:
            tls.loseConnection()
            return
        if negotiated == b"h2":
            from tlsproxy.http.h2 import H2ServerProtocol

            real: Protocol = H2ServerProtocol(self.factory.handler, self.factory.clock, self.factory.limits)
        else:
            real = HTTP11ServerProtocol(self.factory.handler, self.factory.clock, self.factory.limits, secure=True)
        real.factory = self.factory
        tls.wrappedProtocol = real
        real.makeConnection(tls)
        real.handshakeCompleted()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any = None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class NegotiatingFactory(Factory):
    """The application-side factory of the HTTPS listener."""

    noisy = False

    def __init__(self, handler: Handler, clock: IReactorTime, limits: Limits) -> None:
        self.handler = handler
        self.clock = clock
        self.limits = limits

    def buildProtocol(self, addr: Any) -> ProtocolChooser:
        return ProtocolChooser(self)

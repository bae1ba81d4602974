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
from tlsproxy.http.h2 import H2ServerProtocol
from tlsproxy.http.server import HTTP11ServerProtocol, Limits
from tlsproxy.http.tracker import ConnectionTracker
from tlsproxy.tls.policy import ACME_TLS_ALPN


@implementer(IHandshakeListener)
class ProtocolChooser(Protocol):
    """Stands in until the handshake ends, then puts the real protocol in place."""

    transport: Any  # the TLS transport

    def __init__(self, factory: NegotiatingFactory) -> None:
        self.factory = factory
        self._timer: Any = None
        self._handshake_done = False

    def connectionMade(self) -> None:
        self._timer = self.factory.clock.callLater(self.factory.limits.handshake_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self.transport.abortConnection()

    def drain(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        self._handshake_done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        factory = self.factory
        if factory.metrics is not None:
            factory.metrics.handshakes.inc()
        tls = self.transport
        negotiated = tls.negotiatedProtocol
        if negotiated == ACME_TLS_ALPN:
            tls.loseConnection()
            return
        real: H2ServerProtocol | HTTP11ServerProtocol
        if negotiated == b"h2":
            real = H2ServerProtocol(factory.handler, factory.clock, factory.limits)
        else:
            real = HTTP11ServerProtocol(factory.handler, factory.clock, factory.limits, secure=True)
            real.handshake_done = True
        real.factory = factory
        real.tracker = factory.tracker
        factory.tracker.replace(self, real)
        tls.wrappedProtocol = real
        real.makeConnection(tls)
        real.handshakeCompleted()
        if factory.tracker.draining:
            real.drain()

    def connectionLost(self, reason: Any = None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._handshake_done and self.factory.metrics is not None:
            self.factory.metrics.handshake_failures.inc()
        self.factory.tracker.remove(self)


class NegotiatingFactory(Factory):
    """The application-side factory of the HTTPS listener.

    ``handler`` and ``limits`` may be replaced (configuration reload): new
    connections get the new ones, open connections keep theirs.
    """

    noisy = False

    def __init__(
        self,
        handler: Handler,
        clock: IReactorTime,
        limits: Limits,
        tracker: ConnectionTracker | None = None,
        metrics: Any = None,
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.limits = limits
        self.tracker = tracker if tracker is not None else ConnectionTracker()
        self.metrics = metrics

    def buildProtocol(self, addr: Any) -> ProtocolChooser:
        chooser = ProtocolChooser(self)
        self.tracker.add(chooser)
        return chooser

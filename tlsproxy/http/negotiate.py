"""After the TLS handshake, hand the connection to HTTP/2 or HTTP/1.1 by ALPN.

An ``acme-tls/1`` handshake (TLS-ALPN-01 validation) carries no HTTP: it is
closed as soon as the handshake is done, as RFC 8737 asks.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol

from tlsproxy.http.exchange import Handler
from tlsproxy.http.h2 import H2ServerProtocol
from tlsproxy.http.server import HTTP11ServerProtocol, Limits
from tlsproxy.http.tracker import ConnectionTracker
from tlsproxy.tls.policy import ACME_TLS_ALPN


class NegotiatingFactory:
    """The HTTP side of the HTTPS listener, as :class:`tlsproxy.tls.transport.TLSServerFactory` sees it.

    ``handler`` and ``limits`` may be replaced (configuration reload): new
    connections get the new ones, open connections keep theirs.  Every TLS
    connection is counted in ``tracker`` from accept to close, so shutdown
    can drain them (one still handshaking is cut).
    """

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
        self._accepted: dict[Any, float] = {}  # TLS connections still handshaking: when they connected

    def connection_made(self, tls: Any) -> None:
        self.tracker.add(tls)
        self._accepted[tls] = self.clock.seconds()  # the first request's deadline counts from here

    def protocol_for(self, tls: Any) -> Protocol | None:
        """The protocol for a connection whose handshake just ended (None: close it)."""
        started = self._accepted.pop(tls, None)
        negotiated = tls.negotiatedProtocol
        if negotiated == ACME_TLS_ALPN:
            return None
        if negotiated == b"h2":
            return H2ServerProtocol(self.handler, self.clock, self.limits)
        protocol = HTTP11ServerProtocol(self.handler, self.clock, self.limits, secure=True)
        protocol.started = started
        return protocol

    def handshake_done(self, tls: Any, protocol: Any) -> None:
        """``protocol`` is connected on top of ``tls``."""
        if self.metrics is not None:
            self.metrics.handshakes.inc()
        protocol.handshakeCompleted()
        if self.tracker.draining:
            protocol.drain()

    def connection_lost(self, tls: Any) -> None:
        self._accepted.pop(tls, None)
        if not tls.handshake_done and not getattr(tls, "handed_off", False) and self.metrics is not None:
            self.metrics.handshake_failures.inc()
        self.tracker.remove(tls)

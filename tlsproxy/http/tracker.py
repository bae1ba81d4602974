"""The client connections a listener has open, so shutdown can drain them."""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime


class Drainable(Protocol):
    transport: Any

    def drain(self) -> None:
        """Finish what is in flight, take nothing new, then close."""


class ConnectionTracker:
    """Open connections of one kind of listener; counts them in a gauge if given."""

    def __init__(self, gauge: Any = None) -> None:
        self.protocols: set[Drainable] = set()
        self.gauge = gauge
        self.draining = False
        self._waiting: list[Deferred[None]] = []

    def add(self, protocol: Drainable) -> None:
        self.protocols.add(protocol)
        if self.gauge is not None:
            self.gauge.inc()
        if self.draining:
            protocol.drain()

    def remove(self, protocol: Drainable) -> None:
        if protocol in self.protocols:
            self.protocols.discard(protocol)
            if self.gauge is not None:
                self.gauge.dec()
        if self.draining and not self.protocols:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def drain(self, clock: IReactorTime, grace: float) -> Deferred[None]:
        """Ask every connection to finish; after ``grace`` seconds, cut the rest."""
        self.draining = True
        for protocol in list(self.protocols):
            protocol.drain()
        if not self.protocols:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._waiting.append(done)

        def cut() -> None:
            for protocol in list(self.protocols):
                protocol.transport.abortConnection()

        timer = clock.callLater(grace, cut)

        def stop_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        done.addBoth(stop_timer)
        return done

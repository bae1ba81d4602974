"""What our listening sockets do beyond Twisted's defaults.

Twisted listens with a backlog of 50: a burst of new connections (a
restart under load, a page opening many) overflows it and clients see
SYN retries of a second or more.  nginx and the kernel's own default ask
for 511; so do we, unless the endpoint string names a backlog.

Out of file descriptors (EMFILE), Twisted accepts each waiting connection
on a reserved descriptor, closes it and logs a line for it: under a
connection flood that is thousands of lines a second.  The refusals are
counted in a metric instead and logged at most once per interval.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from zope.interface import implementer

from tlsproxy.compat.twisted import CANNOT_ACCEPT, EMFILE_NOISE, EMFILE_REFUSED, observe_port_log

BACKLOG = 511
# Endpoint types whose parser takes a backlog argument.
_WITH_BACKLOG = ("tcp", "tcp6", "ssl", "unix")

# The accept-time events of twisted.internet.tcp (see its _accept).
_REFUSED = EMFILE_REFUSED
_EMFILE_NOISE = EMFILE_NOISE
_CANNOT_ACCEPT = CANNOT_ACCEPT

log = Logger(namespace="tlsproxy.listen")


def with_backlog(description: str, backlog: int = BACKLOG) -> str:
    """``description`` with a listen backlog of ``backlog``, unless it names one."""
    kind, sep, rest = description.partition(":")
    if kind == "haproxy" and sep:
        return "haproxy:" + with_backlog(rest, backlog)
    if kind not in _WITH_BACKLOG or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


@implementer(ILogObserver)
class RefusalLog:
    """Counts connections refused at accept time; logs them at most once per ``interval``."""

    def __init__(
        self, clock: IReactorTime, label: str, refused: Any = None, interval: float = 10.0, forward: Any = None
    ) -> None:
        self.clock = clock
        self.label = label
        self.refused = refused  # a metrics counter, or None
        self.interval = interval
        self.forward = forward if forward is not None else globalLogPublisher
        self._unlogged = 0
        self._errors: set[str] = set()
        self._last: float | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        form = event.get("log_format")
        if form == _REFUSED:
            self._unlogged += 1
            if self.refused is not None:
                self.refused.inc()
        elif form == _CANNOT_ACCEPT:
            self._errors.add(str(event.get("acceptError")))
        elif form not in _EMFILE_NOISE:
            self.forward(event)
            return
        now = self.clock.seconds()
        if not (self._unlogged or self._errors) or (self._last is not None and now - self._last < self.interval):
            return
        self._last = now
        if self._unlogged:
            log.warn(
                "{label}: out of file descriptors, refused {count} connection(s) (logged at most every {interval:g} s)",
                label=self.label,
                count=self._unlogged,
                interval=self.interval,
            )
            self._unlogged = 0
        if self._errors:
            log.warn(
                "{label}: could not accept connections ({errors})",
                label=self.label,
                errors=", ".join(sorted(self._errors)),
            )
            self._errors.clear()


def watch_refusals(port: Any, clock: IReactorTime, label: str, refused: Any = None) -> None:
    """Route ``port``'s accept-time log events through a :class:`RefusalLog`.

    A port of another kind (not TCP or UNIX) is left as it is.
    """
    observe_port_log(port, RefusalLog(clock, label, refused))

"""A leaner event dispatch for Twisted's epoll reactor.

The epoll reactor wraps every I/O event in ``log.callWithLogger`` so that
legacy ``log.msg`` calls made while handling it carry the selectable's log
prefix.  tlsproxy logs through twisted.logger with explicit fields and never
relies on that prefix, and the wrapping (four calls and a context-stack
change per event, two events per proxied request) was about a tenth of the
CPU per request.  :func:`streamline` swaps in a poll that dispatches events
directly; an error raised while handling an event is caught, logged, and
the other events of that poll are still handled, as before.
"""

from __future__ import annotations

import errno
import types
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

_log = Logger()


def _poll(self: EPollReactor, timeout: float | None) -> None:
    if timeout is None:
        timeout = -1
    try:
        events = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = self._selectables
    dispatch = self._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is not None:
            try:
                dispatch(selectable, fd, event)
            except Exception:
                # What callWithLogger did: log, and go on with the other events.
                _log.failure("error handling an event on {selectable}", selectable=selectable)


def streamline(reactor: Any) -> bool:
    """Use the direct dispatch on an epoll reactor; other reactors are left alone."""
    if not isinstance(reactor, EPollReactor):
        return False
    reactor.doIteration = reactor.doPoll = types.MethodType(_poll, reactor)  # type: ignore[method-assign]
    return True

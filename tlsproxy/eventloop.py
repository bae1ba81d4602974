"""A leaner event dispatch for Twisted's epoll reactor.

The epoll reactor wraps every I/O event in ``log.callWithLogger`` so that
legacy ``log.msg`` calls made while handling it carry the selectable's log
prefix.  tlsproxy logs through twisted.logger with explicit fields and never
relies on that prefix, and the wrapping (four calls and a context-stack
change per event, two events per proxied request) was about a tenth of the
CPU per request.  :func:`streamline` swaps in a poll that dispatches events
directly; an error raised while handling an event is caught, logged, and
the other events of that poll are still handled, as before.

The commonest event of all, "a TCP socket has bytes to read", is handled in
the loop itself: one ``recv`` and the protocol's ``dataReceived``, as
``tcp.Connection.doRead`` would do, without the three calls around it.
Everything else (writes, hang-ups, listening sockets, unix sockets with
their descriptor passing) goes through the reactor's own dispatch.
"""

from __future__ import annotations

import errno
import gc
from collections.abc import Callable
from select import EPOLLIN
from typing import Any

from twisted.internet import main, tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger
from twisted.python.failure import Failure

from tlsproxy.compat.twisted import nothing_buffered, reactor_poll_state

_log = Logger()

# Exactly these classes read with a plain recv (subclasses may not, unless declared).
_PLAIN_STREAMS = {tcp.Server, tcp.Client}


def plain_stream(cls: type) -> type:
    """Class decorator: this tcp.Connection subclass reads as tcp.Connection does (a plain recv)."""
    if not issubclass(cls, tcp.Connection) or "doRead" in vars(cls) or "_dataReceived" in vars(cls):
        raise TypeError(f"{cls.__name__} does not read as tcp.Connection does")
    _PLAIN_STREAMS.add(cls)
    return cls


def send_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to a TCP or unix transport, on the socket at once if idle.

    Twisted's transport would queue it for the next turn of the loop. Falls
    back to the transport's own buffering whenever anything is queued, the
    socket is full, or the transport is not a plain socket transport.
    """
    sock = getattr(transport, "socket", None)
    if sock is not None and transport.connected and not transport.disconnecting and nothing_buffered(transport):
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


# Actions queued by at_batch_end, run once the events of one poll are handled.
_batch_end: list[Callable[[], None]] = []
_in_batch = False


def at_batch_end(action: Callable[[], None]) -> bool:
    """Run ``action`` once the events of the current poll are all handled; False outside a poll.

    So that a protocol writing once per event (an HTTP/2 connection, for each
    app connection that answered in this poll) can write once per poll.
    Outside the streamlined poll (timers, other reactors, tests) nothing is
    queued, and the caller does the work at once.
    """
    if not _in_batch:
        return False
    _batch_end.append(action)
    return True


def as_one_batch(handle: Callable[..., None], *args: Any) -> None:
    """``handle(*args)`` as one batch of events: what it queues with at_batch_end runs after it."""
    global _in_batch
    _in_batch = True
    try:
        handle(*args)
    finally:
        _in_batch = False
        if _batch_end:
            _run_batch_end()


def _run_batch_end() -> None:
    while _batch_end:
        actions = _batch_end[:]
        _batch_end.clear()
        for action in actions:
            try:
                action()
            except Exception:
                _log.failure("error at the end of a batch of events")


def _direct_poll(reactor: EPollReactor) -> Any:
    """The reactor's poll step, dispatching each event directly (see the module docstring)."""
    poller, selectables, dispatch, disconnect = reactor_poll_state(reactor)

    def poll(timeout: float | None) -> None:
        if timeout is None:
            timeout = -1
        try:
            events = poller.poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        as_one_batch(handle, events)

    def handle(events: list[tuple[int, int]]) -> None:
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event == EPOLLIN and type(selectable) in _PLAIN_STREAMS:
                try:
                    data = selectable.socket.recv(selectable.bufferSize)
                except BlockingIOError:
                    continue
                except OSError:
                    disconnect(selectable, main.CONNECTION_LOST, True)
                    continue
                if not data:
                    disconnect(selectable, main.CONNECTION_DONE, True)
                    continue
                try:
                    selectable.protocol.dataReceived(data)
                except Exception as e:
                    # As the reactor does: log it, and drop that connection.
                    _log.failure("error handling data on {selectable}", Failure(), selectable=selectable)
                    disconnect(selectable, e, True)
                continue
            try:
                dispatch(selectable, fd, event)
            except Exception:
                # What callWithLogger did: log, and go on with the other events.
                _log.failure("error handling an event on {selectable}", selectable=selectable)

    return poll


# CPython runs its cycle collector on the youngest generation every 700 new container
# objects. A burst of new TLS connections keeps a thousand connections' objects alive
# at once, so each of those collections walks them all, and their survivors soon fill
# the older generations, whose collections walk the whole heap. Measured in
# bench/ (1,000 handshakes at once): the collector took about 50 us per connection at
# the default, 11 us at 20,000; the longest pause went from 29-51 ms (full collections)
# to 5-11 ms; keep-alive throughput and memory did not move. A closed connection leaves
# no reference cycles (unit-tested), so little waits for the collector in between.
COLLECTOR_THRESHOLDS = (20_000, 20, 20)


def tune_collector() -> None:
    """Run the cycle collector less often (the proxy makes few reference cycles)."""
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


def streamline(reactor: Any) -> bool:
    """Use the direct dispatch on an epoll reactor; other reactors are left alone."""
    if not isinstance(reactor, EPollReactor):
        return False
    reactor.doIteration = reactor.doPoll = _direct_poll(reactor)  # type: ignore[method-assign]
    return True

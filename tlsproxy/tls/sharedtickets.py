"""Session ticket keys that every process serving the same sites shares, through the store.

A TLS 1.3 session made on one instance of a fleet (or one worker of a
machine) resumes on another only if both encrypt tickets under the same key.
:class:`SharedTicketKeys` reads the keys from the store (Redis for a fleet, the
state directory for one machine's workers) in a thread, has the fleet rotate
them when the current key is ``every`` seconds old (one rotation for all,
under the store's ``tickets`` lock; see :mod:`tlsproxy.certs.ticketkeys`), and
hands every new set to ``install`` on the reactor thread: the current key for
new tickets, the previous one still accepted.

``install`` is whatever makes OpenSSL use given keys; this module only keeps
the keys equal across processes.  While the store cannot be reached the keys
in use stay, and the news is said once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from tlsproxy.certs.store import Store, StoreError
from tlsproxy.certs.ticketkeys import TicketKeys, current_ticket_keys

RunInThread = Callable[..., "Deferred[Any]"]


class SharedTicketKeys(Service):
    """Keep ``install``-ed ticket keys equal to the store's, rotated fleet-wide every ``every`` seconds."""

    log = Logger()

    def __init__(
        self,
        clock: Any,
        store: Store,
        every: float,
        install: Callable[[TicketKeys], None],
        run_in_thread: RunInThread,
        check_interval: float | None = None,
    ) -> None:
        self.clock = clock
        self.store = store
        self.every = every
        self.install = install
        self._run = run_in_thread
        # Often enough that a rotation elsewhere is picked up long before the previous key is dropped.
        self.check_interval = check_interval or max(1.0, min(every / 8, 60.0))
        self.keys: TicketKeys | None = None
        self.problem: str | None = None
        self._busy = False
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.check_interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        if self._busy:
            return
        self._busy = True
        d = self._run(current_ticket_keys, self.store, self.clock.seconds(), self.every)
        d.addCallbacks(self._got, self._failed)
        d.addBoth(self._done)

    def _got(self, keys: TicketKeys) -> None:
        if self.problem is not None:
            self.log.info("session ticket keys: the store answers again")
            self.problem = None
        if keys != self.keys and self.running:
            self.keys = keys
            self.install(keys)

    def _failed(self, failure: Failure) -> None:
        if not failure.check(StoreError):
            self.log.failure("reading the session ticket keys failed", failure)
            return
        problem = str(failure.value)
        if problem != self.problem:
            self.log.warn("session ticket keys: {problem}; the keys in use stay", problem=problem)
        self.problem = problem

    def _done(self, _: Any) -> None:
        self._busy = False

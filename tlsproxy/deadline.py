"""Deadlines that move often and cost almost nothing to move.

Every connection has a deadline (handshake, request head, idle, the app's
answer) that moves several times per request.  Twisted's ``callLater`` for
each move would cost a heap push (and, on CPython, one Python-level
``DelayedCall.__lt__`` per step of the heap), and ``DelayedCall.reset`` to an
earlier time is a linear search of every pending call.

So deadlines live on a :class:`Timeouts` wheel, one per clock: time is cut
into ticks of ``TICK`` seconds, a deadline sits in the bucket of the first
tick at or after it is due, and the wheel asks the reactor to wake it only
for its earliest bucket.  Moving a deadline later costs nothing (its bucket
comes up, sees it is not due, and files it again); moving it earlier files
it in an earlier bucket.  A deadline never fires early, and at most one tick
late.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

TICK = 0.25  # seconds: how late a deadline may fire


class Timeouts:
    """The wheel that :class:`Deadline` objects of one clock share."""

    log = Logger()
    _by_clock: weakref.WeakKeyDictionary[Any, Timeouts] = weakref.WeakKeyDictionary()

    def __init__(self, clock: IReactorTime, tick: float = TICK) -> None:
        self.clock = clock
        self.tick = tick
        # Each bucket is a dict used as an ordered set, so a stopped deadline
        # leaves its bucket at once rather than when its tick comes.
        self._buckets: dict[int, dict[Deadline, None]] = {}
        self._call: Any = None
        self._next: int | None = None  # the bucket the reactor will wake us for

    @classmethod
    def of(cls, clock: IReactorTime) -> Timeouts:
        wheel = cls._by_clock.get(clock)
        if wheel is None:
            wheel = cls._by_clock[clock] = cls(clock)
        return wheel

    def file(self, deadline: Deadline, when: float) -> None:
        """Put ``deadline`` in the bucket of the first tick at or after ``when``."""
        index = math.ceil(when / self.tick)
        if deadline._bucket is not None:
            self.drop(deadline)  # moved earlier: out of the later bucket
        deadline._bucket = index
        bucket = self._buckets.get(index)
        if bucket is None:
            self._buckets[index] = {deadline: None}
        else:
            bucket[deadline] = None
        if self._next is None or index < self._next:
            self._wake_at(index)

    def drop(self, deadline: Deadline) -> None:
        """Take ``deadline`` out of the bucket it is filed in."""
        index = deadline._bucket
        deadline._bucket = None
        bucket = self._buckets.get(index) if index is not None else None
        if bucket is not None:
            bucket.pop(deadline, None)
            if not bucket:
                del self._buckets[index]  # type: ignore[arg-type]

    def _wake_at(self, index: int) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._next = index
        self._call = self.clock.callLater(max(0.0, index * self.tick - self.clock.seconds()), self._run)

    def _run(self) -> None:
        self._call = None
        self._next = None
        now = self.clock.seconds()
        # Every bucket whose tick has come (a little slack for float rounding).
        last = math.floor(now / self.tick + 1e-6)
        for index in sorted(i for i in self._buckets if i <= last):
            for deadline in self._buckets.pop(index):
                if deadline._bucket == index:  # else it moved to an earlier bucket
                    deadline._bucket = None
                    try:
                        deadline._due(now)
                    except Exception:
                        # One connection's failing timeout must not cost the
                        # others of its tick theirs: they would never fire.
                        self.log.failure("a timeout action failed")
        # A deadline filed again above (it had moved later) may have set the
        # wake-up past a bucket that is due before it.
        if self._buckets:
            first = min(self._buckets)
            if self._next is None or first < self._next:
                self._wake_at(first)


class Deadline:
    """One pending action with a time that can move (see the module docstring)."""

    __slots__ = ("_action", "_bucket", "_clock", "_wheel", "_when")

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._wheel = Timeouts.of(clock)
        self._when: float | None = None
        self._action: Callable[[], Any] | None = None
        self._bucket: int | None = None  # where it is filed on the wheel

    def set(self, seconds: float, action: Callable[[], Any]) -> float:
        """Run ``action`` ``seconds`` from now, replacing any earlier setting; returns now."""
        now = self._clock.seconds()
        when = now + seconds
        self._when = when
        self._action = action
        bucket = self._bucket
        if bucket is None or when <= (bucket - 1) * self._wheel.tick:
            # Not filed, or due before the tick it is filed for: file it anew.
            self._wheel.file(self, when)
        return now

    def clear(self) -> None:
        """Nothing is due (its place on the wheel is dropped when that tick comes)."""
        self._when = None
        self._action = None

    def stop(self) -> None:
        """The owner is going away: as clear, and its place on the wheel is given back now.

        A connection or stream that ends before its deadline would otherwise
        keep a place on the wheel until that tick (an idle timeout away).
        """
        self.clear()
        if self._bucket is not None:
            self._wheel.drop(self)

    @property
    def pending(self) -> bool:
        return self._when is not None

    def _due(self, now: float) -> None:
        when = self._when
        if when is None:
            return
        if when > now + 1e-9:
            self._wheel.file(self, when)  # it moved later: wait for the rest
            return
        action = self._action
        self._when = self._action = None
        if action is not None:
            action()

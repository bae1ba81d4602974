"""A deadline that moves often but schedules rarely.

Per-request timeouts would cost a reactor timer to create and cancel for
every request; a :class:`Deadline` keeps one pending call and only
reschedules when the deadline moves earlier.  When the call fires early (the
deadline moved later), it sleeps again for the rest.

Moving earlier cancels the pending call and schedules a new one rather than
calling ``DelayedCall.reset``: Twisted finds a call it moves earlier with a
linear search of every pending call (``list.index`` on its heap), which with
thousands of open connections cost more than the TLS handshake itself.  A
cancel is lazy and a new call is a heap push.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime


class Deadline:
    __slots__ = ("_action", "_call", "_clock", "_when")

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._when: float | None = None
        self._action: Callable[[], Any] | None = None
        self._call: Any = None

    def set(self, seconds: float, action: Callable[[], Any]) -> float:
        """Run ``action`` ``seconds`` from now, replacing any earlier setting; returns now."""
        now = self._clock.seconds()
        when = now + seconds
        self._when = when
        self._action = action
        call = self._call
        if call is None:
            self._call = self._clock.callLater(seconds, self._fire)
        elif call.time + call.delayed_time > when:  # call.getTime(), without the call
            call.cancel()
            self._call = self._clock.callLater(seconds, self._fire)
        return now

    def clear(self) -> None:
        """Nothing is due (the pending call, if any, will find nothing to do)."""
        self._when = None
        self._action = None

    def stop(self) -> None:
        """Clear and drop the pending call: the owner is going away."""
        self.clear()
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    @property
    def pending(self) -> bool:
        return self._when is not None

    def _fire(self) -> None:
        self._call = None
        when = self._when
        if when is None:
            return
        left = when - self._clock.seconds()
        if left > 0:
            self._call = self._clock.callLater(left, self._fire)
            return
        action = self._action
        self._when = self._action = None
        if action is not None:
            action()

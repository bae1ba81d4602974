"""Deadline: one pending call per owner, however often the deadline moves."""

from __future__ import annotations

from twisted.internet.task import Clock

from tlsproxy.http.deadline import Deadline


def active(clock: Clock) -> list[float]:
    return sorted(call.getTime() for call in clock.getDelayedCalls() if call.active())


def test_fires_once_at_the_deadline() -> None:
    """The action runs when its time comes, and only then."""
    clock, fired = Clock(), []
    deadline = Deadline(clock)
    deadline.set(5, lambda: fired.append(clock.seconds()))
    clock.advance(4.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [5]
    clock.advance(10)
    assert fired == [5]


def test_moving_later_keeps_the_one_call_and_sleeps_again() -> None:
    """A later deadline schedules nothing new: the pending call wakes, then waits the rest."""
    clock, fired = Clock(), []
    deadline = Deadline(clock)
    deadline.set(5, lambda: fired.append("first"))
    deadline.set(8, lambda: fired.append("second"))
    assert active(clock) == [5]
    clock.advance(5)
    assert fired == [] and active(clock) == [8]
    clock.advance(3)
    assert fired == ["second"]


def test_moving_earlier_replaces_the_call_instead_of_resetting_it() -> None:
    """An earlier deadline cancels the pending call and schedules a new one (reset to earlier is a linear search)."""
    clock, fired = Clock(), []
    deadline = Deadline(clock)
    deadline.set(60, lambda: fired.append("idle"))
    (old,) = clock.getDelayedCalls()
    deadline.set(6, lambda: fired.append("connect"))
    assert not old.active()
    assert active(clock) == [6]
    clock.advance(6)
    assert fired == ["connect"]


def test_clear_and_stop() -> None:
    """After clear nothing runs; stop also drops the pending call."""
    clock, fired = Clock(), []
    deadline = Deadline(clock)
    deadline.set(1, lambda: fired.append(1))
    deadline.clear()
    assert not deadline.pending
    clock.advance(2)
    assert fired == []
    deadline.set(1, lambda: fired.append(2))
    deadline.stop()
    assert active(clock) == []
    clock.advance(2)
    assert fired == []

"""Deadline and its wheel: never early, at most a tick late, one reactor call for many."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from tlsproxy.deadline import TICK, Deadline


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


def test_moving_later_asks_nothing_of_the_reactor() -> None:
    """A later deadline schedules nothing new: its tick comes, then it waits for the rest."""
    clock, fired = Clock(), []
    deadline = Deadline(clock)
    deadline.set(5, lambda: fired.append("first"))
    for seconds in (6, 7, 8):
        deadline.set(seconds, lambda: fired.append("second"))
    assert active(clock) == [5]
    clock.advance(5)
    assert fired == [] and active(clock) == [8]
    clock.advance(3)
    assert fired == ["second"]


def test_moving_earlier_wakes_earlier() -> None:
    """An earlier deadline makes the wheel wake for it, and the old time is dropped."""
    clock, fired = Clock(), []
    deadline = Deadline(clock)
    deadline.set(60, lambda: fired.append("idle"))
    deadline.set(6, lambda: fired.append("connect"))
    assert active(clock) == [6]
    clock.advance(6)
    assert fired == ["connect"]
    clock.advance(60)
    assert fired == ["connect"]


def test_many_deadlines_share_one_call() -> None:
    """A thousand deadlines cost the reactor one pending call."""
    clock, fired = Clock(), []
    deadlines = [Deadline(clock) for _ in range(1000)]
    for i, deadline in enumerate(deadlines):
        deadline.set(10 + (i % 7) * 0.01, lambda i=i: fired.append(i))
    assert len(active(clock)) == 1
    clock.advance(10.5)
    assert sorted(fired) == list(range(1000))


def test_clear_and_stop() -> None:
    """After clear or stop nothing runs."""
    clock, fired = Clock(), []
    deadline = Deadline(clock)
    deadline.set(1, lambda: fired.append(1))
    deadline.clear()
    assert not deadline.pending
    clock.advance(2)
    deadline.set(1, lambda: fired.append(2))
    deadline.stop()
    clock.advance(5)
    assert fired == []


@given(st.lists(st.tuples(st.floats(0, 3), st.floats(0.01, 20)), min_size=1, max_size=8))
def test_never_early_at_most_a_tick_late(moves: list[tuple[float, float]]) -> None:
    """However a deadline moves, it fires at or after its last setting, and within a tick of it."""
    clock, fired = Clock(), []
    deadline = Deadline(clock)
    due = 0.0
    for wait, seconds in moves:
        clock.advance(wait)
        if fired:
            break
        deadline.set(seconds, lambda: fired.append(clock.seconds()))
        due = clock.seconds() + seconds
    else:
        step = TICK / 16  # Clock runs what is due at the end of each advance
        while not fired and clock.seconds() <= due + 2 * TICK:  # a deadline that never fires fails, not hangs
            clock.advance(step)
        assert fired, f"due at {due}, still not fired at {clock.seconds()}"
        assert due - 1e-6 <= fired[0] <= due + TICK + step + 1e-6


def test_a_deadline_moved_later_does_not_hide_an_earlier_one() -> None:
    """When a tick refiles a deadline that moved later, another one due before it still fires on time."""
    clock, fired = Clock(), []
    moved, other = Deadline(clock), Deadline(clock)
    moved.set(5, lambda: fired.append("moved"))
    other.set(10, lambda: fired.append("other"))
    moved.set(20, lambda: fired.append("moved"))
    clock.advance(5)  # moved's old tick: it is filed again, for 20
    clock.advance(5 + TICK)
    assert fired == ["other"]
    clock.advance(10)
    assert fired == ["other", "moved"]


def test_a_failing_action_does_not_drop_the_others_of_its_tick() -> None:
    """An action that raises is logged; the other deadlines of its tick and later ones still fire."""
    clock, fired = Clock(), []
    failing, same_tick, later = Deadline(clock), Deadline(clock), Deadline(clock)

    def boom() -> None:
        raise RuntimeError("boom")

    failing.set(1, boom)
    same_tick.set(1, lambda: fired.append("same tick"))
    later.set(3, lambda: fired.append("later"))
    logged: list[dict] = []
    observer = logged.append
    globalLogPublisher.addObserver(observer)
    try:
        clock.advance(1)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert fired == ["same tick"]
    assert any(isinstance(event.get("log_failure"), Failure) for event in logged)
    clock.advance(2)
    assert fired == ["same tick", "later"]


def test_stopped_deadlines_leave_the_wheel_at_once() -> None:
    """Deadlines stopped before their time hold no place on the wheel (one per ended h2 stream adds up)."""
    clock = Clock()
    kept = Deadline(clock)
    kept.set(60, lambda: None)
    wheel = kept._wheel
    for _ in range(1000):
        deadline = Deadline(clock)
        deadline.set(60, lambda: None)
        deadline.stop()
    assert sum(len(bucket) for bucket in wheel._buckets.values()) == 1
    kept.stop()
    assert wheel._buckets == {}


def test_moving_earlier_leaves_the_later_bucket() -> None:
    """A deadline moved earlier is filed once, not also left behind in its later bucket."""
    clock, fired = Clock(), []
    deadline = Deadline(clock)
    deadline.set(60, lambda: fired.append("late"))
    deadline.set(5, lambda: fired.append("early"))
    assert sum(len(bucket) for bucket in deadline._wheel._buckets.values()) == 1
    clock.advance(60)
    assert fired == ["early"]

"""Explicit lifecycles: each state has a name, and one table says which moves are legal.

An app connection and a proxied request each keep their progress in one
attribute holding a member of an :class:`~enum.IntEnum`, in place of a dozen
booleans whose legal combinations lived only in the reader's head.  Next to
each enum a table lists, for every state, the states it may move to.

A keep-alive request makes about eight moves between its request and its
app connection.  An earlier attempt checked each one as it was made (a
Python call, a dict and a set lookup) and cost 7% more instructions per
request, for a check that can only ever find a bug in the proxy.  Here a
move is a plain assignment (``self.stage = DONE``), unchecked, and checking
is a mode: :func:`set_checking` puts a data descriptor on each registered class,
so that every assignment, wherever it is, is compared with the table, and an
illegal one raises :class:`IllegalMove`.  The test suite turns it on for its
own process and, through the ``TLSPROXY_CHECK_STATES=1`` environment
variable, for the proxies it starts; production pays nothing.

Unchecked, the class has no attribute of that name at all: the constructor
sets the initial state.  (An enum member as a class-level default would do,
but CPython 3.11 does not specialise reads and writes of an instance
attribute that shadows a class attribute of a mutable type, such as an
enum: that alone cost 1.5% of a request's instructions.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from enum import IntEnum
from typing import Any, TypeVar

T = TypeVar("T", bound=type)

# Moves are checked from the start in a process started with this set to 1.
ENV = "TLSPROXY_CHECK_STATES"


class IllegalMove(RuntimeError):
    """A state was asked to move where its table does not allow: a bug in the proxy."""

    def __init__(self, owner: str, old: IntEnum | None, new: Any) -> None:
        name = new.name if isinstance(new, IntEnum) else repr(new)
        super().__init__(f"{owner}: illegal move {old.name if old is not None else 'nothing'} -> {name}")
        self.owner = owner
        self.old = old
        self.new = new


class Lifecycle:
    """One class's state attribute, its initial state and its table of moves."""

    def __init__(self, owner: type, attr: str, initial: IntEnum, moves: Mapping[IntEnum, Iterable[IntEnum]]) -> None:
        self.owner = owner
        self.attr = attr
        self.initial = initial
        self.states = type(initial)
        self.moves = {old: frozenset(new) for old, new in moves.items()}
        self.record: list[tuple[IntEnum, IntEnum]] | None = None  # the tests' log of checked moves
        missing = [s.name for s in self.states if s not in self.moves]
        if missing:
            raise ValueError(f"{owner.__name__}.{attr}: no row for {', '.join(missing)}")

    def reachable(self) -> set[IntEnum]:
        """Every state some chain of legal moves leads to from the initial one."""
        seen = {self.initial}
        todo = [self.initial]
        while todo:
            for new in self.moves[todo.pop()]:
                if new not in seen:
                    seen.add(new)
                    todo.append(new)
        return seen

    def check(self, old: IntEnum, new: Any) -> None:
        if new not in self.moves[old] or type(new) is not self.states:
            raise IllegalMove(self.owner.__name__, old, new)

    def guard(self) -> None:
        setattr(self.owner, self.attr, _Guard(self))

    def unguard(self) -> None:
        if isinstance(self.owner.__dict__.get(self.attr), _Guard):
            delattr(self.owner, self.attr)


class _Guard:
    """The checked mode's state attribute: the value lives in the instance dict, every set is checked."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.name = lifecycle.attr

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        try:
            return instance.__dict__[self.name]
        except KeyError:
            raise AttributeError(self.name) from None

    def __set__(self, instance: Any, value: Any) -> None:
        lifecycle = self.lifecycle
        old = instance.__dict__.get(self.name)
        if old is None:  # the constructor's: only the initial state
            if value is not lifecycle.initial:
                raise IllegalMove(lifecycle.owner.__name__, None, value)
        else:
            lifecycle.check(old, value)
            if lifecycle.record is not None:
                lifecycle.record.append((old, value))
        instance.__dict__[self.name] = value


LIFECYCLES: list[Lifecycle] = []
_checking = os.environ.get(ENV) == "1"


def lifecycle(attr: str, initial: IntEnum, moves: Mapping[Any, Iterable[Any]]) -> Callable[[T], T]:
    """Class decorator: ``attr`` starts as ``initial`` (the constructor sets it) and moves only as ``moves`` says."""

    def register(cls: T) -> T:
        found = Lifecycle(cls, attr, initial, moves)
        LIFECYCLES.append(found)
        if _checking:
            found.guard()
        return cls

    return register


def set_checking(on: bool) -> None:
    """Check every move of every registered lifecycle from now on (or stop checking)."""
    global _checking
    _checking = on
    for found in LIFECYCLES:
        if on:
            found.guard()
        else:
            found.unguard()


def checking() -> bool:
    return _checking

"""Session ticket keys as stored values, and when a fleet (or a machine's workers) rotates them.

Every process that serves the same sites must encrypt tickets under the same
key, or a session made on one cannot resume on another.  So the keys live in
the store: the current key issues tickets, the previous one still opens the
tickets it issued, and whoever first finds the current key older than the
rotation interval replaces it, under the store's ``tickets`` lock, for all.

A key is 80 bytes, OpenSSL's ``SSL_CTX_set_tlsext_ticket_keys`` layout: a
16-byte name (the first bytes of every ticket it makes), a 32-byte HMAC
secret and a 32-byte AES secret.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

KEY_LENGTH = 80
NAME_LENGTH = 16


def new_ticket_key() -> bytes:
    """A fresh key from the OS's CSPRNG."""
    return os.urandom(KEY_LENGTH)


@dataclass(frozen=True)
class TicketKeys:
    """The key that issues tickets now, the one before it, and when the current one was made (epoch seconds)."""

    current: bytes
    created: float
    previous: bytes | None = None

    def __post_init__(self) -> None:
        for key in (self.current, self.previous):
            if key is not None and len(key) != KEY_LENGTH:
                raise ValueError(f"a ticket key has {KEY_LENGTH} bytes, not {len(key)}")

    @property
    def names(self) -> tuple[bytes, ...]:
        """The key names, current first: what a ticket starts with."""
        return tuple(k[:NAME_LENGTH] for k in (self.current, self.previous) if k is not None)

    def due(self, now: float, every: float) -> bool:
        """Whether the current key has issued tickets long enough (or comes from a clock ahead of ours)."""
        return now - self.created >= every or self.created - now > every

    def rotated(self, key: bytes, now: float) -> TicketKeys:
        return TicketKeys(current=key, created=now, previous=self.current)

    def to_json(self) -> str:
        def b64(key: bytes | None) -> str | None:
            return base64.b64encode(key).decode("ascii") if key is not None else None

        return json.dumps({"current": b64(self.current), "previous": b64(self.previous), "created": self.created})

    @classmethod
    def from_json(cls, text: str | bytes) -> TicketKeys | None:
        """The stored keys, or None for anything unreadable (a fresh key then replaces it)."""
        try:
            raw = json.loads(text)
            current = base64.b64decode(raw["current"], validate=True)
            previous = raw.get("previous")
            created = float(raw["created"])
            return cls(
                current=current,
                created=created,
                previous=base64.b64decode(previous, validate=True) if previous else None,
            )
        except (ValueError, TypeError, KeyError, binascii.Error):
            return None


class TicketKeyStore(Protocol):
    """The part of :class:`tlsproxy.certs.store.Store` that ticket keys need."""

    def locked(self, timeout: float = 600.0, *, name: str = "") -> AbstractContextManager[None]: ...
    def load_ticket_keys(self) -> TicketKeys | None: ...
    def save_ticket_keys(self, keys: TicketKeys) -> None: ...


def current_ticket_keys(
    store: TicketKeyStore, now: float, every: float, make_key: Callable[[], bytes] = new_ticket_key
) -> TicketKeys:
    """The fleet's ticket keys, rotated first if the current key is ``every`` seconds old (blocking).

    Read without the lock when no rotation is due, so every process can ask
    often; a rotation takes the lock and reads again, so that two processes
    finding the key old at once rotate once, not twice (which would drop the
    key that still opens the tickets out there).
    """
    keys = store.load_ticket_keys()
    if keys is not None and not keys.due(now, every):
        return keys
    with store.locked(timeout=30.0, name="tickets"):
        keys = store.load_ticket_keys()
        if keys is not None and not keys.due(now, every):
            return keys
        keys = TicketKeys(make_key(), now) if keys is None else keys.rotated(make_key(), now)
        store.save_ticket_keys(keys)
        return keys

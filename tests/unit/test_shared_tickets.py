"""SharedTicketKeys: processes on one store install the same ticket keys, rotated once for all."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from tlsproxy.certs.store import CertificateStore, StoreUnavailable
from tlsproxy.certs.ticketkeys import TicketKeys
from tlsproxy.tls.sharedtickets import SharedTicketKeys

EVERY = 3600.0


def process(clock: Clock, store: CertificateStore) -> tuple[SharedTicketKeys, list[TicketKeys]]:
    installed: list[TicketKeys] = []
    service = SharedTicketKeys(
        clock, store, EVERY, installed.append, lambda f, *a, **kw: maybeDeferred(f, *a, **kw), check_interval=60
    )
    return service, installed


def test_processes_share_and_rotate_keys(tmp_path: Path) -> None:
    """Two processes install the same keys; after the rotation interval both install the new key with the old kept."""
    clock = Clock()
    clock.advance(1_000_000)
    a, a_keys = process(clock, CertificateStore(tmp_path))
    b, b_keys = process(clock, CertificateStore(tmp_path))
    a.startService()
    b.startService()
    assert len(a_keys) == len(b_keys) == 1 and a_keys[0] == b_keys[0]
    clock.advance(60)
    assert len(a_keys) == 1, "installed again without a change"
    clock.pump([60.0] * int(EVERY / 60))
    assert len(a_keys) == len(b_keys) == 2 and a_keys[1] == b_keys[1]
    assert a_keys[1].previous == a_keys[0].current != a_keys[1].current
    a.stopService()
    b.stopService()
    assert clock.getDelayedCalls() == []


def test_unreachable_store_keeps_keys_in_use(tmp_path: Path) -> None:
    """While the store cannot be read, the installed keys stay and the service says why; then it resumes."""
    clock = Clock()
    store = CertificateStore(tmp_path)
    service, installed = process(clock, store)
    service.startService()
    real = store.load_ticket_keys

    def down() -> TicketKeys | None:
        raise StoreUnavailable("redis", "unreachable", "reading the session ticket keys")

    store.load_ticket_keys = down  # type: ignore[method-assign]
    clock.advance(EVERY + 60)
    assert len(installed) == 1 and service.problem is not None and "unreachable" in service.problem
    store.load_ticket_keys = real  # type: ignore[method-assign]
    clock.advance(60)
    assert service.problem is None and len(installed) == 2
    service.stopService()

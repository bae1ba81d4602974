"""Hand a connection to the worker process whose ticket key made its session ticket.

With several worker processes on one listening socket, a client that resumes
a session may land on any of them; the ticket it offers opens only in the
process that issued it, because OpenSSL's ticket keys cannot be set from
Python (see :mod:`tlsproxy.tls.tickets`): each process has its own, made by
OpenSSL, never seen by us.  So the keys stay where they are and the
connection moves instead: a worker that reads a ClientHello whose ticket
starts with the key name of another worker passes the socket (SCM_RIGHTS)
and the bytes it read to that worker, which goes on as if it had accepted it.
Key names are public (every ticket starts with one in the clear); the
supervisor tells each worker which names belong to whom.

A connection is moved at most once; if the owner cannot take it (its socket
buffer full, the worker gone), the worker that read it does a full handshake.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet.protocol import Factory
from twisted.internet.tcp import Connection
from twisted.logger import Logger

from tlsproxy.compat.twisted import close_without_shutdown
from tlsproxy.tls.hello import ClientHello
from tlsproxy.tls.tickets import KEY_NAME_LENGTH

# A ClientHello may be long (post-quantum key shares, many extensions): room for any.
MAX_HANDOFF = 256 * 1024

log = Logger(namespace="tlsproxy.handoff")


def owner_of(hello: ClientHello, owners: Mapping[bytes, int]) -> int | None:
    """The worker whose key made one of the hello's tickets, if known."""
    for ticket in hello.tickets:
        slot = owners.get(ticket[:KEY_NAME_LENGTH])
        if slot is not None:
            return slot
    return None


def movable_transport(transport: Any) -> bool:
    """Only a plain TCP connection moves: behind a PROXY protocol header (a wrapped transport)
    the client's address came in bytes the owner would never see."""
    return isinstance(transport, Connection)


class Handoff:
    """A worker's way to pass connections on (the TLS factory's ``handoff``)."""

    def __init__(self, slot: int, senders: Mapping[int, socket.socket], moved: Any = None, movable: Any = None) -> None:
        self.movable = movable or movable_transport
        self.slot = slot
        self.senders = dict(senders)
        self.owners: dict[bytes, int] = {}
        self.moved = moved  # a metrics counter, or None

    def update(self, names: Mapping[int, Iterable[bytes]]) -> None:
        """Which ticket key names each worker holds now (its own included)."""
        self.owners = {name: slot for slot, slot_names in names.items() for name in slot_names}

    def __call__(self, protocol: Any, hello: ClientHello, data: bytes) -> bool:
        """Pass the connection on if another worker made its ticket; True if it went."""
        if getattr(protocol, "handed_in", False):
            return False  # moved here once already: this worker answers
        slot = owner_of(hello, self.owners)
        sender = self.senders.get(slot) if slot is not None and slot != self.slot else None
        if sender is None:
            return False
        transport = protocol.transport
        if not self.movable(transport):
            return False
        try:
            socket.send_fds(sender, [data], [transport.fileno()])
        except OSError as e:  # the owner's queue is full, or it is being replaced
            log.debug("could not hand a connection to worker {slot}: {error}", slot=slot, error=e)
            return False
        if self.moved is not None:
            self.moved.inc()
        close_without_shutdown(transport)
        return True


class _Adopting(Factory):
    """Builds one protocol with the wrapped factory and remembers it."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.protocol: Any = None

    def buildProtocol(self, addr: Any) -> Any:
        self.protocol = self.factory.buildProtocol(addr)
        if self.protocol is not None:
            self.protocol.handed_in = True
        return self.protocol


class HandoffReceiver:
    """Reads connections other workers pass here and serves them with ``factory``.

    An ``IReadDescriptor`` on the worker's end of its handoff socket.
    """

    def __init__(self, reactor: Any, sock: socket.socket, factory: Any) -> None:
        self.reactor = reactor
        self.socket = sock
        self.factory = factory
        self.received = 0
        sock.setblocking(False)

    def start(self) -> None:
        self.reactor.addReader(self)

    def stop(self) -> None:
        self.reactor.removeReader(self)

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return "handoff"

    def connectionLost(self, reason: Any) -> None:
        pass

    def doRead(self) -> None:
        for _ in range(64):  # a burst, then let the others run
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.socket, MAX_HANDOFF, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warn("handoff socket: {error}", error=e)
                return
            for fd in fds[1:]:  # one connection a message: anything else is not ours
                os.close(fd)
            if fds:
                self.adopt(fds[0], data)

    def adopt(self, fd: int, data: bytes) -> None:
        """Serve the connection on ``fd`` as if accepted here, ``data`` being what was read of it."""
        try:
            probe = socket.socket(fileno=fd)
            family = probe.family
            probe.detach()
            adopting = _Adopting(self.factory)
            self.reactor.adoptStreamConnection(fd, family, adopting)
        except OSError as e:  # the client left in the meantime
            log.debug("could not take a handed-off connection: {error}", error=e)
            return
        finally:
            os.close(fd)  # the reactor holds its own duplicate
        self.received += 1
        if adopting.protocol is not None and data:
            adopting.protocol.dataReceived(data)

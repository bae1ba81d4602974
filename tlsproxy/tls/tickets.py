"""Session ticket keys that rotate, with the previous key still accepted.

A TLS 1.2 session ticket is encrypted under a key the server holds; while
that key lives, a recorded TLS 1.2 session can be decrypted by whoever steals
it, so it must not live long.  Neither pyOpenSSL nor cryptography's bindings
give Python a way to set ticket keys (no ``SSL_CTX_set_tlsext_ticket_key_evp_cb``,
no ``SSL_CTX_ctrl``; OpenSSL is linked into cryptography with its symbols
hidden, so the C accelerator cannot call it either).  So each key
generation is a *front context*: OpenSSL gives every new context random
ticket keys (from its own CSPRNG; they never leave its memory and are wiped
when the context is freed).  Rotating makes a new front; the one before it is
kept for tickets it issued, found by the key name that starts every OpenSSL
ticket, and the one before that is dropped, with its keys.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tlsproxy.tls.hello import ClientHello, sniff

KEY_NAME_LENGTH = 16  # OpenSSL tickets start with the 16-byte name of their key
DEFAULT_ROTATION = 12 * 3600.0


class KeyGeneration:
    """One front context and the name of its ticket key (None: not learnt)."""

    __slots__ = ("context", "key_name")

    def __init__(self, context: SSL.Context, key_name: bytes | None) -> None:
        self.context = context
        self.key_name = key_name


def pick_generation(generations: Sequence[KeyGeneration], tickets: Sequence[bytes]) -> KeyGeneration:
    """The generation whose key made one of ``tickets``; else the first (current) one."""
    for ticket in tickets:
        name = ticket[:KEY_NAME_LENGTH]
        for generation in generations:
            if generation.key_name is not None and generation.key_name == name:
                return generation
    return generations[0]


class TicketKeyRing:
    """The current front context and the previous one, by ticket key."""

    def __init__(self, make_front: Callable[[], SSL.Context], learn: Callable[[SSL.Context], bytes | None]) -> None:
        self._make_front = make_front
        self._learn = learn
        self.generations: list[KeyGeneration] = [self._new()]

    log = Logger()

    def _new(self) -> KeyGeneration:
        front = self._make_front()
        key_name = self._learn(front)
        if key_name is None:
            # Its tickets still work until the next rotation, not after it.
            self.log.warn("could not learn the name of a new session ticket key")
        return KeyGeneration(front, key_name)

    def rotate(self) -> None:
        """A new key for new tickets; the last one still opens its tickets; the one before is gone."""
        self.generations = [self._new(), self.generations[0]]

    def front_for(self, hello: ClientHello | None) -> SSL.Context:
        if hello is None or not hello.tickets or len(self.generations) == 1:
            return self.generations[0].context
        return pick_generation(self.generations, hello.tickets).context


@functools.cache
def _probe_server_context() -> SSL.Context:
    """A certificate of our own for the probe handshake (Ed25519: made in microseconds, once)."""
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ticket-probe.invalid")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, None)
    )
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate(cert)
    ctx.use_privatekey(key)
    return ctx


def _pump(client: SSL.Connection, server: SSL.Connection) -> None:
    for _ in range(8):
        moved = False
        for side in (client, server):
            try:
                side.do_handshake()
                side.recv(1 << 16)
            except SSL.WantReadError:
                pass
        for a, b in ((client, server), (server, client)):
            try:
                data = a.bio_read(1 << 17)
            except SSL.WantReadError:
                continue
            if data:
                b.bio_write(data)
                moved = True
        if not moved:
            return


def learn_key_name(front: SSL.Context) -> bytes | None:
    """The name of ``front``'s ticket key, read off a ticket it issues to a client of our own in memory."""
    try:
        client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        client_ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        first = SSL.Connection(client_ctx, None)
        first.set_connect_state()
        server = SSL.Connection(front, None)
        server.set_context(_probe_server_context())
        server.set_accept_state()
        _pump(first, server)
        session = first.get_session()
        if session is None:
            return None
        again = SSL.Connection(client_ctx, None)
        again.set_connect_state()
        again.set_session(session)
        try:
            again.do_handshake()
        except SSL.WantReadError:
            pass
        hello = sniff(again.bio_read(1 << 17))
    except SSL.Error:
        return None
    if isinstance(hello, ClientHello) and hello.tickets and len(hello.tickets[0]) > KEY_NAME_LENGTH:
        return hello.tickets[0][:KEY_NAME_LENGTH]
    return None


class TicketKeyRotation(Service):
    """Rotate a ring's ticket keys every ``interval`` seconds of ``clock``."""

    log = Logger()

    def __init__(self, clock: Any, rotate: Callable[[], None], interval: float = DEFAULT_ROTATION) -> None:
        self.rotate = rotate
        self.interval = interval
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def _tick(self) -> None:
        self.rotate()
        self.log.info("session ticket keys rotated: new tickets use a new key, the key before the last is gone")

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

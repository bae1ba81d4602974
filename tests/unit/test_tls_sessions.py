"""Session resumption through the TLS transport, in memory: per certificate, and across ticket key rotations."""

from __future__ import annotations

import gc
from types import SimpleNamespace
from typing import Any

import trustme
from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.tlsutil import certified, client_context
from tlsproxy.compat.openssl import lib as _lib
from tlsproxy.config import ConfigError, parse
from tlsproxy.http.negotiate import NegotiatingFactory
from tlsproxy.http.server import Limits
from tlsproxy.tls.policy import TLSPolicy
from tlsproxy.tls.sni import SniMap, SniServer
from tlsproxy.tls.tickets import KeyGeneration, TicketKeyRotation, pick_generation
from tlsproxy.tls.transport import PLAIN_HTTP_ANSWER, TLSServerFactory, TLSServerProtocol

TLS12 = SSL.TLS1_2_VERSION
TLS13 = SSL.TLS1_3_VERSION


def reused(client: SSL.Connection) -> bool:
    """Whether the handshake resumed a session (pyOpenSSL has no public call for it)."""
    return bool(_lib.SSL_session_reused(client._ssl))  # type: ignore[attr-defined]


class Sessions(SynchronousTestCase):
    def setUp(self) -> None:
        ca = trustme.CA()
        sni_map = SniMap([("a", ["a.test", "www.a.test"]), ("b", ["b.test"])])
        self.sni = SniServer(TLSPolicy(), sni_map)
        sni_map.set_context("a", self.sni.context_for(certified(ca, "a.test", "www.a.test")))
        self.b = certified(ca, "b.test")
        sni_map.set_context("b", self.sni.context_for(self.b))
        self.clock = Clock()
        app = NegotiatingFactory(SimpleNamespace(handle=lambda exchange: None), self.clock, Limits())  # type: ignore[arg-type]
        self.factory = TLSServerFactory(self.sni, app, self.clock, handshake_timeout=10)
        # One client context per version: a client offers a session only on the context that made it.
        self.clients = {v: client_context(max_version=v, min_version=v) for v in (TLS12, TLS13)}

    def connect(
        self, name: str, version: int, session: Any = None, chunk: int = 0
    ) -> tuple[SSL.Connection, TLSServerProtocol]:
        """A whole handshake (and the tickets after it); ``chunk``: hand the server that many bytes per read."""
        client = SSL.Connection(self.clients[version], None)
        client.set_connect_state()
        client.set_tlsext_host_name(name.encode())
        if session is not None:
            client.set_session(session)
        server = self.factory.buildProtocol(None)
        tcp = StringTransport()
        server.makeConnection(tcp)
        for _ in range(10):
            try:
                client.do_handshake()
                client.recv(1 << 16)
            except SSL.WantReadError:
                pass
            try:
                data = client.bio_read(1 << 17)
            except SSL.WantReadError:
                data = b""
            step = chunk or len(data) or 1
            for at in range(0, len(data), step):
                server.dataReceived(data[at : at + step])
            if tcp.value():
                client.bio_write(tcp.value())
                tcp.clear()
        self.assertTrue(server.handshake_done)
        # As after a clean close: OpenSSL marks the session of a connection freed without one not resumable.
        client.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        return client, server

    def session(self, name: str, version: int) -> Any:
        client, _ = self.connect(name, version)
        self.assertFalse(reused(client))
        return client.get_session()


class ResumptionTests(Sessions):
    def test_resumes_on_its_own_certificate(self) -> None:
        """A session resumes under its own name (TLS 1.2 and 1.3)."""
        for version in (TLS12, TLS13):
            session = self.session("a.test", version)
            self.assertTrue(reused(self.connect("a.test", version, session)[0]), version)

    def test_never_resumes_on_another_certificate(self) -> None:
        """A session of a.test offered under SNI b.test gets a full handshake with b.test's certificate."""
        for version in (TLS12, TLS13):
            session = self.session("a.test", version)
            client, server = self.connect("b.test", version, session)
            self.assertFalse(reused(client), version)
            self.assertEqual(client.get_peer_certificate().to_cryptography().serial_number, self.b.serial)  # type: ignore[union-attr]
            assert server.served_names is not None
            self.assertEqual(server.served_names.names, ("b.test",))

    def test_hello_in_small_reads(self) -> None:
        """A ClientHello that arrives a few bytes at a time still picks its site and resumes."""
        session = self.session("a.test", TLS13)
        client, server = self.connect("a.test", TLS13, session, chunk=7)
        self.assertTrue(reused(client))


class CloseWithoutNotifyTests(Sessions):
    def test_session_id_survives_a_bare_close(self) -> None:
        """A TLS 1.2 session id stays in the cache when the client closes without close_notify."""
        self.clients[TLS12].set_options(SSL.OP_NO_TICKET)  # session ids, not tickets
        client, server = self.connect("a.test", TLS12)
        session = client.get_session()
        server.connectionLost(Failure(ConnectionDone()))
        del server
        gc.collect()  # OpenSSL decides when it frees the connection
        self.assertTrue(reused(self.connect("a.test", TLS12, session)[0]))


class RotationTests(Sessions):
    def test_previous_key_still_accepted_not_the_one_before(self) -> None:
        """A ticket resumes after one rotation, not after two (TLS 1.2 and 1.3)."""
        rotation = TicketKeyRotation(self.clock, self.sni.rotate_ticket_keys, 3600)
        rotation.startService()
        self.addCleanup(rotation.stopService)
        for version in (TLS12, TLS13):
            with self.subTest(version=version):
                session = self.session("a.test", version)
                self.assertTrue(reused(self.connect("a.test", version, session)[0]))
                self.clock.advance(3600)
                self.assertTrue(reused(self.connect("a.test", version, session)[0]))
                self.clock.advance(3600)
                self.assertFalse(reused(self.connect("a.test", version, session)[0]))

    def test_every_generation_knows_its_key_name(self) -> None:
        """The key name of each front is learnt, and differs from the last one."""
        first = self.sni.tickets.generations[0]
        self.sni.rotate_ticket_keys()
        current, previous = self.sni.tickets.generations
        self.assertIs(previous, first)
        self.assertEqual(len(current.key_name or b""), 16)
        self.assertEqual(len(previous.key_name or b""), 16)
        self.assertNotEqual(current.key_name, previous.key_name)

    def test_rotation_service_stops(self) -> None:
        """The rotation runs every interval while started, and leaves no call behind when stopped."""
        rotated: list[float] = []
        rotation = TicketKeyRotation(self.clock, lambda: rotated.append(self.clock.seconds()), 60)
        rotation.startService()
        self.clock.advance(59)
        self.assertEqual(rotated, [])
        self.clock.advance(1)
        self.clock.advance(60)
        self.assertEqual(rotated, [60, 120])
        rotation.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PickGenerationTests(SynchronousTestCase):
    def test_by_key_name(self) -> None:
        """A ticket goes to the generation whose key name starts it; unknown tickets to the current one."""
        new = KeyGeneration(SSL.Context(SSL.TLS_SERVER_METHOD), b"N" * 16)
        old = KeyGeneration(SSL.Context(SSL.TLS_SERVER_METHOD), b"O" * 16)
        self.assertIs(pick_generation([new, old], [b"O" * 16 + b"rest"]), old)
        self.assertIs(pick_generation([new, old], [b"X" * 40, b"O" * 16 + b"rest"]), old)
        self.assertIs(pick_generation([new, old], [b"X" * 40]), new)
        self.assertIs(pick_generation([new, KeyGeneration(old.context, None)], [b"O" * 40]), new)


class PlainHTTPTests(Sessions):
    def test_plain_http_gets_400_and_close(self) -> None:
        """An HTTP request on the HTTPS port gets a 400 page that says to use https://, then the close."""
        server = self.factory.buildProtocol(None)
        tcp = StringTransport()
        server.makeConnection(tcp)
        server.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertEqual(tcp.value(), b"")
        server.dataReceived(b"Host: a.test\r\n\r\n")
        self.assertEqual(tcp.value(), PLAIN_HTTP_ANSWER)
        self.assertTrue(tcp.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertIn(b"https://", tcp.value())
        self.assertTrue(tcp.disconnecting)


class ConfigTests(SynchronousTestCase):
    def test_rotation_interval_bounds(self) -> None:
        """tls.ticket_key_rotation defaults to 12 hours and is refused below a minute or above a week."""
        base = {"acme": {"agree_tos": True, "email": "ops@example.com"}}
        site = {"hosts": ["example.com"], "upstream": "http://127.0.0.1:8000", "tls": "acme"}
        self.assertEqual(parse({**base, "site": [site]}, "t.toml", {}).tls.ticket_key_rotation, 43200.0)
        ok = parse({**base, "site": [site], "tls": {"ticket_key_rotation": 3600}}, "t.toml", {})
        self.assertEqual(ok.tls.ticket_key_rotation, 3600.0)
        for bad in (10, 8 * 86400):
            with self.assertRaises(ConfigError) as info:
                parse({**base, "site": [site], "tls": {"ticket_key_rotation": bad}}, "t.toml", {})
            self.assertIn("tls.ticket_key_rotation", str(info.exception.problems[0]))

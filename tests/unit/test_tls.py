"""The TLS policy and SNI map, exercised with real handshakes in memory."""

from __future__ import annotations

from unittest import SkipTest

import trustme
from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from tests.tlsutil import Outcome, certified, client_context, handshake
from tlsproxy.certs.challenges import TLSALPN01Answers
from tlsproxy.tls.policy import TLSPolicy, cipher_names, served_names, supported_groups
from tlsproxy.tls.sni import NoChallengePending, SniMap, SniServer


class SniTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = trustme.CA()
        self.policy = TLSPolicy()
        self.sni_map = SniMap([("a.test", ["a.test", "www.a.test"]), ("b.test", ["b.test", "*.b.test"])])
        self.server = SniServer(self.policy, self.sni_map)
        self.a = certified(self.ca, "a.test", "www.a.test")
        self.b = certified(self.ca, "b.test", "*.b.test")
        self.sni_map.set_context("a.test", self.server.context_for(self.a))
        self.sni_map.set_context("b.test", self.server.context_for(self.b))

    def connect(self, name: str | None, **kw: object):  # type: ignore[no-untyped-def]
        return handshake(self.server.serverConnectionForTLS(None), client_context(**kw), name)  # type: ignore[arg-type]

    def test_server_name_picks_certificate(self) -> None:
        """Each server name gets its own site's certificate."""
        self.assertEqual(self.connect("www.a.test").cert.serial_number, self.a.serial)
        self.assertEqual(self.connect("b.test").cert.serial_number, self.b.serial)

    def test_wildcard_host(self) -> None:
        """A name under a wildcard host gets that site's certificate."""
        self.assertEqual(self.connect("api.b.test").cert.serial_number, self.b.serial)

    def test_unknown_and_missing_name_get_first_site(self) -> None:
        """No SNI, or an unknown name, gets the first site's certificate."""
        self.assertEqual(self.connect(None).cert.serial_number, self.a.serial)
        self.assertEqual(self.connect("elsewhere.test").cert.serial_number, self.a.serial)

    def test_on_demand_for_wildcard_names(self) -> None:
        """A name matched only by a wildcard can get a context issued for it alone."""
        issued: list[str] = []
        own = certified(self.ca, "api.b.test")

        def issue(host: str):  # type: ignore[no-untyped-def]
            issued.append(host)
            return self.server.context_for(own)

        self.sni_map.set_on_demand("b.test", issue)
        self.assertEqual(self.connect("api.b.test").cert.serial_number, own.serial)
        self.assertEqual(self.connect("b.test").cert.serial_number, self.b.serial)
        self.assertEqual(issued, ["api.b.test"])

    def test_site_without_certificate_fails_handshake(self) -> None:
        """A site with no certificate yet gets an alert, never another site's certificate."""
        sni_map = SniMap([("a.test", ["a.test"]), ("c.test", ["c.test"])])
        server = SniServer(self.policy, sni_map)
        sni_map.set_context("a.test", server.context_for(self.a))
        outcome = handshake(server.serverConnectionForTLS(None), client_context(), "c.test")
        self.assertFalse(outcome.ok)

    def test_swap_changes_next_handshake_only(self) -> None:
        """After set_context, new handshakes see the new certificate."""
        before = self.connect("a.test")
        renewed = certified(self.ca, "a.test", "www.a.test")
        self.sni_map.set_context("a.test", self.server.context_for(renewed))
        after = self.connect("a.test")
        self.assertEqual(before.cert.serial_number, self.a.serial)
        self.assertEqual(after.cert.serial_number, renewed.serial)

    def test_full_chain_served(self) -> None:
        """Intermediates are sent with the leaf."""
        ca = trustme.CA()
        intermediate = ca.create_child_ca()
        leaf = certified(intermediate, "a.test")
        self.assertEqual(len(leaf.chain), 2)
        sni_map = SniMap([("a.test", ["a.test"])])
        server = SniServer(self.policy, sni_map)
        sni_map.set_context("a.test", server.context_for(leaf))
        outcome = handshake(server.serverConnectionForTLS(None), client_context(), "a.test")
        self.assertTrue(outcome.ok, outcome.error)
        self.assertEqual(outcome.chain_serials, [leaf.serial, leaf.chain[1].serial_number])

    def test_tls11_refused(self) -> None:
        """A client that speaks at most TLS 1.1 cannot connect."""
        outcome = self.connect("a.test", max_version=SSL.TLS1_1_VERSION, ciphers="DEFAULT@SECLEVEL=0")
        self.assertFalse(outcome.ok)

    def test_tls12_with_listed_cipher(self) -> None:
        """TLS 1.2 with a cipher from the list is accepted."""
        outcome = self.connect("a.test", max_version=SSL.TLS1_2_VERSION, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
        self.assertTrue(outcome.ok, outcome.error)
        self.assertEqual(outcome.version, "TLSv1.2")
        self.assertEqual(outcome.cipher, "ECDHE-ECDSA-AES128-GCM-SHA256")

    def test_unlisted_cipher_refused(self) -> None:
        """A TLS 1.2 client offering only CBC suites is refused."""
        outcome = self.connect(
            "a.test", max_version=SSL.TLS1_2_VERSION, ciphers="ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384"
        )
        self.assertFalse(outcome.ok)

    def test_server_preference(self) -> None:
        """The server's order wins: AES-128-GCM before CHACHA20 when both are offered."""
        outcome = self.connect(
            "a.test",
            max_version=SSL.TLS1_2_VERSION,
            ciphers="ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
        )
        self.assertEqual(outcome.cipher, "ECDHE-ECDSA-AES128-GCM-SHA256")

    def test_idle_connections_release_buffers(self) -> None:
        """Contexts give idle connections' record buffers back to the allocator, as nginx does."""
        ctx = self.policy.new_context()
        self.assertTrue(ctx.set_mode(0) & SSL.MODE_RELEASE_BUFFERS)  # set_mode(0) adds nothing, returns the mode

    def test_min_version_13(self) -> None:
        """With min_version 1.3, TLS 1.2 clients are refused."""
        server = SniServer(TLSPolicy(min_version="1.3"), self.sni_map)
        outcome = handshake(
            server.serverConnectionForTLS(None), client_context(max_version=SSL.TLS1_2_VERSION), "a.test"
        )
        self.assertFalse(outcome.ok)

    def test_alpn_prefers_h2(self) -> None:
        """ALPN picks h2 when offered, http/1.1 otherwise."""
        self.assertEqual(self.connect("a.test", alpn=[b"http/1.1", b"h2"]).alpn, b"h2")
        self.assertEqual(self.connect("a.test", alpn=[b"http/1.1"]).alpn, b"http/1.1")

    def test_alpn_without_overlap_still_connects(self) -> None:
        """A client offering only unknown protocols still gets a handshake (no ALPN)."""
        outcome = self.connect("a.test", alpn=[b"spdy/3"])
        self.assertTrue(outcome.ok, outcome.error)
        self.assertIsNone(outcome.alpn)

    def test_only_intermediate_groups(self) -> None:
        """A client offering only ffdhe or secp521r1 groups gets no handshake."""
        ctx = client_context(max_version=SSL.TLS1_3_VERSION)
        from tlsproxy.compat.openssl import lib

        lib.SSL_CTX_set1_curves_list(ctx._context, b"P-521")
        outcome = handshake(self.server.serverConnectionForTLS(None), ctx, "a.test")
        self.assertFalse(outcome.ok)


class AcmeTlsAlpnTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = trustme.CA()
        self.policy = TLSPolicy()
        self.sni_map = SniMap([("a.test", ["a.test"])])
        self.answers = TLSALPN01Answers()
        self.server = SniServer(self.policy, self.sni_map, self.answers)
        self.site = certified(self.ca, "a.test")
        self.sni_map.set_context("a.test", self.server.context_for(self.site))

    def test_challenge_certificate_for_acme_alpn(self) -> None:
        """A hello offering acme-tls/1 gets the challenge certificate and acme-tls/1."""
        challenge = certified(trustme.CA(), "a.test")
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.use_certificate(challenge.leaf)
        ctx.use_privatekey(challenge.key)
        self.answers.put("a.test", ctx)
        outcome = handshake(self.server.serverConnectionForTLS(None), client_context(alpn=[b"acme-tls/1"]), "a.test")
        self.assertTrue(outcome.ok, outcome.error)
        self.assertEqual(outcome.alpn, b"acme-tls/1")
        self.assertEqual(outcome.cert.serial_number, challenge.serial)
        normal = handshake(self.server.serverConnectionForTLS(None), client_context(alpn=[b"h2"]), "a.test")
        self.assertEqual(normal.cert.serial_number, self.site.serial)

    def test_acme_alpn_without_challenge_fails(self) -> None:
        """acme-tls/1 with nothing pending ends the handshake: no normal certificate is shown."""
        outcome = handshake(self.server.serverConnectionForTLS(None), client_context(alpn=[b"acme-tls/1"]), "a.test")
        self.assertFalse(outcome.ok)

    def test_acme_alpn_without_challenge_is_no_application_protocol(self) -> None:
        """The alert for acme-tls/1 with nothing pending is no_application_protocol, not internal_error."""
        server = self.server.serverConnectionForTLS(None)
        server.set_accept_state()
        client = SSL.Connection(client_context(alpn=[b"acme-tls/1"]), None)
        client.set_connect_state()
        client.set_tlsext_host_name(b"a.test")
        with self.assertRaises(SSL.WantReadError):
            client.do_handshake()
        server.bio_write(client.bio_read(1 << 16))
        with self.assertRaises(NoChallengePending):
            server.do_handshake()
        client.bio_write(server.bio_read(1 << 16))  # the alert
        with self.assertRaises(SSL.Error) as info:
            client.do_handshake()
        self.assertIn("no application protocol", str(info.exception))

    def test_challenge_for_site_without_certificate(self) -> None:
        """A site still waiting for its first certificate can answer TLS-ALPN-01."""
        sni_map = SniMap([("new.test", ["new.test"])])
        server = SniServer(self.policy, sni_map, self.answers)
        challenge = certified(trustme.CA(), "new.test")
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.use_certificate(challenge.leaf)
        ctx.use_privatekey(challenge.key)
        self.answers.put("new.test", ctx)
        outcome = handshake(server.serverConnectionForTLS(None), client_context(alpn=[b"acme-tls/1"]), "new.test")
        self.assertTrue(outcome.ok, outcome.error)
        self.assertEqual(outcome.cert.serial_number, challenge.serial)


class CipherNamesTests(SynchronousTestCase):
    def test_default_is_ecdhe_aead_only(self) -> None:
        """The default list has only ECDHE key exchange with GCM or ChaCha20."""
        names = cipher_names(TLSPolicy().ciphers)
        self.assertEqual(len(names), 6)
        for name in names:
            self.assertTrue(name.startswith("ECDHE-"), name)
            self.assertTrue("GCM" in name or "CHACHA20" in name, name)


class GroupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = SniServer(TLSPolicy(), SniMap([("a.test", ["a.test"])]))
        self.server.sni_map.set_context("a.test", self.server.context_for(certified(trustme.CA(), "a.test")))

    def offering(self, groups: bytes) -> Outcome:
        ctx = client_context()
        from tlsproxy.compat.openssl import lib

        assert lib.SSL_CTX_set1_curves_list(ctx._context, groups) == 1
        return handshake(self.server.serverConnectionForTLS(None), ctx, "a.test")

    def test_post_quantum_first(self) -> None:
        """X25519MLKEM768 leads the offered groups, and a client offering only it gets a handshake."""
        if not supported_groups(("X25519MLKEM768",)):
            raise SkipTest("the OpenSSL under pyOpenSSL has no X25519MLKEM768")
        self.assertEqual(TLSPolicy().groups, "X25519MLKEM768:X25519:P-256:P-384")
        self.assertTrue(self.offering(b"X25519MLKEM768").ok)

    def test_classic_groups_kept(self) -> None:
        """X25519, P-256 and P-384 are still offered, in that order, after any post-quantum group."""
        self.assertEqual(TLSPolicy().groups.split(":")[-3:], ["X25519", "P-256", "P-384"])
        for classic in (b"X25519", b"P-256", b"P-384"):
            self.assertTrue(self.offering(classic).ok, classic)

    def test_unknown_group_left_out(self) -> None:
        """A group this OpenSSL does not know is dropped rather than failing every context."""
        self.assertEqual(supported_groups(("NoSuchGroup", "X25519")), "X25519")


class ServedAddressTests(SynchronousTestCase):
    def test_certificate_ip_addresses_are_served(self) -> None:
        """A certificate naming 127.0.0.1 and ::1 serves requests whose Host is either address, port or not."""
        ctx = TLSPolicy().context_for(certified(trustme.CA(), "localhost", "127.0.0.1", "::1"))
        served = served_names(ctx)
        assert served is not None
        for host in (b"localhost:8443", b"127.0.0.1", b"127.0.0.1:8443", b"[::1]", b"[::1]:8443"):
            self.assertTrue(served.covers(host), host)
        for host in (b"127.0.0.2:8443", b"[::2]:8443", b"example.com"):
            self.assertFalse(served.covers(host), host)

"""Warnings for certificates and suites that load but serve worse than they could (issue 9, item 15)."""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path

import trustme
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.audit import configuration_warnings
from tlsproxy.certs.model import CertificateError, CertifiedKey, certificate_warnings, leaf_first
from tlsproxy.config import parse
from tlsproxy.tls.policy import MOZILLA_INTERMEDIATE_CIPHERS, cipher_warnings

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)


def issue(ca: trustme.CA, *, days: tuple[int, int] = (-1, 90)) -> trustme.LeafCert:
    return ca.issue_cert(
        "a.test",
        key_type=trustme.KeyType.ECDSA,
        not_before=NOW + datetime.timedelta(days=days[0]),
        not_after=NOW + datetime.timedelta(days=days[1]),
    )


def pems(leaf: trustme.LeafCert) -> list[bytes]:
    return [blob.bytes() for blob in leaf.cert_chain_pems]


def loaded(leaf: trustme.LeafCert) -> CertifiedKey:
    return CertifiedKey.from_pem(b"".join(pems(leaf)), leaf.private_key_pem.bytes())


class ChainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.intermediate = trustme.CA().create_child_ca()
        self.leaf = issue(self.intermediate)
        self.key = self.leaf.private_key_pem.bytes()

    def test_full_chain_in_order_has_no_warning(self) -> None:
        """Leaf then intermediate, valid now: nothing to say."""
        certified = CertifiedKey.from_pem(b"".join(pems(self.leaf)), self.key)
        self.assertFalse(certified.reordered)
        self.assertEqual(certificate_warnings(certified, NOW), [])

    def test_chain_out_of_order_is_served_in_order_with_a_warning(self) -> None:
        """Intermediate before leaf loads (it used to be "private key does not match") and is put right."""
        certified = CertifiedKey.from_pem(b"".join(reversed(pems(self.leaf))), self.key, source="x.pem")
        self.assertTrue(certified.reordered)
        self.assertEqual(
            certified.leaf.subject, CertifiedKey.from_pem(b"".join(pems(self.leaf)), self.key).leaf.subject
        )
        self.assertEqual(certified.chain[0].issuer, certified.chain[1].subject)
        [warning] = certificate_warnings(certified, NOW)
        self.assertIn("out of order", warning)

    def test_leaf_only_warns_missing_issuer(self) -> None:
        """A file with only the leaf, issued by an intermediate, names the missing issuer."""
        certified = CertifiedKey.from_pem(pems(self.leaf)[0], self.key)
        [warning] = certificate_warnings(certified, NOW)
        self.assertIn("leaf certificate only", warning)
        self.assertIn(certified.issuer, warning)

    def test_expired_and_not_yet_valid(self) -> None:
        """An expired certificate, and one not valid yet, are each named with the date."""
        expired = loaded(issue(self.intermediate, days=(-90, -1)))
        self.assertIn("expired on 2026-05-31", certificate_warnings(expired, NOW)[0])
        early = loaded(issue(self.intermediate, days=(2, 90)))
        self.assertIn("not valid before 2026-06-03", certificate_warnings(early, NOW)[0])

    def test_key_of_no_certificate_still_refused(self) -> None:
        """A key that matches no certificate in the file is still refused as not matching."""
        other = issue(trustme.CA()).private_key_pem.bytes()
        with self.assertRaises(CertificateError) as info:
            CertifiedKey.from_pem(b"".join(pems(self.leaf)), other)
        self.assertIn("does not match", info.exception.reason)

    def test_leaf_first_keeps_extras_after_the_path(self) -> None:
        """Certificates off the issuer path are kept, after it."""
        stray = issue(trustme.CA()).cert_chain_pems[0].bytes()
        chain_pem = stray + b"".join(reversed(pems(self.leaf)))
        certified = CertifiedKey.from_pem(chain_pem, self.key)
        self.assertEqual(len(certified.chain), 3)
        self.assertEqual(certified.chain[0].issuer, certified.chain[1].subject)
        self.assertIn("did not issue", certificate_warnings(certified, NOW)[-1])
        self.assertEqual(leaf_first((), certified.key), ())


class CipherTests(SynchronousTestCase):
    def test_default_suites_are_quiet(self) -> None:
        """Mozilla's intermediate suites (ECDHE, AEAD) draw no warning, with or without h2."""
        self.assertEqual(cipher_warnings(MOZILLA_INTERMEDIATE_CIPHERS, ("h2", "http/1.1")), [])

    def test_static_rsa_and_cbc_suites(self) -> None:
        """RSA key exchange is named as lacking forward secrecy, CBC as lacking AEAD, and CBC with h2 as forbidden."""
        ciphers = "ECDHE-RSA-AES128-GCM-SHA256:AES128-GCM-SHA256:ECDHE-RSA-AES128-SHA256"
        no_fs, no_aead, h2 = cipher_warnings(ciphers, ("h2", "http/1.1"))
        self.assertIn("without forward secrecy", no_fs)
        self.assertIn("AES128-GCM-SHA256", no_fs)
        self.assertNotIn("ECDHE-RSA-AES128-SHA256", no_fs)
        self.assertIn("without AEAD", no_aead)
        self.assertIn("ECDHE-RSA-AES128-SHA256", no_aead)
        self.assertIn("RFC 9113", h2)
        self.assertEqual(len(cipher_warnings(ciphers, ("http/1.1",))), 2)


class ConfigurationTests(SynchronousTestCase):
    def test_files_site_and_suites(self) -> None:
        """The check names the site and file of a certificate problem, and tls.ciphers for weak suites."""
        temporary = tempfile.TemporaryDirectory()
        self.addCleanup(temporary.cleanup)
        where = Path(temporary.name)
        leaf = issue(trustme.CA().create_child_ca())
        (where / "a.pem").write_bytes(pems(leaf)[0])
        (where / "a.key").write_bytes(leaf.private_key_pem.bytes())
        site = {"hosts": ["a.test"], "upstream": "http://127.0.0.1:8000", "tls": "files",
                "cert": str(where / "a.pem"), "key": str(where / "a.key")}  # fmt: skip
        config = parse({"site": [site], "tls": {"ciphers": "ECDHE-RSA-AES128-SHA256"}}, "t.toml", {})
        warnings = configuration_warnings(config, NOW)
        self.assertEqual(len(warnings), 3, warnings)
        self.assertTrue(warnings[0].startswith("tls.ciphers: "))
        self.assertTrue(warnings[-1].startswith(f"site a.test: {where / 'a.pem'}: the file holds the leaf"))

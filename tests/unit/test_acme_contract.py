"""The CertificateAuthority contract, run against the fake CA here and against Pebble in
tests/integration/test_acme_pebble.py, so the fake cannot drift from the real client."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tlsproxy.acme.client import AcmeError, CertificateAuthority
from tlsproxy.acme.issuer import TableResponder, ValidationFailed, issue
from tlsproxy.acme.testing import FakeCA
from tlsproxy.certs.challenges import HTTP01Answers, TLSALPN01Answers


@dataclass
class CAEnv:
    ca: CertificateAuthority
    http01: HTTP01Answers
    alpn01: TLSALPN01Answers
    roots_pem: Callable[[], bytes]
    is_revoked: Callable[[x509.Certificate], bool]
    make_ca: Callable[[ec.EllipticCurvePrivateKey, str | None], CertificateAuthority]

    @property
    def responder(self) -> TableResponder:
        return TableResponder(self.http01, self.alpn01)


_counter = itertools.count()


def fresh_names(n: int = 2) -> tuple[str, ...]:
    """Names no earlier order used (so no authorization is reused)."""
    base = f"t{next(_counter)}-{uuid.uuid4().hex[:8]}.example.test"
    return tuple([base] + [f"www{i}.{base}" for i in range(1, n)])


def chains_to(chain: tuple[x509.Certificate, ...], roots_pem: bytes) -> bool:
    """Whether the last certificate of ``chain`` was signed by one of ``roots_pem``."""
    roots = x509.load_pem_x509_certificates(roots_pem)
    for child, parent in itertools.pairwise(chain):
        child.verify_directly_issued_by(parent)
    last = chain[-1]
    for root in roots:
        if last == root:
            return True
        try:
            last.verify_directly_issued_by(root)
            return True
        except (ValueError, TypeError, Exception):
            continue
    return False


class CAContract:
    """What every CertificateAuthority must do; subclasses provide the ``env`` fixture."""

    def test_account_is_stable(self, env: CAEnv) -> None:
        """Asking for the account twice gives the same account URL."""
        assert env.ca.account() == env.ca.account()

    def test_issue_two_names_http01(self, env: CAEnv) -> None:
        """One HTTP-01 order yields one certificate covering both names, chaining to the CA's root."""
        names = fresh_names(2)
        certified = issue(env.ca, names, challenges=("http-01",), responder=env.responder)
        assert certified.uncovered(names) == []
        assert chains_to(certified.chain, env.roots_pem())
        assert env.http01._by_token == {}  # answers withdrawn afterwards

    def test_issue_tls_alpn01_only(self, env: CAEnv) -> None:
        """With only TLS-ALPN-01 enabled the order is validated through the ALPN table."""
        names = fresh_names(2)
        certified = issue(env.ca, names, challenges=("tls-alpn-01",), responder=env.responder)
        assert certified.uncovered(names) == []
        assert env.alpn01._by_host == {}

    def test_rsa_key_type(self, env: CAEnv) -> None:
        """key_type rsa2048 gives an RSA certificate."""
        from cryptography.hazmat.primitives.asymmetric import rsa

        certified = issue(env.ca, fresh_names(1), key_type="rsa2048", challenges=("http-01",), responder=env.responder)
        assert isinstance(certified.key, rsa.RSAPrivateKey)

    def test_unanswered_challenge_fails(self, env: CAEnv) -> None:
        """A challenge nobody answers makes the order fail with the CA's reason."""

        class Silent(TableResponder):
            def publish(self, *args: object) -> None:
                pass

        with pytest.raises(ValidationFailed) as info:
            issue(env.ca, fresh_names(1), challenges=("http-01",), responder=Silent(env.http01, env.alpn01))
        assert info.value.detail

    def test_falls_back_to_other_challenge(self, env: CAEnv) -> None:
        """When HTTP-01 cannot be answered, the issuer tries TLS-ALPN-01 before giving up."""

        class NoHttp(TableResponder):
            def publish(self, kind: str, host: str, token: str, key_authorization: str) -> None:
                if kind != "http-01":
                    super().publish(kind, host, token, key_authorization)

        names = fresh_names(1)
        certified = issue(
            env.ca, names, challenges=("http-01", "tls-alpn-01"), responder=NoHttp(env.http01, env.alpn01)
        )
        assert certified.uncovered(names) == []

    def test_revoke(self, env: CAEnv) -> None:
        """A revoked certificate shows as revoked, and revoking it again is an AcmeError."""
        certified = issue(env.ca, fresh_names(1), challenges=("http-01",), responder=env.responder)
        env.ca.revoke(certified.leaf, 4)
        assert env.is_revoked(certified.leaf)
        with pytest.raises(AcmeError):
            env.ca.revoke(certified.leaf, 4)

    def test_rollover_keeps_account(self, env: CAEnv) -> None:
        """After a key change, a client with the new key uses the same account and can order."""
        url = env.ca.account()
        new_key = ec.generate_private_key(ec.SECP256R1())
        env.ca.rollover(new_key)
        again = env.make_ca(new_key, url)
        assert again.account() == url
        certified = issue(
            again, fresh_names(1), challenges=("http-01",), responder=TableResponder(env.http01, env.alpn01)
        )
        assert certified.leaf

    def test_renewal_info_window_inside_lifetime(self, env: CAEnv) -> None:
        """Renewal information, where offered, is a window inside the certificate's lifetime."""
        certified = issue(env.ca, fresh_names(1), challenges=("http-01",), responder=env.responder)
        info = env.ca.renewal_info(certified.leaf)
        if not env.ca.supports_ari():
            assert info is None
            return
        assert info is not None
        assert certified.not_before <= info.window.start <= info.window.end <= certified.not_after


class TestFakeCA(CAContract):
    """The contract against the in-memory fake CA."""

    @pytest.fixture
    def env(self) -> CAEnv:
        http01, alpn01 = HTTP01Answers(), TLSALPN01Answers()
        ca = FakeCA(http01=http01, alpn01=alpn01)

        def make_ca(key: ec.EllipticCurvePrivateKey, url: str | None) -> CertificateAuthority:
            assert key is ca.account_key
            return ca

        return CAEnv(
            ca=ca,
            http01=http01,
            alpn01=alpn01,
            roots_pem=lambda: ca.root.public_bytes(serialization.Encoding.PEM),
            is_revoked=lambda cert: cert.serial_number in ca.revoked,
            make_ca=make_ca,
        )


def test_ca_bundle_adds_trust(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """[acme] ca_bundle adds a root to the public ones instead of replacing them."""
    import certifi
    import trustme

    from tlsproxy.acme.client import trust_bundle

    private = trustme.CA()
    extra = tmp_path / "private-root.pem"
    private.cert_pem.write_to_path(str(extra))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one public root has a non-positive serial
        combined = x509.load_pem_x509_certificates(open(trust_bundle(str(extra)), "rb").read())
        public = x509.load_pem_x509_certificates(open(certifi.where(), "rb").read())
    subjects = {c.subject for c in combined}
    assert x509.load_pem_x509_certificate(private.cert_pem.bytes()).subject in subjects
    assert {c.subject for c in public} <= subjects

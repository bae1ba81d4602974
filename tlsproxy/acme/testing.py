"""An in-memory ACME CA that fills the :class:`~tlsproxy.acme.client.CertificateAuthority` seam.

It checks challenge answers in the same tables the real listeners serve from,
issues real X.509 certificates from its own throwaway root, and does what
Pebble 2.4 cannot: ACME Renewal Information (settable windows), profiles,
``replaces`` bookkeeping, injected failures with Retry-After, and being down.
The contract tests run against it and against :class:`AcmeClient` on Pebble.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tlsproxy.acme.ari import RenewalInfo, cert_id
from tlsproxy.acme.client import AcmeError, Authorization, Challenge, Order
from tlsproxy.acme.scheduler import Window
from tlsproxy.certs.challenges import HTTP01Answers, TLSALPN01Answers


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class _Order:
    order: Order
    hosts: tuple[str, ...]
    profile: str
    replaces: str


@dataclass
class FakeCA:
    """A CA in memory.  Set ``down`` or push onto ``failures`` to make calls fail."""

    http01: HTTP01Answers = field(default_factory=HTTP01Answers)
    alpn01: TLSALPN01Answers = field(default_factory=TLSALPN01Answers)
    now: Callable[[], datetime.datetime] = _utcnow
    lifetime: datetime.timedelta = datetime.timedelta(days=90)
    offered: tuple[str, ...] = ("http-01", "tls-alpn-01")
    ari: bool = True
    directory_url: str = "https://fake-ca.invalid/directory"
    account_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    down: bool = False
    failures: list[AcmeError] = field(default_factory=list)
    fail_validation: set[str] = field(default_factory=set)
    profiles: dict[str, str] = field(default_factory=lambda: {"classic": "90 days", "shortlived": "6 days"})

    def __post_init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fake ACME Root")])
        start = self.now() - datetime.timedelta(days=1)
        self.root = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.root_key.public_key()), critical=False)
            .sign(self.root_key, hashes.SHA256())
        )
        self._ids = itertools.count(1)
        self._orders: dict[str, _Order] = {}
        self._authz: dict[str, Authorization] = {}
        self._tokens: dict[str, tuple[str, str]] = {}  # challenge url -> (authz url, kind)
        self.accounts: list[str] = []
        self.orders: list[_Order] = []
        self.issued: list[x509.Certificate] = []
        self.revoked: dict[int, int] = {}
        self.windows: dict[str, Window] = {}
        self.rollovers = 0

    # -- helpers ---------------------------------------------------------------

    def _gate(self, what: str) -> None:
        if self.down:
            raise AcmeError(what, f"cannot reach {self.directory_url}: connection refused", "connection")
        if self.failures:
            raise self.failures.pop(0)

    def _url(self, kind: str) -> str:
        return f"https://fake-ca.invalid/{kind}/{next(self._ids)}"

    def key_authorization(self, token: str) -> str:
        jwk = self.account_key.public_key().public_numbers()
        thumb = hashlib.sha256(f"{jwk.x}.{jwk.y}".encode()).digest()
        return f"{token}.{base64.urlsafe_b64encode(thumb).decode().rstrip('=')}"

    # -- the seam --------------------------------------------------------------

    def account(self) -> str:
        self._gate("registering an account")
        if not self.accounts:
            self.accounts.append(self._url("acct"))
        return self.accounts[-1]

    def supports_ari(self) -> bool:
        return self.ari

    def new_order(self, hosts: tuple[str, ...], profile: str = "", replaces: str = "") -> Order:
        what = f"ordering a certificate for {', '.join(hosts)}"
        self.account()
        self._gate(what)
        if profile and profile not in self.profiles:
            raise AcmeError(what, f"unknown profile {profile!r}", "invalidProfile")
        authz_urls = []
        for host in hosts:
            url = self._url("authz")
            challenges = []
            for kind in self.offered:
                curl = self._url("chall")
                token = base64.urlsafe_b64encode(hashlib.sha256(curl.encode()).digest()).decode().rstrip("=")
                challenges.append(Challenge(kind, curl, token))
                self._tokens[curl] = (url, kind)
            self._authz[url] = Authorization(url, host, "pending", tuple(challenges))
            authz_urls.append(url)
        order = Order(self._url("order"), "pending", self._url("finalize"), tuple(authz_urls))
        record = _Order(order, hosts, profile, replaces)
        self._orders[order.url] = record
        self.orders.append(record)
        return order

    def authorization(self, url: str) -> Authorization:
        self._gate("fetching an authorization")
        return self._authz[url]

    def answer(self, challenge: Challenge) -> None:
        self._gate(f"answering {challenge.type}")
        authz_url, kind = self._tokens[challenge.url]
        authz = self._authz[authz_url]
        expected = self.key_authorization(challenge.token)
        if kind in self.fail_validation:
            ok = False
        elif kind == "http-01":
            ok = self.http01.get(challenge.token) == expected
        else:
            ok = self.alpn01.get(authz.identifier) is not None
        error = "" if ok else f"{kind}: no valid answer for {authz.identifier}"
        self._authz[authz_url] = Authorization(
            authz.url, authz.identifier, "valid" if ok else "invalid", authz.challenges, error
        )

    def wait_authorization(self, url: str, timeout: float = 90.0) -> Authorization:
        return self.authorization(url)

    def finalize(self, order: Order, csr_der: bytes, timeout: float = 90.0) -> bytes:
        self._gate("finalizing the order")
        record = self._orders[order.url]
        if any(self._authz[u].status != "valid" for u in order.authorizations):
            raise AcmeError("finalizing the order", "order is not ready", "orderNotReady")
        csr = x509.load_der_x509_csr(csr_der)
        names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )
        if sorted(names) != sorted(record.hosts):
            raise AcmeError("finalizing the order", "CSR names differ from the order", "badCSR")
        lifetime = datetime.timedelta(days=6) if record.profile == "shortlived" else self.lifetime
        start = self.now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.root.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + lifetime)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.root_key.public_key()), critical=False
            )
            .sign(self.root_key, hashes.SHA256())
        )
        self.issued.append(cert)
        return cert.public_bytes(serialization.Encoding.PEM) + self.root.public_bytes(serialization.Encoding.PEM)

    def renewal_info(self, cert: x509.Certificate) -> RenewalInfo | None:
        if not self.ari:
            return None
        self._gate("fetching renewal information")
        ident = cert_id(cert)
        window = self.windows.get(ident)
        if window is None:
            life = cert.not_valid_after_utc - cert.not_valid_before_utc
            window = Window(cert.not_valid_before_utc + life * 2 / 3, cert.not_valid_before_utc + life * 5 / 6)
        return RenewalInfo(window, self.now() + datetime.timedelta(hours=6))

    def revoke(self, cert: x509.Certificate, reason: int) -> None:
        self._gate("revoking the certificate")
        if cert.serial_number in self.revoked:
            raise AcmeError("revoking the certificate", "Certificate already revoked", "alreadyRevoked")
        if cert.serial_number not in {c.serial_number for c in self.issued}:
            raise AcmeError("revoking the certificate", "unknown certificate", "malformed")
        self.revoked[cert.serial_number] = reason

    def rollover(self, new_key: ec.EllipticCurvePrivateKey) -> None:
        self.account()
        self._gate("changing the account key")
        self.account_key = new_key
        self.rollovers += 1

"""A certificate chain with its private key, checked once when it is built."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class CertificateError(ValueError):
    """A certificate or key that cannot be served, and why."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def host_matches(pattern: str, host: str) -> bool:
    """RFC 6125 matching of one DNS name pattern (``*.example.com`` allowed)."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


def authority_host(authority: bytes) -> str:
    """The host of a Host / ``:authority`` value: port dropped, lower case, no trailing dot."""
    text = authority.decode("ascii", "replace").lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    name, sep, port = text.rpartition(":")
    if sep and port.isdigit():
        text = name
    return text.rstrip(".")


class ServedNames:
    """The DNS names of the certificate a TLS connection was served.

    A request on that connection for a host these names do not cover was
    meant for another certificate: it gets 421 (RFC 9110 15.5.20), so a
    client cannot reach site B over a connection (or a resumed TLS 1.2
    session) that only ever proved site A.  One instance is shared by every
    connection of a context; answers are remembered per Host value.
    """

    __slots__ = ("_known", "names")

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._known: dict[bytes, bool] = {}

    def covers(self, authority: bytes) -> bool:
        known = self._known.get(authority)
        if known is None:
            host = authority_host(authority)
            known = bool(host) and any(host_matches(name, host) for name in self.names)
            if len(self._known) > 256:
                self._known.clear()
            self._known[authority] = known
        return known


@dataclass(frozen=True)
class CertifiedKey:
    """A leaf certificate, its intermediates and the matching private key."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if not self.chain:
            raise CertificateError(self.source, "no certificate found")
        leaf_public = (
            self.chain[0]
            .public_key()
            .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        key_public = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if leaf_public != key_public:
            raise CertificateError(self.source, "the private key does not match the certificate")

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes, source: str = "<memory>") -> CertifiedKey:
        """Parse a full-chain PEM and a PEM key; the key never appears in errors."""
        try:
            chain = tuple(x509.load_pem_x509_certificates(chain_pem))
        except ValueError:
            raise CertificateError(source, "no PEM certificate could be read") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise CertificateError(source, "the private key could not be read (PEM, unencrypted)") from None
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise CertificateError(source, f"unsupported key type {type(key).__name__}")
        return cls(chain=chain, key=key, source=source)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> datetime.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    @property
    def issuer(self) -> str:
        return self.leaf.issuer.rfc4514_string()

    @property
    def dns_names(self) -> tuple[str, ...]:
        try:
            san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            common = self.leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            return tuple(str(a.value) for a in common)
        return tuple(san.value.get_values_for_type(x509.DNSName))

    def covers(self, host: str) -> bool:
        return any(host_matches(name, host) for name in self.dns_names)

    def uncovered(self, hosts: Sequence[str]) -> list[str]:
        return [h for h in hosts if not self.covers(h)]

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

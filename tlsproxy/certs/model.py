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


def _public(item: x509.Certificate | PrivateKey) -> bytes:
    public = item.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def leaf_first(chain: Sequence[x509.Certificate], key: PrivateKey) -> tuple[x509.Certificate, ...]:
    """``chain`` in the order clients need: the key's certificate, then each one's issuer, then the rest.

    A chain file in another order used to be refused as "the private key does
    not match"; its certificates are fine, only their order is not.
    """
    wanted = _public(key)
    leaf = next((c for c in chain if _public(c) == wanted), None)
    if leaf is None:
        return tuple(chain)
    ordered = [leaf]
    rest = [c for c in chain if c is not leaf]
    while True:
        issuer = next((c for c in rest if c.subject == ordered[-1].issuer and c.subject != c.issuer), None)
        if issuer is None or ordered[-1].issuer == ordered[-1].subject:
            break
        ordered.append(issuer)
        rest.remove(issuer)
    return tuple(ordered + rest)


def certificate_warnings(certified: CertifiedKey, now: datetime.datetime) -> list[str]:
    """What is wrong with a chain that still loads: each a sentence that says what to do."""
    leaf = certified.leaf
    warnings = []
    if now >= certified.not_after:
        warnings.append(f"the certificate expired on {certified.not_after:%Y-%m-%d %H:%M} UTC: renew it")
    elif now < certified.not_before:
        warnings.append(f"the certificate is not valid before {certified.not_before:%Y-%m-%d %H:%M} UTC")
    if len(certified.chain) == 1 and leaf.issuer != leaf.subject:
        warnings.append(
            f"the file holds the leaf certificate only; its issuer ({certified.issuer}) is missing: use the "
            "full chain file (leaf, then intermediates), or clients that lack the intermediate fail"
        )
    if certified.reordered:
        warnings.append(
            "the certificates in the file are out of order (the leaf comes first, then each issuer): "
            "they are served in the right order, but fix the file"
        )
    for number, (child, parent) in enumerate(zip(certified.chain, certified.chain[1:], strict=False), start=2):
        if child.issuer != parent.subject:
            warnings.append(
                f"certificate {number} of the chain ({parent.subject.rfc4514_string()}) did not issue the one "
                f"before it (issued by {child.issuer.rfc4514_string()}): the chain is broken or has extras"
            )
            break
    return warnings


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
    # The file had the certificates in another order (leaf first, then each
    # issuer, is what clients need); ``chain`` is the order served.
    reordered: bool = False

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
        ordered = leaf_first(chain, key)
        return cls(chain=ordered, key=key, source=source, reordered=ordered != chain)

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

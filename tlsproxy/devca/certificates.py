"""What the local CA's certificates say: hosts, root and leaf contents, when to renew.

Pure: plain values in, certificates out; no files, no clock, no reactor.

Leaves live seven days by default.  They are never stored, so nothing is gained
by a long life, and a short one bounds what a leaked leaf key (a core dump, a
debugger) is good for.  Seven days is far below the 398 days Chromium accepts,
and the proxy replaces the leaf with a third of that left (about 2.3 days), so
even a laptop that slept through the renewal time gets a fresh one on waking.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tlsproxy.certs.model import CertifiedKey

ROOT_LIFETIME = datetime.timedelta(days=3650)
LEAF_LIFETIME = datetime.timedelta(days=7)
# Chromium refuses leaves valid for longer than this, whoever issued them.
MAX_LEAF_VALIDITY = datetime.timedelta(days=398)
# Leaves start a little in the past, so a clock that runs slightly behind
# (a VM, a container just resumed) still accepts a leaf issued a moment ago.
BACKDATE = datetime.timedelta(minutes=5)
ROOT_ORGANIZATION = "tlsproxy development CA"
LEAF_ORGANIZATION = "tlsproxy development certificate"


def split_hosts(hosts: Sequence[str]) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """DNS names and IP addresses of ``hosts`` (raises ValueError for anything else)."""
    if isinstance(hosts, str):
        raise ValueError("hosts must be a sequence of names, not one string")
    if not hosts:
        raise ValueError("a certificate needs at least one host")
    names: list[str] = []
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for host in hosts:
        bare = host.strip().strip("[]").rstrip(".").lower()
        try:
            addresses.append(ipaddress.ip_address(bare))
            continue
        except ValueError:
            pass
        labels = bare.split(".")
        if (
            not bare
            or not bare.isascii()
            or any(not label for label in labels)
            or any(not all(c.isalnum() or c == "-" for c in label) for label in labels[1:])
            or not (labels[0] == "*" or all(c.isalnum() or c == "-" for c in labels[0]))
            or (labels[0] == "*" and len(labels) < 2)
        ):
            raise ValueError(f"{host!r} is neither a DNS name nor an IP address")
        names.append(bare)
    return names, addresses


def ignored_wildcards(hosts: Sequence[str]) -> list[str]:
    """Wildcards over a single label (``*.localhost``): browsers and OpenSSL match no name against them."""
    return [h for h in hosts if h.startswith("*.") and "." not in h[2:].rstrip(".")]


def root_nickname(root: x509.Certificate) -> str:
    """The name of a root in trust stores: unique per root, recognisably ours."""
    return f"{ROOT_ORGANIZATION} {root.serial_number:x}"[:64]


def build_root(key: ec.EllipticCurvePrivateKey, owner: str, now: datetime.datetime) -> x509.Certificate:
    """A self-signed root that may sign leaves only (pathlen 0)."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ROOT_ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, owner[:64]),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{ROOT_ORGANIZATION} {owner}"[:64]),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def build_leaf(
    hosts: Sequence[str],
    leaf_key: ec.EllipticCurvePrivateKey,
    root: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
    lifetime: datetime.timedelta,
) -> x509.Certificate:
    """A server certificate for ``hosts`` that Chromium accepts from a trusted root."""
    names, addresses = split_hosts(hosts)
    if lifetime <= datetime.timedelta(0) or lifetime + BACKDATE > MAX_LEAF_VALIDITY:
        raise ValueError(f"a leaf lifetime must be positive and below {MAX_LEAF_VALIDITY.days} days")
    not_before = max(now - BACKDATE, root.not_valid_before_utc)
    not_after = min(now + lifetime, root.not_valid_after_utc)
    if not_after <= now:
        raise ValueError(f"the root expired at {root.not_valid_after_utc.isoformat()}")
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(a) for a in addresses]
    public = leaf_key.public_key()
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, LEAF_ORGANIZATION),
                    x509.NameAttribute(NameOID.COMMON_NAME, (names or [str(addresses[0])])[0][:64]),
                ]
            )
        )
        .issuer_name(root.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), critical=False)
        .sign(root_key, hashes.SHA256())
    )


def renewal_time(certified: CertifiedKey) -> datetime.datetime:
    """When to replace a leaf: with a third of its validity left."""
    return certified.not_after - (certified.not_after - certified.not_before) / 3

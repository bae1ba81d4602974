"""TLS-ALPN-01 (RFC 8737) challenge certificates and the contexts that serve them.

The certificate is self-signed for exactly one name, carries the critical
``acmeIdentifier`` extension holding SHA-256 of the key authorization, and is
served only to a handshake that offers ``acme-tls/1`` for that name (the SNI
layer does the switching; see :mod:`tlsproxy.tls.sni`).
"""

from __future__ import annotations

import datetime
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier
from OpenSSL import SSL

from tlsproxy.tls.policy import ACME_TLS_ALPN

ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")


def acme_identifier_value(key_authorization: str) -> bytes:
    """DER ``OCTET STRING`` of SHA-256(key authorization): the extension's value."""
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    return b"\x04\x20" + digest


def challenge_certificate(
    host: str, key_authorization: str, now: datetime.datetime | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh key and the self-signed challenge certificate for ``host``."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tlsproxy acme-tls/1 challenge")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, acme_identifier_value(key_authorization)),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _select_acme_tls(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    return ACME_TLS_ALPN if ACME_TLS_ALPN in offered else b""


def challenge_context(host: str, key_authorization: str) -> SSL.Context:
    """A ready server context answering the TLS-ALPN-01 challenge for ``host``."""
    cert, key = challenge_certificate(host, key_authorization)
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate(cert)
    ctx.use_privatekey(key)
    ctx.check_privatekey()
    ctx.set_alpn_select_callback(_select_acme_tls)
    return ctx

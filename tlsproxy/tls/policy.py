"""Turn the ``[tls]`` policy into pyOpenSSL contexts.

pyOpenSSL freezes a context once a connection has used it, so each context is
built whole here, before it is handed to anything that accepts connections.
Every context gets the same policy: OpenSSL copies the protocol floor, options
and cipher list from the context a connection starts on (the SNI front
context), and the certificate, DH parameters and ALPN callback from the one the
SNI callback switches to; building both from one policy keeps them in step.
"""

from __future__ import annotations

import functools
import hashlib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from OpenSSL import SSL

from tlsproxy.certs.model import CertifiedKey, ServedNames
from tlsproxy.compat.openssl import set_groups

# Mozilla's "intermediate" TLS 1.2 suites, ECDHE with AEAD only.
MOZILLA_INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
# Key exchange groups in server preference order: the post-quantum hybrid
# first (TLS 1.3 only; what current browsers send), then the classic groups
# of Mozilla's profile.  Nothing else is offered.
PREFERRED_GROUPS = ("X25519MLKEM768", "X25519", "P-256", "P-384")
ACME_TLS_ALPN = b"acme-tls/1"

_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_SINGLE_ECDH_USE
    | SSL.OP_SINGLE_DH_USE
)


# The names each site context's certificate covers, for the 421 check; a
# context that is dropped (certificate swapped) leaves this table with it.
_served: weakref.WeakKeyDictionary[SSL.Context, ServedNames] = weakref.WeakKeyDictionary()


def served_names(context: SSL.Context) -> ServedNames | None:
    """What the certificate of ``context`` covers; None for a context not built by :meth:`TLSPolicy.context_for`."""
    return _served.get(context)


class PolicyError(ValueError):
    """A TLS setting that OpenSSL will not take."""


def _accepts_groups(names: str) -> bool:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    return set_groups(ctx, names)


@functools.cache
def supported_groups(preferred: tuple[str, ...] = PREFERRED_GROUPS) -> str:
    """The groups of ``preferred`` that the OpenSSL under pyOpenSSL knows, in order, OpenSSL-style."""
    return ":".join(name for name in preferred if _accepts_groups(name))


GROUPS = supported_groups()


def cipher_names(ciphers: str) -> list[str]:
    """The TLS 1.2 suites an OpenSSL cipher string selects (raises PolicyError)."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    try:
        ctx.set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise PolicyError(f"the cipher string {ciphers!r} selects no cipher") from None
    conn = SSL.Connection(ctx, None)
    names = [n for n in conn.get_cipher_list() if not n.startswith("TLS_")]
    if not names:
        raise PolicyError(f"the cipher string {ciphers!r} selects no TLS 1.2 cipher")
    return names


def _is_aead(name: str) -> bool:
    return any(mode in name for mode in ("GCM", "CHACHA20", "CCM"))


def cipher_warnings(ciphers: str, alpn: Sequence[str] = ()) -> list[str]:
    """What is weak in a TLS 1.2 cipher string that OpenSSL accepts (raises PolicyError if it accepts none)."""
    names = cipher_names(ciphers)
    warnings = []
    static = [n for n in names if not n.startswith(("ECDHE-", "DHE-"))]
    if static:
        warnings.append(
            f"TLS 1.2 suites without forward secrecy (a stolen key decrypts recorded traffic): {', '.join(static)}"
        )
    cbc = [n for n in names if not _is_aead(n)]
    if cbc:
        warnings.append(f"TLS 1.2 suites without AEAD (CBC or worse): {', '.join(cbc)}")
        if "h2" in alpn:
            warnings.append(
                "h2 is offered with CBC suites, which HTTP/2 forbids (RFC 9113 9.2.2): a client that gets one "
                "ends the connection with INADEQUATE_SECURITY; list only ECDHE suites with GCM or CHACHA20"
            )
    return warnings


def load_dhparams(path: str) -> None:
    """Check that ``path`` holds PEM DH parameters OpenSSL can load."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    try:
        ctx.load_tmp_dh(path.encode())
    except SSL.Error:
        raise PolicyError(f"{path} holds no PEM DH parameters") from None


AlpnChooser = Callable[[SSL.Connection, list[bytes]], Any]  # bytes, or SSL.NO_OVERLAPPING_PROTOCOLS


@dataclass(frozen=True)
class TLSPolicy:
    """What every TLS context of the server is built with."""

    min_version: str = "1.2"
    ciphers: str = MOZILLA_INTERMEDIATE_CIPHERS
    dhparams: str = ""
    alpn: tuple[str, ...] = ("h2", "http/1.1")
    groups: str = field(default=GROUPS)

    def new_context(self, alpn_chooser: AlpnChooser | None = None) -> SSL.Context:
        """A server context with the policy applied and no certificate yet."""
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(_VERSIONS[self.min_version])
        ctx.set_options(_OPTIONS)
        # An idle connection gives its record buffers back (about 34 KiB).
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.set_cipher_list(self.ciphers.encode("ascii"))
        if not set_groups(ctx, self.groups):
            raise PolicyError(f"OpenSSL refused the key exchange groups {self.groups!r}")
        if self.dhparams:
            ctx.load_tmp_dh(self.dhparams.encode())
        # Twisted turns both of these off; a proxy in front of browsers wants them.
        ctx.set_session_id(b"tlsproxy")
        ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        if alpn_chooser is not None and self.alpn:
            ctx.set_alpn_select_callback(alpn_chooser)
        return ctx

    def context_for(self, certified: CertifiedKey, alpn_chooser: AlpnChooser | None = None) -> SSL.Context:
        """A ready context serving ``certified`` (leaf plus its intermediates)."""
        ctx = self.new_context(alpn_chooser)
        ctx.use_certificate(certified.leaf)
        for extra in certified.chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(certified.key)
        ctx.check_privatekey()
        # Sessions resume only on contexts of the same names (see sni.py).
        ctx.set_session_id(hashlib.sha256("\n".join(sorted(certified.dns_names)).encode()).digest())
        _served[ctx] = ServedNames(certificate_hosts(certified))
        return ctx

    def choose_protocol(self, offered: Sequence[bytes]) -> bytes | object:
        """Our first ALPN protocol the client also offers (server preference)."""
        for name in self.alpn:
            wire = name.encode("ascii")
            if wire in offered:
                return wire
        return SSL.NO_OVERLAPPING_PROTOCOLS


def certificate_hosts(certified: CertifiedKey) -> tuple[str, ...]:
    """The hosts a request on this certificate's connection may name: its DNS names and IP addresses.

    An address is given as the Host header carries it once its port and
    brackets are dropped (``127.0.0.1``, ``::1``): the dev certificate names
    the loopback addresses, and a browser at https://[::1]:8443/ must not get 421.
    """
    try:
        san = certified.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return certified.dns_names
    return (*certified.dns_names, *(str(address) for address in san.value.get_values_for_type(x509.IPAddress)))

"""The tables through which the issuer hands challenge answers to the listeners.

The issuer puts an answer in before it tells the CA to validate and takes it out
afterwards; the port-80 side (HTTP-01) and the TLS listener (TLS-ALPN-01) only
read.  Both tables are plain in-memory dicts: every listener of one process
shares them, and nothing in them outlives the process.

They live in certs/, below both sides: the issuer (acme/) writes them and the
listeners (tls/, http/) read them, so neither listener imports the issuer.
"""

from __future__ import annotations

import re

from OpenSSL import SSL

# RFC 8555 section 8.3: the token is base64url without padding.
_TOKEN = re.compile(r"\A[A-Za-z0-9_-]{1,256}\Z")


def is_valid_token(token: str) -> bool:
    """Whether ``token`` could be an ACME token (and so is safe to look up)."""
    return bool(_TOKEN.match(token))


class HTTP01Answers:
    """Key authorizations by token, for ``/.well-known/acme-challenge/<token>``."""

    def __init__(self) -> None:
        self._by_token: dict[str, str] = {}

    def put(self, token: str, key_authorization: str) -> None:
        if not is_valid_token(token):
            raise ValueError(f"not an ACME token: {token!r}")
        self._by_token[token] = key_authorization

    def remove(self, token: str) -> None:
        self._by_token.pop(token, None)

    def get(self, token: str) -> str | None:
        return self._by_token.get(token)


class TLSALPN01Answers:
    """Challenge certificates (RFC 8737) by host name, ready as SSL contexts.

    The issuer builds the context (self-signed certificate with the
    acmeIdentifier extension, ALPN ``acme-tls/1``); the SNI layer switches a
    handshake to it when the client offers ``acme-tls/1`` for that name.
    """

    def __init__(self) -> None:
        self._by_host: dict[str, SSL.Context] = {}

    def put(self, host: str, context: SSL.Context) -> None:
        self._by_host[host.lower()] = context

    def remove(self, host: str) -> None:
        self._by_host.pop(host.lower(), None)

    def get(self, host: str) -> SSL.Context | None:
        return self._by_host.get(host.lower())

"""pyOpenSSL's private parts: the cffi binding, and a connection's SSL* and memory BIOs.

Tested with pyOpenSSL 24.0 to 26.4.  pyOpenSSL has no public way to call
``SSL_read``/``SSL_write`` on a memory-BIO connection without an exception per
"would block", nor to set the key exchange groups of a context.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi, lib

__all__ = ["connection_handles", "context_handle", "ffi", "lib", "raise_ssl_error", "set_groups"]


def connection_handles(conn: SSL.Connection) -> tuple[Any, Any, Any]:
    """The ``SSL*`` of a memory-BIO connection, and its incoming and outgoing BIOs."""
    return conn._ssl, conn._into_ssl, conn._from_ssl


def raise_ssl_error(conn: SSL.Connection, result: int) -> None:
    """Raise pyOpenSSL's exception for a failed call that returned ``result`` (or return if none)."""
    conn._raise_ssl_error(conn._ssl, result)


def context_handle(ctx: SSL.Context) -> Any:
    """The ``SSL_CTX*`` of a context."""
    return ctx._context


def set_groups(ctx: SSL.Context, groups: str) -> bool:
    """Set the key exchange groups (``X25519MLKEM768:X25519:P-256``); False if OpenSSL refused them."""
    public = getattr(ctx, "set_groups", None)
    if public is not None:  # a later pyOpenSSL may have it
        try:
            public(groups.encode("ascii"))
        except SSL.Error:
            return False
        return True
    return bool(lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode("ascii")) == 1)

"""Which headers go to the app and back: plain functions over header lists.

Names are lower case on the way in (the server protocols lower them).  The
proxy frames both messages itself, so framing headers from either side are
dropped here and written from our own parse.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from tlsproxy.http.wire import is_field_block, split_fields
from tlsproxy.speedups import speedups

Headers = list[tuple[bytes, bytes]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
    }
)
# What gunicorn and Django read to learn scheme, client and host.
FORWARDING = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-protocol",
        b"x-forwarded-ssl",
        b"x-forwarded-scheme",
        b"x-url-scheme",
        b"x-real-ip",
        b"front-end-https",
        b"forwarded",
    }
)
# Never removable through a client's Connection header.
PROTECTED = frozenset({b"host", b"content-type", b"cookie", b"authorization"}) | FORWARDING


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """The header names a Connection header lists (lower case)."""
    values = [value for name, value in headers if name == b"connection"]
    if not values:
        return set()
    tokens = {t.strip().lower() for value in values for t in value.split(b",")}
    tokens.discard(b"")
    return tokens


def is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    if not trusted:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def upstream_request_headers(
    headers: Headers,
    client_address: str,
    host: bytes,
    scheme: bytes,
    server_port: int,
    trusted: bool,
) -> Headers:
    """The client's headers as the app should see them, without framing."""
    named = connection_tokens(headers) - PROTECTED
    out: Headers = []
    prior_for: list[bytes] = []
    kept_forwarding: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in HOP_BY_HOP or name in named:
            continue
        if b"_" in name:
            # X_Forwarded_Proto reaches Django as HTTP_X_FORWARDED_PROTO too,
            # and Transfer_Encoding or Content_Length can be taken for framing.
            dashed = name.replace(b"_", b"-")
            if dashed in FORWARDING or dashed in HOP_BY_HOP:
                continue
        if name in FORWARDING:
            if trusted:
                if name == b"x-forwarded-for":
                    prior_for.append(value)
                else:
                    kept_forwarding.setdefault(name, value)
            continue
        out.append((name, value))
    client = client_address.encode("ascii", "replace")
    out.append((b"x-forwarded-for", b", ".join([*prior_for, client]) if prior_for else client))
    out.append((b"x-forwarded-proto", kept_forwarding.get(b"x-forwarded-proto", scheme)))
    out.append((b"x-forwarded-host", kept_forwarding.get(b"x-forwarded-host", host)))
    out.append((b"x-forwarded-port", kept_forwarding.get(b"x-forwarded-port", b"%d" % server_port)))
    return out


def response_headers(
    headers: Headers,
    hsts: bytes | None,
    secure_cookies: bool,
    keep_upgrade: bool = False,
) -> Headers:
    """The app's response headers as the client should see them."""
    named = connection_tokens(headers)
    out: Headers = []
    has_hsts = False
    for name, value in headers:
        if name in HOP_BY_HOP or name in named:
            if keep_upgrade and name in (b"upgrade", b"connection"):
                out.append((name, value))
            continue
        if name == b"strict-transport-security":
            has_hsts = True
        elif name == b"set-cookie" and secure_cookies and not cookie_is_secure(value):
            value = value + b"; Secure"
        out.append((name, value))
    if hsts is not None and not has_hsts:
        out.append((b"strict-transport-security", hsts))
    return out


def cookie_is_secure(value: bytes) -> bool:
    for attribute in value.split(b";")[1:]:
        if attribute.strip().lower() == b"secure":
            return True
    return False


def serialize_request(method: bytes, target: bytes, host: bytes, headers: Headers, framing: bytes | None) -> bytes:
    """An HTTP/1.1 request head; ``framing`` is our own Content-Length or chunked line."""
    parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
    for name, value in headers:
        if name == b"host":
            continue
        parts += [name, b": ", value, b"\r\n"]
    if framing:
        parts += [framing, b"\r\n"]
    parts.append(b"\r\n")
    return b"".join(parts)


def serialize_fields(headers: Headers) -> bytes:
    """Field lines, each ending in CRLF (the block between a start line and the blank line)."""
    return b"".join([name + b": " + value + b"\r\n" for name, value in headers])


# -- the byte-level entry points the relay calls ------------------------------
#
# Each is the list-based rules above, from bytes to bytes; tlsproxy._speedups
# holds a C version of each that gives the same result for every input (the
# tests compare them), used unless TLSPROXY_PURE_PYTHON=1 turns it off.


def upstream_request_head(
    method: bytes,
    target: bytes,
    host: bytes,
    headers: Headers,
    client_address: str,
    scheme: bytes,
    server_port: int,
    trusted: bool,
    upgrade: bytes,
    framing: bytes | None,
) -> bytes:
    """The request head to send to the app: our forwarding headers, our framing."""
    out = upstream_request_headers(headers, client_address, host, scheme, server_port, trusted)
    if upgrade:
        out += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
    return serialize_request(method, target, host, out, framing)


def response_block(block: bytes, hsts: bytes | None, secure_cookies: bool, keep_upgrade: bool = False) -> bytes:
    """The app's field lines (as :func:`tlsproxy.http.wire.parse_response_head` gave them) for the client.

    A block that is not wholly field lines is refused (ValueError), as the C
    version refuses it, rather than passed on without the lines that failed.
    """
    if not is_field_block(block):
        raise ValueError("response_block: the block is not field lines")
    return serialize_fields(response_headers(split_fields(block), hsts, secure_cookies, keep_upgrade))


# The pure versions stay reachable under these names (the tests compare).
py_upstream_request_head = upstream_request_head
py_response_block = response_block
if speedups is not None:
    upstream_request_head = speedups.upstream_request_head  # type: ignore[assignment]
    response_block = speedups.response_block  # type: ignore[assignment]

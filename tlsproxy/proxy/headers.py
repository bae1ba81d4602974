"""Which headers go to the app and back: plain functions over header lists.

Names are lower case on the way in (the server protocols lower them).  The
proxy frames both messages itself, so framing headers from either side are
dropped here and written from our own parse.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

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


# What to do with a request header, by name: drop it (hop-by-hop), or treat
# it as a forwarding header.  Any other name passes, unless the client's
# Connection header lists it.
_DROP = 1
_FORWARDING = 2
_REQUEST_RULES = {name: _DROP for name in HOP_BY_HOP} | {name: _FORWARDING for name in FORWARDING}


def upstream_request_headers(
    headers: Headers,
    client_address: str,
    host: bytes,
    scheme: bytes,
    server_port: int,
    trusted: bool,
) -> Headers:
    """The client's headers as the app should see them, without framing."""
    rules = _REQUEST_RULES
    out: Headers = []
    prior_for: list[bytes] = []
    kept_forwarding: dict[bytes, bytes] = {}
    for name, value in headers:
        rule = rules.get(name)
        if rule is None:
            if b"_" in name and name.replace(b"_", b"-") in FORWARDING:
                # X_Forwarded_Proto reaches Django as HTTP_X_FORWARDED_PROTO too.
                continue
            out.append((name, value))
        elif rule == _FORWARDING:
            if trusted:
                if name == b"x-forwarded-for":
                    prior_for.append(value)
                else:
                    kept_forwarding.setdefault(name, value)
        elif name == b"connection" and _names_others(value):
            return _upstream_request_headers_named(
                headers,
                client_address=client_address,
                host=host,
                scheme=scheme,
                server_port=server_port,
                trusted=trusted,
            )
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
    out: Headers = []
    has_hsts = False
    for name, value in headers:
        if name in HOP_BY_HOP:
            if name == b"connection" and _names_others(value):
                return _response_headers_named(
                    headers, hsts=hsts, secure_cookies=secure_cookies, keep_upgrade=keep_upgrade
                )
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


def _names_others(connection: bytes) -> bool:
    """Whether a Connection value lists anything beyond the hop-by-hop names.

    Most Connection headers say only ``keep-alive`` or ``upgrade``, names
    that are dropped anyway; any other name (``close`` too, in case a header
    is called that) needs the general rules.
    """
    for token in connection.split(b","):
        token = token.strip().lower()
        if token and token not in HOP_BY_HOP:
            return True
    return False


def _upstream_request_headers_named(
    headers: Headers,
    *,
    client_address: str,
    host: bytes,
    scheme: bytes,
    server_port: int,
    trusted: bool,
) -> Headers:
    """:func:`upstream_request_headers` when Connection names other headers."""
    named = connection_tokens(headers) - PROTECTED
    out: Headers = []
    prior_for: list[bytes] = []
    kept_forwarding: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in HOP_BY_HOP or name in named:
            continue
        if b"_" in name:
            # X_Forwarded_Proto reaches Django as HTTP_X_FORWARDED_PROTO too.
            if name.replace(b"_", b"-") in FORWARDING:
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


def _response_headers_named(
    headers: Headers,
    *,
    hsts: bytes | None,
    secure_cookies: bool,
    keep_upgrade: bool = False,
) -> Headers:
    """:func:`response_headers` when Connection names other headers."""
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

"""Read the first bytes of a connection before OpenSSL does.

Two decisions need them: a client that speaks plain HTTP to the HTTPS port
deserves a page saying so rather than a silent close, and the session a
ClientHello offers (its server name, a TLS 1.2 ticket or TLS 1.3 PSK
identities) decides which context the connection starts on, before OpenSSL
looks the session up.  A pure parser over bytes: it never raises on what a
client sends; anything it does not understand is left to OpenSSL.
"""

from __future__ import annotations

from dataclasses import dataclass

# Enough for any ClientHello a browser sends (post-quantum ones are ~1.8 KB).
MAX_HELLO = 1 << 16
# Plain HTTP: the head is read up to this before the 400 goes out.
MAX_PLAIN_HEAD = 8192

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_SESSION_TICKET = 35
_EXT_PRE_SHARED_KEY = 41


@dataclass(frozen=True)
class ClientHello:
    """What a ClientHello says about where it wants to go and what it resumes."""

    server_name: bytes | None = None
    tickets: tuple[bytes, ...] = ()  # a TLS 1.2 session ticket and/or TLS 1.3 PSK identities


class PlainHTTP:
    """The connection started with an HTTP request line, not a TLS record."""


class NotParsed:
    """Not a ClientHello this parser reads: OpenSSL will say what is wrong."""


PLAIN_HTTP = PlainHTTP()
NOT_PARSED = NotParsed()

Sniffed = ClientHello | PlainHTTP | NotParsed | None  # None: more bytes needed


def sniff(data: bytes) -> Sniffed:
    """What the first bytes of a connection are, or None until there are enough."""
    if not data:
        return None
    first = data[0]
    if 0x41 <= first <= 0x5A:  # "A"-"Z": no TLS record starts so
        if b"\r\n\r\n" in data or b"\n\n" in data or len(data) >= MAX_PLAIN_HEAD:
            return PLAIN_HTTP
        return None
    if first != _HANDSHAKE:
        return NOT_PARSED
    message = bytearray()
    at = 0
    while True:
        if len(data) < at + 5:
            return None if len(data) < MAX_HELLO else NOT_PARSED
        if data[at] != _HANDSHAKE:
            return NOT_PARSED
        length = int.from_bytes(data[at + 3 : at + 5], "big")
        if len(data) < at + 5 + length:
            return None if len(data) < MAX_HELLO else NOT_PARSED
        message += data[at + 5 : at + 5 + length]
        at += 5 + length
        if len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                return NOT_PARSED
            wanted = 4 + int.from_bytes(message[1:4], "big")
            if len(message) >= wanted:
                return _parse_hello(bytes(message[4:wanted]))
            if wanted > MAX_HELLO:
                return NOT_PARSED


def _parse_hello(body: bytes) -> ClientHello | NotParsed:
    """The fields we use of a ClientHello body; offsets checked against its length (one pass, no copies)."""
    end = len(body)
    at = 2 + 32  # legacy version, random
    if at >= end:
        return NOT_PARSED
    at += 1 + body[at]  # session id
    if at + 2 > end:
        return NOT_PARSED
    at += 2 + (body[at] << 8 | body[at + 1])  # cipher suites
    if at >= end:
        return NOT_PARSED
    at += 1 + body[at]  # compression methods
    if at == end:
        return ClientHello()
    if at + 2 > end:
        return NOT_PARSED
    stop = at + 2 + (body[at] << 8 | body[at + 1])
    if stop > end:
        return NOT_PARSED
    at += 2
    server_name: bytes | None = None
    tickets: list[bytes] = []
    while at < stop:
        if at + 4 > stop:
            return NOT_PARSED
        kind = body[at] << 8 | body[at + 1]
        size = body[at + 2] << 8 | body[at + 3]
        at += 4
        if at + size > stop:
            return NOT_PARSED
        if kind == _EXT_SERVER_NAME:
            server_name = _server_name(body[at : at + size])
        elif kind == _EXT_SESSION_TICKET and size:
            tickets.append(body[at : at + size])
        elif kind == _EXT_PRE_SHARED_KEY:
            identities = _psk_identities(body[at : at + size])
            if identities is None:
                return NOT_PARSED
            tickets += identities
        at += size
    return ClientHello(server_name, tuple(tickets))


def _server_name(data: bytes) -> bytes | None:
    """The host_name of a server_name extension (RFC 6066 3), if well formed."""
    if len(data) < 5 or data[2] != 0:
        return None
    size = data[3] << 8 | data[4]
    return data[5 : 5 + size] if 5 + size <= len(data) else None


def _psk_identities(data: bytes) -> list[bytes] | None:
    """The identities of a pre_shared_key extension (RFC 8446 4.2.11); None if malformed."""
    if len(data) < 2:
        return None
    stop = 2 + (data[0] << 8 | data[1])
    if stop > len(data):
        return None
    at = 2
    out = []
    while at < stop:
        if at + 2 > stop:
            return None
        size = data[at] << 8 | data[at + 1]
        at += 2
        if at + size + 4 > stop:
            return None
        out.append(data[at : at + size])
        at += size + 4  # and the obfuscated ticket age
    return out

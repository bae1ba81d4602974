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


class _Short(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise _Short
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, n: int) -> bytes:
        return self.take(self.number(n))

    @property
    def left(self) -> int:
        return len(self.data) - self.at


def _parse_hello(body: bytes) -> ClientHello | NotParsed:
    try:
        hello = _Reader(body)
        hello.take(2 + 32)  # legacy version, random
        hello.vector(1)  # session id
        hello.vector(2)  # cipher suites
        hello.vector(1)  # compression methods
        if not hello.left:
            return ClientHello()
        extensions = _Reader(hello.vector(2))
        server_name: bytes | None = None
        tickets: list[bytes] = []
        while extensions.left:
            kind = extensions.number(2)
            data = _Reader(extensions.vector(2))
            if kind == _EXT_SERVER_NAME:
                names = _Reader(data.vector(2))
                while names.left:
                    name_type = names.number(1)
                    name = names.vector(2)
                    if name_type == 0 and server_name is None:
                        server_name = name
            elif kind == _EXT_SESSION_TICKET and data.left:
                tickets.append(data.data)
            elif kind == _EXT_PRE_SHARED_KEY:
                identities = _Reader(data.vector(2))
                while identities.left:
                    tickets.append(identities.vector(2))
                    identities.take(4)  # obfuscated ticket age
        return ClientHello(server_name, tuple(tickets))
    except _Short:
        return NOT_PARSED

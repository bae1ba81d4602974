"""PROXY protocol v1 and v2 on a listener (``haproxy:tcp:443``), from trusted peers only.

A load balancer in front says who the client is in a header before the
first byte of the client's own stream (before the TLS ClientHello).  Twisted
has ``HAProxyWrappingFactory``, but it believes every peer and raises on bad
input (a traceback in the log for every scanner); it also keeps a wrapper
in the read path for the life of the connection.  Here:

- :func:`parse_header` is a pure parser over bytes (v1 text line, v2 binary
  with its TLVs), bounded: a header longer than :data:`MAX_V1` /
  :data:`MAX_V2_PAYLOAD` is refused, not buffered.  It is property-tested.
- :class:`ProxyHeaderFactory` wraps the listener's factory.  A trusted peer
  must send a header within a deadline; an untrusted peer that starts with
  one is refused; an untrusted peer that sends none is served as a direct
  client, under its own address.  Refusals close the connection at once and
  log one line at debug level, never a traceback.
- Once the header is read, the real TCP transport talks to the protocol
  above directly; the protocol above sees a :class:`ProxiedTransport`
  whose ``getPeer`` / ``getHost`` are the header's addresses, so the
  client address reaches X-Forwarded-For, the logs and the allow-lists.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tlsproxy.deadline import Deadline

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V1 = 107  # the longest v1 line the specification allows, CRLF included
MAX_V2_PAYLOAD = 4096  # addresses plus TLVs; load balancers send a few hundred bytes at most
_V2_ADDRESS_SIZES = {0x1: 12, 0x2: 36, 0x3: 216}  # INET, INET6, UNIX
HAPROXY_PREFIX = "haproxy:"
WARN_EVERY = 60.0

log = Logger(namespace="tlsproxy.proxyprotocol")


class ProxyHeaderError(Exception):
    """A PROXY header that cannot be used; ``reason`` says why (for a debug line)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ProxyHeader:
    """What a PROXY header says.

    ``local``: the balancer's own connection (v2 LOCAL, its health checks),
    which speaks for itself.  Otherwise ``source`` None means a client the
    balancer could not name (v1 UNKNOWN, v2 without an IP family): it is
    served as "unknown", never under the balancer's trusted address.
    """

    version: int
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    local: bool = False


@dataclass(frozen=True)
class UnknownClient:
    """The peer of a proxied connection whose client the balancer could not name."""

    host: str = "unknown"
    port: int = 0


def split_description(description: str) -> tuple[bool, str]:
    """(True, inner endpoint) for ``haproxy:tcp:443``; (False, description) otherwise."""
    if description.startswith(HAPROXY_PREFIX):
        return True, description[len(HAPROXY_PREFIX) :]
    return False, description


def header_kind(data: bytes) -> int | None:
    """1 or 2 if ``data`` starts with a PROXY signature, 0 if it cannot, None if too short to tell."""
    for version, signature in ((1, V1_SIGNATURE), (2, V2_SIGNATURE)):
        n = min(len(data), len(signature))
        if data[:n] == signature[:n]:
            return version if n == len(signature) else None
    return 0


def parse_header(data: bytes) -> tuple[ProxyHeader, int] | None:
    """The header at the start of ``data`` and its length, or None until more bytes arrive.

    Raises :class:`ProxyHeaderError` for anything that is not a well-formed
    header (including a stream that does not start with one).
    """
    kind = header_kind(data)
    if kind is None:
        return None
    if kind == 1:
        return _parse_v1(data)
    if kind == 2:
        return _parse_v2(data)
    raise ProxyHeaderError("no PROXY protocol header")


def _address(text: bytes, version: int) -> str:
    try:
        value = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"not an IPv{version} address: {text[:64]!r}") from None
    if value.version != version:
        raise ProxyHeaderError(f"not an IPv{version} address: {text[:64]!r}")
    mapped = getattr(value, "ipv4_mapped", None)
    return str(mapped) if mapped is not None else str(value)  # as v2's addresses (see _v6)


def _port(text: bytes) -> int:
    if not (1 <= len(text) <= 5 and text.isdigit()) or (len(text) > 1 and text[:1] == b"0"):
        raise ProxyHeaderError(f"not a port: {text[:16]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"not a port: {text!r}")
    return port


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\r\n", 0, MAX_V1)
    if end < 0:
        if len(data) >= MAX_V1:
            raise ProxyHeaderError(f"a v1 header ends within {MAX_V1} bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyHeaderError("a v1 header ends with CRLF")
        return None
    line = data[:end]
    parts = line.split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyHeader(version=1), end + 2  # the rest of the line is to be ignored (the spec says)
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("a v1 header is PROXY TCP4|TCP6 SRC DST SPORT DPORT, or PROXY UNKNOWN")
    version = 4 if parts[1] == b"TCP4" else 6
    source = (_address(parts[2], version), _port(parts[4]))
    destination = (_address(parts[3], version), _port(parts[5]))
    return ProxyHeader(version=1, source=source, destination=destination), end + 2


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if len(data) < 16:
        return None
    version_command, family_protocol, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"v2 signature with version {version_command >> 4}")
    command = version_command & 0xF
    if command not in (0, 1):
        raise ProxyHeaderError(f"v2 command {command} (0 LOCAL or 1 PROXY)")
    if length > MAX_V2_PAYLOAD:
        raise ProxyHeaderError(f"v2 payload of {length} bytes (at most {MAX_V2_PAYLOAD})")
    if len(data) < 16 + length:
        return None
    payload = data[16 : 16 + length]
    family, protocol = family_protocol >> 4, family_protocol & 0xF
    if family not in (0, *_V2_ADDRESS_SIZES) or protocol not in (0, 1, 2):
        raise ProxyHeaderError(f"v2 address family {family}, protocol {protocol}")
    size = _V2_ADDRESS_SIZES.get(family, 0)
    if length < size:
        raise ProxyHeaderError(f"v2 payload of {length} bytes is too short for its addresses ({size})")
    tlvs = _tlvs(payload[size:])
    if command == 0:
        # LOCAL: the balancer's own connection (a health check); its own addresses stand.
        return ProxyHeader(version=2, tlvs=tlvs, local=True), 16 + length
    if family in (0, 3):
        return ProxyHeader(version=2, tlvs=tlvs), 16 + length  # a client without an IP address
    if protocol != 1:
        raise ProxyHeaderError("v2 PROXY of a datagram or unspecified protocol on a stream listener")
    if family == 1:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", payload)
        source = (str(ipaddress.IPv4Address(src)), sport)
        destination = (str(ipaddress.IPv4Address(dst)), dport)
    else:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", payload)
        source = (_v6(src), sport)
        destination = (_v6(dst), dport)
    return ProxyHeader(version=2, source=source, destination=destination, tlvs=tlvs), 16 + length


def _v6(packed: bytes) -> str:
    address = ipaddress.IPv6Address(packed)
    mapped = address.ipv4_mapped
    return str(mapped) if mapped is not None else str(address)


def _tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    out = []
    at = 0
    while at < len(data):
        if len(data) - at < 3:
            raise ProxyHeaderError("v2 TLV cut short")
        kind, size = struct.unpack_from("!BH", data, at)
        at += 3
        if len(data) - at < size:
            raise ProxyHeaderError("v2 TLV longer than the header")
        out.append((kind, data[at : at + size]))
        at += size
    return tuple(out)


def is_trusted_peer(host: str, trusted: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return any(address in net for net in trusted)


def _twisted_address(host: str, port: int) -> IPv4Address | IPv6Address:
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


class ProxiedTransport:
    """The TCP transport, as the protocol above sees it: with the header's addresses.

    The commonest calls (write, writeSequence) are the real transport's own
    bound methods, not a hop through this object; everything else is passed
    on by ``__getattr__``.
    """

    def __init__(self, transport: Any, peer: Any, host: Any) -> None:
        self.transport = transport
        self._peer = peer
        self._host = host
        self.write = transport.write
        self.writeSequence = transport.writeSequence

    def getPeer(self) -> Any:
        return self._peer

    def getHost(self) -> Any:
        return self._host

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class ProxyHeaderProtocol(Protocol):
    """Reads (or checks the absence of) the PROXY header, then steps out of the way."""

    transport: Any
    _buffer = b""
    _done = False
    _above: Any = None  # the protocol above, once handed over

    def __init__(self, factory: ProxyHeaderFactory, address: Any) -> None:
        self.factory = factory
        self.address = address
        self.trusted = is_trusted_peer(getattr(address, "host", ""), factory.trusted)
        self._timer = Deadline(factory.clock)

    def connectionMade(self) -> None:
        self._timer.set(self.factory.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            if self._above is not None:  # a transport that still calls us (the socket's does not)
                self._above.dataReceived(data)
            return
        data = self._buffer + data
        try:
            if self.trusted:
                parsed = parse_header(data)
                if parsed is None:
                    self._buffer = data
                    return
                header, used = parsed
                self._hand_over(header, data[used:])
                return
            kind = header_kind(data)
            if kind is None:
                self._buffer = data
                return
            if kind:
                raise ProxyHeaderError("a PROXY header from an address not in trusted_proxies")
            self._hand_over(None, data)
        except ProxyHeaderError as e:
            self._refuse(e.reason)

    def _refuse(self, reason: str) -> None:
        self._done = True
        self._timer.stop()
        self._buffer = b""
        self.factory.note_refusal(getattr(self.address, "host", "?"), reason)
        self.transport.abortConnection()

    def _timed_out(self) -> None:
        if not self._done:
            self._refuse("no PROXY header in time" if self.trusted else "nothing sent in time")

    def _hand_over(self, header: ProxyHeader | None, rest: bytes) -> None:
        self._done = True
        self._timer.stop()
        self._buffer = b""
        transport = self.transport
        peer, host = self.address, transport.getHost()
        if header is not None and header.source is not None:
            peer = _twisted_address(*header.source)
            if header.destination is not None:
                host = _twisted_address(*header.destination)
        elif header is not None and not header.local:
            peer = UnknownClient()  # not the balancer's address: that one is trusted
        protocol = self.factory.wrapped.buildProtocol(peer)
        if protocol is None:
            transport.loseConnection()
            return
        # From here on the socket reads straight into the protocol above.
        self._above = transport.protocol = protocol
        protocol.makeConnection(ProxiedTransport(transport, peer, host) if peer is not self.address else transport)
        if rest:
            protocol.dataReceived(rest)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._done = True
        self._timer.stop()


class ProxyHeaderFactory(Factory):
    """Wraps a listener's factory: PROXY headers from ``trusted`` peers, none from the others."""

    def __init__(self, wrapped: Any, trusted: Sequence[Network], clock: IReactorTime, timeout: float = 10.0) -> None:
        self.wrapped = wrapped
        self.trusted = tuple(trusted)
        self.clock = clock
        self.timeout = timeout
        self.refused = 0
        self._unlogged = 0
        self._last_warning: float | None = None

    def note_refusal(self, peer: str, reason: str) -> None:
        """One debug line per refusal; a warning at most every WARN_EVERY seconds (a balancer
        that sends no header, or a missing trusted_proxies range, shows without a flood)."""
        self.refused += 1
        self._unlogged += 1
        log.debug("PROXY protocol: refused {peer}: {reason}", peer=peer, reason=reason)
        now = self.clock.seconds()
        if self._last_warning is not None and now - self._last_warning < WARN_EVERY:
            return
        self._last_warning = now
        log.warn(
            "PROXY protocol: refused {count} connection(s), the last from {peer}: {reason}"
            " (logged at most every {every:g}s; see trusted_proxies)",
            count=self._unlogged,
            peer=peer,
            reason=reason,
            every=WARN_EVERY,
        )
        self._unlogged = 0

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> ProxyHeaderProtocol:
        return ProxyHeaderProtocol(self, addr)

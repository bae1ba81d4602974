"""PROXY protocol v1/v2: the pure parser (property-tested) and the listener wrapper (with fakes)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tlsproxy.proxyprotocol import (
    MAX_V1,
    MAX_V2_PAYLOAD,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderFactory,
    parse_header,
    split_description,
)

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
ports = st.integers(0, 65535)
tlv = st.tuples(st.integers(0, 255), st.binary(max_size=40))


def v1(src: str, dst: str, sport: int, dport: int) -> bytes:
    family = b"TCP6" if ":" in src else b"TCP4"
    return b"PROXY %s %s %s %d %d\r\n" % (family, src.encode(), dst.encode(), sport, dport)


def v2(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    tlvs: list[tuple[int, bytes]] = (),
    command: int = 1,  # type: ignore[assignment]
) -> bytes:
    six = ":" in src
    addresses = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + struct.pack("!HH", sport, dport)
    extra = b"".join(struct.pack("!BH", kind, len(value)) + value for kind, value in tlvs)
    payload = addresses + extra
    return V2_SIGNATURE + bytes([0x20 | command, (0x21 if six else 0x11)]) + struct.pack("!H", len(payload)) + payload


@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), ports, ports, st.binary(max_size=20))
def test_v1_round_trip(addresses: tuple[str, str], sport: int, dport: int, rest: bytes) -> None:
    """A v1 line parses to its addresses and ports, and what follows it is left unread."""
    src, dst = addresses
    raw = v1(src, dst, sport, dport)
    header, used = parse_header(raw + rest)  # type: ignore[misc]
    assert header == ProxyHeader(version=1, source=(src, sport), destination=(dst, dport))
    assert used == len(raw)


@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), ports, ports, st.lists(tlv, max_size=5))
def test_v2_round_trip(addresses: tuple[str, str], sport: int, dport: int, tlvs: list[tuple[int, bytes]]) -> None:
    """A v2 header parses to its addresses, ports and TLVs, and its length is exactly its own."""
    src, dst = addresses
    raw = v2(src, dst, sport, dport, tlvs)
    header, used = parse_header(raw + b"\x16\x03\x01")  # type: ignore[misc]
    assert header == ProxyHeader(version=2, source=(src, sport), destination=(dst, dport), tlvs=tuple(tlvs))
    assert used == len(raw)


@given(st.one_of(st.tuples(ipv4, ipv4).map(lambda a: v1(*a, 1, 2)), st.tuples(ipv6, ipv6).map(lambda a: v2(*a, 1, 2))))
def test_every_prefix_waits(raw: bytes) -> None:
    """A header cut anywhere asks for more bytes rather than failing (reads come in pieces)."""
    for n in range(len(raw)):
        assert parse_header(raw[:n]) is None


@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_more_or_a_clean_error(data: bytes) -> None:
    """Random input never raises anything but ProxyHeaderError (no traceback reaches the log)."""
    try:
        parse_header(data)
    except ProxyHeaderError as e:
        assert e.reason


@given(st.binary(max_size=200))
def test_garbage_after_a_v2_signature_is_refused_or_bounded(tail: bytes) -> None:
    """Behind a v2 signature, random bytes give a header, a clean error, or a bounded wait."""
    try:
        result = parse_header(V2_SIGNATURE + tail)
    except ProxyHeaderError:
        return
    if result is None:
        assert len(tail) < 4 + MAX_V2_PAYLOAD


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "TCP4|TCP6"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "IPv4"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "IPv4"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "IPv6"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF"),
        (b"PROXY " + b"1" * MAX_V1, "within"),
        (b"GET / HTTP/1.1\r\n", "no PROXY"),
        (b"\x16\x03\x01\x00", "no PROXY"),
        (V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12, "version 1"),
        (V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12, "command 2"),
        (V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4, "too short"),
        (V2_SIGNATURE + b"\x21\x41\x00\x00", "family 4"),
        (V2_SIGNATURE + b"\x21\x12\x00\x0c" + b"\x00" * 12, "datagram"),
        (V2_SIGNATURE + b"\x21\x11\x00\x0e" + b"\x00" * 12 + b"\x01\x00", "TLV cut"),
        (V2_SIGNATURE + b"\x21\x11\x00\x10" + b"\x00" * 12 + b"\x01\x00\x09\x00", "TLV longer"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "at most"),
    ],
)
def test_malformed_headers_are_refused_with_a_reason(data: bytes, why: str) -> None:
    """Each kind of bad header is refused at once, with a reason that says what was wrong."""
    with pytest.raises(ProxyHeaderError, match=why):
        parse_header(data)


def test_unknown_and_local_carry_no_client_address() -> None:
    """v1 UNKNOWN and v2 LOCAL (a balancer's health check) carry no client address."""
    assert parse_header(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nGET") == (ProxyHeader(version=1), 35)
    local = v2("10.0.0.1", "10.0.0.2", 1, 2, command=0)
    assert parse_header(local) == (ProxyHeader(version=2, local=True), len(local))


def test_local_is_the_balancer_unknown_is_nobody_trusted() -> None:
    """A LOCAL connection is the balancer's own; an UNKNOWN client never gets the balancer's trusted address."""
    proto, transport, inner, _ = connect("10.1.2.3")
    proto.dataReceived(v2("10.0.0.1", "10.0.0.2", 1, 2, command=0) + b"GET")
    assert inner.built[-1].transport.getPeer().host == "10.1.2.3"
    proto, transport, inner, _ = connect("10.1.2.3")
    proto.dataReceived(b"PROXY UNKNOWN\r\nGET")
    assert inner.built[-1].transport.getPeer().host == "unknown"
    unix = V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", 216) + b"\x00" * 216
    proto, transport, inner, _ = connect("10.1.2.3")
    proto.dataReceived(unix)
    assert inner.built[-1].transport.getPeer().host == "unknown"


def test_v4_mapped_v6_is_the_v4_address() -> None:
    """An IPv4 client carried in an IPv6 header is logged and allow-listed as IPv4."""
    header, _ = parse_header(v2("::ffff:192.0.2.7", "::1", 5, 443))  # type: ignore[misc]
    assert header.source == ("192.0.2.7", 5)


def test_v4_mapped_v6_in_a_v1_line_is_the_v4_address() -> None:
    """HAProxy on a dual-stack bind sends TCP6 ::ffff:a.b.c.d in v1 too: the client is a.b.c.d, as in v2."""
    header, _ = parse_header(b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:10.0.0.1 5 443\r\n")  # type: ignore[misc]
    assert (header.source, header.destination) == (("192.0.2.7", 5), ("10.0.0.1", 443))


def test_split_description() -> None:
    """haproxy: is our prefix; the rest is the endpoint to listen on."""
    assert split_description("haproxy:tcp:443") == (True, "tcp:443")
    assert split_description("tcp:443") == (False, "tcp:443")


# -- the wrapper -------------------------------------------------------------


class Recorder(Protocol):
    def __init__(self, addr: object) -> None:
        self.addr = addr
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


class RecordingFactory(Factory):
    def __init__(self) -> None:
        self.built: list[Recorder] = []

    def buildProtocol(self, addr: object) -> Recorder:
        proto = Recorder(addr)
        self.built.append(proto)
        return proto


def connect(
    peer: str, trusted: tuple[str, ...] = ("10.0.0.0/8",)
) -> tuple[object, StringTransport, RecordingFactory, Clock]:
    clock = Clock()
    inner = RecordingFactory()
    factory = ProxyHeaderFactory(inner, [ipaddress.ip_network(n) for n in trusted], clock, timeout=5.0)
    addr = IPv4Address("TCP", peer, 40000)
    proto = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "10.9.9.9", 8443))
    transport.protocol = proto  # as tcp.Server holds it
    proto.makeConnection(transport)
    return proto, transport, inner, clock


def test_trusted_peer_header_becomes_the_client_address() -> None:
    """From a trusted balancer, the header's source is the peer the protocol above sees; bytes after it pass on."""
    proto, transport, inner, _ = connect("10.1.2.3")
    proto.dataReceived(b"PROXY TCP4 203.0.113.9 198.51.100.1 5555 443\r\n\x16\x03")
    (above,) = inner.built
    assert above.data == b"\x16\x03"
    assert above.transport.getPeer() == IPv4Address("TCP", "203.0.113.9", 5555)
    assert above.transport.getHost() == IPv4Address("TCP", "198.51.100.1", 443)
    assert above.addr == IPv4Address("TCP", "203.0.113.9", 5555)
    assert transport.protocol is above  # later reads skip the wrapper
    above.transport.write(b"hello")
    assert transport.value() == b"hello"


def test_header_in_pieces() -> None:
    """A v2 header split across reads is put together before the protocol above starts."""
    _, transport, inner, _ = connect("10.1.2.3")
    raw = v2("2001:db8::5", "2001:db8::1", 7, 443) + b"GET"
    for byte in raw:
        transport.protocol.dataReceived(bytes([byte]))
    (above,) = inner.built
    assert above.transport.getPeer().host == "2001:db8::5"
    assert above.data == b"GET"


def test_trusted_peer_without_header_is_refused() -> None:
    """A trusted balancer that sends no header is refused: its own address would pass as the client."""
    proto, transport, inner, _ = connect("10.1.2.3")
    proto.dataReceived(b"GET / HTTP/1.1\r\n")
    assert transport.disconnecting and inner.built == []


def test_untrusted_peer_with_header_is_refused() -> None:
    """An address outside trusted_proxies cannot choose its own client address."""
    proto, transport, inner, _ = connect("192.0.2.50")
    proto.dataReceived(b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n")
    assert transport.disconnecting and inner.built == []
    proto, transport, inner, _ = connect("192.0.2.50")
    proto.dataReceived(V2_SIGNATURE[:5])
    assert not transport.disconnecting
    proto.dataReceived(V2_SIGNATURE[5:])
    assert transport.disconnecting and inner.built == []


def test_untrusted_peer_without_header_is_a_direct_client() -> None:
    """A direct client on a haproxy: listener is served under its own address, at its first byte."""
    proto, transport, inner, _ = connect("192.0.2.50")
    proto.dataReceived(b"\x16\x03\x01")
    (above,) = inner.built
    assert above.transport is transport
    assert above.transport.getPeer().host == "192.0.2.50"
    assert above.data == b"\x16\x03\x01"


def test_malformed_header_is_refused_fast() -> None:
    """A bad header closes the connection at once, without waiting for the deadline."""
    proto, transport, inner, _ = connect("10.1.2.3")
    proto.dataReceived(b"PROXY TCP4 999.1.1.1 1.1.1.1 1 2\r\n")
    assert transport.disconnecting and inner.built == []


def test_silent_peer_times_out() -> None:
    """A trusted peer that sends nothing (or half a header) is cut off at the deadline."""
    proto, transport, inner, clock = connect("10.1.2.3")
    proto.dataReceived(b"PROXY TCP4 1.2")
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting and inner.built == []


def test_refusals_warn_at_most_once_a_minute() -> None:
    """Refusals are counted; a warning names the last one, at most once per WARN_EVERY seconds."""
    from twisted.logger import globalLogPublisher

    from tlsproxy.proxyprotocol import WARN_EVERY

    warnings: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "tlsproxy.proxyprotocol" and event["log_level"].name == "warn":
            warnings.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        clock = Clock()
        factory = ProxyHeaderFactory(RecordingFactory(), [], clock)
        for _ in range(5):
            factory.note_refusal("192.0.2.1", "no PROXY header in time")
        clock.advance(WARN_EVERY)
        factory.note_refusal("192.0.2.2", "a v1 header ends with CRLF")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert factory.refused == 6
    assert [(w["count"], w["peer"]) for w in warnings] == [(1, "192.0.2.1"), (5, "192.0.2.2")]

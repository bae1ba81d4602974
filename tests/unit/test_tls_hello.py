"""The ClientHello read ahead of OpenSSL: plain HTTP, server names, offered tickets, split records."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from tests.tlsutil import client_context
from tlsproxy.tls.hello import NOT_PARSED, PLAIN_HTTP, ClientHello, sniff


def client_hello(name: str | None = "a.test", **kw: object) -> bytes:
    """The bytes of a real OpenSSL ClientHello."""
    client = SSL.Connection(client_context(**kw), None)  # type: ignore[arg-type]
    client.set_connect_state()
    if name is not None:
        client.set_tlsext_host_name(name.encode())
    try:
        client.do_handshake()
    except SSL.WantReadError:
        pass
    return client.bio_read(1 << 17)


def split_records(hello: bytes, size: int) -> bytes:
    """The same ClientHello carried in handshake records of at most ``size`` bytes each."""
    body = hello[5:]
    out = b""
    for at in range(0, len(body), size):
        part = body[at : at + size]
        out += hello[:3] + len(part).to_bytes(2, "big") + part
    return out


class SniffTests(SynchronousTestCase):
    def test_server_name_of_a_real_hello(self) -> None:
        """A real ClientHello gives its server name and no ticket on a first connection."""
        self.assertEqual(sniff(client_hello("www.a.test")), ClientHello(b"www.a.test", ()))
        self.assertEqual(sniff(client_hello(None)), ClientHello(None, ()))

    def test_partial_hello_waits(self) -> None:
        """Every proper prefix of a ClientHello asks for more bytes."""
        hello = client_hello()
        for cut in (1, 4, 5, 40, len(hello) - 1):
            self.assertIsNone(sniff(hello[:cut]), cut)

    def test_hello_over_several_records(self) -> None:
        """A ClientHello split over records (legal, rare) is put back together."""
        hello = client_hello("b.test")
        self.assertEqual(sniff(split_records(hello, 100)), ClientHello(b"b.test", ()))

    def test_plain_http(self) -> None:
        """An HTTP request head is told apart from TLS once it is whole; a bare method waits."""
        self.assertIsNone(sniff(b"GET / HTTP/1.1\r\nHost: a"))
        self.assertIs(sniff(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"), PLAIN_HTTP)
        self.assertIs(sniff(b"POST /" + b"x" * 9000), PLAIN_HTTP)

    def test_other_bytes_left_to_openssl(self) -> None:
        """SSLv2 hellos, alerts and garbage are not ours to judge."""
        self.assertIs(sniff(b"\x80\x2e\x01\x03\x01"), NOT_PARSED)
        self.assertIs(sniff(b"\x15\x03\x03\x00\x02\x02\x28"), NOT_PARSED)
        self.assertIs(sniff(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"), NOT_PARSED)  # a ServerHello

    @given(st.binary(max_size=300))
    def test_never_raises(self, data: bytes) -> None:
        """Whatever a client sends, sniff answers without raising."""
        sniff(b"\x16" + data)
        sniff(b"\x16\x03\x01" + len(data).to_bytes(2, "big") + b"\x01" + data)

"""The C accelerator gives what the pure Python functions give, for any input.

The Python versions are the specification; each C function is compared with
its Python version on generated heads and on the same heads with bytes
inserted, removed or repeated, so that the rare paths (every error, every
odd spelling) are exercised as well as the common one.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tlsproxy.http import wire
from tlsproxy.proxy import headers
from tlsproxy.speedups import speedups

pytestmark = pytest.mark.skipif(speedups is None, reason="tlsproxy._speedups is not built (or turned off)")

# TLSPROXY_FUZZ_EXAMPLES raises the count for a longer hunt (CI runs the default).
SETTINGS = settings(
    max_examples=int(os.environ.get("TLSPROXY_FUZZ_EXAMPLES", "1500")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Bytes that matter to the grammar, and names that matter to the rules.
_SPECIAL_BYTES = b'\r\n \t:,;"\\/*@?#\x00\x0b\x7f\x80\xff_-=Aa0'
_NAMES = [
    b"Host",
    b"host",
    b"Content-Length",
    b"content-length",
    b"Transfer-Encoding",
    b"Connection",
    b"Upgrade",
    b"Keep-Alive",
    b"TE",
    b"Set-Cookie",
    b"Strict-Transport-Security",
    b"X-Forwarded-For",
    b"X_Forwarded_Proto",
    b"Transfer_Encoding",
    b"content_length",
    b"x-forwarded-host",
    b"X-Forwarded-Port",
    b"Forwarded",
    b"X-Real-IP",
    b"Cookie",
    b"Authorization",
    b"Content-Type",
    b"Expect",
    b"Accept",
    b"X-Thing",
    b"x-forwarded-ssl",
]
_VALUES = [
    b"",
    b"a",
    b"example.com",
    b"Example.COM:8443",
    b"5",
    b"+5",
    b"05",
    b"5, 5",
    b"5,6",
    b"12345678901234567890",
    b"chunked",
    b"Chunked",
    b"gzip, chunked",
    b"close",
    b"keep-alive",
    b"Upgrade",
    b"upgrade, x-thing",
    b"keep-alive, X-Forwarded-For, host, te",
    b"websocket",
    b"WebSocket",
    b"h2c",
    b"a.test.",
    b"a.test.:8443",
    b"a=1; Path=/",
    b"b=2; Secure",
    b"c=3; secure=1",
    b"max-age=5",
    b"198.51.100.1",
    b"  padded\t ",
    b"caf\xc3\xa9",
    b"a/b@c",
]

_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_FIELD_BYTES = bytes(range(0x20, 0x7F)) + b"\t\x80\xc3\xa9\xff"


def _from(alphabet: bytes, min_size: int, max_size: int) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map(bytes)


# Mostly well-formed fields, so that the rules past the grammar get their
# share; the mutations below and the odd value take care of the grammar.
name = st.one_of(st.sampled_from(_NAMES), st.sampled_from(_NAMES), _from(_TOKEN_BYTES, 1, 6))
value = st.one_of(st.sampled_from(_VALUES), st.sampled_from(_VALUES), _from(_FIELD_BYTES, 0, 10), st.binary(max_size=4))
# Mostly a few fields; now and then up to 300, past every count limit and
# past the C side's small-block fast paths.
fields = st.one_of(
    st.lists(st.tuples(name, value), max_size=8),
    st.lists(st.tuples(name, value), max_size=8),
    st.lists(st.tuples(name, value), min_size=9, max_size=300),
)
# Hosts as clients write them: names, IPv4, IPv6 literals, with or without a port.
host = st.one_of(
    st.sampled_from([b"example.com", b"a.test.", b"127.0.0.1", b"[::1]", b"[2001:db8::1]", b"xn--bcher-kva.test"]),
    _from(_TOKEN_BYTES + b"[]:", 0, 12),
)
port = st.one_of(st.none(), st.integers(0, 70000).map(lambda n: b"%d" % n), _from(b"0123456789:x", 0, 6))


def _block(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(n + b": " + v + b"\r\n" for n, v in pairs)


@st.composite
def mutated(draw: Any, head: bytes) -> bytes:
    """``head`` with a few bytes inserted, deleted or repeated."""
    data = bytearray(head)
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["insert", "delete", "repeat"]))
        if op == "insert":
            data[at:at] = bytes([draw(st.sampled_from(_SPECIAL_BYTES))])
        elif op == "delete":
            del data[at]
        else:
            end = draw(st.integers(at, min(len(data), at + 12)))
            data[at:at] = data[at:end]
    return bytes(data)


@st.composite
def request_heads(draw: Any) -> bytes:
    method = draw(
        st.one_of(
            st.sampled_from([b"GET", b"GET", b"POST", b"HEAD", b"OPTIONS", b"CONNECT", b"get", b"PUT"]),
            _from(_TOKEN_BYTES, 1, 10),
        )
    )
    target = draw(
        st.one_of(
            st.sampled_from(
                [b"/", b"/", b"/a?b=1", b"*", b"http://other.test/x", b"https://h:1", b"ftp://x/", b"http:///x", b"x"]
            ),
            _from(_FIELD_BYTES, 1, 20).map(lambda path: b"/" + path),
        )
    )
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.0", b"2.0", b"0.9"]))
    pairs = draw(fields)
    if draw(st.booleans()):
        where = draw(host)
        at = draw(port)
        pairs.insert(draw(st.integers(0, len(pairs))), (b"Host", where if at is None else where + b":" + at))
    head = method + b" " + target + b" HTTP/" + version + b"\r\n" + _block(pairs)
    if draw(st.integers(0, 3)) == 0:
        head = draw(mutated(head))
    return head


@st.composite
def response_heads(draw: Any) -> bytes:
    status = draw(
        st.sampled_from([b"200 OK", b"200 OK", b"204 No Content", b"101 Switching", b"304", b"502 ", b"20 x"])
    )
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0", b"1.2"]))
    head = b"HTTP/" + version + b" " + status + b"\r\n" + _block(draw(fields))
    if draw(st.integers(0, 3)) == 0:
        head = draw(mutated(head))
    return head


def outcome(fn: Any, *args: Any) -> Any:
    """What a call gives: its result, or the error it raised (as comparable values)."""
    try:
        return ("ok", fn(*args))
    except wire.RequestError as e:
        return ("RequestError", e.status, e.detail)
    except wire.ResponseError as e:
        return ("ResponseError", str(e))


@SETTINGS
@given(request_heads(), st.integers(0, 10))
@example(b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n", 100)
@example(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n", 100)
@example(b"GET http://h/ HTTP/1.1\r\nHost: ignored\r\nhost: twice\r\n", 100)
@example(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n", 100)
@example(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 100)
@example(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n", 100)
@example(b"GET / HTTP/1.1\r\nHost: a b\r\n", 100)
@example(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n", 100)
@example(b"GET /ws HTTP/1.0\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n", 100)
@example(b"POST /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 5\r\n", 100)
@example(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: ws\r\nContent-Length: 0\r\n", 100)
@example(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n", 100)
@example(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n", 100)
@example(b"GET / HTTP/1.0\r\nConnection: \r\nConnection: Keep-Alive\r\n", 100)
@example(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n", 100)
def test_parse_request_head_same(head: bytes, max_count: int) -> None:
    """The C request parser accepts, rejects and reports exactly as the Python one."""
    assert outcome(speedups.parse_request_head, head, max_count) == outcome(wire.py_parse_request_head, head, max_count)


@SETTINGS
@given(response_heads())
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5, 5\r\n")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n")
@example(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nTransfer-Encoding: gzip\r\n")
@example(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n")
@example(b"HTTP/1.1 200\r\n")
def test_parse_response_head_same(head: bytes) -> None:
    """The C response parser accepts, rejects and reports exactly as the Python one."""
    assert outcome(speedups.parse_response_head, head) == outcome(wire.py_parse_response_head, head)


@SETTINGS
@given(response_heads(), st.one_of(st.none(), st.just(b"max-age=60")), st.booleans(), st.booleans())
@example(b"HTTP/1.1 200 OK\r\nA b\r\n", None, False, False)
@example(b"HTTP/1.1 200 OK\r\nX: 1\r\n\r\n", None, True, False)
def test_response_block_same(head: bytes, hsts: bytes | None, secure_cookies: bool, keep_upgrade: bool) -> None:
    """The response header policy gives the same bytes in C as in Python, and refuses the same malformed blocks."""
    try:
        block = wire.py_parse_response_head(head)[2]
    except wire.ResponseError:
        block = head.split(b"\r\n", 1)[-1]  # malformed: the policy must refuse it the same way

    def run(fn: Any) -> Any:
        try:
            return ("ok", fn(block, hsts, secure_cookies, keep_upgrade))
        except ValueError as e:
            return ("ValueError", str(e))

    assert run(speedups.response_block) == run(headers.py_response_block)


lower_name = st.one_of(st.sampled_from([n.lower() for n in _NAMES]), st.binary(min_size=1, max_size=6))


@SETTINGS
@example([(b"connection", b"\n"), (b"\n", b"")], "203.0.113.9", False, b"", None)  # .strip() takes \n too
@given(
    st.lists(st.tuples(lower_name, value), max_size=10),
    st.sampled_from(["203.0.113.9", "2001:db8::1", "unix", "caf\u00e9"]),
    st.booleans(),
    st.sampled_from([b"", b"websocket"]),
    st.sampled_from([None, b"", b"content-length: 5", b"transfer-encoding: chunked"]),
)
def test_upstream_request_head_same(
    pairs: list[tuple[bytes, bytes]], client: str, trusted: bool, upgrade: bytes, framing: bytes | None
) -> None:
    """The request the app gets is byte for byte the same from C and from Python."""
    args = (b"POST", b"/p?q", b"example.com", pairs, client, b"https", 8443, trusted, upgrade, framing)
    assert speedups.upstream_request_head(*args) == headers.py_upstream_request_head(*args)


def test_wrong_types_are_refused() -> None:
    """Bad arguments raise TypeError rather than being read as something else."""
    with pytest.raises(TypeError):
        speedups.parse_request_head("GET / HTTP/1.1\r\n", 10)
    with pytest.raises(TypeError):
        speedups.upstream_request_head(b"GET", b"/", b"h", [(b"a", "b")], "1.2.3.4", b"https", 443, False, b"", None)
    with pytest.raises(ValueError):
        speedups.response_block(b"not a field line", None, False)


def test_in_use() -> None:
    """With the accelerator built, the hot path calls the C versions."""
    assert wire.parse_request_head is speedups.parse_request_head
    assert headers.response_block is speedups.response_block


def test_heads_of_another_shape_are_made_by_calling_the_class() -> None:
    """RequestHead is filled in directly only while it is the slotted dataclass; otherwise it is called."""
    from dataclasses import dataclass

    from tlsproxy.http.exchange import RequestHead

    @dataclass
    class Other:
        method: bytes
        target: bytes
        version: bytes
        host: bytes
        headers: list[tuple[bytes, bytes]]
        content_length: int | None
        chunked: bool
        upgrade: bytes

    try:
        assert speedups.configure(Other, wire.RequestError, wire.ResponseError) is False
        head, keep_alive = speedups.parse_request_head(b"GET /o HTTP/1.1\r\nHost: h\r\n", 10)
        assert isinstance(head, Other)
        assert (head.target, head.host, keep_alive) == (b"/o", b"h", True)
    finally:
        assert speedups.configure(RequestHead, wire.RequestError, wire.ResponseError) is True

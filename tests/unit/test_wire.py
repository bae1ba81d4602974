"""HTTP/1.1 framing on the wire: heads, limits and the three body decoders."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsproxy.http import wire
from tlsproxy.http.wire import (
    ChunkedBody,
    FramingError,
    LengthBody,
    RequestError,
    ResponseError,
    UntilClose,
    check_head_limits,
    py_parse_request_head,
    py_parse_response_head,
    split_host_port,
)


def decode(body: Any, reads: list[bytes]) -> tuple[bytes, bytes]:
    """Feed ``reads`` to a decoder: (what it decoded, what it left for the next message)."""
    out: list[bytes] = []
    rest = b""
    for data in reads:
        if body.done:
            rest += data
            continue
        used = body.feed(data, out)
        rest += data[used:]
    return b"".join(out), rest


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return [p for p in pieces if p]


extension = st.sampled_from([b"", b";a", b"; a=b", b' ;name="q \\" d"', b";x=1;y"])


@given(
    st.lists(st.binary(min_size=1, max_size=40), max_size=6),
    st.lists(extension, min_size=7, max_size=7),
    st.booleans(),
    st.lists(st.integers(0, 10_000), max_size=8),
)
def test_chunked_round_trip(chunks: list[bytes], exts: list[bytes], trailer: bool, cuts: list[int]) -> None:
    """Any chunked body, cut into reads anywhere, decodes to its data, and what follows is left alone."""
    encoded = b"".join(b"%x%s\r\n%s\r\n" % (len(c), exts[i], c) for i, c in enumerate(chunks))
    encoded += b"0" + exts[-1] + b"\r\n" + (b"X-Trailer: yes\r\n" if trailer else b"") + b"\r\n"
    following = b"GET /next HTTP/1.1\r\n"
    body = ChunkedBody()
    data, rest = decode(body, split(encoded + following, cuts))
    assert body.done
    assert data == b"".join(chunks)
    assert rest == following


@pytest.mark.parametrize(
    "encoded",
    [
        b"5\nhello\r\n0\r\n\r\n",  # bare LF after the size
        b"5\r\nhello\n0\r\n\r\n",  # bare LF after the data
        b"5\r\nhelloX\r\n0\r\n\r\n",  # data longer than its size
        b"0x5\r\nhello\r\n0\r\n\r\n",  # not hex digits only
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"1000000000000000\r\n",  # 16 hex digits: over the limit
        b"5;\r\nhello\r\n0\r\n\r\n",  # an empty extension name
        b"\r\n",  # no size at all
        b"0\r\nBad Trailer\r\n\r\n",
        b"0\r\n" + b"X: " + b"v" * 40000 + b"\r\n\r\n",  # oversized trailer
    ],
)
def test_chunked_malformed(encoded: bytes) -> None:
    """Malformed chunked framing is refused, wherever the reads fall."""
    for size in (1, 3, len(encoded)):
        with pytest.raises(FramingError):
            decode(ChunkedBody(), [encoded[i : i + size] for i in range(0, len(encoded), size)])


def test_chunk_line_limit() -> None:
    """A chunk-size line that never ends is cut off at the line limit."""
    body = ChunkedBody(max_line=100)
    with pytest.raises(FramingError):
        decode(body, [b"5" + b" " * 200])


def test_length_body_leaves_the_rest() -> None:
    """A Content-Length body takes exactly its bytes."""
    body = LengthBody(5)
    data, rest = decode(body, [b"hel", b"loGET"])
    assert (data, rest, body.done) == (b"hello", b"GET", True)


def test_until_close_takes_everything() -> None:
    """A close-delimited body takes every byte and is never done by itself."""
    body = UntilClose()
    assert decode(body, [b"a", b"b"]) == (b"ab", b"")
    assert not body.done


def parse(head: bytes) -> Any:
    return py_parse_request_head(head, 100)


def test_request_head_fields() -> None:
    """Names are lowered, values lose the whitespace around them, the host is lowered."""
    head, keep_alive = parse(b"GET /a HTTP/1.1\r\nHost: Example.COM\r\nX-Thing: \t yes it is \t\r\n")
    assert head.headers == [(b"host", b"Example.COM"), (b"x-thing", b"yes it is")]
    assert (head.host, head.version, keep_alive) == (b"example.com", b"1.1", True)


@pytest.mark.parametrize(
    ("head", "keep_alive", "upgrade"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n", True, b""),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n", False, b""),
        (b"GET / HTTP/1.0\r\n", False, b""),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n", True, b""),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n", False, b"websocket"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n", True, b""),  # Connection does not name it
        (b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n", False, b""),
        # With a body, the request is served as it is.
        (b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 3\r\n", True, b""),
        # Only WebSocket is tunnelled: any other protocol is a plain request, kept alive.
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n", True, b""),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket, h2c\r\n", True, b""),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: WebSocket\r\n", False, b"WebSocket"),
    ],
)
def test_keep_alive_and_upgrade(head: bytes, keep_alive: bool, upgrade: bytes) -> None:
    """Keep-alive and upgrade follow the version and the Connection header."""
    parsed, alive = parse(head)
    assert (alive, parsed.upgrade) == (keep_alive, upgrade)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : a\r\n", 400),  # space before the colon
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: \x00\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1_0\r\n", 400),  # int() would take it
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n", 501),
        (b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"GET * HTTP/1.1\r\nHost: a\r\n", 400),
        (b"GET ftp://a/ HTTP/1.1\r\nHost: a\r\n", 400),
        (b"GET / HTTP/1.2\r\nHost: a\r\n", 505),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n", 405),
    ],
)
def test_request_head_refusals(head: bytes, status: int) -> None:
    """Each smuggling shape or unsupported form gets its status."""
    with pytest.raises(RequestError) as caught:
        parse(head)
    assert caught.value.status == status


def test_absolute_form_and_asterisk() -> None:
    """Absolute form gives origin form and its authority as Host; * is for OPTIONS."""
    head, _ = parse(b"GET http://other.test HTTP/1.1\r\nHost: ignored\r\n")
    assert (head.target, head.host, head.headers) == (b"/", b"other.test", [(b"host", b"other.test")])
    assert parse(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n")[0].target == b"*"


def test_head_limits() -> None:
    """Request line over its limit: 414; a header line or the head over theirs: 431."""
    with pytest.raises(RequestError) as line:
        check_head_limits(b"GET /" + b"a" * 100, False, 50, 1000, 1000)
    assert line.value.status == 414
    with pytest.raises(RequestError) as field:
        check_head_limits(b"GET / HTTP/1.1\r\nX: " + b"v" * 100, False, 50, 60, 1000)
    assert field.value.status == 431
    check_head_limits(b"GET / HTTP/1.1\r\nX: short\r\n", True, 50, 60, 1000)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", (200, b"OK", 5, False, True)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n", (200, b"OK", 5, False, True)),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n", (200, b"OK", None, True, True)),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n", (200, b"OK", None, False, True)),  # until close
        (b"HTTP/1.0 200 OK\r\n", (200, b"OK", None, False, False)),
        (b"HTTP/1.1 204\r\nConnection: close\r\n", (204, b"", None, False, False)),
    ],
)
def test_response_heads(head: bytes, expected: tuple[Any, ...]) -> None:
    """The framing of an app's response is read from its head."""
    status, reason, _fields, length, chunked, keep_alive = py_parse_response_head(head)
    assert (status, reason, length, chunked, keep_alive) == expected


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\nY: b\r\n",
        b"HTTP/2 200\r\n",
    ],
)
def test_response_heads_refused(head: bytes) -> None:
    """An ambiguous or malformed response head is not relayed."""
    with pytest.raises(ResponseError):
        py_parse_response_head(head)


def test_split_fields_of_a_block() -> None:
    """A block of field lines splits into lower-case names and trimmed values."""
    assert wire.split_fields(b"A: 1\r\nB-C:two \r\n") == [(b"a", b"1"), (b"b-c", b"two")]


def test_split_host_port() -> None:
    """Host headers split into name and port, IPv6 included."""
    assert split_host_port(b"Example.com:80") == ("example.com", 80)
    assert split_host_port(b"[::1]:8080") == ("::1", 8080)
    assert split_host_port(b"example.com") == ("example.com", None)
    assert split_host_port(b"Example.com.") == ("example.com", None)
    assert split_host_port(b"example.com.:8443") == ("example.com", 8443)
    assert split_host_port(b"example.com..") == ("example.com.", None)

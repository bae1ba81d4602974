"""The C HPACK decoder gives what hpack's Decoder gives, for any input, valid or not.

hpack's Decoder (pure Python) is the specification and the fallback; the C
one (tlsproxy._speedups.HpackDecoder) must return the same fields, leave the
same dynamic table, and raise the same hpack exception class, on RFC 7541's
examples, on blocks hpack's own encoder makes, and on blocks mangled or made
up byte by byte.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hpack import (
    Decoder,
    Encoder,
    HPACKDecodingError,
    InvalidTableIndex,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tlsproxy.http import h2
from tlsproxy.speedups import speedups

pytestmark = pytest.mark.skipif(speedups is None, reason="tlsproxy._speedups is not built (or turned off)")

SETTINGS = settings(
    max_examples=int(os.environ.get("TLSPROXY_FUZZ_EXAMPLES", "1000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def c_decoder(max_header_list_size: int = 65536) -> Any:
    assert speedups is not None
    return speedups.HpackDecoder(max_header_list_size)


def outcome(decoder: Any, block: bytes) -> tuple[str, Any]:
    """What decoding ``block`` gave: the fields as plain tuples, or the exception's class."""
    try:
        return "fields", [tuple(field) for field in decoder.decode(block, raw=True)]
    except (HPACKDecodingError, OversizedHeaderListError) as e:
        return "error", type(e)


def table(decoder: Any) -> tuple[int, list[tuple[bytes, bytes]]]:
    """The dynamic table's size limit and entries, newest first."""
    if isinstance(decoder, Decoder):
        return decoder.header_table_size, [tuple(e) for e in decoder.header_table.dynamic_entries]
    return decoder.header_table_size, decoder.dynamic_entries


def same_on(blocks: list[bytes], max_list: int = 65536, table_size: int | None = None) -> list[tuple[str, Any]]:
    """Decode ``blocks`` in order with both decoders, checking they agree block by block; the outcomes."""
    py, c = Decoder(max_list), c_decoder(max_list)
    if table_size is not None:
        py.header_table_size = c.header_table_size = table_size
    outcomes = []
    for block in blocks:
        expected = outcome(py, block)
        assert outcome(c, block) == expected, block.hex()
        outcomes.append(expected)
        if expected[0] == "error":
            break  # the connection ends here: what the table holds no longer matters
        assert table(c) == table(py)
    return outcomes


# RFC 7541 Appendix C.3 (requests, no Huffman) and C.4 (the same with Huffman).
C3 = [
    "828684410f7777772e6578616d706c652e636f6d",
    "828684be58086e6f2d6361636865",
    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
]
C4 = [
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be5886a8eb10649cbf",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
]
REQUESTS = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")],
    [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/"),
        (b":authority", b"www.example.com"),
        (b"cache-control", b"no-cache"),
    ],
    [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":path", b"/index.html"),
        (b":authority", b"www.example.com"),
        (b"custom-key", b"custom-value"),
    ],
]
# C.5: responses through a 256-byte table, so that entries are evicted.
C5 = [
    "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d546e"
    "1768747470733a2f2f7777772e6578616d706c652e636f6d",
    "4803333037c1c0bf",
    "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69707738666f6f3d"
    "4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d333630303b2076657273696f6e3d31",
]


def test_rfc7541_request_examples() -> None:
    """C.3 and C.4 decode to the RFC's fields, with the RFC's table after each, in both decoders."""
    for vectors in (C3, C4):
        c = c_decoder()
        for block, expected in zip(vectors, REQUESTS, strict=True):
            assert c.decode(bytes.fromhex(block)) == expected
        assert c.dynamic_entries == [
            (b"custom-key", b"custom-value"),
            (b"cache-control", b"no-cache"),
            (b":authority", b"www.example.com"),
        ]
        assert same_on([bytes.fromhex(b) for b in vectors]) == [("fields", f) for f in REQUESTS]


def test_rfc7541_response_examples_evict() -> None:
    """C.5 through a 256-byte table: the RFC's fields, and the oldest entries evicted as it says."""
    c = c_decoder()
    c.header_table_size = 256
    fields = [c.decode(bytes.fromhex(block)) for block in C5]
    date = b"Mon, 21 Oct 2013 20:13:22 GMT"
    cookie = b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
    assert fields[1] == [
        (b":status", b"307"),
        (b"cache-control", b"private"),
        (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"),
        (b"location", b"https://www.example.com"),
    ]
    assert fields[2][-2:] == [(b"content-encoding", b"gzip"), (b"set-cookie", cookie)]
    assert c.dynamic_entries == [(b"set-cookie", cookie), (b"content-encoding", b"gzip"), (b"date", date)]
    same_on([bytes.fromhex(b) for b in C5], table_size=256)


headers_st = st.lists(
    st.tuples(
        st.sampled_from([b":path", b"cookie", b"user-agent", b"x-a", b"accept", b"authorization"])
        | st.binary(min_size=1, max_size=20),
        st.sampled_from([b"", b"/", b"gzip, deflate"]) | st.binary(max_size=300),
    ),
    max_size=12,
)


@SETTINGS
@given(
    st.lists(
        st.tuples(headers_st, st.booleans(), st.none() | st.integers(0, 5000), st.booleans()), min_size=1, max_size=8
    ),
    st.integers(100, 70000),
)
def test_round_trips_agree(blocks: list[tuple[Any, bool, int | None, bool]], max_list: int) -> None:
    """Blocks from hpack's encoder (table resizes, evictions, Huffman or not, never-indexed) decode alike."""
    encoder = Encoder()
    encoded = []
    for fields, huffman, resize, sensitive in blocks:
        if resize is not None:
            encoder.header_table_size = resize
        encoded.append(encoder.encode([(n, v, sensitive) for n, v in fields], huffman=huffman))
    outcomes = same_on(encoded, max_list=max_list)
    for (fields, *_), (kind, got) in zip(blocks, outcomes, strict=False):
        if kind == "fields":
            assert got == fields


@SETTINGS
@given(st.binary(max_size=64), st.integers(0, 300), st.sampled_from([0, 100, 4096]))
@example(b"\x80", 100, 4096)  # index 0
@example(b"\xff\x80\x80\x80\x80\x01", 100, 4096)  # the longest integer hpack reads
@example(b"\xff\x80\x80\x80\x80\x80\x01", 100, 4096)  # one continuation byte too many
@example(b"\x82\x3f\xe1\x1f", 100, 4096)  # a size update after a field
@example(b"\x3f\xe2\x1f", 100, 4096)  # a size update past the allowed 4096
@example(b"\x00\x81\xff\x00", 100, 4096)  # Huffman padding of 8 bits
@example(b"\x00\x84\xff\xff\xff\xff\x00", 100, 4096)  # EOS in a Huffman string
@example(b"\x00\x01a\x01b", 0, 4096)  # one field over a zero list limit
def test_random_blocks_agree(block: bytes, max_list: int, table_size: int) -> None:
    """Made-up bytes give the same fields, or the same hpack error, in both decoders."""
    same_on([block], max_list=max_list, table_size=table_size)


@SETTINGS
@given(headers_st, st.data())
def test_mangled_blocks_agree(fields: list[tuple[bytes, bytes]], data: st.DataObject) -> None:
    """A valid block with bytes changed, cut or inserted still decodes alike (or fails alike)."""
    block = bytearray(Encoder().encode(fields, huffman=data.draw(st.booleans())))
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(block)))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and where < len(block):
            block[where] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "cut":
            del block[where : where + data.draw(st.integers(1, 5))]
        else:
            block[where:where] = data.draw(st.binary(min_size=1, max_size=4))
    same_on([bytes(block)])


@SETTINGS
@given(st.binary(max_size=40))
def test_huffman_strings_agree(coded: bytes) -> None:
    """Any bytes as a Huffman-coded value: the same text, or both refuse (EOS, bad padding)."""
    block = b"\x00\x01a" + bytes([0x80 | len(coded)]) + coded
    same_on([block])


def test_hpack_bomb_is_refused() -> None:
    """One 4 KB table entry referenced again and again stops at max_header_list_size, in both."""
    big = Encoder().encode([(b"x-big", b"v" * 4000)])  # a literal that enters the table
    bomb = big + b"\xbe" * 10_000  # index 62, the entry just added, 10,000 times (40 MB decoded)
    assert same_on([bomb], max_list=65536) == [("error", OversizedHeaderListError)]


def test_table_size_rules() -> None:
    """Past the acknowledged size, or not shrunk to it, the table size is an InvalidTableSizeError."""
    c = c_decoder()
    c.max_allowed_table_size = 100
    with pytest.raises(InvalidTableSizeError):
        c.decode(b"\x82")  # the table is still 4096, over the new 100
    c = c_decoder()
    with pytest.raises(InvalidTableSizeError):
        c.decode(b"\x3f\xe2\x1f")  # 4097
    c = c_decoder()
    with pytest.raises(InvalidTableIndex):
        c.decode(b"\xbe")  # index 62 with an empty dynamic table


def test_protocol_uses_the_c_decoder() -> None:
    """With the accelerator built, the HTTP/2 protocol decodes with it (hpack's Decoder otherwise)."""
    assert type(h2.request_decoder()) is type(c_decoder())


def test_pure_python_falls_back_to_hpack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the accelerator, request_decoder is hpack's own Decoder."""
    monkeypatch.setattr(h2, "speedups", None)
    assert isinstance(h2.request_decoder(), Decoder)

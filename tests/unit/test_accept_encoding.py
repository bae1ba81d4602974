"""Accept-Encoding as RFC 9110 12.5.3 reads it: one parser for compressed answers and static files."""

from __future__ import annotations

import pytest

from tlsproxy.http.accept_encoding import AcceptEncoding, accept_encoding_of, parse_accept_encoding, qvalue

OURS = ("zstd", "br", "gzip")


@pytest.mark.parametrize(
    ("value", "ranked"),
    [
        (b"gzip, deflate, br, zstd", ["zstd", "br", "gzip"]),  # equal q: our order
        (b"gzip;q=0.5, br;q=0.7, zstd;q=0.6", ["br", "zstd", "gzip"]),
        (b"gzip;q=0", []),  # q=0 is a refusal, not a low preference
        (b"gzip;q=0.000, br;q=0.001", ["br"]),
        (b"*", ["zstd", "br", "gzip"]),  # * stands for every coding not named
        (b"*;q=0.5, br", ["br", "zstd", "gzip"]),
        (b"*, gzip;q=0", ["zstd", "br"]),  # a named refusal holds against *
        (b"gzip;q=0, *", ["zstd", "br"]),  # in either order
        (b"*;q=0", []),
        (b"*;q=0, gzip", ["gzip"]),
        (b"GZIP;Q=0.5, Br", ["br", "gzip"]),  # names and the q parameter are case-insensitive
        (b" gzip\t; q=0.5 ,\tbr ", ["br", "gzip"]),  # OWS around everything
        (b" , ;, gzip ; q=1.0 ", ["gzip"]),  # empty members are skipped
        (b"gzip;q=abc, br", ["br"]),  # a q that is no qvalue refuses its coding...
        (b"*, gzip;q=abc", ["zstd", "br"]),  # ... even where * would take it
        (b"gzip;q=2", []),
        (b"gzip;q=1.5", []),
        (b"gzip;q=-1", []),
        (b"gzip;q=1e0", []),
        (b"gzip;q=nan", []),
        (b"gzip;q=", []),
        (b"gzip;q", []),
        (b"gzip;q=1.000", ["gzip"]),
        (b"gzip;q=0.12345", ["gzip"]),  # more decimals than the grammar's three: harmless, taken
        (b"zstd;q=0.9;foo=bar, gzip;q=0.8", ["zstd", "gzip"]),  # other parameters are ignored
        (b"gzip, gzip;q=0", []),  # named twice: the lower q holds (a refusal anywhere wins)
        (b"gzip;q=0, gzip", []),
        (b"br;q=0.3, br;q=0.8", ["br"]),
        (b"x-gzip", ["gzip"]),  # RFC 9110 8.4.1.3: the same coding
        (b"gzip, x-gzip;q=0", []),  # and so the same name twice
        (b"deflate, identity", []),
        (b"", []),
        (None, []),
    ],
)
def test_ranked(value: bytes | None, ranked: list[str]) -> None:
    """Accepted codings come most liked first, ties in the server's order; refused and unknown ones never."""
    assert parse_accept_encoding(value).ranked(OURS) == ranked
    assert parse_accept_encoding(value).preferred(OURS) == (ranked[0] if ranked else None)


@pytest.mark.parametrize(
    ("value", "acceptable"),
    [
        (None, True),
        (b"", True),
        (b"gzip", True),  # identity is acceptable unless refused
        (b"identity;q=0", False),
        (b"Identity;Q=0, gzip", False),
        (b"*;q=0", False),  # * refuses identity too...
        (b"*;q=0, identity", True),  # ... unless identity is named
        (b"*;q=0.5", True),
        (b"identity;q=bad", False),
    ],
)
def test_identity(value: bytes | None, acceptable: bool) -> None:
    """identity is refused only by identity;q=0 or by *;q=0 without an identity entry."""
    assert (parse_accept_encoding(value).weight("identity") > 0) is acceptable


def test_weights() -> None:
    """The parsed value keeps each named coding's q and *'s apart."""
    parsed = parse_accept_encoding(b"gzip;q=0.5, *;q=0.2, x-gzip;q=0.4")
    assert parsed == AcceptEncoding({"gzip": 0.4}, 0.2)
    assert (parsed.weight("gzip"), parsed.weight("zstd")) == (0.4, 0.2)
    assert parse_accept_encoding(b"gzip").star is None


@pytest.mark.parametrize(
    ("text", "q"),
    [("0", 0.0), ("1", 1.0), ("0.8", 0.8), (" 0.25 ", 0.25), ("1.", 1.0), ("0.", 0.0)]
    + [(bad, None) for bad in ("", "-0", "+1", ".5", "1.5", "2", "1e0", "inf", "nan", "0x1", "0_5", "½")],
)
def test_qvalue(text: str, q: float | None) -> None:
    """Only RFC 9110's qvalue grammar (0 to 1, decimal digits) is a q; anything float() would take is not."""
    assert qvalue(text) == q


def test_lines_are_joined() -> None:
    """Several Accept-Encoding lines are one list (RFC 9110 5.3); a request without one has None."""
    headers = [(b"host", b"a"), (b"accept-encoding", b"br"), (b"x", b"y"), (b"accept-encoding", b"br;q=0, gzip")]
    assert accept_encoding_of(headers) == b"br, br;q=0, gzip"
    assert parse_accept_encoding(accept_encoding_of(headers)).ranked(OURS) == ["gzip"]
    assert accept_encoding_of([(b"accept-encoding", b"gzip")]) == b"gzip"
    assert accept_encoding_of([(b"host", b"a")]) is None

"""The header policy: what the app sees and what the client gets back."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from tlsproxy.proxy.headers import (
    FORWARDING,
    cookie_is_secure,
    is_trusted,
    response_headers,
    upstream_request_head,
    upstream_request_headers,
)


def upstream(headers, trusted=False):  # type: ignore[no-untyped-def]
    return upstream_request_headers(
        headers, client_address="203.0.113.9", host=b"example.com", scheme=b"https", server_port=443, trusted=trusted
    )


def test_forwarding_headers_set() -> None:
    """The app learns scheme, client, host and port from the proxy alone."""
    out = dict(upstream([(b"host", b"example.com"), (b"accept", b"*/*")]))
    assert out[b"x-forwarded-proto"] == b"https"
    assert out[b"x-forwarded-for"] == b"203.0.113.9"
    assert out[b"x-forwarded-host"] == b"example.com"
    assert out[b"x-forwarded-port"] == b"443"
    assert out[b"accept"] == b"*/*"


def test_client_forwarding_headers_dropped() -> None:
    """Client-sent forwarding headers, in any spelling, never reach the app."""
    sent = [
        (b"x-forwarded-proto", b"http"),
        (b"x_forwarded_proto", b"http"),
        (b"x-forwarded-for", b"6.6.6.6"),
        (b"x-forwarded-host", b"evil.test"),
        (b"x-forwarded-protocol", b"http"),
        (b"x-forwarded-ssl", b"off"),
        (b"forwarded", b"for=6.6.6.6"),
        (b"x-real-ip", b"6.6.6.6"),
    ]
    out = upstream(sent)
    assert (b"x-forwarded-proto", b"https") in out
    assert b"6.6.6.6" not in b"".join(v for _, v in out)
    assert b"evil.test" not in b"".join(v for _, v in out)
    assert not any(b"_" in name for name, _ in out)
    assert sum(1 for n, _ in out if n == b"x-forwarded-proto") == 1


def test_trusted_peer_forwarding_kept() -> None:
    """A trusted proxy's X-Forwarded-For is extended, not replaced."""
    out = dict(upstream([(b"x-forwarded-for", b"198.51.100.1"), (b"x-forwarded-proto", b"https")], trusted=True))
    assert out[b"x-forwarded-for"] == b"198.51.100.1, 203.0.113.9"


def test_hop_by_hop_and_connection_named_removed() -> None:
    """Hop-by-hop headers and those the Connection header names are removed."""
    out = dict(
        upstream(
            [
                (b"connection", b"keep-alive, x-secret"),
                (b"x-secret", b"1"),
                (b"te", b"trailers"),
                (b"transfer-encoding", b"chunked"),
                (b"content-length", b"5"),
            ]
        )
    )
    assert b"x-secret" not in out and b"te" not in out and b"connection" not in out
    assert b"transfer-encoding" not in out and b"content-length" not in out


def test_underscore_spellings_of_framing_headers_dropped() -> None:
    """Transfer_Encoding, Content_Length and other hop-by-hop names spelt with underscores never reach the app."""
    sent = [
        (b"transfer_encoding", b"chunked"),
        (b"content_length", b"5"),
        (b"Content_length".lower(), b"6"),
        (b"keep_alive", b"1"),
        (b"proxy_connection", b"close"),
        (b"x_custom_thing", b"kept"),
    ]
    out = upstream(sent)
    names = [name for name, _ in out]
    assert b"x_custom_thing" in names
    assert [n for n in names if b"_" in n] == [b"x_custom_thing"]
    head = upstream_request_head(
        b"POST", b"/", b"example.com", sent, "203.0.113.9", b"https", 443, False, b"", b"content-length: 3"
    )
    assert b"transfer_encoding" not in head and b"content_length" not in head
    assert b"x_custom_thing: kept" in head


def test_connection_cannot_strip_forwarding() -> None:
    """A client's Connection header cannot remove the proxy's own headers."""
    out = dict(upstream([(b"connection", b"x-forwarded-proto, x-forwarded-for, host"), (b"host", b"example.com")]))
    assert out[b"x-forwarded-proto"] == b"https"
    assert out[b"x-forwarded-for"] == b"203.0.113.9"
    assert out[b"host"] == b"example.com"


def test_hsts_added_once_and_app_hsts_kept() -> None:
    """HSTS is added when the app set none, and the app's own is kept as is."""
    added = response_headers([(b"content-type", b"text/html")], hsts=b"max-age=60", secure_cookies=False)
    assert added.count((b"strict-transport-security", b"max-age=60")) == 1
    own = response_headers([(b"strict-transport-security", b"max-age=5")], hsts=b"max-age=60", secure_cookies=False)
    assert [v for n, v in own if n == b"strict-transport-security"] == [b"max-age=5"]


def test_secure_cookies() -> None:
    """Set-Cookie gains Secure when it lacks it, and only then."""
    out = response_headers(
        [(b"set-cookie", b"a=1; Path=/"), (b"set-cookie", b"b=2; secure; HttpOnly")], hsts=None, secure_cookies=True
    )
    assert out == [(b"set-cookie", b"a=1; Path=/; Secure"), (b"set-cookie", b"b=2; secure; HttpOnly")]
    assert not cookie_is_secure(b"secure=1")


def test_trusted_ranges() -> None:
    """Only addresses inside a configured range are trusted."""
    nets = (ipaddress.ip_network("10.0.0.0/8"),)
    assert is_trusted("10.1.2.3", nets)
    assert not is_trusted("11.0.0.1", nets)
    assert not is_trusted("10.1.2.3", ())
    assert not is_trusted("unix", nets)


header_names = st.sampled_from(
    [*sorted(FORWARDING), b"x_forwarded_for", b"x_forwarded_proto", b"x-other", b"connection"]
)


@given(st.lists(st.tuples(header_names, st.binary(min_size=0, max_size=20)), max_size=12))
def test_untrusted_forwarding_always_ours(headers: list[tuple[bytes, bytes]]) -> None:
    """Whatever an untrusted client sends, each forwarding header the app gets is exactly ours."""
    out = upstream(headers)
    forwarding = [(n, v) for n, v in out if n in FORWARDING or n.replace(b"_", b"-") in FORWARDING]
    assert sorted(forwarding) == sorted(
        [
            (b"x-forwarded-for", b"203.0.113.9"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"example.com"),
            (b"x-forwarded-port", b"443"),
        ]
    )

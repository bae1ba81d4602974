"""Configuration keys of issue 16 part A: haproxy: listeners, access control, error pages, the access log file."""

from __future__ import annotations

import ipaddress

import pytest

from tlsproxy.config import ConfigError, parse

SITE = {"hosts": ["example.com"], "upstream": "http://127.0.0.1:8000", "tls": "acme"}
ACME = {"agree_tos": True, "email": "ops@example.com"}


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(raw, "site.toml", {})
    return [str(p) for p in info.value.problems]


def test_haproxy_listener_accepted_with_trusted_proxies() -> None:
    """haproxy:tcp:443 (Twisted's own syntax) is a valid listener once trusted_proxies names the balancers."""
    server = {"https": ["haproxy:tcp:443"], "http": ["haproxy:tcp:80"], "trusted_proxies": ["10.0.0.0/8"]}
    cfg = parse({"acme": ACME, "site": [SITE], "server": server}, "site.toml", {})
    assert cfg.server.https == ("haproxy:tcp:443",)
    assert cfg.server.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)


def test_haproxy_listener_needs_trusted_proxies() -> None:
    """Without trusted_proxies every header would be refused: say so at load time."""
    (message,) = problems({"acme": ACME, "site": [SITE], "server": {"https": ["haproxy:tcp:443"]}})
    assert "server.trusted_proxies" in message and "haproxy:tcp:443" in message


@pytest.mark.parametrize("description", ["haproxy:haproxy:tcp:443", "haproxy:unix:/run/x.sock", "haproxy:tcp:http"])
def test_bad_haproxy_listener_named(description: str) -> None:
    """haproxy: goes once, in front of a tcp: or systemd: endpoint with a valid port."""
    server = {"https": [description], "trusted_proxies": ["10.0.0.0/8"]}
    (message,) = problems({"acme": ACME, "site": [SITE], "server": server})
    assert "server.https" in message and description in message

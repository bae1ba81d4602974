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


def test_site_access_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """allow / deny / basic_auth on the site make its "/" rule; [[site.access]] rules inherit unset keys."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("")
    raw_site = {
        **SITE,
        "allow": ["192.0.2.0/24"],
        "deny": ["192.0.2.66"],
        "basic_auth": {"realm": "staging", "htpasswd": str(htpasswd)},
        "access": [
            {"prefix": "/hooks/", "basic_auth": False},
            {"prefix": "/admin/", "allow": ["10.0.0.0/8"]},
            {"prefix": "/public/", "allow": [], "deny": [], "basic_auth": False},
        ],
    }
    (site,) = parse({"acme": ACME, "site": [raw_site]}, "site.toml", {}).sites
    by_prefix = {rule.prefix: rule for rule in site.access}
    assert [rule.prefix for rule in site.access][-1] == "/"
    assert by_prefix["/"].basic_auth is not None and by_prefix["/"].basic_auth.realm == "staging"
    assert by_prefix["/hooks/"].basic_auth is None and by_prefix["/hooks/"].allow == by_prefix["/"].allow
    assert by_prefix["/admin/"].allow == (ipaddress.ip_network("10.0.0.0/8"),)
    assert by_prefix["/admin/"].deny == (ipaddress.ip_network("192.0.2.66/32"),)
    assert by_prefix["/admin/"].basic_auth == by_prefix["/"].basic_auth
    assert not by_prefix["/public/"].restricts


def test_site_without_rules_has_none() -> None:
    """No access keys: no rules, so the request path costs nothing."""
    (site,) = parse({"acme": ACME, "site": [SITE]}, "site.toml", {}).sites
    assert site.access == ()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"allow": ["300.1.1.1/8"]}, "site[0].allow"),
        ({"basic_auth": {"realm": "x"}}, "site[0].basic_auth.htpasswd"),
        ({"basic_auth": {"realm": "x", "htpasswd": "/no/such/file"}}, "tlsproxy passwd"),
        ({"basic_auth": {"realm": 'a"b', "htpasswd": "/etc/hostname"}}, "site[0].basic_auth.realm"),
        ({"basic_auth": "yes"}, "site[0].basic_auth"),
        ({"access": [{"prefix": "admin", "allow": []}]}, "site[0].access[0].prefix"),
        ({"access": [{"prefix": "/a/", "color": 1}]}, "site[0].access[0].color"),
        ({"error_pages": {"404": "/etc/hostname"}}, "site[0].error_pages.404"),
        ({"error_pages": {"502": "/no/such.html"}}, "no such file"),
        ({"maintenance_file": "relative.on"}, "site[0].maintenance_file"),
    ],
)
def test_bad_access_and_page_keys_named(extra: dict, needle: str) -> None:
    """Each bad access or error-page key is named with what was expected."""
    found = problems({"acme": ACME, "site": [{**SITE, **extra}]})
    assert any(needle in message for message in found), found


def test_error_pages_and_maintenance(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """[site.error_pages] maps 502/503/504 to files; maintenance_file is an absolute path."""
    page = tmp_path / "502.html"
    page.write_text("<h1>down</h1>")
    raw_site = {**SITE, "error_pages": {"502": str(page)}, "maintenance_file": "/srv/maintenance.on"}
    (site,) = parse({"acme": ACME, "site": [raw_site]}, "site.toml", {}).sites
    assert site.error_pages == ((502, str(page)),)
    assert site.maintenance_file == "/srv/maintenance.on"


def test_access_log_file_key() -> None:
    """[server] access_log_file is a path string, "" by default."""
    cfg = parse({"acme": ACME, "site": [SITE], "server": {"access_log_file": "/var/log/a.log"}}, "s.toml", {})
    assert cfg.server.access_log_file == "/var/log/a.log"
    assert parse({"acme": ACME, "site": [SITE]}, "s.toml", {}).server.access_log_file == ""


def test_pass_authorization_is_off_and_inherited(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """pass_authorization is false unless set; a site's value is its rules' default, a rule's own wins."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("")
    auth = {"realm": "staging", "htpasswd": str(htpasswd)}
    (site,) = parse({"acme": ACME, "site": [{**SITE, "basic_auth": auth}]}, "site.toml", {}).sites
    assert site.access[0].pass_authorization is False
    raw_site = {
        **SITE,
        "basic_auth": auth,
        "pass_authorization": True,
        "access": [{"prefix": "/admin/", "pass_authorization": False}, {"prefix": "/api/", "allow": []}],
    }
    (site,) = parse({"acme": ACME, "site": [raw_site]}, "site.toml", {}).sites
    by_prefix = {rule.prefix: rule.pass_authorization for rule in site.access}
    assert by_prefix == {"/": True, "/admin/": False, "/api/": True}


def test_auth_fail_limit_keys() -> None:
    """[server] auth_fail_limit (10, 0 turns it off) and auth_fail_window (60 s); bad values are named."""
    server = parse({"acme": ACME, "site": [SITE]}, "s.toml", {}).server
    assert (server.auth_fail_limit, server.auth_fail_window) == (10, 60.0)
    raw = {"acme": ACME, "site": [SITE], "server": {"auth_fail_limit": 0, "auth_fail_window": 300}}
    server = parse(raw, "s.toml", {}).server
    assert (server.auth_fail_limit, server.auth_fail_window) == (0, 300.0)
    found = problems(
        {
            "acme": ACME,
            "site": [{**SITE, "pass_authorization": "yes"}],
            "server": {"auth_fail_limit": -1, "auth_fail_window": 0},
        }
    )
    for needle in ("server.auth_fail_limit", "server.auth_fail_window", "site[0].pass_authorization"):
        assert any(needle in message for message in found), (needle, found)

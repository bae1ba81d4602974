"""Several upstreams per site and route, the balancing and health keys: parsed, defaulted, refused clearly."""

from __future__ import annotations

import pytest

from tlsproxy.config import Balancing, ConfigError, Site, parse, parse_upstream

SITE = {"hosts": ["example.com"], "upstream": "http://127.0.0.1:8000", "tls": "acme"}
ACME = {"agree_tos": True, "email": "ops@example.com"}


def site_of(**keys: object) -> Site:
    return parse({"acme": ACME, "site": [{**SITE, **keys}]}, "site.toml", {}).sites[0]


def problems(**keys: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        site_of(**keys)
    return [str(p) for p in info.value.problems]


def test_one_upstream_string_is_a_list_of_one() -> None:
    """upstream = "URL" still works: upstreams holds it alone, with the default balancing."""
    site = site_of()
    assert [u.url for u in site.upstreams] == ["http://127.0.0.1:8000"]
    assert site.upstream.url == "http://127.0.0.1:8000"
    assert site.balancing == Balancing()
    assert site.balancing.balance == "least_conn"
    upstream = parse_upstream("http://10.0.0.1:80")
    assert not isinstance(upstream, str)
    assert Site(hosts=("a.test",), upstream=upstream).upstreams == (upstream,)


def test_upstream_list_with_balancing_and_health_keys() -> None:
    """A list of upstreams keeps its order; balance, max_fails, fail_timeout and health_* are read."""
    site = site_of(
        upstream=["unix:/run/a.sock", "http://10.0.0.2:8000"],
        balance="round_robin",
        max_fails=3,
        fail_timeout=30,
        health_path="/healthz",
        health_interval=2,
        health_timeout=1.5,
        health_status=["2xx", 418],
    )
    assert [u.url for u in site.upstreams] == ["unix:/run/a.sock", "http://10.0.0.2:8000"]
    assert site.upstream.unix_path == "/run/a.sock"
    assert site.balancing == Balancing(
        balance="round_robin",
        max_fails=3,
        fail_timeout=30.0,
        health_path="/healthz",
        health_interval=2.0,
        health_timeout=1.5,
        health_status=("2xx", "418"),
    )


def test_route_values_may_be_lists() -> None:
    """[site.routes] values are an upstream or a list of them."""
    site = site_of(routes={"/ws/": ["http://127.0.0.1:8001", "http://127.0.0.1:8002"], "/api/": "unix:/run/api.sock"})
    by_prefix = {r.prefix: [u.url for u in r.upstreams] for r in site.routes}
    assert by_prefix == {"/ws/": ["http://127.0.0.1:8001", "http://127.0.0.1:8002"], "/api/": ["unix:/run/api.sock"]}


def test_environment_takes_a_comma_separated_list() -> None:
    """TLSPROXY_UPSTREAM may name several upstreams, comma-separated."""
    environ = {
        "TLSPROXY_HOSTS": "example.com",
        "TLSPROXY_UPSTREAM": "http://127.0.0.1:8001, http://127.0.0.1:8002",
        "TLSPROXY_ACME_AGREE_TOS": "true",
    }
    site = parse({}, "<environment>", environ).sites[0]
    assert [u.url for u in site.upstreams] == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"upstream": []}, "site[0].upstream: expected an upstream like"),
        ({"upstream": ["http://a:1", 5]}, "site[0].upstream: expected an upstream like"),
        ({"upstream": ["http://a:1", "ftp://b"]}, "site[0].upstream: 'ftp://b': expected http://HOST:PORT"),
        ({"upstream": ["http://a:1", "http://a:1"]}, "site[0].upstream: 'http://a:1' is listed twice"),
        ({"balance": "random"}, "site[0].balance: expected one of ['least_conn', 'round_robin'], found 'random'"),
        ({"max_fails": -1}, "site[0].max_fails: expected a whole number of 0 or more"),
        ({"fail_timeout": 0}, "site[0].fail_timeout: expected a number of seconds above 0"),
        ({"health_path": "healthz"}, 'site[0].health_path: expected a path like "/healthz"'),
        ({"health_path": "/sant\u00e9"}, 'site[0].health_path: expected a path like "/healthz"'),
        ({"health_status": ["ok"]}, "site[0].health_status: expected a list like"),
        ({"health_status": [100]}, "site[0].health_status: expected a list like"),
        ({"routes": {"/ws/": []}}, 'site[0].routes."/ws/": expected an upstream like'),
    ],
)
def test_bad_values_are_named(keys: dict, expected: str) -> None:
    """Each bad upstream list or balancing key is reported with its place and what was expected."""
    found = problems(**keys)
    assert any(p.startswith("site.toml: " + expected) for p in found), found


def test_missing_upstream_is_still_named() -> None:
    """A site without upstream is told what to write."""
    raw = {"acme": ACME, "site": [{"hosts": ["example.com"], "tls": "acme"}]}
    with pytest.raises(ConfigError) as info:
        parse(raw, "site.toml", {})
    assert "site.toml: site[0].upstream: missing (http://HOST:PORT or unix:/PATH)" in [
        str(p) for p in info.value.problems
    ]


def test_check_describes_the_upstreams_and_their_balancing() -> None:
    """`tlsproxy check` prints every upstream, the balancing, the health check and a route's list."""
    from tlsproxy.cli import describe

    raw = {
        **SITE,
        "upstream": ["unix:/run/a.sock", "http://10.0.0.2:8000"],
        "health_path": "/healthz",
        "routes": {"/ws/": ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]},
    }
    text = describe(parse({"acme": ACME, "site": [raw]}, "site.toml", {}))
    assert "  upstream = unix:/run/a.sock, http://10.0.0.2:8000\n" in text
    assert "  balance = least_conn, out after 1 failed connects for 10s\n" in text
    assert "  health check: GET /healthz every 5s, 2xx/3xx within 2s\n" in text
    assert "  route /ws/ = http://127.0.0.1:8001, http://127.0.0.1:8002" in text

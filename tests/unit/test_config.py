"""Configuration: every problem named with its place, key and reason; env overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from tlsproxy import config
from tlsproxy.config import ConfigError, load, parse

SITE = {"hosts": ["example.com"], "upstream": "http://127.0.0.1:8000", "tls": "acme"}
ACME = {"agree_tos": True, "email": "ops@example.com"}


def problems(raw: dict, environ: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(raw, "site.toml", environ or {})
    return [str(p) for p in info.value.problems]


def test_minimal_site_defaults() -> None:
    """One site and agreed terms is a whole config; the rest takes documented defaults."""
    cfg = parse({"acme": ACME, "site": [SITE]}, "site.toml", {})
    assert cfg.server.https == ("tcp:443",)
    assert cfg.server.http == ("tcp:80",)
    assert cfg.tls.min_version == "1.2"
    assert cfg.tls.alpn == ("h2", "http/1.1")
    assert cfg.sites[0].name == "example.com"
    assert cfg.sites[0].hsts.header_value() == b"max-age=63072000"
    assert cfg.acme.directory_url.startswith("https://acme-v02.api.letsencrypt.org/")


def test_unknown_key_named() -> None:
    """An unknown key is reported with the file, the section and the known keys."""
    (message,) = problems({"acme": ACME, "site": [SITE], "server": {"htps": ["tcp:443"]}})
    assert message.startswith("site.toml: server.htps: unknown key")
    assert "https" in message


def test_tls_10_refused() -> None:
    """min_version 1.0 is refused at load."""
    (message,) = problems({"acme": ACME, "site": [SITE], "tls": {"min_version": "1.0"}})
    assert "tls.min_version" in message and "'1.0'" in message


def test_cipher_string_selecting_nothing() -> None:
    """A cipher string that selects no cipher is an error naming the string."""
    (message,) = problems({"acme": ACME, "site": [SITE], "tls": {"ciphers": "NOPE-NOTHING"}})
    assert "tls.ciphers" in message and "NOPE-NOTHING" in message


def test_missing_cert_file(tmp_path: Path) -> None:
    """tls = files with a missing file names the path."""
    site = {**SITE, "tls": "files", "cert": str(tmp_path / "nope.pem"), "key": str(tmp_path / "nokey.pem")}
    found = problems({"site": [site]})
    assert any("site[0].cert: no such file" in m and "nope.pem" in m for m in found)
    assert any("site[0].key: no such file" in m for m in found)


def test_mismatched_key_and_cert(tmp_path: Path) -> None:
    """A key that does not belong to the certificate is a config error."""
    ca = trustme.CA()
    one, two = ca.issue_cert("example.com"), ca.issue_cert("example.com")
    one.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    two.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    site = {**SITE, "tls": "files", "cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}
    (message,) = problems({"site": [site]})
    assert "does not match" in message


def test_cert_not_covering_host(tmp_path: Path) -> None:
    """A certificate that does not name a site's host is refused."""
    ca = trustme.CA()
    leaf = ca.issue_cert("other.com")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    site = {**SITE, "tls": "files", "cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}
    (message,) = problems({"site": [site]})
    assert "does not cover example.com" in message


def test_host_in_two_sites() -> None:
    """A host listed by two sites is refused."""
    (message,) = problems({"acme": ACME, "site": [SITE, {**SITE, "upstream": "unix:/run/app.sock"}]})
    assert "site[1].hosts" in message and "already a host of site[0]" in message


def test_bad_endpoint() -> None:
    """A bad endpoint string is named with the reason."""
    (message,) = problems({"acme": ACME, "site": [SITE], "server": {"https": ["tcp:http"]}})
    assert "server.https" in message and "tcp:http" in message


def test_bad_upstream() -> None:
    """An upstream that is neither http:// nor unix: is refused."""
    (message,) = problems({"acme": ACME, "site": [{**SITE, "upstream": "https://app:8000"}]})
    assert "site[0].upstream" in message


def test_acme_needs_agreement() -> None:
    """tls = acme without agree_tos names the CA whose terms are meant."""
    (message,) = problems({"site": [SITE]})
    assert "acme.agree_tos" in message and "letsencrypt" in message


def test_several_problems_reported_together() -> None:
    """All problems come at once, not one per run."""
    found = problems({"site": [{"hosts": [], "upstream": "ftp://x", "tls": "maybe"}]})
    assert len(found) >= 3


def test_environment_override_named() -> None:
    """TLSPROXY_<SECTION>_<KEY> overrides the file, and errors name the variable."""
    cfg = parse({"acme": ACME, "site": [SITE]}, "site.toml", {"TLSPROXY_SERVER_HTTPS": "tcp:8443,tcp:9443"})
    assert cfg.server.https == ("tcp:8443", "tcp:9443")
    (message,) = problems({"acme": ACME, "site": [SITE]}, {"TLSPROXY_TLS_MIN_VERSION": "1.1"})
    assert message.startswith("environment TLSPROXY_TLS_MIN_VERSION: tls.min_version")


def test_environment_only_site() -> None:
    """A one-site sidecar needs no file at all."""
    cfg = load(
        None,
        {
            "TLSPROXY_HOSTS": "example.com,www.example.com",
            "TLSPROXY_UPSTREAM": "unix:/run/gunicorn.sock",
            "TLSPROXY_ACME_EMAIL": "ops@example.com",
            "TLSPROXY_ACME_AGREE_TOS": "true",
            "TLSPROXY_STATE_DIR": "/data",
        },
    )
    (site,) = cfg.sites
    assert site.hosts == ("example.com", "www.example.com")
    assert site.upstream.unix_path == "/run/gunicorn.sock"
    assert cfg.server.state_dir == "/data"
    assert cfg.acme.email == "ops@example.com"


def test_no_file_no_env_is_dev_default() -> None:
    """Nothing configured means the local dev proxy on 8443 in front of port 8000."""
    cfg = load(None, {})
    assert cfg.dev
    assert cfg.sites[0].tls == "local"
    assert cfg.sites[0].upstream.port == 8000
    assert cfg.sites[0].hsts.header_value() is None
    assert all(":8443" in e or "8443:" in e for e in cfg.server.https)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    """Unreadable or non-TOML files are named."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError) as info:
        load(str(bad), {})
    assert str(bad) in str(info.value) and "TOML" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path / "missing.toml"), {})
    assert "missing.toml" in str(info.value)


def test_example_config_is_valid(tmp_path: Path) -> None:
    """config.example.toml documents every key and loads once the CA's terms are agreed to."""
    example = Path(__file__).parents[2] / "config.example.toml"
    with pytest.raises(ConfigError, match="agree_tos"):
        load(str(example), {})
    cfg = load(str(example), {"TLSPROXY_ACME_AGREE_TOS": "true"})
    assert cfg.sites
    text = example.read_text()
    for section, cls in (("server", config.Server), ("tls", config.TLS), ("acme", config.ACME)):
        for key in cls.__dataclass_fields__:
            assert f"{key} =" in text, f"[{section}] {key} is not documented in config.example.toml"
    for key in ("hosts", "upstream", "tls", "cert", "key", "hsts", "secure_cookies", "max_body_size"):
        assert f"{key} =" in text


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", 1048576), ("512k", 524288), ("100M", 104857600), ("1G", 1073741824), ("2MiB", 2097152)],
)
def test_sizes(text: str, size: int) -> None:
    """Body sizes read as bytes or with binary units."""
    assert config.parse_size(text) == size


def test_wildcard_acme_refused() -> None:
    """A wildcard host with tls = acme is refused (no DNS-01)."""
    (message,) = problems({"acme": ACME, "site": [{**SITE, "hosts": ["*.example.com"]}]})
    assert "DNS-01" in message


def test_request_buffering_keys() -> None:
    """Request buffering is on by default, budgets take sizes like "2M", and the directory defaults under state_dir."""
    cfg = parse({"acme": ACME, "site": [SITE], "server": {"state_dir": "/srv/tp"}}, "site.toml", {})
    assert cfg.sites[0].request_buffering is True
    assert cfg.server.request_buffer_memory == 1024 * 1024
    assert cfg.server.buffer_directory == "/srv/tp/buffers"
    server = {
        "buffer_dir": "/var/tmp/bufs",
        "request_buffer_memory": "2M",
        "request_buffer_connection_memory": 8388608,
        "request_buffer_total_memory": "1G",
    }
    site = {**SITE, "request_buffering": False}
    cfg = parse({"acme": ACME, "site": [site], "server": server}, "site.toml", {})
    assert cfg.sites[0].request_buffering is False
    assert cfg.server.buffer_directory == "/var/tmp/bufs"
    assert (cfg.server.request_buffer_memory, cfg.server.request_buffer_connection_memory) == (2 * 2**20, 8 * 2**20)
    assert cfg.server.request_buffer_total_memory == 2**30


def test_request_buffering_bad_values_named() -> None:
    """A budget that is not a size and a non-boolean request_buffering are each named."""
    found = problems(
        {"acme": ACME, "site": [{**SITE, "request_buffering": "yes"}], "server": {"request_buffer_memory": "lots"}}
    )
    assert any(m.startswith("site.toml: server.request_buffer_memory:") and "'lots'" in m for m in found), found
    assert any("site[0].request_buffering" in m and "true or false" in m for m in found), found


def test_body_timeout_reaches_the_server_limits() -> None:
    """server.body_timeout is read, must be positive, and becomes the HTTP/1.1 body deadline."""
    from tlsproxy.tap import limits_of

    cfg = parse({"acme": ACME, "site": [SITE], "server": {"body_timeout": 7}}, "site.toml", {})
    assert limits_of(cfg).body_timeout == 7.0
    (message,) = problems({"acme": ACME, "site": [SITE], "server": {"body_timeout": 0}})
    assert "server.body_timeout" in message


def test_process_switches_are_not_configuration() -> None:
    """TLSPROXY_PURE_PYTHON, _CAROOT and _CONFIG are not config keys: no "unknown variable", dev mode stays."""
    switches = {"TLSPROXY_PURE_PYTHON": "1", "TLSPROXY_CAROOT": "/tmp/ca"}
    assert load(None, switches).dev
    cfg = parse({"acme": ACME, "site": [SITE]}, "site.toml", switches)
    assert cfg.sites[0].name == "example.com"
    (message,) = problems({"acme": ACME, "site": [SITE]}, {"TLSPROXY_PURE_PYTON": "1"})
    assert "unknown variable" in message and "TLSPROXY_PURE_PYTHON" in message


def test_environment_values_take_the_type_of_their_key() -> None:
    """1.3 stays the string "1.3"; yes/no are booleans; 20M is a size; a table parses as TOML."""
    env = {
        "TLSPROXY_TLS_MIN_VERSION": "1.3",
        "TLSPROXY_SERVER_ACCESS_LOG": "no",
        "TLSPROXY_ACME_AGREE_TOS": "yes",
        "TLSPROXY_SERVER_SHUTDOWN_GRACE": "5",
        "TLSPROXY_SITE_MAX_BODY_SIZE": "20M",
        "TLSPROXY_SITE_HSTS": "{ max_age = 0 }",
        "TLSPROXY_HOSTS": "example.com",
        "TLSPROXY_UPSTREAM": "http://127.0.0.1:8000",
    }
    cfg = load(None, env)
    assert cfg.tls.min_version == "1.3"
    assert cfg.server.access_log is False and cfg.acme.agree_tos is True
    assert cfg.server.shutdown_grace == 5.0
    assert cfg.sites[0].max_body_size == 20 * 1024 * 1024
    assert cfg.sites[0].hsts.header_value() is None


def test_a_bare_port_is_a_tcp_endpoint() -> None:
    """A port alone where an endpoint is expected: tcp:PORT, and the admin endpoint stays on loopback."""
    cfg = parse(
        {"acme": ACME, "site": [SITE]},
        "site.toml",
        {"TLSPROXY_SERVER_ADMIN": "9000", "TLSPROXY_SERVER_HTTP": "24080", "TLSPROXY_SERVER_HTTPS": "8443,9443"},
    )
    assert cfg.server.admin == "tcp:9000:interface=127.0.0.1"
    assert cfg.server.http == ("tcp:24080",)
    assert cfg.server.https == ("tcp:8443", "tcp:9443")
    cfg = parse({"acme": ACME, "site": [SITE], "server": {"https": [443], "admin": 9001}}, "site.toml")
    assert cfg.server.https == ("tcp:443",) and cfg.server.admin == "tcp:9001:interface=127.0.0.1"


def test_dev_listeners_stay_on_this_machine() -> None:
    """The dev proxy's --listen tcp:9443 (or 9443) binds loopback only; an explicit interface is kept."""
    for given in ("tcp:9443", "9443"):
        assert config.dev_config(listen=(given,)).server.https == (
            "tcp:9443:interface=127.0.0.1",
            r"tcp:9443:interface=\:\:1",
        )
    assert config.dev_config(listen=("tcp:9443:interface=0.0.0.0",)).server.https == ("tcp:9443:interface=0.0.0.0",)


def test_dev_502_hint_names_the_address() -> None:
    """The dev proxy's "start your app" hint names the upstream's port when it is not runserver's default."""
    assert config.dev_app_hint(config.dev_config().sites[0].upstream).endswith("python manage.py runserver)")
    other = config.dev_config(upstream="http://127.0.0.1:8001").sites[0].upstream
    assert "python manage.py runserver 127.0.0.1:8001" in config.dev_app_hint(other)
    unix = config.dev_config(upstream="unix:/tmp/app.sock").sites[0].upstream
    assert "gunicorn --bind unix:/tmp/app.sock" in config.dev_app_hint(unix)


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    """A TOML syntax error is placed by line and column, not by a key named "-"."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nhttps = tcp:443\n")
    with pytest.raises(ConfigError) as info:
        load(str(bad), {})
    (problem,) = info.value.problems
    assert str(problem).startswith(f"{bad}: line 2, column ")
    assert "not valid TOML" in str(problem) and "(at line" not in str(problem)


@pytest.mark.parametrize(
    ("written", "meant"),
    [
        ("https://127.0.0.1:8000", "'http://127.0.0.1:8000'"),
        ("127.0.0.1:8000", "'http://127.0.0.1:8000'"),
        ("localhost:8000", "'http://localhost:8000'"),
        ("/run/gunicorn.sock", "unix:/run/gunicorn.sock"),
    ],
)
def test_upstream_near_misses_say_what_was_meant(written: str, meant: str) -> None:
    """An https:// upstream, a bare host:port or a bare socket path gets the spelling that works."""
    (message,) = problems({"acme": ACME, "site": [{**SITE, "upstream": written}]})
    assert message.startswith("site.toml: site[0].upstream:") and meant in message


def test_idn_host_gets_its_xn_form() -> None:
    """A host written in Unicode is refused with its xn-- form, wildcard kept."""
    found = problems({"site": [{**SITE, "tls": "local", "hosts": ["bücher.example", "*.bücher.test"]}]})
    assert any("'xn--bcher-kva.example'" in m for m in found)
    assert any("'*.xn--bcher-kva.test'" in m for m in found)


def test_response_buffering_keys() -> None:
    """Buffering keys: defaults (1 GiB, state_dir/buffers, 60 s, on), sizes with units, per-site off."""
    cfg = parse({"acme": ACME, "site": [SITE], "server": {"state_dir": "/srv/tp"}}, "site.toml", {})
    assert cfg.server.max_response_buffer == 1024**3
    assert cfg.server.buffer_directory == "/srv/tp/buffers"
    assert cfg.server.send_timeout == 60.0
    assert cfg.sites[0].response_buffering is True
    raw = {
        "acme": ACME,
        "site": [{**SITE, "response_buffering": False}],
        "server": {"max_response_buffer": "64M", "buffer_dir": "/tmp/b", "send_timeout": 5},
    }
    cfg = parse(raw, "site.toml", {})
    assert (cfg.server.max_response_buffer, cfg.server.buffer_directory, cfg.server.send_timeout) == (
        64 * 1024**2,
        "/tmp/b",
        5.0,
    )
    assert cfg.sites[0].response_buffering is False


def test_response_buffering_bad_values() -> None:
    """A size that is not one, a send_timeout of 0 and a non-boolean switch are each named."""
    found = problems(
        {
            "acme": ACME,
            "site": [{**SITE, "response_buffering": "no"}],
            "server": {"max_response_buffer": "lots", "send_timeout": 0},
        }
    )
    assert any(p.startswith("site.toml: server.max_response_buffer: expected bytes") for p in found)
    assert any(p.startswith("site.toml: server.send_timeout:") for p in found)
    assert any(p.startswith("site.toml: site[0].response_buffering: expected true or false") for p in found)


def test_host_port_endpoint_says_how_to_write_it() -> None:
    """TLSPROXY_SERVER_ADMIN=127.0.0.1:9000 is refused with the tcp: string that means it."""
    (message,) = problems({"acme": ACME, "site": [SITE]}, {"TLSPROXY_SERVER_ADMIN": "127.0.0.1:9000"})
    assert message.startswith("environment TLSPROXY_SERVER_ADMIN: server.admin:")
    assert "tcp:9000:interface=127.0.0.1" in message


def test_redirect_from_names_are_covered_and_checked() -> None:
    """redirect_from names join the site's hosts (certificates, SNI) after its own; bad ones are named."""
    cfg = parse({"acme": ACME, "site": [{**SITE, "redirect_from": ["WWW.example.com."]}]}, "site.toml", {})
    site = cfg.sites[0]
    assert (site.hosts, site.redirect_from, site.name) == (
        ("example.com", "www.example.com"),
        ("www.example.com",),
        "example.com",
    )
    found = problems({"acme": ACME, "site": [{**SITE, "redirect_from": ["example.com", "*.example.com", "bad host"]}]})
    assert any("'example.com': it is one of hosts already" in p for p in found)
    assert any("'*.example.com': a redirected name is one host, not a wildcard" in p for p in found)
    assert any(p.startswith("site.toml: site[0].redirect_from: 'bad host'") for p in found)


def test_routes_are_prefixes_to_upstreams() -> None:
    """[site.routes] maps path prefixes to upstreams, longest first; a bad prefix or upstream is named."""
    routes = {"/ws/": "http://127.0.0.1:8001", "/ws/admin/": "unix:/run/admin.sock"}
    cfg = parse({"acme": ACME, "site": [{**SITE, "routes": routes}]}, "site.toml", {})
    assert [(r.prefix, r.upstream.url) for r in cfg.sites[0].routes] == [
        ("/ws/admin/", "unix:/run/admin.sock"),
        ("/ws/", "http://127.0.0.1:8001"),
    ]
    found = problems(
        {"acme": ACME, "site": [{**SITE, "routes": {"ws": "http://a:1", "/x/": "ftp://a", "/": "http://a:1"}}]}
    )
    assert any(p.startswith('site.toml: site[0].routes."ws": a route is a path prefix') for p in found)
    assert any(p.startswith('site.toml: site[0].routes."/": a route is a path prefix') for p in found)
    assert any(p.startswith("site.toml: site[0].routes.\"/x/\": 'ftp://a'") for p in found)


@pytest.mark.parametrize("value", [0, -2, "many", "", 1.5, True])
def test_workers_refuses_what_is_not_a_count(value: object) -> None:
    """[server] workers refuses 0, negatives, fractions and words other than "auto"."""
    (message,) = problems({"acme": ACME, "site": [SITE], "server": {"workers": value}})
    assert message.startswith("site.toml: server.workers:"), message
    assert '"auto"' in message


def test_workers_counts_and_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """workers = 3 is 3; "auto" is the CPUs this process may use; the default is 1 (one process)."""
    assert parse({"acme": ACME, "site": [SITE]}, "site.toml", {}).server.workers == 1
    assert parse({"acme": ACME, "site": [SITE], "server": {"workers": 3}}, "site.toml", {}).server.workers == 3
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 1, 5})
    assert parse({"acme": ACME, "site": [SITE], "server": {"workers": "auto"}}, "s", {}).server.workers == 3


def test_workers_from_the_environment() -> None:
    """TLSPROXY_SERVER_WORKERS sets the count ("auto" too) and is refused when it is no count."""
    env = {"TLSPROXY_SERVER_WORKERS": "2"}
    assert parse({"acme": ACME, "site": [SITE]}, "site.toml", env).server.workers == 2
    assert parse({"acme": ACME, "site": [SITE]}, "s", {"TLSPROXY_SERVER_WORKERS": "auto"}).server.workers >= 1
    (message,) = problems({"acme": ACME, "site": [SITE]}, {"TLSPROXY_SERVER_WORKERS": "0"})
    assert "server.workers" in message


@pytest.mark.parametrize(
    ("raw", "key", "meant"),
    [
        ({"server": {"workres": 2}}, "server.workres", "workers"),
        ({"sever": {"workers": 2}}, "sever", "server"),
        ({"site": [{**SITE, "upstrem": "http://127.0.0.1:8000"}]}, "site[0].upstrem", "upstream"),
        ({"site": [{**SITE, "Compress": False}]}, "site[0].Compress", "compress"),
    ],
)
def test_unknown_key_suggests_the_close_one(raw: dict, key: str, meant: str) -> None:
    """A typo in a key names the key it most likely meant, before the list of every known key."""
    found = problems({"acme": ACME, "site": [SITE], **raw})
    (message,) = [m for m in found if f": {key}: unknown key" in m]
    assert f"unknown key: did you mean {meant}? (known keys: " in message


def test_unknown_key_far_from_any_suggests_nothing() -> None:
    """A key like no known one gets the list alone, not a wild guess."""
    (message,) = problems({"acme": ACME, "site": [SITE], "server": {"colour": "red"}})
    assert "did you mean" not in message and "server.colour: unknown key (known keys: " in message


def test_unknown_environment_key_suggests_the_close_one() -> None:
    """TLSPROXY_SERVER_WORKRS is named as set and points at workers."""
    (message,) = problems({"acme": ACME, "site": [SITE]}, {"TLSPROXY_SERVER_WORKRS": "2"})
    assert message.startswith("environment TLSPROXY_SERVER_WORKRS: server.workrs: unknown key: did you mean workers?")


@pytest.mark.parametrize("name", ["TLSPROXY_SITE_COMPRESS", "TLSPROXY_UPSTREAM"])
def test_site_variable_beside_file_sites_names_that_variable(name: str) -> None:
    """A one-site variable next to a file's [[site]] is blamed by its own name, not TLSPROXY_HOSTS."""
    (message,) = problems({"acme": ACME, "site": [SITE]}, {name: "false"})
    assert message.startswith(f"environment {name}: site: the configuration file already has [[site]] tables")
    assert "TLSPROXY_HOSTS" not in message and "set the key in the file's [[site]]" in message


def test_no_https_listener_refused() -> None:
    """https = [] would run a proxy that serves nothing: refused, naming the key."""
    (message,) = problems({"acme": ACME, "site": [SITE], "server": {"https": []}})
    assert message.startswith("site.toml: server.https: no listener") and '["tcp:443"]' in message


def test_empty_https_variable_refused() -> None:
    """An empty TLSPROXY_SERVER_HTTPS is blamed on the variable, not silently no listener."""
    (message,) = problems({"acme": ACME, "site": [SITE]}, {"TLSPROXY_SERVER_HTTPS": ""})
    assert message.startswith("environment TLSPROXY_SERVER_HTTPS: server.https: no listener")


def test_directory_where_a_file_is_wanted(tmp_path: Path) -> None:
    """A directory given for htpasswd, a cert, an error page or ca_bundle is called a directory, not missing."""
    folder = str(tmp_path)
    site = {
        **SITE,
        "tls": "files",
        "cert": folder,
        "key": folder,
        "basic_auth": {"realm": "x", "htpasswd": folder},
        "error_pages": {"502": folder},
    }
    found = problems({"acme": {**ACME, "ca_bundle": folder}, "site": [site]})
    for key in ("site[0].cert", "site[0].key", "site[0].basic_auth.htpasswd", "site[0].error_pages.502"):
        assert f"site.toml: {key}: {folder} is a directory: name the file in it" in found, key
    assert f"site.toml: acme.ca_bundle: {folder} is a directory: name the file in it" in found
    assert not any("no such file" in m or "tlsproxy passwd" in m for m in found)


def test_single_site_table_says_double_brackets() -> None:
    """[site] instead of [[site]] is one message saying to double the brackets, not "no [[site]] configured"."""
    (message,) = problems({"acme": ACME, "site": dict(SITE)})
    assert message == (
        "site.toml: site: expected [[site]] tables, found a single [site] table:"
        " write [[site]] (double brackets), one per site"
    )


@pytest.mark.parametrize("key", ["static", "upstream"])
def test_site_key_at_the_top_says_where_it_belongs(key: str) -> None:
    """A site's key written above every [[site]] (or as [static]) says to put it under a [[site]] table."""
    (message,) = problems({"acme": ACME, "site": [SITE], key: {"/static/": "/srv"}})
    assert message == f"site.toml: {key}: a key of a site: put it under a [[site]] table (as [site.{key}] for a table)"


def test_agree_tos_missing_in_environment_only_setup_names_the_variable() -> None:
    """With no file, the terms are accepted by a variable: the message names TLSPROXY_ACME_AGREE_TOS=true."""
    environ = {"TLSPROXY_HOSTS": "example.com", "TLSPROXY_UPSTREAM": "http://127.0.0.1:8000"}
    (message,) = problems({}, environ)
    assert message.startswith('site.toml: acme.agree_tos: a site uses tls = "acme": set TLSPROXY_ACME_AGREE_TOS=true')


def test_agree_tos_of_the_wrong_type_is_said_once() -> None:
    """agree_tos = "maybe" gets its type error alone, not a second line asking to agree."""
    environ = {"TLSPROXY_ACME_AGREE_TOS": "maybe"}
    (message,) = problems({"site": [SITE]}, environ)
    assert message == "environment TLSPROXY_ACME_AGREE_TOS: acme.agree_tos: expected true or false, found str 'maybe'"


@pytest.mark.parametrize(
    ("written", "meant"), [("https://example.com/", "example.com"), ("example.com:443", "example.com")]
)
def test_host_written_as_url_says_the_name(written: str, meant: str) -> None:
    """A host given as a URL or with a port is answered with the bare name to write."""
    (message,) = problems({"acme": ACME, "site": [{**SITE, "hosts": [written]}]})
    assert message.startswith(f"site.toml: site[0].hosts: {written!r}: a host name alone, without scheme, port")
    assert message.endswith(f"or path: write {meant!r}")

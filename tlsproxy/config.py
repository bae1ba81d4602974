"""Configuration: TOML file plus environment -> a frozen, validated :class:`Config`.

Everything here is a plain function over plain values.  Every problem found
is reported at once, each naming where it came from (the file or the
environment variable), the key, what was expected and what was found.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tlsproxy.certs.store_url import check_store_url, redact_url
from tlsproxy.compat.twisted import parse_server_endpoint
from tlsproxy.http.server import Limits
from tlsproxy.proxyprotocol import split_description
from tlsproxy.tls.policy import PolicyError, TLSPolicy, cipher_names, load_dhparams

DEFAULT_DEV_UPSTREAM = "http://127.0.0.1:8000"
DEFAULT_DEV_HTTPS = ("tcp:8443:interface=127.0.0.1", r"tcp:8443:interface=\:\:1")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "*.localhost")
ACME_DIRECTORIES = {
    "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
    "letsencrypt-staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}
CHALLENGES = ("http-01", "tls-alpn-01")
KEY_TYPES = ("ec256", "rsa2048", "rsa3072")
TLS_SOURCES = ("acme", "files", "local")
DEFAULT_MAX_BODY_SIZE = 100 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BUFFER = 1024**3
# The HTTP limits and the TLS policy keep their own defaults; the keys that
# set them take theirs from there, so a default is written in one place.
_LIMITS = Limits()
_POLICY = TLSPolicy()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration."""

    where: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.key}: {self.reason}" if self.key else f"{self.where}: {self.reason}"


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` says every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class HSTS:
    max_age: int = 63072000
    include_subdomains: bool = False
    preload: bool = False

    def header_value(self) -> bytes | None:
        if self.max_age <= 0:
            return None
        value = f"max-age={self.max_age}"
        if self.include_subdomains:
            value += "; includeSubDomains"
        if self.preload:
            value += "; preload"
        return value.encode("ascii")


@dataclass(frozen=True)
class Upstream:
    """Where a site's app listens: TCP host and port, or a unix socket path."""

    url: str
    host: str = ""
    port: int = 0
    unix_path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.unix_path)


@dataclass(frozen=True)
class StaticDir:
    """A URL prefix served from a directory by tlsproxy itself (``[site.static]``)."""

    prefix: str  # starts and ends with "/"
    root: str  # an absolute path
    # Uploads: never served as HTML, SVG or script on the site's origin (unless trusted).
    media: bool = False
    trusted: bool = False
    # A symlink may lead out of root (``collectstatic --link``); off, such files are 404.
    follow_symlinks: bool = False


DEFAULT_STATIC_MAX_AGE = 3600


@dataclass(frozen=True)
class PathRoute:
    """Requests whose path starts with ``prefix`` go to ``upstream`` (``[site.routes]``), path unchanged."""

    prefix: str  # starts and ends with "/"
    upstream: Upstream
    upstreams: tuple[Upstream, ...] = ()  # all of them, upstream first (filled in if not given)

    def __post_init__(self) -> None:
        if not self.upstreams:
            object.__setattr__(self, "upstreams", (self.upstream,))


BALANCE_METHODS = ("least_conn", "round_robin")
HEALTH_STATUS_DEFAULT = ("2xx", "3xx")


@dataclass(frozen=True)
class Balancing:
    """How a site spreads requests over its upstreams and decides one is down."""

    # least_conn (with round robin among equals) by default: a gunicorn sync worker serves
    # one request at a time, so an app busy with slow requests should not get the next one.
    balance: str = "least_conn"
    max_fails: int = 1  # failed connects within fail_timeout that take an upstream out; 0: never
    fail_timeout: float = 10.0  # seconds failures are counted over, and an upstream stays out
    health_path: str = ""  # active checks: GET this path every health_interval ("" = off)
    health_interval: float = 5.0
    health_timeout: float = 2.0
    health_status: tuple[str, ...] = HEALTH_STATUS_DEFAULT  # "2xx", "3xx" or exact codes ("200")

    def healthy_status(self, status: int) -> bool:
        return f"{status // 100}xx" in self.health_status or str(status) in self.health_status


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class BasicAuth:
    """HTTP basic auth against an htpasswd file of bcrypt lines (``htpasswd -B``, ``tlsproxy passwd``)."""

    realm: str
    htpasswd: str  # an absolute path


@dataclass(frozen=True)
class AccessRule:
    """Who may reach a path prefix: the site's own keys, or a ``[[site.access]]`` table over them.

    ``deny`` wins over ``allow``; an empty ``allow`` lets every address in.
    A ``[[site.access]]`` key that is present replaces the site's value for
    that key (``allow = []`` opens, ``basic_auth = false`` drops the password).
    """

    prefix: str = "/"
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    basic_auth: BasicAuth | None = None
    # Pass the client's Authorization header on to the app once basic auth let it in
    # (off: the app never sees the password the proxy checked).
    pass_authorization: bool = False

    @property
    def restricts(self) -> bool:
        return bool(self.allow or self.deny or self.basic_auth)


ERROR_PAGE_STATUSES = (502, 503, 504)


@dataclass(frozen=True)
class Site:
    hosts: tuple[str, ...]
    upstream: Upstream
    tls: str = "acme"
    cert: str = ""
    key: str = ""
    hsts: HSTS = field(default_factory=HSTS)
    secure_cookies: bool = True
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    request_buffering: bool = True
    response_buffering: bool = True  # False: answers stream with back-pressure, as with X-Accel-Buffering: no
    static: tuple[StaticDir, ...] = ()  # longest prefix first
    static_max_age: int = DEFAULT_STATIC_MAX_AGE  # seconds, for file names without a content hash
    # Names redirected to the site's first host (www.example.com -> example.com). They are in
    # hosts too, at the end: certificates, SNI and port 80 cover them like any other name.
    redirect_from: tuple[str, ...] = ()
    # Path prefixes proxied to another app (``[site.routes]``), longest first; the rest goes to upstream.
    routes: tuple[PathRoute, ...] = ()
    # Access rules (allow / deny / basic_auth, [[site.access]]), longest prefix first; () when none restricts.
    access: tuple[AccessRule, ...] = ()
    # status -> file of our own error pages ([site.error_pages]); a file present at maintenance_file: 503.
    error_pages: tuple[tuple[int, str], ...] = ()
    maintenance_file: str = ""
    # Several upstreams: all of them, upstream first (filled in if not given), and how to pick one.
    upstreams: tuple[Upstream, ...] = ()
    balancing: Balancing = field(default_factory=Balancing)
    compress: bool = True  # zstd/br/gzip for text-like answers the client accepts coded (proxy/compress.py)

    def __post_init__(self) -> None:
        if not self.upstreams:
            object.__setattr__(self, "upstreams", (self.upstream,))

    @property
    def name(self) -> str:
        """A site is named by its first host (what ``tlsproxy renew NAME`` takes)."""
        return self.hosts[0]

    @property
    def gated(self) -> bool:
        """Requests pass tlsproxy/proxy/access.py first: access rules, or a maintenance switch."""
        return bool(self.access or self.maintenance_file)


@dataclass(frozen=True)
class Server:
    https: tuple[str, ...] = ("tcp:443",)
    http: tuple[str, ...] = ("tcp:80",)
    state_dir: str = "/var/lib/tlsproxy"
    admin: str = ""
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    access_log: bool = True
    # Also write the access log (JSON lines) to this file; reopened on SIGUSR1.
    access_log_file: str = ""
    log_format: str = "text"
    connect_timeout: float = 5.0
    upstream_timeout: float = 60.0
    idle_timeout: float = _LIMITS.idle_timeout
    handshake_timeout: float = _LIMITS.handshake_timeout
    header_timeout: float = _LIMITS.header_timeout
    body_timeout: float = _LIMITS.body_timeout
    shutdown_grace: float = 30.0
    max_request_line: int = _LIMITS.max_request_line
    max_header_size: int = _LIMITS.max_header_size
    max_header_count: int = _LIMITS.max_header_count
    # Temporary files of request and response buffering: buffer_dir ("" = state_dir/buffers).
    buffer_dir: str = ""
    # Request bodies: held whole before the app is contacted (tlsproxy/proxy/reqbuffer.py).
    request_buffer_memory: int = 1024 * 1024
    request_buffer_connection_memory: int = 4 * 1024 * 1024
    request_buffer_total_memory: int = 64 * 1024 * 1024
    # Response buffering: each answer holds at most max_response_buffer; a client that
    # takes nothing of an answer for send_timeout seconds is cut off.
    max_response_buffer: int = DEFAULT_MAX_RESPONSE_BUFFER
    send_timeout: float = 60.0
    # Worker processes behind one supervisor (tlsproxy/workers.py); 1 = this process serves.
    workers: int = 1
    # Wrong basic-auth passwords per client address (IPv6: per /64) and realm: after
    # auth_fail_limit of them within auth_fail_window seconds, 429 until the window ends; 0: no limit.
    auth_fail_limit: int = 10
    auth_fail_window: float = 60.0

    @property
    def buffer_directory(self) -> str:
        return self.buffer_dir or os.path.join(self.state_dir, "buffers")


_SERVER_SIZES = (
    "request_buffer_memory",
    "request_buffer_connection_memory",
    "request_buffer_total_memory",
    "max_response_buffer",
)


@dataclass(frozen=True)
class TLS:
    min_version: str = _POLICY.min_version
    ciphers: str = _POLICY.ciphers
    dhparams: str = _POLICY.dhparams
    alpn: tuple[str, ...] = _POLICY.alpn
    ticket_key_rotation: float = 43200.0  # seconds a session ticket key issues tickets


@dataclass(frozen=True)
class ACME:
    directory: str = "letsencrypt"
    email: str = ""
    agree_tos: bool = False
    ca_bundle: str = ""
    challenges: tuple[str, ...] = CHALLENGES
    eab_kid: str = ""
    eab_hmac_key: str = ""
    profile: str = ""
    key_type: str = "ec256"

    @property
    def directory_url(self) -> str:
        return ACME_DIRECTORIES.get(self.directory, self.directory)


@dataclass(frozen=True)
class Store:
    """``[store]``: where certificates live; no url = the directory store in state_dir."""

    url: str = ""  # redis://[:PASSWORD@]HOST:PORT/DB, rediss:// (TLS), unix:///PATH; or TLSPROXY_STORE_URL
    prefix: str = "tlsproxy:"  # key prefix, so several fleets can share one Redis
    lock_lease: float = 30.0  # seconds an order's lock outlives a holder that died
    encryption_key_file: str = ""  # a Fernet key: private keys encrypted before they reach Redis

    @property
    def shared(self) -> bool:
        return bool(self.url)

    def describe(self) -> str:
        return f"redis {redact_url(self.url)} (prefix {self.prefix!r})" if self.url else "the state directory"


@dataclass(frozen=True)
class Config:
    server: Server = field(default_factory=Server)
    tls: TLS = field(default_factory=TLS)
    acme: ACME = field(default_factory=ACME)
    store: Store = field(default_factory=Store)
    sites: tuple[Site, ...] = ()
    source: str = "<defaults>"
    dev: bool = False

    def site_named(self, name: str) -> Site | None:
        """The site that has ``name`` among its hosts."""
        name = name.lower().rstrip(".")
        for site in self.sites:
            if name in site.hosts:
                return site
        return None


# ---------------------------------------------------------------------------
# Reading raw values


class _Reader:
    """Pulls typed values out of a raw table, recording problems as it goes."""

    def __init__(self, where: Callable[[str], str], problems: list[Problem]) -> None:
        self._where = where
        self.problems = problems

    def fail(self, key: str, reason: str) -> None:
        self.problems.append(Problem(self._where(key), key, reason))

    def table(self, raw: Mapping[str, Any], section: str, known: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``raw`` has only known keys; return the known values present."""
        values = {}
        for key, value in raw.items():
            full = f"{section}.{key}" if section else key
            if key not in known:
                self.fail(full, f"unknown key{_did_you_mean(key, known)} (known keys: {', '.join(sorted(known))})")
            else:
                values[key] = value
        return values


def _did_you_mean(key: Any, known: Mapping[str, Any]) -> str:
    """The known key a typo most likely meant, so the long list of known keys need not be read."""
    close = difflib.get_close_matches(str(key).lower(), list(known), n=1, cutoff=0.75)
    return f": did you mean {close[0]}?" if close else ""


def _not_a_file(path: str) -> str:
    """Why ``path`` is not a readable file: "no such file" would send a user looking for it."""
    if os.path.isdir(path):
        return f"{path} is a directory: name the file in it"
    return f"no such file: {path}"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _coerce(reader: _Reader, key: str, value: Any, default: Any) -> Any:
    """Check ``value`` has the type of ``default``; return it or the default."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        reader.fail(key, f"expected true or false, found {_describe(value)}")
    elif isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value)
        reader.fail(key, f"expected a number of seconds above 0, found {_describe(value)}")
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        reader.fail(key, f"expected a whole number of 0 or more, found {_describe(value)}")
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        reader.fail(key, f"expected a string, found {_describe(value)}")
    elif isinstance(default, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        reader.fail(key, f"expected a list of strings, found {_describe(value)}")
    return default


_SIZE = re.compile(r"\A\s*(\d+)\s*([kmg]?)i?b?\s*\Z", re.IGNORECASE)


def parse_size(value: Any) -> int | None:
    """Bytes from ``1048576``, ``"512k"``, ``"100M"`` or ``"1G"`` (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
    return None


_HOST_LABEL = re.compile(r"\A(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


def check_host(host: str) -> str | None:
    """Why ``host`` is not a usable site host, or None if it is."""
    wildcard = host.startswith("*.")
    if wildcard:
        rest = host[2:]
        if "*" in rest:
            return "only one leading '*.' label is allowed in a wildcard"
        host = rest
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if not host.isascii():
        ascii_form = idna_form(host)
        if ascii_form:
            written = ("*." if wildcard else "") + ascii_form
            return f"an internationalized name: write it as {written!r}, the form browsers send"
    if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in host.split(".")):
        name = urlsplit(host if "//" in host else "//" + host).hostname or ""
        if name and name != host and check_host(name) is None:  # a URL, or a host with a port
            return f"a host name alone, without scheme, port or path: write {name!r}"
        return "not a DNS name (letters, digits and '-' in dot-separated labels; IDNs in punycode)"
    return None


def idna_form(host: str) -> str | None:
    """The xn-- (IDNA) form of an internationalized host name, or None if it has none."""
    try:
        import idna  # Twisted's tls extra brings it

        return idna.encode(host, uts46=True).decode("ascii")
    except ImportError:  # pragma: no cover - the older IDNA 2003 codec is close enough for a hint
        pass
    except idna.IDNAError:
        return None
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def parse_upstream(url: str) -> Upstream | str:
    """An :class:`Upstream`, or the reason ``url`` is not one."""
    if url.startswith("unix:"):
        path = url[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path.startswith("/"):
            return "a unix socket upstream needs an absolute path: unix:/run/gunicorn.sock"
        return Upstream(url=url, unix_path=path)
    if url.startswith("/"):
        return f"a unix socket upstream is written unix:{url}"
    if "://" not in url:
        return f"expected http://HOST:PORT or unix:/PATH: did you mean 'http://{url}'?"
    parts = urlsplit(url)
    if parts.scheme == "https":
        plain = "http://" + url.split("://", 1)[1]
        return f"the app is spoken to in plain HTTP/1.1 (tlsproxy is what does TLS): did you mean {plain!r}?"
    if parts.scheme != "http":
        return "expected http://HOST:PORT or unix:/PATH (the upstream speaks plain HTTP/1.1)"
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return "an upstream URL has only a host and a port"
    try:
        port = parts.port or 80
    except ValueError:
        return "the port is not a number from 1 to 65535"
    if not parts.hostname:
        return "the host is missing"
    return Upstream(url=url, host=parts.hostname, port=port)


def endpoint_from(value: Any, interface: str = "") -> Any:
    """A bare port (``9000`` or ``"9000"``) as the tcp: endpoint it stands for; anything else as is."""
    if isinstance(value, int) and not isinstance(value, bool):
        port = str(value)
    elif isinstance(value, str) and value.strip().isdigit():
        port = value.strip()
    else:
        return value
    return f"tcp:{port}:interface={interface}" if interface else f"tcp:{port}"


def local_endpoints(description: str) -> tuple[str, ...]:
    """The dev proxy's listeners: a port, or a tcp: string that names no interface, stays on this machine.

    runserver shows DEBUG pages with settings and tracebacks: the dev proxy
    must not publish them to the LAN unless an interface is asked for.
    """
    description = endpoint_from(description)
    if description.split(":", 1)[0].lower() == "tcp" and "interface=" not in description:
        return (f"{description}:interface=127.0.0.1", f"{description}:interface=\\:\\:1")
    return (description,)


def check_endpoint(description: str) -> str | None:
    """Why ``description`` is not a Twisted server endpoint string, or None."""
    proxied, inner = split_description(description)
    if proxied:
        # PROXY protocol (tlsproxy/proxyprotocol.py) in front of a tcp: or systemd: listener.
        if split_description(inner)[0] or inner.split(":", 1)[0].lower() not in ("tcp", "systemd"):
            return "haproxy: goes in front of a tcp: or systemd: endpoint, like haproxy:tcp:443"
        return check_endpoint(inner)
    host, _, tail = description.rpartition(":")
    if tail.isdigit() and host and description.split(":", 1)[0].lower() not in ("tcp", "unix", "systemd", "ssl"):
        interface = host.strip("[]").replace(":", "\\:")
        return f"a host:port is written tcp:{tail}:interface={interface} (a port alone, tcp:{tail}, is every interface)"
    try:
        kind, args, kwargs = parse_server_endpoint(description)
    except Exception as e:  # Twisted raises assorted types for bad strings
        return f"not a server endpoint string ({e})"
    kind = kind if isinstance(kind, str) else description.split(":", 1)[0]
    if kind.lower() == "tcp":
        try:
            port = int(args[0] if args else kwargs.get("port", ""))
        except (ValueError, IndexError):
            return "tcp endpoints need a port: tcp:443 or tcp:443:interface=127.0.0.1"
        if not 0 <= port <= 65535:
            return "the port must be from 0 to 65535"
    elif kind.lower() not in ("unix", "systemd", "ssl"):
        return f"unknown endpoint type {kind!r} (tcp:PORT, unix:PATH or systemd:domain=INET:index=N)"
    return None


# ---------------------------------------------------------------------------
# Building the Config


def _server(reader: _Reader, raw: Mapping[str, Any]) -> Server:
    defaults = Server()
    known = {f: getattr(defaults, f) for f in Server.__dataclass_fields__}
    values = reader.table(raw, "server", known)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("https", "http"):
            # A bare port is a tcp: endpoint on every interface, as "tcp:443" is.
            value = [endpoint_from(v) for v in value] if isinstance(value, list) else endpoint_from(value)
            out[key] = tuple(endpoint_from(v) for v in _coerce(reader, f"server.{key}", value, known[key]))
        elif key == "admin":
            # The admin endpoint serves metrics: a bare port stays on loopback.
            out[key] = _coerce(reader, "server.admin", endpoint_from(value, "127.0.0.1"), "")
        elif key == "trusted_proxies":
            nets = []
            for item in _coerce(reader, f"server.{key}", value, ()):
                try:
                    nets.append(ipaddress.ip_network(item, strict=False))
                except ValueError:
                    reader.fail(f"server.{key}", f"expected CIDR ranges like 10.0.0.0/8, found {item!r}")
            out[key] = tuple(nets)
        elif key == "workers":
            out[key] = worker_count(reader, value)
        elif key in _SERVER_SIZES:
            size = parse_size(value)
            if size is None:
                reader.fail(f"server.{key}", f'expected bytes as a number or like "1M", found {_describe(value)}')
            else:
                out[key] = size
        else:
            out[key] = _coerce(reader, f"server.{key}", value, known[key])
    if "https" in out and not out["https"]:  # [] or an empty TLSPROXY_SERVER_HTTPS
        reader.fail("server.https", 'no listener, so nothing would be served: give one, like ["tcp:443"]')
    for key in ("https", "http"):
        for description in out.get(key, ()):
            why = check_endpoint(description)
            if why:
                reader.fail(f"server.{key}", f"{description!r}: {why}")
    proxied = [d for key in ("https", "http") for d in out.get(key, ()) if split_description(d)[0]]
    if proxied and not out.get("trusted_proxies"):
        reader.fail(
            "server.trusted_proxies",
            f"{proxied[0]!r} takes PROXY headers only from trusted_proxies: list your load balancers' ranges",
        )
    if out.get("admin"):
        why = check_endpoint(out["admin"])
        if why:
            reader.fail("server.admin", f"{out['admin']!r}: {why}")
    if out.get("log_format", "text") not in ("text", "json"):
        reader.fail("server.log_format", f'expected "text" or "json", found {out["log_format"]!r}')
    return Server(**out)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), what workers = "auto" means."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_count(reader: _Reader, value: Any) -> int:
    """``[server] workers``: a whole number from 1 up, or "auto" (one per usable CPU)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return available_cpus()
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    reader.fail("server.workers", f'expected a whole number from 1 up or "auto", found {_describe(value)}')
    return 1


def _tls(reader: _Reader, raw: Mapping[str, Any]) -> TLS:
    defaults = TLS()
    known = {f: getattr(defaults, f) for f in TLS.__dataclass_fields__}
    values = reader.table(raw, "tls", known)
    out = {k: _coerce(reader, f"tls.{k}", v, known[k]) for k, v in values.items()}
    if "min_version" in out and out["min_version"] not in ("1.2", "1.3"):
        reader.fail(
            "tls.min_version",
            f'expected "1.2" or "1.3", found {out["min_version"]!r} (TLS 1.0 and 1.1 are broken and not offered)',
        )
        del out["min_version"]
    if "ciphers" in out:
        try:
            cipher_names(out["ciphers"])
        except PolicyError as e:
            reader.fail("tls.ciphers", str(e))
    if out.get("dhparams"):
        try:
            load_dhparams(out["dhparams"])
        except PolicyError as e:
            reader.fail("tls.dhparams", str(e))
    for proto in out.get("alpn", ()):
        if proto not in ("h2", "http/1.1"):
            reader.fail("tls.alpn", f'expected "h2" and/or "http/1.1", found {proto!r}')
    rotation = out.get("ticket_key_rotation")
    if rotation is not None and not 60 <= rotation <= 7 * 86400:
        reader.fail("tls.ticket_key_rotation", f"expected seconds from 60 to 604800 (a week), found {rotation!r}")
        del out["ticket_key_rotation"]
    return TLS(**out)


def _acme(reader: _Reader, raw: Mapping[str, Any]) -> ACME:
    defaults = ACME()
    known = {f: getattr(defaults, f) for f in ACME.__dataclass_fields__}
    values = reader.table(raw, "acme", known)
    out = {k: _coerce(reader, f"acme.{k}", v, known[k]) for k, v in values.items()}
    directory = out.get("directory", defaults.directory)
    if directory not in ACME_DIRECTORIES and not directory.startswith("https://"):
        reader.fail(
            "acme.directory",
            f'expected "letsencrypt", "letsencrypt-staging" or an https:// URL, found {directory!r}',
        )
    for challenge in out.get("challenges", ()):
        if challenge not in CHALLENGES:
            reader.fail("acme.challenges", f"expected some of {list(CHALLENGES)}, found {challenge!r}")
    if "challenges" in out and not out["challenges"]:
        reader.fail("acme.challenges", "at least one challenge type is needed")
    if out.get("key_type", "ec256") not in KEY_TYPES:
        reader.fail("acme.key_type", f"expected one of {list(KEY_TYPES)}, found {out['key_type']!r}")
    if out.get("ca_bundle") and not os.path.isfile(out["ca_bundle"]):
        reader.fail("acme.ca_bundle", _not_a_file(out["ca_bundle"]))
    if bool(out.get("eab_kid")) != bool(out.get("eab_hmac_key")):
        reader.fail("acme.eab_kid", "eab_kid and eab_hmac_key go together")
    return ACME(**out)


def read_fernet_key(path: str) -> bytes | str:
    """The Fernet key in ``path``, or why there is none (never quoting the file)."""
    try:
        data = Path(path).read_bytes().strip()
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    try:
        if len(base64.urlsafe_b64decode(data)) == 32:
            return data
    except (ValueError, binascii.Error):
        pass
    return (
        f"{path} holds no Fernet key (44 base64url characters; make one with: "
        "python3 -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())' > FILE)"
    )


def _store(reader: _Reader, raw: Mapping[str, Any]) -> Store:
    defaults = Store()
    known = {f: getattr(defaults, f) for f in Store.__dataclass_fields__}
    values = reader.table(raw, "store", known)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key == "url" and isinstance(value, str):
            why = check_store_url(value) if value else None
            if why:
                reader.fail("store.url", why)
            else:
                out[key] = value
        else:
            out[key] = _coerce(reader, f"store.{key}", value, known[key])
    prefix = out.get("prefix", defaults.prefix)
    if not prefix or any(c.isspace() for c in prefix):
        reader.fail("store.prefix", f"expected a key prefix without spaces, like {defaults.prefix!r}")
        out.pop("prefix", None)
    lease = out.get("lock_lease")
    if lease is not None and not 2 <= lease <= 3600:
        reader.fail("store.lock_lease", f"expected seconds from 2 to 3600, found {lease!r}")
        del out["lock_lease"]
    if out.get("encryption_key_file"):
        found = read_fernet_key(out["encryption_key_file"])
        if isinstance(found, str):
            reader.fail("store.encryption_key_file", found)
    return Store(**out)


SITE_DEFAULTS: Mapping[str, Any] = {
    "hosts": (),
    "upstream": "",
    "tls": "acme",
    "cert": "",
    "key": "",
    "hsts": {},
    "secure_cookies": True,
    "max_body_size": "",
    "request_buffering": True,
    "response_buffering": True,
    "static": {},
    "static_max_age": DEFAULT_STATIC_MAX_AGE,
    "redirect_from": (),
    "routes": {},
    "balance": "least_conn",
    "max_fails": 1,
    "fail_timeout": 10.0,
    "health_path": "",
    "health_interval": 5.0,
    "health_timeout": 2.0,
    "health_status": HEALTH_STATUS_DEFAULT,
    "allow": (),
    "deny": (),
    "basic_auth": {},
    "pass_authorization": False,
    "access": [],
    "error_pages": {},
    "maintenance_file": "",
    "compress": True,
}


def _site(reader: _Reader, raw: Any, index: int) -> Site | None:
    prefix = f"site[{index}]"
    if not isinstance(raw, Mapping):
        reader.fail(prefix, f"expected a table ([[site]]), found {_describe(raw)}")
        return None
    values = reader.table(raw, prefix, SITE_DEFAULTS)
    hosts = tuple(h.lower().rstrip(".") for h in _coerce(reader, f"{prefix}.hosts", values.get("hosts", ()), ()))
    if not hosts:
        reader.fail(f"{prefix}.hosts", "a site needs at least one host name")
    for host in hosts:
        why = check_host(host)
        if why:
            reader.fail(f"{prefix}.hosts", f"{host!r}: {why}")
    redirect_from = tuple(
        h.lower().rstrip(".") for h in _coerce(reader, f"{prefix}.redirect_from", values.get("redirect_from", ()), ())
    )
    for host in redirect_from:
        why = check_host(host)
        if not why and host.startswith("*."):
            why = "a redirected name is one host, not a wildcard"
        if not why and host in hosts:
            why = "it is one of hosts already: a name is either served or redirected"
        if why:
            reader.fail(f"{prefix}.redirect_from", f"{host!r}: {why}")
    hosts += tuple(dict.fromkeys(h for h in redirect_from if h not in hosts))
    upstreams = _upstreams(reader, f"{prefix}.upstream", values.get("upstream", ""))
    if not upstreams and "upstream" not in values:
        reader.fail(f"{prefix}.upstream", "missing (http://HOST:PORT or unix:/PATH)")
    upstream = upstreams[0] if upstreams else Upstream(url="")
    tls = _coerce(reader, f"{prefix}.tls", values.get("tls", "acme"), "")
    if tls not in TLS_SOURCES:
        reader.fail(f"{prefix}.tls", f"expected one of {list(TLS_SOURCES)}, found {tls!r}")
    cert = _coerce(reader, f"{prefix}.cert", values.get("cert", ""), "")
    key = _coerce(reader, f"{prefix}.key", values.get("key", ""), "")
    if tls == "files":
        _check_files(reader, prefix, cert, key, hosts)
    elif cert or key:
        reader.fail(f"{prefix}.cert", f'cert and key are used only with tls = "files", not {tls!r}')
    hsts_raw = values.get("hsts", {})
    hsts = HSTS()
    if isinstance(hsts_raw, Mapping):
        hsts_known = {f: getattr(hsts, f) for f in HSTS.__dataclass_fields__}
        hsts_values = reader.table(hsts_raw, f"{prefix}.hsts", hsts_known)
        hsts = HSTS(**{k: _coerce(reader, f"{prefix}.hsts.{k}", v, hsts_known[k]) for k, v in hsts_values.items()})
    else:
        reader.fail(f"{prefix}.hsts", f"expected a table like {{ max_age = 63072000 }}, found {_describe(hsts_raw)}")
    secure_cookies = _coerce(reader, f"{prefix}.secure_cookies", values.get("secure_cookies", True), True)
    response_buffering = _coerce(reader, f"{prefix}.response_buffering", values.get("response_buffering", True), True)
    max_body_size = DEFAULT_MAX_BODY_SIZE
    if "max_body_size" in values:
        size = parse_size(values["max_body_size"])
        if size is None:
            reader.fail(
                f"{prefix}.max_body_size",
                f'expected bytes as a number or like "100M", found {_describe(values["max_body_size"])}',
            )
        else:
            max_body_size = size
    request_buffering = _coerce(reader, f"{prefix}.request_buffering", values.get("request_buffering", True), True)
    return Site(
        hosts=hosts,
        upstream=upstream,
        tls=tls,
        cert=cert,
        key=key,
        hsts=hsts,
        secure_cookies=secure_cookies,
        max_body_size=max_body_size,
        request_buffering=request_buffering,
        response_buffering=response_buffering,
        redirect_from=redirect_from,
        routes=_routes(reader, prefix, values.get("routes", {})),
        upstreams=upstreams,
        balancing=_balancing(reader, prefix, values),
        static=_static(reader, prefix, values.get("static", {})),
        static_max_age=_coerce(
            reader, f"{prefix}.static_max_age", values.get("static_max_age", DEFAULT_STATIC_MAX_AGE), 0
        ),
        access=_access(reader, prefix, values),
        error_pages=_error_pages(reader, prefix, values.get("error_pages", {})),
        maintenance_file=_absolute_path(reader, f"{prefix}.maintenance_file", values.get("maintenance_file", "")),
        compress=_coerce(reader, f"{prefix}.compress", values.get("compress", True), True),
    )


# ---------------------------------------------------------------------------
# Access control and error pages (issue 16)

_REALM = re.compile(r"\A[\x20-\x7e]{1,100}\Z")


def _absolute_path(reader: _Reader, key: str, value: Any) -> str:
    path = _coerce(reader, key, value, "")
    if path and (not os.path.isabs(path) or "\0" in path):
        reader.fail(key, f"expected an absolute path, found {path!r}")
        return ""
    return path


def _networks(reader: _Reader, key: str, value: Any) -> tuple[Network, ...]:
    nets = []
    for item in _coerce(reader, key, value, ()):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            reader.fail(key, f"expected addresses or CIDR ranges like 192.0.2.0/24, found {item!r}")
    return tuple(nets)


def _basic_auth(reader: _Reader, key: str, value: Any) -> BasicAuth | None:
    if value is False or value == {}:
        return None
    example = '{ realm = "staging", htpasswd = "/etc/tlsproxy/htpasswd" }'
    if not isinstance(value, Mapping):
        reader.fail(key, f"expected a table like {example} (or false), found {_describe(value)}")
        return None
    values = reader.table(value, key, {"realm": "", "htpasswd": ""})
    realm = _coerce(reader, f"{key}.realm", values.get("realm", "restricted"), "")
    if not _REALM.match(realm) or '"' in realm or "\\" in realm:
        reader.fail(f"{key}.realm", f"1 to 100 printable ASCII characters without quotes or backslashes, not {realm!r}")
    htpasswd = _absolute_path(reader, f"{key}.htpasswd", values.get("htpasswd", ""))
    if not htpasswd:
        reader.fail(f"{key}.htpasswd", f"basic_auth needs htpasswd = an absolute path, as in {example}")
        return None
    if os.path.isdir(htpasswd):
        reader.fail(f"{key}.htpasswd", _not_a_file(htpasswd))
    elif not os.path.isfile(htpasswd):
        reader.fail(f"{key}.htpasswd", f"no such file: {htpasswd} (create it with: tlsproxy passwd {htpasswd} USER)")
    return BasicAuth(realm=realm, htpasswd=htpasswd)


def _rule(reader: _Reader, key: str, raw: Mapping[str, Any], base: AccessRule, prefix: str) -> AccessRule:
    return AccessRule(
        prefix=prefix,
        allow=_networks(reader, f"{key}.allow", raw["allow"]) if "allow" in raw else base.allow,
        deny=_networks(reader, f"{key}.deny", raw["deny"]) if "deny" in raw else base.deny,
        basic_auth=_basic_auth(reader, f"{key}.basic_auth", raw["basic_auth"])
        if "basic_auth" in raw
        else base.basic_auth,
        pass_authorization=_coerce(reader, f"{key}.pass_authorization", raw["pass_authorization"], False)
        if "pass_authorization" in raw
        else base.pass_authorization,
    )


def _access(reader: _Reader, site: str, values: Mapping[str, Any]) -> tuple[AccessRule, ...]:
    """The site's rule at "/" and its [[site.access]] rules over it, longest prefix first."""
    base = _rule(reader, site, values, AccessRule(), "/")
    raw_rules = values.get("access", [])
    if not isinstance(raw_rules, list):
        reader.fail(f"{site}.access", 'expected [[site.access]] tables with prefix = "/admin/"')
        raw_rules = []
    rules = {"/": base}
    for index, raw in enumerate(raw_rules):
        key = f"{site}.access[{index}]"
        if not isinstance(raw, Mapping):
            reader.fail(key, f"expected a table, found {_describe(raw)}")
            continue
        known = {"prefix": "", "allow": (), "deny": (), "basic_auth": {}, "pass_authorization": False}
        raw = reader.table(raw, key, known)
        prefix = raw.get("prefix", "")
        if not isinstance(prefix, str) or not _PREFIX.match(prefix) or prefix == "/":
            reader.fail(f"{key}.prefix", f'a path prefix that starts and ends with "/", like "/admin/", not {prefix!r}')
            continue
        if prefix in rules:
            reader.fail(f"{key}.prefix", f"{prefix!r} has a rule already")
            continue
        rules[prefix] = _rule(reader, key, raw, base, prefix)
    if not any(rule.restricts for rule in rules.values()):
        return ()
    return tuple(sorted(rules.values(), key=lambda r: len(r.prefix), reverse=True))


def _error_pages(reader: _Reader, site: str, raw: Any) -> tuple[tuple[int, str], ...]:
    """``[site.error_pages]``: 502 / 503 / 504 = an absolute path to an HTML file."""
    if not isinstance(raw, Mapping):
        reader.fail(f"{site}.error_pages", f'expected a table like {{ 502 = "/srv/pages/502.html" }}, found {raw!r}')
        return ()
    found = []
    for status, path in raw.items():
        key = f"{site}.error_pages.{status}"
        if not (str(status).isdigit() and int(status) in ERROR_PAGE_STATUSES):
            reader.fail(key, f"pages can be given for {', '.join(map(str, ERROR_PAGE_STATUSES))}")
            continue
        path = _absolute_path(reader, key, path)
        if path and not os.path.isfile(path):
            reader.fail(key, _not_a_file(path))
            continue
        if path:
            found.append((int(status), path))
    return tuple(sorted(found))


_STATIC_OPTIONS: Mapping[str, Any] = {"root": "", "media": False, "trusted": False, "follow_symlinks": False}
_PREFIX = re.compile(r"\A/(?:[A-Za-z0-9._~!$&'()*+,;=:@-]+/)*\Z")


def _routes(reader: _Reader, site: str, raw: Any) -> tuple[PathRoute, ...]:
    """``[site.routes]``: "/prefix/" = "http://HOST:PORT" or "unix:/PATH", longest prefix first."""
    if not isinstance(raw, Mapping):
        example = '{ "/ws/" = "http://127.0.0.1:8001" }'
        reader.fail(f"{site}.routes", f"expected a table like {example}, found {_describe(raw)}")
        return ()
    found = []
    for prefix, value in raw.items():
        key = f"{site}.routes.{json.dumps(prefix)}"
        if not _PREFIX.match(prefix) or prefix == "/":
            reader.fail(key, 'a route is a path prefix that starts and ends with "/", like "/ws/" (not "/" itself)')
            continue
        upstreams = _upstreams(reader, key, value)
        if upstreams:
            found.append(PathRoute(prefix=prefix, upstream=upstreams[0], upstreams=upstreams))
    return tuple(sorted(found, key=lambda r: len(r.prefix), reverse=True))


def _upstreams(reader: _Reader, key: str, value: Any) -> tuple[Upstream, ...]:
    """One upstream URL or a list of them (comma-separated in the environment); () after a problem."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")] if "," in value else [value]
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) and v for v in value):
        example = '"http://127.0.0.1:8000" or ["unix:/run/a.sock", "http://10.0.0.2:8000"]'
        reader.fail(key, f"expected an upstream like {example}, found {_describe(value)}")
        return ()
    found: list[Upstream] = []
    for url in value:
        upstream = parse_upstream(url)
        if isinstance(upstream, str):
            reader.fail(key, f"{url!r}: {upstream}")
        elif any(u.url == upstream.url for u in found):
            reader.fail(key, f"{url!r} is listed twice")
        else:
            found.append(upstream)
    return tuple(found) if len(found) == len(value) else ()


_STATUS_CLASS = re.compile(r"\A(?:[2-5]xx|[2-5][0-9][0-9])\Z")  # interim answers (1xx) are never final


def _balancing(reader: _Reader, prefix: str, values: Mapping[str, Any]) -> Balancing:
    """balance, max_fails, fail_timeout and the health_* keys of a site."""
    default = Balancing()
    out: dict[str, Any] = {}
    for name in ("balance", "max_fails", "fail_timeout", "health_path", "health_interval", "health_timeout"):
        if name in values:
            out[name] = _coerce(reader, f"{prefix}.{name}", values[name], getattr(default, name))
    if out.get("balance", default.balance) not in BALANCE_METHODS:
        reader.fail(f"{prefix}.balance", f"expected one of {list(BALANCE_METHODS)}, found {out['balance']!r}")
        out.pop("balance")
    path = out.get("health_path", "")
    if path and (not path.startswith("/") or not path.isascii() or any(c in path for c in " \r\n\t\0#")):
        reader.fail(f"{prefix}.health_path", f'expected a path like "/healthz", found {path!r}')
        out.pop("health_path")
    if "health_status" in values:
        raw = values["health_status"]
        if isinstance(raw, str):  # from the environment: "2xx,3xx"
            raw = [v.strip() for v in raw.split(",")]
        codes = [str(v).lower() for v in raw] if isinstance(raw, list) else raw
        if not isinstance(codes, list) or not codes or not all(_STATUS_CLASS.match(c) for c in codes):
            reader.fail(
                f"{prefix}.health_status", f'expected a list like ["2xx", "3xx"] or [200], found {_describe(raw)}'
            )
        else:
            out["health_status"] = tuple(codes)
    return Balancing(**out)


def _static(reader: _Reader, site: str, raw: Any) -> tuple[StaticDir, ...]:
    """``[site.static]``: "/prefix/" = "/dir" or = { root = "/dir", media = true, ... }."""
    if not isinstance(raw, Mapping):
        example = '{ "/static/" = "/srv/app/staticfiles" }'
        reader.fail(f"{site}.static", f"expected a table like {example}, found {_describe(raw)}")
        return ()
    found = []
    for prefix, value in raw.items():
        key = f"{site}.static.{json.dumps(prefix)}"
        options: dict[str, Any] = {}
        if isinstance(value, Mapping):
            options = reader.table(value, key, _STATIC_OPTIONS)
            options = {k: _coerce(reader, f"{key}.{k}", v, _STATIC_OPTIONS[k]) for k, v in options.items()}
            root = options.pop("root", "")
            if not root:
                reader.fail(key, 'a table needs root = "/path/to/directory"')
                continue
        elif isinstance(value, str):
            root = value
        else:
            example = '{ root = "/srv/app/media", media = true }'
            reader.fail(key, f"expected a directory path or a table like {example}, found {_describe(value)}")
            continue
        if not _PREFIX.match(prefix) or any(part in (".", "..") for part in prefix.split("/")):
            reader.fail(key, f'a URL prefix starts and ends with /, like "/static/"; not {prefix!r}')
            continue
        if prefix == "/":
            reader.fail(key, 'the prefix "/" would take the whole site from the app: use one like "/static/"')
            continue
        if not os.path.isabs(root) or "\0" in root:
            reader.fail(key, f"the directory must be an absolute path, found {root!r}")
            continue
        if options.get("trusted") and not options.get("media"):
            reader.fail(f"{key}.trusted", "trusted applies only to media = true (static files are served as they are)")
        found.append(StaticDir(prefix=prefix, root=os.path.normpath(root), **options))
    return tuple(sorted(found, key=lambda d: len(d.prefix), reverse=True))


def _check_files(reader: _Reader, prefix: str, cert: str, key: str, hosts: tuple[str, ...]) -> None:
    from tlsproxy.certs.model import CertificateError, CertifiedKey

    for name, path in (("cert", cert), ("key", key)):
        if not path:
            reader.fail(f"{prefix}.{name}", f'tls = "files" needs {name} = "/path/to/{name}.pem"')
        elif not os.path.isfile(path):
            reader.fail(f"{prefix}.{name}", _not_a_file(path))
    if not (cert and key and os.path.isfile(cert) and os.path.isfile(key)):
        return
    try:
        certified = CertifiedKey.from_pem(Path(cert).read_bytes(), Path(key).read_bytes(), source=cert)
    except CertificateError as e:
        reader.fail(f"{prefix}.cert", f"{cert} with {key}: {e.reason}")
        return
    except OSError as e:
        which = "key" if e.filename == key else "cert"
        reader.fail(f"{prefix}.{which}", f"cannot read {e.filename}: {e.strerror} (as uid {os.geteuid()})")
        return
    uncovered = certified.uncovered(hosts)
    if uncovered:
        reader.fail(
            f"{prefix}.cert",
            f"{cert} does not cover {', '.join(uncovered)} (it names {', '.join(certified.dns_names)})",
        )


# ---------------------------------------------------------------------------
# Environment

ENV_PREFIX = "TLSPROXY_"
# TLSPROXY_ variables that switch something about the process, not configuration
# keys: they never make `twist tlsproxy` leave dev mode and are never "unknown".
PROCESS_ENV = {
    "TLSPROXY_CONFIG": "the configuration file, as --config",
    "TLSPROXY_CAROOT": "where the local development CA lives",
    "TLSPROXY_PURE_PYTHON": "1 runs the pure Python twins of the C accelerator",
    "TLSPROXY_CHECK_STATES": "1 checks every state move of the proxy against its table (tests)",
}
_SECTIONS = ("server", "tls", "acme", "store")
_SITE_ENV = {"TLSPROXY_HOSTS": "hosts", "TLSPROXY_UPSTREAM": "upstream"}
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _defaults(section: str) -> Mapping[str, Any]:
    instance = {"server": Server, "tls": TLS, "acme": ACME, "store": Store}.get(section)
    if instance is None:
        return SITE_DEFAULTS if section == "site" else {}
    return {f.name: getattr(instance(), f.name) for f in fields(instance)}


def _env_value(text: str, default: Any = None) -> Any:
    """The value ``text`` stands for, read as the type the key wants.

    A key that wants a string gets the text as written (``1.3`` stays "1.3"); a
    list may be written comma-separated; otherwise a TOML value if ``text``
    parses as one (true, 30, ["a"], { max_age = 0 }), else the text.
    """
    if isinstance(default, str):
        return text
    if isinstance(default, tuple) and not text.lstrip().startswith("["):
        return text
    if isinstance(default, bool) and text.strip().lower() in _TRUE | _FALSE:
        return text.strip().lower() in _TRUE
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_environment(raw: dict[str, Any], environ: Mapping[str, str], problems: list[Problem]) -> dict[str, Any]:
    """Overlay ``TLSPROXY_<SECTION>_<KEY>`` and the one-site variables on ``raw``."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    env_site: dict[str, Any] = {}
    site_names: list[str] = []  # the variables that make the one environment site, for messages
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in PROCESS_ENV:
            continue
        if name in _SITE_ENV:
            env_site[_SITE_ENV[name]] = _env_value(text, SITE_DEFAULTS[_SITE_ENV[name]])
            site_names.append(name)
            continue
        if name == "TLSPROXY_STATE_DIR":
            raw.setdefault("server", {})["state_dir"] = text
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section == "site" and key:
            env_site[key] = _env_value(text, SITE_DEFAULTS.get(key))
            site_names.append(name)
        elif section in _SECTIONS and key:
            table = raw.setdefault(section, {})
            if not isinstance(table, dict):
                problems.append(Problem(f"environment {name}", section, "the file's value is not a table"))
                continue
            table[key] = _env_value(text, _defaults(section).get(key))
        else:
            problems.append(
                Problem(
                    f"environment {name}",
                    rest,
                    "unknown variable (TLSPROXY_<SECTION>_<KEY> with section server, tls, acme or store;"
                    " TLSPROXY_HOSTS, TLSPROXY_UPSTREAM, TLSPROXY_SITE_<KEY>, TLSPROXY_STATE_DIR;"
                    f" not configuration: {', '.join(PROCESS_ENV)})",
                )
            )
    if env_site:
        if raw.get("site"):
            problems.append(
                Problem(
                    f"environment {', '.join(site_names)}",
                    "site",
                    "the configuration file already has [[site]] tables, and these variables make a site of"
                    " their own: set the key in the file's [[site]] instead, or unset the variables",
                )
            )
        else:
            raw["site"] = [env_site]
    return raw


def _env_names(environ: Mapping[str, str]) -> dict[str, str]:
    """Map config keys to the environment variable that set them, for messages."""
    names: dict[str, str] = {}
    for name in environ:
        if not name.startswith(ENV_PREFIX) or name in PROCESS_ENV:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        if name in _SITE_ENV:
            names[f"site[0].{_SITE_ENV[name]}"] = name
        elif name == "TLSPROXY_STATE_DIR":
            names["server.state_dir"] = name
        else:
            section, _, key = rest.partition("_")
            names[f"{'site[0]' if section == 'site' else section}.{key}"] = name
    return names


# ---------------------------------------------------------------------------
# Entry points


def dev_app_hint(upstream: Upstream) -> str:
    """How to start the app the dev proxy expects, on the address it was given."""
    if upstream.is_unix:
        return f"start your app on that socket (gunicorn --bind unix:{upstream.unix_path})"
    if upstream.host in ("127.0.0.1", "localhost") and upstream.port == 8000:
        return "start your app (for Django: python manage.py runserver)"
    address = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
    return f"start your app there (for Django: python manage.py runserver {address}:{upstream.port})"


def dev_config(upstream: str = DEFAULT_DEV_UPSTREAM, listen: tuple[str, ...] = DEFAULT_DEV_HTTPS) -> Config:
    """The embedded default: HTTPS on localhost:8443 in front of a local app."""
    parsed = parse_upstream(upstream)
    if isinstance(parsed, str):
        raise ConfigError([Problem("--upstream", "upstream", f"{upstream!r}: {parsed}")])
    listen = tuple(endpoint for description in listen for endpoint in local_endpoints(description))
    for description in listen:
        why = check_endpoint(description)
        if why:
            raise ConfigError([Problem("--listen", "listen", f"{description!r}: {why}")])
    site = Site(hosts=LOCAL_HOSTS, upstream=parsed, tls="local", hsts=HSTS(max_age=0), secure_cookies=False)
    return Config(server=Server(https=listen, http=()), sites=(site,), source="<dev default>", dev=True)


def parse(raw: Mapping[str, Any], source: str, environ: Mapping[str, str] | None = None) -> Config:
    """Validate a raw TOML table (plus environment overrides) into a Config."""
    environ = {} if environ is None else environ
    problems: list[Problem] = []
    merged = apply_environment(dict(raw), environ, problems)
    from_env = _env_names(environ)

    def where(key: str) -> str:
        if key in from_env:
            return f"environment {from_env[key]}"
        return source

    reader = _Reader(where, problems)
    sections = {"server": 0, "tls": 0, "acme": 0, "store": 0, "site": 0}
    # [static] or upstream = ... above any [[site]] ("tls" is a section first)
    misplaced = [key for key in merged if key in SITE_DEFAULTS and key not in sections]
    for key in misplaced:
        reader.fail(key, f"a key of a site: put it under a [[site]] table (as [site.{key}] for a table)")
    reader.table({key: value for key, value in merged.items() if key not in misplaced}, "", sections)

    def section(name: str) -> Mapping[str, Any]:
        value = merged.get(name, {})
        if not isinstance(value, Mapping):
            reader.fail(name, f"expected a table [{name}], found {_describe(value)}")
            return {}
        return value

    server = _server(reader, section("server"))
    tls = _tls(reader, section("tls"))
    acme = _acme(reader, section("acme"))
    store = _store(reader, section("store"))
    raw_sites = merged.get("site", [])
    if not isinstance(raw_sites, list):
        found = (
            "a single [site] table: write [[site]] (double brackets), one per site"
            if isinstance(raw_sites, Mapping)
            else _describe(raw_sites)
        )
        reader.fail("site", f"expected [[site]] tables, found {found}")
        raw_sites = None
    sites = [s for i, raw_site in enumerate(raw_sites or []) if (s := _site(reader, raw_site, i))]
    if raw_sites == []:
        reader.fail("site", "no [[site]] configured (or set TLSPROXY_HOSTS and TLSPROXY_UPSTREAM)")
    seen: dict[str, int] = {}
    for i, site in enumerate(sites):
        for host in site.hosts:
            if host in seen:
                reader.fail(f"site[{i}].hosts", f"{host!r} is already a host of site[{seen[host]}]")
            seen.setdefault(host, i)
    if any(s.tls == "acme" for s in sites):
        mistyped = any(p.key == "acme.agree_tos" for p in problems)  # said already: one line is enough
        if not acme.agree_tos and not mistyped:
            how = "TLSPROXY_ACME_AGREE_TOS=true" if not raw else "agree_tos = true in [acme]"
            reader.fail(
                "acme.agree_tos",
                f'a site uses tls = "acme": set {how} to accept the terms of service of {acme.directory_url}',
            )
        for i, site in enumerate(sites):
            wild = [h for h in site.hosts if h.startswith("*.")]
            if site.tls == "acme" and wild:
                reader.fail(f"site[{i}].hosts", f"{wild[0]!r}: wildcard names need DNS-01, which tlsproxy does not do")
    if problems:
        raise ConfigError(problems)
    return Config(server=server, tls=tls, acme=acme, store=store, sites=tuple(sites), source=source)


def toml_problem(path: str, error: tomllib.TOMLDecodeError) -> Problem:
    """A TOML syntax error placed by line and column, as an editor shows them."""
    message = str(error)
    where = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if where is None:
        return Problem(path, "", f"not valid TOML: {message}")
    return Problem(path, f"line {where[1]}, column {where[2]}", f"not valid TOML: {message[: where.start()]}")


def load(path: str | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or TLSPROXY_CONFIG), apply the environment, validate.

    With neither a file nor any TLSPROXY_ variable, this is the dev default.
    """
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get("TLSPROXY_CONFIG") or None
    if path is None:
        if not any(k.startswith(ENV_PREFIX) and k not in PROCESS_ENV for k in environ):
            return dev_config()
        return parse({}, "<environment>", environ)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Problem(path, "", f"cannot read the configuration file: {e.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([Problem(path, "", "the file is not UTF-8 text")]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([toml_problem(path, e)]) from None
    return parse(raw, path, environ)

"""Real parts for the proxy integration tests: a Django app under gunicorn (TCP and unix socket),
trustme certificates on disk, `twist tlsproxy` with a written config, and small clients.

Expensive processes are module-scoped: one gunicorn and one proxy per module and upstream kind.
"""

from __future__ import annotations

import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from tests.integration.procs import BIN, Process, free_port, running, tlsproxy

HERE = Path(__file__).parent
APP_ENV = {"DJANGO_SETTINGS_MODULE": "djangoapp.settings", "PYTHONPATH": str(HERE)}
HOSTS = ("localhost", "app.test")
HSTS_VALUE = "max-age=31536000; includeSubDomains"
UPSTREAM_KINDS = ("tcp", "unix")


# ---------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True)
class PKI:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_pem))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A trustme CA and one server certificate for every test host, written as PEM files."""
    where = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    leaf = ca.issue_cert(*HOSTS, "127.0.0.1")
    ca_pem, cert_pem, key_pem = where / "ca.pem", where / "fullchain.pem", where / "key.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert_pem.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key_pem))
    key_pem.chmod(0o600)
    return PKI(ca_pem, cert_pem, key_pem)


# ---------------------------------------------------------------------------
# The app: gunicorn (WSGI) or uvicorn (ASGI) serving tests/integration/djangoapp


@dataclass
class App:
    """A running app server; ``url`` is what a tlsproxy site's ``upstream`` takes."""

    kind: str
    url: str
    hits_log: Path
    process: Process
    tcp_port: int = 0
    unix_path: str = ""

    def hits(self) -> str:
        """Every request line Django has seen so far (method, path and query, one per line)."""
        return self.hits_log.read_text() if self.hits_log.exists() else ""

    def connect(self, timeout: float = 5.0) -> socket.socket:
        if self.unix_path:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(self.unix_path)
            return s
        return socket.create_connection(("127.0.0.1", self.tcp_port), timeout=timeout)

    def get_directly(self, path: str = "/whoami") -> bytes:
        """One plain HTTP/1.0 GET to the app, not through the proxy: the whole response."""
        with self.connect() as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            return _read_to_eof(s)


def _read_to_eof(s: socket.socket) -> bytes:
    out = bytearray()
    while True:
        data = s.recv(65536)
        if not data:
            return bytes(out)
        out += data


def _wait_until_app_answers(app: App, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            if b" 200 " in app.get_directly().split(b"\r\n", 1)[0]:
                return
        except OSError:
            pass
        if app.process.proc.poll() is not None:
            raise RuntimeError(f"app server exited {app.process.proc.returncode}:\n{app.process.output}")
        if time.monotonic() > end:
            raise TimeoutError(f"app did not answer /whoami within {deadline}s:\n{app.process.output}")
        time.sleep(0.1)


def app_address(kind: str, where: Path, port: int | None = None) -> tuple[str, str, int, str]:
    """(bind argument, upstream URL, tcp port, unix path) for a new app of this kind."""
    if kind == "tcp":
        port = port or free_port()
        return f"127.0.0.1:{port}", f"http://127.0.0.1:{port}", port, ""
    path = str(where / f"app-{uuid.uuid4().hex[:8]}.sock")
    return f"unix:{path}", f"unix:{path}", 0, path


@contextmanager
def gunicorn(
    kind: str,
    where: Path,
    *,
    worker_class: str = "sync",
    extra: tuple[str, ...] = (),
    address: tuple[str, str, int, str] | None = None,
) -> Iterator[App]:
    """Django under gunicorn (2 workers), bound to a free TCP port or a unix socket, until stopped."""
    bind, url, port, path = address or app_address(kind, where)
    hits_log = where / f"hits-{uuid.uuid4().hex[:8]}.log"
    argv = [
        str(BIN / "gunicorn"),
        "--bind", bind,
        "--workers", "2",
        "--worker-class", worker_class,
        "--access-logfile", "-",
        "--graceful-timeout", "2",
        # gunicorn's default drops header names with "_"; map them as other WSGI servers do, so a
        # client's X_Forwarded_Proto that the proxy failed to remove would show in Django.
        "--header-map", "dangerous",
        # No size or count limits of its own: a 414 or 431 the tests see can only be the proxy's.
        "--limit-request-line", "0",
        "--limit-request-fields", "32768",
        "--limit-request-field_size", "0",
        *extra,
        "djangoapp.wsgi:application",
    ]  # fmt: skip
    with running(argv, env={**APP_ENV, "DJANGOAPP_HITS_LOG": str(hits_log)}, cwd=str(HERE)) as process:
        app = App(kind, url, hits_log, process, port, path)
        _wait_until_app_answers(app)
        yield app


@contextmanager
def uvicorn(where: Path) -> Iterator[App]:
    """The ASGI app (WebSocket echo + Django) under uvicorn on a free TCP port."""
    port = free_port()
    hits_log = where / f"hits-{uuid.uuid4().hex[:8]}.log"
    argv = [
        str(BIN / "uvicorn"), "--host", "127.0.0.1", "--port", str(port),
        "--ws", "websockets-sansio", "--no-server-header", "djangoapp.asgi:application",
    ]  # fmt: skip
    with running(argv, env={**APP_ENV, "DJANGOAPP_HITS_LOG": str(hits_log)}, cwd=str(HERE)) as process:
        app = App("tcp", f"http://127.0.0.1:{port}", hits_log, process, port, "")
        _wait_until_app_answers(app)
        yield app


@pytest.fixture(scope="module", params=UPSTREAM_KINDS)
def app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """Django under gunicorn with sync workers, once on TCP and once on a unix socket."""
    with gunicorn(request.param, tmp_path_factory.mktemp(f"app-{request.param}")) as running_app:
        yield running_app


# ---------------------------------------------------------------------------
# The proxy


def _toml_key(key: str) -> str:
    """A bare key as is; any other (a URL prefix like "/static/") quoted."""
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml(key)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def proxy_config(
    port: int, upstream: str, pki: PKI, state_dir: Path, *, server: dict[str, Any] | None = None, **site: Any
) -> str:
    """The TOML for one HTTPS listener on 127.0.0.1:port and one site for every test host."""
    server_table = {
        "https": [f"tcp:{port}:interface=127.0.0.1"],
        "http": [],
        "state_dir": str(state_dir),
        "upstream_timeout": 2,
        **(server or {}),
    }
    site_table = {
        "hosts": list(HOSTS),
        "upstream": upstream,
        "tls": "files",
        "cert": str(pki.cert_pem),
        "key": str(pki.key_pem),
        "hsts": {"max_age": 31536000, "include_subdomains": True},
        "secure_cookies": True,
        "max_body_size": "64M",
        **site,
    }
    lines = ["[server]"]
    lines += [f"{k} = {_toml(v)}" for k, v in server_table.items()]
    lines += ["", "[[site]]"]
    lines += [f"{k} = {_toml(v)}" for k, v in site_table.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Proxy:
    port: int
    pki: PKI
    process: Process
    config: Path
    hosts: tuple[str, ...] = field(default=HOSTS)

    def origin(self, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}"

    def client(self, *, http2: bool = False, timeout: float = 30.0, **kw: Any) -> httpx.Client:
        """An httpx client that trusts the test CA, with base URL https://localhost:PORT."""
        return httpx.Client(
            base_url=self.origin(),
            verify=self.pki.client_context(),
            http2=http2,
            http1=True,
            timeout=timeout,
            trust_env=False,
            **kw,
        )

    def raw(self, host: str = "localhost", timeout: float = 5.0) -> RawTLS:
        return RawTLS(self.port, self.pki, host, timeout)


@contextmanager
def start_proxy(
    where: Path, upstream: str, pki: PKI, *, server: dict[str, Any] | None = None, **site: Any
) -> Iterator[Proxy]:
    """`twist tlsproxy --config FILE` in front of ``upstream``, until stopped."""
    port = free_port()
    state_dir = where / f"state-{port}"
    state_dir.mkdir(mode=0o700)
    config = where / f"tlsproxy-{port}.toml"
    config.write_text(proxy_config(port, upstream, pki, state_dir, server=server, **site))
    with tlsproxy(config) as process:
        yield Proxy(port, pki, process, config)


@pytest.fixture(scope="module")
def proxy(app: App, pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """tlsproxy in front of the module's gunicorn (TCP or unix socket), with upstream_timeout = 2."""
    with start_proxy(tmp_path_factory.mktemp("proxy"), app.url, pki) as running_proxy:
        yield running_proxy


# ---------------------------------------------------------------------------
# A raw TLS client: exact bytes out, everything that comes back in


@dataclass
class Reply:
    """What came back on one raw connection."""

    data: bytes
    closed: bool  # the server ended the connection (EOF or reset), rather than us timing out
    reset: bool
    elapsed: float

    @property
    def status_line(self) -> str:
        return self.data.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def status(self) -> int:
        parts = self.status_line.split(" ")
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0

    @property
    def from_gunicorn(self) -> bool:
        """Whether this is gunicorn's own error page (so the proxy passed the request on)."""
        return b"<h1><p>" in self.data

    def parse(self) -> tuple[int, list[tuple[str, str]], bytes]:
        """(status, headers, body) of the first response; a chunked body is decoded."""
        head, _, body = self.data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if ":" in line]
        names = {k.lower(): v for k, v in headers}
        if names.get("transfer-encoding", "").lower() == "chunked":
            body = _dechunk(body)
        elif "content-length" in names:
            body = body[: int(names["content-length"])]
        return self.status, headers, body  # type: ignore[return-value]


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


class RawTLS:
    """One TLS connection (ALPN http/1.1) to the proxy, for requests no polite client would send."""

    def __init__(self, port: int, pki: PKI, host: str, timeout: float) -> None:
        ctx = pki.client_context()
        ctx.set_alpn_protocols(["http/1.1"])
        self.timeout = timeout
        plain = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(plain, server_hostname=host)

    def __enter__(self) -> RawTLS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until_closed(self, timeout: float | None = None) -> Reply:
        """Everything the server sends until it closes the connection or ``timeout`` passes."""
        return self._read(timeout, lambda data: False)

    def read_response(self, timeout: float | None = None) -> Reply:
        """One complete response (by Content-Length or chunked end), leaving the connection open."""
        return self._read(timeout, _complete)

    def _read(self, timeout: float | None, enough: Any) -> Reply:
        start = time.monotonic()
        end = start + (timeout if timeout is not None else self.timeout)
        out = bytearray()
        closed = reset = False
        while not enough(bytes(out)):
            left = end - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                closed = True
                break
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                closed = reset = True
                break
            if not data:
                closed = True
                break
            out += data
        return Reply(bytes(out), closed, reset, time.monotonic() - start)

    def exchange(self, request: bytes, timeout: float | None = None) -> Reply:
        """Send ``request`` whole, then read until the server closes (or the timeout)."""
        try:
            self.send(request)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            pass  # the server may answer and close before taking all of it; read what it said
        return self.read_until_closed(timeout)


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    names = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        k, _, v = line.partition(":")
        names[k.strip().lower()] = v.strip()
    if names.get("transfer-encoding", "").lower() == "chunked":
        return body.endswith(b"0\r\n\r\n")
    return len(body) >= int(names.get("content-length", "0"))


def marker() -> str:
    """A value unique to one test request, to look for in the app's hits log."""
    return uuid.uuid4().hex

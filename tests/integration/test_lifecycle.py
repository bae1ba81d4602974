"""Signals, reload, the admin endpoint and JSON logs of a running `twist tlsproxy`."""

from __future__ import annotations

import datetime
import http.client
import json
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from tests.integration.procs import Process, free_port, running, tlsproxy

pytestmark = pytest.mark.integration
BACKEND = str(Path(__file__).with_name("backend.py"))


class AppConnection(http.client.HTTPSConnection):
    """HTTPS to app.test, dialled on 127.0.0.1."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        super().__init__("app.test", port, context=context, timeout=20)

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname="app.test")  # type: ignore[attr-defined]


@dataclass
class Setup:
    where: Path
    ca: trustme.CA
    https: int
    admin: int
    upstream: int
    backend: Process | None = None

    def config(self, *, upstream: int | None = None, extra: str = "", cert: str = "cert") -> Path:
        path = self.where / "config.toml"
        path.write_text(
            f"""
[server]
https = ["tcp:{self.https}:interface=127.0.0.1"]
http = []
admin = "tcp:{self.admin}:interface=127.0.0.1"
shutdown_grace = 10
{extra}
[[site]]
hosts = ["app.test"]
upstream = "http://127.0.0.1:{upstream or self.upstream}"
tls = "files"
cert = "{self.where}/{cert}.pem"
key = "{self.where}/{cert}.key"
"""
        )
        return path

    def leaf(self, name: str) -> int:
        now = datetime.datetime.now(datetime.UTC)
        leaf = self.ca.issue_cert("app.test", not_before=now - datetime.timedelta(hours=1))
        chain = b"".join(b.bytes() for b in leaf.cert_chain_pems)
        (self.where / f"{name}.pem").write_bytes(chain)
        (self.where / f"{name}.key").write_bytes(leaf.private_key_pem.bytes())
        return x509.load_pem_x509_certificate(chain).serial_number

    def client(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def connection(self) -> http.client.HTTPSConnection:
        return AppConnection(self.https, self.client())

    def get(self, path: str, conn: http.client.HTTPSConnection | None = None) -> tuple[int, bytes]:
        own = conn is None
        conn = conn or self.connection()
        conn.request("GET", path, headers={"Host": "app.test"})
        response = conn.getresponse()
        body = response.read()
        if own:
            conn.close()
        return response.status, body

    def served_serial(self) -> int:
        ctx = self.client()
        with (
            socket.create_connection(("127.0.0.1", self.https)) as raw,
            ctx.wrap_socket(raw, server_hostname="app.test") as tls,
        ):
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number

    def admin_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path, trustme.CA(), free_port(), free_port(), free_port())
    s.leaf("cert")
    with running([sys.executable, BACKEND, str(s.upstream)]) as backend:
        backend.wait_for_line("backend ready")
        s.backend = backend
        yield s


def test_sigterm_drains_requests_in_flight(setup: Setup) -> None:
    """SIGTERM stops accepting, lets a slow request finish, then exits 0."""
    with tlsproxy(setup.config()) as proxy:
        result: dict[str, object] = {}

        def slow() -> None:
            result["answer"] = setup.get("/slow?s=2")

        assert setup.backend is not None
        start = len(setup.backend.lines)
        worker = threading.Thread(target=slow)
        worker.start()
        setup.backend.wait_for_line("slow request started", 10, start=start)  # in flight at the proxy
        proxy.signal(signal.SIGTERM)
        proxy.wait_for_line("stopping", 10)
        # The listener closes on the reactor's next turn after the log line: a moment later at most.
        end = time.monotonic() + 5
        while True:
            try:
                setup.get("/")
            except OSError:
                break
            assert time.monotonic() < end, "new connections still accepted 5 s after SIGTERM"
            time.sleep(0.05)
        worker.join(10)
        assert result["answer"] == (200, b"hello /slow\n")
        assert proxy.proc.wait(10) == 0


def test_sighup_reload_swaps_certificate_keeps_connections(setup: Setup) -> None:
    """SIGHUP with a new certificate: new handshakes get it, an open connection keeps working."""
    with tlsproxy(setup.config()) as proxy:
        before = setup.served_serial()
        kept = setup.connection()
        assert setup.get("/a", kept) == (200, b"hello /a\n")
        new_serial = setup.leaf("cert2")
        setup.config(cert="cert2")
        mark = len(proxy.lines)
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_line("configuration reloaded", 10, start=mark)
        assert setup.served_serial() == new_serial != before
        assert setup.get("/b", kept) == (200, b"hello /b\n")


def test_sighup_bad_config_refused(setup: Setup) -> None:
    """A reload with a broken config is refused with a clear line; the old one keeps serving."""
    with tlsproxy(setup.config()) as proxy:
        config = setup.config()
        config.write_text('[tls]\nmin_version = "1.0"\n' + config.read_text())
        mark = len(proxy.lines)
        proxy.signal(signal.SIGHUP)
        line = proxy.wait_for_line("reload refused", 10, start=mark)
        assert "tls.min_version" in line
        assert setup.get("/") == (200, b"hello /\n")


def test_admin_endpoints(setup: Setup) -> None:
    """/healthz, /readyz and /metrics answer; readiness follows the upstream."""
    with tlsproxy(setup.config()):
        assert setup.admin_get("/healthz") == (200, "ok\n")
        status, ready = setup.admin_get("/readyz")
        assert (status, ready.splitlines()[0]) == (200, "ready")
        assert " (site app.test): up, 0 in flight, 0 failures" in ready  # each upstream's state follows
        setup.get("/")
        status, metrics = setup.admin_get("/metrics")
        assert status == 200
        assert 'tlsproxy_requests_total{site="app.test",status="200"} 1.0' in metrics
        assert "tlsproxy_tls_handshakes_total" in metrics
        assert 'tlsproxy_certificate_not_after_seconds{site="app.test"}' in metrics
        assert "tlsproxy_upstream_latency_seconds_count" in metrics
    dead = free_port()
    with tlsproxy(setup.config(upstream=dead)):
        status, body = setup.admin_get("/readyz")
        assert status == 503
        assert f"upstream http://127.0.0.1:{dead}" in body


def test_json_logs(setup: Setup) -> None:
    """log_format = "json" gives one JSON object per line, access lines included."""
    with tlsproxy(setup.config(extra='log_format = "json"')) as proxy:
        setup.get("/json")
        line = proxy.wait_for_line('"target":"/json"')  # the fields, not the text line
        lines = proxy.output.splitlines()  # one snapshot: the reader thread keeps appending
        records = [json.loads(entry) for entry in lines if entry.startswith("{")]
        assert len(records) == len(lines)
        access = json.loads(line)
        assert access["logger"] == "tlsproxy.access" and access["status"] == 200


def test_upstream_down_page(setup: Setup) -> None:
    """An app that is down gets a short 502 page, and the proxy keeps serving."""
    with tlsproxy(setup.config(upstream=free_port())):
        status, body = setup.get("/")
        assert status == 502
        assert b"Traceback" not in body and len(body) < 1000
        assert setup.get("/")[0] == 502


def test_h2_upload_and_drain(setup: Setup) -> None:
    """Over HTTP/2 a 5 MiB upload arrives whole, and SIGTERM still lets a slow h2 answer finish."""
    import subprocess

    ca = setup.where / "ca.pem"
    setup.ca.cert_pem.write_to_path(str(ca))
    base = ["curl", "-sS", "--http2", "--cacert", str(ca), "--resolve", f"app.test:{setup.https}:127.0.0.1"]
    url = f"https://app.test:{setup.https}"
    with tlsproxy(setup.config()) as proxy:
        body = setup.where / "body"
        body.write_bytes(b"a" * (5 * 1024 * 1024))
        upload = subprocess.run(
            [*base, "-w", " %{http_version}", "--data-binary", f"@{body}", f"{url}/upload"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert upload.stdout == f"{5 * 1024 * 1024}\n 2", upload.stderr
        # curl (nghttp2) handles a graceful GOAWAY as browsers do; the h2
        # library's client treats any GOAWAY as the end of every stream.
        assert setup.backend is not None
        start = len(setup.backend.lines)
        slow = subprocess.Popen([*base, "-w", " %{http_version}", f"{url}/slow?s=2"], stdout=subprocess.PIPE, text=True)
        setup.backend.wait_for_line("slow request started", 10, start=start)  # in flight at the proxy
        proxy.signal(signal.SIGTERM)
        out, _ = slow.communicate(timeout=20)
        assert out == "hello /slow\n 2"
        assert proxy.proc.wait(10) == 0


def test_second_sigterm_during_the_drain_is_harmless(setup: Setup) -> None:
    """A second SIGTERM while requests drain says so, logs no traceback, and the exit is still 0."""
    with tlsproxy(setup.config()) as proxy:
        result: dict[str, object] = {}

        def slow() -> None:
            result["answer"] = setup.get("/slow?s=2")

        assert setup.backend is not None
        start = len(setup.backend.lines)
        worker = threading.Thread(target=slow)
        worker.start()
        setup.backend.wait_for_line("slow request started", 10, start=start)
        proxy.signal(signal.SIGTERM)
        proxy.wait_for_line("stopping", 10)
        proxy.signal(signal.SIGTERM)
        proxy.wait_for_line("already shutting down", 10)
        worker.join(10)
        assert result["answer"] == (200, b"hello /slow\n")
        assert proxy.proc.wait(10) == 0
        assert "Traceback" not in proxy.output and "ReactorNotRunning" not in proxy.output


def test_sighup_applies_a_new_log_format(setup: Setup) -> None:
    """A reload that changes log_format to json writes the following lines as JSON."""
    with tlsproxy(setup.config()) as proxy:
        setup.config(extra='log_format = "json"')
        mark = len(proxy.lines)
        proxy.signal(signal.SIGHUP)
        line = proxy.wait_for_line("configuration reloaded", 10, start=mark)
        assert json.loads(line)["level"] == "info"
        setup.get("/after")
        access = json.loads(proxy.wait_for_line('"target":"/after"', 10, start=mark))
        assert access["logger"] == "tlsproxy.access" and access["status"] == 200


def test_sighup_with_a_listener_that_cannot_bind_says_which(setup: Setup) -> None:
    """A reload whose new listener cannot bind names it and why; the rest serves; the next reload retries it."""
    with tlsproxy(setup.config()) as proxy, socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        busy = held.getsockname()[1]
        config = setup.config()
        config.write_text(config.read_text().replace("http = []", f'http = ["tcp:{busy}:interface=127.0.0.1"]'))
        mark = len(proxy.lines)
        proxy.signal(signal.SIGHUP)
        line = proxy.wait_for_line("cannot listen on", 10, start=mark)
        assert f"tcp:{busy}:interface=127.0.0.1 (http (ACME HTTP-01, redirect to https))" in line
        assert "Address already in use" in line
        proxy.wait_for_line("reloaded, but a new listener failed", 10, start=mark)
        assert setup.get("/") == (200, b"hello /\n")
        held.close()  # the port is free now: the next reload binds it
        mark = len(proxy.lines)
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_line("configuration reloaded", 10, start=mark)
        assert any(f"listening on 127.0.0.1:{busy}" in line for line in proxy.lines[mark:])
        assert "Traceback" not in proxy.output


def test_readyz_wants_an_answer_from_the_app(setup: Setup) -> None:
    """/readyz is 503 for an app that accepts connections but never answers; /metrics has process figures."""
    with socket.socket() as hanging:
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(16)  # the kernel accepts; nobody ever reads or answers
        port = hanging.getsockname()[1]
        with tlsproxy(setup.config(upstream=port)):
            started = time.monotonic()
            status, body = setup.admin_get("/readyz")
            assert status == 503, body
            assert f"upstream http://127.0.0.1:{port}: no answer within" in body
            assert time.monotonic() - started < 8
            status, metrics = setup.admin_get("/metrics")
            assert status == 200
            assert "process_resident_memory_bytes " in metrics and "process_open_fds " in metrics
            assert 'tlsproxy_certificate_expiry_timestamp_seconds{site="app.test"}' in metrics

"""The access log file and request ids, error pages and maintenance mode, through `twist tlsproxy` to Django."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import PKI, App, _toml, gunicorn, proxy_config
from tests.integration.procs import Process, free_port, tlsproxy

pytestmark = pytest.mark.integration

FIELDS = {
    "time",
    "client",
    "method",
    "target",
    "protocol",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "host",
    "site",
    "upstream",
    "request_id",
    "referer",
    "user_agent",
}


@dataclass
class Setup:
    port: int
    pki: PKI
    app: App
    process: Process
    log: Path
    maintenance: Path
    dead_upstream: str

    def fetch(
        self, host: str, path: str, headers: dict[str, str] | None = None, method: str = "GET", body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        request = f"{method} {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: test-agent\r\n"
        for name, value in (headers or {}).items():
            request += f"{name}: {value}\r\n"
        if body:
            request += f"Content-Length: {len(body)}\r\n"
        with self.pki.client_context().wrap_socket(s, server_hostname=host) as tls:
            tls.sendall((request + "\r\n").encode() + body)
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        head, _, payload = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split(" ")[1]), fields, payload

    def logged(self, request_id: str, path: Path | None = None, deadline: float = 10.0) -> dict:
        """The file's record of ``request_id`` (the file is written about once a second)."""
        path = path or self.log
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if path.exists():
                for line in path.read_text().splitlines():
                    record = json.loads(line)  # every line is JSON
                    if record["request_id"] == request_id:
                        return record
            time.sleep(0.1)
        raise AssertionError(f"no record of {request_id} in {path}")


@pytest.fixture(scope="module")
def setup(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    where = tmp_path_factory.mktemp("accesslog")
    (where / "502.html").write_text("<h1>We are fixing it</h1><p>id {request_id}</p>")
    (where / "503.html").write_text("<h1>Maintenance</h1><p>id {request_id}</p>")
    with gunicorn("tcp", where) as app:
        port = free_port()
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        state = where / "state"
        state.mkdir(mode=0o700)
        log = where / "access.log"
        maintenance = where / "maintenance.on"
        server = {"access_log_file": str(log), "log_format": "json"}
        text = proxy_config(
            port,
            app.url,
            pki,
            state,
            server=server,
            hosts=["localhost"],
            maintenance_file=str(maintenance),
            error_pages={"503": str(where / "503.html")},
        )
        text += "\n".join(
            [
                "",
                "[[site]]",
                'hosts = ["app.test"]',
                f"upstream = {_toml(dead)}",
                'tls = "files"',
                f"cert = {_toml(str(pki.cert_pem))}",
                f"key = {_toml(str(pki.key_pem))}",
                f"error_pages = {{ 502 = {_toml(str(where / '502.html'))} }}",
                "",
            ]
        )
        config = where / "tlsproxy.toml"
        config.write_text(text)
        with tlsproxy(config) as process:
            yield Setup(port, pki, app, process, log, maintenance, dead)


def test_request_id_reaches_django_and_the_log(setup: Setup) -> None:
    """Django gets our X-Request-ID (not the client's); the file's JSON line has it and every field."""
    status, _, body = setup.fetch("localhost", "/whoami", {"X-Request-ID": "client-chosen"})
    assert status == 200
    request_id = json.loads(body)["meta"]["HTTP_X_REQUEST_ID"]
    assert request_id != "client-chosen" and len(request_id) == 24
    record = setup.logged(request_id)
    assert set(record) == FIELDS
    assert (record["status"], record["host"], record["site"], record["upstream"]) == (
        200,
        "localhost",
        "localhost",
        setup.app.url,
    )
    assert record["bytes_out"] > 0 and record["duration_ms"] > 0 and record["user_agent"] == "test-agent"
    assert record["time"].endswith("Z") and len(record["time"].split(".")[1]) == 4  # milliseconds


def test_bytes_in_counts_the_body(setup: Setup) -> None:
    """bytes_in is the request body the client sent."""
    status, _, _ = setup.fetch("localhost", "/upload", method="POST", body=b"x" * 1000)
    assert status == 200
    # The app's answer carries no id: the line is found by its target.
    end = time.monotonic() + 10
    while time.monotonic() < end:
        records = [json.loads(line) for line in setup.log.read_text().splitlines()] if setup.log.exists() else []
        if any(r["target"] == "/upload" for r in records):
            break
        time.sleep(0.1)
    (record,) = [r for r in records if r["target"] == "/upload"]
    assert (record["method"], record["bytes_in"]) == ("POST", 1000)


def test_stdout_json_lines_are_the_fields_once(setup: Setup) -> None:
    """With log_format = "json", the stdout access line is the fields, without the text line in "message"."""
    _, _, body = setup.fetch("localhost", "/whoami?stdout")
    request_id = json.loads(body)["meta"]["HTTP_X_REQUEST_ID"]
    line = setup.process.wait_for_line(request_id, deadline=5)
    record = json.loads(line)
    assert record["logger"] == "tlsproxy.access" and "message" not in record
    assert FIELDS <= set(record) and record["target"] == "/whoami?stdout"


def test_error_page_of_the_site_with_the_request_id(setup: Setup) -> None:
    """An unreachable app: the site's own 502 page, its {request_id} filled in, the same id in the log."""
    status, headers, body = setup.fetch("app.test", "/anything")
    assert status == 502
    request_id = headers["x-request-id"]
    assert body == f"<h1>We are fixing it</h1><p>id {request_id}</p>".encode()
    record = setup.logged(request_id)
    assert (record["status"], record["upstream"], record["site"]) == (502, setup.dead_upstream, "app.test")


def test_maintenance_file_turns_the_site_to_503(setup: Setup) -> None:
    """While the maintenance file exists the site answers 503 with its page; removed, Django answers again."""
    setup.maintenance.touch()
    try:
        end = time.monotonic() + 10
        while (answer := setup.fetch("localhost", "/whoami"))[0] != 503 and time.monotonic() < end:
            time.sleep(0.2)
        status, headers, body = answer
        assert status == 503 and headers["retry-after"] == "60"
        assert body == f"<h1>Maintenance</h1><p>id {headers['x-request-id']}</p>".encode()
        assert setup.fetch("localhost", "/.well-known/acme-challenge/t")[0] == 404  # Django's: passed
    finally:
        setup.maintenance.unlink()
    end = time.monotonic() + 10
    while setup.fetch("localhost", "/whoami")[0] != 200:
        assert time.monotonic() < end, "maintenance mode did not end"
        time.sleep(0.2)


def test_sigusr1_after_rename_writes_the_new_file(setup: Setup) -> None:
    """logrotate's way: rename the file, send SIGUSR1; later lines go to a new file at the old name."""
    _, _, body = setup.fetch("localhost", "/whoami?before")
    before = json.loads(body)["meta"]["HTTP_X_REQUEST_ID"]
    setup.logged(before)
    rotated = setup.log.with_name("access.log.1")
    setup.log.rename(rotated)
    setup.process.signal(signal.SIGUSR1)
    setup.process.wait_for_line("SIGUSR1", deadline=5)
    _, _, body = setup.fetch("localhost", "/whoami?after")
    after = json.loads(body)["meta"]["HTTP_X_REQUEST_ID"]
    record = setup.logged(after)  # in the new file at the old name
    assert record["target"] == "/whoami?after"
    assert after not in rotated.read_text() and before in rotated.read_text()
    assert "Traceback" not in setup.process.output


def test_lines_pending_at_sigterm_reach_the_file(setup: Setup, tmp_path: Path) -> None:
    """A request logged just before SIGTERM is in the file once the process has exited 0."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    log = tmp_path / "access.log"
    port = free_port()
    config = tmp_path / "t.toml"
    config.write_text(
        proxy_config(port, setup.app.url, setup.pki, state, server={"access_log_file": str(log)}, hosts=["localhost"])
    )
    with tlsproxy(config) as process:
        other = Setup(port, setup.pki, setup.app, process, log, setup.maintenance, setup.dead_upstream)
        _, _, body = other.fetch("localhost", "/whoami?last")
        request_id = json.loads(body)["meta"]["HTTP_X_REQUEST_ID"]
        assert process.stop() == 0  # SIGTERM at once: the batch timer has not fired yet
    assert request_id in log.read_text()

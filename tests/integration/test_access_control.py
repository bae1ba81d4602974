"""Allow/deny lists and basic auth on a whole site and on a path, through `twist tlsproxy` to Django."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import PKI, App, _toml, gunicorn, proxy_config, start_proxy
from tests.integration.procs import BIN, Process, free_port, tlsproxy

pytestmark = pytest.mark.integration


@dataclass
class Setup:
    https: int
    http: int
    pki: PKI
    app: App
    process: Process
    htpasswd: Path | None = None

    def fetch(
        self, host: str, path: str, *, user: str = "", password: str = "", source: str = "127.0.0.1"
    ) -> tuple[int, bytes, bytes]:
        """One HTTP/1.0 GET over TLS from ``source``: (status, head, body)."""
        s = socket.socket()
        s.settimeout(10)
        s.bind((source, 0))
        s.connect(("127.0.0.1", self.https))
        request = f"GET {path} HTTP/1.0\r\nHost: {host}\r\n"
        if user:
            request += "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode() + "\r\n"
        with self.pki.client_context().wrap_socket(s, server_hostname=host) as tls:
            tls.sendall((request + "\r\n").encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), head, body

    def reached_app(self, path: str) -> bool:
        return f" GET {path}\n" in self.app.hits()


@pytest.fixture(scope="module")
def setup(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    where = tmp_path_factory.mktemp("access")
    htpasswd = where / "htpasswd"
    # One line from our own command, one from Apache's: both are read.
    subprocess.run(
        [str(BIN / "tlsproxy"), "passwd", str(htpasswd), "ann", "--stdin", "--cost", "4"],
        input="s3cret\n",
        text=True,
        check=True,
        capture_output=True,
    )
    subprocess.run(["htpasswd", "-bB", "-C", "4", str(htpasswd), "bob", "b0bpass"], check=True, capture_output=True)
    with gunicorn("tcp", where) as app:
        https, http = free_port(), free_port()
        state = where / "state"
        state.mkdir(mode=0o700)
        server = {"http": [f"tcp:{http}:interface=127.0.0.1"]}
        # localhost: the whole site behind a password (a staging site), one address denied.
        text = proxy_config(
            https,
            app.url,
            pki,
            state,
            server=server,
            hosts=["localhost"],
            basic_auth={"realm": "staging", "htpasswd": str(htpasswd)},
            deny=["127.0.0.3/32"],
        )
        # app.test: open, except /admin/ (an allow-list and a password) and /private/ (an allow-list only).
        text += "\n".join(
            [
                "",
                "[[site]]",
                'hosts = ["app.test"]',
                f"upstream = {_toml(app.url)}",
                'tls = "files"',
                f"cert = {_toml(str(pki.cert_pem))}",
                f"key = {_toml(str(pki.key_pem))}",
                "[[site.access]]",
                'prefix = "/admin/"',
                'allow = ["127.0.0.1/32"]',
                f'basic_auth = {{ realm = "admin", htpasswd = {_toml(str(htpasswd))} }}',
                "[[site.access]]",
                'prefix = "/private/"',
                'allow = ["127.0.0.1/32"]',
                "",
            ]
        )
        config = where / "tlsproxy.toml"
        config.write_text(text)
        with tlsproxy(config) as process:
            yield Setup(https, http, pki, app, process, htpasswd)


def test_whole_site_needs_a_password(setup: Setup) -> None:
    """A staging site answers 401 with its realm until the right password comes; then Django answers."""
    status, head, _ = setup.fetch("localhost", "/whoami?nopass")
    assert status == 401
    assert b'WWW-Authenticate: Basic realm="staging"' in head
    assert not setup.reached_app("/whoami?nopass")
    assert setup.fetch("localhost", "/whoami?wrong", user="ann", password="nope")[0] == 401
    assert setup.fetch("localhost", "/whoami?nouser", user="zed", password="s3cret")[0] == 401
    assert not setup.reached_app("/whoami?wrong") and not setup.reached_app("/whoami?nouser")
    status, _, body = setup.fetch("localhost", "/whoami?ann", user="ann", password="s3cret")
    assert status == 200 and b'"x_forwarded_for": "127.0.0.1"' in body
    assert setup.fetch("localhost", "/whoami?bob", user="bob", password="b0bpass")[0] == 200  # an htpasswd -B line


def test_django_does_not_get_the_password(setup: Setup) -> None:
    """By default the Authorization header the proxy checked never reaches Django's request.META."""
    status, _, body = setup.fetch("localhost", "/whoami?nometa", user="ann", password="s3cret")
    assert status == 200 and setup.reached_app("/whoami?nometa")
    seen = json.loads(body)["meta"]
    assert "HTTP_AUTHORIZATION" not in seen and seen["HTTP_X_FORWARDED_PROTO"] == "https"


def test_denied_address_is_refused_even_with_the_password(setup: Setup) -> None:
    """deny wins: 403 for a denied address whatever it sends."""
    status, _, _ = setup.fetch("localhost", "/whoami?denied", user="ann", password="s3cret", source="127.0.0.3")
    assert status == 403 and not setup.reached_app("/whoami?denied")


def test_path_rule_with_allow_list_and_password(setup: Setup) -> None:
    """/admin/ needs an allowed address and a password; the rest of the site is open."""
    assert setup.fetch("app.test", "/whoami?open", source="127.0.0.2")[0] == 200
    assert setup.fetch("app.test", "/admin/?from2", user="ann", password="s3cret", source="127.0.0.2")[0] == 403
    assert setup.fetch("app.test", "/admin/?nopass")[0] == 401
    assert setup.fetch("app.test", "/%61dmin/?encoded")[0] == 401  # the same path to Django
    assert setup.fetch("app.test", "/admin?bare")[0] == 401
    status, _, _ = setup.fetch("app.test", "/admin/?ok", user="ann", password="s3cret")
    assert status == 404 and setup.reached_app("/admin/?ok")  # Django's own 404: it was let through
    assert not setup.reached_app("/admin/?nopass") and not setup.reached_app("/admin/?from2")


def test_allow_list_without_password(setup: Setup) -> None:
    """/private/ is an allow-list alone: 403 for other addresses, straight through for allowed ones."""
    assert setup.fetch("app.test", "/private/?x", source="127.0.0.2")[0] == 403
    assert setup.fetch("app.test", "/private/?y")[0] == 404 and setup.reached_app("/private/?y")


def test_acme_challenge_paths_stay_reachable(setup: Setup) -> None:
    """Challenge paths pass a password-protected site, over HTTPS and on port 80 (never a 401)."""
    status, _, _ = setup.fetch("localhost", "/.well-known/acme-challenge/abc")
    assert status == 404 and setup.reached_app("/.well-known/acme-challenge/abc")
    with socket.create_connection(("127.0.0.1", setup.http), timeout=5) as s:
        s.sendall(b"GET /.well-known/acme-challenge/abc HTTP/1.0\r\nHost: localhost\r\n\r\n")
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 404") and b"No such ACME challenge" in reply


def test_no_traceback_in_the_log(setup: Setup) -> None:
    """Every refusal above was an answer, not an error."""
    assert "Traceback" not in setup.process.output


def test_bad_htpasswd_stops_the_start(pki: PKI, tmp_path: Path) -> None:
    """A file with non-bcrypt lines is named at start, with exit status 2."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("ann:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\n")
    config = tmp_path / "c.toml"
    config.write_text(
        proxy_config(
            free_port(),
            "http://127.0.0.1:9",
            pki,
            tmp_path,
            basic_auth={"realm": "x", "htpasswd": str(htpasswd)},
        )
    )
    done = subprocess.run([str(BIN / "twist"), "tlsproxy", "--config", str(config)], capture_output=True, text=True)
    assert done.returncode == 2
    assert str(htpasswd) in done.stderr and "bcrypt" in done.stderr and "Traceback" not in done.stderr


def test_basic_auth_over_http2(setup: Setup) -> None:
    """HTTP/2 requests pass the same gate: 401 without the password, Django's answer with it."""
    import httpx

    with httpx.Client(
        base_url=f"https://localhost:{setup.https}", verify=setup.pki.client_context(), http2=True, trust_env=False
    ) as client:
        refused = client.get("/whoami?h2-nopass")
        assert (refused.http_version, refused.status_code) == ("HTTP/2", 401)
        assert refused.headers["www-authenticate"].startswith('Basic realm="staging"')
        allowed = client.get("/whoami?h2", auth=("ann", "s3cret"))
        assert (allowed.http_version, allowed.status_code) == ("HTTP/2", 200)
        assert allowed.json()["x_forwarded_for"] == "127.0.0.1"
        assert "HTTP_AUTHORIZATION" not in allowed.json()["meta"]


@pytest.fixture(scope="module")
def guarded(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A second proxy before the same Django: pass_authorization = true, and 3 wrong passwords a minute."""
    auth = {"realm": "guarded", "htpasswd": str(setup.htpasswd)}
    server = {"auth_fail_limit": 3, "auth_fail_window": 60}
    where = tmp_path_factory.mktemp("guarded")
    with start_proxy(where, setup.app.url, setup.pki, server=server, basic_auth=auth, pass_authorization=True) as proxy:
        yield Setup(proxy.port, 0, setup.pki, setup.app, proxy.process, setup.htpasswd)


def test_pass_authorization_gives_django_the_header(guarded: Setup) -> None:
    """pass_authorization = true: Django's request.META holds the client's Authorization as sent."""
    status, _, body = guarded.fetch("localhost", "/whoami?passed", user="ann", password="s3cret")
    assert status == 200
    sent = "Basic " + base64.b64encode(b"ann:s3cret").decode()
    assert json.loads(body)["meta"]["HTTP_AUTHORIZATION"] == sent


def test_guessing_is_slowed_to_429(guarded: Setup) -> None:
    """After 3 wrong passwords an address gets 429 with Retry-After, even with the right one; others do not."""
    import httpx

    with httpx.Client(
        base_url=f"https://localhost:{guarded.https}", verify=guarded.pki.client_context(), trust_env=False
    ) as client:
        for n in range(3):
            assert client.get(f"/whoami?guess{n}", auth=("ann", f"guess{n}")).status_code == 401
        limited = client.get("/whoami?right-but-limited", auth=("ann", "s3cret"))
        assert limited.status_code == 429
        assert 55 <= int(limited.headers["retry-after"]) <= 60
        assert "Too many wrong passwords" in limited.text
        assert client.get("/whoami?guess-more", auth=("ann", "guess")).status_code == 429
    assert not guarded.reached_app("/whoami?right-but-limited")
    # Another address is counted apart: its right password passes.
    assert guarded.fetch("localhost", "/whoami?other", user="ann", password="s3cret", source="127.0.0.2")[0] == 200
    assert "Traceback" not in guarded.process.output
    assert "wrong passwords for realm 'guarded'" in guarded.process.output

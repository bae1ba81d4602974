"""Headless Chromium trusts what the local dev CA issues once `tlsproxy ca install` ran, and only then."""

from __future__ import annotations

import datetime
import io
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration import procs
from tlsproxy.config import LOCAL_HOSTS
from tlsproxy.devca import LocalCA, TrustStores, ca_install

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed"),
    pytest.mark.skipif(shutil.which("certutil") is None, reason="certutil missing: apt-get install libnss3-tools"),
]

# A TLS server that relays GETs to an upstream: stands in for the proxy, with Python's ssl module.
FRONT = textwrap.dedent(
    """
    import http.server, ssl, sys, urllib.request
    port, chain, key, upstream = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

    class Relay(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            with urllib.request.urlopen(upstream + self.path) as response:
                body = response.read()
                kind = response.headers.get("Content-Type", "text/html")
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Relay)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print("front: ready", flush=True)
    server.serve_forever()
    """
)


def chromium_dom(url: str, home: Path, profile: Path) -> subprocess.CompletedProcess[str]:
    """Load ``url`` in a fresh headless Chromium whose NSS database is ``home``'s."""
    assert CHROMIUM is not None
    argv = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--dump-dom",
        url,
    ]
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=90, check=False)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def marker() -> str:
    return f"tlsproxy-devca-marker-{uuid.uuid4().hex}"


@pytest.fixture
def installed_home(tmp_path: Path) -> tuple[Path, Path]:
    """A HOME whose NSS database trusts a fresh CA in its own TLSPROXY_CAROOT (system store untouched)."""
    home, caroot = tmp_path / "home", tmp_path / "caroot"
    home.mkdir()
    out = io.StringIO()
    code = ca_install(
        {"HOME": str(home), "TLSPROXY_CAROOT": str(caroot), "PATH": "/usr/bin:/bin"},
        out,
        stores=TrustStores(system=False),
    )
    assert code == 0, out.getvalue()
    return home, caroot


@contextmanager
def upstream(directory: Path, marker: str, port: int) -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1:``port`` whose index page carries ``marker``."""
    directory.mkdir(exist_ok=True)
    (directory / "index.html").write_text(f"<!doctype html><title>t</title><p id=m>{marker}</p>\n")
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(directory)]
    with procs.running(argv):
        procs.wait_for_port(port)
        yield f"http://127.0.0.1:{port}"


@contextmanager
def front(tmp_path: Path, ca: LocalCA, upstream_url: str) -> Iterator[int]:
    """A TLS server on a free port serving a leaf from ``ca`` and relaying to ``upstream_url``."""
    certified = ca.issue(LOCAL_HOSTS, datetime.datetime.now(datetime.UTC))
    chain, key = tmp_path / "leaf.pem", tmp_path / "leaf-key.pem"
    chain.write_bytes(certified.chain_pem())
    key.write_bytes(certified.key_pem())
    key.chmod(0o600)
    script = tmp_path / "front.py"
    script.write_text(FRONT)
    port = procs.free_port()
    with procs.running([sys.executable, str(script), str(port), str(chain), str(key), upstream_url]) as process:
        process.wait_for_line("front: ready", 20)
        procs.wait_for_port(port)
        yield port


def test_chromium_trusts_installed_root(tmp_path: Path, installed_home: tuple[Path, Path], marker: str) -> None:
    """With the root installed in HOME's NSS db, Chromium loads https://localhost with no interstitial."""
    home, caroot = installed_home
    ca = LocalCA.load_or_create(caroot)
    with upstream(tmp_path / "www", marker, procs.free_port()) as url, front(tmp_path, ca, url) as port:
        result = chromium_dom(f"https://localhost:{port}/", home, tmp_path / "profile")
    assert marker in result.stdout, result.stderr[-3000:]
    assert "ERR_CERT" not in result.stderr


def test_chromium_rejects_without_root(tmp_path: Path, installed_home: tuple[Path, Path], marker: str) -> None:
    """The same server, seen from a fresh HOME without the root, fails with an unknown-authority error."""
    _, caroot = installed_home
    ca = LocalCA.load_or_create(caroot)
    fresh = tmp_path / "fresh-home"
    fresh.mkdir()
    with upstream(tmp_path / "www", marker, procs.free_port()) as url, front(tmp_path, ca, url) as port:
        trusted = chromium_dom(f"https://localhost:{port}/", installed_home[0], tmp_path / "profile-a")
        untrusted = chromium_dom(f"https://localhost:{port}/", fresh, tmp_path / "profile-b")
    assert marker in trusted.stdout, "the server itself works"
    assert marker not in untrusted.stdout
    assert "ERR_CERT_AUTHORITY_INVALID" in untrusted.stderr, untrusted.stderr[-3000:]


def test_chromium_through_twist_tlsproxy_dev_default(
    tmp_path: Path, installed_home: tuple[Path, Path], marker: str
) -> None:
    """`twist tlsproxy` with no config serves https://localhost:8443 from the app on :8000 with a trusted leaf."""
    for port in (8000, 8443):
        if not port_is_free(port):
            pytest.skip(f"127.0.0.1:{port} is busy; the dev default needs it (upstream :8000, https :8443)")
    home, caroot = tmp_path / "dev-home", tmp_path / "dev-caroot"
    home.mkdir()
    env = {"HOME": str(home), "TLSPROXY_CAROOT": str(caroot)}
    # The real command, as a developer runs it (the system store is left alone here).
    installed = subprocess.run(
        [str(procs.BIN / "tlsproxy"), "ca", "install", "--stores", "nss"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    with procs.tlsproxy(None, env=env) as proxy:
        first_lines = "\n".join(proxy.lines[:3])
        # Nothing on :8000 yet: the browser gets a page that says what to do.
        waiting = chromium_dom("https://localhost:8443/", home, tmp_path / "profile-0")
        with upstream(tmp_path / "www", marker, 8000):
            result = chromium_dom("https://localhost:8443/", home, tmp_path / "profile")
            # Names under *.localhost work too (each gets a leaf of its own).
            named = chromium_dom("https://app.localhost:8443/", home, tmp_path / "profile-app")
        log = proxy.output
    assert "https://localhost:8443/" in first_lines and str(caroot) in first_lines, first_lines
    assert "Nothing is listening on http://127.0.0.1:8000" in waiting.stdout, waiting.stdout[-2000:]
    assert marker in named.stdout, named.stderr[-2000:]
    assert "ERR_CERT" not in named.stderr
    assert "manage.py runserver" in waiting.stdout
    assert marker in result.stdout, f"{result.stderr[-2000:]}\n--- tlsproxy ---\n{log[-3000:]}"
    assert "ERR_CERT" not in result.stderr
    assert "BEGIN" not in log and "PRIVATE KEY" not in log, "no key material in the proxy's log"

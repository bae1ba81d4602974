"""`twist tlsproxy` from the installed package, probed with openssl s_client, curl and sslyze."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from tests.integration.procs import free_port, running, tlsproxy

pytestmark = pytest.mark.integration


@dataclass
class Proxy:
    https: int
    http: int
    ca: Path
    serials: dict[str, int]
    upstream: int


def _write_leaf(ca: trustme.CA, where: Path, name: str, *hosts: str, rsa: bool = False) -> int:
    leaf = ca.issue_cert(
        *hosts,
        key_type=trustme.KeyType.RSA if rsa else trustme.KeyType.ECDSA,
        not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1),
        not_after=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=90),
    )
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    (where / f"{name}.pem").write_bytes(chain)
    (where / f"{name}.key").write_bytes(leaf.private_key_pem.bytes())
    return x509.load_pem_x509_certificate(chain).serial_number


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """Two sites with their own certificates, HTTPS and HTTP listeners, a static backend."""
    where = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    serials = {
        "one": _write_leaf(ca, where, "one", "one.test", "www.one.test"),
        "two": _write_leaf(ca, where, "two", "two.test", "*.two.test"),
    }
    https, http, upstream = free_port(), free_port(), free_port()
    (where / "index.html").write_text("hello from the backend\n")
    config = where / "config.toml"
    config.write_text(
        f"""
[server]
https = ["tcp:{https}:interface=127.0.0.1"]
http = ["tcp:{http}:interface=127.0.0.1"]

[[site]]
hosts = ["one.test", "www.one.test"]
upstream = "http://127.0.0.1:{upstream}"
tls = "files"
cert = "{where}/one.pem"
key = "{where}/one.key"

[[site]]
hosts = ["two.test", "*.two.test"]
upstream = "http://127.0.0.1:{upstream}"
tls = "files"
cert = "{where}/two.pem"
key = "{where}/two.key"
"""
    )
    backend = [sys.executable, "-m", "http.server", str(upstream), "--bind", "127.0.0.1", "--directory", str(where)]
    with running(backend), tlsproxy(config):
        yield Proxy(https, http, where / "ca.pem", serials, upstream)


def s_client(port: int, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=20,
    )


def served_serial(output: str) -> int:
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", output, re.S)
    assert pem, output
    return x509.load_pem_x509_certificate(pem.group(0).encode()).serial_number


def test_tls11_refused(proxy: Proxy) -> None:
    """A TLS 1.1 client (even one willing to go that low) gets no handshake."""
    result = s_client(proxy.https, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", "-servername", "one.test")
    assert "Cipher is (NONE)" in result.stdout or result.returncode != 0
    assert "BEGIN CERTIFICATE" not in result.stdout


def test_tls12_listed_cipher(proxy: Proxy) -> None:
    """TLS 1.2 with a listed cipher connects and uses that cipher."""
    result = s_client(proxy.https, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384", "-servername", "one.test")
    assert result.returncode == 0, result.stderr
    assert "Cipher is ECDHE-ECDSA-AES256-GCM-SHA384" in result.stdout


def test_unlisted_cipher_refused(proxy: Proxy) -> None:
    """A TLS 1.2 cipher outside the list is refused."""
    result = s_client(proxy.https, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA256", "-servername", "one.test")
    assert result.returncode != 0
    assert "BEGIN CERTIFICATE" not in result.stdout


@pytest.mark.parametrize(
    ("name", "site"),
    [
        ("one.test", "one"),
        ("www.one.test", "one"),
        ("two.test", "two"),
        ("api.two.test", "two"),
        ("nobody.test", "one"),
    ],
)
def test_servername_picks_certificate(proxy: Proxy, name: str, site: str) -> None:
    """-servername selects the site's certificate; unknown names get the first site's."""
    result = s_client(proxy.https, "-servername", name, "-showcerts")
    assert served_serial(result.stdout) == proxy.serials[site]


def test_no_sni_gets_first_site(proxy: Proxy) -> None:
    """A client that sends no SNI gets the first site's certificate."""
    result = s_client(proxy.https, "-noservername", "-showcerts")
    assert served_serial(result.stdout) == proxy.serials["one"]


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_session_resumption(proxy: Proxy, version: str, tmp_path: Path) -> None:
    """A second connection resumes the first one's session."""
    session = tmp_path / "session.pem"
    # A whole request, read to the end (-ign_eof): the TLS 1.3 ticket comes after the
    # handshake, and s_client must still be reading when it does.
    first = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.https}", version, "-servername", "one.test",
         "-ign_eof", "-sess_out", str(session)],
        input="GET / HTTP/1.1\r\nHost: one.test\r\nConnection: close\r\n\r\n",
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert first.stdout.count("New, TLS") == 1, first.stdout
    assert "HTTP/1.1 200" in first.stdout, first.stdout
    again = s_client(proxy.https, version, "-servername", "one.test", "-sess_in", str(session))
    assert "Reused, TLS" in again.stdout


def test_h2_end_to_end(proxy: Proxy) -> None:
    """curl negotiates h2 by ALPN and gets the backend's page through the proxy."""
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2",
            "--cacert",
            str(proxy.ca),
            "--resolve",
            f"one.test:{proxy.https}:127.0.0.1",
            "-w",
            "\n%{http_version} %{http_code}",
            f"https://one.test:{proxy.https}/index.html",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n2 200")
    assert "hello from the backend" in result.stdout


def test_http11_when_asked(proxy: Proxy) -> None:
    """A client that offers only http/1.1 gets HTTP/1.1 with HSTS."""
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--http1.1",
            "-D-",
            "-o",
            "/dev/null",
            "--cacert",
            str(proxy.ca),
            "--resolve",
            f"www.one.test:{proxy.https}:127.0.0.1",
            f"https://www.one.test:{proxy.https}/index.html",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.stdout.startswith("HTTP/1.1 200")
    assert "strict-transport-security: max-age=63072000" in result.stdout.lower()


def test_port80_redirects_known_hosts(proxy: Proxy) -> None:
    """Plain HTTP for a configured host is a 301 to the same path on HTTPS."""
    result = subprocess.run(
        ["curl", "-sS", "-D-", "-o", "/dev/null", "-H", "Host: www.one.test", f"http://127.0.0.1:{proxy.http}/a/b?c=1"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.stdout.startswith("HTTP/1.1 301")
    assert f"Location: https://www.one.test:{proxy.https}/a/b?c=1" in result.stdout


def test_port80_no_open_redirect(proxy: Proxy) -> None:
    """Plain HTTP for any other host is 404 with no Location."""
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-D-",
            "-o",
            "/dev/null",
            "-H",
            "Host: evil.test",
            f"http://127.0.0.1:{proxy.http}//evil.test/",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.stdout.startswith("HTTP/1.1 404")
    assert "Location" not in result.stdout


def test_port80_unknown_token(proxy: Proxy) -> None:
    """An ACME token nobody put in is 404 (the issuer fills the table; see the Pebble tests)."""
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Host: one.test",
            f"http://127.0.0.1:{proxy.http}/.well-known/acme-challenge/abcDEF123",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.stdout == "404"


SSLYZE = os.environ.get("SSLYZE_BIN") or shutil.which("sslyze")


@pytest.mark.skipif(not SSLYZE, reason="sslyze not installed (scripts/test.sh installs it in .venv-sslyze)")
def test_mozilla_intermediate_compliance(proxy: Proxy) -> None:
    """The default policy passes sslyze's Mozilla-intermediate check, but for certificate trust."""
    result = subprocess.run(
        [SSLYZE, "--mozilla_config=intermediate", "--sni", "one.test", f"127.0.0.1:{proxy.https}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "COMPLIANCE AGAINST TLS CONFIGURATION" in result.stdout, result.stdout + result.stderr
    section = result.stdout.split("COMPLIANCE AGAINST TLS CONFIGURATION", 1)[1]
    problems = [line.strip() for line in section.splitlines() if line.strip().startswith("* ")]
    assert problems, section  # the test CA is not trusted, so exactly that must be reported
    assert all(p.startswith("* certificate_path_validation") for p in problems), problems


def test_dhparams_enable_dhe(tmp_path: Path) -> None:
    """With dhparams and a DHE suite listed, a DHE-only client connects; without, it cannot."""
    ca = trustme.CA()
    _write_leaf(ca, tmp_path, "rsa", "rsa.test", rsa=True)
    dh = tmp_path / "dh.pem"
    subprocess.run(
        ["openssl", "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt", "group:ffdhe2048", "-out", str(dh)],
        check=True,
        capture_output=True,
    )
    results = {}
    for with_dh in (True, False):
        port = free_port()
        config = tmp_path / f"dh-{with_dh}.toml"
        config.write_text(
            f"""
[server]
https = ["tcp:{port}:interface=127.0.0.1"]
http = []
[tls]
ciphers = "ECDHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES128-GCM-SHA256"
dhparams = "{dh if with_dh else ""}"
[[site]]
hosts = ["rsa.test"]
upstream = "http://127.0.0.1:9"
tls = "files"
cert = "{tmp_path}/rsa.pem"
key = "{tmp_path}/rsa.key"
"""
        )
        with tlsproxy(config):
            results[with_dh] = s_client(
                port, "-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256", "-servername", "rsa.test"
            )
    assert "Cipher is DHE-RSA-AES128-GCM-SHA256" in results[True].stdout
    assert "Cipher is DHE-RSA-AES128-GCM-SHA256" not in results[False].stdout


def test_bad_config_exits_with_message(tmp_path: Path) -> None:
    """A bad config stops `twist tlsproxy` with the file, key and reason, and exit status 2."""
    config = tmp_path / "bad.toml"
    config.write_text(
        '[tls]\nmin_version = "1.0"\n[[site]]\nhosts = ["a.test"]\nupstream = "http://127.0.0.1:9"\ntls = "local"\n'
    )
    from tests.integration.procs import BIN

    result = subprocess.run(
        [str(BIN / "twist"), "tlsproxy", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert f"{config}: tls.min_version" in result.stderr


def test_check_command(tmp_path: Path) -> None:
    """`tlsproxy check` prints the effective config and exits 0, or names the problem and exits 2."""
    from tests.integration.procs import BIN

    good = tmp_path / "good.toml"
    good.write_text('[[site]]\nhosts = ["a.test"]\nupstream = "unix:/run/app.sock"\ntls = "local"\n')
    result = subprocess.run(
        [str(BIN / "tlsproxy"), "check", "--config", str(good)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "upstream = unix:/run/app.sock" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[[site]]\nhosts = ["a.test"]\nupstream = "unix:/run/app.sock"\ntls = "local"\nwat = 1\n')
    result = subprocess.run(
        [str(BIN / "tlsproxy"), "check", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "site[0].wat: unknown key" in result.stderr

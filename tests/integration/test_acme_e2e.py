"""Issue 4 end to end: the real `twist tlsproxy` and the real `tlsproxy` command against Pebble.

The proxy's https listener is Pebble's ``tlsPort`` (TLS-ALPN-01) and its http
listener Pebble's ``httpPort`` (HTTP-01), so Pebble validates against the
proxy itself; `python -m http.server` is every site's upstream.
"""

from __future__ import annotations

import datetime
import http.client
import re
import signal
import socket
import ssl
import subprocess
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from tests.integration.pebble import HAVE_PEBBLE, Pebble, requires_pebble, run_pebble, served_certificate
from tests.integration.procs import BIN, free_port, running, tlsproxy, wait_for_port
from tlsproxy.acme.selfcheck import Answer, ListenerCheck
from tlsproxy.certs.store import CertificateStore

pytestmark = [pytest.mark.integration, requires_pebble]

TLSPROXY = str(BIN / "tlsproxy")
# Pebble reuses a valid authorization half the time by default; rarely here. Pebble makes a
# new authorization when rand.Intn(100) > PEBBLE_AUTHZREUSE, so even 0 reuses one order in a
# hundred: a test that needs every name validated again also changes the account.
NO_REUSE = {"PEBBLE_AUTHZREUSE": "0"}


# ---------------------------------------------------------------------------
# Small parts


def fresh_hosts() -> tuple[str, str]:
    """A site name and its www name that no earlier order used (no authorization reuse)."""
    base = f"a{uuid.uuid4().hex[:10]}.test"
    return base, f"www.{base}"


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m http.server` (HTTP/1.1, keep-alive) serving a small index page; yields its URL."""
    root = tmp_path_factory.mktemp("backend")
    (root / "index.html").write_text("hello from the backend\n")
    port = free_port()
    argv = [str(BIN / "python"), "-m", "http.server", "-p", "HTTP/1.1", "-b", "127.0.0.1", "-d", str(root), str(port)]
    with running(argv):
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def pebble() -> Iterator[Pebble]:
    """One Pebble (long-lived certificates) for the module."""
    if not HAVE_PEBBLE:
        pytest.skip("pebble / pebble-challtestsrv not installed (apt-get install pebble)")
    with run_pebble(env=NO_REUSE) as p:
        yield p


@pytest.fixture
def short_lived_pebble() -> Iterator[Pebble]:
    """A Pebble of this test alone, issuing 16-second certificates."""
    if not HAVE_PEBBLE:
        pytest.skip("pebble / pebble-challtestsrv not installed (apt-get install pebble)")
    with run_pebble(validity=16, env=NO_REUSE) as p:
        yield p


def write_config(
    path: Path,
    p: Pebble,
    hosts: tuple[str, ...],
    upstream: str,
    *,
    challenges: tuple[str, ...] = ("http-01", "tls-alpn-01"),
    http: bool = True,
    directory: str | None = None,
    files_site: tuple[str, Path, Path] | None = None,
    https_port: int | None = None,
) -> Path:
    """A config whose https/http listeners are Pebble's tlsPort/httpPort; ``files_site`` goes first."""
    state = path.parent / "state"
    https_port = https_port or p.tls_port
    http_listen = f'["tcp:{p.http_port}:interface=127.0.0.1"]' if http else "[]"
    files = ""
    if files_site is not None:
        name, cert, key = files_site
        files = f"""
            [[site]]
            hosts = ["{name}"]
            upstream = "{upstream}"
            tls = "files"
            cert = "{cert}"
            key = "{key}"
            hsts = {{ max_age = 0 }}
            """
    path.write_text(
        textwrap.dedent(
            f"""
            [server]
            https = ["tcp:{https_port}:interface=127.0.0.1"]
            http = {http_listen}
            state_dir = "{state}"
            [acme]
            directory = "{directory or p.directory_url}"
            ca_bundle = "{p.ca_bundle}"
            agree_tos = true
            email = "ops@example.test"
            challenges = [{", ".join(f'"{c}"' for c in challenges)}]
            {files}
            [[site]]
            hosts = [{", ".join(f'"{h}"' for h in hosts)}]
            upstream = "{upstream}"
            tls = "acme"
            hsts = {{ max_age = 0 }}
            """
        )
    )
    return path


def wait_until(predicate: Callable[[], object], deadline: float, what: str) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not within {deadline}s")
        time.sleep(0.1)


def handshake(port: int, server_name: str | None, cadata: bytes | None = None) -> x509.Certificate:
    """The leaf a TLS handshake to 127.0.0.1:port shows (verified against ``cadata`` when given)."""
    return served_certificate(port, server_name, cadata)


def serial_or_none(port: int, server_name: str) -> int | None:
    """The served serial for ``server_name``, or None while the handshake fails."""
    try:
        return handshake(port, server_name).serial_number
    except (ssl.SSLError, OSError):
        return None


def dns_names(cert: x509.Certificate) -> set[str]:
    return set(
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    )


class Connection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1:port with ``host`` as SNI, certificate name and Host header."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, timeout: float = 10) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self._tls = context

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)

    def get(self, path: str = "/") -> tuple[int, bytes]:
        self.request("GET", path)
        response = self.getresponse()
        return response.status, response.read()

    def peer_serial(self) -> int:
        der = self.sock.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def https_get(port: int, host: str, roots: bytes) -> tuple[int, bytes]:
    """One GET / on a new connection, verified against ``roots``."""
    conn = Connection(host, port, ssl.create_default_context(cadata=roots.decode()))
    try:
        return conn.get()
    finally:
        conn.close()


def run_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """The real `tlsproxy` command."""
    return subprocess.run([TLSPROXY, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def wait_for_certificate(port: int, hosts: tuple[str, ...], roots: bytes, deadline: float = 45) -> x509.Certificate:
    """Wait until the proxy on ``port`` serves, for hosts[0], a certificate verified against ``roots``; return it."""
    found: list[x509.Certificate] = []

    def served() -> bool:
        try:
            found.append(handshake(port, hosts[0], roots))
        except (ssl.SSLError, OSError):
            return False
        return True

    wait_until(served, deadline, f"a certificate for {hosts[0]}")
    return found[-1]


def orders_seen(p: Pebble) -> int:
    """How many orders Pebble has created."""
    # Orders Pebble created: a POST to /order-plz is sent again after a badNonce (Pebble refuses
    # 5% of nonces on purpose), so the requests overcount.
    return p.process.output.count("Added order ")


def validations_of(p: Pebble, host: str) -> int:
    """How many validations of ``host`` Pebble has started."""
    return sum("Pulled a task" in line and f'Value:"{host}"' in line for line in p.process.lines)


# ---------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_first_issuance_serves_pebble_certificate(pebble: Pebble, backend: str, tmp_path: Path, challenge: str) -> None:
    """A new two-name site gets, by one challenge type alone, a cert chaining to Pebble's root; GET is 200."""
    hosts = fresh_hosts()
    # Only the chosen challenge can pass: for HTTP-01 the https listener is not where Pebble
    # checks TLS-ALPN-01; for TLS-ALPN-01 there is no http listener at all.
    https_port = free_port() if challenge == "http-01" else pebble.tls_port
    config = write_config(
        tmp_path / "tlsproxy.toml",
        pebble,
        hosts,
        backend,
        challenges=(challenge,),
        http=challenge == "http-01",
        https_port=https_port,
    )
    roots = pebble.roots_pem()
    with tlsproxy(config) as proxy:
        leaf = wait_for_certificate(https_port, hosts, roots)
        assert dns_names(leaf) == set(hosts)
        for host in hosts:
            assert handshake(https_port, host, roots).serial_number == leaf.serial_number
            status, body = https_get(https_port, host, roots)
            assert (status, body) == (200, b"hello from the backend\n")
        proxy.wait_for_line(f"serving certificate for {hosts[0]} from a renewal")


def test_no_certificate_yet_fails_handshake(pebble: Pebble, backend: str, tmp_path: Path) -> None:
    """While an ACME site has no certificate, its names get a TLS alert, never the other site's certificate."""
    ca = trustme.CA()
    other = ca.issue_cert("other.test")
    cert, key = tmp_path / "other.pem", tmp_path / "other.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in other.cert_chain_pems))
    other.private_key_pem.write_to_path(str(key))
    hosts = fresh_hosts()
    dead = f"https://127.0.0.1:{free_port()}/dir"  # nothing listens: the first order cannot succeed
    config = write_config(
        tmp_path / "tlsproxy.toml", pebble, hosts, backend, directory=dead, files_site=("other.test", cert, key)
    )
    with tlsproxy(config) as proxy:
        proxy.wait_for_line(f"certificate for {hosts[0]} not renewed")
        for host in hosts:
            with pytest.raises(ssl.SSLError):
                handshake(pebble.tls_port, host)
        # the files site, and clients without a known name, still get its certificate
        assert dns_names(handshake(pebble.tls_port, "other.test", ca.cert_pem.bytes())) == {"other.test"}
        assert dns_names(handshake(pebble.tls_port, None)) == {"other.test"}
        assert dns_names(handshake(pebble.tls_port, "unknown.test")) == {"other.test"}


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_forced_renewal_while_serving(pebble: Pebble, backend: str, tmp_path: Path, challenge: str) -> None:
    """`tlsproxy renew --force` beside the running proxy: no failed request, new serial, old keep-alive works."""
    hosts = fresh_hosts()
    # the command publishes its challenge answers in the store; the proxy must serve them
    config = write_config(
        tmp_path / "tlsproxy.toml", pebble, hosts, backend, challenges=(challenge,), http=challenge == "http-01"
    )
    roots = pebble.roots_pem()
    context = ssl.create_default_context(cadata=roots.decode())
    with tlsproxy(config) as proxy:
        old = wait_for_certificate(pebble.tls_port, hosts, roots).serial_number
        kept = Connection(hosts[0], pebble.tls_port, context)
        try:
            assert kept.get()[0] == 200
            assert kept.peer_serial() == old
            kept_socket = kept.sock
            stop = threading.Event()
            failures: list[str] = []
            counts = {"new": 0, "kept": 0}

            def traffic() -> None:
                while not stop.is_set():
                    for kind in ("new", "kept"):
                        try:
                            if kind == "new":
                                status, _ = https_get(pebble.tls_port, hosts[1], roots)
                            else:
                                status, _ = kept.get()
                        except Exception as e:  # every failure is recorded
                            failures.append(f"{kind}: {e!r}")
                            continue
                        if status != 200:
                            failures.append(f"{kind}: status {status}")
                        counts[kind] += 1
                    time.sleep(0.05)

            worker = threading.Thread(target=traffic, daemon=True)
            worker.start()
            try:
                validated = [validations_of(pebble, host) for host in hosts]
                # A new account has no valid authorization Pebble could reuse, so both names
                # must be validated against the running proxy (the old account is kept aside).
                state = tmp_path / "state"
                (state / "account").rename(state / "first-account")
                renewed = run_cli("renew", hosts[0], "--force", "--config", str(config))
                assert renewed.returncode == 0, renewed.stdout + renewed.stderr + proxy.output
                assert "new certificate" in renewed.stdout
                # the command saw the proxy serve its answers before it asked Pebble (no fallback wait)
                assert "note:" not in renewed.stdout, renewed.stdout
                keys = [(state / d / "key.pem").read_bytes() for d in ("first-account", "account")]
                if keys[0] == keys[1]:  # compared here, so that no assertion message prints a key
                    pytest.fail("the command reused the old account")
                # both names validated again: the proxy served the command's answers
                expected = [n + 1 for n in validated]
                try:
                    wait_until(lambda: [validations_of(pebble, h) for h in hosts] == expected, 5, "validations")
                except TimeoutError:
                    seen = [validations_of(pebble, h) for h in hosts]
                    log = "\n".join(line for line in pebble.process.lines if hosts[0] in line)
                    raise AssertionError(
                        f"validations per name: {validated} -> {seen}\n{log}\n{proxy.output}"
                    ) from None
                wait_until(lambda: serial_or_none(pebble.tls_port, hosts[0]) != old, 15, "the new serial served")
                time.sleep(1)  # a little traffic on the new certificate too
            finally:
                stop.set()
                worker.join(15)
            assert failures == []
            assert counts["new"] > 10 and counts["kept"] > 10, counts
            new = handshake(pebble.tls_port, hosts[0], roots)
            assert new.serial_number != old and dns_names(new) == set(hosts)
            assert f"{new.serial_number:x}" in renewed.stdout
            assert kept.get()[0] == 200
            assert kept.sock is kept_socket, "http.client reconnected: the kept-alive connection was closed"
            assert kept.peer_serial() == old
        finally:
            kept.close()
        proxy.wait_for_line(f"serving certificate for {hosts[0]} from the store: serial {new.serial_number:x}")


def test_listener_check_asks_the_running_proxy(pebble: Pebble, backend: str, tmp_path: Path) -> None:
    """What `tlsproxy renew` asks before telling the CA to look: served, served otherwise, or nobody there."""
    hosts = fresh_hosts()
    config = write_config(tmp_path / "tlsproxy.toml", pebble, hosts, backend)
    store = CertificateStore(tmp_path / "state")
    check = ListenerCheck([f"tcp:{pebble.http_port}:interface=127.0.0.1"], [f"tcp:{pebble.tls_port}"])
    http = Answer("http-01", hosts[0], "check-token_1", "check-token_1.thumbprint")
    alpn = Answer("tls-alpn-01", hosts[1], "check-token_2", "check-token_2.thumbprint")
    with tlsproxy(config):
        wait_for_certificate(pebble.tls_port, hosts, pebble.roots_pem())
        assert check(http) is False and check(alpn) is False  # 404, and acme-tls/1 refused
        store.publish_challenge("http-01", http.token, http.key_authorization)
        store.publish_challenge("tls-alpn-01", alpn.host, alpn.key_authorization)
        wait_until(lambda: check(http) and check(alpn), 10, "both answers served")
        assert check(replace(http, key_authorization="check-token_1.other")) is False
        assert check(replace(alpn, key_authorization="check-token_2.other")) is False
        assert check(replace(alpn, host=hosts[0])) is False  # an answer is for its own name only
        store.withdraw_challenge("http-01", http.token)
        store.withdraw_challenge("tls-alpn-01", alpn.host)
        wait_until(lambda: check(http) is False and check(alpn) is False, 10, "both answers withdrawn")
    nobody = ListenerCheck([f"tcp:{free_port()}:interface=127.0.0.1"], ["systemd:domain=INET6:index=0"])
    assert nobody(http) is None and "refused" in nobody.last_error.lower()
    assert nobody(alpn) is None and nobody.last_error == "no https listener address to ask"


def test_automatic_renewal(short_lived_pebble: Pebble, backend: str, tmp_path: Path) -> None:
    """With 16-second certificates the proxy renews by itself and the served serial changes."""
    p = short_lived_pebble
    hosts = fresh_hosts()
    config = write_config(tmp_path / "tlsproxy.toml", p, hosts, backend)
    roots = p.roots_pem()
    with tlsproxy(config) as proxy:
        first = wait_for_certificate(p.tls_port, hosts, roots)
        lifetime = (first.not_valid_after_utc - first.not_valid_before_utc).total_seconds()
        assert lifetime <= 17
        wait_until(
            lambda: serial_or_none(p.tls_port, hosts[0]) not in (None, first.serial_number), 25, "a renewed certificate"
        )
        second = handshake(p.tls_port, hosts[0], roots)
        assert second.not_valid_after_utc > first.not_valid_after_utc
        assert second.not_valid_before_utc < first.not_valid_after_utc, "renewed only after expiry"
        # The half-lifetime rule for short certificates: the order starts at the half, not at once,
        # and by the service's next poll (every 2 s). Timed from the proxy's log line, so that
        # the ACME exchange itself (slow on a loaded machine) is not counted.
        line = proxy.wait_for_line(f"ordering a certificate for {hosts[0]}, {hosts[1]} (renewal time reached)")
        stamp = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)Z ", line)
        assert stamp, line
        ordered_at = datetime.datetime.fromisoformat(stamp[1]).replace(tzinfo=datetime.UTC)  # whole seconds, floored
        after_issue = (ordered_at - first.not_valid_before_utc).total_seconds()
        assert lifetime / 2 - 1.5 <= after_issue <= lifetime / 2 + 2 + 3, (after_issue, lifetime, line)
        assert https_get(p.tls_port, hosts[0], roots)[0] == 200


def test_restart_reuses_stored_certificate(pebble: Pebble, backend: str, tmp_path: Path) -> None:
    """A restarted (and a SIGHUP-reloaded) proxy serves the stored certificate and orders nothing from Pebble."""
    hosts = fresh_hosts()
    config = write_config(tmp_path / "tlsproxy.toml", pebble, hosts, backend)
    roots = pebble.roots_pem()
    with tlsproxy(config):
        serial = wait_for_certificate(pebble.tls_port, hosts, roots).serial_number
    orders = orders_seen(pebble)
    assert orders > 0
    with tlsproxy(config) as proxy:
        # installed from the store before the listeners are up: the very first handshake has it
        assert handshake(pebble.tls_port, hosts[0], roots).serial_number == serial
        proxy.wait_for_line(f"serving certificate for {hosts[0]} from the store: serial {serial:x}")
        proxy.wait_for_line(f"certificate of {hosts[0]} not due for renewal; next check at ")
        assert handshake(pebble.tls_port, hosts[0], roots).serial_number == serial

        start = len(proxy.lines)
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_line("configuration reloaded", start=start)
        assert handshake(pebble.tls_port, hosts[0], roots).serial_number == serial
        proxy.wait_for_line(f"certificate of {hosts[0]} not due for renewal; next check at ", start=start)
        assert handshake(pebble.tls_port, hosts[0], roots).serial_number == serial
        assert https_get(pebble.tls_port, hosts[1], roots)[0] == 200
        assert "ordering a certificate" not in proxy.output, proxy.output
    assert orders_seen(pebble) == orders


def test_certs_and_revoke_commands(pebble: Pebble, backend: str, tmp_path: Path) -> None:
    """`certs` shows issuer, not-after, next renewal; `revoke` revokes at Pebble, then a fresh cert is served."""
    hosts = fresh_hosts()
    config = write_config(tmp_path / "tlsproxy.toml", pebble, hosts, backend)
    roots = pebble.roots_pem()
    with tlsproxy(config):
        leaf = wait_for_certificate(pebble.tls_port, hosts, roots)
        old = leaf.serial_number
        listed = run_cli("certs", "--config", str(config))
        assert listed.returncode == 0, listed.stdout + listed.stderr
        out = listed.stdout
        assert re.search(rf"^{re.escape(hosts[0])}$", out, re.M), out
        assert f"hosts:        {hosts[0]}, {hosts[1]}" in out
        assert "source:       acme" in out
        assert re.search(r"issuer: +CN=Pebble Intermediate CA", out), out
        assert f"serial:       {old:x}" in out
        assert f"not after:    {leaf.not_valid_after_utc.strftime('%Y-%m-%d %H:%M')} UTC" in out
        due = re.search(r"next renewal: (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", out)
        assert due, out
        due_at = datetime.datetime.strptime(due.group(1), "%Y-%m-%d %H:%M").replace(tzinfo=datetime.UTC)
        assert leaf.not_valid_before_utc - datetime.timedelta(minutes=1) < due_at < leaf.not_valid_after_utc
        assert "last error:   -" in out

        revoked = run_cli("revoke", hosts[1], "--config", str(config))
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        assert f"revoked serial {old:x}" in revoked.stdout
        assert pebble.cert_status(old)["Status"] == "Revoked"
        wait_until(lambda: serial_or_none(pebble.tls_port, hosts[0]) not in (None, old), 15, "a fresh certificate")
        fresh = handshake(pebble.tls_port, hosts[1], roots)
        assert fresh.serial_number != old
        assert pebble.cert_status(fresh.serial_number)["Status"] == "Valid"
        assert https_get(pebble.tls_port, hosts[0], roots)[0] == 200


def test_ca_down_keeps_old_certificate(short_lived_pebble: Pebble, backend: str, tmp_path: Path) -> None:
    """With Pebble gone the due renewal fails: the old cert keeps serving; the log names error and retry time."""
    p = short_lived_pebble
    hosts = fresh_hosts()
    config = write_config(tmp_path / "tlsproxy.toml", p, hosts, backend)
    roots = p.roots_pem()
    with tlsproxy(config) as proxy:
        serial = wait_for_certificate(p.tls_port, hosts, roots).serial_number
        p.process.stop()
        start = len(proxy.lines)
        line = proxy.wait_for_line(f"certificate for {hosts[0]} not renewed", deadline=25, start=start)
        failed_at = datetime.datetime.now(datetime.UTC)
        retry = re.search(r"next attempt at (\S+)", line)
        assert retry, line
        retry_at = datetime.datetime.fromisoformat(retry.group(1))
        assert retry_at > failed_at + datetime.timedelta(seconds=30), line
        assert serial_or_none(p.tls_port, hosts[0]) == serial
        listed = run_cli("certs", "--config", str(config))
        assert re.search(r"next renewal: .*\(retry 1\)", listed.stdout), listed.stdout
        assert not re.search(r"last error: +-$", listed.stdout, re.M), listed.stdout


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs of this test alone (root only); skipped where mounting is refused."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    argv = ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave_pages: int) -> Path:
    """Fill ``disk`` but for ``leave_pages`` 4 KiB pages; returns the filler file (delete it to free the disk)."""
    spares = [disk / f"spare-{i}" for i in range(leave_pages)]
    for spare in spares:
        spare.write_bytes(b"\0" * 4096)
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    for spare in spares:
        spare.unlink()
    return filler


def test_full_disk_during_renewal_keeps_a_working_pair(pebble: Pebble, backend: str, tiny_disk: Path) -> None:
    """A renewal on a full disk, or with room for the key but not the chain: one error line, the old pair serves."""
    host = fresh_hosts()[0]
    config = write_config(tiny_disk / "tlsproxy.toml", pebble, (host,), backend, challenges=("http-01",))
    roots = pebble.roots_pem()

    def renew_fails(doing: str) -> None:
        renewed = run_cli("renew", host, "--force", "--config", str(config))
        output = renewed.stdout + renewed.stderr
        assert renewed.returncode == 1, output
        assert "Traceback" not in output and f"{doing}: " in output and "No space left on device" in output, output
        lines = output.splitlines()
        assert [line for line in lines if line.startswith("error:")] == lines[-1:], output

    with tlsproxy(config):
        old = wait_for_certificate(pebble.tls_port, (host,), roots).serial_number
        filler = fill(tiny_disk, leave_pages=0)  # not even the challenge answer can be published
        renew_fails("publishing a challenge answer")
        filler.unlink()
        # One page: the answer is published (and withdrawn), then the new key fits but its chain does not.
        filler = fill(tiny_disk, leave_pages=1)
        renew_fails(f"saving the certificate of {host}")
        assert handshake(pebble.tls_port, host, roots).serial_number == old
    # Restarted with the disk still full: the stored pair still matches.
    with tlsproxy(config) as proxy:
        assert handshake(pebble.tls_port, host, roots).serial_number == old
        proxy.wait_for_line(f"serving certificate for {host} from the store: serial {old:x}")
        filler.unlink()
        renewed = run_cli("renew", host, "--force", "--config", str(config))
        assert renewed.returncode == 0, renewed.stdout + renewed.stderr
        wait_until(lambda: serial_or_none(pebble.tls_port, host) not in (None, old), 15, "the new serial served")

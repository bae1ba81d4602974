"""The local development CA: files on disk, the leaves it issues, the renewing service, the commands."""

from __future__ import annotations

import datetime
import io
import ipaddress
import os
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from tlsproxy.config import LOCAL_HOSTS, Site, Upstream, dev_config
from tlsproxy.devca import (
    CAError,
    LocalCA,
    LocalCertificateService,
    TrustStores,
    ca_install,
    ca_path,
    ca_uninstall,
    default_caroot,
)
from tlsproxy.devca.certificates import LEAF_LIFETIME, ignored_wildcards, renewal_time, split_hosts
from tlsproxy.devca.service import RETRY_AFTER
from tlsproxy.tls.policy import TLSPolicy
from tlsproxy.tls.sni import SniMap, SniServer

NOW = datetime.datetime(2025, 3, 1, 12, 0, tzinfo=datetime.UTC)
ENV = {"USER": "dev", "HOME": "/nonexistent"}


@pytest.fixture(scope="module")
def shared_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA.load_or_create(tmp_path_factory.mktemp("shared") / "ca", now=NOW, environ=ENV)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------
# Where the CA lives


def test_caroot_prefers_tlsproxy_caroot() -> None:
    """TLSPROXY_CAROOT wins over XDG_DATA_HOME and HOME."""
    env = {"TLSPROXY_CAROOT": "/x/ca", "XDG_DATA_HOME": "/xdg", "HOME": "/home/u"}
    assert default_caroot(env) == Path("/x/ca")


def test_caroot_then_xdg_data_home() -> None:
    """Without TLSPROXY_CAROOT the CA lives in $XDG_DATA_HOME/tlsproxy."""
    assert default_caroot({"XDG_DATA_HOME": "/xdg", "HOME": "/home/u"}) == Path("/xdg/tlsproxy")


def test_caroot_defaults_under_home() -> None:
    """With neither variable (or empty ones) it is ~/.local/share/tlsproxy."""
    env = {"TLSPROXY_CAROOT": "", "XDG_DATA_HOME": "", "HOME": "/home/u"}
    assert default_caroot(env) == Path("/home/u/.local/share/tlsproxy")


def test_caroot_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Called without a mapping, the process environment decides."""
    monkeypatch.setenv("TLSPROXY_CAROOT", "/from/env")
    assert default_caroot() == Path("/from/env")


# ---------------------------------------------------------------------------
# The root on disk


def test_create_writes_private_key_and_public_root(tmp_path: Path) -> None:
    """A new CA directory is 0700, the key 0600, rootCA.pem 0644, and no temporary file is left."""
    caroot = tmp_path / "deep" / "ca"
    ca = LocalCA.load_or_create(caroot, now=NOW, environ=ENV)
    assert mode_of(caroot) == 0o700
    assert mode_of(ca.root_key_path) == 0o600
    assert mode_of(ca.root_pem_path) == 0o644
    assert sorted(p.name for p in caroot.iterdir()) == ["rootCA-key.pem", "rootCA.pem"]
    assert ca.root_pem_path == caroot / "rootCA.pem"


def test_reload_reuses_the_same_root(tmp_path: Path) -> None:
    """Loading again reads the same root and key rather than making new ones."""
    first = LocalCA.load_or_create(tmp_path / "ca", now=NOW, environ=ENV)
    second = LocalCA.load_or_create(tmp_path / "ca", now=NOW + datetime.timedelta(days=1), environ=ENV)
    assert second.root == first.root
    assert second.key.private_numbers() == first.key.private_numbers()


def test_concurrent_creation_makes_one_root(tmp_path: Path) -> None:
    """Two loaders racing on an empty directory end up with the same root."""
    results: list[LocalCA] = []
    threads = [
        threading.Thread(target=lambda: results.append(LocalCA.load_or_create(tmp_path / "ca", environ=ENV)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.root.serial_number for r in results}) == 1


def test_root_is_a_p256_leaf_only_ca(shared_ca: LocalCA) -> None:
    """The root is self-signed P-256, CA:TRUE pathlen 0, keyCertSign+cRLSign, about ten years, named for its owner."""
    root = shared_ca.root
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(root.public_key().curve, ec.SECP256R1)
    root.verify_directly_issued_by(root)
    basic = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    life = root.not_valid_after_utc - root.not_valid_before_utc
    assert datetime.timedelta(days=3640) < life < datetime.timedelta(days=3660)
    cn = root.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn.startswith("tlsproxy development CA dev@")


def test_key_never_in_repr(shared_ca: LocalCA) -> None:
    """The CA's repr shows where it lives, never its key."""
    pem = shared_ca.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    text = repr(shared_ca)
    assert "key=" not in text
    assert pem.splitlines()[1] not in text


def test_readable_key_is_refused(tmp_path: Path) -> None:
    """A root key other users can read is an error that names the file and the fix."""
    ca = LocalCA.load_or_create(tmp_path / "ca", now=NOW, environ=ENV)
    os.chmod(ca.root_key_path, 0o644)
    with pytest.raises(CAError) as e:
        LocalCA.load_or_create(tmp_path / "ca", now=NOW, environ=ENV)
    assert e.value.path == ca.root_key_path
    assert "chmod 600" in e.value.reason


def test_root_without_key_is_an_error(tmp_path: Path) -> None:
    """rootCA.pem without its key cannot sign, and is not silently replaced."""
    ca = LocalCA.load_or_create(tmp_path / "ca", now=NOW, environ=ENV)
    ca.root_key_path.unlink()
    with pytest.raises(CAError, match="can no longer sign"):
        LocalCA.load_or_create(tmp_path / "ca", now=NOW, environ=ENV)
    assert ca.root_pem_path.read_bytes() == ca.root.public_bytes(serialization.Encoding.PEM)


def test_key_without_root_gets_its_root(tmp_path: Path) -> None:
    """A crash between writing the key and the root is repaired with a root for that key."""
    ca = LocalCA.load_or_create(tmp_path / "ca", now=NOW, environ=ENV)
    ca.root_pem_path.unlink()
    again = LocalCA.load_or_create(tmp_path / "ca", now=NOW, environ=ENV)
    assert again.key.private_numbers() == ca.key.private_numbers()
    assert again.root_pem_path.exists()


def test_mismatched_key_and_root_is_an_error(tmp_path: Path) -> None:
    """A root that is not the key's is reported, not used."""
    LocalCA.load_or_create(tmp_path / "a", now=NOW, environ=ENV)
    other = LocalCA.load_or_create(tmp_path / "b", now=NOW, environ=ENV)
    (tmp_path / "a" / "rootCA.pem").write_bytes(other.root_pem_path.read_bytes())
    with pytest.raises(CAError, match="does not match"):
        LocalCA.load_or_create(tmp_path / "a", now=NOW, environ=ENV)


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails before the rename leaves the old content and no temporary file."""
    from tlsproxy.certs import store

    target = tmp_path / "f.pem"
    store.atomic_write(target, b"old", 0o600)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        store.atomic_write(target, b"new", 0o600)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.pem"]


# ---------------------------------------------------------------------------
# Leaves


def test_leaf_chains_to_root_with_sans_and_server_auth(shared_ca: LocalCA) -> None:
    """A leaf is P-256, signed by the root, names every host as DNS or IP SAN, and is for serverAuth only."""
    certified = shared_ca.issue(LOCAL_HOSTS, NOW)
    leaf, root = certified.chain
    assert root == shared_ca.root
    leaf.verify_directly_issued_by(root)
    assert isinstance(certified.key, ec.EllipticCurvePrivateKey)
    assert isinstance(certified.key.curve, ec.SECP256R1)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "*.localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert certified.covers("localhost") and certified.covers("app.localhost")


def test_leaf_lifetime_is_short_and_backdated(shared_ca: LocalCA) -> None:
    """A leaf is valid from a few minutes before now for the default seven days."""
    certified = shared_ca.issue(["localhost"], NOW)
    assert certified.not_after == NOW + datetime.timedelta(days=7)
    assert NOW - datetime.timedelta(minutes=10) < certified.not_before < NOW


def test_each_leaf_has_a_fresh_key(shared_ca: LocalCA) -> None:
    """Two issues never share a key or a serial."""
    a, b = shared_ca.issue(["localhost"], NOW), shared_ca.issue(["localhost"], NOW)
    assert a.serial != b.serial
    assert a.key.private_numbers() != b.key.private_numbers()


def test_leaf_lifetime_over_chromium_limit_is_refused(shared_ca: LocalCA) -> None:
    """Chromium rejects leaves valid for more than 398 days, so they are never issued."""
    with pytest.raises(ValueError, match="398"):
        shared_ca.issue(["localhost"], NOW, datetime.timedelta(days=398))
    shared_ca.issue(["localhost"], NOW, datetime.timedelta(days=397))


def test_leaf_never_outlives_root(shared_ca: LocalCA) -> None:
    """Close to the root's end, a leaf ends when the root does."""
    late = shared_ca.root.not_valid_after_utc - datetime.timedelta(days=2)
    certified = shared_ca.issue(["localhost"], late)
    assert certified.not_after == shared_ca.root.not_valid_after_utc


@pytest.mark.parametrize("hosts", [[], ["bad host"], ["*"], ["a..b"], ["exämple.test"], ["a.*.b"]])
def test_bad_hosts_are_refused(shared_ca: LocalCA, hosts: list[str]) -> None:
    """Empty host lists and names that are neither DNS names nor addresses raise ValueError."""
    with pytest.raises(ValueError):
        shared_ca.issue(hosts, NOW)


def test_split_hosts_normalises() -> None:
    """Names are lower-cased without a trailing dot; bracketed IPv6 literals are addresses."""
    names, addresses = split_hosts(["LocalHost.", "[::1]", "*.Dev.Localhost"])
    assert names == ["localhost", "*.dev.localhost"]
    assert addresses == [ipaddress.ip_address("::1")]


def test_second_level_wildcards_are_flagged() -> None:
    """*.localhost is flagged: Chromium and OpenSSL match no name against a wildcard over one label."""
    assert ignored_wildcards(LOCAL_HOSTS) == ["*.localhost"]
    assert ignored_wildcards(["*.app.localhost", "localhost"]) == []


def test_renewal_time_is_a_third_before_the_end(shared_ca: LocalCA) -> None:
    """A leaf is due for renewal with a third of its validity left."""
    certified = shared_ca.issue(["localhost"], NOW)
    left = certified.not_after - renewal_time(certified)
    assert left * 3 == certified.not_after - certified.not_before


# ---------------------------------------------------------------------------
# The service


def acme_site() -> Site:
    return Site(hosts=("example.com",), upstream=Upstream(url="http://127.0.0.1:9000", host="127.0.0.1", port=9000))


def make_service(ca: LocalCA, start: datetime.datetime = NOW) -> tuple[Clock, SniServer, Site, LocalCertificateService]:
    local = dev_config().sites[0]
    sites = [local, acme_site()]
    sni = SniServer(TLSPolicy(), SniMap((s.name, s.hosts) for s in sites))
    clock = Clock()
    clock.advance(start.timestamp())
    return clock, sni, local, LocalCertificateService(clock, ca, sni, sites)


def served_leaf(context: SSL.Context) -> x509.Certificate:
    cert = SSL.Connection(context, None).get_certificate()
    assert cert is not None
    return cert.to_cryptography()


def handshake(sni: SniServer, root_pem: bytes, server_hostname: str) -> x509.Certificate:
    """Run a real TLS handshake in memory: Python's ssl client, verifying, against the SniServer."""
    client_ctx = ssl.create_default_context(cadata=root_pem.decode())
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    server = sni.serverConnectionForTLS(None)
    server.set_accept_state()
    for _ in range(20):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        server.bio_write(outgoing.read())
        try:
            server.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            incoming.write(server.bio_read(65536))
        except SSL.WantReadError:
            pass
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_service_installs_a_leaf_for_local_sites_only(shared_ca: LocalCA) -> None:
    """Starting issues one leaf for the local site, installs it in the SNI map, and leaves other sites alone."""
    _clock, sni, local, service = make_service(shared_ca)
    service.startService()
    certified = service.current[local.name]
    assert set(service.current) == {local.name}
    assert certified.uncovered(["localhost", "app.localhost"]) == []
    assert served_leaf(sni.sni_map.context_of(local.name)) == certified.leaf
    assert sni.sni_map.context_of("example.com") is None
    service.stopService()


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1", "::1"])
def test_installed_leaf_passes_a_verifying_client(shared_ca: LocalCA, server_hostname: str) -> None:
    """A client trusting only the root completes a verified handshake for localhost names and addresses."""
    # The ssl client checks validity against the wall clock, so the fake clock starts there.
    _clock, sni, local, service = make_service(shared_ca, datetime.datetime.now(datetime.UTC))
    service.startService()
    peer = handshake(sni, shared_ca.root_pem_path.read_bytes(), server_hostname)
    assert peer == service.current[local.name].leaf
    service.stopService()


def test_service_reissues_before_expiry(shared_ca: LocalCA) -> None:
    """With a third of the lifetime left the leaf is replaced and the new context installed; not before."""
    clock, sni, local, service = make_service(shared_ca)
    service.startService()
    first = service.current[local.name]
    due = renewal_time(first)
    clock.advance((due - NOW).total_seconds() - 1)
    assert service.current[local.name] is first
    clock.advance(1)
    second = service.current[local.name]
    assert second.serial != first.serial
    assert second.not_after > first.not_after
    assert served_leaf(sni.sni_map.context_of(local.name)) == second.leaf
    clock.advance((renewal_time(second) - due).total_seconds())
    assert service.current[local.name].serial != second.serial
    assert len(clock.getDelayedCalls()) == 1
    service.stopService()


def test_stop_cancels_the_renewal(shared_ca: LocalCA) -> None:
    """A stopped service leaves nothing scheduled on the clock."""
    clock, _sni, _local, service = make_service(shared_ca)
    service.startService()
    assert clock.getDelayedCalls()
    service.stopService()
    assert clock.getDelayedCalls() == []


class FlakyCA:
    """Fails the first issue, then delegates to a real CA."""

    def __init__(self, ca: LocalCA) -> None:
        self.ca = ca
        self.calls = 0

    def issue(self, hosts, now, lifetime=LEAF_LIFETIME):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 1:
            raise ValueError("disk on fire")
        return self.ca.issue(hosts, now, lifetime)


def test_failed_issue_is_logged_and_retried(shared_ca: LocalCA) -> None:
    """An issue that fails is logged and tried again a minute later."""
    clock, sni, local, _ = make_service(shared_ca)
    flaky = FlakyCA(shared_ca)
    service = LocalCertificateService(clock, flaky, sni, dev_config().sites)  # type: ignore[arg-type]
    with capturedLogs() as events:
        service.startService()
    assert local.name not in service.current
    assert any(e.get("log_failure") is not None for e in events)
    clock.advance(RETRY_AFTER)
    assert local.name in service.current
    service.stopService()


def test_log_names_hosts_and_expiry_never_the_key(shared_ca: LocalCA) -> None:
    """The installation is logged with the names and not-after, and no key material."""
    _clock, _sni, local, service = make_service(shared_ca)
    with capturedLogs() as events:
        service.startService()
    certified = service.current[local.name]
    text = " ".join(str(e) for e in events)
    assert "localhost" in text and certified.not_after.isoformat() in text
    assert "*.localhost" in text and "certificate of their own" in text
    for secret in (certified.key_pem().decode().splitlines()[1], shared_ca.root_key_path.read_text().splitlines()[1]):
        assert secret not in text
    service.stopService()


# ---------------------------------------------------------------------------
# Commands, with the outside world faked


class FakeRunner:
    """Records commands and answers them like a certutil that knows nothing yet."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        self.calls.append(argv)
        code = 255 if "-L" in argv else 0
        return subprocess.CompletedProcess(argv, code, stdout="", stderr="")


def test_ca_path_prints_the_directory(tmp_path: Path) -> None:
    """`ca path` prints the CA directory and succeeds, without creating anything."""
    out = io.StringIO()
    assert ca_path({"TLSPROXY_CAROOT": str(tmp_path / "ca")}, out) == 0
    assert out.getvalue() == f"{tmp_path / 'ca'}\n"
    assert not (tmp_path / "ca").exists()


def test_install_without_certutil_says_what_to_install(tmp_path: Path) -> None:
    """With no certutil on PATH, install creates the CA, names the package to install, and fails."""
    env = {"HOME": str(tmp_path / "home"), "TLSPROXY_CAROOT": str(tmp_path / "ca"), "PATH": str(tmp_path)}
    out = io.StringIO()
    assert ca_install(env, out, stores=TrustStores(system=False)) == 1
    assert "apt-get install libnss3-tools" in out.getvalue()
    assert (tmp_path / "ca" / "rootCA.pem").exists()


def test_install_skips_system_store_when_not_root(tmp_path: Path) -> None:
    """Without root the system store is skipped with the reason and the commands to run by hand."""
    system = tmp_path / "anchors"
    system.mkdir()
    env = {"HOME": str(tmp_path / "home"), "TLSPROXY_CAROOT": str(tmp_path / "ca"), "PATH": ""}
    out = io.StringIO()
    stores = TrustStores(nss=False, system_dir=system)
    assert ca_install(env, out, stores=stores, runner=FakeRunner(), is_root=False) == 0
    assert "skipped the system store" in out.getvalue()
    assert "sudo update-ca-certificates" in out.getvalue()
    assert list(system.iterdir()) == []


def test_install_and_uninstall_system_store_as_root(tmp_path: Path) -> None:
    """As root, install copies the root as a .crt and runs the update command; uninstall undoes both."""
    system = tmp_path / "anchors"
    system.mkdir()
    env = {"HOME": str(tmp_path / "home"), "TLSPROXY_CAROOT": str(tmp_path / "ca"), "PATH": ""}
    stores = TrustStores(nss=False, system_dir=system, update_command=("/bin/true", "--fresh"))
    runner = FakeRunner()
    out = io.StringIO()
    assert ca_install(env, out, stores=stores, runner=runner, is_root=True) == 0
    (anchor,) = system.iterdir()
    assert anchor.suffix == ".crt"
    assert anchor.read_bytes() == (tmp_path / "ca" / "rootCA.pem").read_bytes()
    assert runner.calls == [["/bin/true", "--fresh"]]
    assert f"added the root to the system store as {anchor}" in out.getvalue()
    out = io.StringIO()
    assert ca_uninstall(env, out, stores=stores, runner=runner, is_root=True) == 0
    assert list(system.iterdir()) == []
    assert len(runner.calls) == 2
    assert "removed the root from the system store" in out.getvalue()


def test_install_reports_certutil_failure(tmp_path: Path) -> None:
    """A certutil that fails is reported with its message, and install exits 1."""
    certutil = tmp_path / "bin" / "certutil"
    certutil.parent.mkdir()
    certutil.write_text("#!/bin/sh\necho 'SEC_ERROR_BAD_DATABASE: bad database' >&2\nexit 1\n")
    certutil.chmod(0o755)
    env = {"HOME": str(tmp_path / "home"), "TLSPROXY_CAROOT": str(tmp_path / "ca"), "PATH": str(certutil.parent)}
    out = io.StringIO()
    assert ca_install(env, out, stores=TrustStores(system=False)) == 1
    assert "SEC_ERROR_BAD_DATABASE" in out.getvalue()


def test_install_with_broken_ca_exits_2(tmp_path: Path) -> None:
    """An unusable CA directory is a clear error with exit code 2."""
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "rootCA.pem").write_text("junk")
    env = {"HOME": str(tmp_path / "home"), "TLSPROXY_CAROOT": str(tmp_path / "ca"), "PATH": ""}
    out = io.StringIO()
    assert ca_install(env, out, stores=TrustStores(system=False)) == 2
    assert out.getvalue().startswith("error: ")


def test_uninstall_without_ca_is_a_no_op(tmp_path: Path) -> None:
    """Uninstall with no CA says there is nothing to do, creates nothing, and succeeds."""
    env = {"HOME": str(tmp_path / "home"), "TLSPROXY_CAROOT": str(tmp_path / "ca"), "PATH": ""}
    out = io.StringIO()
    assert ca_uninstall(env, out, stores=TrustStores(system=False)) == 0
    assert "nothing to uninstall" in out.getvalue()
    assert not (tmp_path / "ca").exists()


def test_names_under_localhost_get_their_own_leaf(shared_ca: LocalCA) -> None:
    """app.localhost gets a leaf naming it alone (browsers ignore *.localhost), cached until renewal."""
    clock, sni, local, service = make_service(shared_ca)
    service.startService()
    context = sni.sni_map.lookup("app.localhost")
    assert context is not None and context is not sni.sni_map.context_of(local.name)
    leaf = SSL.Connection(context, None).get_certificate().to_cryptography()
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == ["app.localhost"]
    assert sni.sni_map.lookup("app.localhost") is context
    assert sni.sni_map.lookup("localhost") is sni.sni_map.context_of(local.name)
    service.stopService()

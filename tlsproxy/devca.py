"""The local development CA: a private root that the developer's browsers trust.

Like mkcert: one root per user, made once in the user's data directory and
added to the browsers' trust stores by ``tlsproxy ca install``.  The running
proxy issues short-lived leaves from it in memory, so no leaf key is ever
written to disk, and re-issues them before they expire.

Leaves live seven days by default.  They are never stored, so nothing is gained
by a long life, and a short one bounds what a leaked leaf key (a core dump, a
debugger) is good for.  Seven days is far below the 398 days Chromium accepts,
and the proxy replaces the leaf with a third of that left (about 2.3 days), so
even a laptop that slept through the renewal time gets a fresh one on waking.

The root key is written once (temporary file, fsync, rename) with mode 0600 in
a 0700 directory, is read only by :meth:`LocalCA.load_or_create`, and appears
in no message, log line or repr.
"""

from __future__ import annotations

import datetime
import getpass
import ipaddress
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from tlsproxy.certs.model import CertifiedKey
from tlsproxy.certs.store import atomic_write
from tlsproxy.config import Site
from tlsproxy.tls.sni import SniServer

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

ROOT_CERT_NAME = "rootCA.pem"
ROOT_KEY_NAME = "rootCA-key.pem"
ROOT_LIFETIME = datetime.timedelta(days=3650)
LEAF_LIFETIME = datetime.timedelta(days=7)
# Chromium refuses leaves valid for longer than this, whoever issued them.
MAX_LEAF_VALIDITY = datetime.timedelta(days=398)
# Leaves start a little in the past, so a clock that runs slightly behind
# (a VM, a container just resumed) still accepts a leaf issued a moment ago.
BACKDATE = datetime.timedelta(minutes=5)
RETRY_AFTER = 60.0
ROOT_ORGANIZATION = "tlsproxy development CA"
LEAF_ORGANIZATION = "tlsproxy development certificate"
SYSTEM_ANCHORS = Path("/usr/local/share/ca-certificates")


class CAError(Exception):
    """The local CA cannot be read or made: ``path`` says where, ``reason`` why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# ---------------------------------------------------------------------------
# Pure decisions


def default_caroot(environ: Mapping[str, str] | None = None) -> Path:
    """$TLSPROXY_CAROOT, else $XDG_DATA_HOME/tlsproxy, else ~/.local/share/tlsproxy (of os.environ by default)."""
    environ = os.environ if environ is None else environ
    if environ.get("TLSPROXY_CAROOT"):
        return Path(environ["TLSPROXY_CAROOT"])
    if environ.get("XDG_DATA_HOME"):
        return Path(environ["XDG_DATA_HOME"]) / "tlsproxy"
    return _home(environ) / ".local" / "share" / "tlsproxy"


def _home(environ: Mapping[str, str]) -> Path:
    home = environ.get("HOME")
    return Path(home) if home else Path.home()


def owner_label(environ: Mapping[str, str]) -> str:
    """``user@host``, which tells one developer's roots apart in a trust store."""
    user = environ.get("USER") or environ.get("LOGNAME")
    if not user:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
    return f"{user}@{socket.gethostname()}"


def split_hosts(hosts: Sequence[str]) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """DNS names and IP addresses of ``hosts`` (raises ValueError for anything else)."""
    if isinstance(hosts, str):
        raise ValueError("hosts must be a sequence of names, not one string")
    if not hosts:
        raise ValueError("a certificate needs at least one host")
    names: list[str] = []
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for host in hosts:
        bare = host.strip().strip("[]").rstrip(".").lower()
        try:
            addresses.append(ipaddress.ip_address(bare))
            continue
        except ValueError:
            pass
        labels = bare.split(".")
        if (
            not bare
            or not bare.isascii()
            or any(not label for label in labels)
            or any(not all(c.isalnum() or c == "-" for c in label) for label in labels[1:])
            or not (labels[0] == "*" or all(c.isalnum() or c == "-" for c in labels[0]))
            or (labels[0] == "*" and len(labels) < 2)
        ):
            raise ValueError(f"{host!r} is neither a DNS name nor an IP address")
        names.append(bare)
    return names, addresses


def ignored_wildcards(hosts: Sequence[str]) -> list[str]:
    """Wildcards over a single label (``*.localhost``): browsers and OpenSSL match no name against them."""
    return [h for h in hosts if h.startswith("*.") and "." not in h[2:].rstrip(".")]


def build_root(key: ec.EllipticCurvePrivateKey, owner: str, now: datetime.datetime) -> x509.Certificate:
    """A self-signed root that may sign leaves only (pathlen 0)."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ROOT_ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, owner[:64]),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{ROOT_ORGANIZATION} {owner}"[:64]),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def build_leaf(
    hosts: Sequence[str],
    leaf_key: ec.EllipticCurvePrivateKey,
    root: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
    lifetime: datetime.timedelta,
) -> x509.Certificate:
    """A server certificate for ``hosts`` that Chromium accepts from a trusted root."""
    names, addresses = split_hosts(hosts)
    if lifetime <= datetime.timedelta(0) or lifetime + BACKDATE > MAX_LEAF_VALIDITY:
        raise ValueError(f"a leaf lifetime must be positive and below {MAX_LEAF_VALIDITY.days} days")
    not_before = max(now - BACKDATE, root.not_valid_before_utc)
    not_after = min(now + lifetime, root.not_valid_after_utc)
    if not_after <= now:
        raise ValueError(f"the root expired at {root.not_valid_after_utc.isoformat()}")
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(a) for a in addresses]
    public = leaf_key.public_key()
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, LEAF_ORGANIZATION),
                    x509.NameAttribute(NameOID.COMMON_NAME, (names or [str(addresses[0])])[0][:64]),
                ]
            )
        )
        .issuer_name(root.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), critical=False)
        .sign(root_key, hashes.SHA256())
    )


def renewal_time(certified: CertifiedKey) -> datetime.datetime:
    """When to replace a leaf: with a third of its validity left."""
    return certified.not_after - (certified.not_after - certified.not_before) / 3


def utc_from_seconds(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


# ---------------------------------------------------------------------------
# The CA on disk


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory``, so two processes make one root."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class LocalCA:
    """The root certificate and key, read from (or made in) ``caroot``."""

    caroot: Path
    root: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def root_pem_path(self) -> Path:
        return self.caroot / ROOT_CERT_NAME

    @property
    def root_key_path(self) -> Path:
        return self.caroot / ROOT_KEY_NAME

    @property
    def nickname(self) -> str:
        """The name of this root in trust stores: unique per root, recognisably ours."""
        return _nickname(self.root)

    @property
    def fingerprint(self) -> str:
        return self.root.fingerprint(hashes.SHA256()).hex(":")

    @classmethod
    def load_or_create(
        cls,
        caroot: Path,
        now: datetime.datetime | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> LocalCA:
        """Read the root in ``caroot``, making it (and the directory) the first time.

        Blocking: call it before the reactor runs, or in a thread.
        """
        now = now or datetime.datetime.now(datetime.UTC)
        environ = os.environ if environ is None else environ
        caroot = Path(caroot)
        created_dir = not caroot.exists()
        try:
            caroot.mkdir(mode=0o700, parents=True, exist_ok=True)
            if created_dir:
                os.chmod(caroot, 0o700)  # mkdir's mode is filtered by the umask
        except OSError as e:
            raise CAError(caroot, f"cannot create the CA directory: {e.strerror}") from None
        with _locked(caroot):
            key_path, cert_path = caroot / ROOT_KEY_NAME, caroot / ROOT_CERT_NAME
            if not key_path.exists():
                if cert_path.exists():
                    raise CAError(
                        key_path,
                        f"missing, but {ROOT_CERT_NAME} is there: this root can no longer sign;"
                        f" run `tlsproxy ca uninstall`, remove {cert_path}, and install again",
                    )
                os.chmod(caroot, 0o700)  # the key is about to live here
                key = ec.generate_private_key(ec.SECP256R1())
                atomic_write(key_path, _key_pem(key), 0o600)
            key = _read_key(key_path)
            if not cert_path.exists():
                # A crash between the two writes: the key was never trusted anywhere.
                atomic_write(cert_path, build_root(key, owner_label(environ), now).public_bytes(_PEM), 0o644)
            root = _read_root(cert_path)
        if root.public_key().public_bytes(_DER, _SPKI) != key.public_key().public_bytes(_DER, _SPKI):
            raise CAError(key_path, f"does not match {cert_path}")
        return cls(caroot=caroot, root=root, key=key)

    def issue(
        self,
        hosts: Sequence[str],
        now: datetime.datetime,
        lifetime: datetime.timedelta = LEAF_LIFETIME,
    ) -> CertifiedKey:
        """A fresh leaf and key for ``hosts``, chained to this root; held in memory only."""
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = build_leaf(hosts, leaf_key, self.root, self.key, now, lifetime)
        return CertifiedKey(chain=(leaf, self.root), key=leaf_key, source=f"local CA {self.caroot}")


_PEM = serialization.Encoding.PEM
_DER = serialization.Encoding.DER
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise CAError(path, f"other users may read the root key (mode {mode & 0o777:o}); chmod 600 it")
        data = path.read_bytes()
    except OSError as e:
        raise CAError(path, f"cannot read the root key: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CAError(path, "not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(path, f"expected an EC key, found {type(key).__name__}")
    return key


def _read_root(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as e:
        raise CAError(path, f"cannot read the root certificate: {e.strerror}") from None
    except ValueError:
        raise CAError(path, "not a PEM certificate") from None


def read_root_only(caroot: Path) -> x509.Certificate | None:
    """The root certificate alone (no key), or None when there is no CA yet."""
    path = caroot / ROOT_CERT_NAME
    return _read_root(path) if path.exists() else None


# ---------------------------------------------------------------------------
# Serving leaves


class LocalCertificateService(Service):
    """Issue a leaf for every ``tls = "local"`` site, install it, and renew it in time.

    Issuing runs on the reactor thread: a P-256 key and one ECDSA signature take
    well under a millisecond, and doing it in ``startService`` means the
    certificate is in the SNI map before any listener accepts a connection.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        ca: LocalCA,
        sni: SniServer,
        sites: Sequence[Site],
        lifetime: datetime.timedelta = LEAF_LIFETIME,
    ) -> None:
        self.clock = clock
        self.ca = ca
        self.sni = sni
        self.sites = tuple(s for s in sites if s.tls == "local")
        self.lifetime = lifetime
        self._current: dict[str, CertifiedKey] = {}
        self._by_name: dict[str, tuple[CertifiedKey, SSL.Context]] = {}
        self._call: IDelayedCall | None = None

    @property
    def current(self) -> Mapping[str, CertifiedKey]:
        """Site name -> the leaf being served now."""
        return dict(self._current)

    def startService(self) -> None:
        super().startService()
        for site in self.sites:
            wild = ignored_wildcards(site.hosts)
            if wild:
                # Browsers ignore a wildcard right above a one-label name such
                # as *.localhost, so each such name gets a leaf of its own on
                # its first handshake.
                self.sni.sni_map.set_on_demand(site.name, self.context_for_name)
                self.log.info(
                    "{site}: names under {wildcards} get a certificate of their own on first use",
                    site=site.name,
                    wildcards=", ".join(wild),
                )
        self._issue_due(force=True)

    def stopService(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        super().stopService()

    def _issue_due(self, force: bool = False) -> None:
        self._call = None
        now = utc_from_seconds(self.clock.seconds())
        next_at: datetime.datetime | None = None
        for site in self.sites:
            current = self._current.get(site.name)
            if force or current is None or renewal_time(current) <= now:
                try:
                    current = self._install(site, now)
                except Exception:
                    self.log.failure("could not issue a local certificate for {site}", site=site.name)
                    retry = now + datetime.timedelta(seconds=RETRY_AFTER)
                    next_at = retry if next_at is None else min(next_at, retry)
                    continue
            due = renewal_time(current)
            next_at = due if next_at is None else min(next_at, due)
        if next_at is not None and self.running:
            delay = max(0.0, (next_at - now).total_seconds())
            self._call = self.clock.callLater(delay, self._issue_due)

    def context_for_name(self, host: str) -> SSL.Context | None:
        """A context for ``host`` alone (issued now, or cached until renewal time)."""
        now = utc_from_seconds(self.clock.seconds())
        cached = self._by_name.get(host)
        if cached is not None and renewal_time(cached[0]) > now:
            return cached[1]
        try:
            certified = self.ca.issue([host], now, self.lifetime)
        except Exception:
            self.log.failure("could not issue a local certificate for {host}", host=host)
            return None
        context = self.sni.context_for(certified)
        self._by_name[host] = (certified, context)
        self.log.info(
            "local CA certificate issued for {host}, valid until {not_after}",
            host=host,
            not_after=certified.not_after.isoformat(),
        )
        return context

    def _install(self, site: Site, now: datetime.datetime) -> CertifiedKey:
        certified = self.ca.issue(site.hosts, now, self.lifetime)
        self.sni.sni_map.set_context(site.name, self.sni.context_for(certified))
        self._current[site.name] = certified
        self.log.info(
            "local CA certificate installed for {site}: {hosts}, valid until {not_after}, renewing at {renew_at}",
            site=site.name,
            hosts=", ".join(site.hosts),
            not_after=certified.not_after.isoformat(),
            renew_at=renewal_time(certified).isoformat(),
        )
        return certified


# ---------------------------------------------------------------------------
# Trust stores and the `tlsproxy ca` commands

Runner = Callable[..., subprocess.CompletedProcess]  # subprocess.run's shape


def nss_databases(home: Path) -> list[Path]:
    """NSS databases the browsers read: Chromium's shared one, then Firefox profiles."""
    found = [home / ".pki" / "nssdb"]
    for root in (home / ".mozilla" / "firefox", home / "snap" / "firefox" / "common" / ".mozilla" / "firefox"):
        found += sorted(p.parent for p in root.glob("*/cert9.db"))
    return found


def system_anchor_name(ca: LocalCA | x509.Certificate) -> str:
    root = ca.root if isinstance(ca, LocalCA) else ca
    return f"tlsproxy-development-ca-{root.serial_number:x}"[:60] + ".crt"


def _nickname(root: x509.Certificate) -> str:
    return f"{ROOT_ORGANIZATION} {root.serial_number:x}"[:64]


@dataclass(frozen=True)
class TrustStores:
    """Where ``ca install`` puts the root; tests point these at temporary places."""

    nss: bool = True
    system: bool = True
    system_dir: Path = SYSTEM_ANCHORS
    update_command: tuple[str, ...] = ("update-ca-certificates",)


def _run(runner: Runner, argv: list[str], environ: Mapping[str, str]) -> subprocess.CompletedProcess:
    return runner(argv, capture_output=True, text=True, env=dict(environ), check=False)


def _which(name: str, environ: Mapping[str, str]) -> str | None:
    return shutil.which(name, path=environ.get("PATH", os.defpath))


def _output(result: subprocess.CompletedProcess) -> str:
    return " ".join(((result.stderr or "") + " " + (result.stdout or "")).split()) or f"exit {result.returncode}"


def _nss_has(runner: Runner, certutil: str, db: Path, nickname: str, environ: Mapping[str, str]) -> bool:
    return _run(runner, [certutil, "-L", "-d", f"sql:{db}", "-n", nickname], environ).returncode == 0


def ca_path(environ: Mapping[str, str], out: IO[str]) -> int:
    """``tlsproxy ca path``: print the CA directory (made or not)."""
    print(default_caroot(environ), file=out)
    return 0


def ca_install(
    environ: Mapping[str, str],
    out: IO[str],
    *,
    stores: TrustStores = TrustStores(),
    runner: Runner = subprocess.run,
    is_root: bool | None = None,
) -> int:
    """``tlsproxy ca install``: make the CA if needed, trust it in NSS and the system store.

    Exit 0 when the browsers' NSS store trusts the root, 1 when something that
    should have worked did not, 2 when the CA itself cannot be used.
    """
    caroot = default_caroot(environ)
    try:
        existed = (caroot / ROOT_KEY_NAME).exists()
        ca = LocalCA.load_or_create(caroot, environ=environ)
    except CAError as e:
        print(f"error: {e}", file=out)
        return 2
    print(f"{'Using' if existed else 'Created'} the local CA in {caroot}", file=out)
    print(f"  root {ca.root.subject.rfc4514_string()}, SHA-256 {ca.fingerprint}", file=out)
    failed = False
    if stores.nss:
        failed |= not _install_nss(ca, environ, out, runner)
    if stores.system:
        failed |= not _install_system(ca, environ, out, runner, stores, is_root)
    return 1 if failed else 0


def _install_nss(ca: LocalCA, environ: Mapping[str, str], out: IO[str], runner: Runner) -> bool:
    certutil = _which("certutil", environ)
    if certutil is None:
        print(
            "could not add the root to Chromium/Firefox (NSS): certutil not found;"
            " install it with `apt-get install libnss3-tools`, then run `tlsproxy ca install` again",
            file=out,
        )
        return False
    ok = True
    home = _home(environ)
    for db in nss_databases(home):
        if not (db / "cert9.db").exists():
            if db != home / ".pki" / "nssdb":
                continue
            try:
                db.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as e:
                print(f"could not create the NSS database {db}: {e.strerror}", file=out)
                ok = False
                continue
            made = _run(runner, [certutil, "-N", "-d", f"sql:{db}", "--empty-password"], environ)
            if made.returncode != 0:
                print(f"could not create the NSS database {db}: {_output(made)}", file=out)
                ok = False
                continue
            print(f"created the NSS database {db}", file=out)
        if _nss_has(runner, certutil, db, ca.nickname, environ):
            print(f"already trusted in NSS database {db} as {ca.nickname!r}", file=out)
            continue
        argv = [certutil, "-A", "-d", f"sql:{db}", "-t", "C,,", "-n", ca.nickname, "-i", str(ca.root_pem_path)]
        added = _run(runner, argv, environ)
        if added.returncode != 0:
            print(f"could not add the root to NSS database {db}: {_output(added)}", file=out)
            ok = False
        else:
            print(f"added the root to NSS database {db} as {ca.nickname!r}", file=out)
    return ok


def _system_writable(stores: TrustStores, is_root: bool | None) -> str | None:
    """None when the system store may be changed, else why not."""
    if is_root is None:
        is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if not stores.system_dir.is_dir():
        return f"{stores.system_dir} does not exist (not a Debian-style system)"
    if not is_root or not os.access(stores.system_dir, os.W_OK):
        return f"{stores.system_dir} is not writable by this user (the system store needs root)"
    return None


def _install_system(
    ca: LocalCA,
    environ: Mapping[str, str],
    out: IO[str],
    runner: Runner,
    stores: TrustStores,
    is_root: bool | None,
) -> bool:
    target = stores.system_dir / system_anchor_name(ca)
    why = _system_writable(stores, is_root)
    if why is not None:
        print(f"skipped the system store: {why}; to add it there:", file=out)
        print(f"  sudo cp {ca.root_pem_path} {target} && sudo update-ca-certificates", file=out)
        return True
    if target.exists() and target.read_bytes() == ca.root_pem_path.read_bytes():
        print(f"already in the system store as {target}", file=out)
        return True
    try:
        atomic_write(target, ca.root_pem_path.read_bytes(), 0o644)
    except OSError as e:
        print(f"could not write {target}: {e.strerror}", file=out)
        return False
    return _update_system(target, "added the root to the system store as", environ, out, runner, stores)


def _update_system(
    target: Path, done: str, environ: Mapping[str, str], out: IO[str], runner: Runner, stores: TrustStores
) -> bool:
    command = _which(stores.update_command[0], environ) or (
        stores.update_command[0] if os.path.isabs(stores.update_command[0]) else None
    )
    if command is None:
        print(f"{done} {target}, but {stores.update_command[0]} was not found to apply it", file=out)
        return False
    result = _run(runner, [command, *stores.update_command[1:]], environ)
    if result.returncode != 0:
        print(f"{done} {target}, but {stores.update_command[0]} failed: {_output(result)}", file=out)
        return False
    print(f"{done} {target} ({' '.join(stores.update_command)} ran)", file=out)
    return True


def ca_uninstall(
    environ: Mapping[str, str],
    out: IO[str],
    *,
    stores: TrustStores = TrustStores(),
    runner: Runner = subprocess.run,
    is_root: bool | None = None,
) -> int:
    """``tlsproxy ca uninstall``: take the root out of every store install put it in.

    The CA directory stays, so a later install trusts the same root again.
    """
    caroot = default_caroot(environ)
    try:
        root = read_root_only(caroot)
    except CAError as e:
        print(f"error: {e}", file=out)
        return 2
    if root is None:
        print(f"no local CA in {caroot}: nothing to uninstall", file=out)
        return 0
    nickname = _nickname(root)
    ok = True
    if stores.nss:
        certutil = _which("certutil", environ)
        if certutil is None:
            print(
                "could not remove the root from Chromium/Firefox (NSS): certutil not found;"
                " install it with `apt-get install libnss3-tools`",
                file=out,
            )
            ok = False
        else:
            for db in nss_databases(_home(environ)):
                if not (db / "cert9.db").exists() or not _nss_has(runner, certutil, db, nickname, environ):
                    continue
                removed = _run(runner, [certutil, "-D", "-d", f"sql:{db}", "-n", nickname], environ)
                if removed.returncode != 0:
                    print(f"could not remove the root from NSS database {db}: {_output(removed)}", file=out)
                    ok = False
                else:
                    print(f"removed the root from NSS database {db}", file=out)
    if stores.system:
        target = stores.system_dir / system_anchor_name(root)
        if target.exists():
            why = _system_writable(stores, is_root)
            if why is not None:
                print(
                    f"could not remove {target}: {why}; run `sudo rm {target} && sudo update-ca-certificates`", file=out
                )
                ok = False
            else:
                try:
                    target.unlink()
                except OSError as e:
                    print(f"could not remove {target}: {e.strerror}", file=out)
                    ok = False
                else:
                    ok &= _update_system(
                        target, "removed the root from the system store:", environ, out, runner, stores
                    )
    print(f"the local CA itself stays in {caroot}" + ("" if ok else "; some stores could not be cleaned"), file=out)
    return 0 if ok else 1

"""The local CA on disk: one root per user, made once, read by the proxy and ``tlsproxy ca``.

The root key is written once (temporary file, fsync, rename) with mode 0600 in
a 0700 directory, is read only by :meth:`LocalCA.load_or_create`, and appears
in no message, log line or repr.  Everything here blocks: call it before the
reactor runs, or in a thread.
"""

from __future__ import annotations

import datetime
import getpass
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tlsproxy.certs.model import CertifiedKey
from tlsproxy.certs.store import atomic_write
from tlsproxy.devca.certificates import LEAF_LIFETIME, build_leaf, build_root, root_nickname

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

ROOT_CERT_NAME = "rootCA.pem"
ROOT_KEY_NAME = "rootCA-key.pem"


class CAError(Exception):
    """The local CA cannot be read or made: ``path`` says where, ``reason`` why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def default_caroot(environ: Mapping[str, str] | None = None) -> Path:
    """$TLSPROXY_CAROOT, else $XDG_DATA_HOME/tlsproxy, else ~/.local/share/tlsproxy (of os.environ by default)."""
    environ = os.environ if environ is None else environ
    if environ.get("TLSPROXY_CAROOT"):
        return Path(environ["TLSPROXY_CAROOT"])
    if environ.get("XDG_DATA_HOME"):
        return Path(environ["XDG_DATA_HOME"]) / "tlsproxy"
    return home_of(environ) / ".local" / "share" / "tlsproxy"


def home_of(environ: Mapping[str, str]) -> Path:
    """$HOME of ``environ``, so tests and ``sudo -E`` point at the home they mean."""
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
        return root_nickname(self.root)

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

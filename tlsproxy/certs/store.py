"""The certificate store: one directory (``[server] state_dir``) shared by every writer.

The running proxy, the ``tlsproxy`` command and a second proxy on the same
state directory all read and write here; each reader notices others' writes by
``stat`` (see :func:`FileSignature`).  Layout::

    state_dir/                          0700
      lock                              flock(2) held while ordering or changing the account
      account/                          0700
        key.pem                         0600  account key, ECDSA P-256, PKCS#8
        key.next.pem                    0600  a rollover's next key, until the CA has switched
        registrations.json              0600  {directory URL: account URL}
      ticket-keys.json                  0600  session ticket keys shared by this machine's processes
      certs/<site name>/                0700  site name = the site's first host
        current -> v-<id>               symlink to the version in use, swapped in one rename
        v-<id>/                         0700  one certificate, never changed once linked
          key.pem                       0600  the certificate's private key
          fullchain.pem                 0644  leaf first, then intermediates
        key.pem -> current/key.pem            for readers of the old layout (see below)
        fullchain.pem -> current/fullchain.pem
        meta.json                       0644  see :class:`SiteMeta`
      challenges/                       0700  answers published by the ``tlsproxy``
        http-01/<token>                       command for a running proxy to serve
        tls-alpn-01/<host>                    (content: the key authorization)

Every file is written atomically: a temporary file in the same directory,
``fsync``, ``rename`` over the old name, ``fsync`` of the directory.  A key and
its chain must change together, so a new pair is written and synced whole in a
new version directory first, and only then does one ``rename`` of a symlink
make it current: a full disk or a crash at any step leaves the old pair or the
new one, never a new key with an old chain.  Readers resolve ``current`` once
and read both files from that version.  Leftovers of an interrupted write
(dot-named temporaries, versions nothing links to) are ignored by readers and
removed by the next writer, under the lock.

The first layout kept ``key.pem`` and ``fullchain.pem`` as plain files in the
site directory; such a site is read as it is and moved to a version on its next
write, after which the two names are symlinks into ``current``.

:class:`Store` is the interface this directory and the fleet's Redis
(:mod:`tlsproxy.certs.redis_store`) both implement; the Redis store keeps its
local copy of the certificates in this same layout.

Nothing here imports ``twisted.internet``: the blocking calls are made from
threads (the service) or directly (the command line).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tlsproxy.certs.model import CertificateError, CertifiedKey
from tlsproxy.certs.ticketkeys import TicketKeys

_SAFE_NAME = re.compile(r"\A[a-z0-9*][a-z0-9.*-]{0,252}\Z")


class StoreError(Exception):
    """The store cannot be used: ``action`` says what we were doing, ``path`` where, ``reason`` why."""

    def __init__(self, path: str, reason: str, action: str = "") -> None:
        super().__init__(f"{action}: {path}: {reason}" if action else f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.action = action


@contextmanager
def _failing_as_store_error(action: str, path: str | Path) -> Iterator[None]:
    """Turn an OSError (a full disk, a read-only file system) into a one-line StoreError."""
    try:
        yield
    except OSError as e:
        where = e.filename if isinstance(e.filename, str) else str(path)
        raise StoreError(where, e.strerror or str(e), action) from None


class LockTimeout(StoreError):
    """Another process held the store lock for longer than we would wait."""


class StoreUnavailable(StoreError):
    """A shared store cannot be reached now (down, or the network is); what we hold keeps serving."""


def _iso(when: datetime.datetime | None) -> str | None:
    return when.astimezone(datetime.UTC).isoformat() if when is not None else None


def _from_iso(text: Any) -> datetime.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return value


@dataclass(frozen=True)
class SiteMeta:
    """What the store knows about a site's certificate beyond the PEM files.

    ``ari_start``/``ari_end`` are the CA's suggested renewal window (RFC 9773),
    ``ari_retry_after`` when to ask again; ``failures`` counts consecutive failed
    attempts (for backoff), ``next_attempt`` is when the next one is due,
    ``last_error`` the CA's words about the last failure.
    """

    hosts: tuple[str, ...] = ()
    issuer: str = ""
    serial: str = ""
    not_before: datetime.datetime | None = None
    not_after: datetime.datetime | None = None
    ari_start: datetime.datetime | None = None
    ari_end: datetime.datetime | None = None
    ari_retry_after: datetime.datetime | None = None
    ari_cert_id: str = ""
    last_error: str = ""
    last_attempt: datetime.datetime | None = None
    next_attempt: datetime.datetime | None = None
    failures: int = 0
    renew_requested: bool = False

    _TIMES = (
        "not_before",
        "not_after",
        "ari_start",
        "ari_end",
        "ari_retry_after",
        "last_attempt",
        "next_attempt",
    )

    def to_json(self) -> str:
        raw = asdict(self)
        raw["hosts"] = list(self.hosts)
        for name in self._TIMES:
            raw[name] = _iso(getattr(self, name))
        return json.dumps(raw, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SiteMeta:
        try:
            raw = json.loads(text)
        except ValueError:
            return cls()
        if not isinstance(raw, dict):
            return cls()
        values: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            if name.startswith("_") or name not in raw:
                continue
            value = raw[name]
            if name in cls._TIMES:
                values[name] = _from_iso(value)
            elif name == "hosts":
                values[name] = tuple(str(h) for h in value) if isinstance(value, list) else ()
            elif name == "failures":
                values[name] = value if isinstance(value, int) and value >= 0 else 0
            elif name == "renew_requested":
                values[name] = bool(value)
            elif isinstance(value, str):
                values[name] = value
        return cls(**values)

    def describe_certificate(self, certified: CertifiedKey) -> SiteMeta:
        """This meta with the certificate facts of ``certified`` filled in."""
        return replace(
            self,
            issuer=certified.leaf.issuer.rfc4514_string(),
            serial=format(certified.leaf.serial_number, "x"),
            not_before=certified.not_before,
            not_after=certified.not_after,
        )


@dataclass(frozen=True)
class FileSignature:
    """What ``stat`` says about a set of files; a change means "read again"."""

    parts: tuple[Hashable | None, ...] = field(default=())

    @classmethod
    def of(cls, *paths: str | Path) -> FileSignature:
        parts: list[tuple[int, int, int] | None] = []
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                parts.append(None)
            else:
                parts.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return cls(tuple(parts))

    @property
    def complete(self) -> bool:
        return all(p is not None for p in self.parts)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new file, never half."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (which must not exist) with ``data`` and sync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a file, symlink or directory tree; gone already is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


CURRENT = "current"
KEY_NAME = "key.pem"
CHAIN_NAME = "fullchain.pem"


class Store(Protocol):
    """Where certificates, their keys, the ACME account, challenge answers and ticket keys live.

    The seam between the issuer (and the commands) and what holds their state:
    :class:`CertificateStore` (one directory, one machine) and
    :class:`tlsproxy.certs.redis_store.RedisStore` (a fleet) implement it, and
    tests/unit/test_store_contract.py runs the same tests against both.  Every
    method may block: call them from a thread, never from the reactor.
    """

    # True when other machines share it: their listeners answer challenges from
    # it, so an order publishes its answers here and gives them time to be read.
    shared: bool

    def describe(self) -> str:
        """Where the store is, for messages (never a password)."""
        ...

    def ensure(self) -> None: ...

    def problem(self) -> str | None:
        """Why the store could not be used the last time we tried, or None (no I/O)."""
        ...

    def locked(self, timeout: float = 600.0, *, name: str = "") -> AbstractContextManager[None]:
        """Hold the lock called ``name`` (a site, "account"; "" the whole store); LockTimeout after ``timeout``."""
        ...

    def offline(self) -> Store:
        """What this process keeps on its own disk: read at start, and while a shared store is unreachable."""
        ...

    def watch(self, changed: Callable[[], None]) -> Callable[[], None]:
        """Call ``changed`` (from any thread) soon after another writer changes the store; returns "stop"."""
        ...

    # the ACME account
    def load_account_key(self) -> ec.EllipticCurvePrivateKey | None: ...
    def save_account_key(self, key: ec.EllipticCurvePrivateKey) -> None: ...
    def account_key(self) -> ec.EllipticCurvePrivateKey: ...
    def stage_account_key(self, key: ec.EllipticCurvePrivateKey | None) -> None:
        """Keep a rollover's next key beside the current one until the CA has switched (None: forget it)."""
        ...

    def load_staged_account_key(self) -> ec.EllipticCurvePrivateKey | None: ...
    def registrations(self) -> dict[str, str]: ...
    def registration(self, directory_url: str) -> str | None: ...
    def save_registration(self, directory_url: str, account_url: str | None) -> None: ...
    def account_signature(self) -> Hashable:
        """Changes when the account key or its registrations change (a rollover elsewhere)."""
        ...

    # certificates and their renewal state
    def load_meta(self, name: str) -> SiteMeta: ...
    def save_meta(self, name: str, meta: SiteMeta) -> None: ...
    def load_certificate(self, name: str) -> CertifiedKey | None: ...
    def save_certificate(self, name: str, certified: CertifiedKey, meta: SiteMeta) -> SiteMeta: ...
    def tidy(self, name: str) -> None: ...
    def signature(self, name: str) -> FileSignature:
        """Changes when any writer replaces the site's key and chain; ``complete`` when there is a pair."""
        ...

    # challenge answers every listener serves
    def publish_challenge(self, kind: str, name: str, key_authorization: str) -> None: ...
    def withdraw_challenge(self, kind: str, name: str) -> None: ...
    def challenges(self, kind: str) -> dict[str, str]: ...

    # session ticket keys shared by every process that serves the same sites
    def load_ticket_keys(self) -> TicketKeys | None: ...
    def save_ticket_keys(self, keys: TicketKeys) -> None: ...


def _load_ec_key(data: bytes, where: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError:
        raise StoreError(where, "the account key cannot be read (not an unencrypted PEM key)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StoreError(where, "the account key is not an ECDSA key")
    return key


def _ec_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class CertificateStore:
    """The state directory, read and written by path; see the module docstring."""

    shared = False

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir)

    def describe(self) -> str:
        return f"directory {self.root}"

    def problem(self) -> str | None:
        return None

    def offline(self) -> CertificateStore:
        return self

    def watch(self, changed: Callable[[], None]) -> Callable[[], None]:
        """Nothing to subscribe to: the service's stat polling sees other writers."""
        return lambda: None

    # -- layout (pure) ---------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.root / "lock"

    @property
    def account_dir(self) -> Path:
        return self.root / "account"

    @property
    def account_key_path(self) -> Path:
        return self.account_dir / "key.pem"

    @property
    def registrations_path(self) -> Path:
        return self.account_dir / "registrations.json"

    def site_dir(self, name: str) -> Path:
        name = name.lower().rstrip(".")
        if not _SAFE_NAME.match(name) or ".." in name:
            raise StoreError(name, "not a usable site name")
        return self.root / "certs" / name

    def pair_dir(self, name: str) -> Path:
        """Where the site's key and chain are read from: ``current`` (a version), or the old layout's files."""
        site = self.site_dir(name)
        link = site / CURRENT
        if link.is_symlink() or not (site / KEY_NAME).exists():
            return link
        return site

    def key_path(self, name: str) -> Path:
        return self.pair_dir(name) / KEY_NAME

    def chain_path(self, name: str) -> Path:
        return self.pair_dir(name) / CHAIN_NAME

    def meta_path(self, name: str) -> Path:
        return self.site_dir(name) / "meta.json"

    def challenge_dir(self, kind: str) -> Path:
        if kind not in ("http-01", "tls-alpn-01"):
            raise StoreError(kind, "not a challenge type")
        return self.root / "challenges" / kind

    def signature(self, name: str) -> FileSignature:
        """Changes when any writer replaces this site's key or chain (not meta.json: it is no new certificate)."""
        pair = self.pair_dir(name)
        return FileSignature.of(pair / KEY_NAME, pair / CHAIN_NAME)

    # -- directories and locking -------------------------------------------------

    def _ensure_dir(self, path: Path) -> None:
        """Create ``path`` and any missing directories up to it, each 0700."""
        missing = []
        for p in (path, *path.parents):
            if p.is_dir():
                break
            missing.append(p)
        for p in reversed(missing):
            try:
                p.mkdir(mode=0o700, exist_ok=True)
                os.chmod(p, 0o700)
            except OSError as e:
                raise StoreError(str(p), f"cannot create directory: {e.strerror}") from None

    def ensure(self) -> None:
        """Create the state directory (0700) if it is missing."""
        self._ensure_dir(self.root)
        try:
            os.chmod(self.root, 0o700)
        except OSError:
            pass

    @property
    def staged_account_key_path(self) -> Path:
        return self.account_dir / "key.next.pem"

    @property
    def ticket_keys_path(self) -> Path:
        return self.root / "ticket-keys.json"

    @contextmanager
    def locked(self, timeout: float = 600.0, poll: float = 0.1, *, name: str = "") -> Iterator[None]:
        """Hold the store lock; another process that holds it is waited for.

        One lock for the whole directory, whatever ``name``: one machine's
        writers are few, and one lock cannot deadlock with another.
        """
        self.ensure()
        with _failing_as_store_error("opening the store lock", self.lock_path):
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            end = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= end:
                        raise LockTimeout(
                            str(self.lock_path), f"still held by another process after {timeout:.0f}s"
                        ) from None
                    time.sleep(poll)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # -- account -----------------------------------------------------------------

    def load_account_key(self) -> ec.EllipticCurvePrivateKey | None:
        try:
            data = self.account_key_path.read_bytes()
        except FileNotFoundError:
            return None
        return _load_ec_key(data, str(self.account_key_path))

    def save_account_key(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._ensure_dir(self.account_dir)
        with _failing_as_store_error("saving the account key", self.account_key_path):
            atomic_write(self.account_key_path, _ec_pem(key), 0o600)

    def stage_account_key(self, key: ec.EllipticCurvePrivateKey | None) -> None:
        path = self.staged_account_key_path
        if key is None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            return
        self._ensure_dir(self.account_dir)
        with _failing_as_store_error("keeping the next account key", path):
            atomic_write(path, _ec_pem(key), 0o600)

    def load_staged_account_key(self) -> ec.EllipticCurvePrivateKey | None:
        try:
            data = self.staged_account_key_path.read_bytes()
        except FileNotFoundError:
            return None
        return _load_ec_key(data, str(self.staged_account_key_path))

    def account_signature(self) -> Hashable:
        return FileSignature.of(self.account_key_path, self.registrations_path)

    def account_key(self) -> ec.EllipticCurvePrivateKey:
        """The account key, made (ECDSA P-256) and saved the first time it is asked for."""
        key = self.load_account_key()
        if key is None:
            key = ec.generate_private_key(ec.SECP256R1())
            self.save_account_key(key)
        return key

    def registrations(self) -> dict[str, str]:
        try:
            raw = json.loads(self.registrations_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    def registration(self, directory_url: str) -> str | None:
        """The account URL registered at ``directory_url`` with the current key."""
        return self.registrations().get(directory_url)

    def save_registration(self, directory_url: str, account_url: str | None) -> None:
        self._ensure_dir(self.account_dir)
        regs = self.registrations()
        if account_url is None:
            regs.pop(directory_url, None)
        else:
            regs[directory_url] = account_url
        with _failing_as_store_error("saving the account registration", self.registrations_path):
            atomic_write(self.registrations_path, (json.dumps(regs, indent=2, sort_keys=True) + "\n").encode(), 0o600)

    # -- certificates --------------------------------------------------------------

    def load_meta(self, name: str) -> SiteMeta:
        try:
            return SiteMeta.from_json(self.meta_path(name).read_text())
        except FileNotFoundError:
            return SiteMeta()
        except (OSError, UnicodeDecodeError):
            return SiteMeta()

    def save_meta(self, name: str, meta: SiteMeta) -> None:
        """Record ``meta``; an unchanged meta.json is left alone (no write, no fsync, no new mtime)."""
        path = self.meta_path(name)
        data = meta.to_json().encode()
        try:
            if path.read_bytes() == data:
                return
        except OSError:
            pass
        with _failing_as_store_error(f"recording the state of {name}", path):
            self._ensure_dir(self.site_dir(name))
            atomic_write(path, data)

    def load_certificate(self, name: str) -> CertifiedKey | None:
        """The stored certificate, or None if there is none; raises CertificateError if it is bad.

        ``current`` is resolved once, so key and chain come from one version even
        while a writer swaps in the next; a version removed under our feet is
        looked up again.
        """
        site = self.site_dir(name)
        for _ in range(3):
            pair = self._resolve(site)
            try:
                chain_pem = (pair / CHAIN_NAME).read_bytes()
                key_pem = (pair / KEY_NAME).read_bytes()
            except FileNotFoundError:
                if self._resolve(site) != pair:
                    continue
                return None
            return CertifiedKey.from_pem(chain_pem, key_pem, source=str(pair / CHAIN_NAME))
        return None

    @staticmethod
    def _resolve(site: Path) -> Path:
        """The version ``current`` names now, or the site directory itself for the old layout."""
        try:
            target = os.readlink(site / CURRENT)
        except FileNotFoundError:
            return site
        except OSError as e:
            if e.errno == errno.EINVAL:  # not a symlink: not ours, read as the old layout
                return site
            raise
        if "/" in target or target.startswith("."):
            raise CertificateError(str(site / CURRENT), f"points outside the site directory ({target!r})")
        return site / target

    def save_certificate(self, name: str, certified: CertifiedKey, meta: SiteMeta) -> SiteMeta:
        """Store the pair as a new version, switch to it in one step, then record meta; returns the meta.

        Raises StoreError (with the old pair still current) when anything up to
        the switch fails.  The caller holds the lock.
        """
        site = self.site_dir(name)
        self._ensure_dir(site)
        meta = meta.describe_certificate(certified)
        with _failing_as_store_error(f"saving the certificate of {name}", site):
            version = self._write_version(site, certified)
            self._switch(site, version)
        self.tidy(name)
        self.save_meta(name, meta)
        return meta

    @staticmethod
    def _write_version(site: Path, certified: CertifiedKey) -> Path:
        """A new, fully synced version directory holding the pair (not yet current)."""
        tmp = Path(tempfile.mkdtemp(prefix=".v-", dir=site))
        try:
            os.chmod(tmp, 0o700)
            _write_new(tmp / KEY_NAME, certified.key_pem(), 0o600)
            _write_new(tmp / CHAIN_NAME, certified.chain_pem(), 0o644)
            _fsync_dir(tmp)
            version = site / f"v-{certified.leaf.serial_number:x}-{secrets.token_hex(4)}"
            os.rename(tmp, version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(site)
        return version

    @staticmethod
    def _switch(site: Path, version: Path) -> None:
        """Make ``version`` current with one rename of a symlink."""
        link = site / f".current-{secrets.token_hex(4)}"
        try:
            os.symlink(version.name, link)
            os.rename(link, site / CURRENT)
        except BaseException:
            _remove(link)
            shutil.rmtree(version, ignore_errors=True)
            raise
        _fsync_dir(site)

    def tidy(self, name: str) -> None:
        """Remove what interrupted writes left and the versions nothing links to (call under the lock).

        The old layout's plain files become symlinks into ``current`` once a
        version is current, so a reader of either layout finds the pair.
        """
        site = self.site_dir(name)
        try:
            current = os.readlink(site / CURRENT)
        except OSError:
            current = None
        try:
            entries = list(site.iterdir())
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.startswith(".") or (entry.name.startswith("v-") and entry.name != current):
                try:
                    _remove(entry)
                except OSError:
                    pass
        if current is None:
            return
        for plain in (KEY_NAME, CHAIN_NAME):
            path = site / plain
            if path.is_symlink():
                continue
            link = site / f".{plain}-{secrets.token_hex(4)}"
            try:
                os.symlink(f"{CURRENT}/{plain}", link)
                os.rename(link, path)
            except OSError:
                _remove(link)

    # -- challenges published for a running proxy -----------------------------------

    def publish_challenge(self, kind: str, name: str, key_authorization: str) -> None:
        directory = self.challenge_dir(kind)
        self._ensure_dir(directory)
        if "/" in name or name.startswith("."):
            raise StoreError(name, "not a usable challenge name")
        with _failing_as_store_error("publishing a challenge answer", directory / name):
            atomic_write(directory / name, key_authorization.encode("ascii"), 0o644)

    def withdraw_challenge(self, kind: str, name: str) -> None:
        try:
            (self.challenge_dir(kind) / name).unlink()
        except FileNotFoundError:
            pass

    def challenges(self, kind: str) -> dict[str, str]:
        """Published answers of one kind: token (http-01) or host (tls-alpn-01) -> key authorization."""
        directory = self.challenge_dir(kind)
        out: dict[str, str] = {}
        try:
            entries = list(directory.iterdir())
        except FileNotFoundError:
            return out
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                out[entry.name] = entry.read_text("ascii").strip()
            except (OSError, UnicodeDecodeError):
                continue
        return out

    # -- session ticket keys ----------------------------------------------------------

    def load_ticket_keys(self) -> TicketKeys | None:
        try:
            text = self.ticket_keys_path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise StoreError(str(self.ticket_keys_path), str(e), "reading the session ticket keys") from None
        return TicketKeys.from_json(text)

    def save_ticket_keys(self, keys: TicketKeys) -> None:
        self.ensure()
        with _failing_as_store_error("saving the session ticket keys", self.ticket_keys_path):
            atomic_write(self.ticket_keys_path, keys.to_json().encode(), 0o600)


def read_certificate_files(cert: str, key: str) -> CertifiedKey:
    """A ``tls = "files"`` pair, validated (raises CertificateError or OSError)."""
    return CertifiedKey.from_pem(Path(cert).read_bytes(), Path(key).read_bytes(), source=cert)


__all__ = [
    "CertificateError",
    "CertificateStore",
    "FileSignature",
    "LockTimeout",
    "SiteMeta",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "atomic_write",
    "read_certificate_files",
]

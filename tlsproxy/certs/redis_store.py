"""The store of a fleet: every instance's certificates, account and challenges in one Redis.

Keys, all under ``prefix`` (so several fleets can share one Redis)::

    account:key                 the ACME account key (PEM; sealed, see below)
    account:next                a rollover's next key until the CA has switched
    account:registrations       hash: directory URL -> account URL
    cert:<site>                 hash: key (sealed PEM), chain (PEM), version
    meta:<site>                 JSON of SiteMeta (renewal state and last error)
    challenges:http-01          hash: token -> key authorization
    challenges:tls-alpn-01      hash: host -> key authorization
    tickets                     session ticket keys (sealed JSON)
    live:<instance>             an instance that polls the store (a short TTL, renewed every poll)
    acks:<answer digest>        set: the instances that serve that challenge answer
    lock:<name>                 owner token, with a lease (PX)
    events                      pub/sub channel: "cert <site>", "challenge", "account"

A key and its chain are one hash written by one HSET: a reader gets both or
neither.  Locks are ``SET NX PX`` with a random owner token; while held, a
thread extends the lease every third of it, and both the extension and the
release are Lua scripts that act only if the token is still ours, so a holder
that paused past its lease cannot release (or extend) its successor's lock.
A holder that dies stops extending, and the lease runs out.

Sealing: with a Fernet key (``[store] encryption_key_file``) the private keys
and ticket keys are encrypted before they leave the process, so a Redis dump,
replica or backup holds no usable key; chains, meta and challenge answers are
public anyway.  Unsealed values are still read, so encryption can be turned on
later.

Every certificate read from Redis is also written to the local directory
store (``state_dir``, the usual layout): an instance that starts while Redis
is down serves those until Redis is back.  A call that cannot reach Redis
raises :class:`StoreUnavailable` (and sets :meth:`RedisStore.problem`);
reads of certificates fall back to the local copy instead.

Every call blocks (network I/O): the service makes them in threads.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import redis.exceptions
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.logger import Logger

from tlsproxy.certs.model import CertificateError, CertifiedKey
from tlsproxy.certs.store import (
    CertificateStore,
    FileSignature,
    LockTimeout,
    SiteMeta,
    StoreError,
    StoreUnavailable,
    _ec_pem,
    _load_ec_key,
)
from tlsproxy.certs.store_url import redact_url
from tlsproxy.certs.ticketkeys import TicketKeys

log = Logger()

SEALED = b"fernet:"
CHALLENGE_TTL = 3600  # an answer a dead orderer never withdrew goes away by itself
LIVE_TTL = 10.0  # seconds an instance counts as up after its last poll (polls come every 2 s)

# Extend / release only if the lock still holds our token.
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class _LeaseKeeper:
    """Extends a held lock's lease until stopped; says so if the lock was lost."""

    def __init__(self, extend: Callable[[], bool], lease: float, what: str) -> None:
        self._extend = extend
        self._lease = lease
        self._what = what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tlsproxy lease {what}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._lease / 3):
            try:
                kept = self._extend()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                log.warn("cannot extend the lease of lock {what}: {error}", what=self._what, error=str(e))
                continue
            if not kept:
                log.error("lock {what} was lost (its lease ran out); another instance may take over", what=self._what)
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._lease)


class RedisStore:
    """:class:`~tlsproxy.certs.store.Store` on Redis, with a local copy of the certificates."""

    shared = True
    log = log

    def __init__(
        self,
        url: str,
        cache_dir: str | Path,
        *,
        prefix: str = "tlsproxy:",
        lease: float = 30.0,
        encryption_key: bytes | None = None,
        connect_timeout: float = 3.0,
        timeout: float = 10.0,
        client: Any = None,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.lease = lease
        self.cache = CertificateStore(cache_dir)
        self._fernet = Fernet(encryption_key) if encryption_key else None
        self._redis: Any = client or redis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout, socket_timeout=timeout, health_check_interval=30
        )
        self._extend_script = self._redis.register_script(_EXTEND)
        self._release_script = self._redis.register_script(_RELEASE)
        self._problem: str | None = None
        # Redis said no to the URL's password or user (not merely unreachable): the log names the fix.
        self.credentials_refused = False
        self._cache_lock = threading.Lock()
        # This process's name in the fleet's live:/acks: keys (a reload's new store gets a new one).
        self.instance = secrets.token_hex(6)

    # -- plumbing --------------------------------------------------------------

    def describe(self) -> str:
        return f"redis {redact_url(self.url)} (prefix {self.prefix!r})"

    def problem(self) -> str | None:
        return self._problem

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @contextmanager
    def _talking(self, action: str) -> Iterator[None]:
        """Turn redis-py's errors into StoreUnavailable / StoreError, and remember whether Redis answered."""
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            # A refused password is a ConnectionError to redis-py: unusable all the same, but say which.
            wrong = isinstance(e, redis.exceptions.AuthenticationError)
            reason = f"refuses our credentials ({e})" if wrong else f"unreachable ({e})"
            self.credentials_refused = wrong
            self._problem = f"store {self.describe()}: {reason}"
            raise StoreUnavailable(self.describe(), reason, action) from None
        except redis.exceptions.RedisError as e:
            self._problem = f"store {self.describe()}: {e}"
            raise StoreError(self.describe(), str(e), action) from None
        self._problem = None
        self.credentials_refused = False

    def _seal(self, data: bytes) -> bytes:
        return SEALED + self._fernet.encrypt(data) if self._fernet is not None else data

    def _open(self, data: bytes, what: str) -> bytes:
        if not data.startswith(SEALED):
            return data
        if self._fernet is None:
            raise StoreError(self.describe(), f"{what} is encrypted, and [store] encryption_key_file is not set")
        try:
            return self._fernet.decrypt(data[len(SEALED) :])
        except InvalidToken:
            raise StoreError(self.describe(), f"{what} cannot be decrypted with [store] encryption_key_file") from None

    def _announce(self, pipe: Any, event: str) -> None:
        pipe.publish(self._key("events"), event)

    def ensure(self) -> None:
        self.cache.ensure()

    def offline(self) -> CertificateStore:
        return self.cache

    def ping(self) -> None:
        with self._talking("reaching the store"):
            self._redis.ping()

    # -- locks -----------------------------------------------------------------

    @contextmanager
    def locked(self, timeout: float = 600.0, poll: float = 0.25, *, name: str = "") -> Iterator[None]:
        """Hold the fleet-wide lock ``name`` (see the module docstring); LockTimeout after ``timeout``."""
        what = name or "store"
        key = self._key("lock", what)
        token = secrets.token_hex(16)
        lease_ms = max(1, int(self.lease * 1000))
        end = time.monotonic() + timeout
        while True:
            with self._talking(f"taking lock {what}"):
                if self._redis.set(key, token, nx=True, px=lease_ms):
                    break
            if time.monotonic() >= end:
                raise LockTimeout(key, f"still held by another instance after {timeout:.0f}s")
            time.sleep(poll)
        keeper = _LeaseKeeper(lambda: bool(self._extend_script(keys=[key], args=[token, lease_ms])), self.lease, what)
        try:
            yield
        finally:
            keeper.stop()
            try:
                with self._talking(f"releasing lock {what}"):
                    self._release_script(keys=[key], args=[token])
            except StoreError as e:  # the lease will run out by itself
                self.log.warn("{error}", error=str(e))

    # -- account ---------------------------------------------------------------

    def load_account_key(self) -> ec.EllipticCurvePrivateKey | None:
        with self._talking("reading the account key"):
            data = self._redis.get(self._key("account", "key"))
        if data is None:
            return None
        return _load_ec_key(self._open(data, "the account key"), self.describe())

    def save_account_key(self, key: ec.EllipticCurvePrivateKey) -> None:
        with self._talking("saving the account key"):
            pipe = self._redis.pipeline()
            pipe.set(self._key("account", "key"), self._seal(_ec_pem(key)))
            self._announce(pipe, "account")
            pipe.execute()

    def account_key(self) -> ec.EllipticCurvePrivateKey:
        """The account key, made and saved the first time (call under the "account" lock: one for the fleet)."""
        key = self.load_account_key()
        if key is None:
            key = ec.generate_private_key(ec.SECP256R1())
            self.save_account_key(key)
        return key

    def stage_account_key(self, key: ec.EllipticCurvePrivateKey | None) -> None:
        with self._talking("keeping the next account key"):
            if key is None:
                self._redis.delete(self._key("account", "next"))
            else:
                self._redis.set(self._key("account", "next"), self._seal(_ec_pem(key)))

    def load_staged_account_key(self) -> ec.EllipticCurvePrivateKey | None:
        with self._talking("reading the next account key"):
            data = self._redis.get(self._key("account", "next"))
        if data is None:
            return None
        return _load_ec_key(self._open(data, "the next account key"), self.describe())

    def registrations(self) -> dict[str, str]:
        with self._talking("reading the account registrations"):
            raw = self._redis.hgetall(self._key("account", "registrations"))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def registration(self, directory_url: str) -> str | None:
        with self._talking("reading the account registration"):
            value = self._redis.hget(self._key("account", "registrations"), directory_url)
        return value.decode() if value is not None else None

    def save_registration(self, directory_url: str, account_url: str | None) -> None:
        with self._talking("saving the account registration"):
            pipe = self._redis.pipeline()
            if account_url is None:
                pipe.hdel(self._key("account", "registrations"), directory_url)
            else:
                pipe.hset(self._key("account", "registrations"), directory_url, account_url)
            self._announce(pipe, "account")
            pipe.execute()

    def account_signature(self) -> Hashable:
        with self._talking("reading the account"):
            pipe = self._redis.pipeline()
            pipe.get(self._key("account", "key"))
            pipe.hgetall(self._key("account", "registrations"))
            key, regs = pipe.execute()
        # The sealed bytes change with every write even for the same key: fine, a write is a change.
        return (key, tuple(sorted(regs.items())))

    # -- certificates ------------------------------------------------------------

    def load_meta(self, name: str) -> SiteMeta:
        self.cache.site_dir(name)  # the same names as the directory store, checked the same way
        with self._talking(f"reading the state of {name}"):
            data = self._redis.get(self._key("meta", name))
        return SiteMeta.from_json(data.decode("utf-8", "replace")) if data is not None else SiteMeta()

    def save_meta(self, name: str, meta: SiteMeta) -> None:
        self.cache.site_dir(name)
        with self._talking(f"recording the state of {name}"):
            self._redis.set(self._key("meta", name), meta.to_json())
        self._to_cache(lambda: self.cache.save_meta(name, meta))

    def signature(self, name: str) -> FileSignature:
        """The version Redis holds; while Redis is unreachable, the local copy's files."""
        self.cache.site_dir(name)
        try:
            with self._talking(f"reading the certificate of {name}"):
                version = self._redis.hget(self._key("cert", name), "version")
        except StoreUnavailable:
            return self.cache.signature(name)
        return FileSignature((version,))

    def load_certificate(self, name: str) -> CertifiedKey | None:
        """The certificate in Redis (copied to the local store), or the local copy while Redis is unreachable."""
        self.cache.site_dir(name)
        try:
            with self._talking(f"reading the certificate of {name}"):
                chain, key = self._redis.hmget(self._key("cert", name), ["chain", "key"])
        except StoreUnavailable:
            return self.cache.load_certificate(name)
        if chain is None or key is None:
            return None
        certified = CertifiedKey.from_pem(
            chain, self._open(key, f"the key of {name}"), source=f"{self.describe()} {self._key('cert', name)}"
        )
        self._copy_to_cache(name, certified)
        return certified

    def save_certificate(self, name: str, certified: CertifiedKey, meta: SiteMeta) -> SiteMeta:
        """Store key and chain in one HSET, then meta; tell every instance."""
        self.cache.site_dir(name)
        meta = meta.describe_certificate(certified)
        version = f"{certified.leaf.serial_number:x}-{secrets.token_hex(4)}"
        with self._talking(f"saving the certificate of {name}"):
            pipe = self._redis.pipeline()  # MULTI/EXEC: the pair, the meta and the news together
            pipe.hset(
                self._key("cert", name),
                mapping={"chain": certified.chain_pem(), "key": self._seal(certified.key_pem()), "version": version},
            )
            pipe.set(self._key("meta", name), meta.to_json())
            self._announce(pipe, f"cert {name}")
            pipe.execute()
        self._copy_to_cache(name, certified, meta)
        return meta

    def tidy(self, name: str) -> None:
        """Nothing is left half-written in Redis; the local copy tidies itself when written."""

    def _to_cache(self, write: Callable[[], object]) -> None:
        """Keep the local copy: best effort, a full local disk must not fail the fleet's work."""
        try:
            with self._cache_lock, self.cache.locked(timeout=30.0):
                write()
        except (StoreError, OSError) as e:
            self.log.warn("cannot keep the local copy in {dir}: {error}", dir=str(self.cache.root), error=str(e))

    def _copy_to_cache(self, name: str, certified: CertifiedKey, meta: SiteMeta | None = None) -> None:
        try:
            local = self.cache.load_certificate(name)
        except (CertificateError, OSError):
            local = None
        if local is not None and local.leaf.serial_number == certified.leaf.serial_number:
            return
        if meta is None:
            meta = SiteMeta(hosts=tuple(certified.dns_names))
        self._to_cache(lambda: self.cache.save_certificate(name, certified, meta))

    # -- challenges --------------------------------------------------------------

    def _challenge_key(self, kind: str) -> str:
        self.cache.challenge_dir(kind)  # the same kinds as the directory store
        return self._key("challenges", kind)

    def publish_challenge(self, kind: str, name: str, key_authorization: str) -> None:
        key = self._challenge_key(kind)
        if "/" in name or name.startswith("."):
            raise StoreError(name, "not a usable challenge name")
        with self._talking("publishing a challenge answer"):
            pipe = self._redis.pipeline()
            pipe.hset(key, name, key_authorization)
            pipe.expire(key, CHALLENGE_TTL)
            self._announce(pipe, "challenge")
            pipe.execute()

    def withdraw_challenge(self, kind: str, name: str) -> None:
        key = self._challenge_key(kind)
        with self._talking("withdrawing a challenge answer"):
            pipe = self._redis.pipeline()
            pipe.hdel(key, name)
            self._announce(pipe, "challenge")
            pipe.execute()

    def challenges(self, kind: str) -> dict[str, str]:
        key = self._challenge_key(kind)
        with self._talking("reading the challenge answers"):
            raw = self._redis.hgetall(key)
        out = {}
        for name, value in raw.items():
            try:
                out[name.decode("ascii")] = value.decode("ascii").strip()
            except UnicodeDecodeError:
                continue
        return out

    # -- which instances are up, and which of them serve an answer -------------------

    def heartbeat(self, ttl: float = LIVE_TTL) -> None:
        """Say this instance is up for ``ttl`` seconds (called every poll)."""
        with self._talking("saying this instance is up"):
            self._redis.set(self._key("live", self.instance), b"1", px=int(ttl * 1000))

    def live_instances(self) -> set[str]:
        """The instances whose heartbeat has not run out."""
        start = self._key("live", "")
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in start) + "*"
        with self._talking("listing the instances that are up"):
            keys = list(self._redis.scan_iter(match=pattern, count=1000))
        return {k.decode("utf-8", "replace")[len(start) :] for k in keys}

    def _ack_key(self, kind: str, name: str, key_authorization: str) -> str:
        digest = hashlib.sha256(f"{kind}\0{name}\0{key_authorization}".encode()).hexdigest()[:32]
        return self._key("acks", digest)

    def ack_challenges(self, answers: list[tuple[str, str, str]]) -> None:
        """Say this instance serves each (kind, name, key authorization): the orderer waits for that."""
        if not answers:
            return
        with self._talking("confirming challenge answers"):
            pipe = self._redis.pipeline()
            for kind, name, key_authorization in answers:
                key = self._ack_key(kind, name, key_authorization)
                pipe.sadd(key, self.instance)
                pipe.expire(key, CHALLENGE_TTL)
            pipe.execute()

    def challenge_acks(self, kind: str, name: str, key_authorization: str) -> set[str]:
        """The instances that said they serve this answer."""
        with self._talking("reading the confirmations of a challenge answer"):
            members = self._redis.smembers(self._ack_key(kind, name, key_authorization))
        return {m.decode("utf-8", "replace") for m in members}

    # -- session ticket keys -----------------------------------------------------

    def load_ticket_keys(self) -> TicketKeys | None:
        with self._talking("reading the session ticket keys"):
            data = self._redis.get(self._key("tickets"))
        if data is None:
            return None
        return TicketKeys.from_json(self._open(data, "the session ticket keys"))

    def save_ticket_keys(self, keys: TicketKeys) -> None:
        with self._talking("saving the session ticket keys"):
            pipe = self._redis.pipeline()
            pipe.set(self._key("tickets"), self._seal(keys.to_json().encode()))
            self._announce(pipe, "tickets")
            pipe.execute()

    # -- news from other instances -------------------------------------------------

    def watch(self, changed: Callable[[], None]) -> Callable[[], None]:
        """Subscribe to the events channel in a thread of its own; ``changed()`` on every message.

        Polling stays the safety net: a message lost while the connection was
        down is made up for by the next poll, and by a ``changed()`` on every
        reconnection.
        """
        stop = threading.Event()
        channel = self._key("events")

        def run() -> None:
            delay = 0.5
            while not stop.is_set():
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                try:
                    pubsub.subscribe(channel)
                    changed()  # whatever was missed while not subscribed
                    delay = 0.5
                    while not stop.is_set():
                        message = pubsub.get_message(timeout=1.0)
                        if message is not None and message.get("type") == "message":
                            changed()
                except redis.exceptions.RedisError:
                    stop.wait(delay)
                    delay = min(delay * 2, 30.0)
                except Exception:  # a bug in changed() must not end the subscription silently
                    self.log.failure("handling news from the store failed")
                    stop.wait(delay)
                finally:
                    try:
                        pubsub.close()
                    except redis.exceptions.RedisError:
                        pass

        thread = threading.Thread(target=run, name="tlsproxy store events", daemon=True)
        thread.start()

        def unwatch() -> None:
            stop.set()

        return unwatch

    def close(self) -> None:
        self._redis.close()

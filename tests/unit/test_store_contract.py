"""The Store contract, run against the directory store and the Redis store (a real redis-server),
plain and with encryption at rest, so that the two cannot drift apart."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric import ec

from tests.redisserver import RedisServer, running_redis
from tlsproxy.certs.model import CertifiedKey
from tlsproxy.certs.redis_store import RedisStore
from tlsproxy.certs.store import CertificateStore, LockTimeout, SiteMeta, Store, StoreError, StoreUnavailable
from tlsproxy.certs.ticketkeys import TicketKeys, current_ticket_keys, new_ticket_key

_ca = trustme.CA()
_prefixes = itertools.count()


def certified(*names: str) -> CertifiedKey:
    leaf = _ca.issue_cert(*names)
    return CertifiedKey.from_pem(leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@dataclass
class Backend:
    """How to open the store under test; every call opens another instance on the same data."""

    open: Callable[[], Store]
    kind: str


FERNET_KEY = Fernet.generate_key()


@pytest.fixture(params=["directory", "redis", "redis-encrypted"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "directory":
        return Backend(lambda: CertificateStore(tmp_path / "state"), "directory")
    server = request.getfixturevalue("redis_server")
    prefix = f"t{next(_prefixes)}:"
    key = FERNET_KEY if request.param == "redis-encrypted" else None
    caches = itertools.count()

    def open_redis() -> Store:
        # Each instance has a state_dir of its own, as instances of a fleet do.
        return RedisStore(server.url, tmp_path / f"cache{next(caches)}", prefix=prefix, lease=2.0, encryption_key=key)

    return Backend(open_redis, request.param)


def test_account_key_made_once_and_shared(backend: Backend) -> None:
    """The account key is made once; another instance reads the same key."""
    a, b = backend.open(), backend.open()
    assert a.load_account_key() is None
    key = a.account_key()
    assert key.curve.name == "secp256r1"
    loaded = b.load_account_key()
    assert loaded is not None and loaded.private_numbers() == key.private_numbers()
    assert b.account_key().private_numbers() == key.private_numbers()


def test_registrations_and_account_signature(backend: Backend) -> None:
    """Registrations are kept per directory URL; the account signature changes with the key and registrations only."""
    a, b = backend.open(), backend.open()
    a.account_key()
    first = b.account_signature()
    assert b.account_signature() == first
    a.save_registration("https://ca/dir", "https://ca/acct/1")
    assert b.registration("https://ca/dir") == "https://ca/acct/1"
    assert b.registrations() == {"https://ca/dir": "https://ca/acct/1"}
    second = b.account_signature()
    assert second != first
    time.sleep(0.01)  # a new mtime for the directory store
    a.save_account_key(ec.generate_private_key(ec.SECP256R1()))
    assert b.account_signature() != second
    a.save_registration("https://ca/dir", None)
    assert b.registration("https://ca/dir") is None


def test_staged_account_key(backend: Backend) -> None:
    """A rollover's next key is kept until forgotten, apart from the current key."""
    store = backend.open()
    assert store.load_staged_account_key() is None
    current = store.account_key()
    nxt = ec.generate_private_key(ec.SECP256R1())
    store.stage_account_key(nxt)
    staged = backend.open().load_staged_account_key()
    assert staged is not None and staged.private_numbers() == nxt.private_numbers()
    assert store.account_key().private_numbers() == current.private_numbers()
    store.stage_account_key(None)
    assert store.load_staged_account_key() is None


def test_certificate_roundtrip_and_signature(backend: Backend) -> None:
    """A saved pair loads back on another instance, its meta records it, and the signature moves with each new pair."""
    a, b = backend.open(), backend.open()
    assert b.load_certificate("example.com") is None
    empty = b.signature("example.com")
    assert not empty.complete
    first = certified("example.com")
    meta = a.save_certificate("example.com", first, SiteMeta(hosts=("example.com",)))
    assert meta.serial == format(first.leaf.serial_number, "x")
    signed = b.signature("example.com")
    assert signed.complete and signed != empty
    assert b.signature("example.com") == signed
    loaded = b.load_certificate("example.com")
    assert loaded is not None and loaded.leaf.serial_number == first.leaf.serial_number
    assert loaded.key_pem() == first.key_pem()
    assert b.load_meta("example.com") == meta
    second = certified("example.com")
    a.save_certificate("example.com", second, SiteMeta(hosts=("example.com",)))
    assert b.signature("example.com") != signed
    again = b.load_certificate("example.com")
    assert again is not None and again.leaf.serial_number == second.leaf.serial_number


def test_meta_roundtrip(backend: Backend) -> None:
    """Renewal state and errors written by one instance are read by another; none yet is an empty meta."""
    a, b = backend.open(), backend.open()
    assert b.load_meta("example.org") == SiteMeta()
    meta = SiteMeta(hosts=("example.org",), last_error="rateLimited: too many", failures=3)
    a.save_meta("example.org", meta)
    assert b.load_meta("example.org") == meta


def test_bad_names_refused(backend: Backend) -> None:
    """A site name that is no host name, or an unknown challenge kind, is refused with StoreError."""
    store = backend.open()
    with pytest.raises(StoreError):
        store.load_certificate("../etc")
    with pytest.raises(StoreError):
        store.save_meta("a/b", SiteMeta())
    with pytest.raises(StoreError):
        store.publish_challenge("dns-01", "token", "keyauth")
    with pytest.raises(StoreError):
        store.publish_challenge("http-01", "../x", "keyauth")


def test_challenges_published_for_every_instance(backend: Backend) -> None:
    """An answer published by one instance is listed by another until withdrawn; kinds are apart."""
    a, b = backend.open(), backend.open()
    assert b.challenges("http-01") == {}
    a.publish_challenge("http-01", "tok-1", "tok-1.thumb")
    a.publish_challenge("tls-alpn-01", "example.com", "tok-2.thumb")
    assert b.challenges("http-01") == {"tok-1": "tok-1.thumb"}
    assert b.challenges("tls-alpn-01") == {"example.com": "tok-2.thumb"}
    a.withdraw_challenge("http-01", "tok-1")
    a.withdraw_challenge("http-01", "never-published")
    assert b.challenges("http-01") == {}
    assert b.challenges("tls-alpn-01") == {"example.com": "tok-2.thumb"}


def test_lock_excludes_other_instances(backend: Backend) -> None:
    """While one instance holds a lock, another times out on it; once released, the other gets it."""
    a, b = backend.open(), backend.open()
    with a.locked(name="example.com"):
        with pytest.raises(LockTimeout):
            with b.locked(timeout=0.3, name="example.com"):
                pass
    with b.locked(timeout=5, name="example.com"):
        pass


def test_ticket_keys_rotate_once_for_all(backend: Backend) -> None:
    """Ticket keys are made once, shared, rotated when due with the previous key kept, and not rotated twice."""
    a, b = backend.open(), backend.open()
    assert a.load_ticket_keys() is None
    first = current_ticket_keys(a, now=1000.0, every=60.0)
    assert current_ticket_keys(b, now=1030.0, every=60.0) == first
    rotated = current_ticket_keys(b, now=1061.0, every=60.0)
    assert rotated.previous == first.current and rotated.current != first.current
    assert current_ticket_keys(a, now=1062.0, every=60.0) == rotated
    assert a.load_ticket_keys() == rotated
    keys = TicketKeys(new_ticket_key(), 5.0)
    a.save_ticket_keys(keys)
    assert b.load_ticket_keys() == keys


# ---------------------------------------------------------------------------
# What only the Redis store does


def _redis_store(server: RedisServer, tmp_path: Path, prefix: str, **kw: object) -> RedisStore:
    return RedisStore(server.url, tmp_path / f"cache-{prefix}", prefix=prefix, **kw)  # type: ignore[arg-type]


def test_lock_lease_expires_when_holder_dies(redis_server: RedisServer, tmp_path: Path) -> None:
    """A lock whose holder stopped extending it (died) is taken by another instance once the lease runs out."""
    store = _redis_store(redis_server, tmp_path, "dead:", lease=1.0)
    store._redis.set("dead:lock:example.com", "a-dead-holder", px=800)
    start = time.monotonic()
    with store.locked(timeout=10, name="example.com"):
        waited = time.monotonic() - start
    assert 0.3 < waited < 5


def test_lock_lease_extended_while_held(redis_server: RedisServer, tmp_path: Path) -> None:
    """A live holder keeps its lock past the lease; releasing leaves a successor's lock alone."""
    a = _redis_store(redis_server, tmp_path, "live:", lease=1.2)
    b = _redis_store(redis_server, tmp_path, "live:", lease=1.2)
    with a.locked(name="site"):
        time.sleep(3.0)  # more than two leases
        with pytest.raises(LockTimeout):
            with b.locked(timeout=0.2, name="site"):
                pass
        a._redis.set("live:lock:site", "someone-else", px=5000)  # as if our lease had run out and b took it
    assert a._redis.get("live:lock:site") == b"someone-else"


def test_locks_by_name_are_independent(redis_server: RedisServer, tmp_path: Path) -> None:
    """Ordering for one site does not hold up another site's order (one lock per certificate)."""
    a = _redis_store(redis_server, tmp_path, "names:")
    b = _redis_store(redis_server, tmp_path, "names:")
    with a.locked(name="one.example"), b.locked(timeout=0.5, name="two.example"):
        pass


def test_keys_sealed_at_rest(redis_server: RedisServer, tmp_path: Path) -> None:
    """With an encryption key no private key is in Redis in the clear; without that key it is refused."""
    sealed = _redis_store(redis_server, tmp_path, "sealed:", encryption_key=FERNET_KEY)
    pair = certified("example.com")
    sealed.save_certificate("example.com", pair, SiteMeta())
    sealed.account_key()
    current_ticket_keys(sealed, 0.0, 60.0)
    raw = sealed._redis
    for value in (raw.hget("sealed:cert:example.com", "key"), raw.get("sealed:account:key"), raw.get("sealed:tickets")):
        assert value.startswith(b"fernet:") and b"PRIVATE KEY" not in value
    assert b"CERTIFICATE" in raw.hget("sealed:cert:example.com", "chain")
    for other in (None, Fernet.generate_key()):
        reader = _redis_store(redis_server, tmp_path / "other", "sealed:", encryption_key=other)
        with pytest.raises(StoreError, match="encrypt"):
            reader.load_certificate("example.com")
        with pytest.raises(StoreError, match="encrypt"):
            reader.load_account_key()


def test_unsealed_values_still_read(redis_server: RedisServer, tmp_path: Path) -> None:
    """Turning encryption on later keeps the keys written before readable."""
    _redis_store(redis_server, tmp_path, "later:").save_certificate("example.com", certified("example.com"), SiteMeta())
    now_sealed = _redis_store(redis_server, tmp_path, "later:", encryption_key=FERNET_KEY)
    assert now_sealed.load_certificate("example.com") is not None


def test_prefixes_keep_fleets_apart(redis_server: RedisServer, tmp_path: Path) -> None:
    """Two prefixes on one Redis see nothing of each other."""
    a = _redis_store(redis_server, tmp_path, "fleet-a:")
    b = _redis_store(redis_server, tmp_path, "fleet-b:")
    a.save_certificate("example.com", certified("example.com"), SiteMeta())
    a.publish_challenge("http-01", "tok", "tok.x")
    assert b.load_certificate("example.com") is None
    assert b.challenges("http-01") == {}


def test_news_reaches_watchers(redis_server: RedisServer, tmp_path: Path) -> None:
    """A certificate or challenge saved by one instance wakes the watchers of the others (pub/sub)."""
    a = _redis_store(redis_server, tmp_path, "news:")
    b = _redis_store(redis_server, tmp_path, "news:")
    woken = threading.Event()
    subscribed = threading.Event()
    calls = []

    def changed() -> None:
        calls.append(1)
        (woken if subscribed.is_set() else subscribed).set()

    stop = b.watch(changed)
    try:
        assert subscribed.wait(10), "the watcher never subscribed"
        a.save_certificate("example.com", certified("example.com"), SiteMeta())
        assert woken.wait(10), "no news of the new certificate"
    finally:
        stop()


def test_unreachable_redis_serves_local_copy(tmp_path: Path) -> None:
    """With Redis down, certificates come from the local copy (also after a restart); the store says why."""
    with running_redis() as server:
        store = RedisStore(server.url, tmp_path / "state", prefix="down:", connect_timeout=1, timeout=2)
        pair = certified("example.com")
        store.save_certificate("example.com", pair, SiteMeta(hosts=("example.com",)))
        assert store.problem() is None
        server.stop()
        loaded = store.load_certificate("example.com")
        assert loaded is not None and loaded.leaf.serial_number == pair.leaf.serial_number
        problem = store.problem()
        assert problem is not None and "unreachable" in problem
        assert store.signature("example.com").complete
        restarted = RedisStore(server.url, tmp_path / "state", prefix="down:", connect_timeout=1, timeout=2)
        again = restarted.load_certificate("example.com")
        assert again is not None and again.leaf.serial_number == pair.leaf.serial_number
        with pytest.raises(StoreUnavailable):
            with restarted.locked(timeout=1, name="example.com"):
                pass
        with pytest.raises(StoreUnavailable):
            restarted.challenges("http-01")
        server.start()  # empty: the test server keeps nothing on disk
        assert restarted.challenges("http-01") == {}
        assert restarted.problem() is None


def test_password_never_described(tmp_path: Path) -> None:
    """The store describes itself without the password its URL carries."""
    with running_redis(password="s3cret-pw") as server:
        store = RedisStore(server.url, tmp_path / "state", prefix="pw:")
        store.save_meta("example.com", SiteMeta(failures=1))
        assert store.load_meta("example.com").failures == 1
        assert "s3cret-pw" not in store.describe() and "***" in store.describe()
        wrong = RedisStore(server.url.replace("s3cret-pw", "wrong-pw"), tmp_path / "state2", prefix="pw:")
        with pytest.raises(StoreError) as caught:
            wrong.load_meta("example.com")
        assert "refuses our credentials" in str(caught.value)
        assert "s3cret-pw" not in str(caught.value) and "wrong-pw" not in str(caught.value)


def test_rediss_with_a_private_ca(tmp_path: Path) -> None:
    """rediss:// with the CA named in the URL works; a Redis whose certificate we do not trust is refused, one line."""
    with running_redis(password="pw", tls=True) as server:
        store = RedisStore(server.url, tmp_path / "state", prefix="tls:")
        store.save_certificate("example.com", certified("example.com"), SiteMeta())
        assert store.load_meta("example.com").serial
        untrusting = RedisStore(server.url.split("?")[0], tmp_path / "state2", prefix="tls:", connect_timeout=2)
        with pytest.raises(StoreError) as caught:
            untrusting.load_meta("example.com")
        assert "certificate verify failed" in str(caught.value) and ":pw@" not in str(caught.value)

"""CertificateService instances sharing one real redis-server: one order, news, challenges, Redis down."""

from __future__ import annotations

import datetime
import itertools
import queue
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from tests.redisserver import RedisServer, running_redis
from tlsproxy.acme.service import CertificateService
from tlsproxy.acme.testing import FakeCA
from tlsproxy.certs.challenges import HTTP01Answers, TLSALPN01Answers
from tlsproxy.certs.model import CertifiedKey
from tlsproxy.certs.redis_store import RedisStore
from tlsproxy.certs.store import SiteMeta
from tlsproxy.config import ACME, Config, Server, Site, Store, Upstream
from tlsproxy.tls.policy import TLSPolicy
from tlsproxy.tls.sni import SniMap, SniServer

START = 1_750_000_000.0
_prefixes = itertools.count()


def certified(*names: str) -> CertifiedKey:
    leaf = trustme.CA().issue_cert(*names)
    return CertifiedKey.from_pem(leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())


def at(clock: Clock) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


class Instance:
    """One tlsproxy of the fleet: its own tables, SNI map and state_dir; the fleet's Redis and CA."""

    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.http01, self.alpn01 = HTTP01Answers(), TLSALPN01Answers()
        self.state_dir = fleet.tmp_path / f"state{index}"
        self.sni = SniServer(TLSPolicy(), SniMap([(s.name, s.hosts) for s in fleet.sites]), self.alpn01)
        self.service = self.make_service()

    def make_service(self) -> CertificateService:
        fleet = self.fleet
        config = Config(server=Server(state_dir=str(self.state_dir)), acme=ACME(agree_tos=True), sites=fleet.sites)
        store = RedisStore(fleet.server.url, self.state_dir, prefix=fleet.prefix, connect_timeout=1, timeout=2)
        return CertificateService(
            fleet.clock,
            config,
            self.sni,
            self.http01,
            self.alpn01,
            run_in_thread=lambda f, *a, **kw: maybeDeferred(f, *a, **kw),
            ca_factory=lambda config, store: fleet.ca,
            rng=random.Random(7),
            store=store,
            fleet_settle=0,
        )

    def serial(self) -> int | None:
        ctx = self.sni.sni_map.context_of("example.com")
        return None if ctx is None else self.service._acme["example.com"].serial


class Fleet:
    def __init__(self, tmp_path: Path, server: RedisServer) -> None:
        self.tmp_path = tmp_path
        self.server = server
        self.prefix = f"fleet{next(_prefixes)}:"
        self.clock = Clock()
        self.clock.advance(START)
        # What the store's subscriber thread hands to the reactor: run by the test, in its thread.
        self.from_threads: queue.Queue[tuple[Any, tuple[Any, ...]]] = queue.Queue()
        self.clock.callFromThread = lambda f, *a: self.from_threads.put((f, a))  # type: ignore[attr-defined]
        self.ca_tables = HTTP01Answers(), TLSALPN01Answers()
        self.ca = FakeCA(http01=self.ca_tables[0], alpn01=self.ca_tables[1], now=lambda: at(self.clock))
        up = Upstream(url="http://127.0.0.1:8000", host="127.0.0.1", port=8000)
        self.sites = (Site(hosts=("example.com", "www.example.com"), upstream=up),)

    def instance(self, index: int) -> Instance:
        return Instance(self, index)


def validate_on(fleet: Fleet, instance: Instance) -> None:
    """Make the fake CA look for answers in ``instance``'s tables, as Pebble validating on its ports would."""
    fleet.ca.http01 = instance.http01
    fleet.ca.alpn01 = instance.alpn01


def test_one_order_for_the_fleet(tmp_path: Path, redis_server: RedisServer) -> None:
    """The first instance orders; the others serve that certificate without ordering, the last one from scratch."""
    fleet = Fleet(tmp_path, redis_server)
    a, b, c = fleet.instance(0), fleet.instance(1), fleet.instance(2)
    validate_on(fleet, a)
    a.service.startService()
    assert len(fleet.ca.orders) == 1
    b.service.startService()
    c.service.startService()
    assert len(fleet.ca.orders) == 1
    assert a.serial() is not None and a.serial() == b.serial() == c.serial()
    for inst in (a, b, c):
        inst.service.stopService()


def test_renewal_by_one_reaches_the_others(tmp_path: Path, redis_server: RedisServer) -> None:
    """A certificate another instance stores is served by a running instance after its next poll."""
    fleet = Fleet(tmp_path, redis_server)
    a, b = fleet.instance(0), fleet.instance(1)
    validate_on(fleet, a)
    a.service.startService()
    b.service.startService()
    first = b.serial()
    fleet.clock.advance(1)
    stored = a.service.store.load_certificate("example.com")
    assert stored is not None
    # A renewal by the `tlsproxy renew` of some instance: a new pair lands in Redis.
    fresh = certified("example.com", "www.example.com")
    a.service.store.save_certificate("example.com", fresh, SiteMeta(hosts=("example.com", "www.example.com")))
    assert b.serial() == first
    fleet.clock.advance(b.service.poll_interval)
    assert b.serial() == fresh.leaf.serial_number != first
    for inst in (a, b):
        inst.service.stopService()


def test_news_brings_a_scan_without_waiting_for_the_poll(tmp_path: Path, redis_server: RedisServer) -> None:
    """A message from the store (pub/sub) makes the service read the store at once."""
    fleet = Fleet(tmp_path, redis_server)
    a, b = fleet.instance(0), fleet.instance(1)
    validate_on(fleet, a)
    a.service.startService()
    b.service.startService()
    # The subscriber says hello once subscribed (whatever was missed meanwhile): wait for that first.
    f, args = fleet.from_threads.get(timeout=10)
    f(*args)
    fresh = certified("example.com", "www.example.com")
    a.service.store.save_certificate("example.com", fresh, SiteMeta())
    while b.serial() != fresh.leaf.serial_number:
        f, args = fleet.from_threads.get(timeout=10)  # the news, as the reactor would run it
        f(*args)
    assert b.serial() == fresh.leaf.serial_number
    for inst in (a, b):
        inst.service.stopService()


def test_every_instance_serves_the_challenges_of_the_fleet(tmp_path: Path, redis_server: RedisServer) -> None:
    """Answers one instance publishes in the store are served by another's listeners after a poll, then withdrawn."""
    fleet = Fleet(tmp_path, redis_server)
    a, b = fleet.instance(0), fleet.instance(1)
    validate_on(fleet, a)
    a.service.startService()
    b.service.startService()
    a.service.store.publish_challenge("http-01", "tok_1", "tok_1.thumb")
    a.service.store.publish_challenge("tls-alpn-01", "example.com", "tok_2.thumb")
    fleet.clock.advance(b.service.poll_interval)
    assert b.http01.get("tok_1") == "tok_1.thumb"
    assert b.alpn01.get("example.com") is not None
    a.service.store.withdraw_challenge("http-01", "tok_1")
    a.service.store.withdraw_challenge("tls-alpn-01", "example.com")
    fleet.clock.advance(b.service.poll_interval)
    assert b.http01.get("tok_1") is None and b.alpn01.get("example.com") is None
    for inst in (a, b):
        inst.service.stopService()


def test_order_publishes_answers_for_the_fleet(tmp_path: Path, redis_server: RedisServer) -> None:
    """An instance's order puts its answers in the store (for the others) and takes them out afterwards."""
    fleet = Fleet(tmp_path, redis_server)
    a = fleet.instance(0)
    validate_on(fleet, a)
    seen: list[dict[str, str]] = []
    answer = fleet.ca.answer

    def answer_and_look(challenge):  # type: ignore[no-untyped-def]
        seen.append(a.service.store.challenges(challenge.type))
        return answer(challenge)

    fleet.ca.answer = answer_and_look  # type: ignore[method-assign]
    a.service.startService()
    assert seen and all(answers for answers in seen)
    assert a.service.store.challenges("http-01") == {} and a.service.store.challenges("tls-alpn-01") == {}
    a.service.stopService()


def test_redis_down_keeps_serving_and_says_so(tmp_path: Path, redis_server: RedisServer) -> None:
    """With Redis stopped the instances keep serving, say so once, and one started meanwhile serves its last copy."""
    fleet = Fleet(tmp_path, redis_server)
    a, b = fleet.instance(0), fleet.instance(1)
    validate_on(fleet, a)
    a.service.startService()
    b.service.startService()
    serial = b.serial()
    assert serial is not None and b.service.store_problem is None
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        redis_server.stop()
        for _ in range(3):
            fleet.clock.advance(b.service.poll_interval)
        assert b.serial() == serial
        assert b.service.store_problem is not None and "unreachable" in b.service.store_problem
        # A renewal check now fails on the store: one error line, and the next one backs off.
        watch = b.service._acme["example.com"]
        watch.next_check = at(fleet.clock)
        fleet.clock.advance(b.service.poll_interval)
        first_gap = (watch.next_check - at(fleet.clock)).total_seconds()
        watch.next_check = at(fleet.clock)
        fleet.clock.advance(b.service.poll_interval)
        second_gap = (watch.next_check - at(fleet.clock)).total_seconds()
        assert 0 < first_gap < second_gap
        failed = [
            e
            for e in events
            if e.get("log_level") == LogLevel.error and "checking the certificate of" in str(e.get("log_format"))
        ]
        assert len(failed) == 2 and all(e.get("log_failure") is None for e in failed)
        assert b.serial() == serial
        said = [e for e in events if e.get("log_level") == LogLevel.error and "problem" in e]
        assert len(said) == 2  # once per instance, not once per poll
        b.service.stopService()
        restarted = Instance(fleet, 1)  # same state_dir, empty memory
        restarted.service.startService()
        assert restarted.serial() == serial
        fleet.clock.advance(restarted.service.poll_interval)
        assert restarted.serial() == serial
        assert len(fleet.ca.orders) == 1
        redis_server.start()
        fleet.clock.advance(restarted.service.poll_interval)
        assert restarted.service.store_problem is None
    finally:
        globalLogPublisher.removeObserver(events.append)
    a.service.stopService()
    restarted.service.stopService()


def test_news_during_a_scan_gets_a_scan_after_it(tmp_path: Path, redis_server: RedisServer) -> None:
    """News that comes while a scan runs brings one more scan after it; a poll during a scan does not."""
    fleet = Fleet(tmp_path, redis_server)
    a = fleet.instance(0)
    calls: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def later(f: Any, *args: Any, **kw: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        calls.append((f, args, d))
        return d

    a.service._run = later
    a.service.startService()

    def scans() -> list[tuple[Any, tuple[Any, ...], Deferred[Any]]]:
        return [c for c in calls if c[0] == a.service._scan_blocking and not c[2].called]

    def finish(call: tuple[Any, tuple[Any, ...], Deferred[Any]]) -> None:
        f, args, d = call
        d.callback(f(*args))

    (first,) = scans()
    fleet.clock.advance(a.service.poll_interval)  # a poll while the scan runs
    finish(first)
    assert scans() == []
    fleet.clock.advance(a.service.poll_interval)
    (second,) = scans()
    a.service._poke()  # news while it runs
    a.service._poke()
    finish(second)
    assert len(scans()) == 1
    a.service.stopService()


def test_ticket_key_service_for_a_fleet(tmp_path: Path, redis_server: RedisServer) -> None:
    """The ticket-key hook is off without [store] url, and with one installs the fleet's keys from Redis."""
    from tlsproxy.acme.storage import ticket_key_service
    from tlsproxy.config import Store

    up = Upstream(url="http://127.0.0.1:8000", host="127.0.0.1", port=8000)
    site = Site(hosts=("example.com",), upstream=up)
    alone = Config(server=Server(state_dir=str(tmp_path / "alone")), sites=(site,))
    assert ticket_key_service(Clock(), alone, lambda keys: None) is None
    fleet = Config(
        server=Server(state_dir=str(tmp_path / "fleet")), store=Store(url=redis_server.url, prefix="tk:"), sites=(site,)
    )
    installed: list[Any] = []
    service = ticket_key_service(Clock(), fleet, installed.append)
    assert service is not None
    service._run = lambda f, *a, **kw: maybeDeferred(f, *a, **kw)
    service.startService()
    assert len(installed) == 1
    other = RedisStore(redis_server.url, tmp_path / "other", prefix="tk:")
    assert other.load_ticket_keys() == installed[0]
    service.stopService()


def test_instances_say_they_are_up_and_which_answers_they_serve(tmp_path: Path, redis_server: RedisServer) -> None:
    """Each poll renews an instance's heartbeat; an answer read from the store is confirmed once it is served."""
    from tlsproxy.acme.issuer import FleetResponder, TableResponder

    fleet = Fleet(tmp_path, redis_server)
    a, b = fleet.instance(0), fleet.instance(1)
    validate_on(fleet, a)
    a.service.startService()
    b.service.startService()
    store_a, store_b = a.service.store, b.service.store
    assert isinstance(store_a, RedisStore) and isinstance(store_b, RedisStore)
    fleet.clock.advance(b.service.poll_interval)
    assert store_a.live_instances() >= {store_a.instance, store_b.instance}
    responder = FleetResponder(TableResponder(a.http01, a.alpn01), store_a, settle=10)
    responder.publish("http-01", "example.com", "tok_9", "tok_9.thumb")
    assert store_b.instance in responder.unconfirmed(store_a)
    fleet.clock.advance(b.service.poll_interval)  # b reads the answer, serves it, says so
    assert b.http01.get("tok_9") == "tok_9.thumb"
    assert store_b.instance not in responder.unconfirmed(store_a)
    responder.withdraw("http-01", "example.com", "tok_9")
    store_b._redis.delete(store_b._key("live", store_b.instance))  # b's heartbeat runs out (it died)
    assert store_b.instance not in store_a.live_instances()
    for inst in (a, b):
        inst.service.stopService()


class _Acks:
    """A fleet's store as FleetResponder sees it: who is up, who confirmed what."""

    instance = "me"

    def __init__(self, live: set[str]) -> None:
        self.live = live
        self.acks: set[str] = set()
        self.published: list[tuple[str, str, str]] = []

    def heartbeat(self) -> None:
        pass

    def live_instances(self) -> set[str]:
        return self.live | {self.instance}

    def ack_challenges(self, answers: list[tuple[str, str, str]]) -> None:
        pass

    def challenge_acks(self, kind: str, name: str, key_authorization: str) -> set[str]:
        return set(self.acks)

    def publish_challenge(self, kind: str, name: str, key_authorization: str) -> None:
        self.published.append((kind, name, key_authorization))

    def withdraw_challenge(self, kind: str, name: str) -> None:
        pass


class _Time:
    """A clock and a sleep for FleetResponder; ``during`` runs at each sleep (what the other instances do)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.during: Any = lambda now: None

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        self.during(self.now)


def _fleet_responder(acks: _Acks, time_: _Time) -> Any:
    from tlsproxy.acme.issuer import FleetResponder, TableResponder

    responder = FleetResponder(
        TableResponder(HTTP01Answers(), TLSALPN01Answers()),
        acks,  # type: ignore[arg-type]
        settle=10,
        sleep=time_.sleep,
        clock=lambda: time_.now,
    )
    responder.publish("http-01", "example.com", "tok", "tok.thumb")
    return responder


def test_fleet_order_goes_on_as_soon_as_every_instance_confirmed() -> None:
    """Every instance that is up confirmed: the CA is told at once, with no fixed pause."""
    acks, time_ = _Acks({"b", "c"}), _Time()
    responder = _fleet_responder(acks, time_)
    time_.during = lambda now: acks.acks.update({"b", "c"} if now >= 0.3 else {"b"})
    responder.ready()
    assert time_.now == pytest.approx(0.3, abs=0.15) and acks.published == [("http-01", "tok", "tok.thumb")]


def test_fleet_order_waits_for_a_silent_instance_no_longer_than_settle() -> None:
    """An instance that never confirms delays the order by ``settle`` at most, and the log names it."""
    acks, time_ = _Acks({"b", "c"}), _Time()
    responder = _fleet_responder(acks, time_)
    acks.acks = {"b"}
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        responder.ready()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert time_.now == pytest.approx(10, abs=0.15)
    late = [e for e in seen if "did not say they serve the challenge answers" in e.get("log_format", "")]
    assert len(late) == 1 and late[0]["missing"] == "c"


def test_fleet_order_does_not_wait_for_an_instance_that_died() -> None:
    """An instance whose heartbeat runs out while the order waits is no longer waited for."""
    acks, time_ = _Acks({"b", "c"}), _Time()
    responder = _fleet_responder(acks, time_)
    acks.acks = {"b"}
    time_.during = lambda now: acks.live.discard("c") if now >= 1 else None
    responder.ready()
    assert time_.now == pytest.approx(1, abs=0.15)


@pytest.mark.parametrize("from_environment", [False, True])
def test_refused_password_says_where_the_url_is_and_hides_it(tmp_path: Path, from_environment: bool) -> None:
    """A wrong store password logs once: [store] url of the file (or TLSPROXY_STORE_URL), `tlsproxy check`, ***."""
    with running_redis(password="right-one") as server:
        url = server.url.replace(":right-one@", ":wrong-one@")
        assert "wrong-one" in url
        config = Config(
            server=Server(state_dir=str(tmp_path)),
            acme=ACME(agree_tos=True),
            store=Store(url=url),
            sites=(Site(hosts=("example.com",), upstream=Upstream(url="http://127.0.0.1:8000", host="x", port=8000)),),
            source="/etc/tlsproxy/proxy.toml",
        )
        environ = {"TLSPROXY_STORE_URL": url} if from_environment else {}
        clock = Clock()
        clock.advance(START)
        service = CertificateService(
            clock,
            config,
            SniServer(TLSPolicy(), SniMap([("example.com", ("example.com",))])),
            HTTP01Answers(),
            TLSALPN01Answers(),
            run_in_thread=lambda f, *a, **kw: maybeDeferred(f, *a, **kw),
            ca_factory=lambda config, store: FakeCA(),
            store=RedisStore(url, tmp_path / "cache", connect_timeout=1, timeout=2),
            environ=environ,
        )
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            service.startService()
            for _ in range(2):
                clock.advance(service.poll_interval)
        finally:
            globalLogPublisher.removeObserver(events.append)
            service.stopService()
    said = [e["problem"] for e in events if e.get("log_level") == LogLevel.error and "problem" in e]
    assert len(said) == 1, said
    where = "the environment's TLSPROXY_STORE_URL" if from_environment else "[store] url of /etc/tlsproxy/proxy.toml"
    assert "refuses our credentials" in said[0]
    assert f"fix the password (or user) in {where} (`tlsproxy check` tries it)" in said[0]
    assert ":***@" in said[0] and "wrong-one" not in said[0]

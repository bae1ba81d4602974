"""CertificateService with a Clock, a synchronous "thread", the fake CA and a real store on disk."""

from __future__ import annotations

import datetime
import os
import random
from pathlib import Path

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from tlsproxy.acme.ari import cert_id
from tlsproxy.acme.client import AcmeError
from tlsproxy.acme.scheduler import Window
from tlsproxy.acme.service import CertificateService
from tlsproxy.acme.testing import FakeCA
from tlsproxy.certs.challenges import HTTP01Answers, TLSALPN01Answers
from tlsproxy.certs.store import CertificateStore
from tlsproxy.config import ACME, Config, Server, Site, Upstream
from tlsproxy.tls.policy import TLSPolicy
from tlsproxy.tls.sni import SniMap, SniServer

START = 1_750_000_000.0
DAY = 86400.0


def at(clock: Clock) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)


class Harness:
    def __init__(self, tmp_path: Path, sites: tuple[Site, ...] | None = None, ari: bool = False) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.http01, self.alpn01 = HTTP01Answers(), TLSALPN01Answers()
        self.ca = FakeCA(http01=self.http01, alpn01=self.alpn01, now=lambda: at(self.clock), ari=ari)
        up = Upstream(url="http://127.0.0.1:8000", host="127.0.0.1", port=8000)
        self.sites = sites or (Site(hosts=("example.com", "www.example.com"), upstream=up),)
        self.config = Config(
            server=Server(state_dir=str(tmp_path / "state")),
            acme=ACME(agree_tos=True),
            sites=self.sites,
        )
        self.store = CertificateStore(self.config.server.state_dir)

    def service(self) -> CertificateService:
        self.sni = SniServer(TLSPolicy(), SniMap([(s.name, s.hosts) for s in self.sites]), self.alpn01)
        return CertificateService(
            self.clock,
            self.config,
            self.sni,
            self.http01,
            self.alpn01,
            run_in_thread=lambda f, *a, **kw: maybeDeferred(f, *a, **kw),
            ca_factory=lambda config, store: self.ca,
            rng=random.Random(7),
        )

    def serial(self, name: str = "example.com") -> int | None:
        ctx = self.sni.sni_map.context_of(name)
        if ctx is None:
            return None
        return ctx.get_certificate().get_serial_number() if hasattr(ctx, "get_certificate") else 0

    def stored_serial(self, name: str = "example.com") -> int:
        certified = self.store.load_certificate(name)
        assert certified is not None
        return certified.leaf.serial_number


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_first_start_orders_and_serves(h: Harness) -> None:
    """With an empty store the service orders one certificate for both names and serves it."""
    svc = h.service()
    svc.startService()
    assert len(h.ca.orders) == 1
    assert h.ca.orders[0].hosts == ("example.com", "www.example.com")
    assert h.sni.sni_map.context_of("example.com") is not None
    assert h.store.load_meta("example.com").serial
    svc.stopService()


def test_restart_reuses_stored_certificate(h: Harness) -> None:
    """A second start with a good stored certificate serves it without a new order."""
    svc = h.service()
    svc.startService()
    svc.stopService()
    h.service().startService()
    assert len(h.ca.orders) == 1
    assert h.sni.sni_map.context_of("example.com") is not None


def test_stop_cancels_timers(h: Harness) -> None:
    """After stopService nothing is left scheduled on the clock."""
    svc = h.service()
    svc.startService()
    svc.stopService()
    assert h.clock.getDelayedCalls() == []


def test_renews_when_a_third_of_lifetime_is_left(h: Harness) -> None:
    """A 90-day certificate is renewed after 60 days (plus at most a check interval), and the new one is served."""
    svc = h.service()
    svc.startService()
    first = h.stored_serial()
    h.clock.pump([DAY] * 59)
    assert len(h.ca.orders) == 1
    h.clock.pump([3600.0] * 30)
    assert len(h.ca.orders) == 2
    assert h.stored_serial() != first
    assert svc._acme["example.com"].serial == h.stored_serial()
    svc.stopService()


def test_ca_down_keeps_old_cert_and_backs_off(h: Harness) -> None:
    """When the CA is down at renewal time the old certificate keeps serving and retries back off 1m, 10m, 100m."""
    svc = h.service()
    svc.startService()
    first = h.stored_serial()
    h.ca.down = True
    h.clock.pump([DAY] * 59 + [3600.0] * 48)
    meta = h.store.load_meta("example.com")
    assert meta.failures >= 1 and "connection refused" in meta.last_error
    assert svc._acme["example.com"].serial == first
    failures = meta.failures
    gap = (meta.next_attempt - meta.last_attempt).total_seconds()
    assert gap > 0
    h.ca.down = False
    h.clock.pump([60.0] * 60 * 5)
    assert h.stored_serial() != first
    assert h.store.load_meta("example.com").failures == 0
    assert failures >= 3
    svc.stopService()


def test_backoff_sequence(h: Harness) -> None:
    """Consecutive failures are retried after about 60 s, 600 s and 6000 s."""
    h.ca.down = True
    svc = h.service()
    svc.startService()
    gaps = []
    for _ in range(3):
        meta = h.store.load_meta("example.com")
        gaps.append((meta.next_attempt - meta.last_attempt).total_seconds())
        h.clock.advance(gaps[-1] + 2.0)
    assert 54 <= gaps[0] <= 66 and 540 <= gaps[1] <= 660 and 5400 <= gaps[2] <= 6600
    assert h.sni.sni_map.context_of("example.com") is None
    svc.stopService()


def test_retry_after_is_honoured(h: Harness) -> None:
    """A CA error with Retry-After of an hour delays the next attempt by at least an hour."""
    h.ca.failures.append(AcmeError("ordering", "rate limited", "rateLimited", retry_after=3600))
    svc = h.service()
    svc.startService()
    meta = h.store.load_meta("example.com")
    assert (meta.next_attempt - meta.last_attempt).total_seconds() >= 3600
    assert "rate limited" in meta.last_error
    h.clock.pump([60.0] * 59)
    assert len(h.ca.orders) == 0
    h.clock.pump([60.0] * 3)
    assert len(h.ca.orders) == 1
    svc.stopService()


def test_ari_window_triggers_renewal_with_replaces(tmp_path: Path) -> None:
    """A CA-suggested window that has opened causes a renewal whose order names the old certificate in replaces."""
    h = Harness(tmp_path, ari=True)
    svc = h.service()
    svc.startService()
    old = h.store.load_certificate("example.com")
    assert old is not None
    now = at(h.clock)
    h.ca.windows[cert_id(old.leaf)] = Window(now + datetime.timedelta(days=1), now + datetime.timedelta(days=2))
    # the stored ARI answer is fresh for 6 hours; the next checks pick up the new window
    h.clock.pump([3600.0] * 24 * 3)
    assert len(h.ca.orders) == 2
    assert h.ca.orders[1].replaces == cert_id(old.leaf)
    svc.stopService()


def test_store_change_by_another_writer_is_swapped_in(h: Harness) -> None:
    """A certificate written into the store by another process is served after the next poll."""
    svc = h.service()
    svc.startService()
    from tlsproxy.acme.issuer import TableResponder, issue

    other = issue(h.ca, ("example.com", "www.example.com"), responder=TableResponder(h.http01, h.alpn01))
    h.store.save_certificate("example.com", other, h.store.load_meta("example.com"))
    h.clock.advance(2.0)
    assert svc._acme["example.com"].serial == other.leaf.serial_number
    svc.stopService()


def test_bad_store_file_is_ignored(h: Harness) -> None:
    """Garbage written over the stored chain is logged and ignored; the last good certificate keeps serving."""
    svc = h.service()
    svc.startService()
    good = svc._acme["example.com"].serial
    context = h.sni.sni_map.context_of("example.com")
    h.store.chain_path("example.com").write_bytes(b"not a certificate")
    h.clock.advance(2.0)
    assert h.sni.sni_map.context_of("example.com") is context
    assert svc._acme["example.com"].serial == good
    svc.stopService()


def test_store_cert_for_other_names_is_ignored(h: Harness) -> None:
    """A stored certificate that does not cover the site's hosts is not served."""
    svc = h.service()
    svc.startService()
    context = h.sni.sni_map.context_of("example.com")
    from tlsproxy.acme.issuer import TableResponder, issue

    wrong = issue(h.ca, ("other.example",), responder=TableResponder(h.http01, h.alpn01))
    h.store.save_certificate("example.com", wrong, h.store.load_meta("example.com"))
    h.clock.advance(2.0)
    assert h.sni.sni_map.context_of("example.com") is context
    svc.stopService()


def test_files_site_is_watched(tmp_path: Path) -> None:
    """A tls = "files" site's new cert/key pair is swapped in; a broken one is ignored."""
    import trustme

    ca = trustme.CA()
    cert, key = tmp_path / "fullchain.pem", tmp_path / "key.pem"
    first = ca.issue_cert("files.example")
    first.cert_chain_pems[0].write_to_path(str(cert))
    first.private_key_pem.write_to_path(str(key))
    up = Upstream(url="http://127.0.0.1:8000", host="127.0.0.1", port=8000)
    site = Site(hosts=("files.example",), upstream=up, tls="files", cert=str(cert), key=str(key))
    h = Harness(tmp_path, sites=(site,))
    svc = h.service()
    svc.startService()
    watch = svc._files["files.example"]
    s1 = watch.serial
    assert s1 is not None
    second = ca.issue_cert("files.example")
    # Renewed as certbot and `mv` do: new files renamed over the old names. (Rewritten in
    # place within one kernel clock tick, a same-size file keeps its mtime and inode.)
    for path, pem in ((key, second.private_key_pem), (cert, second.cert_chain_pems[0])):
        pem.write_to_path(str(path) + ".new")
        os.replace(str(path) + ".new", path)
    h.clock.advance(2.0)
    assert watch.serial not in (None, s1)
    s2 = watch.serial
    context = h.sni.sni_map.context_of("files.example")
    cert.write_bytes(b"garbage")
    h.clock.advance(2.0)
    assert watch.serial == s2 and h.sni.sni_map.context_of("files.example") is context
    assert h.ca.orders == []
    svc.stopService()


def test_published_challenges_are_served(h: Harness) -> None:
    """Challenge answers the tlsproxy command publishes in the store appear in (and leave) the tables."""
    svc = h.service()
    svc.startService()
    h.store.publish_challenge("http-01", "tok_123", "tok_123.thumb")
    h.store.publish_challenge("tls-alpn-01", "example.com", "abc.thumb")
    h.clock.advance(2.0)
    assert h.http01.get("tok_123") == "tok_123.thumb"
    assert h.alpn01.get("example.com") is not None
    h.store.withdraw_challenge("http-01", "tok_123")
    h.store.withdraw_challenge("tls-alpn-01", "example.com")
    h.clock.advance(2.0)
    assert h.http01.get("tok_123") is None and h.alpn01.get("example.com") is None
    svc.stopService()


def test_checks_at_least_twice_a_day(h: Harness) -> None:
    """Even far from renewal, a site is checked again within 12 hours plus jitter."""
    svc = h.service()
    svc.startService()
    first = svc._acme["example.com"].next_check
    assert first is not None
    delta = (first - at(h.clock)).total_seconds()
    assert 0 < delta <= 12 * 3600 * 1.1
    svc.stopService()


def test_local_sites_are_ignored(tmp_path: Path) -> None:
    """tls = "local" sites are neither ordered nor watched."""
    up = Upstream(url="http://127.0.0.1:8000", host="127.0.0.1", port=8000)
    h = Harness(tmp_path, sites=(Site(hosts=("localhost",), upstream=up, tls="local"),))
    svc = h.service()
    svc.startService()
    assert h.ca.orders == [] and svc._acme == {} and svc._files == {}
    svc.stopService()


# ---------------------------------------------------------------------------
# Faults and threads (issue 9: items 19, 20, 21)


@pytest.fixture
def events():  # type: ignore[no-untyped-def]
    from twisted.logger import globalLogPublisher

    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def _count_checks(svc: CertificateService) -> list[str]:
    checks: list[str] = []
    real = svc._check_blocking

    def counted(watch):  # type: ignore[no-untyped-def]
        checks.append(watch.site.name)
        return real(watch)

    svc._check_blocking = counted  # type: ignore[method-assign]
    return checks


def test_valid_certificate_is_not_checked_every_few_seconds(h: Harness) -> None:
    """After the first order, an hour of polling makes no further renewal check and leaves meta.json alone."""
    svc = h.service()
    svc.startService()
    checks = _count_checks(svc)
    h.clock.pump([1.0] * 60)
    meta_before = os.stat(h.store.meta_path("example.com"))
    h.clock.pump([1.0] * 3600)
    assert checks == []
    after = os.stat(h.store.meta_path("example.com"))
    assert (after.st_ino, after.st_mtime_ns) == (meta_before.st_ino, meta_before.st_mtime_ns)
    # The twice-a-day check still comes.
    h.clock.pump([60.0] * 60 * 14)
    assert 1 <= len(checks) <= 2
    svc.stopService()


def test_disk_full_during_renewal_keeps_serving_and_retries(
    h: Harness, monkeypatch: pytest.MonkeyPatch, events: list[dict]
) -> None:
    """ENOSPC while storing a renewal: old pair served and stored, one error line (no traceback), retried ~60 s on."""
    from twisted.logger import LogLevel

    svc = h.service()
    svc.startService()
    first = h.stored_serial()
    real = CertificateStore._write_version

    def full(site: Path, certified):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device", str(site / ".v-x" / "fullchain.pem"))

    monkeypatch.setattr(CertificateStore, "_write_version", staticmethod(full))
    h.clock.pump([DAY] * 59 + [3600.0] * 30)
    # One order only: the issued certificate waits in memory for the disk, the CA is not asked again.
    assert len(h.ca.orders) == 2 and svc._acme["example.com"].failures >= 3
    assert h.stored_serial() == first and svc._acme["example.com"].serial == first
    meta = h.store.load_meta("example.com")
    assert meta.failures >= 1 and "No space left on device" in meta.last_error
    gap = (svc._acme["example.com"].next_check - at(h.clock)).total_seconds()
    assert 0 < gap <= 4 * 3600 * 1.1
    assert not [e for e in events if e.get("log_failure") is not None or e.get("log_level") == LogLevel.critical]
    errors = [e for e in events if "No space left on device" in str(e.get("error", ""))]
    assert errors and all("\n" not in str(e["error"]) for e in errors)
    monkeypatch.setattr(CertificateStore, "_write_version", staticmethod(real))
    h.clock.pump([60.0] * 60 * 5)
    assert h.stored_serial() == h.ca.issued[-1].serial_number != first
    assert svc._acme["example.com"].serial == h.stored_serial() and len(h.ca.orders) == 2
    svc.stopService()


def test_store_error_outside_the_ca_is_one_line_and_backs_off(
    h: Harness, monkeypatch: pytest.MonkeyPatch, events: list[dict]
) -> None:
    """A StoreError before any order (the lock cannot be made) is logged as one error line and retried with backoff."""
    from twisted.logger import LogLevel

    from tlsproxy.certs.store import StoreError

    def no_lock(self, timeout: float = 600.0, poll: float = 0.1, name: str = ""):  # type: ignore[no-untyped-def]
        raise StoreError(str(self.lock_path), "No space left on device", "opening the store lock")

    monkeypatch.setattr(CertificateStore, "locked", no_lock)
    svc = h.service()
    svc.startService()
    watch = svc._acme["example.com"]
    first_gap = (watch.next_check - at(h.clock)).total_seconds()
    h.clock.advance(first_gap + 1)
    second_gap = (watch.next_check - at(h.clock)).total_seconds()
    assert 54 <= first_gap <= 66 and second_gap > 500
    assert not [e for e in events if e.get("log_failure") is not None or e.get("log_level") == LogLevel.critical]
    assert [
        e for e in events if e.get("log_level") == LogLevel.error and "opening the store lock" in e.get("error", "")
    ]
    svc.stopService()


class _QueuedThreads:
    """A worker "thread" that runs jobs only when the test says so, and says whether one is running."""

    def __init__(self) -> None:
        self.jobs: list[tuple[object, tuple, dict, object]] = []
        self.inside = False

    def __call__(self, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        from twisted.internet.defer import Deferred

        d: Deferred = Deferred()
        self.jobs.append((f, args, kwargs, d))
        return d

    def run_all(self) -> None:
        while self.jobs:
            f, args, kwargs, d = self.jobs.pop(0)
            self.inside = True
            try:
                result = f(*args, **kwargs)  # type: ignore[operator]
            finally:
                self.inside = False
            d.callback(result)  # type: ignore[attr-defined]


def test_store_poll_reads_files_in_a_thread(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """After start, a new stored certificate is read by a worker job, never on the reactor thread."""
    svc = h.service()
    svc.startService()
    svc.stopService()
    threads = _QueuedThreads()
    svc = CertificateService(
        h.clock,
        h.config,
        h.sni,
        h.http01,
        h.alpn01,
        run_in_thread=threads,
        ca_factory=lambda config, store: h.ca,
        rng=random.Random(7),
        in_reactor=lambda f, *a: f(*a),
    )
    svc.startService()
    threads.run_all()
    from tlsproxy.acme.issuer import TableResponder, issue

    other = issue(h.ca, ("example.com", "www.example.com"), responder=TableResponder(h.http01, h.alpn01))
    h.store.save_certificate("example.com", other, h.store.load_meta("example.com"))
    h.store.publish_challenge("http-01", "tok_1", "tok_1.thumb")
    real_load, real_challenges = CertificateStore.load_certificate, CertificateStore.challenges

    def load(self, name):  # type: ignore[no-untyped-def]
        assert threads.inside, "store file read on the reactor thread"
        return real_load(self, name)

    def challenges(self, kind):  # type: ignore[no-untyped-def]
        assert threads.inside, "challenge directory read on the reactor thread"
        return real_challenges(self, kind)

    monkeypatch.setattr(CertificateStore, "load_certificate", load)
    monkeypatch.setattr(CertificateStore, "challenges", challenges)
    h.clock.advance(2.0)
    assert svc._acme["example.com"].serial != other.leaf.serial_number
    threads.run_all()
    assert svc._acme["example.com"].serial == other.leaf.serial_number
    assert h.http01.get("tok_1") == "tok_1.thumb"
    svc.stopService()


def test_renewal_thread_changes_tables_through_the_reactor(h: Harness) -> None:
    """Every challenge-table change a renewal makes goes through in_reactor, none from the worker directly."""
    threads = _QueuedThreads()
    through: list[str] = []
    for table in (h.http01, h.alpn01):
        for method in ("put", "remove"):
            real = getattr(table, method)

            def guarded(*args, _real=real, _name=method):  # type: ignore[no-untyped-def]
                assert not threads.inside, f"table {_name} from the worker thread"
                return _real(*args)

            setattr(table, method, guarded)

    def in_reactor(f, *args):  # type: ignore[no-untyped-def]
        inside, threads.inside = threads.inside, False
        try:
            through.append(f.__name__ if hasattr(f, "__name__") else "?")
            return f(*args)
        finally:
            threads.inside = inside

    svc = CertificateService(
        h.clock,
        h.config,
        h.service().sni,
        h.http01,
        h.alpn01,
        run_in_thread=threads,
        ca_factory=lambda config, store: h.ca,
        rng=random.Random(7),
        in_reactor=in_reactor,
    )
    svc.startService()
    threads.run_all()
    assert len(h.ca.issued) == 1 and svc._acme["example.com"].serial is not None
    assert len(through) >= 4  # put and remove, for each of the two names
    svc.stopService()


class _ThreadReactor(Clock):
    """A Clock whose callFromThread only queues; the test thread plays the reactor."""

    def __init__(self) -> None:
        super().__init__()
        import queue

        self.calls: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args):  # type: ignore[no-untyped-def]
        self.calls.put((f, args))


def test_worker_waits_for_the_reactor_to_change_a_table(h: Harness) -> None:
    """A worker thread's table change runs on the reactor's turn, and the worker gets its result."""
    import threading

    reactor = _ThreadReactor()
    svc = CertificateService(reactor, h.config, None, h.http01, h.alpn01)
    got: list[object] = []
    worker = threading.Thread(target=lambda: got.append(svc._in_reactor(h.http01.put, "tok", "tok.thumb")))
    worker.start()
    f, args = reactor.calls.get(timeout=10)
    assert h.http01.get("tok") is None and got == []
    f(*args)  # the reactor's turn
    worker.join(10)
    assert h.http01.get("tok") == "tok.thumb" and got == [None]


def test_worker_gives_up_when_the_reactor_never_runs_the_change(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reactor that is shutting down never runs the change: the worker gets an AcmeError instead of hanging."""
    from tlsproxy.acme import service

    monkeypatch.setattr(service, "IN_REACTOR_PATIENCE", 0.01)
    svc = CertificateService(_ThreadReactor(), h.config, None, h.http01, h.alpn01)
    with pytest.raises(AcmeError) as info:
        svc._in_reactor(h.http01.put, "tok", "tok.thumb")
    assert info.value.code == "shutdown" and h.http01.get("tok") is None


def test_start_reads_once_and_queues_no_scan(tmp_path: Path) -> None:
    """startService reads the files itself; its first tick queues no second scan (no thread at startup)."""
    import trustme

    ca = trustme.CA()
    cert, key = tmp_path / "fullchain.pem", tmp_path / "key.pem"
    leaf = ca.issue_cert("files.example")
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    up = Upstream(url="http://127.0.0.1:8000", host="127.0.0.1", port=8000)
    h = Harness(
        tmp_path, sites=(Site(hosts=("files.example",), upstream=up, tls="files", cert=str(cert), key=str(key)),)
    )
    h.service()
    threads = _QueuedThreads()
    svc = CertificateService(h.clock, h.config, h.sni, h.http01, h.alpn01, run_in_thread=threads)
    svc.startService()
    assert svc._files["files.example"].serial is not None and threads.jobs == []
    h.clock.advance(2.0)
    assert len(threads.jobs) == 1
    svc.stopService()


def test_worker_roles_one_orders_the_others_watch(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """With workers, the issuer orders and publishes its answers in the store too; a watcher never orders."""
    watcher = h.service()
    watcher.role = "watcher"
    watcher_sni = h.sni
    watcher.startService()
    h.clock.advance(60)
    assert h.ca.orders == []
    published: list[str] = []
    publish = CertificateStore.publish_challenge

    def recording(store: CertificateStore, kind: str, name: str, keyauth: str) -> None:
        published.append(kind)
        publish(store, kind, name, keyauth)

    monkeypatch.setattr(CertificateStore, "publish_challenge", recording)
    issuer = h.service()
    issuer.role = "issuer"
    renewed: list[str] = []
    issuer.renewed = renewed.append
    announced: list[int] = []
    issuer.published = lambda: announced.append(len(published))
    issuer.startService()
    assert len(h.ca.orders) == 1
    assert published and set(published) <= {"http-01", "tls-alpn-01"}
    assert announced == [len(published)]  # the others are told once every answer is in the store
    assert renewed == ["example.com"]
    assert watcher_sni.sni_map.context_of("example.com") is None
    watcher.scan()  # what the "renewed" message makes a watcher do
    assert watcher_sni.sni_map.context_of("example.com") is not None
    assert len(h.ca.orders) == 1
    watcher.stopService()
    issuer.stopService()


def test_issuer_tells_the_ca_only_after_the_other_workers_confirm(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """An issuer's order waits for the confirmation that the other workers serve its answers, not a fixed pause."""
    import threading

    from twisted.internet.defer import Deferred

    events: list[str] = []
    answer = FakeCA.answer
    monkeypatch.setattr(FakeCA, "answer", lambda ca, challenge: (events.append("answer"), answer(ca, challenge))[1])
    h.service()
    # A long poll: a fixed pause derived from it would outlast the joins below.
    svc = CertificateService(
        h.clock, h.config, h.sni, h.http01, h.alpn01, run_in_thread=maybeDeferred, poll_interval=30.0, role="issuer"
    )
    confirmed: Deferred[None] = Deferred()
    announced = threading.Event()

    def published() -> Deferred[None]:
        events.append("announced")
        announced.set()
        return confirmed

    svc.published = published
    responder = svc._responder()
    responder.publish("http-01", "example.com", "tok", "tok.key")
    ordering = threading.Thread(target=lambda: (responder.ready(), events.append("ready")))
    ordering.start()
    assert announced.wait(10)
    ordering.join(0.2)  # a responder that does not wait would be done by now
    assert ordering.is_alive() and events == ["announced"]
    confirmed.callback(None)
    ordering.join(10)  # at once, in fact: far less than the poll interval
    assert not ordering.is_alive() and events == ["announced", "ready"]
    responder.withdraw("http-01", "example.com", "tok")


def test_issuer_goes_on_when_no_confirmation_comes(h: Harness) -> None:
    """No word from the supervisor within the patience: the order goes on, and the log says why."""
    from twisted.internet.defer import Deferred
    from twisted.logger import globalLogPublisher

    svc = h.service()
    svc.role, svc.challenge_patience = "issuer", 0.0
    never: Deferred[None] = Deferred()
    svc.published = lambda: never
    seen: list[dict[str, object]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        svc._responder().ready()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert [e for e in seen if "no word from the supervisor" in str(e.get("log_format", ""))]


def test_scan_fires_once_a_scan_started_after_it_is_applied(h: Harness) -> None:
    """scan() answers after a scan that began after the call: one already running when asked does not count."""
    h.service().startService()  # a certificate in the store
    threads = _QueuedThreads()
    svc = CertificateService(
        h.clock, h.config, h.sni, h.http01, h.alpn01, run_in_thread=threads, ca_factory=lambda config, store: h.ca
    )
    svc.startService()
    h.store.publish_challenge("http-01", "tok", "tok.key")
    threads.run_all()  # the first renewal check: not due
    first = svc.scan()
    second = svc.scan()  # while the first scan runs: waits for the next one
    assert not first.called and not second.called
    (f, args, kwargs, d), *_ = threads.jobs
    threads.jobs.pop(0)
    assert getattr(f, "__name__", "") == "_scan_blocking"
    d.callback(f(*args, **kwargs))  # type: ignore[operator,attr-defined]
    assert first.result is True and not second.called
    assert h.http01.get("tok") == "tok.key"  # applied before the answer
    threads.run_all()
    assert second.result is True
    svc.stopService()


def test_a_second_issuer_during_an_order_in_flight_does_not_order_again(h: Harness) -> None:
    """A replaced worker 0 (or a reload's new service) checking while the old one's order is in flight: one order.

    The store lock is held for the whole order, so the second check waits for
    it, then reads the store again and finds the new certificate.
    """
    import threading

    from twisted.internet.defer import Deferred

    h.service()

    def issuer() -> CertificateService:
        return CertificateService(
            h.clock, h.config, h.sni, h.http01, h.alpn01, run_in_thread=maybeDeferred, ca_factory=lambda c, s: h.ca
        )

    old, new = issuer(), issuer()
    old.role = new.role = "issuer"
    confirmed: Deferred[None] = Deferred()
    in_flight = threading.Event()

    def published() -> Deferred[None]:
        in_flight.set()
        return confirmed

    old.published = published
    new.published = lambda: None
    outcomes: dict[str, object] = {}
    watch = old._acme["example.com"]
    first = threading.Thread(target=lambda: outcomes.update(old=old._check_blocking(watch)))
    second = threading.Thread(target=lambda: outcomes.update(new=new._check_blocking(new._acme["example.com"])))
    first.start()
    assert in_flight.wait(10)  # the old issuer's order waits for its confirmation, under the lock
    second.start()
    second.join(0.5)  # a second check not held back by the lock would have ordered by now
    assert second.is_alive() and len(h.ca.orders) == 1
    confirmed.callback(None)
    first.join(10)
    second.join(10)
    assert not first.is_alive() and not second.is_alive()
    assert len(h.ca.orders) == 1
    assert outcomes["old"].renewed and not outcomes["new"].renewed  # type: ignore[attr-defined]
    assert outcomes["new"].certified.leaf.serial_number == outcomes["old"].certified.leaf.serial_number  # type: ignore[attr-defined]

"""The running side of certificates: get, renew, watch, and hot-swap them.

One :class:`~twisted.internet.task.LoopingCall` on the injected clock drives
everything, every ``poll_interval`` seconds:

* each ``tls = "acme"`` site's store files are ``stat``-ed; a new key or chain
  written by anyone (this process, the ``tlsproxy`` command, another proxy) is
  read, validated and swapped into the SNI map;
* each ``tls = "files"`` site's cert/key files are watched the same way
  (certbot or acme-tiny renewals);
* challenge answers the ``tlsproxy`` command published in the store are
  copied into the in-memory tables, so the command can renew while we hold
  the ports;
* a site whose check time has come gets a renewal check in a thread
  (:func:`~tlsproxy.acme.issuer.renew_site`), one at a time.

The polling (stat, reads, the tls-alpn-01 certificates) runs in a thread, one
scan at a time; only its results are applied on the reactor thread, which also
owns the SNI map and the challenge tables (a renewal thread has the reactor
change them, and waits for it).  At start (and on a reload) the stored
certificates are read at once, so a new configuration never serves without
them.

A bad file is logged once and ignored: the last good certificate keeps
serving.  Open connections keep the context they started with.
"""

from __future__ import annotations

import datetime
import os
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from tlsproxy.acme.alpn01 import challenge_context
from tlsproxy.acme.client import AcmeClient, AcmeError, CertificateAuthority
from tlsproxy.acme.issuer import (
    ChallengeResponder,
    FleetAcks,
    FleetResponder,
    Outcome,
    SharedResponder,
    SiteRequest,
    StoreResponder,
    TableResponder,
    renew_site,
)
from tlsproxy.acme.scheduler import RenewalPolicy, backoff_delay, next_check
from tlsproxy.acme.storage import open_store
from tlsproxy.certs.challenges import HTTP01Answers, TLSALPN01Answers, is_valid_token
from tlsproxy.certs.model import CertificateError, CertifiedKey
from tlsproxy.certs.store import FileSignature, Store, StoreError, read_certificate_files
from tlsproxy.config import Config, Site

RunInThread = Callable[..., "Deferred[Any]"]
IN_REACTOR_PATIENCE = 10.0
# The longest an issuer waits for the other workers to say they serve its answers (see _confirm_published).
CHALLENGE_PATIENCE = 15.0
# The longest an order waits for a fleet's other instances to say they serve its answers.
FLEET_PATIENCE = 10.0


def default_ca_factory(config: Config, store: Store) -> CertificateAuthority:
    """An AcmeClient for ``config.acme`` with the store's account (blocking: call in a thread)."""
    acme = config.acme
    directory = acme.directory_url
    with store.locked(name="account"):  # one account key for the whole fleet
        key = store.account_key()
    return AcmeClient(
        directory,
        key,
        email=acme.email,
        agree_tos=acme.agree_tos,
        ca_bundle=acme.ca_bundle,
        eab_kid=acme.eab_kid,
        eab_hmac_key=acme.eab_hmac_key,
        account_url=store.registration(directory),
        on_registered=lambda url: store.save_registration(directory, url),
    )


def site_request(config: Config, site: Site) -> SiteRequest:
    return SiteRequest(
        name=site.name,
        hosts=site.hosts,
        key_type=config.acme.key_type,
        challenges=config.acme.challenges,
        profile=config.acme.profile,
    )


def check_usable(certified: CertifiedKey, hosts: tuple[str, ...], now: datetime.datetime) -> str | None:
    """Why ``certified`` cannot serve ``hosts`` now, or None if it can."""
    missing = certified.uncovered(hosts)
    if missing:
        return f"does not cover {', '.join(missing)} (it names {', '.join(certified.dns_names)})"
    if certified.not_after <= now:
        return f"expired at {certified.not_after.isoformat()}"
    return None


@dataclass
class _Watch:
    site: Site
    signature: FileSignature = field(default_factory=FileSignature)
    serial: int | None = None
    next_check: datetime.datetime | None = None
    busy: bool = False
    rand: float = 0.5
    failures: int = 0  # consecutive checks that failed outside the CA's answer (the store, say)
    unsaved: CertifiedKey | None = None  # issued, not stored yet (a full disk): stored by the next check


@dataclass(frozen=True)
class _Read:
    """What a scan found for one site whose files changed: a certificate or why not."""

    name: str
    signature: FileSignature
    certified: CertifiedKey | None = None
    problem: str = ""


@dataclass(frozen=True)
class _Scan:
    """One poll's findings, made in a thread and applied on the reactor thread."""

    acme: tuple[_Read, ...] = ()
    files: tuple[_Read, ...] = ()
    http01: dict[str, str] | None = None
    alpn01: dict[str, tuple[str, Any]] | None = None  # host -> (key authorization, context)
    store_problem: str | None = None  # why a shared store could not be read (its last answer)


class CertificateService(Service):
    """Keeps every ACME and file-based site's certificate current in the SNI map."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: Config,
        sni: Any,
        http01: HTTP01Answers,
        alpn01: TLSALPN01Answers,
        *,
        run_in_thread: RunInThread | None = None,
        ca_factory: Callable[[Config, Store], CertificateAuthority] = default_ca_factory,
        policy: RenewalPolicy = RenewalPolicy(),
        poll_interval: float = 2.0,
        rng: random.Random | None = None,
        metrics: Any = None,
        in_reactor: Callable[..., Any] | None = None,
        store: Store | None = None,
        fleet_settle: float | None = None,
        role: str = "alone",
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._environ = environ  # where the store URL may have come from (os.environ when None)
        # "alone": the only process; with [server] workers, "issuer" (worker 0) orders
        # and publishes its challenges in the store too, and a "watcher" only watches.
        self.role = role
        self.reactor = reactor
        self.metrics = metrics
        self.config = config
        self.sni = sni
        self.http01 = http01
        self.alpn01 = alpn01
        self.store = store if store is not None else open_store(config)
        self.store_problem: str | None = None  # what /readyz and the log say while a shared store is unreachable
        self._unwatch: Callable[[], None] | None = None
        self._scan_again = False
        # The longest an order waits for the fleet's other instances to say they serve its answers.
        self.fleet_settle = FLEET_PATIENCE if fleet_settle is None else fleet_settle
        # The store's answers this instance said it serves (kind, name, key authorization).
        self._acked: set[tuple[str, str, str]] = set()
        self.policy = policy
        self.poll_interval = poll_interval
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._run = run_in_thread or (
            lambda f, *a, **kw: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a, **kw)
        )
        # How a worker thread changes what the reactor reads (the challenge tables).
        if in_reactor is None:
            in_reactor = (lambda f, *a: f(*a)) if run_in_thread else self._blocking_in_reactor
        self._in_reactor = in_reactor
        self._scanning = False
        self._scanned_at_start = False
        self._ca_factory = ca_factory
        self._ca: CertificateAuthority | None = None
        self._ca_account: Any = None
        self._jobs = DeferredLock()
        self._acme = {s.name: _Watch(s, rand=self._rng.random()) for s in config.sites if s.tls == "acme"}
        self._files = {s.name: _Watch(s) for s in config.sites if s.tls == "files"}
        self._store_http: dict[str, str] = {}
        self._store_alpn: dict[str, str] = {}
        self._loop: LoopingCall | None = None
        # The longest an issuer waits for the other workers to confirm they serve its answers
        # (the supervisor gives up sooner and says which did not; this covers a supervisor gone).
        self.challenge_patience = CHALLENGE_PATIENCE
        # Called (on the reactor thread) once an issuer put challenge answers in the store;
        # may return a Deferred that fires once the other workers serve them.
        self.published: Callable[[], object] | None = None
        # Deferreds of scan() callers, fired when the next scan to start has been applied.
        self._scan_waiters: list[Deferred[bool]] = []
        # Called with a site's name when a renewal here installed its new certificate.
        self.renewed: Callable[[str], object] | None = None
        self._running_jobs: set[Deferred[Any]] = set()

    def _blocking_in_reactor(self, f: Callable[..., Any], *args: Any) -> Any:
        """Run ``f`` on the reactor thread and wait for it (from a worker thread).

        Unlike ``blockingCallFromThread`` this gives up after a while: a
        reactor that is shutting down joins its worker threads and would never
        run ``f``, and neither side would ever return.
        """
        done = threading.Event()
        outcome: list[tuple[bool, Any]] = []

        def run() -> None:
            try:
                outcome.append((True, f(*args)))
            except Exception as e:
                outcome.append((False, e))
            finally:
                done.set()

        self.reactor.callFromThread(run)
        if not done.wait(IN_REACTOR_PATIENCE):
            raise AcmeError("publishing a challenge answer", "the proxy did not take it (shutting down?)", "shutdown")
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    # -- time ------------------------------------------------------------------

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.UTC)

    # -- service ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._acme:
            self.store.ensure()
        now = self.now()
        # Read at once, not in a thread: a reload swaps in the new SNI map before
        # starting us, and it must not go without its certificates for a moment.
        # A shared store is read in the first poll's thread; this reads this
        # machine's copy of it (local files only, never the network).
        for watch in self._files.values():
            watch.signature = FileSignature()  # (re)load once: installs if the lead has not
        self._apply(self._scan_blocking(self._wanted(), None, self.store.offline()), now)
        if self._acme and self.store.shared:
            self._unwatch = self.store.watch(self._news)
        self._scanned_at_start = True
        if self.role != "watcher":
            for watch in self._acme.values():
                watch.next_check = now
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.reactor
        self._loop.start(self.poll_interval, now=True)

    def stopService(self) -> Any:
        super().stopService()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    # -- the periodic tick ---------------------------------------------------------

    def tick(self) -> None:
        # The first tick comes straight after the scan startService made: no second one
        # (it would start the thread pool while the process is still starting).
        fresh, self._scanned_at_start = self._scanned_at_start, False
        if not fresh or self.store.shared:
            self._scan()
        now = self.now()
        for watch in self._acme.values():
            if not watch.busy and watch.next_check is not None and now >= watch.next_check:
                self._start_check(watch)

    def scan(self) -> Deferred[bool]:
        """Look at the store and the watched files now (a worker told that another one renewed).

        Fires once a scan that started after this call is applied: True if it
        read the store, False if it could not (the other workers' issuer
        waits for that answer before the CA looks).
        """
        waiter: Deferred[bool] = Deferred()
        self._scan_waiters.append(waiter)
        self._scan(follow=True)
        return waiter

    def _scan(self, follow: bool = False) -> None:
        """Read the store in a thread, one scan at a time.

        A poll during a scan is skipped; news during one (``follow``) gets
        another scan right after, since the running one may have read too early.
        """
        if self._scanning:
            self._scan_again = self._scan_again or follow
            return
        self._scanning = True
        self._scan_again = False
        waiters, self._scan_waiters = self._scan_waiters, []
        alpn = dict(self._store_alpn) if self._acme else None
        d = self._run(self._scan_blocking, self._wanted(), alpn)
        d.addCallback(self._apply_scan)
        d.addErrback(self._scan_failed)
        d.addBoth(self._scanned, waiters)

    def _apply_scan(self, scan: _Scan) -> bool:
        if not self.running:
            return False
        self._apply(scan, self.now())
        return scan.store_problem is None

    def _scan_failed(self, failure: Failure) -> bool:
        if failure.check(StoreError):  # a shared store that refuses us (a wrong password): one line
            self._note_store(f"store {self.store.describe()}: {failure.value}")
            return False
        self.log.failure("polling the certificate files failed", failure)
        return False

    def _scanned(self, read: Any, waiters: list[Deferred[bool]]) -> None:
        self._scanning = False
        for waiter in waiters:
            waiter.callback(read is True)
        if self._scan_again and self.running:
            self._scan()
        elif not self.running:  # stopped: no scan will come for those still waiting
            waiters, self._scan_waiters = self._scan_waiters, []
            for waiter in waiters:
                waiter.callback(False)

    def _news(self) -> None:
        """Another instance changed the shared store (called from the subscriber's thread)."""
        self.reactor.callFromThread(self._poke)

    def _poke(self) -> None:
        if self.running:
            self._scan(follow=True)

    def _note_store(self, problem: str | None) -> None:
        """Say once when the shared store becomes unreachable and when it is back."""
        if problem == self.store_problem:
            return
        if problem:
            said = problem
            if getattr(self.store, "credentials_refused", False):
                said += f": fix the password (or user) in {self._store_url_origin()} (`tlsproxy check` tries it)"
            self.log.error("{problem}; serving the certificates we have, renewals wait for the store", problem=said)
        else:
            self.log.info("store {store} reachable again", store=self.store.describe())
        self.store_problem = problem

    def _store_url_origin(self) -> str:
        """Where the store URL was written: the environment variable, or the key of the config file."""
        environ = os.environ if self._environ is None else self._environ
        if environ.get("TLSPROXY_STORE_URL") == self.config.store.url:
            return "the environment's TLSPROXY_STORE_URL"
        return f"[store] url of {self.config.source}"

    def _wanted(self) -> tuple[dict[str, FileSignature], dict[str, tuple[str, str, FileSignature]]]:
        """What a scan compares against: the signatures last seen (plain values, safe to hand to a thread)."""
        acme = {name: w.signature for name, w in self._acme.items()}
        files = {name: (w.site.cert, w.site.key, w.signature) for name, w in self._files.items()}
        return acme, files

    def _scan_blocking(
        self,
        wanted: tuple[dict[str, FileSignature], dict[str, tuple[str, str, FileSignature]]],
        alpn: dict[str, str] | None,
        store: Store | None = None,
    ) -> _Scan:
        """stat every watched file, read the changed ones and the published challenges (blocking)."""
        store = store or self.store
        acme, files = wanted
        acme_reads = []
        for name, seen in acme.items():
            signature = store.signature(name)
            if signature == seen:
                continue
            if not signature.complete:
                acme_reads.append(_Read(name, signature))
                continue
            try:
                certified = store.load_certificate(name)
            except CertificateError as e:
                acme_reads.append(_Read(name, signature, problem=e.reason))
            except OSError as e:
                acme_reads.append(_Read(name, signature, problem=e.strerror or str(e)))
            else:
                acme_reads.append(_Read(name, signature, certified))
        file_reads = []
        for name, (cert, key, seen) in files.items():
            signature = FileSignature.of(cert, key)
            if signature == seen:
                continue
            try:
                file_reads.append(_Read(name, signature, read_certificate_files(cert, key)))
            except CertificateError as e:
                file_reads.append(_Read(name, signature, problem=e.reason))
            except OSError as e:
                file_reads.append(_Read(name, signature, problem=e.strerror or str(e)))
        if alpn is None:
            return _Scan(tuple(acme_reads), tuple(file_reads), store_problem=store.problem())
        try:
            if isinstance(store, FleetAcks):
                store.heartbeat()  # an order waits for the answers of the instances that are up
            http = {t: k for t, k in store.challenges("http-01").items() if is_valid_token(t)}
            published = store.challenges("tls-alpn-01")
        except StoreError:  # unreachable: the answers served stay as they are
            return _Scan(tuple(acme_reads), tuple(file_reads), store_problem=store.problem())
        contexts: dict[str, tuple[str, Any]] = {}
        for host, keyauth in published.items():
            # A new answer for the same host (a retry) gets a new certificate; made here, not on the reactor.
            contexts[host] = (keyauth, None if alpn.get(host) == keyauth else challenge_context(host, keyauth))
        return _Scan(tuple(acme_reads), tuple(file_reads), http, contexts, store_problem=store.problem())

    def _apply(self, scan: _Scan, now: datetime.datetime) -> None:
        """Swap in what a scan found (reactor thread)."""
        for read in scan.acme:
            watch = self._acme.get(read.name)
            if watch is not None:
                self._apply_store(watch, read, now)
        for read in scan.files:
            watch = self._files.get(read.name)
            if watch is not None:
                self._apply_files(watch, read, now)
        if scan.http01 is not None and scan.alpn01 is not None:
            self._apply_challenges(scan.http01, scan.alpn01)
            self._ack_challenges()
        if self._acme:
            self._note_store(scan.store_problem)

    def _install(self, watch: _Watch, certified: CertifiedKey, origin: str) -> bool:
        """Serve ``certified`` for the watch's site; False if it is what is served already."""
        if certified.leaf.serial_number == watch.serial:
            return False
        self.sni.sni_map.set_context(watch.site.name, self.sni.context_for(certified))
        watch.serial = certified.leaf.serial_number
        self.log.info(
            "serving certificate for {site} from {origin}: serial {serial:x}, not after {not_after}",
            site=watch.site.name,
            origin=origin,
            serial=certified.leaf.serial_number,
            not_after=certified.not_after.isoformat(),
        )
        return True

    def _apply_store(self, watch: _Watch, read: _Read, now: datetime.datetime) -> None:
        name = watch.site.name
        watch.signature = read.signature
        if read.problem:
            self.log.warn("ignoring stored certificate for {site}: {reason}", site=name, reason=read.problem)
            return
        if read.certified is None:
            return
        why = check_usable(read.certified, watch.site.hosts, now)
        if why:
            self.log.warn("ignoring stored certificate for {site}: {reason}", site=name, reason=why)
            return
        # Only a certificate we did not serve yet (someone else renewed) brings the next check forward.
        if (
            self._install(watch, read.certified, "the store")
            and not watch.busy
            and watch.next_check is not None
            and watch.next_check > now
        ):
            watch.next_check = min(watch.next_check, now + datetime.timedelta(seconds=self.poll_interval))

    def _apply_files(self, watch: _Watch, read: _Read, now: datetime.datetime) -> None:
        site = watch.site
        watch.signature = read.signature
        if read.certified is None:
            self.log.warn("ignoring {cert} for {site}: {reason}", cert=site.cert, site=site.name, reason=read.problem)
            return
        why = check_usable(read.certified, site.hosts, now)
        if why:
            self.log.warn("ignoring {cert} for {site}: {reason}", cert=site.cert, site=site.name, reason=why)
            return
        self._install(watch, read.certified, site.cert)

    def _apply_challenges(self, http: dict[str, str], alpn: dict[str, tuple[str, Any]]) -> None:
        """Serve the answers a `tlsproxy renew`/`revoke` command published in the store.

        The two directories are read on every poll (they hold a handful of
        files at most): a directory's stat can miss a rewrite within one tick.
        """
        for token in self._store_http.keys() - http.keys():
            self.http01.remove(token)
        for token, keyauth in http.items():
            if self._store_http.get(token) != keyauth:
                self.http01.put(token, keyauth)
        self._store_http = http
        for host in self._store_alpn.keys() - alpn.keys():
            self.alpn01.remove(host)
        answers = {}
        for host, (keyauth, context) in alpn.items():
            if context is not None and self._store_alpn.get(host) != keyauth:
                self.alpn01.put(host, context)
            if context is not None or host in self._store_alpn:
                answers[host] = keyauth
        self._store_alpn = answers

    def _ack_challenges(self) -> None:
        """Say in a fleet's store which of its answers we now serve (in a thread): the orderer waits for it."""
        if not isinstance(self.store, FleetAcks):
            return
        served = {("http-01", token, keyauth) for token, keyauth in self._store_http.items()}
        served |= {("tls-alpn-01", host, keyauth) for host, keyauth in self._store_alpn.items()}
        fresh, self._acked = served - self._acked, served
        if not fresh:
            return

        def failed(failure: Failure) -> None:  # said again at the next scan
            self._acked -= fresh
            if not failure.check(StoreError):
                self.log.failure("confirming challenge answers failed", failure)

        self._run(self.store.ack_challenges, sorted(fresh)).addErrback(failed)

    # -- renewal checks --------------------------------------------------------

    def _check_blocking(self, watch: _Watch) -> Outcome:
        account = self.store.account_signature()
        if self._ca is None or account != self._ca_account:
            # first use, or `tlsproxy account rollover` changed the key: start afresh
            self._ca = self._ca_factory(self.config, self.store)
            self._ca_account = self.store.account_signature()
        return renew_site(
            self.store,
            self._ca,
            site_request(self.config, watch.site),
            self._responder(),
            self.now,
            policy=self.policy,
            rand=watch.rand,
            unsaved=watch.unsaved,
        )

    def _responder(self) -> ChallengeResponder:
        table = TableResponder(self.http01, self.alpn01, self._in_reactor)
        if self.store.shared:
            # The CA may reach any instance: every one serves the answers it reads from the store.
            return FleetResponder(table, self.store, settle=self.fleet_settle)
        if self.role != "issuer":
            return table
        # [server] workers: the other workers read the answers from the state directory.
        return SharedResponder(table, StoreResponder(self.store, settle=0), self._confirm_published)

    def _confirm_published(self) -> None:
        """(renewal thread) Tell the other workers about the answers; wait until they serve them, within bounds."""
        if self.published is None:
            return
        served = self._in_reactor(self._announce)
        if not served.wait(self.challenge_patience):
            self.log.warn(
                "no word from the supervisor {patience:g}s after announcing the challenge answers; "
                "asking the CA anyway",
                patience=self.challenge_patience,
            )

    def _announce(self) -> threading.Event:
        """(reactor) Call ``published``; the event is set once what it returned has fired."""
        served = threading.Event()
        assert self.published is not None
        result = self.published()
        if isinstance(result, Deferred):
            result.addBoth(lambda _: served.set())
        else:
            served.set()
        return served

    def _start_check(self, watch: _Watch) -> None:
        watch.busy = True
        self.log.info("checking the certificate of {site}", site=watch.site.name)
        d = self._jobs.run(self._run, self._check_blocking, watch)
        self._running_jobs.add(d)

        def done(outcome: Outcome) -> None:
            now = self.now()
            watch.unsaved = outcome.unsaved
            # meta.json may not record a failure on a full disk: count here too, so the backoff grows.
            watch.failures = watch.failures + 1 if isinstance(outcome.error, StoreError) else 0
            if self.metrics is not None and (outcome.renewed or outcome.error is not None):
                self.metrics.renewal_attempts.labels(watch.site.name).inc()
                if outcome.error is not None:
                    self.metrics.renewal_failures.labels(watch.site.name).inc()
            if outcome.certified is not None and check_usable(outcome.certified, watch.site.hosts, now) is None:
                installed = self._install(watch, outcome.certified, "a renewal" if outcome.renewed else "the store")
                if installed and outcome.renewed and self.renewed is not None:
                    self.renewed(watch.site.name)
            if outcome.error is not None:
                self.log.error(
                    "certificate for {site} not renewed: {error}; next attempt at {retry}",
                    site=watch.site.name,
                    error=str(outcome.error),
                    retry=outcome.meta.next_attempt.isoformat() if outcome.meta.next_attempt else "?",
                )
            due = outcome.next_check or now
            if outcome.error is None:
                due = next_check(now, due, self.policy, self._rng.random())
            elif watch.failures:
                delay = backoff_delay(watch.failures, self.policy, self._rng.random())
                due = max(due, now + datetime.timedelta(seconds=delay))
            watch.next_check = due
            if outcome.error is None and not outcome.renewed:
                self.log.info(
                    "certificate of {site} not due for renewal; next check at {when}",
                    site=watch.site.name,
                    when=due.isoformat(timespec="seconds"),
                )

        def failed(failure: Failure) -> None:
            watch.failures += 1
            delay = backoff_delay(watch.failures, self.policy, self._rng.random())
            watch.next_check = self.now() + datetime.timedelta(seconds=delay)
            if failure.check(StoreError):  # a full disk, say: one line, not a traceback
                self.log.error(
                    "checking the certificate of {site} failed: {error}; next attempt at {retry}",
                    site=watch.site.name,
                    error=str(failure.value),
                    retry=watch.next_check.isoformat(),
                )
                return
            self.log.failure(
                "checking the certificate of {site} failed; next attempt at {retry}",
                failure,
                site=watch.site.name,
                retry=watch.next_check.isoformat(),
            )

        def finish(result: Any) -> None:
            watch.busy = False
            self._running_jobs.discard(d)

        d.addCallbacks(done, failed)
        d.addBoth(finish)

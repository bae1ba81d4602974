"""The running side of certificates: get, renew, watch, and hot-swap them.

One :class:`~twisted.internet.task.LoopingCall` on the injected clock drives
everything, every ``poll_interval`` seconds:

* each ``tls = "acme"`` site's store files are ``stat``-ed; a change made by
  anyone (this process, the ``tlsproxy`` command, another proxy) is read,
  validated and swapped into the SNI map;
* each ``tls = "files"`` site's cert/key files are watched the same way
  (certbot or acme-tiny renewals);
* challenge answers the ``tlsproxy`` command published in the store are
  copied into the in-memory tables, so the command can renew while we hold
  the ports;
* a site whose check time has come gets a renewal check in a thread
  (:func:`~tlsproxy.acme.issuer.renew_site`), one at a time.

A bad file is logged once and ignored: the last good certificate keeps
serving.  Open connections keep the context they started with.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from tlsproxy.acme.alpn01 import challenge_context
from tlsproxy.acme.challenges import HTTP01Answers, TLSALPN01Answers, is_valid_token
from tlsproxy.acme.client import AcmeClient, CertificateAuthority
from tlsproxy.acme.issuer import Outcome, SiteRequest, TableResponder, renew_site
from tlsproxy.acme.scheduler import RenewalPolicy, backoff_delay, next_check
from tlsproxy.certs.model import CertificateError, CertifiedKey
from tlsproxy.certs.store import CertificateStore, FileSignature, read_certificate_files
from tlsproxy.config import Config, Site

RunInThread = Callable[..., "Deferred[Any]"]


def default_ca_factory(config: Config, store: CertificateStore) -> CertificateAuthority:
    """An AcmeClient for ``config.acme`` with the store's account (blocking: call in a thread)."""
    acme = config.acme
    directory = acme.directory_url
    with store.locked():
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
        ca_factory: Callable[[Config, CertificateStore], CertificateAuthority] = default_ca_factory,
        policy: RenewalPolicy = RenewalPolicy(),
        poll_interval: float = 2.0,
        rng: random.Random | None = None,
        metrics: Any = None,
    ) -> None:
        self.reactor = reactor
        self.metrics = metrics
        self.config = config
        self.sni = sni
        self.http01 = http01
        self.alpn01 = alpn01
        self.store = CertificateStore(config.server.state_dir)
        self.policy = policy
        self.poll_interval = poll_interval
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._run = run_in_thread or (
            lambda f, *a, **kw: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a, **kw)
        )
        self._ca_factory = ca_factory
        self._ca: CertificateAuthority | None = None
        self._ca_account = FileSignature()
        self._jobs = DeferredLock()
        self._acme = {s.name: _Watch(s, rand=self._rng.random()) for s in config.sites if s.tls == "acme"}
        self._files = {s.name: _Watch(s) for s in config.sites if s.tls == "files"}
        self._store_http: dict[str, str] = {}
        self._store_alpn: dict[str, str] = {}
        self._loop: LoopingCall | None = None
        self._running_jobs: set[Deferred[Any]] = set()

    # -- time ------------------------------------------------------------------

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.UTC)

    # -- service ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._acme:
            self.store.ensure()
        now = self.now()
        for watch in self._acme.values():
            self._poll_store(watch, now)
            watch.next_check = now
        for watch in self._files.values():
            watch.signature = FileSignature()  # (re)load once: installs if the lead has not
            self._poll_files(watch, now)
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.reactor
        self._loop.start(self.poll_interval, now=True)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    # -- the periodic tick ---------------------------------------------------------

    def tick(self) -> None:
        now = self.now()
        for watch in self._acme.values():
            self._poll_store(watch, now)
        for watch in self._files.values():
            self._poll_files(watch, now)
        if self._acme:
            self._poll_challenges()
        for watch in self._acme.values():
            if not watch.busy and watch.next_check is not None and now >= watch.next_check:
                self._start_check(watch)

    def _install(self, watch: _Watch, certified: CertifiedKey, origin: str) -> None:
        if certified.leaf.serial_number == watch.serial:
            return
        self.sni.sni_map.set_context(watch.site.name, self.sni.context_for(certified))
        watch.serial = certified.leaf.serial_number
        self.log.info(
            "serving certificate for {site} from {origin}: serial {serial:x}, not after {not_after}",
            site=watch.site.name,
            origin=origin,
            serial=certified.leaf.serial_number,
            not_after=certified.not_after.isoformat(),
        )

    def _poll_store(self, watch: _Watch, now: datetime.datetime) -> None:
        name = watch.site.name
        signature = self.store.signature(name)
        if signature == watch.signature:
            return
        watch.signature = signature
        if not signature.parts[0] or not signature.parts[1]:
            return
        try:
            certified = self.store.load_certificate(name)
        except (CertificateError, OSError) as e:
            self.log.warn(
                "ignoring stored certificate for {site}: {reason}", site=name, reason=getattr(e, "reason", str(e))
            )
            return
        if certified is None:
            return
        why = check_usable(certified, watch.site.hosts, now)
        if why:
            self.log.warn("ignoring stored certificate for {site}: {reason}", site=name, reason=why)
            return
        self._install(watch, certified, "the store")
        # Someone else renewed: look again at the new certificate's schedule.
        if not watch.busy and watch.next_check is not None and watch.next_check > now:
            watch.next_check = min(watch.next_check, now + datetime.timedelta(seconds=self.poll_interval))

    def _poll_files(self, watch: _Watch, now: datetime.datetime) -> None:
        site = watch.site
        signature = FileSignature.of(site.cert, site.key)
        if signature == watch.signature:
            return
        watch.signature = signature
        try:
            certified = read_certificate_files(site.cert, site.key)
        except CertificateError as e:
            self.log.warn("ignoring {cert} for {site}: {reason}", cert=site.cert, site=site.name, reason=e.reason)
            return
        except OSError as e:
            self.log.warn("ignoring {cert} for {site}: {reason}", cert=site.cert, site=site.name, reason=e.strerror)
            return
        why = check_usable(certified, site.hosts, now)
        if why:
            self.log.warn("ignoring {cert} for {site}: {reason}", cert=site.cert, site=site.name, reason=why)
            return
        self._install(watch, certified, site.cert)

    def _poll_challenges(self) -> None:
        """Serve the answers a `tlsproxy renew`/`revoke` command published in the store.

        The two directories are read on every poll (they hold a handful of
        files at most): a directory's stat can miss a rewrite within one tick.
        """
        http = {t: k for t, k in self.store.challenges("http-01").items() if is_valid_token(t)}
        for token in self._store_http.keys() - http.keys():
            self.http01.remove(token)
        for token, keyauth in http.items():
            if self._store_http.get(token) != keyauth:
                self.http01.put(token, keyauth)
        self._store_http = http
        alpn = self.store.challenges("tls-alpn-01")
        for host in self._store_alpn.keys() - alpn.keys():
            self.alpn01.remove(host)
        for host, keyauth in alpn.items():
            if self._store_alpn.get(host) != keyauth:
                # A new answer for the same host (a retry) replaces the old one.
                self.alpn01.put(host, challenge_context(host, keyauth))
        self._store_alpn = alpn

    # -- renewal checks --------------------------------------------------------

    def _check_blocking(self, watch: _Watch) -> Outcome:
        account = FileSignature.of(self.store.account_key_path, self.store.registrations_path)
        if self._ca is None or account != self._ca_account:
            # first use, or `tlsproxy account rollover` changed the key: start afresh
            self._ca = self._ca_factory(self.config, self.store)
            self._ca_account = FileSignature.of(self.store.account_key_path, self.store.registrations_path)
        return renew_site(
            self.store,
            self._ca,
            site_request(self.config, watch.site),
            TableResponder(self.http01, self.alpn01),
            self.now,
            policy=self.policy,
            rand=watch.rand,
        )

    def _start_check(self, watch: _Watch) -> None:
        watch.busy = True
        self.log.info("checking the certificate of {site}", site=watch.site.name)
        d = self._jobs.run(self._run, self._check_blocking, watch)
        self._running_jobs.add(d)

        def done(outcome: Outcome) -> None:
            now = self.now()
            if self.metrics is not None and (outcome.renewed or outcome.error is not None):
                self.metrics.renewal_attempts.labels(watch.site.name).inc()
                if outcome.error is not None:
                    self.metrics.renewal_failures.labels(watch.site.name).inc()
            if outcome.certified is not None and check_usable(outcome.certified, watch.site.hosts, now) is None:
                self._install(watch, outcome.certified, "a renewal" if outcome.renewed else "the store")
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
            watch.next_check = due
            if outcome.error is None and not outcome.renewed:
                self.log.info(
                    "certificate of {site} not due for renewal; next check at {when}",
                    site=watch.site.name,
                    when=due.isoformat(timespec="seconds"),
                )

        def failed(failure: Failure) -> None:
            delay = backoff_delay(1, self.policy, self._rng.random())
            watch.next_check = self.now() + datetime.timedelta(seconds=delay)
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

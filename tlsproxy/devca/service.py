"""Serving leaves from the local CA: issue one per ``tls = "local"`` site and renew it in time."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence

from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from tlsproxy.certs.model import CertifiedKey
from tlsproxy.config import Site
from tlsproxy.devca.ca import LocalCA
from tlsproxy.devca.certificates import LEAF_LIFETIME, ignored_wildcards, renewal_time
from tlsproxy.tls.sni import SniServer

# Seconds before trying again when a leaf could not be issued.
RETRY_AFTER = 60.0


def utc_from_seconds(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


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

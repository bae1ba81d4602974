"""``tlsproxy certs | renew | revoke | account rollover``: synchronous, on the store directly.

No reactor runs here.  Results land in the store (state_dir, or the fleet's
Redis with ``[store] url``), where every running proxy sees them (stat
polling; Redis: its news channel, and polling) and swaps them in.  To be validated while a proxy holds
ports 80/443, challenge answers are published in the store
(``challenges/``), which the running proxy serves; the CA is told to look once
the proxy's listeners answer with them (:mod:`tlsproxy.acme.selfcheck`).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import TextIO

from cryptography.hazmat.primitives.asymmetric import ec

from tlsproxy.acme.client import REVOCATION_REASONS, AcmeError, CertificateAuthority
from tlsproxy.acme.issuer import ChallengeResponder, Outcome, StoreResponder, renew_site, window_of
from tlsproxy.acme.scheduler import renewal_time
from tlsproxy.acme.selfcheck import ListenerCheck
from tlsproxy.acme.service import default_ca_factory, site_request
from tlsproxy.acme.storage import open_store
from tlsproxy.certs.model import CertificateError, CertifiedKey
from tlsproxy.certs.store import SiteMeta, Store, StoreError, StoreUnavailable, read_certificate_files
from tlsproxy.config import Config, Site

CAFactory = Callable[[Config, Store], CertificateAuthority]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _store_responder(config: Config, store: Store, out: TextIO) -> StoreResponder:
    """Answers for the running proxy to serve; the CA is asked once the proxy's listeners serve them."""
    check = ListenerCheck(config.server.http, config.server.https)
    return StoreResponder(store, check=check, say=lambda message: out.write(f"note: {message}\n"))


def _when(value: datetime.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value is not None else "-"


def _find_site(config: Config, name: str, err: TextIO, want_acme: bool) -> Site | None:
    site = config.site_named(name)
    if site is None:
        names = ", ".join(h for s in config.sites for h in s.hosts) or "none configured"
        err.write(f"error: no site has the name {name!r} (names: {names})\n")
        return None
    if want_acme and site.tls != "acme":
        err.write(f"error: {site.name} gets its certificate from tls = {site.tls!r}, not ACME\n")
        return None
    return site


def _local_site(site: Site, out: TextIO, issuer: str) -> None:
    """A tls = "local" site: its leaves live in the running proxy's memory only, so say where they come from."""
    out.write(f"{site.name}\n")
    out.write(f"  hosts:        {', '.join(site.hosts)}\n")
    out.write("  source:       local (leaves issued in memory by the running proxy, never stored)\n")
    out.write(f"  issuer:       {issuer}\n")
    out.write("  next renewal: by the running proxy, a third of a leaf's 7 days before it ends\n")


def certs(config: Config, out: TextIO, *, local_issuer: Callable[[], str]) -> int:
    """One block per site: hosts, source, issuer, not-after, next renewal, last error.

    ``local_issuer()`` describes the dev CA behind ``tls = "local"`` sites; the
    command line passes it in, so this module needs no dev CA of its own.
    """
    store = open_store(config)
    now = _now()
    if store.shared:
        out.write(f"store: {store.describe()}\n")
    unreachable = False
    for site in config.sites:
        if site.tls == "local":
            _local_site(site, out, local_issuer())
            continue
        certified: CertifiedKey | None = None
        problem = ""
        next_renewal = "-"
        last_error = ""
        try:
            if site.tls == "files":
                certified = read_certificate_files(site.cert, site.key)
                next_renewal = "by whoever writes the files"
            else:
                try:
                    meta = store.load_meta(site.name)
                    certified = store.load_certificate(site.name)
                except StoreUnavailable:
                    unreachable = True
                    meta, certified = _local_copy(store, site.name)
                last_error = meta.last_error
                if meta.failures and meta.next_attempt is not None:
                    next_renewal = f"{_when(meta.next_attempt)} (retry {meta.failures})"
                elif certified is not None:
                    due = renewal_time(certified.not_before, certified.not_after, window_of(meta, certified), 0.5)
                    next_renewal = _when(max(due, now)) + (" (ARI window)" if window_of(meta, certified) else "")
                else:
                    next_renewal = "as soon as the proxy runs"
        except (CertificateError, OSError, StoreError) as e:
            problem = getattr(e, "reason", None) or str(e)
        out.write(f"{site.name}\n")
        out.write(f"  hosts:        {', '.join(site.hosts)}\n")
        out.write(f"  source:       {site.tls}\n")
        if certified is not None:
            out.write(f"  issuer:       {certified.leaf.issuer.rfc4514_string()}\n")
            out.write(f"  serial:       {certified.leaf.serial_number:x}\n")
            expired = " (EXPIRED)" if certified.not_after <= now else ""
            out.write(f"  not after:    {_when(certified.not_after)}{expired}\n")
        else:
            out.write(f"  certificate:  {problem or 'none yet'}\n")
        out.write(f"  next renewal: {next_renewal}\n")
        out.write(f"  last error:   {last_error or '-'}\n")
    if unreachable:
        out.write(
            f"store: UNREACHABLE: {store.problem() or 'no answer'}\n"
            "  (shown: this machine's copy in state_dir; renewals wait until the store is back)\n"
        )
        return 1
    return 0


def _local_copy(store: Store, name: str) -> tuple[SiteMeta, CertifiedKey | None]:
    """What this machine kept of a shared store's site: what it serves while the store is unreachable."""
    local = store.offline()
    return local.load_meta(name), local.load_certificate(name)


def _report(outcome: Outcome, out: TextIO, site: Site, err: TextIO) -> int:
    if outcome.error is not None:
        err.write(f"error: {site.name}: {outcome.error}; next attempt {_when(outcome.meta.next_attempt)}\n")
        return 1
    if outcome.renewed and outcome.certified is not None:
        out.write(
            f"{site.name}: new certificate, serial {outcome.certified.leaf.serial_number:x}, "
            f"not after {_when(outcome.certified.not_after)}\n"
        )
    elif outcome.certified is not None:
        out.write(f"{site.name}: not due (next check {_when(outcome.next_check)}); use --force to renew now\n")
    return 0


def renew(
    config: Config,
    name: str,
    force: bool,
    out: TextIO,
    *,
    ca_factory: CAFactory = default_ca_factory,
    responder: ChallengeResponder | None = None,
    err: TextIO | None = None,
) -> int:
    """Renew NAME's site if due (or ``force``); a running proxy serves the challenges and the result."""
    err = err or out
    site = _find_site(config, name, err, want_acme=True)
    if site is None:
        return 2
    store = open_store(config)
    try:
        ca = ca_factory(config, store)
        outcome = renew_site(
            store, ca, site_request(config, site), responder or _store_responder(config, store, out), _now, force=force
        )
    except (AcmeError, StoreError) as e:
        err.write(f"error: {site.name}: {e}\n")
        return 1
    return _report(outcome, out, site, err)


def revoke(
    config: Config,
    name: str,
    reason: str,
    out: TextIO,
    *,
    ca_factory: CAFactory = default_ca_factory,
    responder: ChallengeResponder | None = None,
    err: TextIO | None = None,
) -> int:
    """Revoke NAME's current certificate, then obtain a fresh one."""
    err = err or out
    if reason not in REVOCATION_REASONS:
        err.write(f"error: unknown reason {reason!r} (one of: {', '.join(REVOCATION_REASONS)})\n")
        return 2
    site = _find_site(config, name, err, want_acme=True)
    if site is None:
        return 2
    store = open_store(config)
    try:
        current = store.load_certificate(site.name)
    except CertificateError as e:
        err.write(f"error: {site.name}: the stored certificate cannot be read: {e.reason}\n")
        return 1
    if current is None:
        err.write(f"error: {site.name} has no stored certificate to revoke\n")
        return 1
    try:
        ca = ca_factory(config, store)
        ca.revoke(current.leaf, REVOCATION_REASONS[reason])
    except (AcmeError, StoreError) as e:
        err.write(f"error: revoking {site.name} (serial {current.leaf.serial_number:x}): {e}\n")
        return 1
    out.write(f"{site.name}: revoked serial {current.leaf.serial_number:x} ({reason}); obtaining a new certificate\n")
    try:
        outcome = renew_site(
            store, ca, site_request(config, site), responder or _store_responder(config, store, out), _now, force=True
        )
    except (AcmeError, StoreError) as e:
        err.write(f"error: {site.name}: {e}\n")
        return 1
    return _report(outcome, out, site, err)


def account_rollover(
    config: Config, out: TextIO, *, ca_factory: CAFactory = default_ca_factory, err: TextIO | None = None
) -> int:
    """Replace the account key (RFC 8555 key change); the account and its certificates stay."""
    err = err or out
    store = open_store(config)
    try:
        if store.load_account_key() is None:
            err.write(f"error: no ACME account in {store.describe()} yet (it is made with the first certificate)\n")
            return 1
        ca = ca_factory(config, store)
        url = ca.account()
        new_key = ec.generate_private_key(ec.SECP256R1())
        with store.locked(name="account"):
            # Kept beside the old key until the CA has switched, so a crash loses neither.
            store.stage_account_key(new_key)
            ca.rollover(new_key)
            store.save_account_key(new_key)
            store.stage_account_key(None)
            store.save_registration(config.acme.directory_url, url)
    except (AcmeError, StoreError) as e:
        err.write(f"error: account key rollover: {e}\n")
        return 1
    out.write(f"account {url}: key replaced (ECDSA P-256), saved in {store.describe()}\n")
    return 0

"""Getting a certificate: one order for all of a site's hosts, challenges answered, stored.

Everything here blocks and is meant for a thread (the service) or the command
line.  :func:`renew_site` is the one job both run: under the store lock it
re-reads the store (another process may have just renewed), refreshes ARI,
asks the scheduler whether to act, orders if so, and records the outcome
(success or the CA's error plus the next retry time) in the site's meta.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.logger import Logger

from tlsproxy.acme.alpn01 import challenge_context
from tlsproxy.acme.ari import AriError, cert_id
from tlsproxy.acme.client import AcmeError, Authorization, CertificateAuthority, Challenge
from tlsproxy.acme.scheduler import CertificateState, RenewalPolicy, Window, backoff_delay, decide, renewal_time
from tlsproxy.acme.selfcheck import Answer
from tlsproxy.certs.challenges import HTTP01Answers, TLSALPN01Answers
from tlsproxy.certs.model import CertificateError, CertifiedKey, PrivateKey
from tlsproxy.certs.store import SiteMeta, Store, StoreError

log = Logger()


class ChallengeResponder(Protocol):
    """Where challenge answers go so that the CA can find them."""

    def publish(self, kind: str, host: str, token: str, key_authorization: str) -> None: ...

    def withdraw(self, kind: str, host: str, token: str) -> None: ...

    def ready(self) -> None:
        """Called once everything is published, before the CA is told to look."""


def _call_here(f: Callable[..., object], *args: object) -> object:
    return f(*args)


class TableResponder:
    """Answers served by this process's own listeners, through the shared tables.

    The reactor reads the tables; ``in_reactor`` (the service's runs the call
    on the reactor thread and waits) makes every change there, so a renewal
    thread never writes them itself, and the answer is in place before the CA
    looks.
    The tls-alpn-01 certificate is made in the caller's thread.
    """

    def __init__(
        self,
        http01: HTTP01Answers,
        alpn01: TLSALPN01Answers,
        in_reactor: Callable[..., object] = _call_here,
    ) -> None:
        self.http01 = http01
        self.alpn01 = alpn01
        self._in_reactor = in_reactor

    def publish(self, kind: str, host: str, token: str, key_authorization: str) -> None:
        if kind == "http-01":
            self._in_reactor(self.http01.put, token, key_authorization)
        elif kind == "tls-alpn-01":
            self._in_reactor(self.alpn01.put, host, challenge_context(host, key_authorization))

    def withdraw(self, kind: str, host: str, token: str) -> None:
        if kind == "http-01":
            self._in_reactor(self.http01.remove, token)
        elif kind == "tls-alpn-01":
            self._in_reactor(self.alpn01.remove, host)

    def ready(self) -> None:
        pass


@runtime_checkable
class FleetAcks(Protocol):
    """A shared store where instances say they are up and which challenge answers they serve."""

    instance: str

    def heartbeat(self) -> None: ...

    def live_instances(self) -> set[str]: ...

    def ack_challenges(self, answers: list[tuple[str, str, str]]) -> None: ...

    def challenge_acks(self, kind: str, name: str, key_authorization: str) -> set[str]: ...


class FleetResponder:
    """Answers served by this process's listeners and, through the shared store, by every instance's.

    The CA may validate through any instance of a fleet (a load balancer picks
    one): each reads the store's answers when told of a change (pub/sub) and
    every poll, and says in the store that it serves them.  :meth:`ready`
    returns once every instance that is up said so, or after ``settle``
    seconds at most (naming those that did not): a busy instance delays the
    order a little, a lost one no more than that.
    """

    def __init__(
        self,
        here: ChallengeResponder,
        store: Store,
        settle: float,
        sleep: Callable[[float], None] = time.sleep,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.1,
    ) -> None:
        self.here = here
        self.store = store
        self.settle = settle
        self._sleep = sleep
        self._clock = clock
        self.interval = interval
        self._published: dict[tuple[str, str], tuple[str, str, str]] = {}
        self._others: set[str] = set()

    def publish(self, kind: str, host: str, token: str, key_authorization: str) -> None:
        self.here.publish(kind, host, token, key_authorization)
        name = token if kind == "http-01" else host
        self.store.publish_challenge(kind, name, key_authorization)
        self._published[(kind, host)] = (kind, name, key_authorization)

    def withdraw(self, kind: str, host: str, token: str) -> None:
        self.here.withdraw(kind, host, token)
        self._published.pop((kind, host), None)
        try:
            self.store.withdraw_challenge(kind, token if kind == "http-01" else host)
        except StoreError as e:  # the store forgets it by itself (a TTL); the order's own outcome matters more
            log.warn("cannot withdraw a challenge answer from the store: {error}", error=str(e))

    def ready(self) -> None:
        self.here.ready()
        if self.settle <= 0:
            return
        if not isinstance(self.store, FleetAcks) or not self._published:
            self._sleep(self.settle)
            return
        end = self._clock() + self.settle
        while True:
            try:
                missing = self.unconfirmed(self.store)
            except StoreError as e:  # the order itself will meet the same store: let it say so
                log.warn("cannot read which instances serve the challenge answers: {error}", error=str(e))
                return
            if not missing:
                log.info(
                    "the challenge answers are served by every instance that is up ({count} besides this one)",
                    count=len(self._others),
                )
                return
            if self._clock() >= end:
                log.warn(
                    "instance(s) {missing} did not say they serve the challenge answers within {settle:g}s; "
                    "asking the CA anyway",
                    missing=", ".join(sorted(missing)),
                    settle=self.settle,
                )
                return
            self._sleep(self.interval)

    def unconfirmed(self, acks: FleetAcks) -> set[str]:
        """The instances that are up and have not said they serve every answer published here."""
        others = self._others = acks.live_instances() - {acks.instance}
        missing: set[str] = set()
        for kind, name, key_authorization in self._published.values():
            missing |= others - acks.challenge_acks(kind, name, key_authorization)
        return missing


class StoreResponder:
    """Answers written to the store for a running proxy to serve (the command line's way).

    A running proxy reads the store's ``challenges/`` every couple of seconds.
    With a ``check`` (see :class:`tlsproxy.acme.selfcheck.ListenerCheck`),
    :meth:`ready` asks the proxy's listeners until each answer is served, and
    returns as soon as all are, or after ``patience`` seconds with some still
    not served (saying so): the CA then gives the final word.  For an answer
    the check can tell nothing about (no listener address, or nothing accepts
    connections there), it makes sure ``settle`` seconds have passed, as it
    does without a check.
    """

    def __init__(
        self,
        store: Store,
        settle: float = 3.0,
        sleep: Callable[[float], None] = time.sleep,
        *,
        check: Callable[[Answer], bool | None] | None = None,
        patience: float = 20.0,
        interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        say: Callable[[str], object] = lambda message: None,
    ) -> None:
        self.store = store
        self.settle = settle
        self._sleep = sleep
        self.check = check
        self.patience = patience
        self.interval = interval
        self._clock = clock
        self._say = say
        self._published: dict[tuple[str, str], Answer] = {}

    def publish(self, kind: str, host: str, token: str, key_authorization: str) -> None:
        self.store.publish_challenge(kind, token if kind == "http-01" else host, key_authorization)
        self._published[(kind, host)] = Answer(kind, host, token, key_authorization)

    def withdraw(self, kind: str, host: str, token: str) -> None:
        self.store.withdraw_challenge(kind, token if kind == "http-01" else host)
        self._published.pop((kind, host), None)

    def ready(self) -> None:
        answers = list(self._published.values())
        if self.check is None or not answers:
            self._settle()
            return
        start = self._clock()
        end = start + self.patience
        cannot_ask: dict[Answer, str] = {}  # nothing to ask about these: the settle time instead
        pending: dict[Answer, str] = dict.fromkeys(answers, "")
        first = True
        while pending:
            for answer in list(pending):
                if self._clock() >= end:
                    break  # out of time in the middle of a round: the rest stay pending
                served = self.check(answer)
                if served:
                    del pending[answer]
                elif served is None and first:
                    cannot_ask[answer] = self._why()
                    del pending[answer]
                else:
                    pending[answer] = self._why()
            first = False
            if not pending:
                break
            if self._clock() >= end:
                self._say(
                    f"the running proxy does not serve the answer for {_listing(pending)} "
                    f"after {self.patience:g}s; asking the CA anyway"
                )
                break
            self._sleep(self.interval)
        if cannot_ask:
            self._say(
                f"cannot ask the running proxy about {_listing(cannot_ask)}; waiting {self.settle:g}s for it instead"
            )
            left = self.settle - (self._clock() - start)
            if left > 0:
                self._sleep(left)

    def _why(self) -> str:
        return getattr(self.check, "last_error", "") or "no reason given"

    def _settle(self) -> None:
        if self.settle > 0:
            self._sleep(self.settle)


class SharedResponder:
    """Answers for every worker process: in this process's tables at once, and in the store for the others.

    With ``[server] workers``, one worker orders and the CA may reach any of
    them.  :meth:`ready` calls ``confirm``, which tells the other workers to
    read the store's ``challenges/`` and returns once each said it serves the
    answers (or after a bounded wait): no fixed pause that a loaded machine
    may outlast.
    """

    def __init__(
        self, table: ChallengeResponder, store: StoreResponder, confirm: Callable[[], object] = lambda: None
    ) -> None:
        self.table = table
        self.store = store
        self.confirm = confirm

    def publish(self, kind: str, host: str, token: str, key_authorization: str) -> None:
        self.table.publish(kind, host, token, key_authorization)
        self.store.publish(kind, host, token, key_authorization)

    def withdraw(self, kind: str, host: str, token: str) -> None:
        self.store.withdraw(kind, host, token)
        self.table.withdraw(kind, host, token)

    def ready(self) -> None:
        self.table.ready()
        self.confirm()


def _listing(reasons: dict[Answer, str]) -> str:
    """``a.example (http-01: 127.0.0.1:80 does not serve it yet), ...`` for messages."""
    return ", ".join(f"{a.host} ({a.kind}: {why})" if why else f"{a.host} ({a.kind})" for a, why in reasons.items())


class ValidationFailed(AcmeError):
    """The CA could not validate ``kind`` for a name."""

    def __init__(self, kind: str, host: str, detail: str) -> None:
        super().__init__(f"validating {host} with {kind}", detail or "the authorization is invalid", "unauthorized")
        self.kind = kind
        self.host = host


def new_private_key(key_type: str) -> PrivateKey:
    """A fresh certificate key: "ec256" (ECDSA P-256), "rsa2048" or "rsa3072"."""
    if key_type == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type in ("rsa2048", "rsa3072"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    raise ValueError(f"unknown key type {key_type!r}")


def make_csr(hosts: Sequence[str], key: PrivateKey) -> bytes:
    """DER CSR naming every host in subjectAltName (the first also as CN)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return csr.public_bytes(serialization.Encoding.DER)


def _choose(authz: Authorization, kinds: Sequence[str]) -> Challenge:
    for kind in kinds:
        challenge = authz.challenge(kind)
        if challenge is not None:
            return challenge
    offered = ", ".join(c.type for c in authz.challenges) or "none"
    raise AcmeError(
        f"validating {authz.identifier}",
        f"the CA offers {offered}; enabled: {', '.join(kinds)}",
        "unsupportedChallenge",
    )


def _issue_once(
    ca: CertificateAuthority,
    hosts: tuple[str, ...],
    key: PrivateKey,
    kinds: Sequence[str],
    responder: ChallengeResponder,
    profile: str,
    replaces: str,
) -> CertifiedKey:
    order = ca.new_order(hosts, profile=profile, replaces=replaces)
    authzs = [ca.authorization(url) for url in order.authorizations]
    chosen: list[tuple[Authorization, Challenge]] = []
    for authz in authzs:
        if authz.status == "valid":
            continue
        if authz.status != "pending":
            raise AcmeError(f"validating {authz.identifier}", f"authorization is {authz.status}", "unauthorized")
        chosen.append((authz, _choose(authz, kinds)))
    published: list[tuple[str, str, str]] = []
    try:
        for authz, challenge in chosen:
            responder.publish(challenge.type, authz.identifier, challenge.token, ca.key_authorization(challenge.token))
            published.append((challenge.type, authz.identifier, challenge.token))
        if chosen:
            responder.ready()
        for _authz, challenge in chosen:
            ca.answer(challenge)
        for authz, challenge in chosen:
            result = ca.wait_authorization(authz.url)
            if result.status != "valid":
                raise ValidationFailed(challenge.type, authz.identifier, result.error)
    finally:
        for kind, host, token in published:
            responder.withdraw(kind, host, token)
    chain_pem = ca.finalize(order, make_csr(hosts, key))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        certified = CertifiedKey.from_pem(chain_pem, key_pem, source=order.url or ca.directory_url)
    except CertificateError as e:
        raise AcmeError("checking the issued certificate", e.reason, "badCertificate") from None
    missing = certified.uncovered(hosts)
    if missing:
        raise AcmeError("checking the issued certificate", f"it does not cover {', '.join(missing)}", "badCertificate")
    return certified


def issue(
    ca: CertificateAuthority,
    hosts: tuple[str, ...],
    *,
    key_type: str = "ec256",
    challenges: Sequence[str] = ("http-01", "tls-alpn-01"),
    responder: ChallengeResponder,
    profile: str = "",
    replaces: str = "",
) -> CertifiedKey:
    """Order one certificate for all ``hosts``; if validation with one challenge type fails, try the next."""
    kinds = list(challenges)
    key = new_private_key(key_type)
    while True:
        try:
            return _issue_once(ca, hosts, key, kinds, responder, profile, replaces)
        except ValidationFailed as e:
            kinds.remove(e.kind)
            if not kinds:
                raise
            log.warn(
                "{kind} failed for {host} ({detail}); trying {next}",
                kind=e.kind,
                host=e.host,
                detail=e.detail,
                next=kinds[0],
            )


# ---------------------------------------------------------------------------
# One renewal check of one site


@dataclass(frozen=True)
class SiteRequest:
    """What to get a certificate for, and how."""

    name: str
    hosts: tuple[str, ...]
    key_type: str = "ec256"
    challenges: tuple[str, ...] = ("http-01", "tls-alpn-01")
    profile: str = ""


@dataclass(frozen=True)
class Outcome:
    """What :func:`renew_site` found or did."""

    certified: CertifiedKey | None
    meta: SiteMeta
    renewed: bool = False
    error: AcmeError | StoreError | None = None
    next_check: datetime.datetime | None = None
    unsaved: CertifiedKey | None = None  # issued, but the store could not take it: pass it to the next check


def window_of(meta: SiteMeta, certified: CertifiedKey | None) -> Window | None:
    """The stored ARI window, if it is for this certificate."""
    if certified is None or meta.ari_start is None or meta.ari_end is None:
        return None
    try:
        if meta.ari_cert_id != cert_id(certified.leaf):
            return None
    except AriError:
        return None
    return Window(meta.ari_start, meta.ari_end)


def state_of(meta: SiteMeta, certified: CertifiedKey | None) -> CertificateState:
    return CertificateState(
        not_before=certified.not_before if certified else None,
        not_after=certified.not_after if certified else None,
        window=window_of(meta, certified),
        next_attempt=meta.next_attempt,
        failures=meta.failures,
    )


def load_usable(store: Store, name: str, hosts: Sequence[str], now: datetime.datetime) -> CertifiedKey | None:
    """The stored certificate if it parses, matches its key, covers ``hosts`` and has not expired."""
    try:
        certified = store.load_certificate(name)
    except CertificateError as e:
        log.warn("stored certificate for {site} is unusable: {reason}", site=name, reason=e.reason)
        return None
    except OSError as e:
        log.warn("stored certificate for {site} cannot be read: {reason}", site=name, reason=e.strerror or str(e))
        return None
    if certified is None or certified.uncovered(hosts) or certified.not_after <= now:
        return None
    return certified


def _refresh_ari(ca: CertificateAuthority, meta: SiteMeta, certified: CertifiedKey, now: datetime.datetime) -> SiteMeta:
    try:
        ident = cert_id(certified.leaf)
    except AriError:
        return meta
    fresh = meta.ari_cert_id == ident and meta.ari_retry_after is not None and now < meta.ari_retry_after
    if fresh:
        return meta
    try:
        info = ca.renewal_info(certified.leaf)
    except AcmeError as e:
        log.warn("renewal information for {serial} unavailable: {error}", serial=ident, error=str(e))
        return meta
    if info is None:
        return meta
    return replace(
        meta, ari_cert_id=ident, ari_start=info.window.start, ari_end=info.window.end, ari_retry_after=info.retry_after
    )


def _failed(
    store: Store,
    request: SiteRequest,
    meta: SiteMeta,
    current: CertifiedKey | None,
    error: AcmeError | StoreError,
    at: datetime.datetime,
    policy: RenewalPolicy,
    rand: float,
    doing: str,
) -> Outcome:
    """Record a failed attempt (if the disk lets us) and when to try again, with backoff."""
    failures = meta.failures + 1
    delay = backoff_delay(failures, policy, rand, getattr(error, "retry_after", None))
    retry = at + datetime.timedelta(seconds=delay)
    meta = replace(meta, last_error=str(error), failures=failures, last_attempt=at, next_attempt=retry)
    try:
        store.save_meta(request.name, meta)
    except StoreError as e:
        log.warn("{error}", error=str(e))
    log.error(
        "{doing} a certificate for {hosts} failed: {error}; next attempt at {retry}",
        doing=doing,
        hosts=", ".join(request.hosts),
        error=str(error),
        retry=retry.isoformat(),
    )
    return Outcome(current, meta, error=error, next_check=retry)


def renew_site(
    store: Store,
    ca: CertificateAuthority,
    request: SiteRequest,
    responder: ChallengeResponder,
    now: Callable[[], datetime.datetime],
    *,
    force: bool = False,
    policy: RenewalPolicy = RenewalPolicy(),
    rand: float = 0.5,
    lock_timeout: float = 600.0,
    unsaved: CertifiedKey | None = None,
) -> Outcome:
    """Check one site under the store lock and order a certificate if it is due (or ``force``).

    ``unsaved`` is a certificate an earlier check got but could not store (a
    full disk): it is stored now instead of ordering again, which would spend
    the CA's duplicate-certificate limit.
    """
    # One lock per certificate: across a fleet, one order for it at a time.
    with store.locked(timeout=lock_timeout, name=request.name):
        store.tidy(request.name)  # what an interrupted write left behind
        at = now()
        meta = store.load_meta(request.name)
        current = load_usable(store, request.name, request.hosts, at)
        if (
            unsaved is not None
            and check_issued(unsaved, request.hosts, at) is None
            and (current is None or unsaved.not_after > current.not_after)
        ):
            log.info("storing the certificate for {hosts} got earlier", hosts=", ".join(request.hosts))
            return _store_issued(store, request, meta, unsaved, now(), policy, rand)
        try:
            ari = current is not None and ca.supports_ari()
        except AcmeError as e:  # the CA is unreachable: decide without ARI; ordering will record the error
            log.warn("cannot reach the CA for renewal information: {error}", error=str(e))
            ari = False
        if ari and current is not None:
            meta = _refresh_ari(ca, meta, current, at)
        decision = decide(at, state_of(meta, current), policy, rand)
        if not (force or meta.renew_requested or decision.renew):
            meta = replace(meta, next_attempt=decision.at)
            try:
                store.save_meta(request.name, meta)
            except StoreError as e:  # only the record of this check is lost; the certificate is fine
                log.warn("{error}", error=str(e))
            return Outcome(current, meta, next_check=decision.at)
        replaces = ""
        if ari and current is not None:
            try:
                replaces = cert_id(current.leaf)
            except AriError:
                pass
        log.info(
            "ordering a certificate for {hosts} ({reason})",
            hosts=", ".join(request.hosts),
            reason="forced" if force or meta.renew_requested else decision.reason,
        )
        try:
            certified = issue(
                ca,
                request.hosts,
                key_type=request.key_type,
                challenges=request.challenges,
                responder=responder,
                profile=request.profile,
                replaces=replaces,
            )
        except AcmeError as e:
            return _failed(store, request, meta, current, e, now(), policy, rand, "ordering")
        return _store_issued(store, request, meta, certified, now(), policy, rand)


def check_issued(certified: CertifiedKey, hosts: Sequence[str], at: datetime.datetime) -> str | None:
    """Why an issued certificate cannot be stored for ``hosts`` now, or None."""
    if certified.uncovered(hosts):
        return "it does not cover every host"
    if certified.not_after <= at:
        return "it has expired"
    return None


def _store_issued(
    store: Store,
    request: SiteRequest,
    meta: SiteMeta,
    certified: CertifiedKey,
    at: datetime.datetime,
    policy: RenewalPolicy,
    rand: float,
) -> Outcome:
    """Store a newly issued certificate; if the store fails, the outcome keeps it for the next check."""
    fresh = SiteMeta(hosts=request.hosts, last_attempt=at).describe_certificate(certified)
    due = renewal_time(certified.not_before, certified.not_after, None, rand)
    try:
        saved = store.save_certificate(request.name, certified, replace(fresh, next_attempt=due))
    except StoreError as e:
        # The old pair (or, if only meta.json failed, the new one) is what the store holds.
        stored = load_usable(store, request.name, request.hosts, at)
        outcome = _failed(store, request, meta, stored, e, at, policy, rand, "storing")
        if stored is None or stored.leaf.serial_number != certified.leaf.serial_number:
            outcome = replace(outcome, unsaved=certified)
        return outcome
    log.info(
        "certificate for {hosts} stored: serial {serial}, not after {not_after}",
        hosts=", ".join(request.hosts),
        serial=saved.serial,
        not_after=certified.not_after.isoformat(),
    )
    return Outcome(certified, saved, renewed=True, next_check=due)

"""When to renew a certificate and when to try again: pure functions over plain values.

* With ACME Renewal Information (RFC 9773) the renewal time is a random point
  inside the CA's suggested window (a window already past means "now").
* Without it, renew when a third of the lifetime is left (half, for
  certificates shorter than ten days).
* Checks happen at least every ``check_interval`` (12 hours) with jitter, so a
  fleet restarted together does not hit the CA together, and so a newly
  published ARI window is seen in time.
* A failed attempt is retried after about 1 minute, 10 minutes, 100 minutes,
  then every few hours; a CA's ``Retry-After`` is honoured when it asks for
  longer.

Randomness comes in as a number in [0, 1) so tests choose it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

SHORT_LIFETIME = datetime.timedelta(days=10)


@dataclass(frozen=True)
class RenewalPolicy:
    """The knobs of renewal timing; the defaults are what the issue asks for."""

    check_interval: float = 12 * 3600.0
    jitter: float = 0.1
    backoff: tuple[float, ...] = (60.0, 600.0, 6000.0)
    backoff_cap: float = 4 * 3600.0
    backoff_jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.check_interval <= 0 or not 0 <= self.jitter < 1 or not 0 <= self.backoff_jitter < 1:
            raise ValueError("check_interval must be positive and jitter in [0, 1)")


@dataclass(frozen=True)
class Window:
    """A CA's suggested renewal window (RFC 9773 section 4.2)."""

    start: datetime.datetime
    end: datetime.datetime

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError("a renewal window ends before it starts")


def lifetime_renewal_time(not_before: datetime.datetime, not_after: datetime.datetime) -> datetime.datetime:
    """When a third (half, for lifetimes under ten days) of the lifetime is left."""
    lifetime = not_after - not_before
    left = lifetime / 2 if lifetime < SHORT_LIFETIME else lifetime / 3
    return not_after - left


def renewal_time(
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    window: Window | None,
    rand: float,
) -> datetime.datetime:
    """When this certificate should be renewed (``rand`` in [0, 1) picks the point in an ARI window)."""
    if window is not None:
        return window.start + (window.end - window.start) * rand
    return lifetime_renewal_time(not_before, not_after)


def next_check(now: datetime.datetime, due: datetime.datetime, policy: RenewalPolicy, rand: float) -> datetime.datetime:
    """The next time to look at a certificate: its renewal time or the periodic check, whichever is first."""
    spread = policy.check_interval * policy.jitter
    periodic = now + datetime.timedelta(seconds=policy.check_interval - spread + 2 * spread * rand)
    return max(now, min(due, periodic))


def backoff_delay(failures: int, policy: RenewalPolicy, rand: float, retry_after: float | None = None) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure (1 = the first)."""
    if failures < 1:
        raise ValueError("backoff is for after a failure")
    steps = policy.backoff
    base = steps[failures - 1] if failures <= len(steps) else policy.backoff_cap
    delay = base * (1 - policy.backoff_jitter + 2 * policy.backoff_jitter * rand)
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return delay


@dataclass(frozen=True)
class CertificateState:
    """What the scheduler needs to know about one site's certificate."""

    not_before: datetime.datetime | None = None
    not_after: datetime.datetime | None = None
    window: Window | None = None
    next_attempt: datetime.datetime | None = None
    failures: int = 0


@dataclass(frozen=True)
class Decision:
    """``renew`` now, or look again ``at``."""

    renew: bool
    at: datetime.datetime
    reason: str


def decide(now: datetime.datetime, state: CertificateState, policy: RenewalPolicy, rand: float) -> Decision:
    """Renew now, or when to look again.

    A pending retry time (after failures) is respected even when the certificate
    is due, so a failing CA is not hammered; a missing or expired certificate
    is ordered at once unless a retry time is pending.
    """
    if state.next_attempt is not None and state.failures and now < state.next_attempt:
        return Decision(False, state.next_attempt, "waiting to retry after a failure")
    if state.not_after is None or state.not_before is None:
        return Decision(True, now, "no certificate")
    if state.not_after <= now:
        return Decision(True, now, "expired")
    due = renewal_time(state.not_before, state.not_after, state.window, rand)
    if due <= now:
        return Decision(True, now, "inside the ARI window" if state.window else "renewal time reached")
    return Decision(False, next_check(now, due, policy, rand), "not due")

"""Renewal timing: ARI window, the 1/3 (or 1/2) rule, periodic checks with jitter, backoff."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsproxy.acme.ari import AriError, parse_renewal_info, parse_retry_after
from tlsproxy.acme.scheduler import (
    CertificateState,
    RenewalPolicy,
    Window,
    backoff_delay,
    decide,
    lifetime_renewal_time,
    next_check,
    renewal_time,
)

T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
D = datetime.timedelta(days=1)
P = RenewalPolicy()


def test_third_of_lifetime_left() -> None:
    """A 90-day certificate is due at day 60."""
    assert lifetime_renewal_time(T0, T0 + 90 * D) == T0 + 60 * D


def test_half_for_short_lifetimes() -> None:
    """A 6-day certificate is due at day 3 (half left)."""
    assert lifetime_renewal_time(T0, T0 + 6 * D) == T0 + 3 * D


def test_ari_window_overrides_lifetime() -> None:
    """With an ARI window the renewal time is the chosen point inside the window."""
    w = Window(T0 + 10 * D, T0 + 12 * D)
    assert renewal_time(T0, T0 + 90 * D, w, 0.0) == T0 + 10 * D
    assert renewal_time(T0, T0 + 90 * D, w, 0.5) == T0 + 11 * D


@given(st.floats(min_value=0, max_value=0.999999))
def test_periodic_check_within_jitter(rand: float) -> None:
    """The periodic check is 12 h +- 10 %, never later than the renewal time, never in the past."""
    at = next_check(T0, T0 + 30 * D, P, rand)
    assert T0 + datetime.timedelta(hours=10.8) <= at <= T0 + datetime.timedelta(hours=13.2)
    assert next_check(T0, T0 + datetime.timedelta(hours=1), P, rand) == T0 + datetime.timedelta(hours=1)
    assert next_check(T0, T0 - D, P, rand) == T0


def test_backoff_steps() -> None:
    """Failures back off 1 min, 10 min, 100 min, then every 4 hours (rand 0.5 = no jitter)."""
    assert [backoff_delay(n, P, 0.5) for n in (1, 2, 3, 4, 9)] == [60, 600, 6000, 14400, 14400]


@given(st.integers(min_value=1, max_value=50), st.floats(min_value=0, max_value=0.999999))
def test_backoff_jitter_bounds(n: int, rand: float) -> None:
    """Jitter keeps each backoff within 10 % of its step."""
    base = P.backoff[n - 1] if n <= len(P.backoff) else P.backoff_cap
    assert base * 0.9 <= backoff_delay(n, P, rand) <= base * 1.1


def test_retry_after_wins_when_longer() -> None:
    """Retry-After longer than the backoff is honoured; shorter is not."""
    assert backoff_delay(1, P, 0.5, retry_after=3600) == 3600
    assert backoff_delay(2, P, 0.5, retry_after=5) == 600


def test_decide_no_cert_orders_now() -> None:
    """No certificate: order now."""
    assert decide(T0, CertificateState(), P, 0.5).renew


def test_decide_waits_for_pending_retry() -> None:
    """After a failure the pending retry time is respected even though a certificate is missing."""
    d = decide(T0, CertificateState(next_attempt=T0 + D, failures=2), P, 0.5)
    assert not d.renew and d.at == T0 + D


def test_decide_due_and_not_due() -> None:
    """Due at 2/3 of the lifetime; before that the next look is at most a check interval away."""
    state = CertificateState(not_before=T0, not_after=T0 + 90 * D)
    assert not decide(T0 + 59 * D, state, P, 0.5).renew
    assert decide(T0 + 60 * D, state, P, 0.5).renew
    assert decide(T0 + 91 * D, state, P, 0.5).reason == "expired"


def test_decide_ari_window_past_means_now() -> None:
    """A window that already passed (e.g. the CA wants a revoked cert replaced) means renew now."""
    state = CertificateState(not_before=T0, not_after=T0 + 90 * D, window=Window(T0 - 2 * D, T0 - D))
    assert decide(T0 + D, state, P, 0.9).renew


def test_parse_renewal_info() -> None:
    """renewalInfo bodies parse; Retry-After is clamped; malformed bodies raise AriError."""
    body = {"suggestedWindow": {"start": "2025-01-10T00:00:00Z", "end": "2025-01-11T00:00:00Z"}}
    info = parse_renewal_info(body, "21600", T0)
    assert info.window.start == T0 + 9 * D and info.retry_after == T0 + datetime.timedelta(hours=6)
    assert parse_renewal_info(body, "1", T0).retry_after == T0 + datetime.timedelta(minutes=1)
    assert parse_renewal_info(body, None, T0).retry_after == T0 + datetime.timedelta(hours=6)
    for bad in (
        {},
        {"suggestedWindow": {"start": "x", "end": "y"}},
        {"suggestedWindow": {"start": "2025-01-11T00:00:00Z", "end": "2025-01-10T00:00:00Z"}},
    ):
        with pytest.raises(AriError):
            parse_renewal_info(bad, None, T0)


def test_parse_retry_after_http_date() -> None:
    """Retry-After as an HTTP date is understood."""
    assert parse_retry_after("Wed, 01 Jan 2025 01:00:00 GMT", T0) == T0 + datetime.timedelta(hours=1)
    assert parse_retry_after("soon", T0) is None

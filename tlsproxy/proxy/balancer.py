"""Several upstreams behind one site or route: which one gets a request, and which are down.

An :class:`UpstreamGroup` sits above the per-address keep-alive pools of
upstream.py.  It picks a member (least connections, with round robin among
equals, or plain round robin), keeps what it learns of each member's health
(failed connects, passive; health checks, active: see health.py), and answers
the one question the proxy asks when an attempt failed: may this request go to
the next member?  Time comes from an injected clock, so all of it is tested
without a network.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from tlsproxy.config import Balancing, Upstream
from tlsproxy.proxy.upstream import UpstreamPool

# Methods a request may be sent twice with (RFC 9110 9.2.2): their effect is
# the same however often the app sees them.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def may_retry(*, reached_app: bool, method: bytes, body_replayable: bool) -> bool:
    """Whether a failed attempt may be repeated on another member (or connection).

    A request that never reached the app (the connect failed) may always go
    elsewhere: nothing was sent, not even a byte of a streamed body.  One that
    was sent and then lost (the app closed without answering) may have done
    its work already, so only an idempotent method is sent again, and only
    when its body can be sent again whole: one held by request buffering (or
    no body), never a streamed one whose bytes are gone.
    """
    if not reached_app:
        return True
    return method in IDEMPOTENT and body_replayable


@dataclass(eq=False)  # each member is itself: compared and hashed by identity
class Member:
    """One upstream of a group: its pool, and what the group knows of its health."""

    upstream: Upstream
    pool: UpstreamPool
    # Requests in flight, in a cell that a later generation's member of the same
    # address shares (SIGHUP): requests from before a reload still count for least_conn.
    load: list[int] = field(default_factory=lambda: [0], repr=False)
    failures: int = 0  # passive failures counted in the current window
    window_start: float = 0.0
    down_until: float = 0.0  # passive: out until then
    check_failed: bool = False  # active: the last health check failed
    failed_total: int = 0  # for /metrics
    last_error: str = ""

    @property
    def url(self) -> str:
        return self.upstream.url

    @property
    def in_flight(self) -> int:
        return self.load[0]

    @in_flight.setter
    def in_flight(self, count: int) -> None:
        self.load[0] = count

    def available(self, now: float) -> bool:
        return not self.check_failed and self.down_until <= now

    def adopt(self, old: Member) -> None:
        """Take over what an earlier generation's member of the same address knew (SIGHUP)."""
        self.load = old.load
        self.failures = old.failures
        self.window_start = old.window_start
        self.down_until = old.down_until
        self.check_failed = old.check_failed
        self.failed_total = old.failed_total
        self.last_error = old.last_error


@dataclass(frozen=True)
class MemberState:
    """One member as /readyz and /metrics show it."""

    site: str
    route: str  # the [site.routes] prefix, "" for the site's own upstreams
    url: str
    up: bool
    in_flight: int
    failures: int
    why: str  # why it is down ("" when up)


class UpstreamGroup:
    """The upstreams of one site (or one of its routes), and the choice among them."""

    log = Logger()

    def __init__(
        self, clock: Any, members: Sequence[Member], balancing: Balancing, site: str = "", route: str = ""
    ) -> None:
        self.clock = clock
        self.members = list(members)
        self.balancing = balancing
        self.site = site
        self.route = route
        self._next = 0  # where the rotation continues
        # The member of a one-member group (the common case), read per request
        # so that it skips choose(); None for a group of several.
        self.lone: Member | None = self.members[0] if len(self.members) == 1 else None
        # Members a reload removed, shown while requests they took before it run on.
        self.draining: list[Member] = []

    @property
    def single(self) -> bool:
        return len(self.members) == 1

    def choose(self, tried: Collection[Member] = ()) -> Member | None:
        """The member for the next attempt, or None when every one is down or tried already."""
        now = self.clock.seconds()
        members = self.members
        count = len(members)
        if count == 1:  # the common case: one app server
            member = members[0]
            return member if member not in tried and member.available(now) else None
        least = self.balancing.balance == "least_conn"
        best: Member | None = None
        best_at = 0
        for step in range(count):
            at = (self._next + step) % count
            member = members[at]
            if member in tried or not member.available(now):
                continue
            if best is None or (least and member.in_flight < best.in_flight):
                best, best_at = member, at
                if not least:
                    break
        if best is not None:
            self._next = (best_at + 1) % count
        return best

    def retry_after(self) -> int:
        """Whole seconds until a passively marked member may be tried again (for Retry-After)."""
        now = self.clock.seconds()
        waits = [m.down_until - now for m in self.members if not m.check_failed and m.down_until > now]
        return max(1, math.ceil(min(waits))) if waits else max(1, math.ceil(self.balancing.health_interval))

    # -- passive health ---------------------------------------------------------

    def failed(self, member: Member, detail: str) -> None:
        """A connect to ``member`` failed (or it closed without answering): perhaps take it out.

        As nginx's max_fails and fail_timeout: ``max_fails`` failures within
        ``fail_timeout`` seconds take the member out for ``fail_timeout``
        seconds.  A lone upstream is never taken out: there is nowhere else to
        go, and a restarting app should be tried again at once.
        """
        member.failed_total += 1
        member.last_error = detail
        balancing = self.balancing
        if self.single or balancing.max_fails == 0:
            return
        now = self.clock.seconds()
        if member.failures and now - member.window_start > balancing.fail_timeout:
            member.failures = 0
        if not member.failures:
            member.window_start = now
        member.failures += 1
        if member.failures >= balancing.max_fails:
            member.failures = 0
            member.down_until = now + balancing.fail_timeout
            self.log.warn(
                "{where}: upstream {upstream} out for {seconds:g}s: {detail}",
                where=self.describe(),
                upstream=member.url,
                seconds=balancing.fail_timeout,
                detail=detail,
            )

    def succeeded(self, member: Member) -> None:
        """A connect to ``member`` worked: its failures are forgiven."""
        member.failures = 0
        if member.down_until:
            member.down_until = 0.0
            self.log.info("{where}: upstream {upstream} is back", where=self.describe(), upstream=member.url)

    # -- active health (health.py reports here) --------------------------------

    def check_result(self, member: Member, why: str | None) -> None:
        """A health check passed (``why`` is None) or failed: take the member out or bring it back."""
        if why is None:
            if member.check_failed or member.down_until:
                self.log.info(
                    "{where}: upstream {upstream} passes its health check, back in",
                    where=self.describe(),
                    upstream=member.url,
                )
            member.check_failed = False
            member.down_until = 0.0
            member.failures = 0
            return
        member.last_error = why
        if not member.check_failed:
            member.failed_total += 1
            self.log.warn(
                "{where}: upstream {upstream} fails its health check, taken out: {why}",
                where=self.describe(),
                upstream=member.url,
                why=why,
            )
        member.check_failed = True

    # -- what is shown ----------------------------------------------------------

    def describe(self) -> str:
        return f"site {self.site}" + (f" route {self.route}" if self.route else "")

    def states(self) -> list[MemberState]:
        now = self.clock.seconds()
        out = []
        for member in self.members:
            up = member.available(now)
            why = ""
            if member.check_failed:
                why = f"health check failed: {member.last_error}"
            elif not up:
                why = f"{member.last_error} (tried again in {math.ceil(member.down_until - now)}s)"
            out.append(MemberState(self.site, self.route, member.url, up, member.in_flight, member.failed_total, why))
        for member in self.draining:
            if member.in_flight:
                why = "draining: removed by a reload"
                out.append(MemberState(self.site, self.route, member.url, False, member.in_flight, 0, why))
        return out

    def adopt(self, old: UpstreamGroup) -> None:
        """Keep the health an earlier generation's group learned, for the addresses both have."""
        known = {m.url: m for m in old.members}
        for member in self.members:
            if member.url in known:
                member.adopt(known.pop(member.url))
        self.draining = [m for m in (*known.values(), *old.draining) if m.in_flight]

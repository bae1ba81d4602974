"""Choosing among several upstreams, passive and active health, and when a request may be retried."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.config import Balancing, parse_upstream
from tlsproxy.proxy.balancer import Member, UpstreamGroup, may_retry
from tlsproxy.proxy.upstream import UpstreamPool


def group(clock: Clock, count: int = 3, **balancing: object) -> UpstreamGroup:
    members = []
    for i in range(count):
        upstream = parse_upstream(f"http://10.0.0.{i + 1}:8000")
        assert not isinstance(upstream, str)
        members.append(Member(upstream, UpstreamPool(clock, upstream, 5.0)))
    return UpstreamGroup(clock, members, Balancing(**balancing), "shop.example")  # type: ignore[arg-type]


def urls(members: list[Member | None]) -> list[str]:
    return [m.url if m is not None else "-" for m in members]


class SelectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_round_robin_takes_each_in_turn_whatever_is_in_flight(self) -> None:
        """round_robin: 1, 2, 3, 1, ... even when the next one is the busiest."""
        g = group(self.clock, balance="round_robin")
        g.members[1].in_flight = 5
        self.assertEqual(
            urls([g.choose() for _ in range(4)]),
            ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000", "http://10.0.0.1:8000"],
        )

    def test_least_conn_is_the_default_and_avoids_the_busy_upstream(self) -> None:
        """By default the member with the fewest requests in flight gets the next one."""
        g = group(self.clock)
        self.assertEqual(g.balancing.balance, "least_conn")
        g.members[0].in_flight = 2
        g.members[1].in_flight = 1
        g.members[2].in_flight = 3
        self.assertEqual(g.choose(), g.members[1])

    def test_least_conn_rotates_among_equals(self) -> None:
        """With equal loads, least_conn spreads requests as round robin does (not all to the first)."""
        g = group(self.clock)
        chosen = []
        for _ in range(6):
            member = g.choose()
            assert member is not None
            chosen.append(member.url[-6])  # the last digit of the address
        self.assertEqual(chosen, ["1", "2", "3", "1", "2", "3"])

    def test_tried_members_are_skipped_and_none_left_is_none(self) -> None:
        """A request never goes twice to an upstream it failed on; when all are tried there is none."""
        g = group(self.clock, count=2)
        first = g.choose()
        assert first is not None
        second = g.choose([first])
        self.assertIsNot(second, first)
        self.assertIsNone(g.choose([first, second]))  # type: ignore[list-item]


class PassiveHealthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_failed_connect_takes_the_upstream_out_for_fail_timeout(self) -> None:
        """max_fails = 1 (default): one failure takes it out for fail_timeout seconds, then it is tried again."""
        g = group(self.clock, count=2, fail_timeout=10.0)
        bad = g.members[0]
        g.failed(bad, "cannot connect: refused")
        self.assertFalse(bad.available(self.clock.seconds()))
        self.assertEqual({g.choose() for _ in range(4)}, {g.members[1]})
        self.assertEqual(g.retry_after(), 10)
        self.clock.advance(9.5)
        self.assertEqual(g.retry_after(), 1)
        self.assertNotIn(bad, {g.choose() for _ in range(4)})
        self.clock.advance(0.5)
        self.assertIn(bad, {g.choose() for _ in range(4)})
        states = {s.url: s for s in g.states()}
        self.assertTrue(states[bad.url].up)
        self.assertEqual(states[bad.url].failures, 1)

    def test_max_fails_counts_within_the_window_only(self) -> None:
        """max_fails = 3: failures spread wider than fail_timeout never add up to taking it out."""
        g = group(self.clock, count=2, max_fails=3, fail_timeout=10.0)
        bad = g.members[0]
        for _ in range(2):
            g.failed(bad, "refused")
            self.clock.advance(6)
        g.failed(bad, "refused")  # 12 s after the first: a new window
        self.assertTrue(bad.available(self.clock.seconds()))
        g.failed(bad, "refused")
        g.failed(bad, "refused")
        self.assertFalse(bad.available(self.clock.seconds()))

    def test_success_forgives_failures(self) -> None:
        """A connect that works resets the count, so max_fails means failures in a row."""
        g = group(self.clock, count=2, max_fails=2)
        bad = g.members[0]
        g.failed(bad, "refused")
        g.succeeded(bad)
        g.failed(bad, "refused")
        self.assertTrue(bad.available(self.clock.seconds()))

    def test_max_fails_zero_never_takes_out(self) -> None:
        """max_fails = 0 turns passive marking off, as in nginx."""
        g = group(self.clock, count=2, max_fails=0)
        for _ in range(5):
            g.failed(g.members[0], "refused")
        self.assertTrue(g.members[0].available(self.clock.seconds()))

    def test_a_lone_upstream_is_never_taken_out(self) -> None:
        """With one upstream there is nowhere else to go: a restarting app is tried again at once."""
        g = group(self.clock, count=1)
        g.failed(g.members[0], "refused")
        self.assertIs(g.choose(), g.members[0])

    def test_all_down_chooses_none(self) -> None:
        """When every upstream is out, there is no member to choose (the proxy answers 503 at once)."""
        g = group(self.clock, count=2)
        for member in g.members:
            g.failed(member, "refused")
        self.assertIsNone(g.choose())
        self.assertEqual([s.up for s in g.states()], [False, False])
        self.assertIn("refused", g.states()[0].why)


class ActiveHealthTests(SynchronousTestCase):
    def test_failed_check_takes_out_until_a_check_passes(self) -> None:
        """A failing health check takes the member out for as long as it fails; a passing one brings it back."""
        clock = Clock()
        g = group(clock, count=2)
        bad = g.members[0]
        g.check_result(bad, "GET /health answered 500")
        clock.advance(3600)
        self.assertFalse(bad.available(clock.seconds()), "not back by time alone")
        self.assertIn("500", g.states()[0].why)
        g.check_result(bad, None)
        self.assertTrue(bad.available(clock.seconds()))

    def test_passing_check_clears_passive_marking(self) -> None:
        """An upstream marked down by a failed connect is back as soon as a health check passes."""
        clock = Clock()
        g = group(clock, count=2)
        g.failed(g.members[0], "refused")
        g.check_result(g.members[0], None)
        self.assertTrue(g.members[0].available(clock.seconds()))

    def test_health_status_classes_and_codes(self) -> None:
        """health_status takes classes ("2xx") and exact codes ("418")."""
        self.assertTrue(Balancing().healthy_status(302))
        self.assertFalse(Balancing().healthy_status(500))
        only = Balancing(health_status=("200", "418"))
        self.assertEqual([only.healthy_status(s) for s in (200, 204, 418)], [True, False, True])


class ReloadTests(SynchronousTestCase):
    def test_new_group_keeps_what_the_old_one_knew(self) -> None:
        """After SIGHUP an upstream that stays keeps its state (down stays down); a new one starts up."""
        clock = Clock()
        old = group(clock, count=2)
        old.failed(old.members[0], "refused")
        old.check_result(old.members[1], "answered 503")
        new = group(clock, count=3)
        new.adopt(old)
        self.assertEqual([m.available(clock.seconds()) for m in new.members], [False, False, True])


class RetryRuleTests(SynchronousTestCase):
    def test_retry_rules(self) -> None:
        """Never reached the app: always retried; reached it: only idempotent methods with a replayable body."""
        self.assertTrue(may_retry(reached_app=False, method=b"POST", body_replayable=False))
        self.assertTrue(may_retry(reached_app=True, method=b"GET", body_replayable=True))
        self.assertTrue(may_retry(reached_app=True, method=b"PUT", body_replayable=True))
        self.assertFalse(may_retry(reached_app=True, method=b"PUT", body_replayable=False))
        self.assertFalse(may_retry(reached_app=True, method=b"POST", body_replayable=True))
        self.assertFalse(may_retry(reached_app=True, method=b"PATCH", body_replayable=True))

"""Access control: path matching as the app routes, allow/deny, basic auth with bcrypt off the reactor."""

from __future__ import annotations

import base64
import ipaddress
import subprocess
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_proxy_handler import FakeExchange, head
from tlsproxy.config import AccessRule, BasicAuth, ConfigError, Server, Site, parse_upstream
from tlsproxy.proxy import access
from tlsproxy.proxy.access import (
    GuessLimit,
    HtpasswdError,
    Verifier,
    address_allowed,
    basic_credentials,
    client_key,
    load_all,
    parse_htpasswd,
    request_path,
    rule_for,
)
from tlsproxy.proxy.handler import ProxyHandler

# Cost 4: the lowest bcrypt allows, so the tests stay fast.
HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4))


def nets(*items: str) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(i) for i in items)


@pytest.mark.parametrize(
    ("target", "path"),
    [
        (b"/admin/", b"/admin/"),
        (b"/admin/x?y=1", b"/admin/x"),
        (b"/%61dmin/", b"/admin/"),
        (b"/%2561dmin/", b"/admin/"),
        (b"/static/../admin/", b"/admin/"),
        (b"/static/%2e%2e/admin/", b"/admin/"),
        (b"//admin//users", b"/admin/users"),
        (b"/./admin/.", b"/admin/"),
        (b"/../../admin", b"/admin"),
        (b"http://app.test/admin/?q", b"/admin/"),
        (b"*", b"/"),
        (b"/a%2Fb", b"/a/b"),
        (b"/", b"/"),
    ],
)
def test_request_path_is_what_the_app_routes(target: bytes, path: bytes) -> None:
    """Encodings, dot segments and doubled slashes cannot walk around a prefix rule."""
    assert request_path(target) == path


@given(st.binary(max_size=80))
def test_request_path_is_normal(target: bytes) -> None:
    """Whatever the target, the path is absolute, without dot or empty segments, and stable."""
    path = request_path(target)
    assert path.startswith(b"/")
    assert b"//" not in path and b"/./" not in path and b"/../" not in path
    if b"%" not in path:
        assert request_path(path) == path


def test_rule_for_longest_prefix_and_bare_name() -> None:
    """The longest prefix wins; /admin falls under /admin/ (an app may answer both)."""
    rules = (AccessRule(prefix="/admin/api/"), AccessRule(prefix="/admin/", allow=nets("10.0.0.0/8")), AccessRule())
    assert rule_for(rules, b"/admin/api/x") is rules[0]
    assert rule_for(rules, b"/admin/users") is rules[1]
    assert rule_for(rules, b"/admin") is rules[1]
    assert rule_for(rules, b"/administrator") is rules[2]
    assert rule_for(rules[:2], b"/public") is None


def test_deny_wins_over_allow() -> None:
    """An address in both lists is refused; an empty allow list lets the rest in."""
    rule = AccessRule(allow=nets("192.0.2.0/24"), deny=nets("192.0.2.66/32"))
    assert address_allowed(rule, "192.0.2.5")
    assert not address_allowed(rule, "192.0.2.66")
    assert not address_allowed(rule, "198.51.100.1")
    only_deny = AccessRule(deny=nets("198.51.100.0/24"))
    assert address_allowed(only_deny, "203.0.113.1") and not address_allowed(only_deny, "198.51.100.9")
    assert address_allowed(AccessRule(allow=nets("192.0.2.0/24")), "::ffff:192.0.2.9")
    assert not address_allowed(AccessRule(allow=nets("::/0")), "192.0.2.9")  # v6 ranges hold no v4 client
    assert not address_allowed(rule, "")  # a unix socket peer: no list vouches for it


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"Basic " + base64.b64encode(b"ann:pa:ss"), ("ann", b"pa:ss")),
        (b"basic  " + base64.b64encode("jos\u00e9:x".encode()), ("jos\u00e9", b"x")),
        (b"Bearer abc", None),
        (b"Basic !!!", None),
        (b"Basic " + base64.b64encode(b"nocolon"), None),
        (b"Basic " + base64.b64encode(b"\xff:x"), None),
        (None, None),
    ],
)
def test_basic_credentials(header: bytes | None, expected: object) -> None:
    """Only a well-formed Basic header gives credentials; anything else is no credentials (401)."""
    assert basic_credentials(header) == expected


def test_htpasswd_b_lines_are_read(tmp_path: Path) -> None:
    """What `htpasswd -B` writes parses, and its hash checks with bcrypt."""
    path = tmp_path / "htpasswd"
    subprocess.run(["htpasswd", "-cbB", str(path), "ann", "secret"], check=True, capture_output=True)
    users = access.load_htpasswd(str(path))
    assert bcrypt.checkpw(b"secret", users["ann"])


@pytest.mark.parametrize(
    "line",
    ["ann:$apr1$abc$defghijklmnopqrstuvwx.", "ann:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=", "ann", "ann:secret"],
)
def test_htpasswd_other_hashes_refused(line: str) -> None:
    """MD5, SHA1, plain text or broken lines are refused, naming the line."""
    with pytest.raises(HtpasswdError) as info:
        parse_htpasswd(f"# users\n\n{line}\n", "/etc/htpasswd")
    assert info.value.line == 3


def test_load_all_names_every_bad_file(tmp_path: Path) -> None:
    """A missing or bad htpasswd file stops start and reload with a ConfigError naming it."""
    bad = tmp_path / "bad"
    bad.write_text("ann:plain\n")
    sites = [site(basic_auth=BasicAuth("r", str(bad))), site(basic_auth=BasicAuth("r", str(tmp_path / "none")))]
    with pytest.raises(ConfigError) as info:
        load_all(sites)
    text = str(info.value)
    assert str(bad) in text and "line 1" in text and "cannot read" in text


# -- the verifier ------------------------------------------------------------


class FakeThreads:
    """Runs nothing until told: each call waits in ``calls`` with its Deferred."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def run(self, index: int = 0) -> None:
        f, args, d = self.calls.pop(index)
        d.callback(f(*args))


def test_verifier_runs_in_threads_a_few_at_a_time() -> None:
    """Checks go to the thread runner, at most MAX_RUNNING at once; the rest wait their turn."""
    threads = FakeThreads()
    verifier = Verifier(Clock(), threads)
    users = {"ann": HASH}
    results: list[bool] = []
    for _ in range(access.MAX_RUNNING + 3):
        d = verifier.verify("ann", b"wrong", users)
        assert isinstance(d, Deferred)
        d.addCallback(results.append)
    assert len(threads.calls) == access.MAX_RUNNING
    threads.run()
    assert len(threads.calls) == access.MAX_RUNNING
    while threads.calls:
        threads.run()
    assert results == [False] * (access.MAX_RUNNING + 3)


def test_verifier_refuses_when_too_many_wait() -> None:
    """Past MAX_QUEUED waiting checks, the answer is None (the proxy says 503) rather than a longer queue."""
    verifier = Verifier(Clock(), FakeThreads())
    for _ in range(access.MAX_RUNNING + access.MAX_QUEUED):
        assert isinstance(verifier.verify("ann", b"x", {"ann": HASH}), Deferred)
    assert verifier.verify("ann", b"x", {"ann": HASH}) is None


def test_verifier_remembers_a_success_briefly() -> None:
    """A right password is not checked again for CACHE_SECONDS; a wrong one always is."""
    clock, threads = Clock(), FakeThreads()
    verifier = Verifier(clock, threads)
    users = {"ann": HASH}
    first = verifier.verify("ann", b"s3cret", users)
    assert isinstance(first, Deferred)
    threads.run()
    assert verifier.verify("ann", b"s3cret", users) is True
    assert isinstance(verifier.verify("ann", b"s3cre", users), Deferred)
    assert all(b"s3cret" not in key for key in verifier.cache)  # a digest, not the password
    clock.advance(access.CACHE_SECONDS + 1)
    assert isinstance(verifier.verify("ann", b"s3cret", users), Deferred)


def test_unknown_user_costs_a_check_and_fails() -> None:
    """An unknown user is checked against another hash (same time as a wrong password) and refused."""
    threads = FakeThreads()
    verifier = Verifier(Clock(), threads)
    d = verifier.verify("bob", b"s3cret", {"ann": HASH})
    assert isinstance(d, Deferred)
    assert threads.calls[0][1] == (b"s3cret", HASH)
    threads.run()
    assert d.result is False
    assert verifier.cache == {}


def test_failed_thread_counts_as_wrong() -> None:
    """An error in the thread refuses the password, and frees the slot for the next check."""
    verifier = Verifier(Clock(), lambda f, *a: fail(RuntimeError("boom")))
    d = verifier.verify("ann", b"x", {"ann": HASH})
    assert d is not None and d is not True and d.result is False
    assert verifier.running == 0


def test_long_passwords_are_cut_as_htpasswd_does() -> None:
    """bcrypt 5 refuses over 72 bytes; htpasswd -B reads 72: so do we, rather than raise."""
    hashed = bcrypt.hashpw(b"x" * 72, bcrypt.gensalt(4))
    assert access.check_password(b"x" * 100, hashed)


# -- the handler's hook --------------------------------------------------------


def site(**rule: Any) -> Site:
    access_rules = (AccessRule(**rule),) if rule else ()
    return Site(hosts=("app.test",), upstream=parse_upstream("http://127.0.0.1:8000"), tls="files", access=access_rules)


class AdmitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.patch(FakeExchange, "clock", self.reactor)
        self.threads = FakeThreads()
        self.patch(access, "load_all", lambda sites: {"/etc/htpasswd": {"ann": HASH}})

    def handler(self, *sites: Site, server: Server | None = None) -> ProxyHandler:
        handler = ProxyHandler(self.reactor, list(sites), server or Server())
        handler.access.verifier.run = self.threads
        return handler

    def request(self, handler: ProxyHandler, target: bytes = b"/x", client: str = "203.0.113.7", **headers: bytes):  # type: ignore[no-untyped-def]
        h = head(target=target)
        h.headers += [(k.encode(), v) for k, v in headers.items()]
        exchange = FakeExchange(h)
        exchange.client_address = client
        handler.handle(exchange)
        return exchange

    def test_denied_address_gets_403_and_the_app_is_not_dialled(self) -> None:
        """An address outside allow gets 403; one inside reaches the app."""
        handler = self.handler(site(allow=nets("192.0.2.0/24")))
        refused = self.request(handler)
        self.assertEqual(refused.status, 403)
        self.assertEqual(self.reactor.tcpClients, [])
        self.request(handler, client="192.0.2.10")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_acme_challenge_paths_stay_open(self) -> None:
        """/.well-known/acme-challenge/ passes every rule (a CA must reach it), but not by walking out of it."""
        handler = self.handler(site(allow=nets("192.0.2.0/24"), basic_auth=BasicAuth("r", "/etc/htpasswd")))
        self.request(handler, target=b"/.well-known/acme-challenge/tok")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        walked = self.request(handler, target=b"/.well-known/acme-challenge/../../admin/")
        self.assertEqual(walked.status, 403)

    def test_dot_segments_cannot_borrow_the_acme_exemption(self) -> None:
        """Django keeps dot segments: /app/../.well-known/acme-challenge/x is routed under /app/, not exempt."""
        handler = self.handler(site(basic_auth=BasicAuth("staging", "/etc/htpasswd")))
        for target in (b"/app/../.well-known/acme-challenge/x", b"/app/%2e%2e/.well-known/acme-challenge/x"):
            exchange = self.request(handler, target=target)
            self.assertEqual(exchange.status, 401, target)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_dot_segments_cannot_walk_out_of_a_path_rule(self) -> None:
        """/private/x/../../public is /public once normalised, but Django routes it under /private/: refused."""
        rules = (AccessRule(prefix="/private/", basic_auth=BasicAuth("p", "/etc/htpasswd")),)
        handler = self.handler(
            Site(hosts=("app.test",), upstream=parse_upstream("http://127.0.0.1:8000"), tls="files", access=rules)
        )
        for target in (b"/private/x/../../public", b"/private/%2e%2e/public", b"http://app.test/private/../public"):
            exchange = self.request(handler, target=target)
            self.assertEqual(exchange.status, 400, target)
        self.assertEqual(self.reactor.tcpClients, [])
        self.request(handler, target=b"/public/../public/x")  # both readings open: on to the app
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_no_credentials_get_401_with_the_realm(self) -> None:
        """Without a password: 401 with WWW-Authenticate naming the realm."""
        handler = self.handler(site(basic_auth=BasicAuth("staging", "/etc/htpasswd")))
        exchange = self.request(handler)
        self.assertEqual(exchange.status, 401)
        self.assertIn((b"WWW-Authenticate", b'Basic realm="staging", charset="UTF-8"'), exchange.headers)

    def test_right_password_is_dispatched_after_the_thread(self) -> None:
        """The app is dialled only once bcrypt (in a thread) said yes; the next request skips the thread."""
        handler = self.handler(site(basic_auth=BasicAuth("staging", "/etc/htpasswd")))
        auth = b"Basic " + base64.b64encode(b"ann:s3cret")
        exchange = self.request(handler, authorization=auth)
        self.assertIsNone(exchange.status)
        self.assertEqual(self.reactor.tcpClients, [])
        self.threads.run()
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.request(handler, authorization=auth)
        self.assertEqual((len(self.reactor.tcpClients), self.threads.calls), (2, []))

    def test_wrong_password_gets_401(self) -> None:
        """A wrong password is 401 once checked; the app never sees the request."""
        handler = self.handler(site(basic_auth=BasicAuth("staging", "/etc/htpasswd")))
        exchange = self.request(handler, authorization=b"Basic " + base64.b64encode(b"ann:nope"))
        self.threads.run()
        self.assertEqual(exchange.status, 401)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_client_gone_while_checking(self) -> None:
        """A client that leaves during the check is not dispatched."""
        handler = self.handler(site(basic_auth=BasicAuth("staging", "/etc/htpasswd")))
        exchange = self.request(handler, authorization=b"Basic " + base64.b64encode(b"ann:s3cret"))
        exchange.observer.client_gone()
        self.threads.run()
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertIsNone(exchange.status)

    def test_path_rule_over_an_open_site(self) -> None:
        """A [[site.access]] rule protects its prefix (encoded or not); the rest of the site stays open."""
        rules = (
            AccessRule(prefix="/admin/", basic_auth=BasicAuth("admin", "/etc/htpasswd")),
            AccessRule(prefix="/"),
        )
        open_site = Site(
            hosts=("app.test",), upstream=parse_upstream("http://127.0.0.1:8000"), tls="files", access=rules
        )
        handler = self.handler(open_site)
        self.request(handler, target=b"/public")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        for target in (b"/admin/", b"/%61dmin/users", b"/admin"):
            self.assertEqual(self.request(handler, target=target).status, 401, target)

    def app_received(self, index: int = -1) -> bytes:
        """Complete the dial at ``index``: the request head the app got."""
        protocol = self.reactor.tcpClients[index][2].buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return transport.value()

    def test_authorization_is_not_passed_to_the_app(self) -> None:
        """Once the password passed, the app gets the request without the Authorization header (both ways in)."""
        handler = self.handler(site(basic_auth=BasicAuth("staging", "/etc/htpasswd")))
        auth = b"Basic " + base64.b64encode(b"ann:s3cret")
        self.request(handler, authorization=auth)
        self.threads.run()
        first = self.app_received()
        self.assertTrue(first.startswith(b"GET /x HTTP/1.1\r\n"), first)
        self.request(handler, authorization=auth)  # the remembered success
        for sent in (first, self.app_received()):
            self.assertNotIn(b"authorization", sent.lower())
            self.assertNotIn(base64.b64encode(b"ann:s3cret"), sent)

    def test_pass_authorization_keeps_the_header(self) -> None:
        """pass_authorization = true: the app gets the client's Authorization as sent."""
        handler = self.handler(site(basic_auth=BasicAuth("staging", "/etc/htpasswd"), pass_authorization=True))
        auth = b"Basic " + base64.b64encode(b"ann:s3cret")
        self.request(handler, authorization=auth)
        self.threads.run()
        self.assertIn(b"\r\nauthorization: " + auth + b"\r\n", self.app_received())

    def test_authorization_of_a_rule_without_basic_auth_passes(self) -> None:
        """A rule that checks no password leaves the client's Authorization (an API token) to the app."""
        rules = (
            AccessRule(prefix="/admin/", basic_auth=BasicAuth("admin", "/etc/htpasswd")),
            AccessRule(prefix="/api/", allow=nets("203.0.113.0/24")),
        )
        handler = self.handler(
            Site(hosts=("app.test",), upstream=parse_upstream("http://127.0.0.1:8000"), tls="files", access=rules)
        )
        self.request(handler, target=b"/api/items", authorization=b"Bearer t0ken")
        self.assertIn(b"\r\nauthorization: Bearer t0ken\r\n", self.app_received())

    def wrong(self, handler: ProxyHandler, client: str = "203.0.113.7", password: bytes = b"nope") -> FakeExchange:
        """One request with ann's name and ``password``, its check run if one was queued."""
        exchange = self.request(handler, client=client, authorization=b"Basic " + base64.b64encode(b"ann:" + password))
        if self.threads.calls:
            self.threads.run()
        return exchange

    def test_guessing_is_answered_429_without_a_check(self) -> None:
        """After auth_fail_limit wrong passwords: 429 with Retry-After, no bcrypt even for the right one; then again."""
        handler = self.handler(
            site(basic_auth=BasicAuth("staging", "/etc/htpasswd")),
            server=Server(auth_fail_limit=3, auth_fail_window=60.0),
        )
        for _ in range(3):
            self.assertEqual(self.wrong(handler).status, 401)
        self.reactor.advance(20)
        limited = self.request(handler, authorization=b"Basic " + base64.b64encode(b"ann:s3cret"))
        self.assertEqual((limited.status, self.threads.calls), (429, []))
        self.assertIn((b"Retry-After", b"40"), limited.headers)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.wrong(handler, client="203.0.113.8").status, 401)  # another address: checked
        self.reactor.advance(40)
        self.assertEqual(self.wrong(handler, password=b"s3cret").status, None)  # the window passed: let in
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_a_burst_of_guesses_is_cut_at_the_limit(self) -> None:
        """Guesses sent together count while their checks run: only auth_fail_limit of them cost bcrypt."""
        handler = self.handler(
            site(basic_auth=BasicAuth("staging", "/etc/htpasswd")),
            server=Server(auth_fail_limit=3, auth_fail_window=60.0),
        )
        auth = b"Basic " + base64.b64encode(b"ann:nope")
        burst = [self.request(handler, authorization=auth) for _ in range(8)]
        self.assertEqual([e.status for e in burst], [None] * 3 + [429] * 5)
        self.assertIn((b"Retry-After", b"1"), burst[-1].headers)
        checks = len(self.threads.calls) + len(handler.access.verifier.queue)
        self.assertEqual(checks, 3)

    def test_no_limit_when_off(self) -> None:
        """auth_fail_limit = 0: every wrong password is checked and answered 401."""
        handler = self.handler(site(basic_auth=BasicAuth("staging", "/etc/htpasswd")), server=Server(auth_fail_limit=0))
        self.assertEqual([self.wrong(handler).status for _ in range(15)], [401] * 15)

    def test_counts_survive_a_reload(self) -> None:
        """A reload (a new handler) keeps counting a guesser's failures."""
        old = self.handler(
            site(basic_auth=BasicAuth("staging", "/etc/htpasswd")),
            server=Server(auth_fail_limit=2, auth_fail_window=60.0),
        )
        self.wrong(old)
        self.wrong(old)
        new = self.handler(
            site(basic_auth=BasicAuth("staging", "/etc/htpasswd")),
            server=Server(auth_fail_limit=2, auth_fail_window=60.0),
        )
        old.close(new)
        self.assertEqual(self.wrong(new).status, 429)


# -- the guess limit -------------------------------------------------------------

STAGING = BasicAuth("staging", "/etc/htpasswd")
ADMIN = BasicAuth("admin", "/etc/htpasswd")


def fail_times(limit: GuessLimit, key: Any, count: int) -> None:
    for _ in range(count):
        assert limit.wait(key) == 0
        limit.started(key)
        limit.checked(key, False)


def test_guess_limit_window() -> None:
    """limit failures in the window make the client wait for the rest of it; then it starts afresh."""
    clock = Clock()
    limit = GuessLimit(clock, 3, 60.0)
    key = ("192.0.2.1", STAGING)
    fail_times(limit, key, 2)
    clock.advance(10)
    fail_times(limit, key, 1)
    assert limit.wait(key) == 60.0 - 10
    clock.advance(49.5)
    assert limit.wait(key) == 0.5
    clock.advance(0.5)
    assert limit.wait(key) == 0
    assert key not in limit.tallies  # an expired count is forgotten
    fail_times(limit, key, 2)
    assert limit.wait(key) == 0


def test_guess_limit_says_so_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reaching the limit is one warning naming client and realm, outside the access log's namespace."""
    from twisted.logger import Logger, formatEvent

    events: list[dict[str, Any]] = []
    monkeypatch.setattr(access, "log", Logger(namespace=access.log.namespace, observer=events.append))
    limit = GuessLimit(Clock(), 2, 60.0)
    fail_times(limit, ("192.0.2.1", STAGING), 2)
    limit.started(("192.0.2.1", STAGING))
    limit.checked(("192.0.2.1", STAGING), False)  # a check that was already running when the limit was hit
    assert len(events) == 1
    assert events[0]["log_namespace"] != "tlsproxy.access"
    assert formatEvent(events[0]) == (
        "192.0.2.1: 2 wrong passwords for realm 'staging' within 60s; answered 429 until the window ends"
    )


def test_guess_limit_is_per_client_and_realm() -> None:
    """One client's failures hold neither other clients nor its other realms; a success resets nothing."""
    clock = Clock()
    limit = GuessLimit(clock, 2, 60.0)
    fail_times(limit, ("192.0.2.1", STAGING), 2)
    assert limit.wait(("192.0.2.1", STAGING)) > 0
    assert limit.wait(("192.0.2.2", STAGING)) == 0
    assert limit.wait(("192.0.2.1", ADMIN)) == 0
    fail_times(limit, ("192.0.2.3", STAGING), 1)
    limit.started(("192.0.2.3", STAGING))
    limit.checked(("192.0.2.3", STAGING), True)  # its own success does not wipe its failure...
    fail_times(limit, ("192.0.2.3", STAGING), 1)
    assert limit.wait(("192.0.2.3", STAGING)) > 0  # ... so two failures still limit it
    limit.started(("192.0.2.2", STAGING))
    limit.checked(("192.0.2.2", STAGING), True)
    assert limit.wait(("192.0.2.1", STAGING)) > 0  # nor does anyone else's


def test_guess_limit_counts_running_checks() -> None:
    """Checks still running count toward the limit; the wait is then a second (their answer is near)."""
    limit = GuessLimit(Clock(), 3, 60.0)
    key = ("192.0.2.1", STAGING)
    for _ in range(3):
        limit.started(key)
    assert limit.wait(key) == 1.0
    limit.checked(key, True)
    assert limit.wait(key) == 0


def test_guess_limit_memory_is_bounded() -> None:
    """At most max_clients are tracked; the least recently seen is forgotten first."""
    clock = Clock()
    limit = GuessLimit(clock, 1, 60.0, max_clients=3)
    for n in range(3):
        fail_times(limit, (f"192.0.2.{n}", STAGING), 1)
    limit.started(("192.0.2.0", STAGING))  # seen again: now the most recent
    limit.checked(("192.0.2.0", STAGING), False)
    fail_times(limit, ("192.0.2.9", STAGING), 1)
    assert len(limit.tallies) == 3
    assert limit.wait(("192.0.2.1", STAGING)) == 0  # the oldest, forgotten
    assert limit.wait(("192.0.2.0", STAGING)) > 0 and limit.wait(("192.0.2.2", STAGING)) > 0


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("", ""),
        ("unix-peer", "unix-peer"),
    ],
)
def test_client_key(address: str, key: str) -> None:
    """An IPv6 client is counted by its /64 (one host holds all of it); IPv4 by address, mapped or not."""
    assert client_key(address) == key


def test_sites_without_rules_never_touch_the_verifier() -> None:
    """An unrestricted site costs nothing: no file read, no rule lookup (the hook checks site.access)."""
    handler = ProxyHandler(MemoryReactorClock(), [site()], Server())
    assert handler.access.users == {}


def test_synchronous_thread_runner() -> None:
    """The thread runner may answer synchronously (a reactor without a pool): the check still completes."""
    verifier = Verifier(Clock(), lambda f, *a: succeed(f(*a)))
    d = verifier.verify("ann", b"s3cret", {"ann": HASH})
    assert d is not None and d is not True and d.result is True


class RecordTests(SynchronousTestCase):
    def test_refusals_are_logged_with_their_size(self) -> None:
        """A 403 or 401 the gate answers is one access-log record with its status and page size."""
        reactor = MemoryReactorClock()
        self.patch(FakeExchange, "clock", reactor)
        self.patch(access, "load_all", lambda sites: {"/etc/htpasswd": {"ann": HASH}})
        lines: list[tuple[int, int]] = []

        class Log:
            def log(self, exchange: Any, status: int, size: int, *fields: Any) -> None:
                lines.append((status, size))

        handler = ProxyHandler(
            reactor,
            [site(allow=nets("192.0.2.0/24"))],
            Server(),
            Log(),  # type: ignore[arg-type]
        )
        exchange = FakeExchange(head())
        handler.handle(exchange)
        self.assertEqual(lines, [(403, len(exchange.body))])
        self.assertGreater(len(exchange.body), 0)

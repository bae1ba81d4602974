"""A site's own 502/503/504 pages and its maintenance switch, with fakes (no real time, no real threads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_accesslog import Threads
from tests.unit.test_proxy_handler import FakeExchange, head
from tlsproxy.config import ConfigError, Server, Site, parse_upstream
from tlsproxy.http import pages
from tlsproxy.proxy import errorpages
from tlsproxy.proxy.errorpages import ErrorPages, load_pages
from tlsproxy.proxy.handler import ProxyHandler


def site(tmp: Path, maintenance: bool = False, **pages_: str) -> Site:
    entries = []
    for status, text in pages_.items():
        path = tmp / f"{status}.html"
        path.write_text(text)
        entries.append((int(status.lstrip("_")), str(path)))
    return Site(
        hosts=("app.test",),
        upstream=parse_upstream("http://127.0.0.1:8000"),
        tls="files",
        error_pages=tuple(entries),
        maintenance_file=str(tmp / "maintenance.on") if maintenance else "",
    )


def exchange(target: bytes = b"/x") -> FakeExchange:
    FakeExchange.clock = Clock()
    ex = FakeExchange(head(target=target))
    ex.request_id = "rid-42"  # type: ignore[attr-defined]
    return ex


def test_default_page_shows_the_request_id() -> None:
    """Our own short pages quote the request id, and say it in X-Request-ID."""
    ex = exchange()
    pages.send(ex, 502)
    assert b"rid-42" in ex.body and (b"X-Request-ID", b"rid-42") in ex.headers
    assert b"<script>" not in pages.render(500, None, "<script>")


def test_site_page_with_its_status_and_the_id(tmp_path: Path) -> None:
    """A configured page is served with the status it stands for, {request_id} filled in."""
    ex = exchange()
    ErrorPages([site(tmp_path, _502="<h1>Down {request_id}</h1>")], Threads(eager=True)).send(
        ex, site(tmp_path, _502="<h1>Down {request_id}</h1>"), 502
    )
    assert (ex.status, ex.body, ex.finished) == (502, b"<h1>Down rid-42</h1>", True)


def test_status_without_a_page_gets_ours(tmp_path: Path) -> None:
    """A status the site has no page for gets tlsproxy's short page."""
    s = site(tmp_path, _502="x")
    ex = exchange()
    ErrorPages([s], Threads(eager=True)).send(ex, s, 504)
    assert ex.status == 504 and b"took too long" in ex.body


def test_unreadable_or_huge_page_stops_the_load(tmp_path: Path) -> None:
    """A page that is gone or over MAX_PAGE is a configuration error, named."""
    s = site(tmp_path, _502="x", _503="y")
    Path(s.error_pages[0][1]).unlink()
    Path(s.error_pages[1][1]).write_bytes(b"z" * (errorpages.MAX_PAGE + 1))
    with pytest.raises(ConfigError) as info:
        load_pages([s])
    assert "cannot read the 502 page" in str(info.value) and "at most" in str(info.value)


def test_maintenance_follows_the_file_through_the_thread(tmp_path: Path) -> None:
    """The file is looked for in the thread runner; its presence turns maintenance on, its removal off."""
    s = site(tmp_path, maintenance=True)
    threads = Threads()
    pages_ = ErrorPages([s], threads)
    pages_.poll()
    pages_.poll()  # one look at a time
    assert len(threads.calls) == 1
    threads.run()
    assert not pages_.in_maintenance(s)
    Path(s.maintenance_file).touch()
    pages_.poll()
    assert not pages_.in_maintenance(s)  # not known until the thread has looked
    threads.run()
    assert pages_.in_maintenance(s)
    Path(s.maintenance_file).unlink()
    pages_.poll()
    threads.run()
    assert not pages_.in_maintenance(s)


def test_failed_look_keeps_the_last_answer(tmp_path: Path) -> None:
    """An error while looking changes nothing and does not stop later looks."""
    s = site(tmp_path, maintenance=True)
    answers = iter([succeed({s.maintenance_file}), fail(OSError("EIO"))])
    pages_ = ErrorPages([s], lambda f, *a: next(answers))
    pages_.poll()
    pages_.poll()
    assert pages_.in_maintenance(s) and not pages_._polling


def test_watcher_polls_every_second(tmp_path: Path) -> None:
    """The watcher is a timer on the injected clock; none without a maintenance file."""
    clock = Clock()
    calls: list[Any] = []
    s = site(tmp_path, maintenance=True)
    pages_ = ErrorPages([s], lambda f, *a: calls.append(a) or succeed(set()))
    watcher = pages_.watcher(clock)
    assert watcher is not None
    watcher.startService()
    clock.pump([errorpages.POLL_SECONDS] * 3)
    watcher.stopService()
    assert len(calls) == 4
    assert ErrorPages([site(tmp_path)], Threads()).watcher(clock) is None


class HandlerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.patch(FakeExchange, "clock", self.reactor)
        self.tmp = Path(self.mktemp())
        self.tmp.mkdir()

    def test_maintenance_answers_503_without_dialling(self) -> None:
        """In maintenance every request gets the site's 503 page with Retry-After; ACME paths still pass."""
        s = site(self.tmp, maintenance=True, _503="<p>Back soon ({request_id})</p>")
        handler = ProxyHandler(self.reactor, [s], Server())
        handler.error_pages.down.add(s.name)
        ex = FakeExchange(head())
        handler.handle(ex)
        self.assertEqual(ex.status, 503)
        self.assertIn((b"Retry-After", b"60"), ex.headers)
        self.assertEqual(ex.body, f"<p>Back soon ({ex.request_id})</p>".encode())
        self.assertEqual(self.reactor.tcpClients, [])
        handler.handle(FakeExchange(head(target=b"/.well-known/acme-challenge/t")))
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_app_unreachable_gets_the_site_502_page(self) -> None:
        """A failed connect to the app is answered with the site's 502 page."""
        s = site(self.tmp, _502="<p>Our app is down: {request_id}</p>")
        handler = ProxyHandler(self.reactor, [s], Server(connect_timeout=5))
        ex = FakeExchange(head())
        handler.handle(ex)
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(ex.status, 502)
        self.assertEqual(ex.body, f"<p>Our app is down: {ex.request_id}</p>".encode())

    def test_app_timeout_gets_the_site_504_page(self) -> None:
        """An app that does not answer in time: 504 with the site's page."""
        s = site(self.tmp, _504="<p>slow</p>")
        handler = ProxyHandler(self.reactor, [s], Server(upstream_timeout=2))
        ex = FakeExchange(head())
        handler.handle(ex)
        protocol = self.reactor.tcpClients[0][2].buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.reactor.advance(3)
        self.assertEqual((ex.status, ex.body), (504, b"<p>slow</p>"))

    def test_every_upstream_down_gets_the_site_503_page(self) -> None:
        """With every upstream out (balancer.py), the 503 at once is the site's own page, with Retry-After."""
        upstreams = (parse_upstream("http://127.0.0.1:8001"), parse_upstream("http://127.0.0.1:8002"))
        s = site(self.tmp, _503="<p>all down {request_id}</p>")
        s = Site(
            hosts=s.hosts,
            upstream=upstreams[0],
            upstreams=upstreams,
            tls="files",
            error_pages=s.error_pages,
        )
        handler = ProxyHandler(self.reactor, [s], Server(connect_timeout=5))
        first = FakeExchange(head())
        handler.handle(first)
        for index in range(2):  # each upstream refuses: both are out
            self.reactor.tcpClients[index][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(first.status, 502)
        second = FakeExchange(head())
        handler.handle(second)
        self.assertEqual(second.status, 503)
        self.assertEqual(second.body, f"<p>all down {second.request_id}</p>".encode())
        self.assertTrue(any(name == b"Retry-After" for name, _ in second.headers))

"""The common keep-alive request skips what only some requests need, and still behaves the same."""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tests.unit.test_proxy_handler import FakeExchange, head
from tlsproxy.config import HSTS, Server, Site, parse_upstream
from tlsproxy.proxy import handler as handler_module
from tlsproxy.proxy import requestid
from tlsproxy.proxy.accesslog import AccessLog
from tlsproxy.proxy.handler import ProxyHandler

OK = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"  # each request dials anew


def make_handler(reactor: MemoryReactorClock, compress: bool = False, log: bool = False) -> ProxyHandler:
    upstream = parse_upstream("http://127.0.0.1:8000")
    assert not isinstance(upstream, str)
    site = Site(hosts=("app.test",), upstream=upstream, tls="files", hsts=HSTS(max_age=0), compress=compress)
    access_log = AccessLog(reactor, stdout=False) if log else None
    return ProxyHandler(reactor, [site], Server(connect_timeout=5, upstream_timeout=30), access_log=access_log)


def relay(reactor: MemoryReactorClock, handler: ProxyHandler, *headers: tuple[bytes, bytes]) -> FakeExchange:
    """One GET through ``handler``, answered 200 by the app; what the client got."""
    FakeExchange.clock = reactor
    h = head()
    h.headers += list(headers)
    exchange = FakeExchange(h)
    handler.handle(exchange)
    protocol = reactor.tcpClients[-1][2].buildProtocol(None)
    wire = StringTransport()
    protocol.makeConnection(wire)
    exchange.app_saw = wire.value()  # type: ignore[attr-defined]
    protocol.dataReceived(OK)
    return exchange


def test_lone_upstream_is_taken_without_asking_the_balancer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A site with one healthy upstream dials it without UpstreamGroup.choose; its load is counted and given back."""
    reactor = MemoryReactorClock()
    handler = make_handler(reactor)
    group = handler.routes[0].group
    assert group.lone is group.members[0]

    def choose(*_: Any) -> None:
        raise AssertionError("choose() called for a lone healthy upstream")

    monkeypatch.setattr(group, "choose", choose)
    exchange = relay(reactor, handler)
    assert (exchange.status, exchange.body) == (200, b"hi")
    assert reactor.tcpClients[-1][1] == 8000
    assert group.lone.in_flight == 0


def test_lone_upstream_failing_its_health_check_gets_503() -> None:
    """The shortcut does not hide the health check: a lone upstream that fails it is not dialled."""
    reactor = MemoryReactorClock()
    handler = make_handler(reactor)
    group = handler.routes[0].group
    group.check_result(group.members[0], "503 from /health")
    FakeExchange.clock = reactor
    exchange = FakeExchange(head())
    handler.handle(exchange)
    assert exchange.status == 503 and not reactor.tcpClients


def test_no_accept_encoding_skips_compress_wrap(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a compressing site, only a request with Accept-Encoding goes through compress.wrap."""
    reactor = MemoryReactorClock()
    handler = make_handler(reactor, compress=True)
    wrapped: list[Any] = []

    def wrap(exchange: Any, *_: Any) -> Any:
        wrapped.append(exchange)
        return exchange

    monkeypatch.setattr(handler_module.compress, "wrap", wrap)
    plain = relay(reactor, handler)
    assert (plain.status, wrapped) == (200, [])
    coded = relay(reactor, handler, (b"accept-encoding", b"gzip"))
    assert (coded.status, wrapped) == (200, [coded])


def test_start_time_read_only_for_an_access_log() -> None:
    """Without an access log the start time is not taken (nothing reads it); the id is there either way."""
    reactor = MemoryReactorClock()
    reactor.advance(100.0)
    quiet = relay(reactor, make_handler(reactor))
    assert not hasattr(quiet, "started") and len(quiet.request_id) == 24
    logged = relay(reactor, make_handler(reactor, log=True))
    assert logged.started == 100.0 and len(logged.request_id) == 24  # type: ignore[attr-defined]


def test_request_ids_across_blocks_and_the_counter_wrap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids made a block at a time are 24 hex digits, text and bytes alike, in order across a refill and the wrap."""
    monkeypatch.setattr(requestid, "_counter", 0xFFFFFFFF & -requestid.BLOCK)  # the last block before the wrap
    requestid.texts.clear()
    requestid.raws.clear()
    seen = []
    for _ in range(requestid.BLOCK + 2):
        raw = requestid.raws[-1] if requestid.texts else None
        text = requestid.new_request_id()
        assert raw is None or raw == text.encode()
        seen.append(text)
    assert all(re.fullmatch("[0-9a-f]{24}", t) for t in seen)
    assert len(set(seen)) == len(seen)
    assert len({t[:16] for t in seen}) == 1
    assert [t[16:] for t in (seen[0], seen[-3], seen[-2], seen[-1])] == [
        f"{0x100000000 - requestid.BLOCK:08x}",
        "ffffffff",
        "00000000",
        "00000001",
    ]


def test_one_pass_still_replaces_a_client_request_id() -> None:
    """With the handler's single pass over the headers, a client's X-Request-ID (any spelling) never reaches the app."""
    reactor = MemoryReactorClock()
    handler = make_handler(reactor, compress=True)
    exchange = relay(reactor, handler, (b"accept-encoding", b"gzip"), (b"x_request-id", b"mine"))
    sent = exchange.app_saw  # type: ignore[attr-defined]
    assert b"mine" not in sent
    assert re.findall(rb"x-request-id: ([0-9a-f]{24})\r\n", sent) == [exchange.request_id.encode()]
    plain = relay(reactor, handler)
    assert re.findall(rb"x-request-id: ([0-9a-f]{24})\r\n", plain.app_saw) == [plain.request_id.encode()]  # type: ignore[attr-defined]

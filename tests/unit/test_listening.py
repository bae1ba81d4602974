"""Listening sockets: a long backlog by default, and refusals counted and logged at a bounded rate."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, globalLogPublisher

from tlsproxy.listening import RefusalLog, watch_refusals, with_backlog
from tlsproxy.metrics import Count
from tlsproxy.tap import Listener


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:443", "tcp:443:backlog=511"),
        ("tcp:8443:interface=127.0.0.1", "tcp:8443:interface=127.0.0.1:backlog=511"),
        ("tcp6:443", "tcp6:443:backlog=511"),
        ("unix:/run/tlsproxy.sock", "unix:/run/tlsproxy.sock:backlog=511"),
        ("haproxy:tcp:443", "haproxy:tcp:443:backlog=511"),
        ("tcp:443:backlog=2048", "tcp:443:backlog=2048"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_with_backlog(description: str, expected: str) -> None:
    """A backlog of 511 is added where the endpoint takes one, and one named in the config wins."""
    assert with_backlog(description) == expected


@pytest.mark.parametrize("description", ["tcp:0:interface=127.0.0.1", "haproxy:tcp:0"])
def test_listener_listens_with_backlog_511(description: str) -> None:
    """The proxy's listeners ask the reactor for a backlog of 511, not Twisted's 50."""
    reactor = MemoryReactorClock()
    listener = Listener(reactor, description, Factory.forProtocol(Protocol), "https")
    listener.startService()
    assert [server[2] for server in reactor.tcpServers] == [511]


class Events:
    """Log events of one namespace, while in a ``with`` block."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == self.namespace:
            self.events.append(event)

    def __enter__(self) -> Events:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


class Listening:
    """A listening socket that runs out of file descriptors for ``refusals`` accepts."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals

    def accept(self) -> Any:
        if self.refusals:
            self.refusals -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        raise OSError(errno.EAGAIN, "try again")


class Reserve:
    """An EMFILE reserve that is always there to give up."""

    def available(self) -> bool:
        return True

    def __enter__(self) -> None: ...

    def __exit__(self, *exc: object) -> None: ...


class Client:
    def close(self) -> None: ...


class RefusingListening(Listening):
    """After an EMFILE, accepts (on the freed reserve) ``refusals`` clients that Twisted then closes."""

    def __init__(self, refusals: int) -> None:
        super().__init__(1)
        self.clients = refusals

    def accept(self) -> Any:
        if self.refusals:
            return super().accept()
        if self.clients:
            self.clients -= 1
            return Client(), ("192.0.2.1", 40000 + self.clients)
        raise OSError(errno.EAGAIN, "try again")


def test_refusals_counted_and_logged_at_a_bounded_rate() -> None:
    """A flood refused for lack of descriptors is counted in full but logs one line per interval."""
    clock, refused = Clock(), Count()
    log = RefusalLog(clock, "https", refused, interval=10)
    with Events("tlsproxy.listen") as lines:
        for _ in range(50):
            # What Twisted's accept loop does: close each waiting client on the reserve, log each.
            list(tcp._accept(Logger(observer=log), range(100), RefusingListening(20), Reserve()))
            clock.advance(0.1)
        assert refused.value == 50 * 20
        assert len(lines.events) == 1
        clock.advance(10)
        list(tcp._accept(Logger(observer=log), range(100), RefusingListening(20), Reserve()))
    assert len(lines.events) == 2
    assert lines.events[0]["count"] == 1
    assert lines.events[1]["count"] == 50 * 20 - 1
    assert refused.value == 51 * 20


def test_other_accept_errors_rate_limited_and_other_events_pass() -> None:
    """ENFILE and the like are logged once per interval too; any other event of the port goes on as it was."""
    clock = Clock()
    seen: list[dict[str, Any]] = []
    log = RefusalLog(clock, "https", None, interval=10, forward=seen.append)

    class Full(Listening):
        def accept(self) -> Any:
            raise OSError(errno.ENFILE, "File table overflow")

    with Events("tlsproxy.listen") as lines:
        for _ in range(30):
            list(tcp._accept(Logger(observer=log), range(10), Full(0), Reserve()))
    assert len(lines.events) == 1
    assert "ENFILE" in lines.events[0]["errors"]
    Logger(observer=log).info("something else")
    assert [event["log_format"] for event in seen] == ["something else"]


def test_watch_refusals_takes_over_a_tcp_port_log() -> None:
    """A Twisted TCP port's accept-time events go through the refusal log once watched."""
    port = tcp.Port(0, Factory.forProtocol(Protocol), reactor=MemoryReactorClock())
    refused = Count()
    watch_refusals(port, Clock(), "https", refused)
    list(tcp._accept(port._logger, range(10), RefusingListening(3), Reserve()))
    assert refused.value == 3


def test_refused_connections_are_a_metric() -> None:
    """The refusal count is scraped as tlsproxy_refused_connections_total, per listener."""
    from tlsproxy.metrics import Metrics

    metrics = Metrics()
    metrics.refused_connections.labels("https").inc(3)
    assert b'tlsproxy_refused_connections_total{listener="https"} 3.0' in metrics.render()

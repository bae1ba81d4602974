"""The streamlined epoll dispatch still delivers reads, writes and disconnects."""

from __future__ import annotations

import gc
import socket

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Protocol
from twisted.internet.tcp import Connection
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.eventloop import COLLECTOR_THRESHOLDS, at_batch_end, streamline, tune_collector


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


class StreamlineTests(SynchronousTestCase):
    def test_reads_and_disconnects_dispatched(self) -> None:
        """Bytes and the peer's close reach the protocol through the direct dispatch."""
        reactor = EPollReactor()
        self.assertTrue(streamline(reactor))
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        protocol = Collect()
        transport = Connection(ours, protocol, reactor)
        protocol.makeConnection(transport)
        transport.startReading()
        theirs.sendall(b"hello")
        reactor.doIteration(1)
        self.assertEqual(protocol.data, b"hello")
        theirs.close()
        reactor.doIteration(1)
        self.assertTrue(protocol.lost)
        reactor.removeAll()

    def test_batch_end_actions_run_after_all_events_of_a_poll(self) -> None:
        """What protocols queue with at_batch_end runs once every event of the poll is handled, failures apart."""
        reactor = EPollReactor()
        streamline(reactor)
        seen: list[str] = []

        class Queueing(Protocol):
            def __init__(self, name: str) -> None:
                self.name = name

            def dataReceived(self, data: bytes) -> None:
                seen.append(self.name)
                at_batch_end(lambda: 1 / 0)  # logged, and the others still run
                at_batch_end(lambda: seen.append("end " + self.name))

        peers = []
        for name in ("a", "b"):
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            protocol = Queueing(name)
            transport = Connection(ours, protocol, reactor)
            protocol.makeConnection(transport)
            transport.startReading()
            theirs.sendall(b"x")
            peers.append(theirs)
        reactor.doIteration(1)
        self.assertEqual(sorted(seen[:2]), ["a", "b"])
        self.assertEqual(sorted(seen[2:]), ["end a", "end b"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        self.assertFalse(at_batch_end(lambda: None))  # outside a poll: nothing queued
        for peer in peers:
            peer.close()
        reactor.removeAll()

    def test_other_reactors_untouched(self) -> None:
        """A reactor that is not epoll is left as it is."""
        from twisted.internet.testing import MemoryReactorClock

        self.assertFalse(streamline(MemoryReactorClock()))


class CollectorTests(SynchronousTestCase):
    def test_collector_runs_less_often(self) -> None:
        """The youngest generation is collected every 20,000 new objects rather than 700."""
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        gc.set_threshold(700, 10, 10)
        tune_collector()
        self.assertEqual(gc.get_threshold(), COLLECTOR_THRESHOLDS)
        self.assertGreaterEqual(gc.get_threshold()[0], 20_000)

"""The state tables of app connections and proxied requests, and the checked mode that enforces them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import IntEnum
from typing import Any

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_proxy_handler import FakeExchange, chunked_head, head
from tests.unit.test_reqbuffer import scratch
from tlsproxy.config import Server, Site, parse_upstream
from tlsproxy.proxy import lifecycle
from tlsproxy.proxy.handler import APP_FINISHED, OVER, REQUEST_MOVES, ProxiedRequest, ProxyHandler, Stage
from tlsproxy.proxy.lifecycle import IllegalMove, Lifecycle
from tlsproxy.proxy.upstream import CONN_MOVES, ConnState, UpstreamConnection, UpstreamError, UpstreamPool

C = ConnState
S = Stage


def lifecycle_of(cls: type) -> Lifecycle:
    (found,) = [found for found in lifecycle.LIFECYCLES if found.owner is cls]
    return found


CONN = lifecycle_of(UpstreamConnection)
REQUEST = lifecycle_of(ProxiedRequest)


@contextmanager
def recording(*lifecycles: Lifecycle) -> Iterator[list[list[tuple[IntEnum, IntEnum]]]]:
    """The moves the checked mode sees meanwhile, one list per lifecycle."""
    logs: list[list[tuple[IntEnum, IntEnum]]] = [[] for _ in lifecycles]
    for found, log in zip(lifecycles, logs, strict=True):
        found.record = log
    try:
        yield logs
    finally:
        for found in lifecycles:
            found.record = None


class TableTests(SynchronousTestCase):
    def test_the_suite_runs_checked(self) -> None:
        """tests/conftest.py turns the checked mode on: both state attributes are guards."""
        self.assertTrue(lifecycle.checking())
        self.assertIsInstance(UpstreamConnection.__dict__["state"], lifecycle._Guard)
        self.assertIsInstance(ProxiedRequest.__dict__["stage"], lifecycle._Guard)
        self.assertEqual((CONN.moves, REQUEST.moves), (CONN_MOVES, REQUEST_MOVES))

    def test_every_illegal_move_raises_and_every_legal_one_is_made(self) -> None:
        """For each pair of states: a move the table leaves out raises IllegalMove, one it lists is made."""
        makers: list[tuple[Lifecycle, Callable[[], Any]]] = [
            (CONN, lambda: UpstreamConnection(pool())),
            (REQUEST, lambda: object.__new__(ProxiedRequest)),
        ]
        for found, make in makers:
            refused = 0
            for old in found.states:
                for new in found.states:
                    thing = make()
                    thing.__dict__[found.attr] = old  # placed, not moved
                    if new in found.moves[old]:
                        setattr(thing, found.attr, new)
                        self.assertIs(getattr(thing, found.attr), new)
                    else:
                        with self.assertRaises(IllegalMove, msg=f"{old.name} -> {new.name}"):
                            setattr(thing, found.attr, new)
                        self.assertIs(getattr(thing, found.attr), old, "a refused move is not made")
                        refused += 1
            allowed = sum(len(targets) for targets in found.moves.values())
            self.assertEqual(refused + allowed, len(found.states) ** 2)

    def test_a_value_of_another_type_is_refused(self) -> None:
        """The state is a member of its enum: the equal int, or another enum's member, is a bug too."""
        conn = UpstreamConnection(pool())
        with self.assertRaises(IllegalMove):
            conn.state = 1  # type: ignore[assignment]  # == IDLE, but not IDLE
        request = object.__new__(ProxiedRequest)
        request.stage = S.NEW
        with self.assertRaises(IllegalMove):
            request.stage = C.IDLE  # type: ignore[assignment]

    def test_a_new_object_starts_in_the_initial_state_only(self) -> None:
        """The constructor's assignment is checked too: nothing starts half-way through its life."""
        with self.assertRaises(IllegalMove):
            object.__new__(UpstreamConnection).state = C.IDLE
        self.assertIs(UpstreamConnection(pool()).state, C.CONNECTING)

    def test_every_state_is_reachable_and_can_end(self) -> None:
        """From the initial state some chain of moves reaches every state, and from every state an end."""
        for found, ends in ((CONN, {C.CLOSED}), (REQUEST, {S.DONE, S.ABANDONED})):
            self.assertEqual(found.reachable(), set(found.states))
            self.assertEqual({s for s in found.states if not found.moves[s]}, ends, "only the ends lead nowhere")
            for state in found.states:
                self.assertTrue(ends & _reachable_from(found, state), state.name)

    def test_what_is_over_stays_over(self) -> None:
        """The two thresholds split the stages as their names say, and no move goes back below either."""
        self.assertEqual({s for s in S if s >= APP_FINISHED}, {S.DRAINING, S.TUNNEL_ENDED, S.DONE, S.ABANDONED})
        self.assertEqual({s for s in S if s >= OVER}, {S.DONE, S.ABANDONED})
        for threshold in (APP_FINISHED, OVER):
            for state in S:
                if state >= threshold:
                    self.assertTrue(all(new >= threshold for new in REQUEST_MOVES[state]), state.name)

    def test_a_table_without_a_row_is_refused(self) -> None:
        """Every state needs its row, even an end's empty one."""

        class Thing:
            pass

        moves = dict(CONN_MOVES)
        del moves[C.DONE]
        with self.assertRaises(ValueError):
            Lifecycle(Thing, "state", C.CONNECTING, moves)

    def test_unchecked_the_state_is_a_plain_attribute(self) -> None:
        """Outside the checked mode nothing checks: the state is an instance attribute, a move an assignment."""
        lifecycle.set_checking(False)
        self.addCleanup(lifecycle.set_checking, True)
        self.assertNotIn("state", UpstreamConnection.__dict__)
        self.assertNotIn("stage", ProxiedRequest.__dict__)
        conn = UpstreamConnection(pool())
        self.assertIs(conn.state, C.CONNECTING)
        conn.state = C.CLOSED
        conn.state = C.SENT  # illegal, yet nothing runs to say so
        self.assertEqual(conn.__dict__, {"pool": conn.pool, "state": C.SENT})
        lifecycle.set_checking(True)
        with self.assertRaises(IllegalMove):
            conn.state = C.CONNECTING


def _reachable_from(found: Lifecycle, start: IntEnum) -> set[IntEnum]:
    seen, todo = {start}, [start]
    while todo:
        for new in found.moves[todo.pop()]:
            if new not in seen:
                seen.add(new)
                todo.append(new)
    return seen


def pool() -> UpstreamPool:
    return UpstreamPool(MemoryReactorClock(), parse_upstream("http://127.0.0.1:8000"), 5.0)


class Sink:
    """A ResponseSink that records what it is told."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def response_head(self, status: int, reason: bytes, fields: bytes, content_length: int | None) -> None:
        self.events.append(status)

    def response_whole(self, status: int, reason: bytes, fields: bytes, body: bytes) -> None:
        self.events.append((status, body))

    def response_data(self, data: bytes) -> None:
        self.events.append(data)

    def response_end(self) -> None:
        self.events.append("end")

    def response_failed(self, error: UpstreamError) -> None:
        self.events.append(("failed", error.before_response))

    def response_upgraded(self, connection: UpstreamConnection, rest: bytes) -> None:
        self.events.append("upgraded")
        connection.tunnel_to(self)

    def client_transport(self) -> Any:
        return None

    def write(self, data: bytes) -> None:
        self.events.append(("tunnel", data))

    def finish(self) -> None:
        self.events.append("finish")


GET = b"GET / HTTP/1.1\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
CLOSED = Failure(error.ConnectionDone())


def conn_idle() -> tuple[UpstreamConnection, StringTransport]:
    conn = UpstreamConnection(pool())
    wire = StringTransport()
    conn.makeConnection(wire)
    return conn, wire


def conn_sent(complete: bool = True, head_only: bool = False) -> tuple[UpstreamConnection, Sink, StringTransport]:
    conn, wire = conn_idle()
    sink = Sink()
    conn.send(GET, sink, head_only)
    conn.request_complete = complete
    return conn, sink, wire


# Each scenario drives a real connection, and returns the moves it must have made and what else must hold.
def c_keep_alive() -> tuple[list[Any], bool]:
    conn, sink, _ = conn_sent()
    conn.dataReceived(OK)
    return [(C.CONNECTING, C.IDLE), (C.IDLE, C.SENT), (C.SENT, C.HEAD), (C.HEAD, C.DONE), (C.DONE, C.IDLE)], (
        sink.events == [(200, b"hi")] and conn.pool.acquire() is conn
    )


def c_pool_closes_idle() -> tuple[list[Any], bool]:
    conn, wire = conn_idle()
    conn.pool.release(conn)
    conn.pool.close()
    conn.connectionLost(CLOSED)
    return [(C.CONNECTING, C.IDLE), (C.IDLE, C.CLOSING), (C.CLOSING, C.CLOSED)], wire.disconnecting


def c_app_closes_idle() -> tuple[list[Any], bool]:
    conn, _ = conn_idle()
    conn.pool.release(conn)
    conn.connectionLost(CLOSED)
    return [(C.CONNECTING, C.IDLE), (C.IDLE, C.CLOSED)], conn.pool._idle == []


def c_closed_unanswered() -> tuple[list[Any], bool]:
    conn, sink, wire = conn_sent()
    conn.close()
    return [(C.CONNECTING, C.IDLE), (C.IDLE, C.SENT), (C.SENT, C.CLOSING)], wire.disconnecting and sink.events == []


def c_app_closes_unanswered() -> tuple[list[Any], bool]:
    conn, sink, _ = conn_sent()
    conn.connectionLost(CLOSED)
    return [(C.CONNECTING, C.IDLE), (C.IDLE, C.SENT), (C.SENT, C.CLOSED)], sink.events == [("failed", True)]


def c_chunked_then_close() -> tuple[list[Any], bool]:
    conn, sink, wire = conn_sent(complete=False)  # the request body is still going: no reuse
    conn.dataReceived(b"HTTP/1.1 200 OK\r\n")
    conn.dataReceived(b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
    conn.dataReceived(b"0\r\n\r\n")
    moves = [(C.CONNECTING, C.IDLE), (C.IDLE, C.SENT), (C.SENT, C.HEAD), (C.HEAD, C.BODY), (C.BODY, C.DONE)]
    return [*moves, (C.DONE, C.CLOSING)], sink.events == [200, b"hi", "end"] and wire.disconnecting


def c_tunnel_client_closes() -> tuple[list[Any], bool]:
    conn, sink, wire = conn_sent()
    conn.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    conn.dataReceived(b"ws")
    conn.loseConnection()
    moves = [(C.CONNECTING, C.IDLE), (C.IDLE, C.SENT), (C.SENT, C.HEAD), (C.HEAD, C.TUNNEL), (C.TUNNEL, C.CLOSING)]
    return moves, sink.events == [101, "upgraded", ("tunnel", b"ws")] and wire.disconnecting


def c_tunnel_app_closes() -> tuple[list[Any], bool]:
    conn, sink, _ = conn_sent()
    conn.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    conn.connectionLost(CLOSED)
    moves = [(C.CONNECTING, C.IDLE), (C.IDLE, C.SENT), (C.SENT, C.HEAD), (C.HEAD, C.TUNNEL), (C.TUNNEL, C.CLOSED)]
    return moves, sink.events == [101, "upgraded", "finish"]


def c_malformed_head() -> tuple[list[Any], bool]:
    conn, sink, wire = conn_sent()
    conn.dataReceived(b"HTTP/1.1 two hundred\r\n\r\n")
    moves = [(C.CONNECTING, C.IDLE), (C.IDLE, C.SENT), (C.SENT, C.HEAD), (C.HEAD, C.CLOSING)]
    return moves, sink.events == [("failed", True)] and wire.disconnecting


def c_closed_mid_head() -> tuple[list[Any], bool]:
    conn, sink, _ = conn_sent()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\n")
    conn.connectionLost(CLOSED)
    moves = [(C.CONNECTING, C.IDLE), (C.IDLE, C.SENT), (C.SENT, C.HEAD), (C.HEAD, C.CLOSED)]
    return moves, sink.events == [("failed", False)]


def c_malformed_chunk() -> tuple[list[Any], bool]:
    conn, sink, wire = conn_sent()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    moves = [(C.CONNECTING, C.IDLE), (C.IDLE, C.SENT), (C.SENT, C.HEAD), (C.HEAD, C.BODY), (C.BODY, C.CLOSING)]
    return moves, sink.events == [200, ("failed", False)] and wire.disconnecting


def c_body_until_close() -> tuple[list[Any], bool]:
    conn, sink, _ = conn_sent()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nall")
    conn.connectionLost(CLOSED)
    moves = [(C.CONNECTING, C.IDLE), (C.IDLE, C.SENT), (C.SENT, C.HEAD), (C.HEAD, C.BODY), (C.BODY, C.CLOSED)]
    return moves, sink.events == [200, b"all", "end"]


def c_head_answer_with_bytes() -> tuple[list[Any], bool]:
    conn, sink, wire = conn_sent(head_only=True)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    conn.connectionLost(CLOSED)
    moves = [(C.CONNECTING, C.IDLE), (C.IDLE, C.SENT), (C.SENT, C.HEAD), (C.HEAD, C.DONE), (C.DONE, C.CLOSING)]
    # the answer is not reused (lost), and the bytes after it abort the connection (aborted again)
    moves += [(C.CLOSING, C.CLOSING), (C.CLOSING, C.CLOSED)]
    return moves, sink.events == [200, "end"] and wire.disconnecting


CONN_SCENARIOS: list[Callable[[], tuple[list[Any], bool]]] = [
    c_keep_alive,
    c_pool_closes_idle,
    c_app_closes_idle,
    c_closed_unanswered,
    c_app_closes_unanswered,
    c_chunked_then_close,
    c_tunnel_client_closes,
    c_tunnel_app_closes,
    c_malformed_head,
    c_closed_mid_head,
    c_malformed_chunk,
    c_body_until_close,
    c_head_answer_with_bytes,
]


class ConnectionScenarioTests(SynchronousTestCase):
    def test_each_scenario_makes_its_moves(self) -> None:
        """Each way an app connection lives makes exactly the moves written down for it."""
        for scenario in CONN_SCENARIOS:
            with recording(CONN) as (log,):
                expected, holds = scenario()
            self.assertEqual(log, expected, scenario.__name__)
            self.assertTrue(holds, scenario.__name__)

    def test_the_scenarios_make_every_move_of_the_table(self) -> None:
        """Together the scenarios make every move the table allows: each state is reachable, no move is idle."""
        made: set[Any] = set()
        for scenario in CONN_SCENARIOS:
            with recording(CONN) as (log,):
                scenario()
            made.update(log)
        self.assertEqual(made, {(old, new) for old, targets in CONN_MOVES.items() for new in targets})

    def test_a_sink_may_close_the_connection_while_told(self) -> None:
        """A sink that closes the connection from its callback (as the readiness check does) ends it there."""
        for answer, head_only in ((OK, False), (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", True)):
            conn, sink, wire = conn_sent(head_only=head_only)
            sink.response_whole = sink.response_head = lambda *a, conn=conn: conn.close()  # type: ignore[method-assign]
            conn.dataReceived(answer)
            self.assertIs(conn.state, C.CLOSING)
            self.assertIsNot(conn.pool.acquire(), conn, "a closed connection is not pooled")

    def test_a_refused_upgrade_leaves_no_tunnel(self) -> None:
        """A sink that closes on a 101 (the readiness check) is not made a tunnel peer it cannot be."""
        conn, sink, wire = conn_sent()
        sink.response_upgraded = lambda connection, rest: connection.close()  # type: ignore[method-assign]
        sink.finish = sink.write = None  # type: ignore[assignment,method-assign]  # as the readiness check: neither
        conn.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        conn.connectionLost(CLOSED)
        self.assertEqual((sink.events, conn.state, wire.disconnecting), ([101], C.CLOSED, True))

    def test_an_aborted_idle_connection_is_not_handed_out(self) -> None:
        """Bytes nobody asked for abort a pooled connection; until it is gone the pool dials anew."""
        conn, wire = conn_idle()
        conn.pool.release(conn)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertTrue(wire.disconnecting)
        self.assertIsNot(conn.pool.acquire(), conn)


class RequestScenarioTests(SynchronousTestCase):
    def fresh(self, apps: int = 1) -> None:
        """A new reactor and proxy (before ``apps`` upstreams) for each scenario: no pooled connection carries over."""
        self.reactor = MemoryReactorClock()
        self.patch(FakeExchange, "clock", self.reactor)
        server = Server(connect_timeout=5, upstream_timeout=30, send_timeout=20, body_timeout=20, buffer_dir=self.dir)
        upstreams = tuple(parse_upstream(f"http://127.0.0.1:{8000 + n}") for n in range(apps))
        site = Site(hosts=("app.test",), upstream=upstreams[0], upstreams=upstreams, tls="files")  # type: ignore[arg-type]
        self.handler = ProxyHandler(self.reactor, [site], server)

    def setUp(self) -> None:
        self.dir = scratch(self)

    def start(self, exchange: FakeExchange) -> FakeExchange:
        self.handler.handle(exchange)
        return exchange

    def get(self) -> FakeExchange:
        return self.start(FakeExchange(head()))

    def app(self) -> tuple[UpstreamConnection, StringTransport]:
        protocol = self.reactor.tcpClients[-1][2].buildProtocol(None)
        wire = StringTransport()
        protocol.makeConnection(wire)
        return protocol, wire

    def upgrade(self) -> tuple[FakeExchange, UpstreamConnection]:
        exchange = FakeExchange(head())
        exchange.head.upgrade = b"websocket"
        exchange.start_tunnel = lambda peer: None  # type: ignore[attr-defined]
        self.start(exchange)
        app, _ = self.app()
        app.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        return exchange, app

    def draining(self) -> tuple[FakeExchange, UpstreamConnection]:
        exchange = self.get()
        app, _ = self.app()
        app.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        exchange.producer.pauseProducing()  # the client stops reading: the rest waits in the buffer
        app.dataReceived(b"cd")
        return exchange, app

    def scenarios(self) -> list[Callable[[], tuple[list[Any], bool]]]:
        got = [(S.NEW, S.DIALLING), (S.DIALLING, S.SENT)]

        def whole() -> tuple[list[Any], bool]:
            exchange = self.get()
            self.app()[0].dataReceived(OK)
            return [*got, (S.SENT, S.DONE)], exchange.finished and exchange.body == b"hi"

        def stalled_body() -> tuple[list[Any], bool]:
            exchange = FakeExchange(chunked_head())
            exchange.body_ends = False
            self.start(exchange)
            self.reactor.advance(21)
            return [(S.NEW, S.RECEIVING_BODY), (S.RECEIVING_BODY, S.ABANDONED)], exchange.status == 408

        def held_body() -> tuple[list[Any], bool]:
            exchange = self.start(FakeExchange(chunked_head(), b"hello"))
            self.app()[0].dataReceived(OK)
            moves = [(S.NEW, S.RECEIVING_BODY), (S.RECEIVING_BODY, S.DIALLING), (S.DIALLING, S.SENT)]
            return [*moves, (S.SENT, S.DONE)], exchange.body == b"hi"

        def refusal() -> None:
            self.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))

        def refused() -> tuple[list[Any], bool]:
            self.fresh(apps=2)
            exchange = self.get()
            refusal()  # the first upstream: the request goes on to the second
            refusal()
            moves = [(S.NEW, S.DIALLING), (S.DIALLING, S.DIALLING), (S.DIALLING, S.ABANDONED)]
            return moves, exchange.status == 502 and len(self.reactor.tcpClients) == 2

        def retried() -> tuple[list[Any], bool]:
            self.get()
            app, _ = self.app()
            app.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")  # pooled now
            exchange = self.get()
            app.connectionLost(CLOSED)  # the app had closed it: once more, on a new connection
            self.app()[0].dataReceived(OK)
            first = [*got, (S.SENT, S.RELAYING), (S.RELAYING, S.DONE)]
            return [*first, *got, (S.SENT, S.DIALLING), (S.DIALLING, S.SENT), (S.SENT, S.DONE)], exchange.body == b"hi"

        def silent_app() -> tuple[list[Any], bool]:
            exchange = self.get()
            self.app()
            self.reactor.advance(31)
            return [*got, (S.SENT, S.ABANDONED)], exchange.status == 504

        def relayed() -> tuple[list[Any], bool]:
            exchange = self.get()
            app, _ = self.app()
            app.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
            app.dataReceived(b"cd")
            return [*got, (S.SENT, S.RELAYING), (S.RELAYING, S.DONE)], exchange.body == b"abcd"

        def client_left_mid_body() -> tuple[list[Any], bool]:
            exchange = self.get()
            app, wire = self.app()
            app.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
            exchange.observer.client_gone()
            return [*got, (S.SENT, S.RELAYING), (S.RELAYING, S.ABANDONED)], wire.disconnecting

        def drained() -> tuple[list[Any], bool]:
            exchange, _ = self.draining()
            exchange.producer.resumeProducing()
            moves = [*got, (S.SENT, S.RELAYING), (S.RELAYING, S.DRAINING), (S.DRAINING, S.DONE)]
            return moves, exchange.finished and exchange.body == b"abcd"

        def too_slow_to_drain() -> tuple[list[Any], bool]:
            exchange, _ = self.draining()
            self.reactor.advance(21)
            moves = [*got, (S.SENT, S.RELAYING), (S.RELAYING, S.DRAINING), (S.DRAINING, S.ABANDONED)]
            return moves, exchange.aborted

        def tunnel_app_closes() -> tuple[list[Any], bool]:
            exchange, app = self.upgrade()
            app.connectionLost(CLOSED)
            exchange.observer.client_gone()
            moves = [*got, (S.SENT, S.TUNNEL), (S.TUNNEL, S.TUNNEL_ENDED), (S.TUNNEL_ENDED, S.ABANDONED)]
            return moves, exchange.finished and exchange.status == 101

        def tunnel_client_closes() -> tuple[list[Any], bool]:
            exchange, app = self.upgrade()
            exchange.observer.client_gone()
            return [*got, (S.SENT, S.TUNNEL), (S.TUNNEL, S.ABANDONED)], app.state is C.CLOSING

        return [
            whole,
            stalled_body,
            held_body,
            refused,
            retried,
            silent_app,
            relayed,
            client_left_mid_body,
            drained,
            too_slow_to_drain,
            tunnel_app_closes,
            tunnel_client_closes,
        ]

    def test_each_scenario_makes_its_moves(self) -> None:
        """Each way a proxied request lives makes exactly the moves written down for it."""
        for scenario in self.scenarios():
            self.fresh()
            with recording(REQUEST) as (log,):
                expected, holds = scenario()
            self.assertEqual(log, expected, scenario.__name__)
            self.assertTrue(holds, scenario.__name__)

    def test_the_scenarios_make_every_move_of_the_table(self) -> None:
        """Together the scenarios make every move the table allows: each stage is reachable, no move is idle."""
        made: set[Any] = set()
        for scenario in self.scenarios():
            self.fresh()
            with recording(REQUEST) as (log,):
                scenario()
            made.update(log)
        self.assertEqual(made, {(old, new) for old, targets in REQUEST_MOVES.items() for new in targets})

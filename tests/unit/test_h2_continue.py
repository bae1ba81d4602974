"""HTTP/2 and ``expect: 100-continue``: the interim 100 the proxy sends before it reads a body."""

from __future__ import annotations

from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, InformationalResponseReceived, ResponseReceived
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.http.h2 import H2ServerProtocol
from tlsproxy.http.server import Limits


class Holding:
    """A handler that keeps every exchange."""

    def __init__(self) -> None:
        self.exchanges: list[Any] = []

    def handle(self, exchange: Any) -> None:
        self.exchanges.append(exchange)


class ContinueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.handler = Holding()
        self.server = H2ServerProtocol(self.handler, Clock(), Limits(idle_timeout=30))
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.events: list[Any] = []
        self.pump()

    def pump(self) -> None:
        for _ in range(10):
            to_server = self.client.data_to_send()
            if to_server:
                self.server.dataReceived(to_server)
            to_client = self.transport.value()
            self.transport.clear()
            if to_client:
                self.events += self.client.receive_data(to_client)
            if not to_server and not to_client:
                return

    def post(self) -> int:
        stream = self.client.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":path", b"/upload"),
            (b":scheme", b"https"),
            (b":authority", b"app.test"),
            (b"expect", b"100-continue"),
        ]
        self.client.send_headers(stream, headers)
        self.pump()
        return stream

    def test_interim_100_then_the_answer(self) -> None:
        """send_continue gives the client a 100 on its stream; the body and a final answer follow as usual."""
        stream = self.post()
        exchange = self.handler.exchanges[0]
        exchange.send_continue()
        self.pump()
        interim = [e for e in self.events if isinstance(e, InformationalResponseReceived)]
        self.assertEqual([(e.stream_id, dict(e.headers)[b":status"]) for e in interim], [(stream, b"100")])
        body: list[bytes] = []

        class Sink:
            def body_data(self, data: bytes) -> None:
                body.append(data)

            def body_end(self) -> None:
                body.append(b"<end>")

        exchange.set_body_consumer(Sink())
        self.client.send_data(stream, b"payload", end_stream=True)
        self.pump()
        self.assertEqual(body, [b"payload", b"<end>"])
        exchange.respond(200, b"OK", [(b"content-type", b"text/plain")], b"done")
        self.pump()
        final = [e for e in self.events if isinstance(e, ResponseReceived)]
        self.assertEqual(dict(final[0].headers)[b":status"], b"200")
        self.assertEqual(b"".join(e.data for e in self.events if isinstance(e, DataReceived)), b"done")

    def test_no_100_once_answered_or_body_complete(self) -> None:
        """No interim answer after the final one has started, nor for a stream whose body already ended."""
        self.post()
        exchange = self.handler.exchanges[0]
        exchange.start_response(413, b"", [], 0)
        exchange.send_continue()
        stream = self.client.get_next_available_stream_id()
        self.client.send_headers(
            stream,
            [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"https"), (b":authority", b"app.test")],
            end_stream=True,
        )
        self.pump()
        self.handler.exchanges[1].send_continue()
        self.pump()
        self.assertEqual([e for e in self.events if isinstance(e, InformationalResponseReceived)], [])

"""What a request handler sees of one request, whichever HTTP version carried it.

The HTTP/1.1 and HTTP/2 server protocols each turn a client's request into an
:class:`Exchange`; handlers (the proxy, the port-80 redirector) answer it.  A
handler reads the body by attaching a :class:`BodyConsumer`, and writes the
response with ``start_response`` / ``write`` / ``finish``.  Framing (chunked,
Content-Length, Connection) is the protocol's business, never the handler's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.interfaces import IPushProducer

from tlsproxy.deadline import Deadline

Headers = list[tuple[bytes, bytes]]
# A response's fields, as (name, value) pairs or already as HTTP/1.1 field
# lines ("name: value\r\n" each), which the proxy relays without a split.
ResponseFields = Headers | bytes


@dataclass(slots=True)
class RequestHead:
    """A parsed, validated request head; header names are lower case."""

    method: bytes
    target: bytes
    version: bytes  # b"1.0", b"1.1" or b"2"
    host: bytes
    headers: Headers = field(default_factory=list)
    content_length: int | None = None
    chunked: bool = False
    upgrade: bytes = b""  # the Upgrade header of an HTTP/1.1 upgrade request

    def get(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class BodyConsumer(Protocol):
    def body_data(self, data: bytes) -> None: ...

    def body_end(self) -> None: ...


class ExchangeObserver(Protocol):
    def client_gone(self) -> None:
        """The client went away before the response was finished."""


class Exchange(Protocol):
    head: RequestHead
    client_address: str
    secure: bool
    server_port: int
    # A deadline the handler may use while it answers (one pending timer
    # per connection or stream, however often it moves).
    deadline: Deadline
    transport: Any  # the client's transport
    # Set by the proxy when it first sees the request (tlsproxy/proxy/accesslog.py: begin).
    request_id: str
    started: float

    def set_body_consumer(self, consumer: BodyConsumer) -> None: ...

    def pause_body(self) -> None: ...

    def resume_body(self) -> None: ...

    def set_observer(self, observer: ExchangeObserver) -> None: ...

    def start_response(
        self, status: int, reason: bytes, headers: ResponseFields, content_length: int | None
    ) -> None: ...

    def respond(self, status: int, reason: bytes, headers: ResponseFields, body: bytes) -> None:
        """start_response, write and finish in one go (one write where the protocol can)."""

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None: ...

    def register_producer(self, producer: IPushProducer) -> None: ...

    def unregister_producer(self) -> None: ...

    def start_tunnel(self, peer: object) -> None: ...

    @property
    def response_started(self) -> bool: ...


class Handler(Protocol):
    def handle(self, exchange: Exchange) -> None: ...

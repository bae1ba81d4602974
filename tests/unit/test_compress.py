"""Compression of answers on their way to the client: negotiation, header rules, slices, streaming, back-pressure."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import brotli
import pytest
import zstandard
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tests.unit.test_proxy_handler import FakeExchange, head
from tlsproxy.config import HSTS, ConfigError, Server, Site, parse, parse_upstream
from tlsproxy.http.exchange import RequestHead
from tlsproxy.http.wire import split_fields
from tlsproxy.proxy import compress
from tlsproxy.proxy.compress import (
    SLICE,
    CompressingExchange,
    choose_coding,
    compressible,
    encoded_headers,
    plan,
    qualifies,
    wrap,
)
from tlsproxy.proxy.handler import ProxyHandler

JSON = [(b"content-type", b"application/json")]
HTML = b"content-type: text/html; charset=utf-8\r\n"


def decode(coding: str, data: bytes) -> bytes:
    if coding == "gzip":
        return gzip.decompress(data)
    if coding == "br":
        return brotli.decompress(data)
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def decode_so_far(coding: str, data: bytes) -> bytes:
    """What a client can decode of a stream that has not ended yet."""
    if coding == "gzip":
        return zlib.decompressobj(31).decompress(data)
    if coding == "br":
        return brotli.Decompressor().process(data)
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def big_json(size: int) -> bytes:
    rows = []
    total = 0
    i = 0
    while total < size:
        row = json.dumps({"id": i, "name": f"user{i}", "email": f"user{i}@example.com", "active": i % 2 == 0})
        rows.append(row)
        total += len(row) + 2
        i += 1
    return ("[" + ", ".join(rows) + "]").encode()


class Turns:
    """A reactor whose callLater(0) calls run only when the test turns it, one turn at a time."""

    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.pending: list[Any] = []
        self.turns = 0

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(self, delay: float, f: Any, *args: Any) -> Any:
        assert delay == 0
        call = Call(f, args)
        self.pending.append(call)
        return call

    def turn(self) -> None:
        """One reactor iteration: the calls due now, not those they schedule."""
        due, self.pending = self.pending, []
        self.turns += 1
        for call in due:
            if not call.cancelled:
                call.f(*call.args)

    def run(self, limit: int = 100000) -> None:
        while self.pending and limit:
            self.turn()
            limit -= 1


class Call:
    def __init__(self, f: Any, args: Any) -> None:
        self.f, self.args, self.cancelled = f, args, False

    def cancel(self) -> None:
        self.cancelled = True


class Client(FakeExchange):
    """The client's exchange: records the announced length and can push back."""

    length: int | None = -1

    def start_response(self, status: int, reason: bytes, headers: Any, content_length: int | None) -> None:
        super().start_response(status, reason, headers, content_length)
        self.length = content_length

    def respond(self, status: int, reason: bytes, headers: Any, body: bytes) -> None:
        self.responded = True
        super().respond(status, reason, headers, body)

    responded = False


class Producer:
    """The handler's side: counts pauses and resumes."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.stopped = False

    def pauseProducing(self) -> None:
        assert not self.paused, "paused twice"
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        assert self.paused, "resumed while running"
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


def exchange_for(accept: bytes | None, method: bytes = b"GET", reactor: Any = None) -> tuple[Any, Client, Turns]:
    turns = Turns() if reactor is None else reactor
    Client.clock = turns.clock
    request = head(method)
    if accept is not None:
        request.headers.append((b"accept-encoding", accept))
    client = Client(request)
    compress._choices.clear()
    return wrap(client, turns, 60.0), client, turns


# -- negotiation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (b"gzip, deflate, br, zstd", "zstd"),  # Chrome's, Firefox's: our order breaks the tie
        (b"gzip, deflate, br", "br"),  # Safari's
        (b"gzip, deflate", "gzip"),
        (b"gzip", "gzip"),
        (b"x-gzip", "gzip"),
        (b"GZIP;Q=0.8", "gzip"),
        (b"zstd;q=0.5, gzip", "gzip"),
        (b"zstd;q=0.5, gzip;q=0.4", "zstd"),
        (b"gzip;q=0.001", "gzip"),
        (b"*", "zstd"),
        (b"*;q=0.2, zstd;q=0", "br"),
        (b"*;q=0.2, zstd;q=0, br;q=0", "gzip"),
        (b"gzip;q=0, *", "zstd"),
        (b"*;q=0", None),
        (b"identity", None),
        (b"identity;q=0", None),  # nothing of ours accepted: identity all the same, not a 406
        (b"identity;q=0, gzip", "gzip"),
        (b"br", "br"),
        (b"br;q=0.5, gzip", "gzip"),
        (b"deflate", None),
        (b"", None),
        (b" , ;, gzip ; q=1.0 ", "gzip"),
        (b"gzip;q=abc", None),
        (b"gzip;q=2", None),
        (b"gzip;q=-1", None),
        (b"gzip, gzip;q=0", None),  # said twice: the refusal wins
        (b"gzip;q=0, gzip", None),
        (b"zstd;q=0.9;foo=bar, gzip;q=0.8", "zstd"),
    ],
)
def test_choose_coding(accept: bytes, chosen: str | None) -> None:
    """The client's best-liked coding of ours by q-value, ties going zstd first; q=0 refuses."""
    assert choose_coding(accept) == chosen


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (b"text/html; charset=utf-8", True),
        (b"Text/CSS", True),
        (b"text/javascript", True),
        (b"text/plain", True),
        (b"application/json", True),
        (b"application/vnd.api+json", True),
        (b"application/manifest+json", True),
        (b"application/javascript", True),
        (b"application/xml", True),
        (b"application/atom+xml", True),
        (b"image/svg+xml", True),
        (b"application/wasm", True),
        (b"font/ttf", True),
        (b"text/event-stream", False),
        (b"text/event-stream; charset=utf-8", False),
        (b"image/png", False),
        (b"image/jpeg", False),
        (b"font/woff2", False),
        (b"application/octet-stream", False),
        (b"application/zip", False),
        (b"application/gzip", False),
        (b"video/mp4", False),
        (b"", False),
    ],
)
def test_compressible(kind: bytes, expected: bool) -> None:
    """Text-like types are compressed; already-compressed formats and event streams are not."""
    assert compressible(kind) is expected


@pytest.mark.parametrize(
    ("status", "headers", "length", "expected"),
    [
        (200, JSON, None, True),
        (200, JSON, 1024, True),
        (200, JSON, 1023, False),
        (404, [(b"content-type", b"text/html")], 5000, True),
        (500, [(b"content-type", b"text/html")], 5000, True),
        (101, JSON, None, False),
        (204, JSON, None, False),
        (206, [*JSON, (b"content-range", b"bytes 0-9999/20000")], 10000, False),
        (304, JSON, None, False),
        (200, [], 5000, False),  # no Content-Type: unknown bytes are left alone
        (200, [(b"content-type", b"image/png")], 5000, False),
        (200, [*JSON, (b"content-encoding", b"gzip")], None, False),
        (200, [*JSON, (b"content-encoding", b"identity")], None, False),
        (200, [*JSON, (b"cache-control", b"no-transform")], None, False),
        (200, [*JSON, (b"cache-control", b"private, No-Transform")], None, False),
        (200, [*JSON, (b"cache-control", b"max-age=60, no-store")], None, True),
        (200, [*JSON, (b"cache-control", b"x-no-transformer")], None, True),
    ],
)
def test_qualifies(status: int, headers: list, length: int | None, expected: bool) -> None:
    """Only bodies of text-like types, 1 KiB or more (or unknown), not encoded, not no-transform, not 206/304."""
    assert qualifies(status, headers, length) is expected


def test_encoded_headers_rewrite() -> None:
    """A coded answer: Content-Encoding, weak ETag, no Content-Length or Accept-Ranges, Vary merged."""
    headers = [
        (b"content-type", b"text/css"),
        (b"etag", b'"abc"'),
        (b"content-length", b"5000"),
        (b"accept-ranges", b"bytes"),
        (b"vary", b"Cookie"),
        (b"cache-control", b"public"),
    ]
    assert encoded_headers(headers, "gzip") == [
        (b"content-type", b"text/css"),
        (b"etag", b'W/"abc"'),
        (b"vary", b"Cookie, Accept-Encoding"),
        (b"cache-control", b"public"),
        (b"content-encoding", b"gzip"),
    ]


@pytest.mark.parametrize(
    ("vary", "expected"),
    [
        ([], [(b"vary", b"Accept-Encoding")]),
        ([(b"vary", b"accept-encoding")], [(b"vary", b"accept-encoding")]),
        ([(b"vary", b"Cookie, Accept-Encoding")], [(b"vary", b"Cookie, Accept-Encoding")]),
        ([(b"vary", b"*")], [(b"vary", b"*")]),
        ([(b"vary", b"")], [(b"vary", b"Accept-Encoding")]),
        (
            [(b"vary", b"Cookie"), (b"vary", b"Accept-Encoding")],
            [(b"vary", b"Cookie, Accept-Encoding"), (b"vary", b"Accept-Encoding")],
        ),
    ],
)
def test_vary_merged(vary: list, expected: list) -> None:
    """Accept-Encoding joins an existing Vary (once), and ``Vary: *`` is left as it is."""
    out = encoded_headers([(b"content-type", b"text/html"), *vary], None)
    assert [h for h in out if h[0] == b"vary"] == expected


def test_weak_etag_stays_weak_and_identity_keeps_strong() -> None:
    """A weak ETag is not weakened twice; an answer left uncoded keeps its strong ETag and length."""
    coded = encoded_headers([(b"etag", b'W/"a"')], "zstd")
    assert (b"etag", b'W/"a"') in coded
    plain = encoded_headers([(b"etag", b'"a"'), (b"content-length", b"9")], None)
    assert plain == [(b"etag", b'"a"'), (b"content-length", b"9"), (b"vary", b"Accept-Encoding")]


# Field lines an app sends, and look-alikes the scan must not mistake for them.
LINES = {
    "content-type": ["text/html; charset=utf-8", "image/png", "application/json", "text/event-stream"],
    "content-encoding": ["gzip", "identity"],
    "content-range": ["bytes 0-9/20"],
    "vary": ["Cookie", "accept-encoding", "*", ""],
    "cache-control": ["no-transform", "public, No-Transform", "max-age=60", "x-no-transform"],
    "etag": ['"e1"', 'W/"e2"'],
    "x-content-type": ["text/html"],
    "x-vary": ["Cookie"],
    "content-length": ["5000"],
    "accept-ranges": ["bytes"],
}
LINE = st.sampled_from(sorted(LINES)).flatmap(
    lambda name: st.tuples(st.just(name), st.sampled_from(LINES[name]), st.booleans())
)


TEXT = st.tuples(st.just("content-type"), st.sampled_from(["text/html", "application/json"]), st.booleans())


@settings(max_examples=300)
@given(
    status=st.sampled_from([200, 200, 404, 101, 204, 206, 304]),
    lines=st.tuples(st.lists(TEXT, max_size=1), st.lists(LINE, max_size=4)).flatmap(
        lambda parts: st.permutations(parts[0] + parts[1])
    ),
    length=st.sampled_from([None, 1023, 50000]),
    coding=st.sampled_from([None, "gzip"]),
)
@example(status=200, lines=[("content-type", "text/html", False), ("cache-control", "no-transform", True)], length=None,
         coding=None)  # fmt: skip
@example(status=200, lines=[("content-encoding", "gzip", True), ("content-type", "text/html", False)], length=None,
         coding=None)  # fmt: skip
@example(status=200, lines=[("content-type", "text/html", False), ("content-range", "bytes 0-9/20", False)],
         length=None, coding=None)  # fmt: skip
@example(status=200, lines=[("content-type", "text/html", False), ("vary", "Cookie", True)], length=None, coding=None)
@example(status=200, lines=[("x-content-type", "text/html", False)], length=None, coding=None)
def test_plan_on_a_block_is_plan_on_its_fields(
    status: int, lines: list[tuple[str, str, bool]], length: int | None, coding: str | None
) -> None:
    """The scan of an app's field block decides and rewrites exactly as the rules on split fields do."""
    block = b"".join(f"{n.title() if upper else n}: {v}\r\n".encode() for n, v, upper in lines)
    fields = split_fields(block)
    from_block, coded_block = plan(status, block, length, coding)
    from_fields, coded_fields = plan(status, fields, length, coding)
    assert coded_block == coded_fields
    assert (split_fields(from_block) if isinstance(from_block, bytes) else from_block) == (
        split_fields(from_fields) if isinstance(from_fields, bytes) else from_fields
    )


def test_plan_leaves_an_unqualified_block_as_it_is() -> None:
    """An answer that is not coded keeps the app's block itself (no split, no copy)."""
    block = b"Content-Type: image/png\r\nVary: Cookie\r\n"
    assert plan(200, block, None, "gzip")[0] is block
    assert plan(200, block, 500, "gzip")[0] is block


# -- the exchange -------------------------------------------------------------------


def test_accept_encoding_lines_are_combined() -> None:
    """Two Accept-Encoding lines count as one list (RFC 9110 5.3): a refusal in the second holds."""
    Client.clock = MemoryReactorClock()
    request = head()
    request.headers += [(b"accept-encoding", b"zstd"), (b"accept-encoding", b"zstd;q=0, gzip")]
    compress._choices.clear()
    assert wrap(Client(request), Turns(), 60.0).coding == "gzip"


def test_odd_accept_encoding_values_are_not_kept() -> None:
    """Only short values (what browsers send) are remembered, so clients cannot fill the table with junk."""
    compress._choices.clear()
    for value in (b"gzip", b"gzip;q=0.5, " + b"x" * 300):
        request = head()
        request.headers.append((b"accept-encoding", value))
        assert wrap(Client(request), Turns(), 60.0).coding == "gzip"
    assert list(compress._choices) == [b"gzip"]


def test_no_accept_encoding_is_not_wrapped() -> None:
    """A client that sent no Accept-Encoding talks to its exchange directly (no cost per answer)."""
    wrapped, client, _ = exchange_for(None)
    assert wrapped is client


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_small_whole_answer_coded_with_its_length(coding: str) -> None:
    """An answer given whole is coded in one call and keeps a (coded) Content-Length."""
    wrapped, client, turns = exchange_for(coding.encode())
    body = b"<p>hello</p>" * 500
    wrapped.respond(200, b"OK", HTML + b'ETag: "v1"\r\n', body)
    assert client.responded and client.finished
    assert client.length == len(client.body) < len(body)
    assert decode(coding, client.body) == body
    assert (b"content-encoding", coding.encode()) in client.headers
    assert (b"etag", b'W/"v1"') in client.headers
    assert (b"vary", b"Accept-Encoding") in client.headers
    assert not turns.pending


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_large_answer_compressed_a_slice_per_turn(coding: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 5 MB answer given whole: no compress call takes more than SLICE bytes, one per reactor turn."""
    fed: list[int] = []
    real = compress.encoder

    def counting(name: str) -> Any:
        enc = real(name)
        inner = enc.compress

        def compress_(data: Any) -> bytes:
            fed.append(len(data))
            return inner(data)

        enc.compress = compress_  # type: ignore[method-assign]
        return enc

    monkeypatch.setattr(compress, "encoder", counting)
    wrapped, client, turns = exchange_for(coding.encode())
    body = big_json(5 * 1024 * 1024)
    wrapped.respond(200, b"OK", [(b"content-type", b"application/json")], body)
    assert client.length is None and not client.finished  # nothing coded yet: the call returned at once
    turns.turn()
    assert fed == [SLICE]  # one slice in the first turn
    turns.run()
    assert client.finished
    assert max(fed) <= SLICE
    assert sum(fed) == len(body)
    assert turns.turns >= len(body) // SLICE
    assert decode(coding, client.body) == body
    assert len(client.body) < len(body) // 4


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_streamed_bytes_flushed_each_turn(coding: str) -> None:
    """Bytes that stop coming are flushed at the end of the turn: a streaming answer keeps streaming."""
    wrapped, client, turns = exchange_for(coding.encode())
    wrapped.start_response(200, b"OK", [(b"content-type", b"text/plain")], None)
    assert client.length is None
    part1 = b"first line of a progress report\n" * 3
    wrapped.write(part1)
    turns.turn()
    assert decode_so_far(coding, client.body) == part1  # decodable before the answer ends
    part2 = b"second\n"
    wrapped.write(part2)
    turns.turn()
    assert decode_so_far(coding, client.body) == part1 + part2
    assert not client.finished
    wrapped.finish()
    assert client.finished
    assert decode(coding, client.body) == part1 + part2


def test_writes_in_one_turn_share_one_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small writes within one reactor turn cost one flush, not one each."""
    flushes = []
    real_flush = compress.GzipEncoder.flush
    monkeypatch.setattr(compress.GzipEncoder, "flush", lambda self: flushes.append(1) or real_flush(self))
    wrapped, client, turns = exchange_for(b"gzip")
    wrapped.start_response(200, b"OK", HTML, None)
    for _ in range(50):
        wrapped.write(b"<li>item</li>")
    turns.turn()
    assert len(flushes) == 1
    assert decode_so_far("gzip", client.body) == b"<li>item</li>" * 50


def test_backlog_pauses_the_handler_until_compressed() -> None:
    """Input waiting to be compressed past HIGH_WATER pauses the handler's producer; it resumes once coded."""
    wrapped, client, turns = exchange_for(b"zstd")
    producer = Producer()
    wrapped.start_response(200, b"OK", JSON, None)
    wrapped.register_producer(producer)
    assert client.producer is wrapped  # the client's pauses come to us
    wrapped.write(b"[" + b"1, " * 200000 + b"2]")
    assert producer.paused
    turns.run()
    assert not producer.paused and producer.pauses == 1


def test_client_pause_reaches_the_handler_and_stops_the_slices() -> None:
    """A client that stops reading pauses the handler, and no more is compressed until it reads again."""
    wrapped, client, turns = exchange_for(b"gzip")
    producer = Producer()
    wrapped.start_response(200, b"OK", JSON, None)
    wrapped.register_producer(producer)
    body = big_json(1024 * 1024)
    wrapped.write(body)
    turns.turn()
    client.producer.pauseProducing()
    sent = len(client.body)
    for _ in range(5):
        turns.turn()
    assert len(client.body) == sent and producer.paused
    client.producer.resumeProducing()
    wrapped.unregister_producer()
    wrapped.finish()
    turns.run()
    assert client.finished and client.producer is None
    assert decode("gzip", client.body) == body


@pytest.mark.parametrize("pause_first", [True, False])
def test_finish_with_a_paused_client_times_out(pause_first: bool) -> None:
    """A client that never reads the rest of a coded answer is cut off after send_timeout."""
    wrapped, client, turns = exchange_for(b"gzip")
    wrapped.start_response(200, b"OK", JSON, None)
    wrapped.write(big_json(512 * 1024))
    if pause_first:
        client.producer.pauseProducing()
        wrapped.finish()
    else:
        wrapped.finish()
        client.producer.pauseProducing()
    turns.clock.advance(59)
    assert not client.aborted
    turns.clock.advance(2)
    assert client.aborted and not client.finished


def test_client_resuming_in_time_is_not_cut() -> None:
    """A paused client that reads again before send_timeout gets the whole coded answer."""
    wrapped, client, turns = exchange_for(b"gzip")
    body = big_json(512 * 1024)
    wrapped.start_response(200, b"OK", JSON, None)
    wrapped.write(body)
    wrapped.finish()
    client.producer.pauseProducing()
    turns.clock.advance(30)
    client.producer.resumeProducing()
    turns.run()
    turns.clock.advance(60)
    assert client.finished and not client.aborted
    assert decode("gzip", client.body) == body


def test_client_pause_alone_pauses_the_handler() -> None:
    """With nothing waiting to be compressed, the client's pause and resume reach the handler."""
    wrapped, client, turns = exchange_for(b"gzip")
    producer = Producer()
    wrapped.start_response(200, b"OK", JSON, None)
    wrapped.register_producer(producer)
    wrapped.write(b"[1, 2, 3]")
    client.producer.pauseProducing()
    assert producer.paused
    client.producer.resumeProducing()
    assert not producer.paused


def test_client_gone_stops_compressing() -> None:
    """A client that leaves mid-answer: the handler hears of it and nothing more is compressed."""
    wrapped, client, turns = exchange_for(b"zstd")

    class Observer:
        gone = False

        def client_gone(self) -> None:
            self.gone = True

    observer = Observer()
    wrapped.set_observer(observer)
    wrapped.respond(200, b"OK", JSON, big_json(1024 * 1024))
    turns.turn()
    sent = len(client.body)
    client.observer.client_gone()
    turns.run()
    assert observer.gone
    assert len(client.body) == sent and not client.finished


def test_not_qualifying_passes_through() -> None:
    """An image goes out untouched, and later writes go straight to the client's exchange."""
    wrapped, client, turns = exchange_for(b"gzip, zstd")
    fields = b"content-type: image/png\r\ncontent-length: 9\r\n"
    wrapped.start_response(200, b"OK", fields, 5000)
    assert client.headers == [(b"content-type", b"image/png"), (b"content-length", b"9")]
    assert client.length == 5000
    assert wrapped.write == client.write
    wrapped.write(b"\x89PNG")
    wrapped.finish()
    assert client.body == b"\x89PNG" and client.finished


@pytest.mark.parametrize("status", [206, 304])
def test_partial_and_not_modified_untouched(status: int) -> None:
    """206 and 304 answers keep their fields and length as they are."""
    wrapped, client, _ = exchange_for(b"gzip")
    fields = [(b"content-type", b"text/css"), (b"etag", b'"e"')]
    wrapped.start_response(status, b"X", fields, 5000)
    assert client.headers == fields and client.length == 5000


def test_already_encoded_untouched() -> None:
    """The app's own gzip (or a precompressed file) is never coded twice."""
    wrapped, client, _ = exchange_for(b"gzip")
    body = gzip.compress(b"x" * 5000)
    wrapped.respond(200, b"OK", [(b"content-type", b"text/css"), (b"content-encoding", b"gzip")], body)
    assert client.body == body
    assert client.headers == [(b"content-type", b"text/css"), (b"content-encoding", b"gzip")]


def test_identity_client_gets_vary_only() -> None:
    """A client that accepts none of our codings gets the identity bytes, with Vary and the strong ETag."""
    wrapped, client, _ = exchange_for(b"deflate;q=1, identity")
    body = b"a" * 4000
    wrapped.respond(200, b"OK", [(b"content-type", b"text/plain"), (b"etag", b'"s"')], body)
    assert client.body == body and client.length == len(body)
    assert client.headers == [(b"content-type", b"text/plain"), (b"etag", b'"s"'), (b"vary", b"Accept-Encoding")]


def test_head_gets_the_fields_of_a_get() -> None:
    """HEAD: the fields a GET would have (coding, weak ETag, no length), and no body."""
    wrapped, client, _ = exchange_for(b"gzip", method=b"HEAD")
    wrapped.start_response(200, b"OK", [(b"content-type", b"text/html"), (b"etag", b'"h"')], 5000)
    assert client.length is None
    assert (b"content-encoding", b"gzip") in client.headers
    assert (b"etag", b'W/"h"') in client.headers
    wrapped.finish()
    assert client.finished and client.body == b""


def test_zstd_window_fits_browsers() -> None:
    """zstd frames we make ask for a window of at most 8 MiB, what browsers decode (RFC 9659)."""
    wrapped, client, turns = exchange_for(b"zstd")
    wrapped.start_response(200, b"OK", JSON, None)
    wrapped.write(big_json(3 * 1024 * 1024))
    wrapped.finish()
    turns.run()
    assert zstandard.get_frame_parameters(client.body).window_size <= 8 * 1024 * 1024


def test_zstd_context_reused_after_an_abandoned_answer() -> None:
    """A zstd context given back mid-frame (the client left) codes the next answer correctly."""
    compress._zstd_free.clear()
    wrapped, client, turns = exchange_for(b"zstd")
    wrapped.start_response(200, b"OK", JSON, None)
    wrapped.write(big_json(100_000))
    client.observer = None
    wrapped.client_gone()
    assert len(compress._zstd_free) == 1
    body = big_json(200_000)
    wrapped, client, turns = exchange_for(b"zstd")
    wrapped.start_response(200, b"OK", JSON, None)
    wrapped.write(body)
    wrapped.finish()
    turns.run()
    assert decode("zstd", client.body) == body


def test_upgrade_becomes_a_plain_tunnel() -> None:
    """A 101 passes through untouched, and the tunnel's bytes go to the client's exchange as they are."""
    wrapped, client, turns = exchange_for(b"gzip, deflate, br, zstd")
    tunnels: list[object] = []
    client.start_tunnel = tunnels.append  # type: ignore[attr-defined]
    fields = b"upgrade: websocket\r\nconnection: upgrade\r\n"
    wrapped.start_response(101, b"Switching Protocols", fields, None)
    peer = object()
    wrapped.start_tunnel(peer)
    frame = b"\x81\x05hello" * 500
    wrapped.write(frame)
    assert client.headers == [(b"upgrade", b"websocket"), (b"connection", b"upgrade")]
    assert tunnels == [peer] and client.body == frame and not turns.pending


def test_delegates_what_it_does_not_change() -> None:
    """The request side and attributes the handler reads are the client exchange's own."""
    wrapped, client, _ = exchange_for(b"gzip")
    assert isinstance(wrapped, CompressingExchange)
    assert wrapped.head is client.head and wrapped.deadline is client.deadline
    assert wrapped.client_address == client.client_address
    assert wrapped.set_body_consumer == client.set_body_consumer
    assert not wrapped.response_started
    with pytest.raises(AttributeError):
        wrapped.no_such_thing  # noqa: B018


# -- the site switch, through the handler ---------------------------------------------


def handler_for(compress_on: bool, reactor: MemoryReactorClock) -> ProxyHandler:
    upstream = parse_upstream("http://127.0.0.1:8000")
    site = Site(hosts=("app.test",), upstream=upstream, tls="files", hsts=HSTS(max_age=0), compress=compress_on)
    return ProxyHandler(reactor, [site], Server(connect_timeout=5, upstream_timeout=30))


@pytest.mark.parametrize("compress_on", [True, False])
def test_site_switch_through_the_proxy(compress_on: bool) -> None:
    """compress = true codes the app's answer for a gzip client; compress = false relays it as sent."""
    reactor = MemoryReactorClock()
    FakeExchange.clock = reactor
    request = RequestHead(b"GET", b"/", b"1.1", b"app.test", [(b"host", b"app.test"), (b"accept-encoding", b"gzip")])
    client = FakeExchange(request)
    handler = handler_for(compress_on, reactor)
    handler.handle(client)
    app = reactor.tcpClients[-1][2].buildProtocol(None)
    app.makeConnection(StringTransport())
    body = b"<html>" + b"<p>django</p>" * 400 + b"</html>"
    app.dataReceived(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    reactor.advance(0)
    assert client.finished
    if compress_on:
        assert (b"content-encoding", b"gzip") in client.headers
        assert gzip.decompress(client.body) == body
    else:
        assert all(name != b"content-encoding" and name != b"vary" for name, _ in client.headers)
        assert client.body == body


def test_config_compress_key() -> None:
    """compress defaults to true, takes false, and refuses a non-boolean."""
    base = {"hosts": ["a.test"], "upstream": "http://127.0.0.1:8000", "tls": "local"}
    assert parse({"site": [base]}, "t.toml", {}).sites[0].compress is True
    assert parse({"site": [{**base, "compress": False}]}, "t.toml", {}).sites[0].compress is False
    with pytest.raises(ConfigError, match="compress"):
        parse({"site": [{**base, "compress": "yes"}]}, "t.toml", {})
    environ = {"TLSPROXY_HOSTS": "a.test", "TLSPROXY_UPSTREAM": "http://127.0.0.1:8000", "TLSPROXY_SITE_TLS": "local"}
    assert parse({}, "<environment>", {**environ, "TLSPROXY_SITE_COMPRESS": "false"}).sites[0].compress is False


# -- on the real HTTP/1.1 server protocol ------------------------------------------------


class Answers:
    """A handler that answers every request whole with ``body`` (JSON), through the compressing wrapper."""

    def __init__(self, reactor: Any, body: bytes) -> None:
        self.reactor, self.body = reactor, body

    def handle(self, exchange: Any) -> None:
        wrap(exchange, self.reactor, 60.0).respond(200, b"OK", b"content-type: application/json\r\n", self.body)


def dechunk(data: bytes) -> tuple[bytes, bytes]:
    """The body of one chunked message, and what follows it."""
    body = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert data.startswith(b"\r\n")
            return body, data[2:]
        body, data = body + data[:size], data[size + 2 :]


def test_http11_sliced_answer_frames_and_pipelines() -> None:
    """Over HTTP/1.1 a sliced answer goes out chunked and ends only after its last slice; the next request follows."""
    from tlsproxy.http.server import HTTP11ServerProtocol, Limits

    reactor = Turns()
    body = big_json(300 * 1024)
    proto = HTTP11ServerProtocol(Answers(reactor, body), reactor.clock, Limits(), secure=False)
    transport = StringTransport()
    proto.makeConnection(transport)
    compress._choices.clear()
    request = b"GET /a HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n"
    proto.dataReceived(request + request)  # two pipelined requests
    first = transport.value()
    assert first.count(b"HTTP/1.1 200") == 1 and not first.endswith(b"0\r\n\r\n")  # still coding
    reactor.run()
    out = transport.value()
    head, _, rest = out.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"content-encoding: gzip" in head.lower()
    assert b"Content-Length" not in head
    coded, rest = dechunk(rest)
    assert gzip.decompress(coded) == body
    assert rest.startswith(b"HTTP/1.1 200")  # the second answer, after the first ended
    second_head, _, second = rest.partition(b"\r\n\r\n")
    assert gzip.decompress(dechunk(second)[0]) == body


class Logged:
    """An access log that keeps (status, bytes_out) of each record."""

    def __init__(self) -> None:
        self.records: list[tuple[int, int]] = []

    def log(self, exchange: Any, status: int, size: int, *rest: Any) -> None:
        self.records.append((status, size))


def proxied(reactor: MemoryReactorClock, answer: bytes) -> tuple[FakeExchange, Logged]:
    """A gzip client's GET through a compressing site, the app's bytes so far ``answer``."""
    FakeExchange.clock = reactor
    request = RequestHead(b"GET", b"/", b"1.1", b"app.test", [(b"host", b"app.test"), (b"accept-encoding", b"gzip")])
    client = FakeExchange(request)
    handler = handler_for(True, reactor)
    handler.access_log = logged = Logged()  # type: ignore[assignment]
    handler.handle(client)
    app = reactor.tcpClients[-1][2].buildProtocol(None)
    app.makeConnection(StringTransport())
    app.dataReceived(answer)
    return client, logged


@pytest.mark.parametrize("size", [2_000, 3 * SLICE])
def test_access_log_counts_the_coded_bytes(size: int) -> None:
    """bytes_out is what the client received, logged once the last coded byte is out, small or large."""
    reactor = MemoryReactorClock()
    body = big_json(size)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    client, logged = proxied(reactor, head + body)
    for _ in range(size // SLICE + 3):
        reactor.advance(0)
    assert client.finished
    assert gzip.decompress(client.body) == body
    assert logged.records == [(200, len(client.body))]
    assert len(client.body) < len(body) // 4


def test_access_log_counts_what_went_out_before_the_client_left() -> None:
    """A client gone mid-answer: one record, with the coded bytes it was sent."""
    reactor = MemoryReactorClock()
    body = big_json(8 * SLICE)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    client, logged = proxied(reactor, head + body[: SLICE // 2])
    reactor.advance(0)  # the turn's flush: the first coded bytes go out
    sent = len(client.body)
    assert 0 < sent and not client.finished and not logged.records
    client.observer.client_gone()
    reactor.advance(0)
    assert len(logged.records) == 1
    assert logged.records[0][1] == sent

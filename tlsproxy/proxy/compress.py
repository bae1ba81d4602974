"""Answers compressed on their way to the client: zstd, brotli or gzip, as the client asks.

A Django app behind us should not need ``GZipMiddleware`` (which holds a
streamed answer's chunks and costs a gunicorn worker the CPU) nor an nginx
with ``gzip on``.  The decisions (which coding, whether an answer qualifies,
how its header fields change) are plain functions.  :class:`CompressingExchange`
sits between a handler and the client's exchange and compresses as the bytes
pass: no answer is held whole, at most ``SLICE`` bytes of input go into one
compress call (a 5 MB JSON answer is compressed a slice per reactor turn, so
other connections are served between slices), and bytes that stop coming are
flushed at the end of the reactor turn, so a streaming answer keeps streaming.

zstd goes to the browsers that take it (Chrome, Edge, Firefox), brotli to
Safari, which takes no zstd: at quality 4 it costs about gzip 4's CPU and codes
smaller.  gzip is for the rest.  bench/compression.py has the figures.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import brotli
import zstandard
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from tlsproxy.http.accept_encoding import accept_encoding_of, parse_accept_encoding
from tlsproxy.http.exchange import Exchange, ExchangeObserver, Headers, ResponseFields
from tlsproxy.http.wire import split_fields

# Ours, best first when the client likes them equally.
CODINGS = ("zstd", "br", "gzip")
SLICE = 64 * 1024  # input bytes per compress call: about 1 ms of CPU, whichever coding
HIGH_WATER = 2 * SLICE  # input waiting past this pauses whoever writes
MIN_SIZE = 1024  # smaller answers gain less than the bytes a coding's framing costs
GZIP_LEVEL = 4
BROTLI_QUALITY = 4
BROTLI_WINDOW_LOG = 19  # 512 KiB, as zstd's
ZSTD_LEVEL = 3
# A 512 KiB window: a quarter of level 3's memory per open answer, about the same
# ratio on web answers, and well inside the 8 MiB that browsers accept (RFC 9659).
ZSTD_WINDOW_LOG = 19
NO_BODY = frozenset({204, 205, 206, 304})

# Types worth compressing; text/event-stream is not (each event is flushed alone,
# and some clients' event parsers stall on a coding): see compressible().
_TYPES = frozenset(
    {
        b"application/json",
        b"application/javascript",
        b"application/x-javascript",
        b"application/ecmascript",
        b"application/xml",
        b"application/wasm",
        b"application/x-ndjson",
        b"application/rtf",
        b"application/vnd.ms-fontobject",
        b"application/x-font-ttf",
        b"font/ttf",
        b"font/otf",
        b"image/svg+xml",
        b"image/x-icon",
        b"image/vnd.microsoft.icon",
        b"image/bmp",
    }
)


def choose_coding(accept_encoding: bytes | None, offered: tuple[str, ...] = CODINGS) -> str | None:
    """The coding of ``offered`` the client prefers by its q-values (ties: ours in order); None: identity.

    ``identity;q=0`` with nothing of ours accepted still gets identity: an
    answer beats a 406.  How the header is read: tlsproxy.http.accept_encoding.
    """
    if not accept_encoding:
        return None
    return parse_accept_encoding(accept_encoding).preferred(offered)


def compressible(content_type: bytes) -> bool:
    """Whether a Content-Type is text-like (worth compressing) and not an event stream."""
    kind = content_type.split(b";", 1)[0].strip().lower()
    if kind.startswith(b"text/"):
        return kind != b"text/event-stream"
    return kind in _TYPES or kind.endswith((b"+json", b"+xml"))


def qualifies(status: int, headers: Headers, length: int | None) -> bool:
    """Whether an answer may be compressed at all (for some client): the rules nginx's gzip keeps, and a few more.

    Not a bodiless status or a 206 (a range of the identity bytes), not an
    answer already encoded (the app's own gzip, a precompressed file), not
    one the app marked ``no-transform``, not under MIN_SIZE, and only text-like types.
    """
    if status < 200 or status in NO_BODY or (length is not None and length < MIN_SIZE):
        return False
    kind = None
    for name, value in headers:
        if name == b"content-encoding" or name == b"content-range":
            return False
        if name == b"cache-control" and b"no-transform" in value.lower():
            if any(d.strip().lower() == b"no-transform" for d in value.split(b",")):
                return False
        elif name == b"content-type" and kind is None:
            kind = value
    return kind is not None and compressible(kind)


def encoded_headers(headers: Headers, coding: str | None) -> Headers:
    """A qualifying answer's fields: ``Vary: Accept-Encoding`` always; with ``coding``, the coded representation's.

    A coded answer loses Content-Length (unknown until the end) and
    Accept-Ranges (ranges of it are not served), and its strong ETag becomes
    weak: the bytes differ from the identity answer's, the content does not
    (so If-None-Match still matches; nginx does the same).
    """
    out: Headers = []
    varied = False
    for name, value in headers:
        if name == b"vary":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if b"*" in tokens or b"accept-encoding" in tokens:
                varied = True
            elif not varied:
                value = value + b", Accept-Encoding" if value.strip() else b"Accept-Encoding"
                varied = True
        elif coding is not None:
            if name in (b"content-length", b"accept-ranges"):
                continue
            if name == b"etag" and value.startswith(b'"'):
                value = b"W/" + value
        out.append((name, value))
    if not varied:
        out.append((b"vary", b"Accept-Encoding"))
    if coding is not None:
        out.append((b"content-encoding", coding.encode("ascii")))
    return out


def plan(status: int, headers: ResponseFields, length: int | None, coding: str | None) -> tuple[ResponseFields, bool]:
    """The fields to send and whether the body is coded: :func:`qualifies` and :func:`encoded_headers`.

    Most answers are not rewritten (an image, a 304, a small page): the app's
    block of field lines is then only scanned, not split, since this runs
    for every answer to a browser.
    """
    if status < 200 or status in NO_BODY or (length is not None and length < MIN_SIZE):
        return headers, False
    if isinstance(headers, bytes):
        low = b"\n" + headers.lower()  # names at line starts; values hold no LF
        if b"\ncontent-encoding:" in low or b"\ncontent-range:" in low:
            return headers, False
        start = low.find(b"\ncontent-type:")
        if start < 0 or not compressible(low[start + 14 : low.find(b"\r", start)]):
            return headers, False
        if coding is None and b"\nvary:" not in low and b"no-transform" not in low:
            return headers + b"vary: Accept-Encoding\r\n", False
        fields = split_fields(headers)
    else:
        fields = headers
    if not qualifies(status, fields, length):
        return headers, False
    return encoded_headers(fields, coding), coding is not None


# -- the coders ----------------------------------------------------------------


class Encoder(Protocol):
    def compress(self, data: bytes | memoryview) -> bytes: ...

    def flush(self) -> bytes:
        """All input so far, decodable now; the stream goes on."""

    def finish(self) -> bytes:
        """The end of the stream."""


class GzipEncoder:
    def __init__(self, level: int = GZIP_LEVEL) -> None:
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)  # 16 + 15: a gzip header and trailer

    def compress(self, data: bytes | memoryview) -> bytes:
        return self._z.compress(data)

    def flush(self) -> bytes:
        return self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._z.flush(zlib.Z_FINISH)


class BrotliEncoder:
    def __init__(self) -> None:
        self._z = brotli.Compressor(quality=BROTLI_QUALITY, lgwin=BROTLI_WINDOW_LOG)

    def compress(self, data: bytes | memoryview) -> bytes:
        return self._z.process(data)

    def flush(self) -> bytes:
        return self._z.flush()

    def finish(self) -> bytes:
        return self._z.finish()


# A zstd context costs ~30 us to make and up to ~2 MiB once it has coded a stream:
# finished answers give theirs back for the next, and a few idle ones are kept.
_zstd_free: list[zstandard.ZstdCompressor] = []
ZSTD_IDLE = 4
_ZSTD_PARAMS = zstandard.ZstdCompressionParameters.from_level(ZSTD_LEVEL, window_log=ZSTD_WINDOW_LOG)


def _zstd_compressor() -> zstandard.ZstdCompressor:
    if _zstd_free:
        return _zstd_free.pop()
    return zstandard.ZstdCompressor(compression_params=_ZSTD_PARAMS)


class ZstdEncoder:
    def __init__(self) -> None:
        self._compressor: zstandard.ZstdCompressor | None = _zstd_compressor()
        self._z = self._compressor.compressobj()

    def compress(self, data: bytes | memoryview) -> bytes:
        return self._z.compress(data)

    def flush(self) -> bytes:
        return self._z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def finish(self) -> bytes:
        out = self._z.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
        self.release()
        return out

    def release(self) -> None:
        compressor, self._compressor = self._compressor, None
        if compressor is not None and len(_zstd_free) < ZSTD_IDLE:
            _zstd_free.append(compressor)


def encoder(coding: str) -> Encoder:
    if coding == "zstd":
        return ZstdEncoder()
    return BrotliEncoder() if coding == "br" else GzipEncoder()


_zstd_whole: list[zstandard.ZstdCompressor] = []  # one context for whole answers (reactor thread only)


def compress_whole(coding: str, data: bytes) -> bytes:
    """One small answer in one call (SLICE at most: callers keep to that)."""
    if coding == "gzip":
        return zlib.compress(data, GZIP_LEVEL, 31)
    if coding == "br":
        return brotli.compress(data, quality=BROTLI_QUALITY, lgwin=BROTLI_WINDOW_LOG)
    if not _zstd_whole:
        _zstd_whole.append(zstandard.ZstdCompressor(compression_params=_ZSTD_PARAMS))
    return _zstd_whole[0].compress(data)  # this frame also says its size


# -- the exchange --------------------------------------------------------------

_choices: dict[bytes, str | None] = {}  # Accept-Encoding as sent -> our coding (browsers send a few)


def wrap(exchange: Exchange, reactor: Any, send_timeout: float) -> Exchange:
    """``exchange``, compressing the answers that qualify; as it is for a client that sent no Accept-Encoding."""
    accept = accept_encoding_of(exchange.head.headers)
    if accept is None:
        return exchange  # nothing to choose, and caches see Vary on every coded answer
    coding = _choices.get(accept, "")
    if coding == "":
        coding = choose_coding(accept)
        if len(accept) <= 256:  # what browsers send; odd values are parsed each time, not kept
            if len(_choices) >= 256:
                _choices.clear()
            _choices[accept] = coding
    return CompressingExchange(exchange, coding, reactor, send_timeout)


@implementer(IPushProducer)
class CompressingExchange:
    """An :class:`~tlsproxy.http.exchange.Exchange` that compresses the answer on the way to ``inner``.

    Until the head is known it cannot tell whether to compress; once it knows
    it does not, the handler's calls go straight to ``inner``.  When it does,
    it is ``inner``'s producer: the client's pauses reach the handler through
    it, and so do its own while input waits to be compressed.
    """

    _encoder: Encoder | None = None
    _producer: IPushProducer | None = None  # the handler's
    _observer: ExchangeObserver | None = None
    _call: Any = None  # the pending _pump
    _waiting = 0  # bytes in _backlog
    _dirty = False  # compressed since the last flush
    _finishing = False
    _done = False
    _client_paused = False
    _producer_paused = False
    _coding = False  # this answer is coded (the head said so)
    coded_bytes = 0  # coded bytes handed on: what the client receives of the body
    _when_sent: Callable[[int], None] | None = None

    def __init__(self, inner: Exchange, coding: str | None, reactor: Any, send_timeout: float) -> None:
        self.inner = inner
        self.coding = coding
        self.reactor = reactor
        self.send_timeout = send_timeout
        self.head = inner.head
        self.client_address = inner.client_address
        self.secure = inner.secure
        self.server_port = inner.server_port
        self.deadline = inner.deadline
        self.transport = inner.transport
        self._backlog: deque[memoryview] = deque()

    def __getattr__(self, name: str) -> Any:
        # The request side (set_body_consumer, pause_body...), the tunnel, and
        # what some exchanges have and others lack (send_continue, stream_id...).
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def response_started(self) -> bool:
        return self.inner.response_started

    def set_observer(self, observer: ExchangeObserver) -> None:
        self._observer = observer
        self.inner.set_observer(self)

    def client_gone(self) -> None:
        self._stop()
        if self._observer is not None:
            self._observer.client_gone()

    # -- the head: compress or not ------------------------------------------------

    def start_response(self, status: int, reason: bytes, headers: ResponseFields, content_length: int | None) -> None:
        headers, coded = plan(status, headers, content_length, self.coding)
        inner = self.inner
        if not coded:
            self._pass_through()
            inner.start_response(status, reason, headers, content_length)
            return
        inner.start_response(status, reason, headers, None)
        if self.head.method == b"HEAD":
            self._pass_through()  # the fields a GET would get; no body to code
            return
        assert self.coding is not None
        self._encoder = encoder(self.coding)
        self._coding = True
        inner.register_producer(self)

    def respond(self, status: int, reason: bytes, headers: ResponseFields, body: bytes) -> None:
        headers, coded = plan(status, headers, len(body), self.coding)
        if not coded or self.head.method == b"HEAD":
            self._pass_through()
            if coded:  # a GET's fields; its length is not this body's
                self.inner.start_response(status, reason, headers, None)
                self.inner.finish()
            else:
                self.inner.respond(status, reason, headers, body)
            return
        assert self.coding is not None
        if len(body) <= SLICE:
            self._pass_through()
            whole = compress_whole(self.coding, body)
            self._coding, self._done, self.coded_bytes = True, True, len(whole)
            self.inner.respond(status, reason, headers, whole)
            return
        self._encoder = encoder(self.coding)
        self._coding = True
        self.inner.start_response(status, reason, headers, None)
        self.inner.register_producer(self)
        self.write(body)
        self.finish()

    def _pass_through(self) -> None:
        """Not compressing this answer: from now on the handler talks to ``inner`` itself."""
        inner = self.inner
        self.write = inner.write  # type: ignore[method-assign]
        self.finish = inner.finish  # type: ignore[method-assign]
        self.abort = inner.abort  # type: ignore[method-assign]
        self.register_producer = inner.register_producer  # type: ignore[method-assign]
        self.unregister_producer = inner.unregister_producer  # type: ignore[method-assign]
        if self._producer is not None:
            inner.register_producer(self._producer)
        if self._observer is not None:
            inner.set_observer(self._observer)

    # -- the body -------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._done or not data:
            return
        if self._encoder is None:  # before the head: not ours to code
            self.inner.write(data)
            return
        if not self._backlog and len(data) <= SLICE:
            out = self._encoder.compress(data)
            self._dirty = True
            if out:
                self._send(out)
        else:
            self._backlog.append(memoryview(data))
            self._waiting += len(data)
            self._steer()
        self._schedule()

    def finish(self) -> None:
        if self._done or self._finishing:
            return
        self._finishing = True
        if self._encoder is None:
            self._done = True
            self.inner.finish()
            return
        if not self._backlog:
            self._end()
        elif self._client_paused:
            self.deadline.set(self.send_timeout, self._too_slow)

    def abort(self) -> None:
        self._stop()
        self.inner.abort()

    def _schedule(self) -> None:
        if self._call is None:
            self._call = self.reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        """One slice of waiting input, or a flush once none waits: one compress call per reactor turn."""
        self._call = None
        if self._done or self._encoder is None:
            return
        backlog = self._backlog
        if backlog and not self._client_paused:
            view = backlog[0]
            if len(view) > SLICE:
                backlog[0] = view[SLICE:]
                view = view[:SLICE]
            else:
                backlog.popleft()
            self._waiting -= len(view)
            out = self._encoder.compress(view)
            self._dirty = True
            if out:
                self._send(out)
            if backlog:
                self._schedule()
                return
            self._steer()
        if backlog:
            return  # the client's resumeProducing goes on
        if self._finishing:
            self._end()
        elif self._dirty:
            self._dirty = False
            out = self._encoder.flush()
            if out:
                self._send(out)

    def _end(self) -> None:
        assert self._encoder is not None
        if self._call is not None:
            self._call.cancel()
            self._call = None
        self._done = True
        out = self._encoder.finish()
        inner = self.inner
        if out:
            self._send(out)
        inner.unregister_producer()
        inner.finish()
        self._sent()

    def _send(self, out: bytes) -> None:
        self.coded_bytes += len(out)
        self.inner.write(out)

    def after_coding(self, report: Callable[[int], None]) -> bool:
        """``report(coded_bytes)`` once the coded answer is out or cut (at once if it is); False when not coding.

        The access log counts what the client received, as nginx's
        $body_bytes_sent does, and a large answer is still being coded when
        the handler is done with it.
        """
        if not self._coding:
            return False
        if self._done:
            report(self.coded_bytes)
        else:
            self._when_sent = report
        return True

    def _sent(self) -> None:
        report, self._when_sent = self._when_sent, None
        if report is not None:
            report(self.coded_bytes)

    def _stop(self) -> None:
        """Nothing more goes out: drop what waits, give back the coder."""
        self._done = True
        self._backlog.clear()
        self._waiting = 0
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if isinstance(self._encoder, ZstdEncoder):
            self._encoder.release()  # a context mid-frame is reset by its next compressobj()
        self._encoder = None
        self._sent()

    def _too_slow(self) -> None:
        if not self._done:
            self.abort()

    # -- back-pressure ----------------------------------------------------------------

    def register_producer(self, producer: IPushProducer) -> None:
        self._producer = producer
        self._producer_paused = False
        self._steer()

    def unregister_producer(self) -> None:
        self._producer = None  # inner keeps us until the coded stream ends

    def _steer(self) -> None:
        """The handler is paused while the client is, or while too much waits to be compressed."""
        producer = self._producer
        if producer is None:
            return
        paused = self._client_paused or self._waiting > HIGH_WATER
        if paused != self._producer_paused:
            self._producer_paused = paused
            if paused:
                producer.pauseProducing()
            else:
                producer.resumeProducing()

    def pauseProducing(self) -> None:
        self._client_paused = True
        if self._finishing and self._backlog:
            self.deadline.set(self.send_timeout, self._too_slow)
        self._steer()

    def resumeProducing(self) -> None:
        self._client_paused = False
        if self._finishing:
            self.deadline.clear()
        if self._backlog:
            self._schedule()
        self._steer()

    def stopProducing(self) -> None:
        producer = self._producer
        self._stop()
        if producer is not None:
            producer.stopProducing()

"""Static and media files served by tlsproxy itself (``[site.static]``).

Django's admin needs its CSS and JavaScript, and uploads need serving, without
an nginx next to us.  The decisions (which file, which representation, which
status and headers) are plain functions; :class:`StaticRequest` does the file
I/O, all of it in the reactor's thread pool, and streams larger files in
chunks paced by the client (the exchange's producer interface), so a slow disk
or a slow client never stalls other connections.  The bytes go through
``write`` (TLS needs them anyway; sendfile would only help plain HTTP).
"""

from __future__ import annotations

import email.utils
import mimetypes
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tlsproxy.config import StaticDir
from tlsproxy.http import pages
from tlsproxy.http.accept_encoding import accept_encoding_of, parse_accept_encoding
from tlsproxy.http.exchange import Exchange, Headers
from tlsproxy.proxy.reqbuffer import threaded

WHOLE_BELOW = 256 * 1024  # files up to this size are read in the same thread call as the stat
CHUNK = 256 * 1024
# Small files just read are answered from memory for this long (no thread hop
# for a hot admin CSS); a file replaced on disk is seen within that time.
CACHE_SECONDS = 1.0
CACHE_BYTES = 32 * 1024 * 1024
CACHE_ENTRIES = 4096
YEAR = 31536000

REASONS = {200: b"OK", 206: b"Partial Content", 304: b"Not Modified", 400: b"Bad Request", 403: b"Forbidden"}
REASONS |= {404: b"Not Found", 405: b"Method Not Allowed", 416: b"Range Not Satisfiable", 500: b"Internal Server Error"}

# The types that matter on the web, whatever the host's /etc/mime.types says.
TYPES: dict[str, str] = {
    ".css": "text/css",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".map": "application/json",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".html": "text/html",
    ".htm": "text/html",
    ".txt": "text/plain",
    ".csv": "text/csv",
    ".md": "text/markdown",
    ".xml": "application/xml",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".ico": "image/vnd.microsoft.icon",
    ".bmp": "image/bmp",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".otf": "font/otf",
    ".eot": "application/vnd.ms-fontobject",
    ".wasm": "application/wasm",
    ".pdf": "application/pdf",
    ".zip": "application/zip",
    ".gz": "application/gzip",
    ".br": "application/octet-stream",
    ".zst": "application/zstd",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".wav": "audio/wav",
}
# Types a browser runs or renders as a document on our origin: an upload of
# one of these would be stored XSS, so media answers them as a download.
ACTIVE = re.compile(
    r"\A(text/html|application/xhtml\+xml|image/svg\+xml|text/xml|application/xml|.*javascript"
    r"|.*ecmascript|application/x-shockwave-flash|text/xsl|application/wasm|multipart/.*)\Z"
)
# Django's ManifestStaticFilesStorage: name.<12 hex digits>.ext
HASHED = re.compile(r"\.[0-9a-f]{12}\.[A-Za-z0-9]+\Z")
# Ours, best first when the client likes them equally.
CODINGS = (("br", ".br"), ("zstd", ".zst"), ("gzip", ".gz"))
_OURS = tuple(coding for coding, _ in CODINGS)
_HEX = frozenset(b"0123456789abcdefABCDEF")


def content_type(name: str) -> str:
    """The Content-Type of a file name: our table, then mimetypes, else octet-stream."""
    ext = os.path.splitext(name)[1].lower()
    kind = TYPES.get(ext) or mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"
    if kind.startswith("text/"):
        kind += "; charset=utf-8"
    return kind


def find_mount(mounts: Sequence[StaticDir], path: bytes) -> StaticDir | None:
    """The longest prefix of ``path`` (the raw target's path) served from a directory."""
    for mount in mounts:  # sorted longest first by the configuration
        if path.startswith(mount.prefix.encode()):
            return mount
    return None


class Refused(Exception):
    """A path that names no file we serve; ``status`` is the answer (400 or 404)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def _unquote(segment: bytes) -> bytes:
    """Percent-decode once; a malformed escape is a 400 (never decoded twice)."""
    if b"%" not in segment:
        return segment
    out = bytearray()
    i = 0
    while i < len(segment):
        byte = segment[i]
        if byte == 0x25:  # %
            pair = segment[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in _HEX for c in pair):
                raise Refused(400, "malformed percent escape")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(byte)
            i += 1
    return bytes(out)


def relative_parts(rest: bytes) -> list[str]:
    """The path segments below a prefix, each safe to join under the root, or :class:`Refused`.

    Segments are split before decoding, so an encoded ``/`` or ``\\`` cannot
    make one; any segment that decodes to a separator, NUL, a control
    character, ``%`` (a second decoding), or starts with ``.`` (``..``,
    dotfiles) is refused, as is an empty one (a directory, or ``//``).
    """
    if b"?" in rest or b"#" in rest:
        raise Refused(400, "the path holds a query")
    parts = []
    for raw in rest.split(b"/"):
        segment = _unquote(raw)
        if not segment:
            raise Refused(404, "a directory, or an empty segment")
        if segment[:1] == b".":
            raise Refused(404, "a dotfile or a relative segment")
        if any(c < 0x20 or c == 0x7F for c in segment) or b"/" in segment or b"\\" in segment or b"%" in segment:
            raise Refused(404, "a separator, control character or escape inside a segment")
        try:
            parts.append(segment.decode("utf-8"))
        except UnicodeDecodeError:
            raise Refused(404, "not UTF-8") from None
    return parts


# -- choosing the representation ---------------------------------------------


def accepted_codings(accept_encoding: bytes | None) -> list[str]:
    """Our codings the client accepts, best first (by its q-values, then by our order)."""
    if not accept_encoding:
        return []
    return parse_accept_encoding(accept_encoding).ranked(_OURS)


@dataclass(frozen=True)
class FileInfo:
    """One representation on disk: what the headers are made from."""

    size: int
    mtime: float
    mtime_ns: int
    coding: str = ""  # the Content-Encoding of a precompressed sibling

    @property
    def etag(self) -> bytes:
        suffix = f"-{self.coding}" if self.coding else ""
        return f'"{self.mtime_ns:x}-{self.size:x}{suffix}"'.encode()

    @property
    def last_modified(self) -> bytes:
        return email.utils.formatdate(int(self.mtime), usegmt=True).encode()


def _etags(value: bytes) -> list[bytes]:
    return [tag.strip().removeprefix(b"W/") for tag in value.split(b",") if tag.strip()]


def _http_date(value: bytes) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(value.decode("latin-1"))
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp()


def not_modified(info: FileInfo, if_none_match: bytes | None, if_modified_since: bytes | None) -> bool:
    """RFC 9110 13.1.2 and 13.1.3: If-None-Match (weak comparison) wins over If-Modified-Since."""
    if if_none_match is not None:
        tags = _etags(if_none_match)
        return b"*" in tags or info.etag in tags
    if if_modified_since is not None:
        since = _http_date(if_modified_since)
        return since is not None and int(info.mtime) <= since
    return False


def byte_range(value: bytes | None, if_range: bytes | None, info: FileInfo) -> tuple[int, int] | bool | None:
    """The one range asked for as (first, last), ``None`` for the whole file, ``False`` for 416.

    Several ranges, a malformed header, or an If-Range that no longer matches
    get the whole file (RFC 9110 14.2 lets a server ignore Range).
    """
    if value is None:
        return None
    if if_range is not None:
        if if_range.startswith(b'"'):
            if if_range != info.etag:  # strong comparison
                return None
        elif if_range != info.last_modified:
            return None
    unit, _, spec = value.partition(b"=")
    if unit.strip().lower() != b"bytes" or b"," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition(b"-")
    if not dash or not (first_text.isdigit() or first_text == b"") or not (last_text.isdigit() or last_text == b""):
        return None
    size = info.size
    if first_text == b"":
        if last_text == b"":
            return None
        suffix = int(last_text)
        if suffix == 0:
            return False
        return (max(size - suffix, 0), size - 1) if size else False
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None  # invalid: ignored
    last = int(last_text) if last_text else size - 1
    if first >= size:
        return False
    return first, min(last, size - 1)


def cache_control(mount: StaticDir, name: str, max_age: int) -> bytes:
    """A year and immutable for a content-hashed static name, else the site's short max-age."""
    if not mount.media and HASHED.search(name):
        return b"public, max-age=%d, immutable" % YEAR
    return b"public, max-age=%d" % max_age


def file_headers(mount: StaticDir, name: str, info: FileInfo, max_age: int, varies: bool) -> Headers:
    """The fields every answer about this file carries (200, 206 and 304 alike)."""
    kind = content_type(name)
    headers: Headers = []
    if mount.media and not mount.trusted and ACTIVE.match(kind.split(";")[0]):
        # An upload must not become a page or a script on our origin.
        kind = "application/octet-stream"
        headers.append((b"content-disposition", b"attachment"))
    headers += [
        (b"content-type", kind.encode()),
        (b"etag", info.etag),
        (b"last-modified", info.last_modified),
        (b"cache-control", cache_control(mount, name, max_age)),
        (b"x-content-type-options", b"nosniff"),
        (b"accept-ranges", b"bytes"),
    ]
    if info.coding:
        headers.append((b"content-encoding", info.coding.encode()))
    if varies:
        headers.append((b"vary", b"Accept-Encoding"))
    return headers


# -- the blocking part, run in a thread ---------------------------------------


@dataclass
class Opened:
    """What the thread found: the file (open, unless read whole), or why not."""

    status: int = 200
    info: FileInfo | None = None
    varies: bool = False
    file: IO[bytes] | None = None
    data: bytes | None = None
    fields: Headers | None = None  # file_headers, made once for a cached read


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _regular(path: str, root_real: str, follow: bool) -> os.stat_result | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    if not follow and not _inside(os.path.realpath(path), root_real):
        return None
    return st


def open_file(mount: StaticDir, parts: list[str], codings: list[str], head_only: bool) -> Opened:
    """Find and open the file (or its best precompressed sibling); blocking, for a thread."""
    root_real = os.path.realpath(mount.root)
    path = os.path.join(mount.root, *parts)
    st = _regular(path, root_real, mount.follow_symlinks)
    if st is None:
        return Opened(404)  # missing, a directory, a device, or a symlink out of the root
    chosen, coding, varies = path, "", False
    if not mount.media:
        siblings = {c: _regular(path + ext, root_real, mount.follow_symlinks) for c, ext in CODINGS}
        varies = any(siblings.values())
        for wanted in codings:
            sibling = siblings.get(wanted)
            if sibling is not None:
                chosen, coding, st = path + dict(CODINGS)[wanted], wanted, sibling
                break
    try:
        handle = open(chosen, "rb")  # closed by StaticRequest
    except PermissionError:
        return Opened(403)
    except OSError:
        return Opened(404)
    st = os.fstat(handle.fileno())
    info = FileInfo(st.st_size, st.st_mtime, st.st_mtime_ns, coding)
    if head_only or st.st_size > WHOLE_BELOW:
        if head_only:
            handle.close()
            return Opened(200, info, varies)
        return Opened(200, info, varies, file=handle)
    with handle:
        data = handle.read(WHOLE_BELOW + 1)
    if len(data) != st.st_size:  # changed while we read: say what we have
        info = FileInfo(len(data), st.st_mtime, st.st_mtime_ns, coding)
    return Opened(200, info, varies, data=data)


def _read(handle: IO[bytes], offset: int, size: int) -> bytes:
    handle.seek(offset)
    return handle.read(size)


# -- serving -----------------------------------------------------------------


CacheKey = tuple[StaticDir, int, bytes, bytes | None]  # mount, max-age, raw path, Accept-Encoding


class FileCache:
    """Small files read in the last :data:`CACHE_SECONDS`, by mount, raw path and Accept-Encoding.

    Bounded in entries and bytes; the oldest go first.  Only whole 200 reads
    are kept, so a refusal or a missing file always looks at the disk again.
    """

    def __init__(self, max_bytes: int = CACHE_BYTES, max_entries: int = CACHE_ENTRIES) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.bytes = 0
        self.entries: dict[CacheKey, tuple[float, str, Opened]] = {}

    def get(self, key: CacheKey, now: float) -> tuple[str, Opened] | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if now - entry[0] > CACHE_SECONDS or now < entry[0]:
            self.drop(key)
            return None
        return entry[1], entry[2]

    def put(self, key: CacheKey, now: float, name: str, found: Opened) -> None:
        if found.data is None or found.status != 200:
            return
        self.drop(key)
        while self.entries and (len(self.entries) >= self.max_entries or self.bytes + len(found.data) > self.max_bytes):
            self.drop(next(iter(self.entries)))
        self.entries[key] = (now, name, found)
        self.bytes += len(found.data)

    def drop(self, key: CacheKey) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None and entry[2].data is not None:
            self.bytes -= len(entry[2].data)


cache = FileCache()


def serve(handler: Any, route: Any, exchange: Exchange) -> bool:
    """Answer ``exchange`` from the site's static directories; False if its path is not one of theirs."""
    mounts = route.site.static
    if not mounts:
        return False
    path = exchange.head.target.partition(b"?")[0]
    mount = find_mount(mounts, path)
    if mount is None:
        return False
    StaticRequest(handler, route, exchange, mount, path[len(mount.prefix) :]).start()
    return True


@implementer(IPushProducer)
class StaticRequest:
    """One request for a file: resolve, open in a thread, answer, stream the rest."""

    log = Logger()

    file: IO[bytes] | None = None
    ready: bytes | None = None  # a chunk read while the client was paused
    reading = False
    paused = False
    done = False
    status = 0
    sent = 0

    def __init__(self, handler: Any, route: Any, exchange: Exchange, mount: StaticDir, rest: bytes) -> None:
        self.handler = handler
        self.route = route
        self.exchange = exchange
        self.mount = mount
        self.rest = rest
        self.run: Callable[..., Any] = threaded(handler.reactor)
        self.hsts: bytes | None = route.hsts if exchange.secure else None
        self.position = 0
        self.end = 0

    def start(self) -> None:
        head = self.exchange.head
        if head.method not in (b"GET", b"HEAD"):
            self.error(405, [(b"allow", b"GET, HEAD")])
            return
        accept = accept_encoding_of(head.headers)  # every line of it, as compress.py reads it
        key = (self.mount, self.route.site.static_max_age, self.rest, accept)
        now = self.handler.reactor.seconds()
        hit = cache.get(key, now)
        if hit is not None:
            self.name = hit[0]
            self.opened(hit[1])
            return
        try:
            parts = relative_parts(self.rest)
        except Refused as e:
            self.error(e.status)
            return
        self.name = parts[-1]
        self.exchange.set_observer(self)
        head_only = head.method == b"HEAD"
        d = self.run(open_file, self.mount, parts, accepted_codings(accept), head_only)
        if not head_only:
            d.addCallback(self.remember, key, now)
        d.addCallback(self.opened).addErrback(self.failed)  # a bug in opened too: 500, not a silent hang

    def remember(self, found: Opened, key: CacheKey, now: float) -> Opened:
        cache.put(key, now, self.name, found)
        return found

    def failed(self, failure: Failure) -> None:
        self.log.failure("serving a static file failed", failure)
        if not self.done and not self.exchange.response_started:
            self.error(500)
        else:
            self.stop(abort=True)

    def error(self, status: int, extra: Headers | None = None) -> None:
        self.done = True
        body = pages.render(status, {404: "There is no such file here.", 405: None}.get(status))
        headers: Headers = [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-store")]
        headers += extra or []
        if self.hsts is not None:
            headers.append((b"strict-transport-security", self.hsts))
        self.exchange.respond(status, REASONS.get(status, b"Error"), headers, body)
        self.record(status, len(body))

    def record(self, status: int, size: int) -> None:
        self.handler.record(self.exchange, self.route.name, status, size)

    def opened(self, found: Opened) -> None:
        if self.done:  # the client left while we looked
            if found.file is not None:
                self.run(found.file.close)
            return
        if found.status != 200 or found.info is None:
            self.error(found.status)
            return
        info = found.info
        head = self.exchange.head
        fields = found.fields
        if fields is None:
            max_age = self.route.site.static_max_age
            fields = found.fields = file_headers(self.mount, self.name, info, max_age, found.varies)
        headers = list(fields)
        if self.hsts is not None:
            headers.append((b"strict-transport-security", self.hsts))
        self.file = found.file
        if not_modified(info, head.get(b"if-none-match"), head.get(b"if-modified-since")):
            self.answer(304, headers, b"", None)
            return
        wanted = byte_range(head.get(b"range"), head.get(b"if-range"), info) if head.method == b"GET" else None
        if wanted is False:
            headers = [h for h in headers if h[0] not in (b"content-encoding",)]
            headers.append((b"content-range", b"bytes */%d" % info.size))
            self.answer(416, headers, b"", 0)
            return
        status, first, last = 200, 0, info.size - 1
        if isinstance(wanted, tuple):
            status, (first, last) = 206, wanted
            headers.append((b"content-range", b"bytes %d-%d/%d" % (first, last, info.size)))
        length = last - first + 1
        if head.method == b"HEAD" or found.data is not None:
            data = b"" if found.data is None else found.data[first : last + 1]
            if head.method == b"HEAD":
                data = b""
            self.answer(status, headers, data, length)
            return
        # A large file: the head now, the bytes in chunks as the client takes them.
        self.status = status
        self.position, self.end = first, last + 1
        self.exchange.start_response(status, REASONS[status], headers, length)
        self.exchange.register_producer(self)
        self.read_next()

    def answer(self, status: int, headers: Headers, body: bytes, length: int | None) -> None:
        """A whole answer at once (HEAD, 304, 416, a small file)."""
        self.done = True
        self.close_file()
        exchange = self.exchange
        if exchange.head.method == b"HEAD" or status == 304:
            exchange.start_response(status, REASONS[status], headers, length)
            exchange.finish()
            self.record(status, 0)
            return
        exchange.respond(status, REASONS[status], headers, body)
        self.record(status, len(body))

    def read_next(self) -> None:
        """Keep one read in flight, and one chunk ready while the client is paused (read-ahead)."""
        if self.done or self.reading or self.file is None or self.ready is not None:
            return
        if self.position >= self.end:
            self.finish()
            return
        self.reading = True
        size = min(CHUNK, self.end - self.position)
        self.run(_read, self.file, self.position, size).addCallback(self.chunk_read).addErrback(self.failed)

    def chunk_read(self, data: bytes) -> None:
        self.reading = False
        if self.done:
            self.close_file()
            return
        if not data:  # the file shrank under us: the promised length cannot be kept
            self.log.warn("{path} shrank while it was served", path=self.name)
            self.stop(abort=True)
            return
        self.position += len(data)
        if self.paused:
            self.ready = data  # goes out the moment the client takes more
            return
        self.send(data)

    def send(self, data: bytes) -> None:
        self.sent += len(data)
        self.exchange.write(data)  # may pause us
        self.read_next()

    def finish(self) -> None:
        self.done = True
        self.close_file()
        self.exchange.unregister_producer()
        self.exchange.deadline.clear()  # before finish, which may set the connection's idle timer
        self.exchange.finish()
        self.record(self.status, self.sent)

    def stop(self, abort: bool) -> None:
        if self.done:
            return
        self.done = True
        self.close_file()
        self.exchange.unregister_producer()
        self.exchange.deadline.clear()
        if abort:
            self.exchange.abort()
        self.record(499 if not abort else self.status or 500, self.sent)

    def close_file(self) -> None:
        """Close in a thread, and never under a read still running in one."""
        handle = self.file
        if handle is not None and not self.reading:
            self.file = None
            self.run(handle.close)

    # ExchangeObserver

    def client_gone(self) -> None:
        self.stop(abort=False)

    # IPushProducer: the client reads slower than the disk.

    def pauseProducing(self) -> None:
        self.paused = True
        if not self.done:
            self.exchange.deadline.set(self.handler.server.send_timeout, self.too_slow)

    def resumeProducing(self) -> None:
        self.paused = False
        self.exchange.deadline.clear()
        ready, self.ready = self.ready, None
        if ready is not None and not self.done:
            self.send(ready)
        else:
            self.read_next()

    def stopProducing(self) -> None:
        self.stop(abort=False)

    def too_slow(self) -> None:
        if self.done or not self.paused:
            return
        self.log.info(
            "{client} took nothing of {path} for {seconds:g}s; connection cut",
            client=self.exchange.client_address,
            path=self.name,
            seconds=self.handler.server.send_timeout,
        )
        self.stop(abort=True)

"""HTTP/1.1 on the wire: message heads and body framing, parsed strictly.

Pure functions and small decoders over bytes; nothing here does I/O.

A head is parsed only once it is whole (up to its blank line).  One regular
expression holds the grammar of RFC 9112 for the entire head, so a bare LF, a
bare CR, obs-fold, a NUL, a space before a colon or a non-token method fails
the match as a whole instead of needing a rule of its own.  The rules a proxy
adds on top (exactly one Host, one Content-Length of digits only, no
Transfer-Encoding on HTTP/1.0 and no coding but chunked, never both framings)
follow in one pass over the fields.

Bodies are framed by :class:`LengthBody`, :class:`ChunkedBody` or
:class:`UntilClose`: each takes exactly its message's bytes and says how many
it used, so whatever follows belongs to the next message.
"""

from __future__ import annotations

import re

from tlsproxy.http.exchange import Headers, RequestHead
from tlsproxy.speedups import speedups

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# A field line: token, colon, then visible bytes (obs-text included), spaces
# and tabs up to the CRLF; the value is what is left once the OWS around it
# is taken off.  Each class is a single-byte run, so a match (or a failed
# one) costs linear time.
_FIELD_CONTENT = _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*"
_FIELD_LINE = _FIELD_CONTENT + rb"\r\n"
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[\t ]*([\t\x20-\x7e\x80-\xff]*)\r\n")
_FIELD_BLOCK = re.compile(rb"(?:" + _FIELD_LINE + rb")*")
_REQUEST_HEAD = re.compile(
    rb"(" + _TOKEN + rb") ([\x21-\x7e\x80-\xff]+) HTTP/([0-9])\.([0-9])\r\n((?:" + _FIELD_LINE + rb")*)"
)
_RESPONSE_HEAD = re.compile(
    rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?\r\n((?:" + _FIELD_LINE + rb")*)"
)
_CHUNK_SIZE = re.compile(
    rb"([0-9A-Fa-f]{1,15})(?:[\t ]*;[\t ]*"
    + _TOKEN
    + rb"(?:[\t ]*=[\t ]*(?:"
    + _TOKEN
    + rb'|"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"))?)*[\t ]*'
)
_TRAILER_LINE = re.compile(_FIELD_CONTENT)

# Request fields the parser itself looks at.
_HOST, _CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION, _UPGRADE = range(5)
_SPECIAL = {
    b"host": _HOST,
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
}

# Bytes a Host header may hold: visible ASCII except the delimiters of a URL.
_HOST_BYTES = bytes(b for b in range(0x21, 0x7F) if b not in b'/\\?#@"<>{}|^`')


class RequestError(Exception):
    """The client sent something we refuse; answered with ``status`` and a close."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class ResponseError(Exception):
    """The app sent something that is not an HTTP/1.1 response we can relay."""


class FramingError(Exception):
    """A body's framing (chunk sizes, chunk ends, trailers) is malformed."""


def valid_host(host: bytes) -> bool:
    return not host.translate(None, _HOST_BYTES)


def redirect_location(host: str, https_port: int, target: bytes) -> bytes:
    """The https:// URL for ``target`` on ``host`` (port left out when 443)."""
    authority = f"[{host}]" if ":" in host else host
    if https_port != 443:
        authority += f":{https_port}"
    return b"https://" + authority.encode("ascii") + target


def split_host_port(host: bytes) -> tuple[str, int | None]:
    """``example.com:8080`` -> (``example.com``, 8080); IPv6 in brackets.

    A fully qualified name's trailing dot is dropped: ``a.test.`` is ``a.test``.
    """
    text = host.decode("ascii", "replace").lower()
    if text.startswith("["):
        addr, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return addr, int(port) if port.isdigit() else None
    name, sep, port = text.rpartition(":")
    if sep and port.isdigit():
        return name.removesuffix("."), int(port)
    return text.removesuffix("."), None


def valid_field(name: bytes, value: bytes) -> bool:
    """Whether ``name: value`` is a field line of this grammar: a token name, no CTL but HTAB in the value.

    For fields that do not come as HTTP/1.1 text (HTTP/2's), so both
    versions refuse the same bytes.
    """
    return b":" not in name and _TRAILER_LINE.fullmatch(name + b":" + value) is not None


def is_field_block(block: bytes) -> bool:
    """Whether ``block`` is nothing but field lines (each ending in CRLF)."""
    return _FIELD_BLOCK.fullmatch(block) is not None


def split_fields(block: bytes) -> Headers:
    """(lower-case name, value) pairs of a block of field lines that matched the grammar."""
    if not block:
        return []
    return [(name.lower(), value.rstrip(b"\t ")) for name, value in _FIELD.findall(block)]


def connection_options(value: bytes) -> list[bytes]:
    """The lower-case tokens of a Connection header value."""
    return [token.strip() for token in value.lower().split(b",")]


def parse_request_head(head: bytes, max_header_count: int) -> tuple[RequestHead, bool]:
    """A validated :class:`RequestHead` and whether the connection may be kept.

    ``head`` runs from the request line to the CRLF of the last field line
    (the blank line that ends the head is not part of it).
    """
    match = _REQUEST_HEAD.fullmatch(head)
    if match is None:
        raise RequestError(400, _why_malformed(head))
    method, target, major, minor, block = match.groups()
    if major != b"1" or minor not in (b"0", b"1"):
        raise RequestError(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
    version = b"1.1" if minor == b"1" else b"1.0"
    headers = split_fields(block)
    if len(headers) > max_header_count:
        raise RequestError(431, "too many header fields")
    host: bytes | None = None
    content_length: int | None = None
    chunked = False
    connection = b""
    upgrade = b""
    special = _SPECIAL
    for name, value in headers:
        kind = special.get(name)
        if kind is None:
            continue
        if kind == _HOST:
            if host is not None:
                raise RequestError(400, "more than one Host header")
            host = value
        elif kind == _CONTENT_LENGTH:
            if content_length is not None:
                raise RequestError(400, "more than one Content-Length")
            if not value.isdigit() or len(value) > 18:
                raise RequestError(400, "malformed Content-Length")
            content_length = int(value)
        elif kind == _TRANSFER_ENCODING:
            if version == b"1.0":
                raise RequestError(400, "Transfer-Encoding is not allowed in HTTP/1.0")
            if chunked:
                raise RequestError(400, "more than one Transfer-Encoding")
            if value.lower() != b"chunked":
                raise RequestError(501, "only the chunked transfer coding is supported")
            chunked = True
        elif kind == _CONNECTION:
            connection = connection + b"," + value if connection else value
        else:
            upgrade = value
    if chunked and content_length is not None:
        raise RequestError(400, "both Content-Length and Transfer-Encoding")
    if method == b"CONNECT":
        raise RequestError(405, "CONNECT is not supported: this is a reverse proxy")
    if target[:1] != b"/":
        if target == b"*":
            if method != b"OPTIONS":
                raise RequestError(400, "the * target is only for OPTIONS")
        else:
            target, host = _absolute_form(target)
            headers = [(n, host if n == b"host" else v) for n, v in headers]
    if host is None:
        if version == b"1.1":
            raise RequestError(400, "HTTP/1.1 requests need a Host header")
        host = b""
    elif not valid_host(host):
        raise RequestError(400, "malformed Host header")
    if connection:
        options = connection_options(connection)
        keep_alive = b"close" not in options and (version == b"1.1" or b"keep-alive" in options)
        if upgrade and (version != b"1.1" or b"upgrade" not in options):
            upgrade = b""
    else:
        keep_alive = version == b"1.1"
        upgrade = b""
    if upgrade and (chunked or content_length):
        # A request with a body is served as it is: after a body, bytes that
        # may be for the tunnel or a next request are not worth guessing at.
        upgrade = b""
    if upgrade and upgrade.lower() != b"websocket":
        # Only WebSocket becomes a tunnel: another protocol (h2c, ...) would
        # carry the client's raw bytes to the app unchecked.  Its request is
        # served as a plain one (Upgrade and Connection are not forwarded).
        upgrade = b""
    if upgrade:
        # After an upgrade the connection is the app's; if the app says no,
        # it closes after that answer.
        keep_alive = False
    return RequestHead(method, target, version, host.lower(), headers, content_length, chunked, upgrade), keep_alive


def _absolute_form(target: bytes) -> tuple[bytes, bytes]:
    """Origin-form target and authority of an absolute-form target (RFC 9112 3.2.2)."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise RequestError(400, "malformed request target")
    authority, slash, path = rest.partition(b"/")
    if not authority:
        raise RequestError(400, "malformed request target")
    return (slash + path if slash else b"/"), authority


def _why_malformed(head: bytes) -> str:
    """A short reason for a head that does not match the grammar (for the log)."""
    if re.search(rb"(?<!\r)\n", head):
        return "bare LF in the request head"
    if re.search(rb"\r(?!\n)", head):
        return "bare CR in the request head"
    if re.search(rb"\n[\t ]", head):
        return "obs-fold (a folded header line)"
    line, _, _ = head.partition(b"\r\n")
    if not re.fullmatch(rb"\S+ \S+ HTTP/\S+", line):
        return "malformed request line"
    return "malformed header field"


def check_head_limits(
    head: bytes | bytearray, complete: bool, max_request_line: int, max_header_line: int, max_header_size: int
) -> None:
    """Refuse an over-long request line (414) or header line or head (431).

    Called on a whole head, or on part of one while it arrives
    (``complete`` false: the last line may be unfinished).
    """
    end = head.find(b"\r\n")
    if end < 0:
        if len(head) > max_request_line:
            raise RequestError(414, "request line too long")
        return
    if end > max_request_line:
        raise RequestError(414, "request line too long")
    fields = len(head) - end - 2
    if fields > max_header_line:
        for line in bytes(head[end + 2 :]).split(b"\r\n"):
            if len(line) > max_header_line:
                raise RequestError(431, "header line too long")
    if fields > max_header_size:
        raise RequestError(431, "request head too large")


class HeadScanner:
    """An unfinished request head, checked for its limits and its end as it arrives.

    Each byte is searched once however the head is split into reads, so a
    head trickled one byte at a time costs linear work, not quadratic.
    ``examined`` counts the bytes searched (what the tests bound).
    """

    __slots__ = (
        "_fields_start",
        "_line_start",
        "_lines",
        "_pos",
        "buffer",
        "examined",
        "max_header_count",
        "max_header_line",
        "max_header_size",
        "max_request_line",
        "start",
    )

    def __init__(
        self, max_request_line: int, max_header_line: int, max_header_size: int, max_header_count: int
    ) -> None:
        self.max_request_line = max_request_line
        self.max_header_line = max_header_line
        self.max_header_size = max_header_size
        self.max_header_count = max_header_count
        self.buffer = bytearray()
        self.start = 0  # where the request line starts (empty lines before it are skipped)
        self.examined = 0
        self._pos = 0  # where the next search for a CRLF starts
        self._line_start = 0  # the unfinished line
        self._lines = 0  # whole lines so far, the request line included
        self._fields_start = 0  # where the field lines start, once the request line is whole

    def feed(self, data: bytes) -> int:
        """Take ``data``; where the blank line ending the head starts, or -1 while it goes on.

        Raises :class:`RequestError` (414/431) as soon as a limit is passed.
        """
        buf = self.buffer
        buf += data
        pos = self._pos
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                size = len(buf)
                self.examined += size - pos
                # A CR at the end may pair with an LF still to come.
                self._pos = max(size - 1 if buf.endswith(b"\r") else size, self._line_start)
                self._check_line(self._line_start, size)
                return -1
            self.examined += end + 2 - pos
            start = self._line_start
            pos = self._line_start = end + 2
            if end == start:
                if self._lines:
                    return end
                self.start = pos  # an empty line before the request line (RFC 9112 2.2)
                continue
            self._check_line(start, end)
            if not self._lines:
                self._fields_start = pos
            self._lines += 1
            if self._lines > self.max_header_count + 1:
                raise RequestError(431, "too many header fields")

    def _check_line(self, start: int, end: int) -> None:
        """The limits for the line from ``start`` to ``end`` (whole or not)."""
        if not self._lines:
            if end - start > self.max_request_line:
                raise RequestError(414, "request line too long")
            return
        if end - start > self.max_header_line:
            raise RequestError(431, "header line too long")
        if end - self._fields_start > self.max_header_size:
            raise RequestError(431, "request head too large")


def parse_response_head(head: bytes) -> tuple[int, bytes, bytes, int | None, bool, bool]:
    """(status, reason, field lines, content length, chunked, keep-alive) of an app's response head.

    The field lines come back as they were sent (a block of CRLF-terminated
    lines that matched the grammar), for :func:`tlsproxy.proxy.headers.response_block`.
    """
    match = _RESPONSE_HEAD.fullmatch(head)
    if match is None:
        raise ResponseError("the app sent a malformed response head")
    minor, status, reason, block = match.groups()
    headers = split_fields(block)
    content_length: int | None = None
    chunked = False
    coded = False
    connection = b""
    for name, value in headers:
        if name == b"content-length":
            # Repeats are allowed only when they agree (RFC 9110 8.6).
            for part in value.split(b","):
                part = part.strip()
                if not part.isdigit() or len(part) > 18:
                    raise ResponseError("the app sent a malformed Content-Length")
                length = int(part)
                if content_length is not None and length != content_length:
                    raise ResponseError("the app sent conflicting Content-Length values")
                content_length = length
        elif name == b"transfer-encoding":
            coded = True
            chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        elif name == b"connection":
            connection = connection + b"," + value if connection else value
    if coded and content_length is not None:
        raise ResponseError("the app sent both Content-Length and Transfer-Encoding")
    options = connection_options(connection) if connection else []
    keep_alive = b"close" not in options and (minor == b"1" or b"keep-alive" in options)
    return int(status), reason or b"", block, content_length, chunked, keep_alive


class LengthBody:
    """A body of known length."""

    __slots__ = ("left",)

    def __init__(self, length: int) -> None:
        self.left = length

    @property
    def done(self) -> bool:
        return self.left == 0

    def feed(self, data: bytes, out: list[bytes]) -> int:
        """Append this body's part of ``data`` to ``out``; return how many bytes that was."""
        left = self.left
        if len(data) <= left:
            self.left = left - len(data)
            out.append(data)
            return len(data)
        self.left = 0
        out.append(data[:left])
        return left


class UntilClose:
    """A response body that ends when the app closes the connection."""

    __slots__ = ()
    done = False

    def feed(self, data: bytes, out: list[bytes]) -> int:
        out.append(data)
        return len(data)


_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class ChunkedBody:
    """The chunked transfer coding, decoded strictly (RFC 9112 section 7.1).

    Every line ends in CRLF; chunk sizes are hex digits only (at most 15 of
    them); extensions must follow the grammar and are dropped, as are
    trailer fields (they are read and checked, not passed on).
    """

    __slots__ = ("_line", "_state", "done", "left", "max_line", "max_trailer", "trailer_bytes")

    def __init__(self, max_line: int = 4096, max_trailer: int = 32768) -> None:
        self._state = _SIZE
        self._line = b""
        self.left = 0
        self.done = False
        self.max_line = max_line
        self.max_trailer = max_trailer
        self.trailer_bytes = 0

    def feed(self, data: bytes, out: list[bytes]) -> int:
        """Append decoded bytes from ``data`` to ``out``; return how many bytes of ``data`` were used."""
        pos = 0
        size = len(data)
        while pos < size and not self.done:
            if self._state == _DATA:
                take = min(self.left, size - pos)
                out.append(data if take == size else data[pos : pos + take])
                pos += take
                self.left -= take
                if not self.left:
                    self._state = _DATA_END
                continue
            line, pos = self._take_line(data, pos)
            if line is None:
                break
            self._line_done(line)
        return pos

    def _take_line(self, data: bytes, pos: int) -> tuple[bytes | None, int]:
        """The next whole line (without CRLF) and where it ended, or None if it goes on."""
        start = pos
        if self._line and self._line[-1:] == b"\r" and data[pos : pos + 1] == b"\n":
            line, self._line = self._line[:-1], b""
            return line, pos + 1
        end = data.find(b"\r\n", pos)
        if end < 0:
            self._line += data[start:]
            if len(self._line) > self.max_line:
                raise FramingError("chunk line too long")
            return None, len(data)
        line = self._line + data[start:end] if self._line else data[start:end]
        self._line = b""
        if len(line) > self.max_line:
            raise FramingError("chunk line too long")
        return line, end + 2

    def _line_done(self, line: bytes) -> None:
        state = self._state
        if state == _SIZE:
            match = _CHUNK_SIZE.fullmatch(line)
            if match is None:
                raise FramingError("malformed chunk size line")
            self.left = int(match.group(1), 16)
            self._state = _DATA if self.left else _TRAILER
        elif state == _DATA_END:
            if line:
                raise FramingError("chunk data longer than its size")
            self._state = _SIZE
        elif line:  # a trailer field
            self.trailer_bytes += len(line) + 2
            if self.trailer_bytes > self.max_trailer or _TRAILER_LINE.fullmatch(line) is None:
                raise FramingError("malformed or oversized trailer")
        else:
            self.done = True


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of the chunked coding."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


# The pure versions stay reachable under these names (the tests compare).
py_parse_request_head = parse_request_head
py_parse_response_head = parse_response_head
if speedups is not None:
    speedups.configure(RequestHead, RequestError, ResponseError)
    parse_request_head = speedups.parse_request_head  # type: ignore[assignment]
    parse_response_head = speedups.parse_response_head  # type: ignore[assignment]

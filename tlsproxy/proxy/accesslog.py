"""One record per request: on stdout (combined format plus fields) and, optionally, as JSON lines in a file.

Each request gets an id when the proxy first sees it (:func:`begin`): kept
from an ``X-Request-ID`` header only when the peer is a trusted proxy,
generated otherwise, and sent to the app as ``X-Request-ID``.  The same id
is in the log record and on our error pages, so a user's "it said 502,
request id ..." finds its line.

The record is one dict of fields (time with milliseconds, client, method,
target, protocol, status, bytes_in, bytes_out, duration_ms, host, site,
upstream, request_id, referer, user_agent).  The stdout line is the combined
format with host, site, upstream, duration and id after it; in JSON log
format the fields are the record and the line is not repeated.

Every request passes here, so the stdout line is one f-string handed straight
to the process's line observer (tlsproxy/logs.py: ``installed_lines``), which
batches it; Twisted's publisher and its ``{field}`` formatter are used only
when no such observer writes this process's log (``twist --log-format``, or a
caller's own logger).  The text line alone needs no record dict at all.

The file is written by :class:`AccessLogFile`: lines gather in memory and go
to the file in one write per batch, in the reactor's thread pool (one batch
at a time), every second or per 64 KiB; a disk that stalls never stalls the
reactor, and past :data:`MAX_PENDING` bytes waiting, lines are dropped and
counted rather than held without bound.  SIGUSR1 reopens the file (for
logrotate) between two batches.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from tlsproxy.http.exchange import Exchange
from tlsproxy.logs import BATCH_LINES, LineObserver, installed_lines
from tlsproxy.proxy.headers import Network, is_trusted
from tlsproxy.proxy.requestid import new_request_id as new_request_id  # its home before requestid.py
from tlsproxy.proxy.requestid import raws, refill, texts

REQUEST_ID = b"x-request-id"


def _is_id_name(name: bytes) -> bool:
    """X-Request-ID in any mix of - and _ (x-request_id is HTTP_X_REQUEST_ID to a WSGI server too)."""
    return len(name) == 12 and name.replace(b"_", b"-") == REQUEST_ID


# What we keep of a trusted peer's id: short, and harmless in a header, a log line and a page.
_VALID_ID = re.compile(rb"\A[A-Za-z0-9._:@/+=-]{1,128}\Z")
FLUSH_SECONDS = 1.0
FLUSH_BYTES = 64 * 1024
MAX_PENDING = 8 * 1024 * 1024
_FORMAT = (
    '{client} - - [{_clf_time}] "{_request}" {status} {_bytes_out} "{_referer}" "{_user_agent}"'
    " host={host} site={site} upstream={upstream} duration_ms={duration_ms} request_id={request_id}"
)

log = Logger(namespace="tlsproxy.accesslog")
# The usual ones, decoded once.
_METHODS = {m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH")}
_PROTOCOLS = {v: "HTTP/" + v.decode() for v in (b"1.0", b"1.1", b"2")}
_HOSTS: dict[bytes, str] = {}
_AGENTS: dict[bytes, str] = {}


ID_NAMES = frozenset({b"x-request-id", b"x-request_id", b"x_request-id", b"x_request_id"})  # as _is_id_name


def begin(exchange: Exchange, clock: Any, trusted_proxies: Sequence[Network], sent_id: bool = True) -> None:
    """Give ``exchange`` a request id and send that to the app (X-Request-ID); start timing it.

    ``clock`` None: no access log, so nothing reads the start time and the clock is not read.
    ``sent_id`` False: the caller's own pass over the headers found no name in :data:`ID_NAMES`.
    """
    if clock is not None:
        exchange.started = clock.seconds()
    headers = exchange.head.headers
    for name, _ in headers if sent_id else ():  # a plain loop and a set test: every request passes here
        if name in ID_NAMES:
            given = _client_id(exchange, headers, trusted_proxies)
            if given is not None:
                exchange.request_id = given.decode("ascii")
                headers.append((REQUEST_ID, given))
                return
            break
    if not texts:  # new_request_id(), inline
        refill()
    exchange.request_id = texts.pop()
    headers.append((REQUEST_ID, raws.pop()))


def _client_id(
    exchange: Exchange, headers: list[tuple[bytes, bytes]], trusted_proxies: Sequence[Network]
) -> bytes | None:
    """Drop the client's X-Request-ID (any spelling); its value if a trusted proxy sent a valid one."""
    given: bytes | None = None
    for name, value in headers:
        if name == REQUEST_ID and given is None:
            given = value.strip()
    # A client's copy (or any underscore spelling a WSGI server could map onto it) never reaches the app.
    headers[:] = [(name, value) for name, value in headers if not _is_id_name(name)]
    if given is not None and not (
        _VALID_ID.match(given) and trusted_proxies and is_trusted(exchange.client_address, trusted_proxies)
    ):
        return None
    return given


def _text(value: bytes | None) -> str:
    return value.decode("latin-1") if value else "-"


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def iso_ms(seconds: float) -> str:
    """UTC with milliseconds: 2026-12-03T15:57:28.123Z."""
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((seconds - whole) * 1000):03d}Z"


class AccessLog:
    """Writes each request's record to stdout (the process's line observer) and to the file, if any."""

    def __init__(
        self,
        clock: Any,
        logger: Logger | None = None,
        file: AccessLogFile | None = None,
        stdout: bool = True,
        lines: LineObserver | None = None,
    ) -> None:
        self.clock = clock
        # A caller's own logger (tests, tools) gets Twisted events; otherwise ``lines``, or the
        # process's installed observer, gets finished lines, and the global publisher only without one.
        self.logger = logger or Logger(namespace="tlsproxy.access")
        self.direct = logger is None
        self.lines = lines
        self.file = file
        self.stdout = stdout
        self._second = -1
        self._stamp = ""
        self._iso_second = -1
        self._iso_prefix = ""

    def _clf_time(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(second))
        return self._stamp

    def _iso_ms(self, now: float) -> str:
        """iso_ms(now), with the part before the milliseconds made once a second."""
        whole = int(now)
        if whole != self._iso_second:
            self._iso_second = whole
            self._iso_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        return f"{self._iso_prefix}.{int((now - whole) * 1000):03d}Z"

    def record(
        self, exchange: Exchange, status: int, size: int, site: str = "-", upstream: str = "-", received: int = 0
    ) -> dict[str, Any]:
        """The fields of one finished request."""
        now = self.clock.seconds()
        head = exchange.head
        started = getattr(exchange, "started", 0.0) or now
        referer = agent = None
        for name, value in head.headers:  # head.get twice, in one pass
            if name == b"user-agent":
                if agent is None:
                    agent = value
            elif name == b"referer" and referer is None:
                referer = value
        return {
            "time": self._iso_ms(now),
            "client": exchange.client_address or "-",
            "method": head.method.decode("latin-1") if head.method else "-",
            "target": head.target.decode("latin-1") if head.target else "-",
            "protocol": "HTTP/" + head.version.decode("ascii", "replace"),
            "status": status,
            "bytes_in": received,
            "bytes_out": size,
            "duration_ms": round((now - started) * 1000, 3),
            "host": head.host.decode("latin-1") if head.host else "-",
            "site": site or "-",
            "upstream": upstream or "-",
            "request_id": getattr(exchange, "request_id", "") or "-",
            "referer": referer.decode("latin-1") if referer else "-",
            "user_agent": agent.decode("latin-1") if agent else "-",
        }

    def line(self, fields: dict[str, Any]) -> str:
        """The stdout line of a record (combined format, then the extra fields)."""
        request = f"{fields['method']} {fields['target']} {fields['protocol']}"
        referer = fields["referer"]
        agent = fields["user_agent"]
        if '"' in request or "\\" in request:
            request = _quote(request)
        if '"' in referer or "\\" in referer:
            referer = _quote(referer)
        if '"' in agent or "\\" in agent:
            agent = _quote(agent)
        return (
            f'{fields["client"]} - - [{self._clf_time(self.clock.seconds())}] "{request}" {fields["status"]} '
            f'{fields["bytes_out"] or "-"} "{referer}" "{agent}" host={fields["host"]} site={fields["site"]} '
            f"upstream={fields['upstream']} duration_ms={fields['duration_ms']} request_id={fields['request_id']}"
        )

    def _text_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {
            **fields,
            "_clf_time": self._clf_time(self.clock.seconds()),
            "_request": _quote(f"{fields['method']} {fields['target']} {fields['protocol']}"),
            "_bytes_out": fields["bytes_out"] or "-",
            "_referer": _quote(fields["referer"]),
            "_user_agent": _quote(fields["user_agent"]),
        }

    def log(
        self, exchange: Exchange, status: int, size: int, site: str = "-", upstream: str = "-", received: int = 0
    ) -> None:
        lines = self.lines
        if lines is None and self.direct and self.stdout:
            lines = self.lines = installed_lines()  # there once twist began logging; it stays
        if lines is None or self.file is not None or lines.factory.log_format == "json":
            self._log_record(lines, exchange, status, size, site, upstream, received)
            return
        # The default: line(record(...)) without the record, inline, as every request passes here.
        now = self.clock.seconds()
        head = exchange.head
        try:
            started = exchange.started or now
            request_id = exchange.request_id or "-"
        except AttributeError:  # not seen by begin()
            started = getattr(exchange, "started", 0.0) or now
            request_id = getattr(exchange, "request_id", "") or "-"
        value = head.get(b"user-agent")
        agent: str | None = "-"
        if value:
            agent = _AGENTS.get(value)
            if agent is None:
                agent = _cached(_AGENTS, value, _quoted(value))
        value = head.get(b"referer")
        referer = _quoted(value) if value else "-"
        method, target, version = head.method, head.target, head.version
        request = (
            f"{_METHODS.get(method) or (method.decode('latin-1') if method else '-')} "
            f"{target.decode('latin-1') if target else '-'} "
            f"{_PROTOCOLS.get(version) or 'HTTP/' + version.decode('ascii', 'replace')}"
        )
        if '"' in request or "\\" in request:
            request = _quote(request)
        stamp = self._stamp if int(now) == self._second else self._clf_time(now)
        host = _HOSTS.get(head.host)
        if host is None:
            host = _cached(_HOSTS, head.host, head.host.decode("latin-1")) if head.host else "-"
        # What str(round(ms, 3)) writes, at a third of the cost: both round the exact value to 3
        # places. Past 1e12 ms (30 years) a float's spacing nears a thousandth and the two differ.
        ms = (now - started) * 1000
        if -1e12 < ms < 1e12:
            duration = f"{ms:.3f}".rstrip("0")
            if duration[-1] == ".":
                duration += "0"
        else:
            duration = str(round(ms, 3))
        line = (
            f'{exchange.client_address or "-"} - - [{stamp}] "{request}" {status} {size or "-"} "{referer}" '
            f'"{agent}" host={host} site={site or "-"} upstream={upstream or "-"} duration_ms={duration} '
            f"request_id={request_id}\n"
        )
        batch = lines.batch
        if batch is not None and len(batch) < BATCH_LINES:
            batch.append(line)
        else:
            lines.access_text(line[:-1])

    def _log_record(
        self,
        lines: LineObserver | None,
        exchange: Exchange,
        status: int,
        size: int,
        site: str,
        upstream: str,
        received: int,
    ) -> None:
        """The record's ways: JSON on stdout, the file, Twisted's publisher (no observer of ours)."""
        fields = self.record(exchange, status, size, site, upstream, received)
        if lines is not None:
            if lines.factory.log_format == "json":
                lines.access_json(fields)
            else:
                lines.access_text(self.line(fields))
        elif self.stdout:
            self.logger.info(_FORMAT, **self._text_fields(fields))
        if self.file is not None:
            self.file.write(json.dumps(fields, separators=(",", ":")) + "\n")


def _quoted(value: bytes) -> str:
    text = value.decode("latin-1")
    return _quote(text) if '"' in text or "\\" in text else text


def _cached(cache: dict[bytes, str], value: bytes, text: str) -> str:
    """Remember ``text``, how ``value`` is written in the line, while the cache has room (hosts, user agents)."""
    if len(cache) < 256:  # a site's few names, its clients' few agents; what else comes is decoded each time
        cache[value] = text
    return text


RunInThread = Callable[..., "Deferred[Any]"]


class AccessLogFile:
    """JSON lines appended to ``path`` by the thread pool, a batch at a time (see the module docstring)."""

    def __init__(self, path: str, clock: Any, run: RunInThread) -> None:
        self.path = path
        self.clock = clock
        self.run = run
        self.pending: list[str] = []
        self.pending_size = 0
        self.dropped = 0
        self.busy = False
        self.reopen_wanted = False
        self.closed = False
        self._close_sent = False
        self._fd: int | None = None  # touched only by the batch being written
        self._timer: Any = None
        self._idle: list[Deferred[None]] = []

    def write(self, line: str) -> None:
        if self.closed:
            return
        if self.pending_size >= MAX_PENDING:
            self.dropped += 1
            return
        self.pending.append(line)
        self.pending_size += len(line)
        if self.pending_size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None and not self.busy:
            self._timer = self.clock.callLater(FLUSH_SECONDS, self.flush)

    def reopen(self) -> None:
        """SIGUSR1: the next batch goes to a freshly opened ``path`` (logrotate moved the old one)."""
        self.reopen_wanted = True
        self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self.busy or not (self.pending or self.reopen_wanted or (self.closed and not self._close_sent)):
            return
        self._close_sent = self.closed
        data = "".join(self.pending).encode("utf-8", "backslashreplace")
        self.pending = []
        self.pending_size = 0
        reopen, self.reopen_wanted = self.reopen_wanted, False
        dropped, self.dropped = self.dropped, 0
        self.busy = True
        self.run(self._write_batch, data, reopen, self.closed).addBoth(self._written, dropped)

    def _write_batch(self, data: bytes, reopen: bool, close: bool) -> None:
        """In a thread: (re)open, append, and close at the end."""
        if reopen and self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if data:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        if close and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _written(self, result: Any, dropped: int) -> None:
        self.busy = False
        if dropped:
            log.warn("access log {path}: {n} line(s) dropped, the disk was too slow", path=self.path, n=dropped)
        if not (result is None or isinstance(result, bool)):
            log.warn("access log {path}: cannot write: {error}", path=self.path, error=result.getErrorMessage())
        if self.pending or self.reopen_wanted or (self.closed and not self._close_sent):
            self.flush()
        if not self.busy:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def close(self) -> Deferred[None]:
        """Write what is pending, close the file; fires when done."""
        if self._close_sent and not self.busy:
            return succeed(None)
        self.closed = True
        done: Deferred[None] = Deferred()
        self._idle.append(done)
        if not self.busy:
            self.flush()
        return done

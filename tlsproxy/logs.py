"""Log lines on stdout: readable text by default, or one JSON object per line.

Twisted's ``twist`` picks JSON whenever stdout is not a terminal (a container,
systemd); tlsproxy decides by ``[server] log_format`` instead, unless
``--log-format`` is given to ``twist`` explicitly.  SIGHUP may change the
format, so the observers read it on every event.

Twisted's own legacy chatter ("TLSServerFactory starting on 8443", "(TCP Port
8443 Closed)") repeats what tlsproxy says better: it is shown at debug level.

Access log records skip Twisted's publisher and formatter, which cost more
than the request they describe: :func:`installed_lines` hands the process's
line observer to :mod:`tlsproxy.proxy.accesslog`, which gives it the finished
line.  Once :meth:`LogOutput.install` gave the observer a clock, lines are
gathered and written every :data:`FLUSH_SECONDS` (at once for any line that
is not an access record, so the order holds), without ever blocking the
reactor on a pipe or socket nobody reads: a chunk goes out only when poll()
says it fits, the rest waits for the next turn, and past :data:`MAX_PENDING`
access lines are dropped and counted.  Shutdown writes what is left.
"""

from __future__ import annotations

import json
import os
import select
import stat
import time
from typing import IO, Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

_SKIP = frozenset(
    {
        "log_logger",
        "log_source",
        "log_format",
        "log_flattened",
        "log_io",
        "log_system",
        "log_time",
        "log_level",
        "log_namespace",
        "log_failure",
        "log_text",
        "log_trace",
        "message",
        "system",
        "isError",
        "time",
        "format",
        "failure",
        "why",
    }
)


FLUSH_SECONDS = 0.1
FLUSH_BYTES = 64 * 1024
BATCH_LINES = 256  # appended to an open batch as is: a few dozen KiB
MAX_PENDING = 4 * 1024 * 1024
# A write of at most this much to a pipe is atomic: lines of several workers on one pipe never mix.
PIPE_BUF = select.PIPE_BUF
ACCESS = "tlsproxy.access"

_installed: LogOutput | None = None


def installed_lines() -> LineObserver | None:
    """The observer writing this process's log lines, once logging began through an installed output."""
    return _installed.observer if _installed is not None else None


def _when(event: dict[str, Any], ms: bool = False) -> str:
    stamp = event.get("log_time") or time.time()
    if ms:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp % 1 * 1000):03d}Z"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def _message(event: dict[str, Any]) -> str:
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    return text


def text_line(event: dict[str, Any]) -> str:
    level = event.get("log_level")
    name = level.name if level is not None else "info"
    namespace = event.get("log_namespace", "-")
    if namespace == "tlsproxy.access":
        return _message(event) + "\n"
    worker = f"[worker {event['worker']} pid {event['pid']}] " if "worker" in event else ""
    return f"{_when(event)} [{namespace}#{name}] {worker}{_message(event)}\n"


def json_line(event: dict[str, Any]) -> str:
    level = event.get("log_level")
    namespace = event.get("log_namespace", "-")
    record: dict[str, Any] = {
        "time": _when(event, ms=True),
        "level": level.name if level is not None else "info",
        "logger": namespace,
    }
    if namespace != "tlsproxy.access":
        # An access record is its fields (tlsproxy/proxy/accesslog.py), not its text line again.
        record["message"] = _message(event)
    for key, value in event.items():
        if key in _SKIP or key.startswith("_"):
            continue
        if isinstance(value, str | int | float | bool) or value is None:
            record[key] = value
    return json.dumps(record, separators=(",", ":")) + "\n"


_LEVELS = (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical)


def effective_level(event: dict[str, Any]) -> LogLevel:
    """The level an event is shown at: Twisted's legacy info lines count as debug."""
    level = event.get("log_level") or LogLevel.info
    if event.get("log_namespace") == "log_legacy" and level == LogLevel.info and not event.get("isError"):
        return LogLevel.debug
    return level


def visible(event: dict[str, Any], threshold: LogLevel) -> bool:
    return _LEVELS.index(effective_level(event)) >= _LEVELS.index(threshold)


@implementer(ILogObserver)
class LineObserver:
    """Writes each event at or above ``level`` as one line, in the format its factory says now."""

    def __init__(self, output: IO[str], factory: LogOutput) -> None:
        self.output = output
        self.factory = factory
        self.pending: list[str] = []
        self.pending_size = 0
        self.held = b""  # encoded, not yet accepted by the pipe
        self.dropped = 0
        self.closed = False
        self._timer: Any = None
        # The batch waiting for the timer, while an access line may simply be appended to it
        # (the access log does, up to BATCH_LINES lines): None when lines must go through put().
        self.batch: list[str] | None = None
        self._fd: int | None = None
        self._poll: Any = None  # None: a regular file (or no descriptor), written whole
        try:
            fd = output.fileno()
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except (AttributeError, OSError, ValueError):
            return
        self._fd = fd
        if not regular:
            self._poll = select.poll()
            self._poll.register(fd, select.POLLOUT)
        encoding = getattr(output, "encoding", None) or "utf-8"
        errors = getattr(output, "errors", None) or "strict"
        self._encoding = encoding
        self._errors = "backslashreplace" if errors == "strict" else errors

    def __call__(self, event: dict[str, Any]) -> None:
        if not visible(event, self.factory.level):
            return
        formatter = json_line if self.factory.log_format == "json" else text_line
        if self.factory.worker is not None:
            event = {**event, "worker": self.factory.worker, "pid": self.factory.pid}
        self.put(formatter(event), urgent=True)

    def access_text(self, line: str) -> None:
        """An access record in the text format: ``line`` (its combined-format line) as is."""
        level = self.factory.level
        if level is not LogLevel.info and level is not LogLevel.debug:
            return
        if self._timer is not None and self.pending_size < FLUSH_BYTES - len(line):
            self.pending.append(line + "\n")  # put()'s common case, inline: every request passes here
            self.pending_size += len(line) + 1
        else:
            self.put(line + "\n")

    def access_json(self, fields: dict[str, Any]) -> None:
        """An access record in the JSON format: what :func:`json_line` makes of its event."""
        level = self.factory.level
        if level is not LogLevel.info and level is not LogLevel.debug:
            return
        record = {"time": fields["time"], "level": "info", "logger": ACCESS}
        for key, value in fields.items():
            if key != "time":
                record[key] = value
        if self.factory.worker is not None:
            record["worker"] = self.factory.worker
            record["pid"] = self.factory.pid
        self.put(json.dumps(record, separators=(",", ":")) + "\n")

    def put(self, text: str, urgent: bool = False) -> None:
        """Queue ``text``; ``urgent`` (any line but an access record) goes out now, the others in batches."""
        clock = self.factory.clock
        if clock is None or self.closed or self._fd is None:
            if self.pending or self.held:
                self.close()
            self.output.write(text)
            self.output.flush()
            return
        if not urgent and self.pending_size >= MAX_PENDING:
            self.dropped += 1
            return
        self.pending.append(text)
        self.pending_size += len(text)
        if urgent or (self.pending_size >= FLUSH_BYTES and not self.held):
            self.flush()
        elif self._timer is None:
            self._timer = clock.callLater(FLUSH_SECONDS, self.flush)
            if not urgent and not self.held:
                self.batch = self.pending

    def _dropped_line(self) -> str:
        n, self.dropped = self.dropped, 0
        event = {
            "log_format": "log output blocked: {n} access line(s) dropped",
            "log_level": LogLevel.warn,
            "log_namespace": "tlsproxy.logs",
            "log_time": time.time(),
            "n": n,
        }
        if self.factory.worker is not None:
            event.update(worker=self.factory.worker, pid=self.factory.pid)
        return (json_line if self.factory.log_format == "json" else text_line)(event)

    def flush(self) -> None:
        """Write what the output takes now without waiting; the rest waits for the timer."""
        self.batch = None
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self.dropped and not self.held:  # once the backlog is out: one line with the whole count
            self.pending.append(self._dropped_line())
        if self.pending:
            self.held += "".join(self.pending).encode(self._encoding, self._errors)
            self.pending = []
        if not self.held:
            self.pending_size = 0
            return
        self.output.flush()  # nothing of its own is waiting, but it must come first if it were
        done = self._write(self.held, block=False)
        self.held = self.held[done:]
        self.pending_size = len(self.held)
        if (self.held or self.dropped) and self.factory.clock is not None:
            self._timer = self.factory.clock.callLater(FLUSH_SECONDS, self.flush)

    def _write(self, data: bytes, block: bool) -> int:
        """How much of ``data`` went out: chunks of whole lines, each only once poll() says it fits."""
        assert self._fd is not None
        view = memoryview(data)
        done, size = 0, len(data)
        while done < size:
            end = size
            if self._poll is not None:
                if not block and not self._poll.poll(0):
                    break
                if size - done > PIPE_BUF:
                    cut = data.rfind(b"\n", done, done + PIPE_BUF)
                    end = cut + 1 if cut >= done else data.find(b"\n", done + PIPE_BUF) + 1 or size
            try:
                done += os.write(self._fd, view[done:end])
            except BlockingIOError:
                break
            except OSError:
                return size  # the reader is gone (EPIPE) or the file is broken: nothing more will go out
        return done

    def close(self) -> None:
        """At shutdown: write everything left, waiting if the output must; later lines go out one by one."""
        self.closed = True
        self.batch = None
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self.dropped:
            self.pending.append(self._dropped_line())
        if self._fd is None:
            text = "".join(self.pending)
            self.pending = []
            if text:
                self.output.write(text)
                self.output.flush()
            return
        data = self.held + "".join(self.pending).encode(self._encoding, self._errors)
        self.held, self.pending, self.pending_size = b"", [], 0
        if data:
            self.output.flush()
            self._write(data, block=True)


class LogOutput:
    """twist's ``fileLogObserverFactory``: makes line observers that follow ``log_format`` as it changes."""

    def __init__(self, log_format: str = "text", level: LogLevel = LogLevel.info) -> None:
        self.log_format = log_format
        self.level = level
        # Set in a worker process ([server] workers): its index and pid go on every line.
        self.worker: int | None = None
        self.pid = os.getpid()
        # The observer twist made of this output (the last one made), and the clock batches wait on.
        self.observer: LineObserver | None = None
        self.clock: Any = None

    def __call__(self, output: IO[str]) -> LineObserver:
        self.observer = LineObserver(output, self)
        return self.observer

    def install(self, reactor: Any) -> None:
        """This output writes the process's log: access records come straight to it, batched on ``reactor``."""
        global _installed
        _installed = self
        self.clock = reactor
        reactor.addSystemEventTrigger("during", "shutdown", self.close)

    def close(self) -> None:
        if self.observer is not None:
            self.observer.close()

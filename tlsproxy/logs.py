"""Log lines on stdout: readable text by default, or one JSON object per line.

Twisted's ``twist`` picks JSON whenever stdout is not a terminal (a container,
systemd); tlsproxy decides by ``[server] log_format`` instead, unless
``--log-format`` is given to ``twist`` explicitly.  SIGHUP may change the
format, so the observers read it on every event.

Twisted's own legacy chatter ("TLSServerFactory starting on 8443", "(TCP Port
8443 Closed)") repeats what tlsproxy says better: it is shown at debug level.
"""

from __future__ import annotations

import json
import os
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

    def __call__(self, event: dict[str, Any]) -> None:
        if not visible(event, self.factory.level):
            return
        formatter = json_line if self.factory.log_format == "json" else text_line
        if self.factory.worker is not None:
            event = {**event, "worker": self.factory.worker, "pid": self.factory.pid}
        self.output.write(formatter(event))
        self.output.flush()


class LogOutput:
    """twist's ``fileLogObserverFactory``: makes line observers that follow ``log_format`` as it changes."""

    def __init__(self, log_format: str = "text", level: LogLevel = LogLevel.info) -> None:
        self.log_format = log_format
        self.level = level
        # Set in a worker process ([server] workers): its index and pid go on every line.
        self.worker: int | None = None
        self.pid = os.getpid()

    def __call__(self, output: IO[str]) -> LineObserver:
        return LineObserver(output, self)

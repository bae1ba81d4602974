"""Log lines on stdout: readable text by default, or one JSON object per line.

Twisted's ``twist`` picks JSON whenever stdout is not a terminal (a container,
systemd); tlsproxy decides by ``[server] log_format`` instead, unless
``--log-format`` is given to ``twist`` explicitly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import FileLogObserver, formatEvent

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


def _when(event: dict[str, Any]) -> str:
    stamp = event.get("log_time") or time.time()
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
    return f"{_when(event)} [{namespace}#{name}] {_message(event)}\n"


def json_line(event: dict[str, Any]) -> str:
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _when(event),
        "level": level.name if level is not None else "info",
        "logger": event.get("log_namespace", "-"),
        "message": _message(event),
    }
    for key, value in event.items():
        if key in _SKIP or key.startswith("_"):
            continue
        if isinstance(value, str | int | float | bool) or value is None:
            record[key] = value
    return json.dumps(record, separators=(",", ":")) + "\n"


def observer_factory(log_format: str) -> Callable[[IO[str]], FileLogObserver]:
    formatter = json_line if log_format == "json" else text_line
    return lambda output: FileLogObserver(output, formatter)

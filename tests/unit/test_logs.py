"""Log lines: the level a person sees by default, and a format that follows the configuration."""

from __future__ import annotations

import io
import json

from twisted.logger import LogLevel

from tlsproxy.logs import LogOutput


def event(text: str, level: LogLevel = LogLevel.info, namespace: str = "tlsproxy", **extra: object) -> dict:
    return {"log_format": text, "log_level": level, "log_namespace": namespace, "log_time": 1.0, **extra}


def test_twisted_legacy_chatter_and_debug_hidden_by_default() -> None:
    """Legacy info lines and debug events (untrusted-CA handshakes) are not shown at the default level."""
    out = io.StringIO()
    observer = LogOutput("text")(out)
    observer(event("TLSServerFactory starting on 8443", namespace="log_legacy"))
    observer(event("TLS handshake failed: unknown ca", LogLevel.debug))
    observer(event("legacy error", LogLevel.critical, namespace="log_legacy", isError=1))
    observer(event("ready"))
    assert out.getvalue().splitlines() == [
        "1970-01-01T00:00:01Z [log_legacy#critical] legacy error",
        "1970-01-01T00:00:01Z [tlsproxy#info] ready",
    ]


def test_debug_level_shows_everything() -> None:
    """With --log-level debug the legacy lines and handshake failures are there."""
    out = io.StringIO()
    observer = LogOutput("text", LogLevel.debug)(out)
    observer(event("TLSServerFactory starting on 8443", namespace="log_legacy"))
    observer(event("TLS handshake failed", LogLevel.debug))
    assert len(out.getvalue().splitlines()) == 2


def test_format_follows_the_output_as_it_changes() -> None:
    """Switching log_format (as SIGHUP does) changes the next line written by an existing observer."""
    out = io.StringIO()
    output = LogOutput("text")
    observer = output(out)
    observer(event("before"))
    output.log_format = "json"
    observer(event("after"))
    text, record = out.getvalue().splitlines()
    assert text.endswith("[tlsproxy#info] before")
    assert json.loads(record)["message"] == "after"


def test_worker_lines_say_which_worker() -> None:
    """In a worker process every line names the worker and its pid, in text and in JSON; else none do."""
    out = io.StringIO()
    output = LogOutput("text")
    observer = output(out)
    observer(event("alone"))
    output.worker, output.pid = 2, 4242
    observer(event("ready"))
    output.log_format = "json"
    observer(event("ready"))
    lines = out.getvalue().splitlines()
    assert lines[0] == "1970-01-01T00:00:01Z [tlsproxy#info] alone"
    assert lines[1] == "1970-01-01T00:00:01Z [tlsproxy#info] [worker 2 pid 4242] ready"
    record = json.loads(lines[2])
    assert (record["worker"], record["pid"], record["message"]) == (2, 4242, "ready")

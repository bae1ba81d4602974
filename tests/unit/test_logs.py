"""Log lines: the level a person sees by default, and a format that follows the configuration."""

from __future__ import annotations

import io
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel

from tlsproxy import logs
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


# -- batches on stdout -------------------------------------------------------------------


class Installed:
    """A LogOutput installed on a fake reactor, writing to a real descriptor (a file or a pipe)."""

    def __init__(self, stream: IO[str], log_format: str = "text") -> None:
        self.reactor = MemoryReactorClock()
        self.output = LogOutput(log_format)
        previous = logs._installed
        self.output.install(self.reactor)
        logs._installed = previous  # the process's own output stays what it was
        self.observer = self.output(stream)

    def shutdown(self) -> None:
        """What the reactor runs during shutdown, after the drain (stopService) is done."""
        for call, args, kwargs in self.reactor.triggers["during"]["shutdown"]:
            call(*args, **kwargs)


def test_access_lines_wait_for_the_timer_then_go_in_order(tmp_path: Path) -> None:
    """Access lines are written in one batch after FLUSH_SECONDS, none lost, in the order they came."""
    with open(tmp_path / "out", "w") as stream:
        installed = Installed(stream)
        for n in range(500):
            installed.observer.access_text(f"line {n}")
        assert (tmp_path / "out").read_text() == ""
        installed.reactor.advance(logs.FLUSH_SECONDS)
        assert (tmp_path / "out").read_text() == "".join(f"line {n}\n" for n in range(500))


def test_other_lines_go_at_once_after_the_access_lines_before_them(tmp_path: Path) -> None:
    """A warning is not held back by the batch, and the access lines logged before it come first."""
    with open(tmp_path / "out", "w") as stream:
        installed = Installed(stream)
        installed.observer.access_text("GET /1")
        installed.observer(event("upstream down", LogLevel.warn))
        installed.observer.access_text("GET /2")
        assert (tmp_path / "out").read_text().splitlines() == [
            "GET /1",
            "1970-01-01T00:00:01Z [tlsproxy#warn] upstream down",
        ]
        installed.reactor.advance(logs.FLUSH_SECONDS)
        assert (tmp_path / "out").read_text().splitlines()[-1] == "GET /2"


def test_a_full_batch_goes_before_the_timer(tmp_path: Path) -> None:
    """Past FLUSH_BYTES the lines go out without waiting for the timer."""
    with open(tmp_path / "out", "w") as stream:
        installed = Installed(stream)
        line = "x" * 999
        for _ in range(logs.FLUSH_BYTES // 1000 + 1):
            installed.observer.access_text(line)
        assert (tmp_path / "out").stat().st_size >= logs.FLUSH_BYTES


def test_shutdown_writes_what_is_pending(tmp_path: Path) -> None:
    """The reactor's shutdown (after the SIGTERM drain) writes the batch; later lines go out at once."""
    with open(tmp_path / "out", "w") as stream:
        installed = Installed(stream, "json")
        installed.observer.access_json({"time": "t", "client": "c"})
        installed.shutdown()
        installed.observer.access_text("after")
        assert (tmp_path / "out").read_text().splitlines() == [
            '{"time":"t","level":"info","logger":"tlsproxy.access","client":"c"}',
            "after",
        ]
        assert not installed.reactor.getDelayedCalls()


@pytest.fixture
def unread_pipe() -> Iterator[tuple[IO[str], int]]:
    """A pipe whose reader never reads (until the test does): the writer is blocking, as stdout is."""
    read_fd, write_fd = os.pipe()
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    signal.alarm(20)  # a write that blocks would hang the test: fail it instead
    stream = open(write_fd, "w")
    try:
        yield stream, read_fd
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        stream.close()
        os.close(read_fd)


def test_a_pipe_nobody_reads_never_blocks_the_reactor(
    unread_pipe: tuple[IO[str], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the pipe's room lines wait, past MAX_PENDING they are dropped and counted; the writes never block."""
    stream, read_fd = unread_pipe
    monkeypatch.setattr(logs, "MAX_PENDING", 256 * 1024)
    installed = Installed(stream)
    line = "y" * 99
    for n in range(10_000):  # 1 MB: far more than the pipe holds (64 KiB) or MAX_PENDING
        installed.observer.access_text(line)
        if n % 100 == 0:
            installed.reactor.advance(logs.FLUSH_SECONDS)
    assert installed.observer.dropped > 0
    assert installed.observer.pending_size <= logs.MAX_PENDING + 200
    installed.observer(event("still here", LogLevel.warn))  # an urgent line does not block either
    os.set_blocking(read_fd, False)
    received = b""
    for _ in range(1000):  # the reader catches up: what waited goes out, then the count of what did not
        try:
            received += os.read(read_fd, 1 << 20)
        except BlockingIOError:
            if not (installed.observer.held or installed.observer.pending or installed.observer.dropped):
                break
        installed.reactor.advance(logs.FLUSH_SECONDS)
    lines = received.decode().splitlines()
    assert set(lines[:-2]) == {line}  # whole lines only, never a torn one
    assert lines[-2].endswith("[tlsproxy#warn] still here")
    dropped = int(lines[-1].split("blocked: ")[1].split()[0])
    assert "[tlsproxy.logs#warn] log output blocked" in lines[-1]
    assert dropped + len(lines) - 2 == 10_000


def test_lines_for_a_pipe_go_in_whole_lines_of_at_most_pipe_buf(
    unread_pipe: tuple[IO[str], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each write to a pipe is whole lines and at most PIPE_BUF bytes, so workers sharing it never tear a line."""
    stream, read_fd = unread_pipe
    installed = Installed(stream)
    writes: list[int] = []
    real_write = os.write

    def record(fd: int, data: Any) -> int:
        writes.append(len(data))
        assert bytes(data).endswith(b"\n")
        return real_write(fd, data)

    monkeypatch.setattr(logs.os, "write", record)
    for n in range(300):
        installed.observer.access_text(f"{n:>40}")
    installed.reactor.advance(logs.FLUSH_SECONDS)
    assert len(writes) > 1 and max(writes) <= logs.PIPE_BUF
    assert os.read(read_fd, 1 << 20).decode().splitlines() == [f"{n:>40}" for n in range(300)]

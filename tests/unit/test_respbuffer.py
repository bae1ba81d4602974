"""The response buffer: order kept across memory and file, caps, a full disk, no file left behind."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tlsproxy.proxy import respbuffer
from tlsproxy.proxy.respbuffer import BufferSpace, ResponseBuffer, accel_buffering


class StepRunner:
    """Stands in for the thread pool: each blocking call waits until the test runs it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
        self.broken: dict[Callable[..., Any], OSError] = {}

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def step(self) -> None:
        f, args, d = self.calls.pop(0)
        if f in self.broken:
            d.errback(Failure(self.broken[f]))
            return
        try:
            result = f(*args)
        except OSError:
            d.errback(Failure())
        else:
            d.callback(result)

    def run_all(self) -> None:
        while self.calls:
            self.step()


class Client:
    """The buffer's output: a client that takes ``window`` bytes, then pauses until told."""

    def __init__(self) -> None:
        self.got = bytearray()
        self.buffer: ResponseBuffer | None = None
        self.window = 0
        self.app_paused = False
        self.pauses = 0
        self.done = False
        self.failed: str | None = None

    def deliver(self, data: bytes) -> None:
        self.got += data
        self.window -= len(data)
        if self.window <= 0 and self.buffer is not None:
            self.buffer.pause()

    def delivered_all(self) -> None:
        self.done = True

    def pause_app(self) -> None:
        self.app_paused = True
        self.pauses += 1

    def resume_app(self) -> None:
        self.app_paused = False

    def buffer_failed(self, detail: str) -> None:
        self.failed = detail

    def read(self, window: int) -> None:
        assert self.buffer is not None
        self.window = window
        self.buffer.resume()


def make(
    directory: Path, runner: StepRunner, limit: int = 1 << 30, memory_each: int = 1024, stall: float = 0.0
) -> tuple[BufferSpace, ResponseBuffer, Client]:
    """A buffer whose client is slow from the start (stall 0: no pacing), unless ``stall`` says otherwise."""
    space = BufferSpace(Clock(), str(directory / "buffers"), limit, memory_each=memory_each, stall=stall, run=runner)
    client = Client()
    buffer = ResponseBuffer(space, client)
    client.buffer = buffer
    return space, buffer, client


def pieces(count: int, size: int = 1000) -> list[bytes]:
    return [bytes([i % 251]) * size for i in range(count)]


def test_order_is_kept_across_memory_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes that went to memory, then to the file, then to memory again reach the client in order."""
    monkeypatch.setattr(respbuffer, "READ_CHUNK", 1500)
    runner = StepRunner()
    space, buffer, client = make(tmp_path, runner)
    data = pieces(50)
    for piece in data[:20]:
        buffer.add(piece)
    assert client.got == b"" and runner.calls, "past memory_each the buffer asks for a file"
    runner.run_all()
    for piece in data[20:40]:
        buffer.add(piece)
    runner.run_all()
    client.read(3000)
    runner.run_all()
    for piece in data[40:]:
        buffer.add(piece)
    runner.run_all()
    buffer.end()
    while not client.done:
        client.read(7000)
        runner.run_all()
    assert bytes(client.got) == b"".join(data)
    assert (space.files, space.in_memory) == (0, 0)
    assert not client.app_paused


def test_file_reads_and_writes_go_through_the_runner(tmp_path: Path) -> None:
    """No file is opened, written or read on the caller's thread: every step waits for the runner."""
    runner = StepRunner()
    space, buffer, client = make(tmp_path, runner)
    for piece in pieces(5, 1000):
        buffer.add(piece)
    assert space.files == 0
    assert [c[0] for c in runner.calls] == [respbuffer.open_unlinked]
    runner.step()
    assert [c[0] for c in runner.calls] == [respbuffer.write_all]
    runner.step()
    client.read(10_000)
    assert bytes(client.got) == bytes(1000), "the first piece was in memory"
    assert [c[0] for c in runner.calls] == [os.pread]


def test_app_paused_at_the_cap_and_resumed_below(tmp_path: Path) -> None:
    """Past max_response_buffer the app is paused (back-pressure); once the client reads, it resumes."""
    runner = StepRunner()
    _, buffer, client = make(tmp_path, runner, limit=10_000)
    for piece in pieces(9):
        buffer.add(piece)
        runner.run_all()
    assert not client.app_paused
    buffer.add(bytes(1000))
    assert client.app_paused
    client.read(4000)
    runner.run_all()
    assert not client.app_paused


def test_client_that_keeps_up_gets_bytes_directly(tmp_path: Path) -> None:
    """While the client takes bytes and nothing is held, they pass straight through."""
    runner = StepRunner()
    space, buffer, client = make(tmp_path, runner)
    client.read(1 << 20)
    buffer.add(b"abc")
    assert (bytes(client.got), runner.calls, space.in_memory) == (b"abc", [], 0)


def test_full_disk_falls_back_to_back_pressure(tmp_path: Path) -> None:
    """A write that fails (ENOSPC) keeps every byte, pauses the app, and the answer still arrives whole."""
    runner = StepRunner()
    runner.broken[respbuffer.write_all] = OSError(errno.ENOSPC, "No space left on device")
    space, buffer, client = make(tmp_path, runner)
    data = pieces(6)
    for piece in data:
        buffer.add(piece)
        runner.run_all()
    assert client.app_paused, "the app waits for the client once the disk refuses"
    buffer.end()
    while not client.done:
        client.read(1500)
        runner.run_all()
    assert bytes(client.got) == b"".join(data)
    assert (space.files, space.in_memory) == (0, 0)


def test_unusable_directory_falls_back_to_back_pressure(tmp_path: Path) -> None:
    """A buffer directory that cannot be made (a file is in the way) means streaming, not an error."""
    (tmp_path / "buffers").write_text("in the way")
    runner = StepRunner()
    _, buffer, client = make(tmp_path, runner)
    data = pieces(3)
    for piece in data:
        buffer.add(piece)
        runner.run_all()
    assert client.app_paused
    buffer.end()
    client.read(1 << 20)
    assert client.done and bytes(client.got) == b"".join(data)


def test_read_failure_is_reported(tmp_path: Path) -> None:
    """A buffer file that cannot be read back fails the answer (it cannot be completed), once."""
    runner = StepRunner()
    space, buffer, client = make(tmp_path, runner)
    for piece in pieces(4):
        buffer.add(piece)
    runner.run_all()
    runner.broken[os.pread] = OSError(errno.EIO, "I/O error")
    client.read(10_000)
    runner.run_all()
    assert client.failed is not None and "I/O error" in client.failed
    assert (space.files, space.in_memory) == (0, 0)


def test_file_has_no_name_and_directory_is_private(tmp_path: Path) -> None:
    """The temporary file never shows in the directory, which is mode 0700."""
    runner = StepRunner()
    space, buffer, _ = make(tmp_path, runner)
    for piece in pieces(3):
        buffer.add(piece)
    runner.run_all()
    assert space.files == 1
    directory = tmp_path / "buffers"
    assert list(directory.iterdir()) == []
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_loose_directory_is_made_private(tmp_path: Path) -> None:
    """A buffer directory of ours that others could enter is narrowed to 0700 before use."""
    directory = tmp_path / "buffers"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    os.close(respbuffer.open_unlinked(str(directory)))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_close_waits_for_a_read_in_flight(tmp_path: Path) -> None:
    """The descriptor is closed only after a read in another thread is done (it could be reused)."""
    runner = StepRunner()
    space, buffer, client = make(tmp_path, runner)
    for piece in pieces(4):
        buffer.add(piece)
    runner.run_all()
    client.read(10_000)
    assert [c[0] for c in runner.calls] == [os.pread]
    buffer.close()
    assert space.files == 1 and [c[0] for c in runner.calls] == [os.pread]
    runner.run_all()
    assert space.files == 0 and space.in_memory == 0


def test_close_frees_memory_and_file(tmp_path: Path) -> None:
    """A client that leaves mid-answer leaves no memory counted and no file open."""
    runner = StepRunner()
    space, buffer, _ = make(tmp_path, runner)
    for piece in pieces(10):
        buffer.add(piece)
        runner.run_all()
    buffer.add(b"x" * 500)
    buffer.close()
    runner.run_all()
    assert (space.files, space.in_memory) == (0, 0)


def test_total_memory_cap_spills_at_once(tmp_path: Path) -> None:
    """Once all buffers together hold memory_total, a new answer's bytes go to the file straight away."""
    runner = StepRunner()
    space = BufferSpace(Clock(), str(tmp_path / "b"), 1 << 30, memory_each=10_000, memory_total=1500, run=runner)
    first, second = ResponseBuffer(space, Client()), ResponseBuffer(space, Client())
    first.add(bytes(1600))
    assert runner.calls == []
    second.add(b"x")
    assert [c[0] for c in runner.calls] == [respbuffer.open_unlinked]


@pytest.mark.parametrize(
    ("fields", "kept", "allowed"),
    [
        (b"content-type: text/plain\r\n", b"content-type: text/plain\r\n", True),
        (b"X-Accel-Buffering: no\r\ncontent-type: a\r\n", b"content-type: a\r\n", False),
        (b"a: 1\r\nx-accel-buffering:  NO \r\n", b"a: 1\r\n", False),
        (b"X-ACCEL-BUFFERING: yes\r\nb: 2\r\n", b"b: 2\r\n", True),
    ],
)
def test_accel_buffering(fields: bytes, kept: bytes, allowed: bool) -> None:
    """X-Accel-Buffering is taken out whatever its case; only "no" turns buffering off."""
    assert accel_buffering(fields) == (kept, allowed)


def test_default_runner_without_threads_runs_inline(tmp_path: Path) -> None:
    """On a reactor with no thread pool (a test fake), blocking calls run inline, still as Deferreds."""
    space = BufferSpace(Clock(), str(tmp_path), 10)
    results: list[int] = []
    space.run(len, b"abc").addCallback(results.append)
    assert results == [3]


def test_client_that_keeps_up_paces_the_app_instead_of_spilling(tmp_path: Path) -> None:
    """A full memory share pauses the app; a client that soon takes half of it resumes it; no file is used."""
    runner = StepRunner()
    space, buffer, client = make(tmp_path, runner, memory_each=4000, stall=0.5)
    clock = space.reactor
    for _ in range(5):
        buffer.pause()
        for piece in pieces(4):
            buffer.add(piece)
        assert client.app_paused, "the share is full: the app waits"
        buffer.add(bytes(1000))  # what the app sent before it saw the pause is kept in order
        clock.advance(0.25)
        client.read(2000)
        assert client.app_paused, "not halved yet"
        client.read(1000)
        assert not client.app_paused, "halved within STALL: the app goes on"
        client.read(1 << 20)
    assert runner.calls == [] and space.files == 0
    assert bytes(client.got) == b"".join((b"".join(pieces(4)) + bytes(1000)) for _ in range(5))
    assert space.in_memory == 0
    buffer.close()
    assert clock.getDelayedCalls() == []


def test_client_that_stalls_is_slow_and_its_answer_goes_to_the_file(tmp_path: Path) -> None:
    """A full share not halved within STALL: the app resumes, the rest goes to the file, all arrives in order."""
    runner = StepRunner()
    space, buffer, client = make(tmp_path, runner, memory_each=4000, stall=0.5)
    clock = space.reactor
    buffer.pause()
    sent = pieces(10)
    for piece in sent[:4]:
        buffer.add(piece)
    assert client.app_paused and runner.calls == []
    clock.advance(0.375)
    assert client.app_paused
    clock.advance(0.125)
    assert buffer.slow and not client.app_paused, "slow: the app is let go"
    for piece in sent[4:]:
        buffer.add(piece)
    assert [c[0] for c in runner.calls] == [respbuffer.open_unlinked], "the rest goes to the file"
    runner.run_all()
    client.read(1 << 20)
    runner.run_all()
    buffer.end()
    runner.run_all()
    assert bytes(client.got) == b"".join(sent)
    assert client.done


def test_slow_client_that_caught_up_is_paced_again(tmp_path: Path) -> None:
    """Once a slow client has taken every byte held, the next full share paces the app again."""
    runner = StepRunner()
    space, buffer, client = make(tmp_path, runner, memory_each=4000, stall=0.5)
    buffer.pause()
    for piece in pieces(4):
        buffer.add(piece)
    space.reactor.advance(0.5)
    assert buffer.slow
    client.read(1 << 20)
    runner.run_all()
    assert not buffer.slow
    buffer.pause()
    for piece in pieces(4):
        buffer.add(piece)
    assert client.app_paused and runner.calls == []


def test_stall_is_timed_from_the_latest_pause(tmp_path: Path) -> None:
    """A check that finds the app paced again since looks again when that pause is STALL old."""
    runner = StepRunner()
    space, buffer, client = make(tmp_path, runner, memory_each=4000, stall=0.5)
    clock = space.reactor
    buffer.pause()
    for piece in pieces(4):
        buffer.add(piece)
    clock.advance(0.125)
    client.read(2000)  # halved: the app goes on
    buffer.pause()
    buffer.add(bytes(2000))  # full again at t=0.125: a new pause
    assert client.app_paused
    clock.advance(0.375)  # the first check, at 0.5: this pause is 0.375 old
    assert client.app_paused and not buffer.slow
    clock.advance(0.125)
    assert buffer.slow and not client.app_paused

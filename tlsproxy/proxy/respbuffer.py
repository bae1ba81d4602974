"""Response buffering: take the app's answer as fast as the app sends it.

A gunicorn sync worker is held for as long as its answer takes to leave, so
a client on a slow link would hold it for the whole download.  When the
client stops taking bytes, the rest of the answer goes to memory (a little)
and then to a temporary file (up to a cap), while the client reads at its own
pace; the app is paused only past the cap, or when the disk refuses a write.

A client that keeps up is not slow: its socket is only full for a moment
because the app (on the same machine) writes faster than we can encrypt.
Sending its answer through the file would cost a write, a read and two
thread hops per chunk, for nothing: so once the memory share is full, the
app is paused ("paced") until the client has taken half of it.  A client
that has not done so within ``STALL`` seconds (a rate under about
``MEMORY_EACH / 2 / STALL``) is slow: the app resumes and the rest goes to
the file, as above, until the client has caught up with all of it.

The file is opened without a name (or unlinked at once), so nothing is left
behind after a crash; every read, write, open and close of it runs in a
thread, never on the reactor thread.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

MEMORY_EACH = 256 * 1024  # held in memory per answer before it spills to the file
MEMORY_TOTAL = 64 * 1024 * 1024  # over this in memory for all answers, every new byte spills
WRITE_BEHIND = 1024 * 1024  # bytes waiting for the file: past this the app waits for the disk
READ_CHUNK = 256 * 1024
STALL = 0.01  # a full memory share the client has not halved in this long: a slow client, spill


def accel_buffering(fields: bytes) -> tuple[bytes, bool]:
    """The app's field lines without X-Accel-Buffering, and whether buffering is allowed.

    ``X-Accel-Buffering: no`` (what Django apps send for server-sent events)
    asks for that answer to stream at once; the field is for us, not the client.
    """
    if b"x-accel-buffering" not in fields.lower():
        return fields, True
    kept = []
    allowed = True
    for line in fields.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-accel-buffering":
            if value.strip().lower() == b"no":
                allowed = False
        elif line:
            kept.append(line + b"\r\n")
    return b"".join(kept), allowed


def prepare_directory(directory: str) -> None:
    """Make the buffer directory (mode 0700), or refuse one others can enter."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.stat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", directory)
    if info.st_mode & 0o077:
        if info.st_uid != os.getuid():
            raise PermissionError(errno.EACCES, "open to other users and not ours to restrict", directory)
        os.chmod(directory, 0o700)


def open_unlinked(directory: str) -> int:
    """A temporary file that has no name, so nothing is left after a crash; its descriptor."""
    prepare_directory(directory)
    flags = os.O_RDWR | os.O_CLOEXEC
    unnamed = getattr(os, "O_TMPFILE", 0)
    if unnamed:
        try:
            return os.open(directory, flags | unnamed, 0o600)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    fd, path = tempfile.mkstemp(prefix="response-", dir=directory)
    os.unlink(path)
    return fd


def write_all(fd: int, data: bytes, offset: int) -> int:
    """All of ``data`` at ``offset`` (pwrite may take less than all)."""
    view = memoryview(data)
    done = 0
    while done < len(data):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


class BufferSpace:
    """What every buffered answer of one proxy shares: the directory, the caps, the threads."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        directory: str,
        limit: int,
        *,
        memory_each: int = MEMORY_EACH,
        memory_total: int = MEMORY_TOTAL,
        stall: float = STALL,
        run: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        self.reactor = reactor
        self.directory = directory
        self.limit = limit
        self.memory_each = memory_each
        self.memory_total = memory_total
        self.stall = stall  # 0: every client that stops is slow (no pacing)
        self.in_memory = 0  # bytes all buffers hold in memory
        self.files = 0  # temporary files open now
        if run is None:
            if hasattr(reactor, "getThreadPool"):
                pool = reactor.getThreadPool()

                def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
                    return deferToThreadPool(reactor, pool, f, *args)

            else:  # a fake reactor in a test: no threads to be had
                run = maybeDeferred
        self.run = run
        self._last_report = -1e9

    def report(self, doing: str, failure: Failure) -> None:
        """Say why a buffer file failed, at most once a minute (a full disk fails every answer)."""
        now = self.reactor.seconds()
        if now - self._last_report >= 60:
            self._last_report = now
            self.log.warn(
                "response buffer in {directory}: {doing} failed ({error}); answers stream with back-pressure",
                directory=self.directory,
                doing=doing,
                error=failure.getErrorMessage(),
            )


class BufferOutput(Protocol):
    """Where a :class:`ResponseBuffer` sends the answer, and whom it pauses."""

    def deliver(self, data: bytes) -> None: ...

    def delivered_all(self) -> None:
        """The app's answer ended and the client was given all of it."""

    def pause_app(self) -> None: ...

    def resume_app(self) -> None: ...

    def buffer_failed(self, detail: str) -> None:
        """What is buffered cannot be read back: the answer cannot be completed."""


class ResponseBuffer:
    """What the client has not taken of one answer, in order: memory, the file, memory again.

    ``_front`` is sent first; then the file's bytes from ``_read_at`` to
    ``_write_at``; then ``_back`` (plus ``_writing``, on its way to the
    file).  New bytes go to the front only while the other two are empty.
    """

    _fd = -1
    _opening = False
    _file_failed = False
    _writing: bytes | None = None
    _reading = False
    _read_at = 0
    _write_at = 0
    _front_bytes = 0
    _back_bytes = 0
    client_ready = False  # made when the client stopped taking bytes
    ended = False
    closed = False
    app_paused = False
    pacing = False  # the app waits for a client that keeps up (see the module docstring)
    slow = False  # this client let a full memory share stand for STALL: bytes go to the file
    _paced_at = 0.0
    _stall_check: Any = None  # the pending DelayedCall

    def __init__(self, space: BufferSpace, output: BufferOutput) -> None:
        self.space = space
        self.output = output
        self._front: deque[bytes] = deque()
        self._back: list[bytes] = []

    # -- what the proxied request tells it ----------------------------------------

    @property
    def size(self) -> int:
        """Bytes held for the client, wherever they are."""
        writing = len(self._writing) if self._writing is not None else 0
        return self._front_bytes + (self._write_at - self._read_at) + writing + self._back_bytes

    @property
    def empty(self) -> bool:
        return not self.size and not self._reading

    def add(self, data: bytes) -> None:
        """More of the app's answer."""
        if self.closed or not data:
            return
        if self.client_ready and self.empty:
            self.output.deliver(data)
            return
        space = self.space
        in_order = self._write_at == self._read_at and self._writing is None and not self._back
        below_total = space.in_memory < space.memory_total
        fits = self._front_bytes + len(data) <= space.memory_each and below_total
        # Unless the client is known slow, a full share pauses the app (_check_app) rather than
        # spilling: what the app sent before it saw the pause stays in memory, in order.
        paced = not self.slow and below_total and space.stall > 0
        space.in_memory += len(data)
        if in_order and (fits or paced or self._file_failed):
            self._front.append(data)
            self._front_bytes += len(data)
        else:
            self._back.append(data)
            self._back_bytes += len(data)
            if not self._file_failed:
                self._spill()
        self._check_app()

    def end(self) -> None:
        """The app's answer is complete (its connection is free already)."""
        self.ended = True
        self._pump()

    def pause(self) -> None:
        """The client is not taking bytes."""
        self.client_ready = False

    def resume(self) -> None:
        self.client_ready = True
        self._pump()

    def close(self) -> None:
        """Drop everything (the client left, or the answer was cut); the file goes once idle."""
        if self.closed:
            return
        self.closed = True
        if self._stall_check is not None:
            self._stall_check.cancel()
            self._stall_check = None
        writing = len(self._writing) if self._writing is not None else 0
        self.space.in_memory -= self._front_bytes + self._back_bytes + writing
        self._front.clear()
        self._back.clear()
        self._front_bytes = self._back_bytes = 0
        self._close_file()

    # -- to the client ---------------------------------------------------------------

    def _pump(self) -> None:
        while self.client_ready and not self.closed:
            if self._front:
                chunk = self._front.popleft()
                self._front_bytes -= len(chunk)
                self.space.in_memory -= len(chunk)
                self.output.deliver(chunk)
                continue
            if self._write_at > self._read_at:
                self._read()
                return
            if self._writing is not None:
                return  # its bytes come back through the file once written
            if self._back:
                # The file is empty: what waited for it can go straight out.
                self._front.extend(self._back)
                self._front_bytes += self._back_bytes
                self._back.clear()
                self._back_bytes = 0
                continue
            break
        if self.closed:
            return
        if self._write_at == self._read_at and self._writing is None and not self._reading:
            self._read_at = self._write_at = 0  # the file is empty: use it again from the start
            if not self._back and not self._front:
                self.slow = False  # the client caught up with all of it: it may be paced again
        self._check_app()
        if self.ended and self.empty:
            self.close()
            self.output.delivered_all()

    def _check_app(self) -> None:
        """Pause the app past the cap (or while the disk lags, or fails), resume it below."""
        if self.closed:
            return
        space = self.space
        if self._file_failed:
            held = self._front_bytes + self._back_bytes
            too_much = held > space.memory_each
        else:
            writing = len(self._writing) if self._writing is not None else 0
            too_much = self.size >= space.limit or self._back_bytes + writing > WRITE_BEHIND
            if not too_much and self._should_pace():
                too_much = True
                if not self.pacing:
                    self.pacing = True
                    self._paced_at = space.reactor.seconds()
                    if self._stall_check is None:
                        self._stall_check = space.reactor.callLater(space.stall, self._stalled)
            else:
                self.pacing = False
        if too_much and not self.app_paused:
            self.app_paused = True
            self.output.pause_app()
        elif not too_much and self.app_paused:
            self.app_paused = False
            self.output.resume_app()

    def _should_pace(self) -> bool:
        """The memory share is full (or, paced already, not yet halved) and the client is not known slow."""
        if self.slow or self.ended or self.space.stall <= 0:
            return False
        if self._write_at != self._read_at or self._writing is not None or self._back:
            return False  # the file holds bytes already: the client is slow
        share = self.space.memory_each
        return self._front_bytes > share // 2 if self.pacing else self._front_bytes >= share

    def _stalled(self) -> None:
        """STALL after pacing began: a client still under its halved share is slow."""
        self._stall_check = None
        if self.closed or not self.pacing:
            return
        space = self.space
        waited = space.reactor.seconds() - self._paced_at
        if waited < space.stall:
            # Paced again since the last check: look again when this pause is STALL old.
            self._stall_check = space.reactor.callLater(space.stall - waited, self._stalled)
            return
        self.slow = True
        self.pacing = False
        self._check_app()

    # -- the file ----------------------------------------------------------------------

    def _spill(self) -> None:
        if self._fd >= 0:
            self._write()
        elif not self._opening:
            self._opening = True
            space = self.space
            space.run(open_unlinked, space.directory).addCallbacks(self._opened, self._open_failed)

    def _opened(self, fd: int) -> None:
        self._opening = False
        self.space.files += 1
        self._fd = fd
        if self.closed:
            self._close_file()
            return
        self._write()

    def _open_failed(self, failure: Failure) -> None:
        self._opening = False
        self.space.report("opening a file", failure)
        self._disk_failed()

    def _write(self) -> None:
        if self._writing is not None or not self._back or self.closed:
            return
        data = self._back[0] if len(self._back) == 1 else b"".join(self._back)
        self._back.clear()
        self._back_bytes = 0
        self._writing = data
        self.space.run(write_all, self._fd, data, self._write_at).addCallbacks(self._written, self._write_failed)

    def _written(self, count: int) -> None:
        data, self._writing = self._writing, None
        assert data is not None
        self._write_at += count
        if self.closed:
            self._close_file()
            return
        self.space.in_memory -= count
        if self._back:
            self._write()
        self._check_app()
        self._pump()

    def _write_failed(self, failure: Failure) -> None:
        data, self._writing = self._writing, None
        if self.closed:
            self._close_file()
            return
        self.space.report("writing", failure)
        if data is not None:
            self._back.insert(0, data)
            self._back_bytes += len(data)
        self._disk_failed()

    def _disk_failed(self) -> None:
        """No more bytes to the file: what is held stays in memory, and the app waits for the client."""
        if self.closed:
            return
        self._file_failed = True
        self._check_app()
        self._pump()

    def _read(self) -> None:
        if self._reading:
            return
        self._reading = True
        size = min(READ_CHUNK, self._write_at - self._read_at)
        self.space.run(os.pread, self._fd, size, self._read_at).addCallbacks(self._got, self._read_failed)

    def _got(self, data: bytes) -> None:
        self._reading = False
        if self.closed:
            self._close_file()
            return
        if not data:
            self._read_failed(Failure(OSError(errno.EIO, "the buffer file ended early")))
            return
        self._read_at += len(data)
        self._front.append(data)
        self._front_bytes += len(data)
        self.space.in_memory += len(data)
        self._pump()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        if self.closed:
            self._close_file()
            return
        self.space.report("reading", failure)
        self.close()
        self.output.buffer_failed(f"reading the response buffer failed: {failure.getErrorMessage()}")

    def _close_file(self) -> None:
        """Close the file once no thread uses it (a descriptor closed under a read could be reused)."""
        fd = self._fd
        if fd < 0 or self._reading or self._writing is not None:
            return
        self._fd = -1
        self.space.files -= 1
        self.space.run(os.close, fd).addErrback(lambda failure: None)

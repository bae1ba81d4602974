"""Request bodies held whole before the app is contacted: memory first, then a temporary file.

A gunicorn sync worker is held for as long as the request takes to arrive, and
a WSGI app reads nothing from a body without a Content-Length.  So the proxy
takes the whole body first, whatever its framing, and sends it on at once with
a Content-Length.  Small bodies stay in memory; past a per-request, a
per-connection or a total budget, a body goes to an anonymous temporary file
(unlinked from the start, so a crash leaves nothing behind).  Every file
operation runs in a thread: the reactor only hands bytes over and takes them
back, with back-pressure both ways.

Each thread hop costs a few context switches and a handover of the GIL, and
on a busy reactor the handover is what costs most: so bytes go to the file
in batches of ``write_batch``, and a stored body goes to an app's socket by
``sendfile`` (in a thread, on a non-blocking socket, so the kernel copies the
bytes without our reading them back) as much as the socket takes.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tlsproxy.compat.twisted import nothing_buffered

# Errors that mean "no room", which the client hears as 507, not as our bug.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

RunInThread = Callable[..., "Deferred[Any]"]


class BodyStoreError(Exception):
    """A body could not be stored or read back; ``status`` is what the client gets."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class BufferLimits:
    """How much body is held in memory before it goes to a file."""

    memory: int = 1024 * 1024  # one request
    connection_memory: int = 4 * 1024 * 1024  # all requests of one client connection (h2 streams)
    total_memory: int = 64 * 1024 * 1024  # every request in the process
    write_behind: int = 2 * 1024 * 1024  # bytes on their way to the file before the client is paused
    read_chunk: int = 256 * 1024  # bytes read back from the file at a time (when sendfile cannot serve)
    write_batch: int = 512 * 1024  # bytes gathered for one write to the file (or fewer, at the end)
    sendfile_chunk: int = 8 * 1024 * 1024  # most bytes one sendfile call in a thread may move


def threaded(reactor: Any) -> RunInThread:
    """Run blocking calls in the reactor's thread pool (synchronously on a reactor without one, as in tests)."""
    get_pool = getattr(reactor, "getThreadPool", None)
    if get_pool is None:

        def run_here(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            try:
                return succeed(f(*args))
            except Exception:
                return fail(Failure())

        return run_here
    return lambda f, *args: deferToThreadPool(reactor, get_pool(), f, *args)


# Why a directory may not be ours to use, so that the default falls back to the temp dir.
_NOT_OURS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def fallback_directory() -> str:
    """Where bodies go when the default place under ``state_dir`` is not writable (say, a dev run)."""
    return os.path.join(tempfile.gettempdir(), f"tlsproxy-{os.geteuid()}-buffers")


def prepare_directory(directory: str) -> None:
    """Make ``directory`` a private directory of ours (0700), or raise OSError; blocking."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise PermissionError(errno.EPERM, "not a directory owned by this process's user", directory)
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(directory, 0o700)


def open_buffer_file(directory: str) -> int:
    """A new temporary file in ``directory`` (made 0700), already unlinked; blocking.

    ``TemporaryFile`` uses O_TMPFILE where the file system has it (the file
    never has a name) and otherwise unlinks right after creating it.
    """
    prepare_directory(directory)
    handle = tempfile.TemporaryFile(dir=directory, buffering=0)
    fd = os.dup(handle.fileno())
    handle.close()
    return fd


_IOV_MAX = os.sysconf("SC_IOV_MAX")  # the most pieces one writev takes


def write_all(fd: int, data: bytes | list[bytes]) -> None:
    """Append ``data`` (bytes, or pieces written in order with one writev each time) to the file; blocking."""
    pieces = [memoryview(data)] if isinstance(data, bytes) else [memoryview(piece) for piece in data]
    while pieces:
        written = os.writev(fd, pieces[:_IOV_MAX])
        while pieces and written >= len(pieces[0]):
            written -= len(pieces[0])
            del pieces[0]
        if written:
            pieces[0] = pieces[0][written:]


def read_at(fd: int, size: int, offset: int) -> bytes:
    return os.pread(fd, size, offset)


# A socket the app closed or reset: the connection reports that itself.
_PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN})


def send_file(sock_fd: int, fd: int, offset: int, count: int) -> int:
    """Up to ``count`` bytes of the file from ``offset`` to the non-blocking socket; blocking on the disk only.

    Stops when the socket is full; returns the bytes sent (0: full at once,
    or the app is gone).  ``sock_fd`` is our own duplicate, closed here: the
    reactor may close its descriptor meanwhile, and its number be reused.
    """
    sent = 0
    try:
        while sent < count:
            try:
                n = os.sendfile(sock_fd, fd, offset + sent, count - sent)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno in _PEER_GONE:
                    break
                raise
            if n <= 0:
                break  # the file ended early: the caller finds out
            sent += n
    finally:
        os.close(sock_fd)
    return sent


def socket_of(conn: Any) -> socket.socket | None:
    """The app connection's socket when sendfile may write to it now (nothing queued before), else None."""
    transport: Any = getattr(conn, "transport", None)
    if not isinstance(transport, FileDescriptor):
        return None  # a wrapper (TLS to an app, one day) would forward .socket: bytes must go through it
    sock = getattr(transport, "socket", None)
    if (
        not isinstance(sock, socket.socket)
        or not transport.connected
        or transport.disconnecting
        or not nothing_buffered(transport)
    ):
        return None
    return sock


def describe(error: object) -> BodyStoreError:
    """The client's answer to a failed file operation: 507 when the disk is full."""
    if isinstance(error, BodyStoreError):
        return error
    if isinstance(error, OSError) and error.errno in _NO_ROOM:
        return BodyStoreError(507, f"no room to buffer the request body: {error.strerror}")
    return BodyStoreError(500, f"cannot buffer the request body: {error}")


class BufferPool:
    """Where request bodies wait: the memory budget, and the temporary files' directory."""

    log = Logger()

    def __init__(
        self, directory: str, limits: BufferLimits, run_in_thread: RunInThread, fallback: str | None = None
    ) -> None:
        self.directory = directory
        self.fallback = fallback  # used when ``directory`` cannot be ours
        self.limits = limits
        self.run_in_thread = run_in_thread
        self.held = 0  # bytes of bodies in memory, all requests
        self.files = 0  # bodies in temporary files now
        self._by_connection: dict[Any, int] = {}

    def body(
        self,
        connection: Any,
        pause: Callable[[], None],
        resume: Callable[[], None],
        failed: Callable[[BodyStoreError], None],
    ) -> RequestBody:
        """A new, empty body for a request on the client ``connection``."""
        return RequestBody(self, connection, pause, resume, failed)

    def may_hold(self, connection: Any, held_by_request: int, more: int) -> bool:
        limits = self.limits
        return (
            held_by_request + more <= limits.memory
            and self._by_connection.get(connection, 0) + more <= limits.connection_memory
            and self.held + more <= limits.total_memory
        )

    def hold(self, connection: Any, size: int) -> None:
        self.held += size
        self._by_connection[connection] = self._by_connection.get(connection, 0) + size

    def release(self, connection: Any, size: int) -> None:
        if not size:
            return
        self.held -= size
        left = self._by_connection.get(connection, 0) - size
        if left > 0:
            self._by_connection[connection] = left
        else:
            self._by_connection.pop(connection, None)

    # The blocking parts, run in a thread (a test may replace them).
    def open_file(self) -> int:
        try:
            return open_buffer_file(self.directory)
        except OSError as e:
            if self.fallback is None or e.errno not in _NOT_OURS:
                raise
        return open_buffer_file(self.fallback)

    def write(self, fd: int, data: bytes | list[bytes]) -> None:
        write_all(fd, data)

    def read(self, fd: int, size: int, offset: int) -> bytes:
        return read_at(fd, size, offset)

    def send_file(self, sock_fd: int, fd: int, offset: int, count: int) -> int:
        return send_file(sock_fd, fd, offset, count)

    def close_file(self, fd: int) -> None:
        os.close(fd)


class RequestBody:
    """One request's body: added to as it arrives, then sent to the app as often as needed.

    In memory until it outgrows the budget; then the held bytes and every
    later one go to a temporary file, at most ``write_behind`` bytes at a time
    on their way (the client is paused beyond that).  ``failed`` is told of a
    full disk at once, so the client hears it before it sends the rest.
    """

    log = Logger()

    size = 0  # bytes added so far
    _held = 0  # bytes of this body counted in the pool's memory budget
    _fd = -1
    _spilled = False
    _busy = 0  # file operations in flight
    _writing = False
    _in_flight = 0  # bytes of the write in a thread now
    _paused = False
    _closed = False
    _error: BodyStoreError | None = None
    _on_stored: Callable[[], None] | None = None
    _sender: _Sender | None = None

    def __init__(
        self,
        pool: BufferPool,
        connection: Any,
        pause: Callable[[], None],
        resume: Callable[[], None],
        failed: Callable[[BodyStoreError], None],
    ) -> None:
        self.pool = pool
        self.connection = connection
        self._pause = pause
        self._resume = resume
        self._failed: Callable[[BodyStoreError], None] | None = failed
        self._chunks: list[bytes] = []  # in memory: the body; spilled: bytes not yet written

    @property
    def in_file(self) -> bool:
        return self._spilled

    @property
    def waiting_on_disk(self) -> bool:
        """The client is paused, or the body is complete, while our writes catch up."""
        return self._paused or self._on_stored is not None

    def add(self, data: bytes) -> None:
        if self._closed or self._error is not None or not data:
            return
        self.size += len(data)
        pool = self.pool
        spill = not self._spilled and not pool.may_hold(self.connection, self._held, len(data))
        pool.hold(self.connection, len(data))
        self._held += len(data)
        self._chunks.append(data)
        if spill:
            self._spilled = True
            pool.files += 1
            self._busy += 1
            pool.run_in_thread(pool.open_file).addBoth(self._opened)
        if self._spilled and not self._closed and self._error is None:
            if self._held > pool.limits.write_behind and not self._paused:
                self._paused = True
                self._pause()
            self._write_next()

    def _unwritten(self) -> int:
        """Bytes added but neither written nor on their way to the file."""
        return self._held - self._in_flight

    def stored(self, done: Callable[[], None]) -> None:
        """Call ``done`` once every byte added is in memory or written to the file."""
        if self._error is not None or self._closed:
            return
        if not self._spilled or (not self._chunks and not self._writing and self._fd >= 0):
            done()
        else:
            self._on_stored = done
            self._write_next()  # the last bytes, however few

    # -- the write-behind ------------------------------------------------------

    def _opened(self, result: int | Failure) -> None:
        self._busy -= 1
        if isinstance(result, Failure):
            self.pool.files -= 1
            self._fail(result.value)
            return
        self._fd = result
        if self._closed:
            self._close_file()
            return
        self._write_next()

    def _write_next(self) -> None:
        if self._writing or self._fd < 0 or not self._chunks or self._error is not None:
            return
        limits = self.pool.limits
        if self._on_stored is None and self._unwritten() < min(limits.write_batch, limits.write_behind):
            return  # more will come: one larger write costs one thread hop, as a small one does
        chunks, self._chunks = self._chunks, []
        size = sum(map(len, chunks))  # written as they are: joining them would copy every byte once more
        self._writing = True
        self._in_flight = size
        self._busy += 1
        self.pool.run_in_thread(self.pool.write, self._fd, chunks).addBoth(self._written, size)

    def _written(self, result: Failure | None, size: int) -> None:
        self._busy -= 1
        self._writing = False
        self._in_flight = 0
        self.pool.release(self.connection, size)
        self._held -= size
        if self._closed:
            self._close_file()
            return
        if isinstance(result, Failure):
            self._fail(result.value)
            return
        if self._paused and self._held <= self.pool.limits.write_behind:
            self._paused = False
            self._resume()
        if self._chunks:
            self._write_next()
        elif self._on_stored is not None:
            done, self._on_stored = self._on_stored, None
            done()

    def _fail(self, error: object) -> None:
        if self._error is not None or self._closed:
            return
        self._error = described = describe(error)
        self.log.error(
            "request body buffer in {directory}: {detail}", directory=self.pool.directory, detail=described.detail
        )
        self._drop_unwritten()
        failed, self._failed = self._failed, None
        if failed is not None:
            failed(described)

    # -- sending ---------------------------------------------------------------

    def send(self, conn: Any, done: Callable[[Any], None]) -> None:
        """Write the whole body to the app's ``conn``, then call ``done(conn)``.

        The body stays whole: a request retried on a fresh connection sends
        it again.
        """
        if self._sender is not None:
            self._sender.stopProducing()
        if not self._spilled:
            for chunk in self._chunks:
                conn.write(chunk)
            done(conn)
            return
        self._sender = sender = _Sender(self, conn, done)
        conn.set_request_producer(sender)
        sender.resumeProducing()

    def close(self) -> None:
        """The request is over: memory goes back to the budget, the file is closed."""
        if self._closed:
            return
        self._closed = True
        self._failed = self._on_stored = None
        self._pause = self._resume = _nothing
        if self._sender is not None:
            self._sender.stopProducing()
            self._sender = None
        self._drop_unwritten()
        self._close_file()

    def _drop_unwritten(self) -> None:
        # Bytes in a write in flight are released when it returns.
        unwritten = sum(map(len, self._chunks)) if self._spilled else self._held
        self.pool.release(self.connection, unwritten)
        self._held -= unwritten
        self._chunks = []

    def _close_file(self) -> None:
        if self._busy or self._fd < 0:
            return  # closed when the operation in flight returns
        fd, self._fd = self._fd, -1
        self.pool.files -= 1
        # Closing the last descriptor frees the file's blocks: a thread's work for a large one.
        self.pool.run_in_thread(self.pool.close_file, fd).addErrback(
            lambda f: self.log.failure("closing a request body buffer", f)
        )


def _nothing() -> None:
    pass


@implementer(IPushProducer)
class _Sender:
    """Reads a stored body back in chunks while the app's socket takes them."""

    _offset = 0
    _reading = False
    _paused = False
    _stopped = False
    _socket_full = False  # sendfile stopped short: the next chunk goes through the transport

    def __init__(self, body: RequestBody, conn: Any, done: Callable[[Any], None]) -> None:
        self.body = body
        self.conn = conn
        self.done = done

    def _read_next(self) -> None:
        body = self.body
        if self._reading or self._paused or self._stopped:
            return
        if self._offset >= body.size:
            self._stopped = True
            conn, done = self.conn, self.done
            conn.set_request_producer(None)
            done(conn)
            return
        if body._fd < 0:
            self._stop_with(BodyStoreError(500, "the request body's file is gone"))
            return
        self._reading = True
        body._busy += 1
        pool = body.pool
        left = body.size - self._offset
        sock = None if self._socket_full else socket_of(self.conn)
        if sock is not None:
            size = min(pool.limits.sendfile_chunk, left)
            pool.run_in_thread(pool.send_file, os.dup(sock.fileno()), body._fd, self._offset, size).addBoth(self._sent)
            return
        # Through the transport: when the socket is full, Twisted holds the
        # chunk and pauses us, and its draining is what resumes us.
        self._socket_full = False
        size = min(pool.limits.read_chunk, left)
        pool.run_in_thread(pool.read, body._fd, size, self._offset).addBoth(self._got)

    def _sent(self, result: int | Failure) -> None:
        body = self.body
        body._busy -= 1
        self._reading = False
        if body._closed:
            body._close_file()
            return
        if self._stopped:
            return
        if isinstance(result, Failure):
            self._stop_with(describe(result.value))
            return
        self._offset += result
        # Short of what was asked: the socket is full (or the app left, which its connection reports).
        self._socket_full = self._offset < body.size and result < body.pool.limits.sendfile_chunk
        self._read_next()

    def _got(self, result: bytes | Failure) -> None:
        body = self.body
        body._busy -= 1
        self._reading = False
        if body._closed:
            body._close_file()
            return
        if self._stopped:
            return
        if isinstance(result, Failure):
            self._stop_with(describe(result.value))
            return
        if not result:
            self._stop_with(BodyStoreError(500, "the request body's file is shorter than the body"))
            return
        self._offset += len(result)
        self.conn.write(result)  # may pause us at once, if the app's socket is full
        self._read_next()

    def _stop_with(self, error: BodyStoreError) -> None:
        self._stopped = True
        self.body._fail(error)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._read_next()

    def stopProducing(self) -> None:
        self._stopped = True

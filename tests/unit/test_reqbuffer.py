"""Request bodies held whole: memory budgets, the write-behind to a temporary file, reading back with back-pressure."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tlsproxy.proxy.reqbuffer import (
    BodyStoreError,
    BufferLimits,
    BufferPool,
    RequestBody,
    open_buffer_file,
    write_all,
)


class FakeThreads:
    """Stands in for the thread pool: calls wait until the test runs them, in order."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((f, args, d))
        return d

    def names(self) -> list[str]:
        return [f.__name__ for f, _, _ in self.pending]

    def run_one(self) -> None:
        f, args, d = self.pending.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback(Failure())
        else:
            d.callback(result)

    def run_all(self) -> None:
        while self.pending:
            self.run_one()


class FakeConn:
    """The app's connection as the body sees it: writes, a request producer, request_complete."""

    def __init__(self, pause_on_write: bool = False) -> None:
        self.data = b""
        self.writes = 0
        self.producer: Any = None
        self.pause_on_write = pause_on_write

    def write(self, data: bytes) -> None:
        self.data += data
        self.writes += 1
        if self.pause_on_write and self.producer is not None:
            self.producer.pauseProducing()

    def set_request_producer(self, producer: Any) -> None:
        self.producer = producer


class Recorder:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0
        self.errors: list[BodyStoreError] = []
        self.stored = 0
        self.sent: list[Any] = []

    def pause(self) -> None:
        self.paused += 1

    def resume(self) -> None:
        self.resumed += 1

    def failed(self, error: BodyStoreError) -> None:
        self.errors.append(error)

    def done(self) -> None:
        self.stored += 1

    def done_sending(self, conn: Any) -> None:
        self.sent.append(conn)


def scratch(case: SynchronousTestCase) -> str:
    """A new empty directory, removed after the test."""
    where = tempfile.mkdtemp(prefix="tlsproxy-test-")
    case.addCleanup(shutil.rmtree, where, True)
    return where


LIMITS = BufferLimits(memory=10, connection_memory=16, total_memory=24, write_behind=8, read_chunk=5)


class BodyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.threads = FakeThreads()
        self.dir = os.path.join(scratch(self), "buffers")
        self.pool = BufferPool(self.dir, LIMITS, self.threads)
        self.closed: list[int] = []
        close_file = self.pool.close_file

        def record_close(fd: int) -> None:
            self.closed.append(fd)
            close_file(fd)

        self.pool.close_file = record_close  # type: ignore[method-assign]

    def body(self, connection: object = "c1") -> tuple[RequestBody, Recorder]:
        seen = Recorder()
        return self.pool.body(connection, seen.pause, seen.resume, seen.failed), seen

    def test_small_body_stays_in_memory(self) -> None:
        """A body within the budget never touches a thread or a file, and is sent whole at once."""
        body, seen = self.body()
        body.add(b"hello")
        body.add(b"!")
        body.stored(seen.done)
        self.assertEqual((seen.stored, self.threads.pending, body.size, self.pool.held), (1, [], 6, 6))
        conn = FakeConn()
        body.send(conn, seen.done_sending)
        self.assertEqual((conn.data, seen.sent), (b"hello!", [conn]))
        body.close()
        self.assertEqual((self.pool.held, self.pool.files, self.threads.pending), (0, 0, []))

    def test_large_body_goes_to_a_file_in_threads(self) -> None:
        """Past the per-request budget the body is written to a file by threads only, pausing the client meanwhile."""
        body, seen = self.body()
        body.add(b"0123456789")
        self.assertEqual(self.threads.names(), [])
        body.add(b"abcdef")  # 16 > 10: spill
        self.assertTrue(body.in_file)
        self.assertEqual(self.threads.names(), ["open_file"])
        self.assertEqual(seen.paused, 1, "16 bytes waiting for the disk is over write_behind")
        body.add(b"XYZ")
        body.stored(seen.done)
        self.assertEqual(seen.stored, 0, "not stored before the writes ran")
        self.threads.run_one()  # open
        self.assertEqual(self.threads.names(), ["write"])
        self.threads.run_all()
        self.assertEqual((seen.stored, seen.resumed, self.pool.held, self.pool.files), (1, 1, 0, 1))
        self.assertEqual(os.pread(body._fd, 100, 0), b"0123456789abcdefXYZ")
        body.close()
        self.assertEqual(self.threads.names(), ["record_close"])
        self.threads.run_all()
        self.assertEqual((len(self.closed), self.pool.files), (1, 0))

    def test_sending_a_file_follows_the_apps_pace(self) -> None:
        """A stored body is read back one chunk at a time, never while the app's socket is full, and sent whole."""
        body, seen = self.body()
        for piece in (b"abcdefgh", b"ijklmnop", b"qrstuvwx"):
            body.add(piece)
            self.threads.run_all()
        body.stored(seen.done)
        self.assertEqual(seen.stored, 1)
        conn = FakeConn(pause_on_write=True)
        body.send(conn, seen.done_sending)
        self.assertEqual(self.threads.names(), ["read"])
        self.threads.run_one()
        self.assertEqual((conn.data, self.threads.names()), (b"abcde", []), "paused: no read until resumed")
        while len(conn.data) < 24:
            conn.producer.resumeProducing()
            self.threads.run_all()
        self.assertEqual(conn.data, b"abcdefghijklmnopqrstuvwx")
        conn.producer.resumeProducing()
        self.assertEqual((seen.sent, conn.producer), ([conn], None))
        self.assertEqual(seen.errors, [])

    def test_send_again_starts_over(self) -> None:
        """A retried request sends the whole stored body again on its new connection."""
        body, seen = self.body()
        body.add(b"x" * 12)
        self.threads.run_all()
        first, second = FakeConn(), FakeConn()
        body.send(first, seen.done_sending)
        self.threads.run_one()
        body.send(second, seen.done_sending)
        self.threads.run_all()
        self.assertEqual((first.data, second.data, seen.sent), (b"xxxxx", b"x" * 12, [second]))

    def test_connection_and_total_budgets_send_bodies_to_files(self) -> None:
        """Small bodies go to files once their client connection or the whole process holds too much."""
        a, _ = self.body("c1")
        a.add(b"x" * 9)
        b, _ = self.body("c1")
        b.add(b"y" * 9)  # 18 > 16 on c1
        self.assertEqual((a.in_file, b.in_file), (False, True))
        c, _ = self.body("c2")
        c.add(b"z" * 9)  # total 9 + 9 (b, on its way to disk) + 9 = 27 > 24
        self.assertTrue(c.in_file)
        d, _ = self.body("c3")
        a.close()
        self.threads.run_all()
        d.add(b"w" * 9)
        self.assertFalse(d.in_file, "memory given back is usable again")

    def test_full_disk_fails_the_body_at_once(self) -> None:
        """ENOSPC while writing is a 507 for this body, its memory is given back, and it never counts as stored."""

        def no_room(fd: int, data: bytes) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.pool.write = no_room  # type: ignore[method-assign]
        body, seen = self.body()
        body.add(b"x" * 20)
        body.stored(seen.done)
        self.threads.run_all()
        self.assertEqual([e.status for e in seen.errors], [507])
        self.assertIn("No space left", seen.errors[0].detail)
        self.assertEqual((seen.stored, self.pool.held), (0, 0))
        body.add(b"more")  # the rest of the upload is dropped
        self.assertEqual(self.threads.pending, [])
        body.close()
        self.threads.run_all()
        self.assertEqual((len(self.closed), self.pool.files), (1, 0))

    def test_unwritable_directory_is_a_500(self) -> None:
        """A buffer directory that cannot be made is our fault (500), not a full disk."""
        with open(self.dir, "w"):
            pass  # a file where the directory should be
        body, seen = self.body()
        body.add(b"x" * 20)
        self.threads.run_all()
        self.assertEqual([e.status for e in seen.errors], [500])
        self.assertEqual((self.pool.held, self.pool.files), (0, 0))

    def test_close_while_writing_closes_after_the_write(self) -> None:
        """A request that ends while its bytes are being written closes the file only once the write returned."""
        body, _ = self.body()
        body.add(b"x" * 20)
        self.threads.run_one()  # open
        self.assertEqual(self.threads.names(), ["write"])
        body.close()
        self.assertEqual(self.threads.names(), ["write"], "the descriptor is in use: not closed yet")
        self.threads.run_all()
        self.assertEqual((len(self.closed), self.pool.held, self.pool.files), (1, 0, 0))

    def test_small_additions_are_gathered_into_one_write(self) -> None:
        """Once in a file, bytes wait for write_batch of them (or the end) before a thread writes them."""
        pool = BufferPool(self.dir, BufferLimits(memory=10, write_behind=100, write_batch=6), self.threads)
        body = pool.body("c1", Recorder().pause, Recorder().resume, Recorder().failed)
        body.add(b"x" * 11)
        self.threads.run_all()  # open, then the 11 bytes held so far
        for piece in (b"ab", b"cd"):
            body.add(piece)
            self.assertEqual(self.threads.names(), [], "4 bytes: not worth a thread yet")
        body.add(b"ef")
        self.assertEqual(self.threads.names(), ["write"])
        self.threads.run_all()
        body.add(b"g")
        seen = Recorder()
        body.stored(seen.done)
        self.assertEqual(self.threads.names(), ["write"], "the end writes what is left, however little")
        self.threads.run_all()
        self.assertEqual((seen.stored, os.pread(body._fd, 100, 0)), (1, b"x" * 11 + b"abcdefg"))
        body.close()
        self.threads.run_all()


class SocketTransport(FileDescriptor):
    """A Twisted socket transport as sendfile sees it; written bytes wait in dataBuffer until flushed."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(reactor=Clock())
        self.socket = sock
        self.connected = True
        self.disconnecting = False
        self.dataBuffer = b""

    def flush(self) -> None:
        """What Twisted does once the socket drains: send what waited."""
        self.socket.setblocking(True)
        self.socket.sendall(self.dataBuffer)
        self.socket.setblocking(False)
        self.dataBuffer = b""


class SocketConn(FakeConn):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__(pause_on_write=True)
        self.transport = SocketTransport(sock)

    def write(self, data: bytes) -> None:
        self.transport.dataBuffer += data
        super().write(data)


class SendfileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.threads = FakeThreads()
        limits = BufferLimits(memory=10, write_behind=1 << 20, read_chunk=1000, sendfile_chunk=1 << 20)
        self.pool = BufferPool(os.path.join(scratch(self), "buffers"), limits, self.threads)
        ours, self.app = socket.socketpair()
        ours.setblocking(False)
        self.addCleanup(ours.close)
        self.addCleanup(self.app.close)
        self.conn = SocketConn(ours)
        self.payload = bytes(range(256)) * 4000  # 1,024,000 bytes
        self.body = self.pool.body("c1", Recorder().pause, Recorder().resume, Recorder().failed)
        self.body.add(self.payload)
        self.threads.run_all()
        self.addCleanup(self.threads.run_all)
        self.addCleanup(self.body.close)

    def receive(self, count: int) -> bytes:
        got = bytearray()
        self.app.settimeout(5)
        while len(got) < count:
            got += self.app.recv(count - len(got))
        return bytes(got)

    def test_stored_body_goes_to_a_socket_by_sendfile(self) -> None:
        """A body in a file reaches a plain socket by sendfile in a thread, not read back through the reactor."""
        self.app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.conn.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        seen = Recorder()
        self.body.send(self.conn, seen.done_sending)
        self.assertEqual(self.threads.names(), ["send_file"])
        self.threads.run_all()
        self.assertEqual(self.receive(len(self.payload)), self.payload)
        self.assertEqual((seen.sent, self.conn.writes), ([self.conn], 0))

    def test_a_wrapping_transport_is_written_through(self) -> None:
        """A transport that only forwards to a socket (a TLS wrapper) never gets sendfile: bytes go through it."""

        class Wrapper:
            def __init__(self, inner: SocketTransport) -> None:
                self.inner = inner

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

        self.conn.transport = Wrapper(self.conn.transport)  # type: ignore[assignment]
        self.conn.pause_on_write = False
        seen = Recorder()
        self.body.send(self.conn, seen.done_sending)
        self.threads.run_all()
        self.assertEqual((self.conn.data, seen.sent), (self.payload, [self.conn]))

    def test_full_socket_hands_one_chunk_to_the_transport(self) -> None:
        """sendfile stopped by a full socket: one chunk goes through the transport, whose drain resumes sendfile."""
        seen = Recorder()
        self.body.send(self.conn, seen.done_sending)
        received = bytearray()
        for _ in range(1000):
            if seen.sent:
                break
            self.assertTrue(self.threads.pending, "stuck: nothing to run and not done")
            name = self.threads.names()[0]
            self.threads.run_one()
            if name == "read":
                self.assertNotEqual(self.conn.transport.dataBuffer, b"", "the chunk waits in the transport")
                received += self.app.recv(1 << 20)
                self.conn.transport.flush()
                self.conn.producer.resumeProducing()
        received += self.receive(len(self.payload) - len(received))
        self.assertEqual(bytes(received), self.payload)
        self.assertGreater(self.conn.writes, 0, "the socket was full at least once")
        self.assertEqual(seen.sent, [self.conn])


class FileTests(SynchronousTestCase):
    def test_buffer_file_is_unlinked_in_a_private_directory(self) -> None:
        """Buffer files have no name from the start (nothing left after kill -9), in a 0700 directory."""
        where = os.path.join(scratch(self), "buffers")
        os.makedirs(where, mode=0o755)
        os.chmod(where, 0o755)
        fd = open_buffer_file(where)
        try:
            self.assertEqual(os.listdir(where), [])
            self.assertEqual(os.fstat(fd).st_nlink, 0)
            self.assertEqual(stat.S_IMODE(os.stat(where).st_mode), 0o700)
            os.write(fd, b"data")
            self.assertEqual(os.pread(fd, 10, 0), b"data")
        finally:
            os.close(fd)

    def test_write_all_writes_every_piece_in_order(self) -> None:
        """Pieces are written as they are, in order, more of them than one writev takes."""
        fd = open_buffer_file(os.path.join(scratch(self), "buffers"))
        self.addCleanup(os.close, fd)
        pieces = [bytes([i % 256]) * (i % 7 + 1) for i in range(3000)]
        write_all(fd, pieces)
        write_all(fd, b"end")
        expected = b"".join(pieces) + b"end"
        self.assertEqual(os.pread(fd, len(expected) + 10, 0), expected)


class SynchronousFailureTests(SynchronousTestCase):
    def test_failure_inside_add_leaves_nothing_counted(self) -> None:
        """A failure reported while a chunk is being added (threads that run at once) leaves no memory counted."""
        from tlsproxy.proxy.reqbuffer import threaded

        where = os.path.join(scratch(self), "buffers")
        with open(where, "w"):
            pass  # the directory cannot be made: opening fails
        pool = BufferPool(where, LIMITS, threaded(object()))
        bodies: list[RequestBody] = []
        seen = Recorder()

        def failed(error: BodyStoreError) -> None:
            seen.failed(error)
            bodies[0].close()  # as the handler does: answer, then drop the body

        bodies.append(pool.body("c1", seen.pause, seen.resume, failed))
        bodies[0].add(b"x" * 20)
        self.assertEqual([e.status for e in seen.errors], [500])
        self.assertEqual((pool.held, pool.files), (0, 0))


class DirectoryTests(SynchronousTestCase):
    def test_default_directory_falls_back_when_not_ours(self) -> None:
        """A default directory this user cannot own sends bodies to the fallback (0700), never into it."""
        if os.geteuid() != 0:
            raise SkipTest("needs root to give the directory to another user")
        root = scratch(self)
        primary, fallback = os.path.join(root, "state", "buffers"), os.path.join(root, "tmp", "buffers")
        os.makedirs(primary)
        os.chown(primary, 65534, 65534)
        pool = BufferPool(primary, LIMITS, FakeThreads(), fallback=fallback)
        fd = pool.open_file()
        try:
            self.assertTrue(os.path.samefile(os.path.dirname(os.readlink(f"/proc/self/fd/{fd}")), fallback))
            self.assertEqual(stat.S_IMODE(os.stat(fallback).st_mode), 0o700)
        finally:
            os.close(fd)
        explicit = BufferPool(primary, LIMITS, FakeThreads())
        with self.assertRaises(PermissionError):
            explicit.open_file()

"""Response buffering with real parts: Django under gunicorn with ONE sync worker behind `twist tlsproxy`.

The worker is what a slow client must not hold: while clients read large answers slowly (or not at
all), a small GET still answers at once.  Raw-socket apps check the framing surprises of the app side.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import PKI, App, Proxy, gunicorn, marker, proxy_config, start_proxy
from tests.integration.djangoapp.pattern import digest
from tests.integration.procs import BIN, READY, free_port, running

pytestmark = pytest.mark.integration
BIG = 24_000_000


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """Django under gunicorn with a single sync worker (the case a slow client could stall)."""
    with gunicorn("tcp", tmp_path_factory.mktemp("one-worker"), extra=("--workers", "1")) as app:
        yield app


@pytest.fixture(scope="module")
def buffer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("buf") / "buffers"


@pytest.fixture(scope="module")
def proxy(worker: App, pki: PKI, buffer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """tlsproxy with buffering on (the default), in front of the one worker."""
    server = {"buffer_dir": str(buffer_dir), "upstream_timeout": 30}
    with start_proxy(tmp_path_factory.mktemp("proxy"), worker.url, pki, server=server) as running:
        yield running


class SlowReader:
    """A TLS client with a small receive buffer that reads only what the test tells it to."""

    def __init__(self, proxy: Proxy, path: str) -> None:
        ctx = proxy.pki.client_context()
        ctx.set_alpn_protocols(["http/1.1"])
        plain = socket.socket()
        plain.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        plain.settimeout(30)
        plain.connect(("127.0.0.1", proxy.port))
        self.sock = ctx.wrap_socket(plain, server_hostname="localhost")
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost:{proxy.port}\r\n\r\n".encode())
        self.data = bytearray()

    def read_head(self, deadline: float) -> bytes:
        self.sock.settimeout(max(deadline - time.monotonic(), 0.1))
        while b"\r\n\r\n" not in self.data:
            chunk = self.sock.recv(16384)
            if not chunk:
                raise AssertionError(f"closed before the head: {bytes(self.data[:200])!r}")
            self.data += chunk
        return bytes(self.data.split(b"\r\n\r\n", 1)[0])

    def read_body(self, length: int, timeout: float = 60) -> bytes:
        self.sock.settimeout(timeout)
        head, _, body = bytes(self.data).partition(b"\r\n\r\n")
        out = bytearray(body)
        while len(out) < length:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def read_until_closed(self, timeout: float) -> bool:
        """Read and drop until the server ends the connection (True) or ``timeout`` passes (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.sock.settimeout(max(end - time.monotonic(), 0.05))
            try:
                if not self.sock.recv(1 << 20):
                    return True
            except TimeoutError:
                return False
            except (ConnectionResetError, ssl.SSLError, OSError):
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def buffer_files(proxy: Proxy, directory: Path) -> list[str]:
    """Descriptors the proxy has open on files in the buffer directory."""
    fd_dir = Path(f"/proc/{proxy.process.proc.pid}/fd")
    found = []
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


def eventually(check: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return check()


def timed_get(proxy: Proxy, path: str = "/whoami") -> float:
    """Seconds a small GET takes on an established connection (the connection's own setup not counted)."""
    with proxy.client(timeout=30) as client:
        assert client.get("/whoami?warm").status_code == 200
        start = time.monotonic()
        response = client.get(path)
        elapsed = time.monotonic() - start
    assert response.status_code == 200
    return elapsed


def test_slow_readers_do_not_hold_the_one_worker(proxy: Proxy, buffer_dir: Path) -> None:
    """Three clients stall on 24 MB answers: each is answered, a GET takes under 1 s, all arrive whole, files go."""
    readers = [SlowReader(proxy, f"/download-fixed?size={BIG}&n={i}") for i in range(3)]
    try:
        deadline = time.monotonic() + 40
        for reader in readers:
            # With one worker, the next answer starts only once the worker is free again.
            assert b" 200 " in reader.read_head(deadline)
        assert timed_get(proxy) < 1.0
        assert buffer_files(proxy, buffer_dir), "the stalled answers wait in buffer files"
        assert list(buffer_dir.iterdir()) == [], "buffer files have no name"
        for reader in readers:
            body = reader.read_body(BIG)
            assert len(body) == BIG
            assert hashlib.sha256(body).hexdigest() == digest(BIG)
    finally:
        for reader in readers:
            reader.close()
    assert eventually(lambda: not buffer_files(proxy, buffer_dir), 10), buffer_files(proxy, buffer_dir)


def test_accel_buffering_no_delivers_the_first_event_at_once(proxy: Proxy) -> None:
    """Server-sent events with X-Accel-Buffering: no: the first event arrives before the view finishes."""
    reader = SlowReader(proxy, "/events?pause=3")
    try:
        start = time.monotonic()
        head = reader.read_head(start + 10)
        assert b" 200 " in head
        assert b"x-accel-buffering" not in head.lower()
        while b"data: first" not in reader.data:
            reader.data += reader.sock.recv(4096)
        first = time.monotonic() - start
        while b"data: second" not in reader.data:
            reader.data += reader.sock.recv(4096)
        second = time.monotonic() - start
    finally:
        reader.close()
    assert first < 2.0, first
    assert second >= 3.0, second


@pytest.fixture
def impatient(worker: App, pki: PKI, buffer_dir: Path, tmp_path: Path) -> Iterator[Proxy]:
    """A proxy with send_timeout = 2."""
    server = {"buffer_dir": str(buffer_dir), "upstream_timeout": 30, "send_timeout": 2}
    with start_proxy(tmp_path, worker.url, pki, server=server) as running:
        yield running


def test_client_that_never_reads_is_cut_unbuffered(impatient: Proxy) -> None:
    """Streaming (X-Accel-Buffering: no), a client that never reads is cut after send_timeout; the worker is freed."""
    m = marker()
    reader = SlowReader(impatient, f"/download-fixed?size={BIG}&accel=no&m={m}")
    try:
        assert b" 200 " in reader.read_head(time.monotonic() + 20)
        start = time.monotonic()
        assert timed_get(impatient) < 10, "the worker is free once the stalled client is cut"
        assert time.monotonic() - start >= 1.5, "the GET had to wait for the worker: the answer streamed"
        assert reader.read_until_closed(10), "the stalled client's connection was cut"
    finally:
        reader.close()
    impatient.process.wait_for_line("took nothing of the answer for 2s", 5)
    impatient.process.wait_for_line(f'm={m} HTTP/1.1" 200', 5)


def test_client_that_never_reads_is_cut_buffered(impatient: Proxy, buffer_dir: Path) -> None:
    """Buffered, the worker is free at once; the stalled client is cut after send_timeout and its file closed."""
    reader = SlowReader(impatient, f"/download-fixed?size={BIG}")
    try:
        assert b" 200 " in reader.read_head(time.monotonic() + 20)
        assert timed_get(impatient) < 1.0
        time.sleep(3)  # taking nothing for longer than send_timeout
        assert reader.read_until_closed(15), "the stalled client's connection was cut"
    finally:
        reader.close()
    impatient.process.wait_for_line("took nothing of the answer for 2s", 5)
    assert eventually(lambda: not buffer_files(impatient, buffer_dir), 10)


def test_full_disk_falls_back_to_back_pressure(worker: App, pki: PKI, tmp_path: Path) -> None:
    """Buffer files that cannot grow (RLIMIT_FSIZE, as a full disk) still deliver the answer whole; next GET works."""
    port = free_port()
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    config = tmp_path / "tlsproxy.toml"
    config.write_text(proxy_config(port, worker.url, pki, state_dir, server={"upstream_timeout": 30}))
    argv = ["prlimit", "--fsize=2000000", str(BIN / "twist"), "tlsproxy", "--config", str(config)]
    with running(argv) as process:
        process.wait_for_line(READY, 30)
        proxy = Proxy(port, pki, process, config)
        reader = SlowReader(proxy, f"/download-fixed?size={BIG}")
        try:
            assert b" 200 " in reader.read_head(time.monotonic() + 20)
            process.wait_for_line("writing failed", 20)
            body = reader.read_body(BIG)
        finally:
            reader.close()
        assert hashlib.sha256(body).hexdigest() == digest(BIG)
        assert timed_get(proxy) < 1.0
        assert eventually(lambda: not buffer_files(proxy, state_dir / "buffers"), 10)


def test_nothing_left_after_kill_9(worker: App, pki: PKI, tmp_path: Path) -> None:
    """Buffer files in use have no name, so a proxy killed with SIGKILL leaves its buffer directory empty."""
    directory = tmp_path / "buffers"
    server = {"buffer_dir": str(directory), "upstream_timeout": 30}
    with start_proxy(tmp_path, worker.url, pki, server=server) as proxy:
        reader = SlowReader(proxy, f"/download-fixed?size={BIG}")
        try:
            assert b" 200 " in reader.read_head(time.monotonic() + 20)
            assert eventually(lambda: bool(buffer_files(proxy, directory)), 10)
            proxy.process.signal(signal.SIGKILL)
            proxy.process.proc.wait(10)
        finally:
            reader.close()
    assert list(directory.iterdir()) == []


def test_client_abort_is_logged_499(proxy: Proxy) -> None:
    """A client that leaves before the answer leaves an access-log line with 499."""
    m = marker()
    with proxy.raw() as conn:
        conn.send(f"GET /slow?seconds=1&m={m} HTTP/1.1\r\nHost: localhost:{proxy.port}\r\n\r\n".encode())
        time.sleep(0.3)
    proxy.process.wait_for_line(f'm={m} HTTP/1.1" 499', 10)


# ---------------------------------------------------------------------------
# A raw-socket app: exact bytes back, for answers no sane app server sends


class RawApp:
    """Answers each connection with ``script(conn_index, request_index)`` bytes; counts connections."""

    def __init__(self, script: Callable[[int, int, socket.socket], None]) -> None:
        self.script = script
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.connections = 0
        self.requests: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            index = self.connections
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, index), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        data = b""
        number = 0
        with conn:
            while True:
                while b"\r\n\r\n" not in data:
                    try:
                        chunk = conn.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    data += chunk
                request, _, data = data.partition(b"\r\n\r\n")
                self.requests.append(request)
                try:
                    self.script(index, number, conn)
                except OSError:
                    return
                number += 1

    def close(self) -> None:
        self.listener.close()


GENUINE = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ngenuine"


def test_late_bytes_after_204_with_content_length_answer_nobody(pki: PKI, tmp_path: Path) -> None:
    """An app that sends a 204 with a Content-Length, then body bytes: the next request never gets them."""
    forged = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"

    def script(conn: int, number: int, sock: socket.socket) -> None:
        if conn == 0 and number == 0:
            sock.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n" % len(forged))
            time.sleep(0.5)
            sock.sendall(forged)
        else:
            sock.sendall(GENUINE)

    app = RawApp(script)
    try:
        with start_proxy(tmp_path, f"http://127.0.0.1:{app.port}", pki) as proxy, proxy.raw() as client:
            host = f"localhost:{proxy.port}"
            client.send(f"GET /first HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            first = client.read_response(timeout=5)
            assert first.status == 204, first.data[:200]
            client.send(f"GET /second HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            second = client.read_response(timeout=5)
        assert second.status == 200, second.data[:200]
        assert second.parse()[2] == b"genuine"
        assert app.connections == 2
    finally:
        app.close()


@pytest.mark.parametrize(("size", "status"), [(70_000, 502), (30_000, 200)])
def test_app_head_size_limit(pki: PKI, tmp_path: Path, size: int, status: int) -> None:
    """An app response head over 64 KiB gets 502 (however it arrives); one under it passes."""
    big = b"X-Big: " + b"a" * size + b"\r\n"

    def script(conn: int, number: int, sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\n" + big + b"Content-Length: 2\r\n\r\nok")

    app = RawApp(script)
    try:
        with start_proxy(tmp_path, f"http://127.0.0.1:{app.port}", pki) as proxy, proxy.raw() as client:
            client.send(f"GET / HTTP/1.1\r\nHost: localhost:{proxy.port}\r\n\r\n".encode())
            reply = client.read_response(timeout=5)
        assert reply.status == status, reply.data[:200]
    finally:
        app.close()


def test_slow_http2_reader_does_not_hold_the_worker(proxy: Proxy) -> None:
    """An HTTP/2 client that stops reading (its window runs out) does not hold the worker either."""
    with proxy.client(http2=True, timeout=60) as slow:
        with slow.stream("GET", f"/download-fixed?size={BIG}&h2=1") as response:
            assert response.http_version == "HTTP/2"
            chunks = response.iter_bytes()
            first = next(chunks)
            assert timed_get(proxy) < 1.0
            h = hashlib.sha256(first)
            for chunk in chunks:
                h.update(chunk)
    assert h.hexdigest() == digest(BIG)

"""HTTP/2 attacks on the wire: hand-made frames over TLS against `twist tlsproxy`, with a backend that counts.

The client here writes frames with hyperframe and hpack, so it can send what no
polite client would; the backend (a threaded HTTP/1.1 server in this process)
records every request it gets and how many it had at once.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.integration.conftest import PKI, Proxy, marker, start_proxy

pytestmark = pytest.mark.integration

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class Counts:
    """What the backend saw: request targets, and the most requests it had in flight at once."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    targets: list[str] = field(default_factory=list)
    bodies: list[int] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0

    def reset(self) -> None:
        with self.lock:
            self.targets.clear()
            self.bodies.clear()
            self.peak = self.in_flight


class CountingBackend(ThreadingHTTPServer):
    daemon_threads = True
    counts: Counts

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the proxy closing an idle connection (or one we made it cut) is no news


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CountingBackend

    def _enter(self) -> None:
        counts = self.server.counts
        with counts.lock:
            counts.targets.append(self.path)
            counts.in_flight += 1
            counts.peak = max(counts.peak, counts.in_flight)

    def _leave(self) -> None:
        counts = self.server.counts
        with counts.lock:
            counts.in_flight -= 1

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._enter()
        try:
            if self.path.startswith("/slow"):
                time.sleep(0.3)
            if self.path.startswith("/big"):
                self._answer(bytes(4 * 1024 * 1024))
                return
            self._answer(b"ok\n")
        finally:
            self._leave()

    def do_POST(self) -> None:
        self._enter()
        try:
            total = 0
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    total += len(self.rfile.read(size))
                    self.rfile.readline()
            else:
                total = len(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            with self.server.counts.lock:
                self.server.counts.bodies.append(total)
            self._answer(f"{total}\n".encode())
        finally:
            self._leave()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def backend() -> Iterator[tuple[str, Counts]]:
    server = CountingBackend(("127.0.0.1", 0), _Handler)
    server.counts = Counts()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.counts
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def proxy(backend: tuple[str, Counts], pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """tlsproxy in front of the counting backend, idle timeout 3 s."""
    server = {"idle_timeout": 3, "access_log": False}
    with start_proxy(tmp_path_factory.mktemp("h2attacks"), backend[0], pki, server=server) as running:
        yield running


@pytest.fixture
def counts(backend: tuple[str, Counts]) -> Counts:
    backend[1].reset()
    return backend[1]


class RawH2:
    """One TLS connection with ALPN h2 that writes frames exactly as given."""

    def __init__(self, proxy: Proxy, timeout: float = 5.0) -> None:
        ctx = proxy.pki.client_context()
        ctx.set_alpn_protocols(["h2"])
        plain = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
        self.sock = ctx.wrap_socket(plain, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.authority = f"localhost:{proxy.port}".encode()
        self.encoder = Encoder()
        self.buffer = b""
        self.next_stream = 1
        self.send(SettingsFrame(0), preface=True)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, *frames: Frame, preface: bool = False) -> None:
        data = b"".join(f.serialize() for f in frames)
        self.sock.sendall(PREFACE + data if preface else data)

    def headers_frame(self, fields: list[tuple[bytes, bytes]], end: bool = True, stream: int = 0) -> HeadersFrame:
        if not stream:
            stream, self.next_stream = self.next_stream, self.next_stream + 2
        frame = HeadersFrame(stream)
        frame.data = self.encoder.encode(fields)
        frame.flags.add("END_HEADERS")
        if end:
            frame.flags.add("END_STREAM")
        return frame

    def request(self, path: str, extra: list[tuple[bytes, bytes]] | None = None, method: bytes = b"GET") -> list:
        return [
            (b":method", method),
            (b":scheme", b"https"),
            (b":path", path.encode()),
            (b":authority", self.authority),
            *(extra or []),
        ]

    def frames(self, until: Any = None, timeout: float = 5.0) -> tuple[list[Frame], bool]:
        """Frames read until ``until(frame)`` is true, the server closes, or ``timeout``; and whether it closed."""
        out: list[Frame] = []
        end = time.monotonic() + timeout
        while True:
            while len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
                self.buffer = self.buffer[9 + length :]
                out.append(frame)
                if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                    ack = SettingsFrame(0)
                    ack.flags.add("ACK")
                    try:
                        self.send(ack)
                    except OSError:
                        pass  # a write of ours the server cut short: nothing more can be sent
                if until is not None and until(frame):
                    return out, False
            left = end - time.monotonic()
            if left <= 0:
                return out, False
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return out, False
            except (ssl.SSLError, OSError):
                return out, True
            if not data:
                return out, True
            self.buffer += data


def answer_of(frames: list[Frame], stream: int) -> str:
    """How the server answered ``stream``: 'status NNN', 'reset N', 'goaway N' or 'none'."""
    from hpack import Decoder

    decoder = Decoder()
    for frame in frames:
        if isinstance(frame, HeadersFrame):
            fields = dict(decoder.decode(frame.data, raw=True))
            if frame.stream_id == stream:
                return "status " + fields[b":status"].decode()
        elif isinstance(frame, RstStreamFrame) and frame.stream_id == stream:
            return f"reset {frame.error_code}"
        elif isinstance(frame, GoAwayFrame):
            return f"goaway {frame.error_code}"
    return "none"


@pytest.fixture
def raw(proxy: Proxy) -> Iterator[Any]:
    opened: list[RawH2] = []

    def connect(timeout: float = 5.0) -> RawH2:
        conn = RawH2(proxy, timeout)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


INJECTIONS = {
    "crlf-in-value": [(b"x-a", b"1\r\nx-forwarded-for: 6.6.6.6\r\nhost: evil.test")],
    "lf-in-value": [(b"x-a", b"1\nhost: evil.test")],
    "nul-in-value": [(b"x-a", b"a\x00b")],
    "ctl-in-value": [(b"x-a", b"a\x0bb")],
    "space-in-name": [(b"x a", b"1")],
    "colon-in-name": [(b"x:a", b"1")],
    "connection": [(b"connection", b"close")],
    "transfer-encoding": [(b"transfer-encoding", b"chunked")],
    "te-gzip": [(b"te", b"gzip")],
    "two-content-lengths": [(b"content-length", b"0"), (b"content-length", b"1100000")],
}


@pytest.mark.parametrize("case", list(INJECTIONS))
def test_injected_fields_never_reach_the_app(raw: Any, counts: Counts, case: str) -> None:
    """A field the HTTP/1.1 grammar refuses is refused on HTTP/2 too, and the app never sees the request."""
    m = marker()
    conn = raw()
    frame = conn.headers_frame(conn.request(f"/inject?m={m}", INJECTIONS[case]))
    conn.send(frame)
    frames, _ = conn.frames(until=lambda f: f.stream_id == frame.stream_id or isinstance(f, GoAwayFrame))
    assert answer_of(frames, frame.stream_id) in ("reset 1", "goaway 1"), frames
    for path in (f"/inject?m={m}\r\n", f"/x?m={m}"):
        conn2 = raw()
        conn2.send(conn2.headers_frame(conn2.request(path)))
        conn2.frames(until=lambda f: isinstance(f, HeadersFrame | RstStreamFrame))
    assert not any(m in target for target in counts.targets if "/inject" in target), counts.targets


@pytest.mark.parametrize("path", ["/x y", "/x\r\nhost: evil.test", "/x#f"])
def test_bad_path_never_reaches_the_app(raw: Any, counts: Counts, path: str) -> None:
    """A :path with a space, CR/LF or # is refused and never forwarded."""
    m = marker()
    conn = raw()
    frame = conn.headers_frame(conn.request(path + f"?m={m}"))
    conn.send(frame)
    frames, _ = conn.frames(until=lambda f: f.stream_id == frame.stream_id or isinstance(f, GoAwayFrame))
    assert answer_of(frames, frame.stream_id) in ("reset 1", "goaway 1", "status 400"), frames
    ok = conn.headers_frame(conn.request(f"/after?m={m}"))
    conn.send(ok)
    frames, _ = conn.frames(until=lambda f: f.stream_id == ok.stream_id and isinstance(f, HeadersFrame))
    assert answer_of(frames, ok.stream_id) == "status 200"
    assert [t for t in counts.targets if m in t] == [f"/after?m={m}"]


def test_rapid_reset_gets_goaway_and_never_overloads_the_app(raw: Any, counts: Counts) -> None:
    """3,000 request+reset pairs on one connection: GOAWAY (ENHANCE_YOUR_CALM), at most 100 at the app at once."""
    conn = raw(timeout=20)
    burst = []
    for _ in range(3000):
        headers = conn.headers_frame(conn.request("/slow?rapid"))
        reset = RstStreamFrame(headers.stream_id)
        reset.error_code = 8  # CANCEL
        burst += [headers, reset]
    try:
        conn.send(*burst)
    except OSError:
        pass  # the server may close before it has read everything
    frames, _ = conn.frames(until=lambda f: isinstance(f, GoAwayFrame), timeout=20)
    goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert goaways and goaways[0].error_code == 11, frames[-5:]
    time.sleep(1)  # let the app finish what it was given
    assert counts.peak <= 100, counts.peak
    assert len([t for t in counts.targets if "rapid" in t]) <= 300


def server_side_open(proxy_port: int, client_port: int) -> bool:
    """Whether the proxy still holds its end of our connection (any TCP state but TIME_WAIT)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote, state = parts[1], parts[2], parts[3]
        if int(local.split(":")[1], 16) == proxy_port and int(remote.split(":")[1], 16) == client_port:
            return state != "06"
    return False


def wait_closed(proxy: Proxy, conn: RawH2, deadline: float) -> float:
    """Seconds until the proxy let go of ``conn`` (which we never read from); fails after ``deadline``."""
    start = time.monotonic()
    client_port = conn.sock.getsockname()[1]
    while server_side_open(proxy.port, client_port):
        assert time.monotonic() - start < deadline, "the proxy still holds a connection whose client does not read"
        time.sleep(0.2)
    return time.monotonic() - start


def big_windows() -> list[Frame]:
    """SETTINGS and WINDOW_UPDATE that let the server send as much as it likes."""
    settings = SettingsFrame(0)
    settings.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 2**31 - 1}
    update = WindowUpdateFrame(0)
    update.window_increment = 2**31 - 1 - 65535
    return [settings, update]


def test_idle_close_of_a_non_reading_client_ends(proxy: Proxy, raw: Any, counts: Counts) -> None:
    """A client that fetched 4 MB and reads none of it is let go after the idle timeout and a grace, not held."""
    conn = raw()
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.send(*big_windows(), conn.headers_frame(conn.request("/big")))
    wait_closed(proxy, conn, deadline=20)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_ping_flood_from_a_non_reading_client_is_bounded_and_cut_off(proxy: Proxy, raw: Any) -> None:
    """PINGs as fast as TLS takes them, answers never read: the proxy's memory stays bounded and it lets go."""
    pid = proxy.process.proc.pid
    before = peak = rss(pid)
    conn = raw(timeout=0.5)
    # A small receive buffer (not a tiny one: that stalls loopback TCP itself) fills sooner.
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    client_port = conn.sock.getsockname()[1]
    # An upload left open, so the idle timeout is not what ends the connection.
    conn.send(conn.headers_frame(conn.request("/upload", method=b"POST"), end=False))
    batch = b"".join(PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize() for i in range(1000))
    start = time.monotonic()
    while server_side_open(proxy.port, client_port):
        assert time.monotonic() - start < 25, "the proxy kept the flooding connection for 25 s"
        try:
            conn.sock.sendall(batch)
        except TimeoutError:
            pass  # the proxy stopped reading: keep trying, as an attacker would
        except (OSError, ssl.SSLError):
            time.sleep(0.2)
        peak = max(peak, rss(pid))
    assert peak - before < 16 * 1024 * 1024, (before, peak)


def test_continuation_flood_gets_goaway(raw: Any) -> None:
    """CONTINUATION frames without END_HEADERS (CVE-2024-27316) are cut off at the header limit with GOAWAY."""
    conn = raw()
    headers = conn.headers_frame(conn.request("/flood"), end=False)
    headers.flags.discard("END_HEADERS")
    flood: list[Frame] = [headers]
    for _ in range(20):  # 320 KB: far past the limit, well under h2's own 64-frame cap
        continuation = ContinuationFrame(headers.stream_id)
        continuation.data = b"\x00" * 16000
        flood.append(continuation)
    try:
        conn.send(*flood)
    except OSError:
        pass
    frames, closed = conn.frames(until=lambda f: isinstance(f, GoAwayFrame))
    # The GOAWAY arrives even though this client was still sending when it was cut off:
    # the proxy reads and drops the rest before it closes (no reset to destroy it).
    assert [f.error_code for f in frames if isinstance(f, GoAwayFrame)] == [11], frames


def test_goaway_for_an_error_arrives_though_the_client_keeps_sending(raw: Any) -> None:
    """After a protocol error the proxy reads and drops what the client still sends, and closes once it is quiet.

    Closing at once, with the client's bytes unread, would have the kernel reset the
    connection, and a reset can destroy the GOAWAY before the client reads it.
    """
    conn = raw(timeout=10)
    zero_window_update = WindowUpdateFrame(0)
    zero_window_update.window_increment = 0  # a connection error (RFC 9113 6.9)
    conn.send(zero_window_update)
    conn.sock.sendall(PingFrame(0).serialize() * (1024 * 1024 // 17))  # 1 MB more, read and dropped
    frames, closed = conn.frames(until=lambda f: isinstance(f, GoAwayFrame), timeout=10)
    assert [f.error_code for f in frames if isinstance(f, GoAwayFrame)] == [1], frames  # PROTOCOL_ERROR
    for _ in range(4):  # still sending, a little at a time: the connection stays open
        conn.send(PingFrame(0))
        more, closed = conn.frames(timeout=0.3)
        assert not closed and more == [], "nothing after the error is answered, and no close yet"
    started = time.monotonic()
    _, closed = conn.frames(timeout=8)
    assert closed and time.monotonic() - started < 5, "closed once this client is quiet"


def test_single_20k_field_gets_431(raw: Any, counts: Counts) -> None:
    """A single 20 KB field gets 431 from the proxy, as on HTTP/1.1, and is not forwarded."""
    m = marker()
    conn = raw()
    frame = conn.headers_frame(conn.request(f"/big-field?m={m}", [(b"x-big", b"a" * 20 * 1024)]))
    conn.send(frame)
    frames, _ = conn.frames(until=lambda f: f.stream_id == frame.stream_id)
    assert answer_of(frames, frame.stream_id) == "status 431"
    assert not [t for t in counts.targets if m in t]


def test_shut_window_frees_the_app_connection(raw: Any, counts: Counts) -> None:
    """A client that keeps its stream window at 0 gets the stream reset after the idle timeout; the app is let go."""
    conn = raw(timeout=15)
    settings = SettingsFrame(0)
    settings.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 0}
    frame = conn.headers_frame(conn.request("/big?shut"))
    conn.send(settings, frame)
    frames, _ = conn.frames(until=lambda f: isinstance(f, RstStreamFrame) and f.stream_id == frame.stream_id)
    assert [f.error_code for f in frames if isinstance(f, RstStreamFrame)] == [8], frames  # CANCEL
    end = time.monotonic() + 5
    while counts.in_flight and time.monotonic() < end:
        time.sleep(0.1)
    assert counts.in_flight == 0, "the app is still held by a stream whose window never opened"


def test_unsized_5mb_upload_arrives_whole(proxy: Proxy, counts: Counts) -> None:
    """A 5 MB HTTP/2 upload without content-length reaches the app whole, with no GOAWAY on the way."""

    def body() -> Iterator[bytes]:
        for _ in range(80):
            yield b"u" * 65536

    with proxy.client(http2=True) as client:
        response = client.post("/upload-unsized", content=body())
    assert response.http_version == "HTTP/2"
    assert (response.status_code, response.text) == (200, f"{80 * 65536}\n")
    assert counts.bodies == [80 * 65536]


def test_ping_flood_from_a_reading_client_gets_goaway(raw: Any) -> None:
    """15,000 PINGs from a client that reads every answer: GOAWAY with ENHANCE_YOUR_CALM."""
    conn = raw(timeout=10)
    batch = PingFrame(0).serialize() * 1000
    seen: list[Frame] = []
    for _ in range(15):
        try:
            conn.sock.sendall(batch)
        except OSError:
            break
        frames, closed = conn.frames(until=lambda f: isinstance(f, GoAwayFrame), timeout=0.3)
        seen += frames
        if closed or any(isinstance(f, GoAwayFrame) for f in frames):
            break
    if not any(isinstance(f, GoAwayFrame) for f in seen):
        frames, _ = conn.frames(until=lambda f: isinstance(f, GoAwayFrame), timeout=5)
        seen += frames
    assert [f.error_code for f in seen if isinstance(f, GoAwayFrame)] == [11]

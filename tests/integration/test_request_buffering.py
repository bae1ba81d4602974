"""Request buffering in front of real Django under real gunicorn with ONE sync worker (issue 10, issue 9 item 12).

Every body reaches Django whole with a Content-Length, whatever its framing;
a slow upload never holds the worker; buffer files never outlive their request
or the proxy; a full buffer disk is a clear 507 and nothing else breaks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import PKI, App, Proxy, Reply, gunicorn, marker, start_proxy

pytestmark = pytest.mark.integration

MB = 1024 * 1024
PIECE = 64 * 1024


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def pieces(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), PIECE):
        yield data[i : i + PIECE]


def expected(data: bytes) -> dict[str, object]:
    """What the /body-hash view must answer for ``data``, sent to Django with a Content-Length."""
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "length": len(data),
        "content_length": str(len(data)),
        "transfer_encoding": None,
        "expect": None,
    }


def buffer_fds(pid: int, where: Path) -> list[str]:
    """The proxy's open descriptors that point into the buffer directory."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(str(where) + "/"):
                out.append(target)
    return out


def wait_for(check, deadline: float = 10.0):  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value or time.monotonic() > end:
            return value
        time.sleep(0.05)


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``where`` (the test is skipped where mounting is refused), unmounted after."""
    where.mkdir(exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def used_bytes(where: Path) -> int:
    st = os.statvfs(where)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class TrickledUpload:
    """A Content-Length upload over a raw TLS connection, sent slowly in a thread."""

    def __init__(self, proxy: Proxy, data: bytes, seconds: float, path: str = "/body-hash") -> None:
        self.data = data
        self.seconds = seconds
        self.conn = proxy.raw(timeout=30)
        self.reply: Reply | None = None
        self.error: BaseException | None = None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: localhost:{proxy.port}\r\n"
            f"Content-Length: {len(data)}\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        self.conn.send(head)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            count = 30
            step = -(-len(self.data) // count)
            for i in range(0, len(self.data), step):
                self.conn.send(self.data[i : i + step])
                time.sleep(self.seconds / count)
            self.reply = self.conn.read_response(timeout=30)
        except BaseException as e:  # reported by result()
            self.error = e

    def result(self) -> tuple[int, dict[str, object]]:
        self.thread.join(60)
        self.conn.close()
        assert self.error is None, self.error
        assert self.reply is not None
        status, _, body = self.reply.parse()
        return status, json.loads(body)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """Django under gunicorn with ONE sync worker: anything that holds it shows at once."""
    with gunicorn("tcp", tmp_path_factory.mktemp("app1"), extra=("--workers", "1", "--timeout", "120")) as running:
        yield running


@pytest.fixture(scope="module")
def buffers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("buffers") / "buffers"


@pytest.fixture(scope="module")
def proxy(app: App, pki: PKI, buffers: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    server = {"buffer_dir": str(buffers), "upstream_timeout": 60}
    with start_proxy(tmp_path_factory.mktemp("proxy"), app.url, pki, server=server) as running:
        yield running


@pytest.mark.parametrize("size", [5 * MB, 40 * MB], ids=["5MB", "40MB"])
def test_chunked_upload_reaches_django_whole(proxy: Proxy, size: int) -> None:
    """A chunked HTTP/1.1 upload arrives in Django's request.body whole, with a Content-Length and the right hash."""
    data = payload(size)
    with proxy.client() as client:
        response = client.post("/body-hash", content=pieces(data))
    assert response.http_version == "HTTP/1.1"
    assert response.status_code == 200, response.text[:300]
    assert response.json() == expected(data)


@pytest.mark.parametrize("sized", [False, True], ids=["no-content-length", "content-length"])
def test_http2_upload_reaches_django_whole(proxy: Proxy, sized: bool) -> None:
    """A 5 MB HTTP/2 upload, with or without content-length, arrives whole in request.body."""
    data = payload(5 * MB + 7)
    with proxy.client(http2=True) as client:
        body = data if sized else pieces(data)
        response = client.post("/body-hash", content=body)
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200, response.text[:300]
    assert response.json() == expected(data)


def test_slow_upload_does_not_hold_the_worker(proxy: Proxy, buffers: Path) -> None:
    """While a 3 MB upload trickles in, a GET to the same one-worker app answers in under a second."""
    data = payload(3 * MB)
    upload = TrickledUpload(proxy, data, seconds=5)
    time.sleep(1.5)
    with proxy.client() as client:
        start = time.monotonic()
        response = client.get("/whoami")
        elapsed = time.monotonic() - start
    assert response.status_code == 200
    assert elapsed < 1.0, f"GET took {elapsed:.2f}s: the worker was held by the upload"
    status, seen = upload.result()
    assert (status, seen) == (200, expected(data))


def test_buffer_files_are_gone_after_the_request(proxy: Proxy, buffers: Path) -> None:
    """A spilled body's file has no name while in use, and no descriptor to it is left once answered."""
    pid = proxy.process.proc.pid
    data = payload(3 * MB + 1)
    upload = TrickledUpload(proxy, data, seconds=3)
    open_now = wait_for(lambda: buffer_fds(pid, buffers))
    assert open_now, "a 3 MB body should have gone to a buffer file"
    assert all(target.endswith("(deleted)") for target in open_now), open_now
    assert os.listdir(buffers) == []
    assert upload.result() == (200, expected(data))
    assert wait_for(lambda: not buffer_fds(pid, buffers)), buffer_fds(pid, buffers)
    assert os.listdir(buffers) == []


def test_expect_100_continue(proxy: Proxy) -> None:
    """Expect: 100-continue gets our 100 at once; the body then reaches Django, which never sees Expect."""
    data = b"expected body"
    with proxy.raw(timeout=10) as conn:
        conn.send(
            f"POST /body-hash HTTP/1.1\r\nHost: localhost:{proxy.port}\r\nContent-Length: {len(data)}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        interim = conn._read(1.0, lambda got: b"\r\n\r\n" in got)
        assert interim.data == b"HTTP/1.1 100 Continue\r\n\r\n", interim
        conn.send(data)
        status, _, body = conn.read_response(timeout=10).parse()
    assert (status, json.loads(body)) == (200, expected(data))


def test_expect_100_continue_with_curl(proxy: Proxy, tmp_path: Path) -> None:
    """curl, which waits for a 100 before a large body, gets it at once: no wait for its own timeout."""
    source = tmp_path / "body"
    data = payload(2 * MB)
    source.write_bytes(data)
    start = time.monotonic()
    done = subprocess.run(
        [
            "curl", "-sS", "--http1.1", "--cacert", str(proxy.pki.ca_pem), "--expect100-timeout", "20",
            "-H", "Expect: 100-continue", "--data-binary", f"@{source}", f"{proxy.origin()}/body-hash",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == expected(data)
    assert elapsed < 10, f"curl waited {elapsed:.1f}s: no 100 Continue"


def test_expect_100_continue_with_curl_over_http2(proxy: Proxy, tmp_path: Path) -> None:
    """Over HTTP/2 too, curl waiting for a 100 before its body gets it at once (an interim HEADERS frame)."""
    source = tmp_path / "body"
    data = payload(2 * MB)
    source.write_bytes(data)
    start = time.monotonic()
    done = subprocess.run(
        [
            "curl", "-sS", "--http2", "--cacert", str(proxy.pki.ca_pem), "--expect100-timeout", "20",
            "-H", "Expect: 100-continue", "--data-binary", f"@{source}", "-w", "\n%{http_version}",
            f"{proxy.origin()}/body-hash",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    body, _, version = done.stdout.rpartition("\n")
    assert version == "2"
    assert json.loads(body) == expected(data)
    assert elapsed < 10, f"curl waited {elapsed:.1f}s: no 100 over HTTP/2"


def test_expect_over_the_limit_is_413_without_100(proxy: Proxy) -> None:
    """A Content-Length over max_body_size with Expect: 100-continue gets 413 and never a 100."""
    with proxy.raw(timeout=10) as conn:
        conn.send(
            f"POST /body-hash HTTP/1.1\r\nHost: localhost:{proxy.port}\r\nContent-Length: {100 * MB}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        reply = conn.read_until_closed(timeout=5)
    assert reply.data.startswith(b"HTTP/1.1 413 "), reply.data[:200]
    assert b" 100 " not in reply.data.split(b"\r\n", 1)[0]


def test_kill_9_leaves_no_buffer_files(app: App, pki: PKI, tmp_path: Path) -> None:
    """A proxy killed with SIGKILL while a body is in a buffer file leaves nothing in the buffer directory."""
    with tmpfs(tmp_path / "bufs", "64m") as where:
        baseline = used_bytes(where)
        with start_proxy(tmp_path, app.url, pki, server={"buffer_dir": str(where)}) as proxy:
            pid = proxy.process.proc.pid
            upload = TrickledUpload(proxy, payload(4 * MB), seconds=4)
            assert wait_for(lambda: used_bytes(where) > baseline + MB), "the body should be on the tmpfs"
            assert buffer_fds(pid, where)
            proxy.process.signal(signal.SIGKILL)
            proxy.process.proc.wait(10)
            upload.thread.join(30)
            upload.conn.close()
        assert os.listdir(where) == []
        assert wait_for(lambda: used_bytes(where) <= baseline), (used_bytes(where), baseline)


def test_full_buffer_disk_is_507_and_others_go_on(app: App, pki: PKI, tmp_path: Path) -> None:
    """With 1 MB of buffer disk a 5 MB upload gets a plain 507, the log says why, and the next requests work."""
    with tmpfs(tmp_path / "bufs", "1m") as where:
        with start_proxy(tmp_path, app.url, pki, server={"buffer_dir": str(where)}) as proxy:
            with proxy.client() as client:
                big = client.post("/body-hash", content=pieces(payload(5 * MB)))
                assert big.status_code == 507, big.text[:300]
                assert "no room" in big.text
                assert "Traceback" not in big.text
                small = payload(100_000)
                after = client.post("/body-hash", content=pieces(small))
                assert (after.status_code, after.json()) == (200, expected(small))
                assert client.get("/whoami").status_code == 200
            line = proxy.process.wait_for_line("no room to buffer the request body", deadline=5)
            assert "No space left on device" in line
            assert wait_for(lambda: used_bytes(where) == 0), used_bytes(where)


def test_client_abort_mid_upload_closes_the_buffer_file(proxy: Proxy, app: App, buffers: Path) -> None:
    """A client that goes away mid-upload leaves no buffer file open, and Django never hears of the request."""
    pid = proxy.process.proc.pid
    tag = marker()
    upload = TrickledUpload(proxy, payload(3 * MB), seconds=20, path=f"/body-hash?m={tag}")
    assert wait_for(lambda: buffer_fds(pid, buffers)), "a 3 MB body should have gone to a buffer file"
    upload.conn.close()
    upload.thread.join(30)
    assert wait_for(lambda: not buffer_fds(pid, buffers)), buffer_fds(pid, buffers)
    with proxy.client() as client:
        assert client.post(f"/body-hash?m={tag}-control", content=b"x").status_code == 200
    hits = app.hits()
    assert f"{tag}-control" in hits
    assert f"m={tag}\n" not in hits


def test_unknown_length_is_buffered_with_buffering_off(app: App, pki: PKI, tmp_path: Path) -> None:
    """With request_buffering = false a chunked upload still reaches Django whole (never as an empty body)."""
    data = payload(5 * MB)
    server = {"buffer_dir": str(tmp_path / "bufs"), "upstream_timeout": 60}
    with start_proxy(tmp_path, app.url, pki, server=server, request_buffering=False) as proxy:
        with proxy.client() as client:
            chunked = client.post("/body-hash", content=pieces(data))
            sized = client.post("/body-hash", content=data)
    assert (chunked.status_code, chunked.json()) == (200, expected(data))
    assert (sized.status_code, sized.json()) == (200, expected(data))


def test_concurrent_http2_uploads_on_one_connection(proxy: Proxy) -> None:
    """Four unsized 3 MB uploads multiplexed on one HTTP/2 connection (past its memory budget) all arrive whole.

    One asyncio client multiplexes them: httpx's HTTP/2 connection shared by
    threads races on its own stream state (seen as client-side h2 errors).
    """
    bodies = [payload(3 * MB + i) for i in range(4)]

    async def body(data: bytes) -> AsyncIterator[bytes]:
        for piece in pieces(data):
            yield piece

    async def run() -> list[object]:
        async with httpx.AsyncClient(
            base_url=proxy.origin(), verify=proxy.pki.client_context(), http2=True, timeout=90, trust_env=False
        ) as client:
            await client.get("/whoami")  # one connection, opened before the uploads share it

            async def upload(data: bytes) -> object:
                response = await client.post("/body-hash", content=body(data))
                return (response.status_code, response.json(), response.http_version)

            return list(await asyncio.gather(*(upload(data) for data in bodies), return_exceptions=True))

    assert asyncio.run(run()) == [(200, expected(data), "HTTP/2") for data in bodies]


def test_slow_http2_upload_does_not_hold_the_worker(proxy: Proxy) -> None:
    """While an unsized HTTP/2 upload trickles in, a GET to the same one-worker app answers in under a second."""
    data = payload(3 * MB + 3)
    outcome: list[object] = []

    def trickle() -> Iterator[bytes]:
        for piece in pieces(data):
            time.sleep(4 / (len(data) / PIECE))
            yield piece

    def upload() -> None:
        with proxy.client(http2=True) as client:
            response = client.post("/body-hash", content=trickle())
            outcome.append((response.status_code, response.json()))

    thread = threading.Thread(target=upload)
    thread.start()
    time.sleep(1.5)
    with proxy.client(http2=True) as client:
        start = time.monotonic()
        response = client.get("/whoami")
        elapsed = time.monotonic() - start
    thread.join(60)
    assert response.status_code == 200
    assert elapsed < 1.0, f"GET took {elapsed:.2f}s: the worker was held by the upload"
    assert outcome == [(200, expected(data))]


def test_chunked_body_over_max_body_size_is_413(app: App, pki: PKI, tmp_path: Path) -> None:
    """A chunked upload passing max_body_size gets 413 while it is still sending, and never reaches Django."""
    tag = marker()
    server = {"buffer_dir": str(tmp_path / "bufs")}
    with start_proxy(tmp_path, app.url, pki, server=server, max_body_size="2M") as proxy:
        with proxy.raw(timeout=10) as conn:
            conn.send(
                f"POST /body-hash?m={tag} HTTP/1.1\r\nHost: localhost:{proxy.port}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
            )
            chunk = payload(PIECE)
            with suppress(OSError):
                for _ in range(3 * MB // PIECE):
                    conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            reply = conn.read_until_closed(timeout=10)
        with proxy.client() as client:
            assert client.get(f"/whoami?m={tag}-control").status_code == 200
    assert reply.status == 413, reply.data[:300]
    hits = app.hits()
    assert f"{tag}-control" in hits
    assert f"m={tag}\n" not in hits

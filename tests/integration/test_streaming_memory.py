"""A gigabyte each way through `twist tlsproxy` while its memory is watched."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trustme

from tests.integration.procs import free_port, running, tlsproxy

pytestmark = pytest.mark.integration
BACKEND = str(Path(__file__).with_name("backend.py"))
GIB = 1024**3
ALLOWED_GROWTH = 16 * 1024 * 1024  # bytes of RSS a 1 GiB transfer may add


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class PeakRSS:
    """Samples a process's resident size in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    where = tmp_path_factory.mktemp("stream")
    ca = trustme.CA()
    leaf = ca.issue_cert("big.test")
    (where / "cert.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (where / "key.pem").write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    https, upstream = free_port(), free_port()
    config = where / "config.toml"
    config.write_text(
        f"""
[server]
https = ["tcp:{https}:interface=127.0.0.1"]
http = []
access_log = false
state_dir = "{where}/state"
[[site]]
hosts = ["big.test"]
upstream = "http://127.0.0.1:{upstream}"
tls = "files"
cert = "{where}/cert.pem"
key = "{where}/key.pem"
max_body_size = "2G"
"""
    )
    with running([sys.executable, BACKEND, str(upstream)]) as backend:
        backend.wait_for_line("backend ready")
        with tlsproxy(config) as process:
            # Warm up: the first requests allocate buffers that stay.
            curl(https, where, "/stream?size=10485760")
            yield https, where, process.proc.pid


def curl(port: int, where: Path, path: str, *extra: str, stdin: object = None) -> subprocess.CompletedProcess[str]:
    argv = [
        "curl", "-sS", "--http1.1", "--cacert", str(where / "ca.pem"),
        "--resolve", f"big.test:{port}:127.0.0.1", "-o", "-", "-w", "\\n%{http_code} %{size_download} %{size_upload}",
        *extra, f"https://big.test:{port}{path}",
    ]  # fmt: skip
    return subprocess.run(argv, stdin=stdin, capture_output=True, text=True, timeout=300)


def test_gigabyte_download_in_bounded_memory(proxy) -> None:  # type: ignore[no-untyped-def]
    """1 GiB from the app reaches the client whole while the proxy grows by less than 16 MiB."""
    port, where, pid = proxy
    before = rss(pid)
    with PeakRSS(pid) as peak:
        result = subprocess.run(
            f"curl -sS --http1.1 --cacert {where}/ca.pem --resolve big.test:{port}:127.0.0.1 "
            f"-w '%{{http_code}} %{{size_download}}' -o /dev/null https://big.test:{port}/stream?size={GIB}",
            shell=True, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert result.stdout == f"200 {GIB}", result.stderr
    assert peak.peak - before < ALLOWED_GROWTH, f"grew {(peak.peak - before) / 2**20:.1f} MiB"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_gigabyte_upload_in_bounded_memory(proxy, framing: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """1 GiB to the app arrives whole (held in a buffer file first) while the proxy grows by less than 16 MiB."""
    port, where, pid = proxy
    if framing == "content-length":
        source = tmp_path / "gigabyte"
        with source.open("wb") as f:
            f.truncate(GIB)  # sparse: no disk used, curl sends its length
        send = f"curl -T {source}"
    else:
        send = f"head -c {GIB} /dev/zero | curl -T - -H 'Transfer-Encoding: chunked'"
    before = rss(pid)
    with PeakRSS(pid) as peak:
        result = subprocess.run(
            f"{send} -sS --http1.1 --cacert {where}/ca.pem --resolve big.test:{port}:127.0.0.1 "
            f"-H 'Expect:' -X POST -w ' %{{http_code}}' https://big.test:{port}/upload",
            shell=True, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert result.stdout.split() == [str(GIB), "200"], (result.stdout, result.stderr)
    assert peak.peak - before < ALLOWED_GROWTH, f"grew {(peak.peak - before) / 2**20:.1f} MiB"

"""Out of file descriptors, twist tlsproxy counts refused connections and logs them sparingly."""

from __future__ import annotations

import shutil
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import PKI, proxy_config
from tests.integration.procs import BIN, free_port, running

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is not installed"),
]

READY = "tlsproxy: ready"


def test_emfile_refusals_counted_and_logged_sparingly(pki: PKI, tmp_path: Path) -> None:
    """A flood past the descriptor limit leaves no log line per connection, and the metric counts the refusals."""
    port, admin = free_port(), free_port()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    config = tmp_path / "tlsproxy.toml"
    server = {"admin": f"tcp:{admin}:interface=127.0.0.1"}
    config.write_text(proxy_config(port, "http://127.0.0.1:9", pki, state, server=server))
    argv = ["prlimit", "--nofile=256", str(BIN / "twist"), "tlsproxy", "--config", str(config)]
    with running(argv) as process:
        process.wait_for_line(READY, 30)
        clients = []
        try:
            for _ in range(400):
                sock = socket.socket()
                sock.settimeout(5)
                sock.connect(("127.0.0.1", port))
                clients.append(sock)
            time.sleep(2)  # held while the proxy accepts (and refuses) what it can
        finally:
            for sock in clients:
                sock.close()
        name = 'tlsproxy_refused_connections_total{listener="https"}'
        deadline = time.monotonic() + 15
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as response:
                metrics = response.read().decode()
            refused = [line for line in metrics.splitlines() if line.startswith(name)]
            if (refused and float(refused[0].rsplit(" ", 1)[1]) >= 100) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        output = process.output
    assert refused, metrics[-2000:]
    count = float(refused[0].rsplit(" ", 1)[1])
    assert count >= 100, refused
    assert "EMFILE recovery" not in output
    assert 1 <= output.count("out of file descriptors") <= 2, output[-3000:]

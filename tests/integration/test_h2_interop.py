"""Our HTTP/2 answers as an independent implementation (nghttp2, in h2load) decodes them."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.integration.conftest import Proxy

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load missing: apt-get install nghttp2-client"),
]


@pytest.mark.parametrize("table_size", [0, 100, 4096])
def test_nghttp2_decodes_our_answers_whatever_its_table_size(proxy: Proxy, table_size: int) -> None:
    """nghttp2's strict HPACK decoder takes every answer, whatever header table size it announces."""
    url = f"https://localhost:{proxy.port}/whoami"
    argv = ["h2load", "-n", "60", "-c", "2", "-m", "5", f"--header-table-size={table_size}", url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout
    assert "Application protocol: h2" in out, out[-500:]
    assert "60 succeeded, 0 failed, 0 errored" in out, out[-500:]
    assert "status codes: 60 2xx" in out, out[-500:]

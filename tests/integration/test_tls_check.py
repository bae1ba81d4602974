"""`tlsproxy check` and the start-up log of `twist tlsproxy` on certificates and suites that load but are weak."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest
import trustme

from tests.integration.procs import BIN, free_port, tlsproxy

pytestmark = pytest.mark.integration


def weak_config(where: Path) -> Path:
    """One site whose file holds an expired leaf without its intermediate, and a CBC suite next to h2."""
    now = datetime.datetime.now(datetime.UTC)
    leaf = (
        trustme.CA()
        .create_child_ca()
        .issue_cert(
            "a.test",
            key_type=trustme.KeyType.ECDSA,
            not_before=now - datetime.timedelta(days=90),
            not_after=now - datetime.timedelta(days=1),
        )
    )
    (where / "a.pem").write_bytes(leaf.cert_chain_pems[0].bytes())
    (where / "a.key").write_bytes(leaf.private_key_pem.bytes())
    config = where / "config.toml"
    config.write_text(
        f"""
[server]
https = ["tcp:{free_port()}:interface=127.0.0.1"]
http = ["tcp:{free_port()}:interface=127.0.0.1"]

[tls]
ciphers = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-SHA256"

[[site]]
hosts = ["a.test"]
upstream = "http://127.0.0.1:9"
tls = "files"
cert = "{where}/a.pem"
key = "{where}/a.key"
"""
    )
    return config


def test_check_warns(tmp_path: Path) -> None:
    """check names the groups, and warns (exit 0) about the expired leaf, its missing issuer and the CBC suite."""
    config = weak_config(tmp_path)
    result = subprocess.run(
        [str(BIN / "tlsproxy"), "check", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "key exchange groups: " in result.stdout
    assert "X25519, P-256, P-384" in result.stdout
    assert f"site a.test: {tmp_path}/a.pem: the certificate expired on" in result.stderr
    assert "its issuer (" in result.stderr and ") is missing" in result.stderr
    assert "tls.ciphers: TLS 1.2 suites without AEAD (CBC or worse): ECDHE-ECDSA-AES128-SHA256" in result.stderr
    assert "HTTP/2 forbids" in result.stderr


def test_startup_log_warns(tmp_path: Path) -> None:
    """The start-up log names the groups and warns about the expired leaf and its missing issuer."""
    config = weak_config(tmp_path)
    with tlsproxy(config) as process:
        output = process.output
    assert "key exchange groups X25519" in output or "key exchange groups X25519MLKEM768:X25519" in output, output
    assert "site a.test: " in output and "the certificate expired on" in output, output
    assert "the file holds the leaf certificate only" in output, output

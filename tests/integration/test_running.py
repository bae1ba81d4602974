"""What a person running tlsproxy sees: exit statuses and messages of `twist tlsproxy` and `tlsproxy`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.procs import BIN, free_port

pytestmark = pytest.mark.integration

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("TLSPROXY_")}


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """One command from the venv's bin dir, with only the TLSPROXY_ variables given."""
    return subprocess.run(argv, capture_output=True, text=True, env={**CLEAN_ENV, **(env or {})}, timeout=timeout)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket already listens on."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        yield held.getsockname()[1]


def local_config(where: Path, https: str) -> Path:
    config = where / "config.toml"
    config.write_text(
        f'[server]\nhttps = ["{https}"]\nhttp = []\nstate_dir = "{where}/state"\n'
        '[[site]]\nhosts = ["app.test"]\nupstream = "http://127.0.0.1:9"\ntls = "local"\n'
    )
    return config


def test_twist_exits_1_when_the_port_is_taken(tmp_path: Path, busy_port: int) -> None:
    """`twist tlsproxy` that cannot bind exits 1 (not 0), naming the listener and what to do."""
    config = local_config(tmp_path, f"tcp:{busy_port}:interface=127.0.0.1")
    done = run([str(BIN / "twist"), "tlsproxy", "--config", str(config)], {"TLSPROXY_CAROOT": str(tmp_path / "ca")})
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot listen on tcp:{busy_port}:interface=127.0.0.1 (https): Address already in use" in done.stdout
    assert "choose another port" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_dev_exits_1_when_the_port_is_taken(tmp_path: Path, busy_port: int) -> None:
    """`tlsproxy dev` that cannot bind exits 1 with the same advice."""
    done = run(
        [str(BIN / "tlsproxy"), "dev", "--listen", f"tcp:{busy_port}:interface=127.0.0.1"],
        {"TLSPROXY_CAROOT": str(tmp_path / "ca")},
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Address already in use" in done.stdout and "choose another port" in done.stdout


def _can_drop_privileges() -> bool:
    try:
        start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return False
    return os.geteuid() == 0 and shutil.which("setpriv") is not None and start > 443


@pytest.mark.skipif(not _can_drop_privileges(), reason="needs root, setpriv and privileged port 443")
def test_port_443_as_an_unprivileged_user_says_how_to_get_it() -> None:
    """Port 443 as nobody: exit 1 and name the socket units, CAP_NET_BIND_SERVICE and another port."""
    # pytest's tmp_path lives under a root-only directory: nobody needs a place of its own.
    with tempfile.TemporaryDirectory(prefix="tlsproxy-nobody-") as where:
        home = Path(where)
        home.chmod(0o755)
        config = local_config(home, "tcp:443:interface=127.0.0.1")
        os.chown(home, 65534, 65534)
        _bind_443_as_nobody(home, config)


def _bind_443_as_nobody(home: Path, config: Path) -> None:
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = {"TLSPROXY_CAROOT": str(home / "ca"), "HOME": str(home)}
    for argv in (
        [str(BIN / "twist"), "tlsproxy", "--config", str(config)],
        [str(BIN / "tlsproxy"), "dev", "--listen", "tcp:443:interface=127.0.0.1"],
    ):
        done = run([*nobody, *argv], env)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "cannot listen on tcp:443:interface=127.0.0.1 (https): Permission denied" in done.stdout
        for advice in ("deploy/systemd/tlsproxy.socket", "CAP_NET_BIND_SERVICE", "tcp:8443"):
            assert advice in done.stdout, advice

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

from tests.integration.procs import BIN, READY, free_port, running

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


def test_systemd_endpoint_outside_systemd_exits_1_without_traceback(tmp_path: Path) -> None:
    """The shipped systemd endpoint strings run without socket activation: exit 1 and one line, no traceback."""
    config = local_config(tmp_path, "systemd:domain=INET6:name=https")
    done = run([str(BIN / "twist"), "tlsproxy", "--config", str(config)], {"TLSPROXY_CAROOT": str(tmp_path / "ca")})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot listen on systemd:domain=INET6:name=https (https)" in done.stdout
    assert "systemd passed no such socket" in done.stdout
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
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


def _port_443_is_privileged() -> bool:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) > 443
    except (OSError, ValueError):
        return False


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def nobody_home() -> Iterator[Path]:
    """A directory the unprivileged user 65534 owns (pytest's tmp_path is under a root-only directory)."""
    with tempfile.TemporaryDirectory(prefix="tlsproxy-nobody-") as where:
        home = Path(where)
        home.chmod(0o755)
        os.chown(home, 65534, 65534)
        yield home


@pytest.mark.skipif(not (_can_drop_privileges() and _port_443_is_privileged()), reason="needs root, setpriv, port 443")
def test_port_443_as_an_unprivileged_user_says_how_to_get_it(nobody_home: Path) -> None:
    """Port 443 as nobody: exit 1 and name the socket units, CAP_NET_BIND_SERVICE and another port."""
    home = nobody_home
    config = local_config(home, "tcp:443:interface=127.0.0.1")
    env = {"TLSPROXY_CAROOT": str(home / "ca"), "HOME": str(home)}
    for argv in (
        [str(BIN / "twist"), "tlsproxy", "--config", str(config)],
        [str(BIN / "tlsproxy"), "dev", "--listen", "tcp:443:interface=127.0.0.1"],
    ):
        done = run([*NOBODY, *argv], env)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "cannot listen on tcp:443:interface=127.0.0.1 (https): Permission denied" in done.stdout
        for advice in ("deploy/systemd/tlsproxy.socket", "CAP_NET_BIND_SERVICE", "tcp:8443"):
            assert advice in done.stdout, advice


def acme_config(where: Path, state_dir: Path, upstream: str = "http://127.0.0.1:9") -> Path:
    config = where / "acme.toml"
    config.write_text(
        f'[server]\nhttps = ["tcp:{free_port()}:interface=127.0.0.1"]\nhttp = []\nstate_dir = "{state_dir}"\n'
        '[acme]\nagree_tos = true\ndirectory = "https://127.0.0.1:9/dir"\n'
        f'[[site]]\nhosts = ["app.test"]\nupstream = "{upstream}"\n'
    )
    config.chmod(0o644)
    return config


@pytest.mark.skipif(not _can_drop_privileges(), reason="needs root and setpriv to be a user that cannot write")
def test_unwritable_state_dir_is_one_line_in_check_and_at_start(nobody_home: Path) -> None:
    """A state_dir the service user cannot write: `check` and `twist` exit 2 with one line, no traceback."""
    state = nobody_home / "state"
    (state / "challenges").mkdir(parents=True)  # root-owned, as after a `sudo tlsproxy renew`
    config = acme_config(nobody_home, state)
    check = [str(BIN / "tlsproxy"), "check", "-c", str(config)]
    for argv in (check, [str(BIN / "twist"), "tlsproxy", "-c", str(config)]):
        done = run([*NOBODY, *argv], {"HOME": str(nobody_home)})
        assert done.returncode == 2, done.stdout + done.stderr
        (line,) = [x for x in done.stderr.splitlines() if "server.state_dir" in x]
        assert f"server.state_dir: {state}" in line and "is not writable by nobody (uid 65534)" in line
        assert "chown" in line
        assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.skipif(not _can_drop_privileges(), reason="needs root and setpriv to be a user that cannot read")
def test_unreadable_key_file_names_the_path_and_reason(nobody_home: Path) -> None:
    """A key the service user cannot read is reported as site[0].key with its path and the reason."""
    import trustme

    leaf = trustme.CA().issue_cert("app.test")
    cert, key = nobody_home / "cert.pem", nobody_home / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    cert.chmod(0o644)
    key.chmod(0o600)  # root's
    config = nobody_home / "files.toml"
    config.write_text(
        f'[server]\nhttps = ["tcp:{free_port()}"]\nhttp = []\n'
        f'[[site]]\nhosts = ["app.test"]\nupstream = "http://127.0.0.1:9"\ntls = "files"\n'
        f'cert = "{cert}"\nkey = "{key}"\n'
    )
    config.chmod(0o644)
    done = run([*NOBODY, str(BIN / "tlsproxy"), "check", "-c", str(config)])
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"site[0].key: cannot read {key}: Permission denied" in done.stderr


def test_check_warns_about_a_missing_app_socket(tmp_path: Path) -> None:
    """`check` passes a unix upstream that does not exist, with a warning on stderr saying so."""
    config = tmp_path / "unix.toml"
    missing = tmp_path / "gunicorn.sock"
    config.write_text(f'[[site]]\nhosts = ["app.test"]\nupstream = "unix:{missing}"\ntls = "local"\n')
    done = run([str(BIN / "tlsproxy"), "check", "-c", str(config)])
    assert done.returncode == 0, done.stderr
    assert f"warning: {config}: site[0].upstream: {missing} does not exist" in done.stderr
    assert "configuration OK" in done.stdout


def test_dev_proxy_stays_local_says_what_django_needs_and_keeps_quiet(tmp_path: Path) -> None:
    """`tlsproxy dev --listen tcp:PORT`: loopback only, its IPs served, SECURE_PROXY_SSL_HEADER named, no chatter."""
    port, app_port = free_port(), free_port()
    argv = [str(BIN / "tlsproxy"), "dev", "--listen", f"tcp:{port}", "--upstream", f"http://127.0.0.1:{app_port}"]
    with running(argv, env={"TLSPROXY_CAROOT": str(tmp_path / "ca")}) as dev:
        dev.wait_for_line(READY)
        listening = [line for line in dev.lines if "https listening on" in line]
        assert [line.split("listening on ")[1].split(" ")[0] for line in listening] == [
            f"127.0.0.1:{port}",
            f"::1:{port}",
        ]
        assert any('SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")' in line for line in dev.lines)
        absent = dev.wait_for_line(f"nothing answers on 127.0.0.1:{app_port} yet", 10)
        assert f"python manage.py runserver 127.0.0.1:{app_port}" in absent
        mark = len(dev.lines)
        # A client that does not trust the local CA yet: its failed handshake is no line at the default level.
        refused = subprocess.run(
            ["curl", "-sS", "--noproxy", "*", f"https://localhost:{port}/"], capture_output=True, text=True
        )
        assert refused.returncode != 0
        page = subprocess.run(
            ["curl", "-sSk", "--noproxy", "*", f"https://localhost:{port}/"], capture_output=True, text=True
        )
        assert f"python manage.py runserver 127.0.0.1:{app_port}" in page.stdout
        dev.wait_for_line('"GET / HTTP', start=mark)
        # The addresses the certificate names are served too (the app's 502 page, not 421).
        for address in ("127.0.0.1", "[::1]"):
            for version in ("--http1.1", "--http2"):
                curl = ["curl", "-sSk", version, "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code}"]
                code = subprocess.run([*curl, f"https://{address}:{port}/"], capture_output=True, text=True)
                assert code.stdout == "502", (address, version, code.stdout, code.stderr)
    noise = [line for line in dev.lines if "log_legacy" in line or "#debug]" in line or "handshake" in line]
    assert noise == []


def test_check_messages_say_where_and_what_was_meant(tmp_path: Path) -> None:
    """`tlsproxy check`: a TOML error by line and column, an https:// upstream with the http:// to write."""
    broken = tmp_path / "broken.toml"
    broken.write_text("[server]\nhttps = tcp:443\n")
    done = run([str(BIN / "tlsproxy"), "check", "-c", str(broken)])
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"tlsproxy: {broken}: line 2, column 9: not valid TOML: Invalid value")
    tls_upstream = tmp_path / "https.toml"
    tls_upstream.write_text('[[site]]\nhosts = ["a.test"]\nupstream = "https://127.0.0.1:8000"\ntls = "local"\n')
    done = run([str(BIN / "tlsproxy"), "check", "-c", str(tls_upstream)])
    assert done.returncode == 2
    assert "site[0].upstream: 'https://127.0.0.1:8000'" in done.stderr
    assert "did you mean 'http://127.0.0.1:8000'?" in done.stderr


@pytest.mark.skipif(not _can_drop_privileges(), reason="needs root and setpriv to be a user that cannot look")
def test_state_dir_behind_a_closed_directory(nobody_home: Path, tmp_path: Path) -> None:
    """A state_dir under a directory this user may not enter is one line from `check`, exit 2."""
    closed = tmp_path / "closed"  # under pytest's root-only directory
    config = acme_config(nobody_home, closed / "state")
    done = run([*NOBODY, str(BIN / "tlsproxy"), "check", "-c", str(config)], {"HOME": str(nobody_home)})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "server.state_dir:" in done.stderr and "Permission denied for nobody (uid 65534)" in done.stderr
    assert "Traceback" not in done.stderr


def test_dev_proxy_debug_level_shows_refused_handshakes(tmp_path: Path) -> None:
    """`tlsproxy dev --log-level debug` shows the handshake of a client that does not trust the CA."""
    port = free_port()
    argv = [str(BIN / "tlsproxy"), "dev", "--listen", str(port), "--log-level", "debug"]
    with running(argv, env={"TLSPROXY_CAROOT": str(tmp_path / "ca")}) as dev:
        dev.wait_for_line(READY)
        mark = len(dev.lines)
        refused = subprocess.run(["curl", "-sS", "--noproxy", "*", f"https://localhost:{port}/"], capture_output=True)
        assert refused.returncode != 0
        assert "unknown ca" in dev.wait_for_line("TLS handshake with", 10, start=mark)


def test_passwd_without_a_terminal_says_to_use_stdin(tmp_path: Path) -> None:
    """`tlsproxy passwd` with no terminal (a script, docker exec without -t): exit 2, pointing at --stdin."""
    htpasswd = tmp_path / "htpasswd"
    done = subprocess.run(
        [str(BIN / "tlsproxy"), "passwd", str(htpasswd), "ann"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
        start_new_session=True,  # no controlling terminal: /dev/tty cannot be opened
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"tlsproxy: no terminal to ask the password on: pipe it in with --stdin"
        f" (tlsproxy passwd {htpasswd} ann --stdin); nothing changed\n"
    )
    assert not htpasswd.exists()

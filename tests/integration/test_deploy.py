"""The shipped deployment files (deploy/), run as far as this machine allows.

systemd units: checked with `systemd-analyze verify`, and socket activation run for real with
`systemd-socket-activate` (the same LISTEN_FDS / LISTEN_FDNAMES hand-over systemd does), using the
endpoint strings of deploy/systemd/config.toml.  Docker: there is no Docker engine here, so the
Dockerfile and compose file are parsed, and the exact entrypoint runs with the environment they set.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.integration.procs import BIN, READY, Process, free_port, running

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
DOCKER = ROOT / "deploy" / "docker"
SITE_HOSTS = ("example.com", "www.example.com")
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
CURL = shutil.which("curl")


# ---------------------------------------------------------------------------
# Helpers: certificates, a stub app on a unix socket, curl


@dataclass
class PKI:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    where = tmp_path_factory.mktemp("deploy-pki")
    ca = trustme.CA()
    leaf = ca.issue_cert(*SITE_HOSTS)
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    (where / "fullchain.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(where / "privkey.pem"))
    return PKI(where / "ca.pem", where / "fullchain.pem", where / "privkey.pem")


class _EchoHeaders(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the request's headers as JSON: what the app was told."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # unix peers have no address to log
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@contextmanager
def unix_app(path: Path) -> Iterator[Path]:
    """A stand-in for gunicorn: an HTTP/1.1 server on a unix socket, until stopped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    server = _UnixHTTPServer(str(path), _EchoHeaders)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@dataclass
class CurlResult:
    status: int
    headers: dict[str, str]
    body: bytes


def curl(url: str, *, address: str, port: int, ca: Path | None = None, timeout: float = 30) -> CurlResult:
    """One request with curl, the name in ``url`` resolved to ``address``; no proxies, no retries."""
    host = url.split("://", 1)[1].split("/", 1)[0].split(":", 1)[0]
    target = f"[{address}]" if ":" in address else address
    argv = [CURL, "-sS", "-i", "--noproxy", "*", "--max-time", str(timeout), "--resolve", f"{host}:{port}:{target}"]
    if ca is not None:
        argv += ["--cacert", str(ca)]
    done = subprocess.run([*argv, url], capture_output=True, timeout=timeout + 5)
    assert done.returncode == 0, f"curl {url}: exit {done.returncode}: {done.stderr.decode(errors='replace')}"
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return CurlResult(int(lines[0].split()[1]), headers, body)


def _site_table(upstream: str, pki: PKI) -> str:
    return (
        "[[site]]\n"
        f"hosts = {json.dumps(list(SITE_HOSTS))}\n"
        f'upstream = "{upstream}"\n'
        'tls = "files"\n'
        f'cert = "{pki.cert}"\n'
        f'key = "{pki.key}"\n'
    )


# ---------------------------------------------------------------------------
# systemd


def unit_file(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}: keys may repeat, as in the real syntax."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        else:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def test_systemd_units_hand_tlsproxy_named_sockets_and_confine_it() -> None:
    """tlsproxy.service runs unprivileged and hardened on the https/http sockets its .socket units bind."""
    service = unit_file(SYSTEMD / "tlsproxy.service")
    https = unit_file(SYSTEMD / "tlsproxy.socket")
    http = unit_file(SYSTEMD / "tlsproxy-http.socket")

    assert values(service, "Service", "ExecStart") == [
        "/opt/tlsproxy/bin/twist tlsproxy --config /etc/tlsproxy/config.toml"
    ]
    assert values(service, "Service", "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert values(service, "Service", "Restart") == ["on-failure"]
    assert values(service, "Service", "StateDirectory") == ["tlsproxy"]
    assert values(service, "Service", "User") == ["tlsproxy"]
    assert values(service, "Service", "Sockets") == ["tlsproxy.socket tlsproxy-http.socket"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateDevices", "RestrictSUIDSGID"):
        assert values(service, "Service", key) == ["yes"], key
    assert values(service, "Service", "ProtectSystem") == ["strict"]
    assert values(service, "Service", "CapabilityBoundingSet") == [""]
    grace = tomllib.loads((ROOT / "config.example.toml").read_text())["server"]["shutdown_grace"]
    assert int(values(service, "Service", "TimeoutStopSec")[0]) > grace

    for unit, port, name in ((https, "443", "https"), (http, "80", "http")):
        assert values(unit, "Socket", "ListenStream") == [port]
        assert values(unit, "Socket", "FileDescriptorName") == [name]
        assert values(unit, "Socket", "Service") == ["tlsproxy.service"]
        # PartOf= would close the listening socket on every service restart, losing queued clients.
        assert not values(unit, "Unit", "PartOf")

    capability = unit_file(SYSTEMD / "capability" / "tlsproxy.service")
    assert values(capability, "Service", "AmbientCapabilities") == ["CAP_NET_BIND_SERVICE"]
    assert values(capability, "Service", "CapabilityBoundingSet") == ["CAP_NET_BIND_SERVICE"]
    assert not values(capability, "Service", "Sockets")


def test_systemd_config_points_at_the_units() -> None:
    """config.toml adopts the sockets by the units' names and proxies to gunicorn.socket's path."""
    config = tomllib.loads((SYSTEMD / "config.toml").read_text())
    server = config["server"]
    assert server["https"] == ["systemd:domain=INET6:name=https"]
    assert server["http"] == ["systemd:domain=INET6:name=http"]
    assert server["state_dir"] == "/var/lib/tlsproxy"
    gunicorn_socket = values(unit_file(SYSTEMD / "gunicorn.socket"), "Socket", "ListenStream")
    assert config["site"][0]["upstream"] == f"unix:{gunicorn_socket[0]}"
    assert values(unit_file(SYSTEMD / "gunicorn.socket"), "Socket", "SocketGroup") == ["tlsproxy"]

    checked = subprocess.run(
        [str(BIN / "tlsproxy"), "check", "--config", str(SYSTEMD / "config.toml")],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("TLSPROXY_")},
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing wrong with the units but the binaries not installed here."""
    for unit in [*SYSTEMD.glob("*.service"), *SYSTEMD.glob("*.socket")]:
        shutil.copy(unit, tmp_path / unit.name)
    shutil.copy(SYSTEMD / "capability" / "tlsproxy.service", tmp_path / "tlsproxy-capability.service")
    units = sorted(str(p) for p in tmp_path.iterdir())
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
        timeout=60,
    )
    complaints = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and not re.search(r"Command (/opt/tlsproxy|/srv/django)/\S+ is not executable", line)
    ]
    assert not complaints, "\n".join(complaints)


@dataclass
class Activated:
    process: Process
    address: str
    https: int
    http: int


def _loopback_bindable(address: str) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


@contextmanager
def socket_activated(where: Path, address: str, https: str, http: str, upstream: Path, pki: PKI) -> Iterator[Activated]:
    """`twist tlsproxy` started by systemd-socket-activate, sockets named as the .socket units name them.

    Without --accept, systemd-socket-activate binds, waits for the first connection, then execs
    tlsproxy with LISTEN_FDS=2 and LISTEN_FDNAMES=https:http (so the pid stays the same).
    """
    ports = (free_port(), free_port())
    state = where / "state"
    state.mkdir(mode=0o700)
    config = where / "config.toml"
    config.write_text(
        "[server]\n"
        f"https = {json.dumps([https])}\n"
        f"http = {json.dumps([http])}\n"
        f'state_dir = "{state}"\n\n' + _site_table(f"unix:{upstream}", pki)
    )
    bracketed = f"[{address}]" if ":" in address else address
    argv = [SOCKET_ACTIVATE, "-l", f"{bracketed}:{ports[0]}", "-l", f"{bracketed}:{ports[1]}", "--fdname=https:http"]
    argv += [str(BIN / "twist"), "tlsproxy", "--config", str(config)]
    with running(argv) as process:
        process.wait_for_line(f":{ports[1]} as 4", 10)
        yield Activated(process, address, *ports)


SOCKET_VARIANTS = {
    # What deploy/systemd ships: ListenStream=443 is a dual-stack IPv6 socket, adopted by name.
    "shipped-INET6-by-name": ("::1", None),
    # The documented IPv4-only form (ListenStream=0.0.0.0:443), adopted by index.
    "INET-by-index": ("127.0.0.1", ("systemd:domain=INET:index=0", "systemd:domain=INET:index=1")),
}


@pytest.fixture(scope="module", params=sorted(SOCKET_VARIANTS))
def activated(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: PKI
) -> Iterator[Activated]:
    if SOCKET_ACTIVATE is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    if CURL is None:
        pytest.skip("curl is not installed")
    address, endpoints = SOCKET_VARIANTS[request.param]
    if not _loopback_bindable(address):
        pytest.skip(f"cannot bind {address} here")
    if endpoints is None:
        server = tomllib.loads((SYSTEMD / "config.toml").read_text())["server"]
        endpoints = (server["https"][0], server["http"][0])
    where = tmp_path_factory.mktemp(f"activated-{request.param}")
    with unix_app(where / "gunicorn" / "gunicorn.sock") as upstream:
        with socket_activated(where, address, *endpoints, upstream, pki) as running_proxy:
            # The first connection is what makes systemd-socket-activate exec tlsproxy.
            first = curl(f"https://example.com:{running_proxy.https}/first", address=address,
                         port=running_proxy.https, ca=pki.ca)  # fmt: skip
            running_proxy.process.wait_for_line(READY, 30)
            assert first.status == 200, first
            yield running_proxy


def test_socket_activation_serves_https_on_the_passed_socket(activated: Activated, pki: PKI) -> None:
    """HTTPS works on the socket systemd bound, and the app learns the real client address."""
    reply = curl(f"https://www.example.com:{activated.https}/", address=activated.address,
                 port=activated.https, ca=pki.ca)  # fmt: skip
    assert reply.status == 200
    seen = json.loads(reply.body)
    assert seen["x-forwarded-proto"] == "https"
    assert seen["host"] == f"www.example.com:{activated.https}"
    # A socket adopted with the wrong domain= yields garbage peer addresses; this catches it.
    assert seen["x-forwarded-for"] in ("127.0.0.1", "::1", "::ffff:127.0.0.1"), seen["x-forwarded-for"]
    assert "listening on" in activated.process.output
    assert "Execing" in activated.process.output  # tlsproxy really was started by socket activation


def test_socket_activation_redirects_on_the_passed_http_socket(activated: Activated) -> None:
    """Plain HTTP on the second passed socket redirects to HTTPS on the first one's port."""
    reply = curl(f"http://example.com:{activated.http}/a/b?c=d", address=activated.address, port=activated.http)
    assert reply.status in (301, 308)
    # Behind systemd the public port is taken to be 443 (no port in the URL); the socket's own
    # port would be right too.  Either way: same host, https, same path and query.
    assert reply.headers["location"] in (
        "https://example.com/a/b?c=d",
        f"https://example.com:{activated.https}/a/b?c=d",
    )


def test_socket_activation_survives_reload(activated: Activated, pki: PKI) -> None:
    """ExecReload's SIGHUP keeps the process and its passed sockets serving."""
    before = len(activated.process.lines)
    activated.process.signal(signal.SIGHUP)
    activated.process.wait_for_line("configuration reloaded from", 30, start=before)
    assert activated.process.proc.poll() is None, activated.process.output
    for _ in range(3):
        reply = curl(f"https://example.com:{activated.https}/after-reload", address=activated.address,
                     port=activated.https, ca=pki.ca)  # fmt: skip
        assert reply.status == 200
    assert "Traceback" not in "\n".join(activated.process.lines[before:])


# ---------------------------------------------------------------------------
# Docker (no engine here: the files are parsed and the entrypoint is run as the container would)


@dataclass
class Dockerfile:
    base: str
    env: dict[str, str]
    user: str
    volumes: list[str]
    exposed: list[str]
    command: list[str]  # ENTRYPOINT + CMD, as the container runs it
    healthcheck: list[str]
    copied: list[str]
    run: list[str]  # every RUN, in order, across stages


def parse_dockerfile(path: Path) -> Dockerfile:
    """The instructions this test needs, from the Dockerfile's own text."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") and not pending:
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    env: dict[str, str] = {}
    args: dict[str, str] = {}
    out: dict[str, Any] = {"volumes": [], "exposed": [], "copied": [], "user": "root", "run": []}
    entrypoint: list[str] = []
    cmd: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        instruction, _, rest = line.strip().partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        elif instruction == "FROM":
            # The last FROM is the image that runs; ${ARG} as the ARG before it says.
            out["base"] = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], rest.split(" AS ")[0].split(" as ")[0])
        elif instruction == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
        elif instruction == "USER":
            out["user"] = rest
        elif instruction == "VOLUME":
            out["volumes"] += json.loads(rest) if rest.startswith("[") else rest.split()
        elif instruction == "EXPOSE":
            out["exposed"] += rest.split()
        elif instruction == "COPY" and not rest.startswith("--from"):
            out["copied"] += shlex.split(rest)[:-1]
        elif instruction == "RUN":
            out["run"].append(rest)
        elif instruction == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif instruction == "CMD":
            cmd = json.loads(rest)
        elif instruction == "HEALTHCHECK":
            out["healthcheck"] = json.loads(rest.split(" CMD ", 1)[1])
    return Dockerfile(env=env, command=entrypoint + cmd, **out)


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith("["):
        return json.loads(text)
    if text[:1] in ("'", '"'):
        return text[1:-1]
    return text


def mini_yaml(text: str) -> Any:
    """Block mappings, block lists, quoted and flow-list scalars: the YAML compose.example.yaml uses.

    Used only when PyYAML is not installed; good enough to read our own file, nothing more.
    """
    rows = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if " #" in raw and raw.count('"') % 2 == 0 and '"' not in raw.split(" #", 1)[1]:
            raw = raw.split(" #", 1)[0]
        rows.append((len(raw) - len(raw.lstrip()), raw.strip()))

    def block(i: int, indent: int) -> tuple[Any, int]:
        if rows[i][1].startswith("- "):
            items = []
            while i < len(rows) and rows[i][0] == indent and rows[i][1].startswith("- "):
                items.append(_scalar(rows[i][1][2:]))
                i += 1
            return items, i
        mapping: dict[str, Any] = {}
        while i < len(rows) and rows[i][0] == indent:
            key, _, rest = rows[i][1].partition(":")
            i += 1
            if rest.strip():
                mapping[key.strip()] = _scalar(rest)
            elif i < len(rows) and rows[i][0] > indent:
                mapping[key.strip()], i = block(i, rows[i][0])
            else:
                mapping[key.strip()] = None
        return mapping, i

    return block(0, 0)[0]


def load_compose(path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        return mini_yaml(path.read_text())
    return yaml.safe_load(path.read_text())


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """{container path: volume name} of a compose service."""
    return {spec.split(":")[1]: spec.split(":")[0] for spec in service.get("volumes", [])}


def test_dockerfile_is_slim_unprivileged_and_env_configured() -> None:
    """A pinned slim Python, a non-root user, the state volume, 443/80, `twist tlsproxy` and a /healthz check."""
    image = parse_dockerfile(DOCKER / "Dockerfile")
    assert re.fullmatch(r"python:3\.12\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", image.base), image.base
    assert image.user not in ("", "root", "0")
    assert image.volumes == ["/var/lib/tlsproxy"]
    assert image.env["TLSPROXY_STATE_DIR"] == "/var/lib/tlsproxy"
    assert sorted(image.exposed) == ["443", "80"]
    assert image.env["TLSPROXY_SERVER_HTTPS"] == "tcp:443"
    assert image.env["TLSPROXY_SERVER_HTTP"] == "tcp:80"
    assert image.command == ["twist", "tlsproxy"]
    assert image.env["TLSPROXY_SERVER_ADMIN"].endswith(":interface=127.0.0.1")
    assert image.healthcheck[:2] == ["python", "-c"]
    assert "/healthz" in image.healthcheck[2]


def _copied_context(image: Dockerfile, context: Path) -> None:
    for source in image.copied:
        target = context / source
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, target)


def test_dockerfile_copies_everything_the_package_is_built_from() -> None:
    """Every package pyproject.toml lists, and its readme, is inside what the Dockerfile COPYs."""
    image = parse_dockerfile(DOCKER / "Dockerfile")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = [project["project"]["readme"], "pyproject.toml", "setup.py"]
    needed += [name.replace(".", "/") for name in project["tool"]["setuptools"]["packages"]]
    for path in needed:
        assert any(path == c or path.startswith(c.rstrip("/") + "/") for c in image.copied), path
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for source in image.copied:
        assert f"!{source.rstrip('/')}" in ignore, f"{source} is COPYed but excluded from the build context"


def test_dockerfile_copies_enough_to_build_a_wheel(tmp_path: Path) -> None:
    """The files the Dockerfile COPYs build a wheel holding the package and its twist plugin."""
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        # pyproject.toml's `license = "MIT"` (PEP 639) needs setuptools 77+; pip's isolated build in
        # the image fetches a current one, but building offline here can only use the venv's own.
        pytest.skip(f"the venv's setuptools {setuptools.__version__} predates PEP 639 license strings (77+)")
    image = parse_dockerfile(DOCKER / "Dockerfile")
    context = tmp_path / "context"
    _copied_context(image, context)
    built = subprocess.run(
        [str(BIN / "python"), "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "wheels"), str(context)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    import zipfile

    (wheel,) = (tmp_path / "wheels").glob("tlsproxy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/tlsproxy_plugin.py" in names
    assert "tlsproxy/tap.py" in names
    assert any(re.fullmatch(r"tlsproxy/_speedups\..*\.so", name) for name in names), "no C accelerator built"


def test_dockerfile_builds_the_accelerator_and_refuses_an_image_without_it() -> None:
    """A compiler where the wheels are built, and the image build fails if tlsproxy._speedups is missing."""
    image = parse_dockerfile(DOCKER / "Dockerfile")
    assert any("gcc" in run and "libc6-dev" in run for run in image.run)
    (install,) = [run for run in image.run if "pip install" in run]
    assert install.index("pip install") < install.index('python -c "import tlsproxy._speedups"')


def test_dockerfile_installs_what_ci_tested() -> None:
    """The image's dependencies are pinned by the constraints.txt that CI installs from."""
    image = parse_dockerfile(DOCKER / "Dockerfile")
    assert "constraints.txt" in image.copied
    (wheel,) = [run for run in image.run if "pip wheel" in run]
    assert "--constraint /src/constraints.txt" in wheel
    assert "-c constraints.txt" in (ROOT / "scripts" / "test.sh").read_text()


def test_compose_shares_the_gunicorn_socket_and_configures_by_environment() -> None:
    """compose: the app and tlsproxy mount one socket volume; tlsproxy's env is a complete one-site config."""
    compose = load_compose(DOCKER / "compose.example.yaml")
    app, proxy = compose["services"]["app"], compose["services"]["tlsproxy"]
    env = proxy["environment"]
    assert set(env) >= {"TLSPROXY_HOSTS", "TLSPROXY_UPSTREAM", "TLSPROXY_ACME_EMAIL", "TLSPROXY_ACME_AGREE_TOS",
                        "TLSPROXY_STATE_DIR"}  # fmt: skip
    assert env["TLSPROXY_UPSTREAM"] == "unix:/run/gunicorn/gunicorn.sock"
    assert str(env["TLSPROXY_ACME_AGREE_TOS"]).lower() == "true"
    socket_dir = "/run/gunicorn"
    assert _mounts(app)[socket_dir] == _mounts(proxy)[socket_dir]
    assert f"unix:{socket_dir}/gunicorn.sock" in " ".join(app["command"])
    assert _mounts(proxy)[env["TLSPROXY_STATE_DIR"]] in compose["volumes"]
    assert proxy["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    # docs/deployment.md copies the file before use: the build context is relative to where it lands.
    docs = (ROOT / "docs" / "deployment.md").read_text()
    (copied_to,) = re.findall(r"cp deploy/docker/compose\.example\.yaml (\S+)", docs)
    context = (ROOT / copied_to).parent / proxy["build"]["context"]
    assert context.resolve() == ROOT
    assert (context / proxy["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"


@dataclass
class Container:
    process: Process
    env: dict[str, str]
    https: int
    http: int
    admin: int
    pki: PKI


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[Container]:
    """The Dockerfile's entrypoint, run with the image's ENV plus the compose service's environment.

    Only what cannot be the same outside a container is changed: loopback ports instead of 443/80/9000,
    paths under a temporary directory, and a files certificate because ACME would need a real CA.
    """
    if CURL is None:
        pytest.skip("curl is not installed")
    image = parse_dockerfile(DOCKER / "Dockerfile")
    compose = load_compose(DOCKER / "compose.example.yaml")
    where = tmp_path_factory.mktemp("container")
    env = {**image.env, **{k: str(v) for k, v in compose["services"]["tlsproxy"]["environment"].items()}}
    upstream_path = env["TLSPROXY_UPSTREAM"].removeprefix("unix:")
    ports = free_port(), free_port(), free_port()
    (where / "state").mkdir(mode=0o700)
    env.update(
        TLSPROXY_SERVER_HTTPS=f"tcp:{ports[0]}:interface=127.0.0.1",
        TLSPROXY_SERVER_HTTP=f"tcp:{ports[1]}:interface=127.0.0.1",
        TLSPROXY_SERVER_ADMIN=f"tcp:{ports[2]}:interface=127.0.0.1",
        TLSPROXY_STATE_DIR=str(where / "state"),
        TLSPROXY_UPSTREAM=f"unix:{where}{upstream_path}",
        TLSPROXY_SITE_TLS="files",
        TLSPROXY_SITE_CERT=str(pki.cert),
        TLSPROXY_SITE_KEY=str(pki.key),
    )
    argv = [str(BIN / image.command[0]), *image.command[1:]]
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("TLSPROXY_")]:
            mp.delenv(name)
        with unix_app(Path(f"{where}{upstream_path}")), running(argv, env=env) as process:
            process.wait_for_line(READY, 30)
            yield Container(process, env, *ports, pki)


def test_container_entrypoint_serves_https_from_environment_only(container: Container) -> None:
    """`twist tlsproxy` with no file, only the image's and compose's environment, serves the compose hosts."""
    for host in SITE_HOSTS:
        reply = curl(f"https://{host}:{container.https}/", address="127.0.0.1", port=container.https,
                     ca=container.pki.ca)  # fmt: skip
        assert reply.status == 200
        assert json.loads(reply.body)["x-forwarded-proto"] == "https"
        assert "strict-transport-security" in reply.headers
    redirect = curl(f"http://example.com:{container.http}/x", address="127.0.0.1", port=container.http)
    assert redirect.headers["location"] == f"https://example.com:{container.https}/x"
    assert "--config" not in " ".join(container.process.argv)


def test_container_healthcheck_passes(container: Container) -> None:
    """The image's HEALTHCHECK command, with the container's environment, exits 0 against the admin endpoint."""
    check = parse_dockerfile(DOCKER / "Dockerfile").healthcheck
    argv = [str(BIN / check[0]), *check[1:]]
    done = subprocess.run(argv, env={**os.environ, **container.env}, capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr


def test_container_healthcheck_fails_when_nothing_answers(container: Container) -> None:
    """The HEALTHCHECK command exits non-zero when the admin port is closed: it can report unhealthy."""
    check = parse_dockerfile(DOCKER / "Dockerfile").healthcheck
    argv = [str(BIN / check[0]), *check[1:]]
    env = {**os.environ, **container.env, "TLSPROXY_SERVER_ADMIN": f"tcp:{free_port()}:interface=127.0.0.1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10)
    assert done.returncode != 0

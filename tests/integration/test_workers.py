"""`[server] workers = N` against the real `twist tlsproxy`: a supervisor and N worker processes."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from tests.integration import test_acme_e2e as e2e
from tests.integration.pebble import Pebble, pebble, requires_pebble  # noqa: F401 (pebble is a fixture)
from tests.integration.procs import BIN, Process, free_port, running, tlsproxy
from tlsproxy.logs import FLUSH_SECONDS

pytestmark = pytest.mark.integration
BACKEND = str(Path(__file__).with_name("backend.py"))
WORKERS = 2


def write_leaf(ca: trustme.CA, where: Path, name: str) -> int:
    """A leaf for localhost in where/name.pem and .key; its serial number."""
    leaf = ca.issue_cert(
        "localhost",
        not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1),
        not_after=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=90),
    )
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    (where / f"{name}.pem").write_bytes(chain)
    (where / f"{name}.key").write_bytes(leaf.private_key_pem.bytes())
    return x509.load_pem_x509_certificate(chain).serial_number


def config_text(where: Path, https: int, admin: int, upstream: int, max_age: int, workers: int = WORKERS) -> str:
    return f"""
[server]
https = ["tcp:{https}:interface=127.0.0.1"]
http = []
admin = "tcp:{admin}:interface=127.0.0.1"
state_dir = "{where}/state"
log_format = "json"
workers = {workers}
shutdown_grace = 5

[tls]
ticket_key_rotation = 3600

[[site]]
hosts = ["localhost"]
upstream = "http://127.0.0.1:{upstream}"
tls = "files"
cert = "{where}/site.pem"
key = "{where}/site.key"
hsts = {{ max_age = {max_age} }}
"""


@dataclass
class Running:
    where: Path
    https: int
    admin: int
    upstream: int
    config: Path
    process: Process
    ca: trustme.CA

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def get(self, path: str = "/") -> tuple[int, dict[str, str], bytes]:
        """One request on a new connection (no session resumed)."""
        with socket.create_connection(("127.0.0.1", self.https), timeout=10) as raw:
            with self.context().wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), headers, body

    def records(self, start: int = 0) -> list[dict]:
        out = []
        for line in self.process.lines[start:]:
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def served_by(self, start: int) -> list[int]:
        """The worker of each access-log line since output line ``start``."""
        return [r["worker"] for r in self.records(start) if r.get("logger") == "tlsproxy.access"]

    def worker_pids(self) -> dict[int, int]:
        """The pid now in each worker slot, from the supervisor's "worker N started (pid P)" lines."""
        pids = {}
        for record in self.records():
            m = re.fullmatch(r"worker (\d+) started \(pid (\d+)\)", record.get("message", ""))
            if m:
                pids[int(m.group(1))] = int(m.group(2))
        return pids

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=10) as answer:
            return answer.read().decode()


def counter(text: str, name: str) -> float:
    """The sum of every sample of ``name`` in a Prometheus text."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def gone(pid: int) -> bool:
    """No such process, or only its zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def backend() -> Iterator[int]:
    port = free_port()
    with running([sys.executable, BACKEND, str(port)]) as process:
        process.wait_for_line("backend ready")
        yield port


def start(where: Path, backend: int, workers: int = WORKERS) -> Iterator[Running]:
    ca = trustme.CA()
    write_leaf(ca, where, "site")
    (where / "state").mkdir(mode=0o700, exist_ok=True)
    https, admin = free_port(), free_port()
    config = where / "config.toml"
    config.write_text(config_text(where, https, admin, backend, 1000, workers))
    with tlsproxy(config) as process:
        yield Running(where, https, admin, backend, config, process, ca)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, backend: int) -> Iterator[Running]:
    """A supervisor with two workers in front of the small backend; JSON logs name the worker of each line."""
    yield from start(tmp_path_factory.mktemp("workers"), backend)


def requests_until_every_worker(proxy: Running, check: object = None, at_least: int = 10, most: int = 200) -> set[int]:
    """Requests on new connections until every worker answered some (``check`` each answer); who answered."""
    start = len(proxy.process.lines)
    for done in range(1, most + 1):
        status, headers, body = proxy.get()
        assert status == 200, (status, body)
        if callable(check):
            check(headers)
        time.sleep(0.01)  # the access line is written after the answer
        if done >= at_least and set(proxy.served_by(start)) == set(range(WORKERS)):
            break
    return set(proxy.served_by(start))


def test_connections_land_on_every_worker(proxy: Running) -> None:
    """New connections are accepted by every worker, and each worker's CPU time grows under load."""
    pids = proxy.worker_pids()
    assert sorted(pids) == list(range(WORKERS)), pids
    before = {index: cpu_seconds(pid) for index, pid in pids.items()}
    served = requests_until_every_worker(proxy, at_least=60)
    assert served == set(range(WORKERS)), served
    after = {index: cpu_seconds(pid) for index, pid in pids.items()}
    assert all(after[index] > before[index] for index in pids), (before, after)


def test_every_line_names_its_worker(proxy: Running) -> None:
    """Worker log lines carry the worker index and pid, in JSON; the supervisor's carry none."""
    records = proxy.records()
    pids = proxy.worker_pids()
    ready = [r for r in records if re.fullmatch(r"worker \d+ ready", r.get("message", ""))]
    assert {(r["worker"], r["pid"]) for r in ready} >= {(i, pids[i]) for i in range(WORKERS)}
    assert any(r["message"] == "tlsproxy: ready" and "worker" not in r for r in records)


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_sessions_resume_on_any_worker(proxy: Running, version: str, tmp_path: Path) -> None:
    """A session made on one worker resumes 16 of 16 times, whichever worker accepts the reconnect."""
    (tmp_path / "ca.pem").write_bytes(proxy.ca.cert_pem.bytes())
    moved_before = counter(proxy.metrics(), "tlsproxy_tls_handed_off_total")
    session = tmp_path / "session.pem"

    def s_client(*args: str) -> str:
        result = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.https}", "-servername", "localhost", version,
             "-CAfile", str(tmp_path / "ca.pem"), "-ign_eof", *args],
            input="GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        return result.stdout

    first = s_client("-sess_out", str(session))
    assert "New, TLS" in first and "HTTP/1.1 200" in first, first
    # Access lines go out in batches (logs.FLUSH_SECONDS): let the earlier ones out first,
    # so the lines counted from here are the reconnects' and only theirs.
    e2e.wait_until(lambda: bool(proxy.served_by(0)), 5, "the first request's access line")
    time.sleep(3 * FLUSH_SECONDS)
    start = len(proxy.process.lines)
    reused = sum("Reused, TLS" in s_client("-sess_in", str(session)) for _ in range(16))
    assert reused == 16
    e2e.wait_until(lambda: len(proxy.served_by(start)) >= 16, 5, "the reconnects' access lines")
    # Whichever worker accepted a reconnect, the one that made the session served it...
    assert len(proxy.served_by(start)) == 16
    assert len(set(proxy.served_by(start))) == 1
    # ...and some reconnects were accepted by another worker, which passed them on.
    assert counter(proxy.metrics(), "tlsproxy_tls_handed_off_total") > moved_before


def test_metrics_count_every_worker(proxy: Running) -> None:
    """Supervisor: /metrics sums requests, not upstream_up, keeps process series apart; /readyz lists upstreams."""
    before = counter(proxy.metrics(), "tlsproxy_requests_total")
    start = len(proxy.process.lines)
    served = requests_until_every_worker(proxy, at_least=20)
    assert served == set(range(WORKERS))
    text = proxy.metrics()
    counted = counter(text, "tlsproxy_requests_total") - before
    deadline = time.monotonic() + 5
    while len(proxy.served_by(start)) < counted and time.monotonic() < deadline:
        time.sleep(0.05)  # access lines go out in batches, every 0.1 s (tlsproxy/logs.py)
    assert counted == len(proxy.served_by(start))
    for index in range(WORKERS):
        assert f'process_resident_memory_bytes{{worker="{index}"}}' in text
    where = f'route="",site="localhost",upstream="http://127.0.0.1:{proxy.upstream}"'
    assert f"tlsproxy_upstream_up{{{where}}} 1.0" in text
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin}/readyz", timeout=10) as answer:
        status, body = answer.status, answer.read().decode()
    assert (status, body.splitlines()[0]) == (200, "ready")
    assert f"upstream http://127.0.0.1:{proxy.upstream} (site localhost): up, " in body


def test_sighup_reaches_every_worker_and_a_bad_config_none(proxy: Running) -> None:
    """A config that cannot run is refused by the supervisor (all keep the old one); a good one reaches all."""
    good = proxy.config.read_text()
    start = len(proxy.process.lines)
    proxy.config.write_text(good.replace('cert = "', 'cert = "/nonexistent'))
    proxy.process.signal(signal.SIGHUP)
    proxy.process.wait_for_line("reload refused, every worker keeps the running configuration", start=start)
    requests_until_every_worker(proxy, lambda h: h.get("strict-transport-security") == "max-age=1000")

    start = len(proxy.process.lines)
    proxy.config.write_text(good.replace("max_age = 1000", "max_age = 777"))
    proxy.process.signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while sum("configuration reloaded" in line for line in proxy.process.lines[start:]) < WORKERS:
        assert time.monotonic() < deadline, proxy.process.output
        time.sleep(0.1)

    def new_value(headers: dict[str, str]) -> None:
        assert headers.get("strict-transport-security") == "max-age=777", headers

    assert requests_until_every_worker(proxy, new_value) == set(range(WORKERS))
    proxy.config.write_text(good)


def test_renamed_certificate_file_served_by_every_worker_within_5s(proxy: Running) -> None:
    """A `files` certificate replaced by rename is what every worker serves 5 s later."""
    ca = proxy.ca
    serial = write_leaf(ca, proxy.where, "next")
    os.rename(proxy.where / "next.key", proxy.where / "site.key")
    os.rename(proxy.where / "next.pem", proxy.where / "site.pem")
    time.sleep(5)
    start = len(proxy.process.lines)
    seen = set()
    for _ in range(40):
        with socket.create_connection(("127.0.0.1", proxy.https), timeout=10) as raw:
            with proxy.context().wrap_socket(raw, server_hostname="localhost") as tls:
                der = tls.getpeercert(binary_form=True)
                tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                while tls.recv(65536):
                    pass
        assert der is not None
        seen.add(x509.load_der_x509_certificate(der).serial_number)
        time.sleep(0.01)
    assert seen == {serial}
    assert set(proxy.served_by(start)) == set(range(WORKERS))


def test_killed_worker_is_replaced_and_service_goes_on(proxy: Running) -> None:
    """kill -9 of a worker: requests keep succeeding, the supervisor says why it died and starts another."""
    victim = proxy.worker_pids()[1]
    start = len(proxy.process.lines)
    os.kill(victim, signal.SIGKILL)
    for _ in range(20):
        assert proxy.get()[0] == 200
    proxy.process.wait_for_line(f"worker 1 (pid {victim}) was killed by SIGKILL", start=start)
    proxy.process.wait_for_line("worker 1 started (pid", start=start)
    proxy.process.wait_for_line("worker 1 ready", start=start)
    assert proxy.worker_pids()[1] != victim
    assert requests_until_every_worker(proxy) == set(range(WORKERS))


def test_sigterm_drains_every_worker_and_exits_0(tmp_path: Path, backend: int) -> None:
    """SIGTERM to the supervisor alone: every worker stops, then the supervisor exits 0."""
    for running_proxy in start(tmp_path, backend, workers=3):
        pids = list(running_proxy.worker_pids().values())
        assert len(pids) == 3
        os.kill(running_proxy.process.proc.pid, signal.SIGTERM)  # not the group: the supervisor does it
        assert running_proxy.process.proc.wait(30) == 0, running_proxy.process.output
        assert all(gone(pid) for pid in pids)
        assert "stopped: no worker left" in running_proxy.process.output


def test_workers_leave_when_the_supervisor_is_killed(tmp_path: Path, backend: int) -> None:
    """kill -9 of the supervisor leaves no orphan: the workers notice and exit."""
    for running_proxy in start(tmp_path, backend):
        pids = list(running_proxy.worker_pids().values())
        os.kill(running_proxy.process.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while not all(gone(pid) for pid in pids):
            assert time.monotonic() < deadline, "a worker outlived its supervisor"
            time.sleep(0.1)


@requires_pebble
@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_pebble_one_order_served_by_every_worker(pebble: Pebble, backend: int, tmp_path: Path, challenge: str) -> None:
    """workers = 3: one order, whichever worker Pebble reaches answers its challenge, and every worker serves it."""
    hosts = e2e.fresh_hosts()
    https_port = free_port() if challenge == "http-01" else pebble.tls_port
    config = e2e.write_config(
        tmp_path / "tlsproxy.toml",
        pebble,
        hosts,
        f"http://127.0.0.1:{backend}",
        challenges=(challenge,),
        http=challenge == "http-01",
        https_port=https_port,
    )
    config.write_text(config.read_text().replace("[server]\n", '[server]\nworkers = 3\nlog_format = "json"\n', 1))
    roots = pebble.roots_pem()
    orders = e2e.orders_seen(pebble)
    with tlsproxy(config) as process:
        leaf = e2e.wait_for_certificate(https_port, hosts, roots, deadline=90)
        running_proxy = Running(tmp_path, https_port, 0, backend, config, process, trustme.CA())
        first_served = time.monotonic()
        start = len(process.lines)
        context = ssl.create_default_context(cadata=roots.decode())
        last_failure = None
        for _ in range(300):
            connection = e2e.Connection(hosts[0], https_port, context)
            try:
                assert connection.get()[0] == 200
                assert connection.peer_serial() == leaf.serial_number
            except ssl.SSLError:  # a worker that has not read the store yet
                last_failure = time.monotonic()
            finally:
                connection.close()
            time.sleep(0.01)
            if set(running_proxy.served_by(start)) == {0, 1, 2}:
                break
        # The other workers serve it within a few seconds of the one that ordered.
        assert last_failure is None or last_failure - first_served < 3
        assert set(running_proxy.served_by(start)) == {0, 1, 2}
        assert e2e.orders_seen(pebble) - orders == 1, "\n".join(
            [*process.lines, *(line for line in pebble.process.lines if "order" in line.lower())]
        )
        if challenge == "http-01":  # which worker Pebble reached is chance; one of them answered
            answered = [r for r in running_proxy.records() if r.get("message", "").startswith("answered HTTP-01")]
            assert answered and {r["worker"] for r in answered} <= {0, 1, 2}
        # Only worker 0 orders; the others found the certificate in the store.
        ordering = {r.get("worker") for r in running_proxy.records() if r.get("message", "").startswith("checking the")}
        assert ordering == {0}
        # Pebble was told to look once workers 1 and 2 said they serve the answers, not after a timeout.
        messages = [r.get("message", "") for r in running_proxy.records()]
        assert not [m for m in messages if "did not say it serves" in m]
        assert [m for m in messages if m.startswith("every worker serves worker 0's challenge answers")]


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed")
def test_systemd_sockets_are_shared_by_the_workers(tmp_path: Path, backend: int) -> None:
    """Under socket activation the supervisor adopts systemd's socket and its workers accept on it."""
    ca = trustme.CA()
    write_leaf(ca, tmp_path, "site")
    (tmp_path / "state").mkdir(mode=0o700)
    port = free_port()
    config = tmp_path / "config.toml"
    text = config_text(tmp_path, port, free_port(), backend, 1000).replace(
        f'https = ["tcp:{port}:interface=127.0.0.1"]', 'https = ["systemd:domain=INET:name=https"]'
    )
    config.write_text(text.replace('admin = "', '# admin = "'))
    argv = [shutil.which("systemd-socket-activate") or "", "-l", f"127.0.0.1:{port}", "--fdname=https"]
    with running([*argv, str(BIN / "twist"), "tlsproxy", "--config", str(config)]) as process:
        process.wait_for_line(f":{port} as 3", 10)
        activated = Running(tmp_path, port, 0, backend, config, process, ca)
        deadline = time.monotonic() + 30
        while True:  # the first connection makes systemd-socket-activate exec tlsproxy
            try:
                assert activated.get()[0] == 200
                break
            except (ConnectionError, ssl.SSLError, OSError):
                assert time.monotonic() < deadline, process.output
                time.sleep(0.2)
        process.wait_for_line("tlsproxy: ready", 30)
        assert "Execing" in process.output
        assert requests_until_every_worker(activated) == set(range(WORKERS))


def test_port_in_use_exits_1_with_no_worker_started(tmp_path: Path, backend: int) -> None:
    """A listener the supervisor cannot bind: one line saying why, no worker, exit status 1."""
    ca = trustme.CA()
    write_leaf(ca, tmp_path, "site")
    (tmp_path / "state").mkdir(mode=0o700)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "config.toml"
        config.write_text(config_text(tmp_path, port, free_port(), backend, 1000))
        with running([str(BIN / "twist"), "tlsproxy", "--config", str(config)]) as process:
            assert process.proc.wait(30) == 1
            process._reader.join(5)
            assert "another process listens there" in process.output
            assert "worker 0 started" not in process.output


def test_sighup_with_more_workers_replaces_them_all(tmp_path: Path, backend: int) -> None:
    """SIGHUP from 2 to 3 workers: three new workers serve, the two old ones exit, no request fails."""
    for running_proxy in start(tmp_path, backend):
        old = set(running_proxy.worker_pids().values())
        start_line = len(running_proxy.process.lines)
        running_proxy.config.write_text(running_proxy.config.read_text().replace("workers = 2", "workers = 3"))
        running_proxy.process.signal(signal.SIGHUP)
        for _ in range(10):
            assert running_proxy.get()[0] == 200
        running_proxy.process.wait_for_line("configuration reloaded: 3 new workers serve it", start=start_line)
        pids = running_proxy.worker_pids()
        assert sorted(pids) == [0, 1, 2] and not old & set(pids.values())
        deadline = time.monotonic() + 20
        while not all(gone(pid) for pid in old):
            assert time.monotonic() < deadline, "an old worker did not exit"
            time.sleep(0.1)
        start_line = len(running_proxy.process.lines)
        for _ in range(200):
            assert running_proxy.get()[0] == 200
            time.sleep(0.01)
            if set(running_proxy.served_by(start_line)) == {0, 1, 2}:
                break
        assert set(running_proxy.served_by(start_line)) == {0, 1, 2}
        assert "replacing it" not in running_proxy.process.output  # no new worker died


def test_sigusr1_to_the_supervisor_reopens_every_workers_access_log(tmp_path: Path, backend: int) -> None:
    """Both workers append to the access log file; after a rename, SIGUSR1 to the supervisor makes both reopen it."""
    for running_proxy in start(tmp_path, backend):
        log_file = tmp_path / "access.log"
        text = running_proxy.config.read_text().replace("[server]\n", f'[server]\naccess_log_file = "{log_file}"\n', 1)
        running_proxy.config.write_text(text)
        start_line = len(running_proxy.process.lines)
        running_proxy.process.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while sum("configuration reloaded" in line for line in running_proxy.process.lines[start_line:]) < WORKERS:
            assert time.monotonic() < deadline, running_proxy.process.output
            time.sleep(0.1)
        requests_until_every_worker(running_proxy)
        deadline = time.monotonic() + 10
        while not log_file.exists():  # written about once a second
            assert time.monotonic() < deadline, "no access log file"
            time.sleep(0.2)
        os.rename(log_file, tmp_path / "access.log.1")
        os.kill(running_proxy.process.proc.pid, signal.SIGUSR1)  # the supervisor alone
        time.sleep(1)
        start_line = len(running_proxy.process.lines)
        assert requests_until_every_worker(running_proxy) == set(range(WORKERS))
        made = len(running_proxy.served_by(start_line))
        deadline = time.monotonic() + 10
        while not log_file.exists() or len(log_file.read_text().splitlines()) < made:
            assert time.monotonic() < deadline, "the workers did not reopen the access log file"
            time.sleep(0.2)

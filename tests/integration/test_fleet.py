"""Issue 14: a fleet of real `twist tlsproxy` instances sharing one real redis-server, against Pebble.

Pebble validates on the ports of ONE instance (index 0: its https listener is
Pebble's tlsPort, its http listener Pebble's httpPort); the others listen on
ports of their own and have state_dirs of their own.  Whichever instance
orders, instance 0 must answer the challenges: it reads them from Redis.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.integration.pebble import HAVE_PEBBLE, Pebble, requires_pebble, run_pebble, served_certificate
from tests.integration.procs import BIN, Process, free_port, running, wait_for_port
from tests.redisserver import RedisServer, running_redis

pytestmark = [pytest.mark.integration, requires_pebble]

TLSPROXY = str(BIN / "tlsproxy")
NO_REUSE = {"PEBBLE_AUTHZREUSE": "0"}


@pytest.fixture(scope="module")
def pebble() -> Iterator[Pebble]:
    if not HAVE_PEBBLE:
        pytest.skip("pebble / pebble-challtestsrv not installed (apt-get install pebble)")
    with run_pebble(env=NO_REUSE) as p:
        yield p


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("backend")
    (root / "index.html").write_text("hello from the backend\n")
    port = free_port()
    argv = [str(BIN / "python"), "-m", "http.server", "-b", "127.0.0.1", "-d", str(root), str(port)]
    with running(argv):
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


PASSWORD = "n0t-in-any-log"


@pytest.fixture
def redis_with_password() -> Iterator[RedisServer]:
    with running_redis(password=PASSWORD) as server:
        yield server


@dataclass
class Member:
    """One instance's configuration: its ports and state_dir."""

    config: Path
    state_dir: Path
    https_port: int
    http_port: int
    admin_port: int
    prefix: str


def fleet_members(
    tmp_path: Path, p: Pebble, redis: RedisServer, hosts: tuple[str, ...], upstream: str, n: int, lease: float = 30
) -> list[Member]:
    prefix = f"fleet-{uuid.uuid4().hex[:8]}:"
    members = []
    for i in range(n):
        https_port = p.tls_port if i == 0 else free_port()
        http_port = p.http_port if i == 0 else free_port()
        admin_port = free_port()
        state = tmp_path / f"state{i}"
        config = tmp_path / f"tlsproxy{i}.toml"
        config.write_text(
            textwrap.dedent(
                f"""
                [server]
                https = ["tcp:{https_port}:interface=127.0.0.1"]
                http = ["tcp:{http_port}:interface=127.0.0.1"]
                admin = "tcp:{admin_port}:interface=127.0.0.1"
                state_dir = "{state}"
                [acme]
                directory = "{p.directory_url}"
                ca_bundle = "{p.ca_bundle}"
                agree_tos = true
                [store]
                url = "{redis.url}"
                prefix = "{prefix}"
                lock_lease = {lease}
                [[site]]
                hosts = [{", ".join(f'"{h}"' for h in hosts)}]
                upstream = "{upstream}"
                hsts = {{ max_age = 0 }}
                """
            )
        )
        members.append(Member(config, state, https_port, http_port, admin_port, prefix))
    return members


def fresh_hosts() -> tuple[str, str]:
    base = f"f{uuid.uuid4().hex[:10]}.test"
    return base, f"www.{base}"


def orders_seen(p: Pebble) -> int:
    # Orders Pebble created: a POST to /order-plz is sent again after a badNonce (Pebble refuses
    # 5% of nonces on purpose), so the requests overcount.
    return p.process.output.count("Added order ")


def served_serial(port: int, host: str, roots: bytes) -> int | None:
    """The serial of the certificate the instance on ``port`` serves for ``host``, verified; None if none."""
    try:
        return served_certificate(port, host, roots).serial_number
    except OSError:  # ssl.SSLError too
        return None


def wait_until(predicate: Callable[[], object], deadline: float, what: str, procs: Sequence[Process] = ()) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            said = "\n".join(p.output for p in procs)
            raise TimeoutError(f"{what}: not within {deadline}s\n{said}")
        time.sleep(0.1)


def start_fleet(stack: ExitStack, members: list[Member]) -> list[Process]:
    """Instance 0 (the one Pebble reaches) up first, then the others all at once.

    Pebble validates on instance 0's ports only, as a load balancer that knows only it
    would; an order placed before instance 0 listens fails its challenges and is retried
    later, which is right for the product but not what these tests are about.
    """
    first = start(members[0])
    stack.callback(first.stop)
    first.wait_for_line("tlsproxy: ready", 30)
    rest = [start(m) for m in members[1:]]
    for proc in rest:
        stack.callback(proc.stop)
    for proc in rest:
        proc.wait_for_line("tlsproxy: ready", 30)
    return [first, *rest]


def start(member: Member, env: dict[str, str] | None = None) -> Process:
    """`twist tlsproxy` for ``member``, not yet waited for (several start at once)."""
    return Process([str(BIN / "twist"), "tlsproxy", "--config", str(member.config)], env=env)


def readyz(member: Member) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{member.admin_port}/readyz", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_one_order_renewal_everywhere_restart_with_empty_state(
    pebble: Pebble, backend: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Three instances order once; a forced renewal via one reaches all within 20 s; an emptied one orders nothing."""
    hosts = fresh_hosts()
    members = fleet_members(tmp_path, pebble, redis_server, hosts, backend, 3)
    roots = pebble.roots_pem()
    before = orders_seen(pebble)
    with ExitStack() as stack:
        procs = start_fleet(stack, members)
        wait_until(
            lambda: all(served_serial(m.https_port, hosts[0], roots) for m in members),
            60,
            "a certificate everywhere",
            procs,
        )
        serials = {served_serial(m.https_port, host, roots) for m in members for host in hosts}
        assert len(serials) == 1, serials
        assert orders_seen(pebble) - before == 1, "\n".join(p.output for p in procs)
        ordering = [p for p in procs if f"ordering a certificate for {hosts[0]}" in p.output]
        assert len(ordering) == 1

        # A forced renewal through the command of instance 1; Pebble validates through instance 0.
        (first,) = serials
        renewed = subprocess.run(
            [TLSPROXY, "renew", hosts[0], "--force", "--config", str(members[1].config)],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert renewed.returncode == 0, renewed.stdout + renewed.stderr
        stored_at = time.monotonic()
        wait_until(
            lambda: all(served_serial(m.https_port, hosts[0], roots) not in (None, first) for m in members),
            20,
            "the renewed certificate on all three",
            procs,
        )
        assert time.monotonic() - stored_at < 20
        second = served_serial(members[2].https_port, hosts[0], roots)
        assert f"{second:x}" in renewed.stdout
        assert orders_seen(pebble) - before == 2

        # Instance 2 restarted with an empty state_dir: it serves the shared certificate, orders nothing.
        procs[2].stop()
        shutil.rmtree(members[2].state_dir)
        again = start(members[2])
        stack.callback(again.stop)
        again.wait_for_line("tlsproxy: ready", 30)
        wait_until(
            lambda: served_serial(members[2].https_port, hosts[0], roots) == second, 20, "the shared cert", [again]
        )
        time.sleep(2)  # a poll and a renewal check later: still nothing ordered
        assert "ordering a certificate" not in again.output
        assert orders_seen(pebble) - before == 2


def test_redis_down_every_instance_keeps_serving(
    pebble: Pebble, backend: str, redis_with_password: RedisServer, tmp_path: Path
) -> None:
    """Redis stopped: all keep serving; one restarted meanwhile serves its last certificate; no password said."""
    redis_server = redis_with_password
    hosts = fresh_hosts()
    members = fleet_members(tmp_path, pebble, redis_server, hosts, backend, 2)
    roots = pebble.roots_pem()
    with ExitStack() as stack:
        procs = start_fleet(stack, members)
        wait_until(
            lambda: all(served_serial(m.https_port, hosts[0], roots) for m in members), 60, "certificates", procs
        )
        serial = served_serial(members[1].https_port, hosts[0], roots)
        status, body = readyz(members[1])
        assert (status, body.splitlines()[0]) == (200, "ready")
        assert "note:" not in body

        redis_server.stop()
        procs[1].stop()
        again = start(members[1])
        stack.callback(again.stop)
        again.wait_for_line("tlsproxy: ready", 30)
        assert served_serial(members[1].https_port, hosts[0], roots) == serial
        assert served_serial(members[0].https_port, hosts[0], roots) == serial
        wait_until(
            lambda: "unreachable" in readyz(members[1])[1], 15, "/readyz saying the store is unreachable", [again]
        )
        status, body = readyz(members[1])
        assert status == 200 and "note: store redis" in body, body
        certs = subprocess.run(
            [TLSPROXY, "certs", "--config", str(members[0].config)],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert certs.returncode == 1 and "store: UNREACHABLE" in certs.stdout, certs.stdout + certs.stderr
        assert f"{serial:x}" in certs.stdout
        assert "Traceback" not in again.output + procs[0].output
        time.sleep(3)  # polls and renewal checks with Redis down
        for member in members:
            assert served_serial(member.https_port, hosts[0], roots) == serial
        said = "".join(p.output for p in [*procs, again]) + body + certs.stdout + certs.stderr
        assert "redis://:***@127.0.0.1" in said
        assert PASSWORD not in said


def test_lock_holder_killed_mid_order_another_takes_over(
    pebble: Pebble, backend: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The holder of an order's lock killed mid-order: another takes over once the lease ends, and completes."""
    hosts = fresh_hosts()
    lease = 4.0
    validator, holder = fleet_members(tmp_path, pebble, redis_server, hosts, backend, 2, lease=lease)
    roots = pebble.roots_pem()
    before = orders_seen(pebble)
    # An instance that is up but never says it serves the answers: the holder waits for it
    # (up to its patience) with the lock held, and is killed while it waits.
    redis.Redis.from_url(redis_server.url).set(f"{holder.prefix}live:silent-peer", b"1", px=60_000)
    with ExitStack() as stack:
        doomed = start(holder)
        stack.callback(doomed.stop)
        doomed.wait_for_line(f"ordering a certificate for {hosts[0]}", 60)
        wait_until(lambda: orders_seen(pebble) > before, 30, "the doomed instance's order at Pebble", [doomed])
        doomed.signal(signal.SIGKILL)  # while it waits for the fleet to read its answers, lock held
        killed_at = time.monotonic()
        assert "stored" not in doomed.output
        left = redis.Redis.from_url(redis_server.url).pttl(f"{holder.prefix}lock:{hosts[0]}")
        assert left > 0, "the dead holder's lock is not there"
        survivor = start(validator)
        stack.callback(survivor.stop)
        survivor.wait_for_line("tlsproxy: ready", 30)
        survivor.wait_for_line(f"ordering a certificate for {hosts[0]}", 60)
        took_over = time.monotonic() - killed_at
        wait_until(
            lambda: served_serial(validator.https_port, hosts[0], roots), 60, "the survivor's certificate", [survivor]
        )
        assert took_over >= left / 1000 - 0.5, (took_over, left)  # not before the dead holder's lease ran out
        assert orders_seen(pebble) - before == 2


def test_compose_fleet_example_is_one_fleet(tmp_path: Path) -> None:
    """compose.fleet.example.yaml: Redis, two instances with one store URL and a volume each, haproxy to both."""
    from tests.integration.test_deploy import DOCKER, _mounts, load_compose
    from tlsproxy.config import load

    compose = load_compose(DOCKER / "compose.fleet.example.yaml")
    services = compose["services"]
    assert "redis" in services and "haproxy" in services
    members = [services["tlsproxy-1"], services["tlsproxy-2"]]
    urls = {m["environment"]["TLSPROXY_STORE_URL"] for m in members}
    assert urls == {"redis://:${REDIS_PASSWORD}@redis:6379/0"}
    states = [_mounts(m)[m["environment"]["TLSPROXY_STATE_DIR"]] for m in members]
    assert len(set(states)) == 2 and all(s in compose["volumes"] for s in states)
    haproxy = (DOCKER / "haproxy.fleet.cfg").read_text()
    for name in ("tlsproxy-1", "tlsproxy-2"):
        assert f"server {name} {name}:443 check port 9000" in haproxy
        assert f"server {name} {name}:80 check port 9000" in haproxy
    # The instances' environment is a complete configuration with the shared store.
    env = {k: str(v) for k, v in members[0]["environment"].items()}
    env["TLSPROXY_STORE_URL"] = env["TLSPROXY_STORE_URL"].replace("${REDIS_PASSWORD}", "pw")
    env["TLSPROXY_STATE_DIR"] = str(tmp_path)
    config = load(None, env)
    assert config.store.shared and config.store.prefix == "example-com:"
    assert config.server.admin == "tcp:9000"


def test_order_from_an_instance_pebble_does_not_reach_is_answered_by_another(
    pebble: Pebble, backend: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Instance 1 orders (Pebble never reaches it); instance 0 answers the challenge from Redis; one order."""
    import datetime

    from tlsproxy.certs.redis_store import RedisStore
    from tlsproxy.certs.store import SiteMeta

    hosts = fresh_hosts()
    validator, orderer = fleet_members(tmp_path, pebble, redis_server, hosts, backend, 2)
    roots = pebble.roots_pem()
    before = orders_seen(pebble)
    store = RedisStore(redis_server.url, tmp_path / "test-store", prefix=validator.prefix)
    # A failure on record holds instance 0's first check back (a day); it then sleeps until then.
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    store.save_meta(hosts[0], SiteMeta(failures=1, next_attempt=later, last_error="held back by the test"))
    with ExitStack() as stack:
        answering = start(validator)
        stack.callback(answering.stop)
        answering.wait_for_line("tlsproxy: ready", 30)
        answering.wait_for_line(f"certificate of {hosts[0]} not due for renewal", 30)
        store.save_meta(hosts[0], SiteMeta())  # due now, for whoever checks next: instance 1 only
        ordering = start(orderer)
        stack.callback(ordering.stop)
        ordering.wait_for_line(f"ordering a certificate for {hosts[0]}", 60)
        wait_until(
            lambda: all(served_serial(m.https_port, hosts[0], roots) for m in (validator, orderer)),
            60,
            "certificates",
            [answering, ordering],
        )
        serials = {served_serial(m.https_port, host, roots) for m in (validator, orderer) for host in hosts}
        assert len(serials) == 1, serials
        assert orders_seen(pebble) - before == 1, answering.output + ordering.output
        assert "ordering a certificate" not in answering.output
        # Pebble was told to look once instance 0 said it serves the answers, not after a pause.
        assert "served by every instance that is up (1 besides this one)" in ordering.output
        assert "did not say they serve" not in ordering.output
    store.close()

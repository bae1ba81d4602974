"""The supervisor of `workers = N`: spawning, replacing, reloading, stopping; its messages and metrics."""

from __future__ import annotations

import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from tlsproxy import config as configuration
from tlsproxy.metrics import Metrics
from tlsproxy.workers.admin import merge_metrics
from tlsproxy.workers.messages import LineReader, MessageError, encode
from tlsproxy.workers.supervisor import (
    CHALLENGE_CONFIRM_TIMEOUT,
    KILL_AFTER_GRACE,
    LONGEST_PAUSE,
    RETIRE_AFTER,
    BoundListener,
    Supervisor,
    restart_delay,
    twist_options,
    why_ended,
)
from tlsproxy.workers.worker import CONTROL_IN, CONTROL_OUT


class FakePort:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.stopped = False

    def fileno(self) -> int:
        return self.fd

    def stopListening(self) -> None:
        self.stopped = True


class FakeProcess:
    """What spawnProcess returns, as far as the supervisor uses it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: list[tuple[int, bytes]] = []
        self.signals: list[str] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written.append((fd, data))

    def signalProcess(self, name: str | int) -> None:
        if not isinstance(name, int) and name not in ("HUP", "STOP", "INT", "KILL", "TERM"):
            raise TypeError(f"Twisted passes {name!r} to os.kill as it is")
        self.signals.append(name)

    def messages(self) -> list[dict[str, Any]]:
        return LineReader().feed(b"".join(data for fd, data in self.written if fd == CONTROL_IN))


class Spawner:
    def __init__(self) -> None:
        self.spawned: list[tuple[Any, FakeProcess, list[str], dict[int, Any]]] = []

    def __call__(self, protocol: Any, executable: str, args: list[str], env: Any, childFDs: dict[int, Any]) -> None:
        process = FakeProcess(1000 + len(self.spawned))
        protocol.makeConnection(process)
        self.spawned.append((protocol, process, args, childFDs))

    def latest(self, index: int) -> tuple[Any, FakeProcess]:
        for protocol, process, args, _ in reversed(self.spawned):
            if args[args.index("--worker") + 1] == str(index):
                return protocol, process
        raise AssertionError(f"worker {index} never spawned")


def write_config(tmp_path: Path, workers: int = 2, max_age: int = 1000) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[server]\nhttps = ["tcp:0:interface=127.0.0.1"]\nhttp = []\nstate_dir = "{tmp_path}"\n'
        f"workers = {workers}\nshutdown_grace = 10\n"
        '[acme]\nagree_tos = true\n[[site]]\nhosts = ["example.com"]\nupstream = "http://127.0.0.1:8000"\n'
        f"hsts = {{ max_age = {max_age} }}\n"
    )
    return path


class BoundSupervisor(Supervisor):
    """A supervisor whose listeners are fake ports (the memory reactor cannot stop reading)."""

    fds = iter(range(42, 100))
    refuse: set[str] = set()

    def bind_one(self, label: str, description: str, count: int | None = None) -> BoundListener | None:
        if description in self.refuse:
            return None
        return BoundListener(label, description, FakePort(next(self.fds)))


def supervisor(tmp_path: Path, workers: int = 2) -> tuple[Supervisor, MemoryReactorClock, Spawner, Path]:
    path = write_config(tmp_path, workers)
    reactor = MemoryReactorClock()
    spawner = Spawner()
    service = BoundSupervisor(
        reactor, configuration.load(str(path)), str(path), spawn=spawner, executable="/py", install_signals=False
    )
    service.startService()
    return service, reactor, spawner, path


def ended(protocol: Any, code: int | None = None, signum: int | None = None) -> None:
    reason = ProcessDone(0) if code == 0 else ProcessTerminated(exitCode=code, signal=signum)
    protocol.processEnded(Failure(reason))


def test_restart_delay_grows_while_workers_die_young() -> None:
    """The first death is replaced at once; deaths in a row wait 0.5 s, 1 s, 2 s... up to a cap."""
    assert restart_delay(1) == 0.0
    assert [restart_delay(n) for n in (2, 3, 4)] == [0.5, 1.0, 2.0]
    assert restart_delay(50) == LONGEST_PAUSE


def test_why_a_worker_ended() -> None:
    """The log line says the exit status, or the signal by name."""
    assert why_ended(Failure(ProcessTerminated(exitCode=3))) == "exited with status 3"
    assert why_ended(Failure(ProcessTerminated(signal=signal.SIGKILL))) == "was killed by SIGKILL"
    assert why_ended(Failure(ProcessDone(0))) == "exited with status 0"


def test_each_worker_gets_listeners_handoff_sockets_and_its_spec(tmp_path: Path) -> None:
    """N workers are spawned, each with the shared listener, its own handoff socket and the others' senders."""
    service, _, spawner, path = supervisor(tmp_path, workers=3)
    assert len(spawner.spawned) == 3
    for index in range(3):
        _, process = spawner.latest(index)
        args, fds = next((a, f) for p, pr, a, f in spawner.spawned if pr is process)
        assert args == ["/py", "-P", "-m", "twisted", "tlsproxy", "--worker", str(index), "--config", str(path)]
        assert fds[CONTROL_IN] == "w" and fds[CONTROL_OUT] == "r"
        (start,) = process.messages()
        assert start["type"] == "start" and start["index"] == index
        assert fds[start["handoff_in"]] == service.slots[index].handoff_in.fileno()
        assert {int(k) for k in start["handoff_out"]} == set(range(3)) - {index}
        for slot, fd in start["handoff_out"].items():
            assert fds[fd] == service.slots[int(slot)].handoff_out.fileno()
        (listener,) = start["listeners"]
        assert fds[listener["fd"]] == service.listeners[0].fd and listener["label"] == "https"


def test_ready_is_said_once_every_worker_is(tmp_path: Path) -> None:
    """ "tlsproxy: ready" comes when the last worker says ready, not before."""
    service, _, spawner, _ = supervisor(tmp_path)
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        spawner.latest(0)[0].childDataReceived(CONTROL_OUT, encode("ready"))
        assert not service.announced
        spawner.latest(1)[0].childDataReceived(CONTROL_OUT, encode("ready"))
        assert service.announced
        spawner.latest(1)[0].childDataReceived(CONTROL_OUT, encode("ready"))  # a replacement, later
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert [e["log_format"] for e in seen].count("tlsproxy: ready") == 1


def test_dead_worker_replaced_at_once_then_with_backoff(tmp_path: Path) -> None:
    """A worker that dies is replaced at once; one that keeps dying young waits longer each time."""
    _, reactor, spawner, _ = supervisor(tmp_path)
    reactor.advance(60)
    protocol, _ = spawner.latest(1)
    ended(protocol, signum=signal.SIGKILL)
    reactor.advance(0)
    replacement, process = spawner.latest(1)
    assert replacement is not protocol
    assert process.messages()[0]["index"] == 1
    ended(replacement, code=1)  # died young: a second death in a row
    reactor.advance(0.4)
    assert spawner.latest(1)[0] is replacement
    reactor.advance(0.2)
    assert spawner.latest(1)[0] is not replacement
    ended(spawner.latest(1)[0], code=1)
    reactor.advance(0.9)
    count = len(spawner.spawned)
    reactor.advance(0.2)
    assert len(spawner.spawned) == count + 1


def test_key_names_go_to_every_worker_and_leave_with_a_dead_one(tmp_path: Path) -> None:
    """Each worker's ticket key names are sent to all; a worker's names are withdrawn when it dies."""
    _, reactor, spawner, _ = supervisor(tmp_path)
    spawner.latest(0)[0].childDataReceived(CONTROL_OUT, encode("tickets", names=["aa" * 16]))
    spawner.latest(1)[0].childDataReceived(CONTROL_OUT, encode("tickets", names=["bb" * 16, "cc" * 16]))
    last = [m for m in spawner.latest(0)[1].messages() if m["type"] == "tickets"][-1]
    assert last["owners"] == {"0": ["aa" * 16], "1": ["bb" * 16, "cc" * 16]}
    ended(spawner.latest(1)[0], code=1)
    last = [m for m in spawner.latest(0)[1].messages() if m["type"] == "tickets"][-1]
    assert last["owners"] == {"0": ["aa" * 16]}


def test_reload_reaches_workers_only_when_the_config_can_run(tmp_path: Path) -> None:
    """SIGHUP: a config that does not load reaches no worker; a good one reaches every worker."""
    service, _, spawner, path = supervisor(tmp_path)
    path.write_text(path.read_text().replace("workers = 2", "workers = 0"))
    service.reload()
    for index in range(2):
        assert all(m["type"] != "reload" for m in spawner.latest(index)[1].messages())
    path.write_text(path.read_text().replace("workers = 0", "workers = 2").replace("1000", "5"))
    service.reload()
    for index in range(2):
        assert [m["type"] for m in spawner.latest(index)[1].messages()].count("reload") == 1
    assert service.config.sites[0].hsts.max_age == 5


def test_stop_drains_every_worker_then_fires(tmp_path: Path) -> None:
    """Stopping sends SIGTERM to each worker, replaces none of them, and fires once the last has gone."""
    service, reactor, spawner, _ = supervisor(tmp_path)
    stopping = service.stopService()
    for index in range(2):
        assert spawner.latest(index)[1].signals == ["TERM"]
    ended(spawner.latest(0)[0], code=0)
    assert not stopping.called
    ended(spawner.latest(1)[0], code=0)
    assert stopping.called
    reactor.advance(100)
    assert len(spawner.spawned) == 2
    assert service.listeners[0].port.stopped


def test_stop_kills_a_worker_past_the_grace(tmp_path: Path) -> None:
    """A worker still there shutdown_grace + a few seconds after SIGTERM gets SIGKILL."""
    service, reactor, spawner, _ = supervisor(tmp_path)
    service.stopService()
    ended(spawner.latest(0)[0], code=0)
    reactor.advance(10 + KILL_AFTER_GRACE - 0.1)
    assert spawner.latest(1)[1].signals == ["TERM"]
    reactor.advance(0.2)
    assert spawner.latest(1)[1].signals == ["TERM", "KILL"]


def test_line_reader() -> None:
    """Messages split at newlines whatever the chunks; garbage is an error, not a crash."""
    reader = LineReader()
    data = encode("ready") + encode("tickets", names=["ab"])
    assert reader.feed(data[:5]) == []
    assert [m["type"] for m in reader.feed(data[5:])] == ["ready", "tickets"]
    with pytest.raises(MessageError):
        reader.feed(b"[1, 2]\n")
    with pytest.raises(MessageError):
        reader.feed(b"{nope\n")


def test_merged_metrics_sum_counters_and_keep_processes_apart() -> None:
    """Requests add up over workers; certificate expiry is the earliest; process figures get a worker label."""
    texts = {}
    for index, (count, expiry) in enumerate(((3, 2000.0), (4, 1000.0))):
        metrics = Metrics()
        metrics.requests.labels("a", "200").inc(count)
        metrics.upstream_latency.labels("a").observe(0.2)
        text = metrics.render().decode()
        text += f'tlsproxy_certificate_expiry_timestamp_seconds{{site="a"}} {expiry}\n'
        texts[index] = text
    merged = merge_metrics(texts).decode()
    assert 'tlsproxy_requests_total{site="a",status="200"} 7.0' in merged
    assert 'tlsproxy_upstream_latency_seconds_count{site="a"} 2.0' in merged
    assert 'tlsproxy_certificate_expiry_timestamp_seconds{site="a"} 1000.0' in merged
    assert 'process_resident_memory_bytes{worker="0"}' in merged
    assert 'process_resident_memory_bytes{worker="1"}' in merged


def test_a_renewal_is_announced_to_the_other_workers(tmp_path: Path) -> None:
    """A worker that renewed a certificate makes every other worker read the store at once."""
    _, _, spawner, _ = supervisor(tmp_path, workers=3)
    spawner.latest(0)[0].childDataReceived(CONTROL_OUT, encode("renewed", site="example.com"))
    assert all(m["type"] != "renewed" for m in spawner.latest(0)[1].messages())
    for index in (1, 2):
        assert {"type": "renewed", "site": "example.com"} in spawner.latest(index)[1].messages()


def test_twist_options_are_passed_on() -> None:
    """Options given to twist itself (log format, level, reactor) reach the workers; tlsproxy's do not."""
    argv = ["/venv/bin/twist", "--log-format", "json", "--log-level=debug", "tlsproxy", "--config", "x.toml"]
    assert twist_options(argv) == ["--log-format", "json", "--log-level=debug"]
    assert twist_options(["/venv/bin/twist", "tlsproxy"]) == []
    assert twist_options(["pytest", "-q"]) == []


def test_metrics_do_not_wait_for_a_worker_that_died(tmp_path: Path) -> None:
    """A scrape asked of a worker that then dies is answered with the others' figures, at once."""
    service, reactor, spawner, _ = supervisor(tmp_path)
    asked = service.admin.ask("scrape")
    (ident,) = [m["id"] for m in spawner.latest(0)[1].messages() if m["type"] == "scrape"]
    spawner.latest(0)[0].childDataReceived(CONTROL_OUT, encode("scraped", id=ident, text="a_total 1\n"))
    assert not asked.called
    protocol, process = spawner.latest(1)
    protocol.childConnectionLost(CONTROL_IN)
    protocol.send("tickets", owners={})  # its pipe is closed: nothing is written
    assert [m["type"] for m in process.messages()].count("tickets") == 0
    ended(protocol, signum=signal.SIGKILL)
    assert list(asked.result) == [0]


def test_new_listener_or_count_replaces_every_worker(tmp_path: Path) -> None:
    """SIGHUP with another listener and 3 workers: 3 new workers get both sockets, the old 2 drain, none restarts."""
    service, reactor, spawner, path = supervisor(tmp_path)
    old = [spawner.latest(i)[0] for i in range(2)]
    kept_port = service.listeners[0].port
    path.write_text(
        path.read_text()
        .replace("workers = 2", "workers = 3")
        .replace("http = []", 'http = ["tcp:0:interface=127.0.0.1"]')
    )
    service.reload()
    assert [spawner.latest(i)[1].signals for i in range(3)] == [[], [], []]
    assert [p.transport.messages()[-1]["type"] for p in old] == ["retire", "retire"]
    assert [p.transport.signals for p in old] == [[], []]
    reactor.advance(RETIRE_AFTER)
    assert [p.transport.signals for p in old] == [["TERM"], ["TERM"]]
    assert len(spawner.spawned) == 5
    (start,) = spawner.latest(2)[1].messages()
    assert [item["label"].split()[0] for item in start["listeners"]] == ["https", "http"]
    assert service.listeners[0].port is kept_port and not kept_port.stopped
    stopping = service.stopService()
    for protocol in old:
        ended(protocol, code=0)
    reactor.advance(100)
    assert len(spawner.spawned) == 5  # the old ones were not replaced
    assert not stopping.called  # the three new ones are still there
    for index in range(3):
        ended(spawner.latest(index)[0], code=0)
    assert stopping.called


def test_listener_that_cannot_bind_refuses_the_reload(tmp_path: Path) -> None:
    """A new listener that cannot be bound: the reload is refused and the running workers stay."""
    service, _, spawner, path = supervisor(tmp_path)
    BoundSupervisor.refuse = {"tcp:1:interface=127.0.0.1"}
    try:
        path.write_text(path.read_text().replace("http = []", 'http = ["tcp:1:interface=127.0.0.1"]'))
        service.reload()
    finally:
        BoundSupervisor.refuse = set()
    assert len(spawner.spawned) == 2
    assert all(spawner.latest(i)[1].signals == [] for i in range(2))
    assert service.config.server.http == ()


def test_spec_read_leaves_the_next_messages_in_the_pipe() -> None:
    """The worker reads its spec line only: messages the supervisor sent after it stay for the control protocol."""
    import os

    from tlsproxy.workers.worker import read_spec

    read, write = os.pipe()
    try:
        os.write(write, encode("start", index=1) + encode("tickets", owners={}))
        assert read_spec(read) == {"type": "start", "index": 1}
        assert LineReader().feed(os.read(read, 1024)) == [{"type": "tickets", "owners": {}}]
    finally:
        os.close(read)
        os.close(write)


def test_reload_moves_the_admin_endpoint(tmp_path: Path) -> None:
    """A reload that names another admin endpoint serves it there and stops the old one."""
    service, reactor, _, path = supervisor(tmp_path)
    assert service.admin_listener is None
    path.write_text(path.read_text().replace("http = []", 'http = []\nadmin = "tcp:9100:interface=127.0.0.1"'))
    service.reload()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [(9100, "127.0.0.1")]
    path.write_text(path.read_text().replace("9100", "9200"))
    service.reload()
    assert [port for port, _, _, _ in reactor.tcpServers] == [9100, 9200]
    assert service.admin_listener is not None and service.admin_listener.description == "tcp:9200:interface=127.0.0.1"


def test_sigusr1_reaches_every_worker(tmp_path: Path) -> None:
    """SIGUSR1 to the supervisor (logrotate's postrotate) is passed to every worker, which reopens its file."""
    service, _, spawner, _ = supervisor(tmp_path)
    service.reopen_logs()
    assert [spawner.latest(i)[1].signals for i in range(2)] == [[signal.SIGUSR1], [signal.SIGUSR1]]


def test_the_entry_builds_one_process_or_a_supervisor(tmp_path: Path) -> None:
    """workers = 1 builds today's single-process service; workers = 2 a supervisor; the plugin enters here."""
    from tlsproxy import tap, workers

    reactor = MemoryReactorClock()
    reactor.spawnProcess = Spawner()  # type: ignore[attr-defined]
    options = tap.Options()
    one = configuration.load(str(write_config(tmp_path, workers=1)))
    assert type(workers.build(reactor, one, options, None)) is tap.ProxyService
    two = configuration.load(str(write_config(tmp_path, workers=2)))
    assert isinstance(workers.build(reactor, two, options, None), Supervisor)
    plugin = (Path(__file__).parents[2] / "twisted" / "plugins" / "tlsproxy_plugin.py").read_text()
    assert '"tlsproxy.workers"' in plugin and workers.Options is tap.Options


def _announce(spawner: Spawner, ident: int = 7) -> dict[int, int]:
    """Worker 0 says its answers are in the store; the round id each other worker was given, by index."""
    spawner.latest(0)[0].childDataReceived(CONTROL_OUT, encode("challenges", id=ident))
    rounds = {}
    for index in (1, 2):
        (message,) = [m for m in spawner.latest(index)[1].messages() if m["type"] == "challenges"]
        rounds[index] = message["id"]
    return rounds


def _confirmed(spawner: Spawner) -> list[dict[str, Any]]:
    return [m for m in spawner.latest(0)[1].messages() if m["type"] == "confirmed"]


def _load(spawner: Spawner, index: int, ident: int) -> None:
    spawner.latest(index)[0].childDataReceived(CONTROL_OUT, encode("loaded", id=ident, ok=True))


def test_challenges_confirmed_at_once_when_every_worker_loaded_them(tmp_path: Path) -> None:
    """The issuer hears "confirmed" as soon as the last other worker says it serves the answers, not after a pause."""
    service, reactor, spawner, _ = supervisor(tmp_path, workers=3)
    rounds = _announce(spawner)
    _load(spawner, 1, rounds[1])
    assert _confirmed(spawner) == []
    _load(spawner, 1, rounds[1])  # said twice: still waiting for worker 2
    assert _confirmed(spawner) == []
    _load(spawner, 2, rounds[2])
    assert _confirmed(spawner) == [{"type": "confirmed", "id": 7, "missing": []}]
    assert service.confirmations == {} and reactor.getDelayedCalls() == []


def test_challenges_confirmed_after_the_timeout_naming_the_silent_worker(tmp_path: Path) -> None:
    """A worker that never answers delays the order by the timeout at most, and the log names it."""
    _, reactor, spawner, _ = supervisor(tmp_path, workers=3)
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        rounds = _announce(spawner)
        _load(spawner, 1, rounds[1])
        reactor.advance(CHALLENGE_CONFIRM_TIMEOUT - 0.1)
        assert _confirmed(spawner) == []
        reactor.advance(0.1)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert _confirmed(spawner) == [{"type": "confirmed", "id": 7, "missing": [2]}]
    late = [e for e in seen if "did not say it serves the challenge answers" in e.get("log_format", "")]
    assert len(late) == 1 and late[0]["missing"] == "2" and late[0]["index"] == 0


def test_a_worker_that_dies_is_not_waited_for(tmp_path: Path) -> None:
    """A worker that dies before answering is dropped from the round; the issuer is confirmed at once."""
    service, reactor, spawner, _ = supervisor(tmp_path, workers=3)
    rounds = _announce(spawner)
    _load(spawner, 1, rounds[1])
    protocol, _ = spawner.latest(2)
    ended(protocol, signum=signal.SIGKILL)
    assert _confirmed(spawner) == [{"type": "confirmed", "id": 7, "missing": []}]
    reactor.advance(0)  # its replacement starts; it was not asked and is not waited for
    assert spawner.latest(2)[0] is not protocol
    assert service.confirmations == {}


def test_an_issuer_that_dies_leaves_no_round_behind(tmp_path: Path) -> None:
    """The issuer's death ends its round: no timer left, and a late answer changes nothing."""
    service, reactor, spawner, _ = supervisor(tmp_path, workers=3)
    rounds = _announce(spawner)
    ended(spawner.latest(0)[0], signum=signal.SIGKILL)
    assert service.confirmations == {}
    _load(spawner, 1, rounds[1])
    reactor.advance(CHALLENGE_CONFIRM_TIMEOUT)
    assert all(m["type"] != "confirmed" for m in spawner.latest(0)[1].messages())


class _Scanning:
    """A certificate service whose scans the test finishes."""

    def __init__(self) -> None:
        self.scans: list[Any] = []

    def scan(self) -> Any:
        from twisted.internet.defer import Deferred

        self.scans.append(Deferred())
        return self.scans[-1]


def test_a_worker_says_loaded_only_once_its_scans_applied_the_answers() -> None:
    """A worker told of new answers acks after every certificate service read them; a failed read says ok false."""
    from types import SimpleNamespace

    from tlsproxy.workers.worker import WorkerService

    services = [_Scanning(), _Scanning()]
    sent: list[tuple[str, dict[str, Any]]] = []
    worker = SimpleNamespace(_certificate_services=lambda: services, send=lambda kind, **f: sent.append((kind, f)))
    worker.load_challenges = lambda ident: WorkerService.load_challenges(worker, ident)  # type: ignore[arg-type]
    WorkerService.on_message(worker, {"type": "challenges", "site": "", "id": 3})  # type: ignore[arg-type]
    services[0].scans[0].callback(True)
    assert sent == []
    services[1].scans[0].callback(True)
    assert sent == [("loaded", {"id": 3, "ok": True})]
    WorkerService.load_challenges(worker, 4)  # type: ignore[arg-type]
    services[0].scans[1].callback(False)
    services[1].scans[1].callback(True)
    assert sent[-1] == ("loaded", {"id": 4, "ok": False})


def test_an_issuer_announcement_fires_on_its_confirmation_or_when_the_supervisor_goes() -> None:
    """announce_challenges fires on the matching "confirmed" only; a supervisor gone releases every waiting order."""
    from types import SimpleNamespace

    from tlsproxy.workers.worker import WorkerService

    sent: list[tuple[str, dict[str, Any]]] = []
    worker = SimpleNamespace(
        _confirming={}, _announcements=0, terminating=True, send=lambda kind, **f: sent.append((kind, f))
    )
    first = WorkerService.announce_challenges(worker)  # type: ignore[arg-type]
    second = WorkerService.announce_challenges(worker)  # type: ignore[arg-type]
    assert sent == [("challenges", {"id": 1}), ("challenges", {"id": 2})]
    WorkerService.on_message(worker, {"type": "confirmed", "id": 2, "missing": []})  # type: ignore[arg-type]
    assert second.called and not first.called
    WorkerService.supervisor_gone(worker)  # type: ignore[arg-type]
    assert first.called and worker._confirming == {}


def accept_queue(listening: socket.socket) -> int:
    """Connections waiting in a listening socket's accept queue (Linux: tcp_info's unacked field)."""
    return int(struct.unpack_from("I", listening.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 24)[0])


class _Accepted(Factory):
    """Records the transport of every connection a port accepts."""

    def __init__(self) -> None:
        self.transports: list[Any] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = Protocol()
        protocol.makeConnection = self.transports.append  # type: ignore[method-assign]
        return protocol


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the accept queue with TCP_INFO")
def test_a_worker_accepts_one_connection_per_wake_up() -> None:
    """A worker's shared listener takes one queued connection per readable event, leaving the rest to the others."""
    from tlsproxy.workers.worker import AdoptedListener

    reactor = MemoryReactorClock()
    factory = _Accepted()
    port = tcp.Port(0, factory, interface="127.0.0.1", reactor=reactor)
    port.startListening()
    clients: list[socket.socket] = []
    try:
        listener = AdoptedListener(reactor, port.fileno(), "tcp:0", factory, "https", None)
        listener._listening(port)
        clients = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(5)]
        deadline = time.monotonic() + 5
        while accept_queue(port.socket) < 5 and time.monotonic() < deadline:
            select.select([], [], [], 0.01)  # the kernel finishes the last handshakes
        assert accept_queue(port.socket) == 5
        for taken in range(1, 6):
            port.doRead()  # what the reactor calls each time the listening socket is readable
            assert len(factory.transports) == taken
        port.doRead()  # an empty queue: nothing, and no error
        assert len(factory.transports) == 5
    finally:
        for transport in factory.transports:
            transport.socket.close()
        for client in clients:
            client.close()
        port.socket.close()


def _upstream(up: bool, in_flight: int = 0, failures: int = 0, why: str = "") -> dict[str, Any]:
    return {
        "site": "example.com",
        "route": "",
        "url": "http://127.0.0.1:8000",
        "up": up,
        "in_flight": in_flight,
        "failures": failures,
        "why": why,
    }


class _Exchange:
    """The part of an Exchange the admin endpoint answers through."""

    def __init__(self, target: bytes) -> None:
        self.head = SimpleNamespace(method=b"GET", target=target)
        self.status = 0
        self.body = b""

    def start_response(self, status: int, reason: bytes, headers: Any, length: int) -> None:
        self.status = status

    def write(self, data: bytes) -> None:
        self.body += data

    def finish(self) -> None:
        pass


def _readyz(tmp_path: Path, answers: dict[int, dict[str, Any]]) -> _Exchange:
    service, _, spawner, _ = supervisor(tmp_path)
    exchange = _Exchange(b"/readyz")
    service.admin.handle(exchange)  # type: ignore[arg-type]
    for index, fields in answers.items():
        (ident,) = [m["id"] for m in spawner.latest(index)[1].messages() if m["type"] == "readiness"]
        spawner.latest(index)[0].childDataReceived(CONTROL_OUT, encode("readiness", id=ident, **fields))
    return exchange


def test_readyz_with_workers_lists_each_upstream_once(tmp_path: Path) -> None:
    """/readyz of a supervisor names every upstream's state, in flight and failures summed over workers."""
    answer = {"problems": [], "upstreams": [_upstream(True, 1, 2)], "notes": ["store redis x: unreachable"]}
    exchange = _readyz(tmp_path, {0: answer, 1: answer})
    assert exchange.status == 200
    assert exchange.body == (
        b"ready\nnote: store redis x: unreachable\n"
        b"upstream http://127.0.0.1:8000 (site example.com): up, 2 in flight, 4 failures\n"
    )


def test_readyz_with_workers_up_when_any_worker_has_it_up(tmp_path: Path) -> None:
    """An upstream one worker has out and another up is up, and each worker's view is said."""
    exchange = _readyz(
        tmp_path,
        {
            0: {"problems": [], "upstreams": [_upstream(False, failures=3, why="connection refused")]},
            1: {"problems": [], "upstreams": [_upstream(True)]},
        },
    )
    assert exchange.body.splitlines()[-1] == (
        b"upstream http://127.0.0.1:8000 (site example.com): up, 0 in flight, 3 failures"
        b" [worker 0: down (connection refused), worker 1: up]"
    )


def test_readyz_with_workers_not_ready_still_lists_upstreams(tmp_path: Path) -> None:
    """A 503 from the supervisor names the worker's problem and each upstream, down with its reason."""
    down = {"problems": ["upstream http://127.0.0.1:8000: refused"], "upstreams": [_upstream(False, why="refused")]}
    exchange = _readyz(tmp_path, {0: down, 1: down})
    assert exchange.status == 503
    assert exchange.body.splitlines() == [
        b"worker 0: upstream http://127.0.0.1:8000: refused",
        b"worker 1: upstream http://127.0.0.1:8000: refused",
        b"upstream http://127.0.0.1:8000 (site example.com): down, 0 in flight, 0 failures (refused)",
    ]


def test_merged_gauges_are_not_summed() -> None:
    """tlsproxy_upstream_up stays 1 or 0 over workers (1 when any has it up); counts of things add up."""
    texts = {}
    for index, up in enumerate((True, True)):
        metrics = Metrics()
        metrics.watch_upstreams(lambda up=up, index=index: [SimpleNamespace(**_upstream(up, in_flight=index + 1))])
        metrics.open_connections.labels("https").inc(2)
        texts[index] = metrics.render().decode()
    merged = merge_metrics(texts).decode()
    labels = 'route="",site="example.com",upstream="http://127.0.0.1:8000"'
    assert f"tlsproxy_upstream_up{{{labels}}} 1.0" in merged
    assert f"tlsproxy_upstream_in_flight{{{labels}}} 3.0" in merged
    assert 'tlsproxy_open_connections{listener="https"} 4.0' in merged
    texts[0] = texts[0].replace(f"tlsproxy_upstream_up{{{labels}}} 1.0", f"tlsproxy_upstream_up{{{labels}}} 0.0")
    assert f"tlsproxy_upstream_up{{{labels}}} 1.0" in merge_metrics(texts).decode()

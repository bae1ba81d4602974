"""The supervising process: listeners, N workers, their lives, one admin endpoint.

It binds every listener once (or adopts systemd's), stops accepting on them
at once, and passes them to each worker, which accepts on the shared queue.
It proxies nothing.  It starts the workers, replaces one that dies (at once
the first time, then with a growing pause while they keep dying young),
checks a new configuration on SIGHUP before any worker sees it, and on
SIGTERM asks every worker to drain and exits 0 once the last is gone.
Each worker gets a datagram socket for connections other workers pass it
(:mod:`tlsproxy.tls.handoff`), and the supervisor keeps all of them open so
a replacement takes over its slot's.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated, ReactorNotRunning
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger

from tlsproxy import config as configuration
from tlsproxy import preflight
from tlsproxy.certs.model import CertifiedKey
from tlsproxy.config import Config, ConfigError
from tlsproxy.http.server import HTTP11Factory, Limits
from tlsproxy.http.tracker import ConnectionTracker
from tlsproxy.listening import with_backlog
from tlsproxy.proxyprotocol import split_description
from tlsproxy.tap import CANNOT_RUN, READY, Listener, cannot_listen, cannot_run
from tlsproxy.workers.admin import SupervisorAdmin
from tlsproxy.workers.messages import LineReader, MessageError, encode
from tlsproxy.workers.worker import CONTROL_IN, CONTROL_OUT

# A worker that lived this long before dying was not crash-looping.
STABLE_AFTER = 10.0
FIRST_PAUSE = 0.5
LONGEST_PAUSE = 30.0
# What SIGKILL waits for beyond shutdown_grace, for a worker that does not leave.
KILL_AFTER_GRACE = 5.0
HANDOFF_BUFFER = 4 * 1024 * 1024
# Seconds between telling a replaced worker to stop accepting and telling it to drain.
RETIRE_AFTER = 2.0
# The longest an issuer's order waits for the other workers to say they serve its challenge answers.
CHALLENGE_CONFIRM_TIMEOUT = 10.0


def twist_options(argv: list[str]) -> list[str]:
    """``twist``'s own options as this process got them (``--log-format json``...): the workers get them too."""
    if "tlsproxy" not in argv[1:]:
        return []
    return argv[1 : argv.index("tlsproxy", 1)]


def new_slots(count: int) -> list[Slot]:
    """``count`` worker places, each with its handoff socket pair."""
    slots = []
    for index in range(count):
        receive, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for end in (receive, send):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HANDOFF_BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, HANDOFF_BUFFER)
        slots.append(Slot(index, receive, send))
    return slots


def restart_delay(young_deaths: int) -> float:
    """Seconds before replacing a worker, after ``young_deaths`` deaths in a row before STABLE_AFTER."""
    if young_deaths <= 1:
        return 0.0
    return min(FIRST_PAUSE * 2 ** (young_deaths - 2), LONGEST_PAUSE)


def why_ended(reason: Any) -> str:
    """``exited with status 3`` or ``was killed by SIGKILL``, from processEnded's failure."""
    value = getattr(reason, "value", reason)
    signum = getattr(value, "signal", None)
    if signum:
        try:
            return f"was killed by {signal.Signals(signum).name}"
        except ValueError:
            return f"was killed by signal {signum}"
    code = getattr(value, "exitCode", None)
    if isinstance(value, ProcessDone) or code == 0:
        return "exited with status 0"
    if isinstance(value, ProcessTerminated) and code is not None:
        return f"exited with status {code}"
    return f"ended ({value})"


def validate(config: Config) -> None:
    """Raise one of CANNOT_RUN if a worker could not run ``config`` (checked before any worker sees it)."""
    problems = preflight.problems(config)
    if problems:
        raise ConfigError(problems)
    for site in config.sites:
        if site.tls == "files":
            CertifiedKey.from_pem(Path(site.cert).read_bytes(), Path(site.key).read_bytes(), source=site.cert)


class _NoAccept(Factory):
    """What the supervisor's own listening ports would build: nothing (they never accept)."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


@dataclass
class BoundListener:
    """One listening socket the workers share."""

    label: str
    description: str
    port: Any

    @property
    def fd(self) -> int:
        return int(self.port.fileno())


@dataclass
class Slot:
    """A worker's place: its index, its handoff socket pair, the process now in it."""

    index: int
    handoff_in: socket.socket
    handoff_out: socket.socket
    process: WorkerProcess | None = None
    young_deaths: int = 0
    restart: Any = None  # the delayed call that replaces it
    ready: bool = False
    key_names: list[str] = field(default_factory=list)


class WorkerProcess(ProcessProtocol):
    """The supervisor's side of one worker process."""

    def __init__(self, supervisor: Supervisor, slot: Slot, started: float) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.started = started
        self.reader = LineReader()
        self.pid: int | None = None
        self.ended = False
        self.deaf = False

    transport: Any

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def send(self, kind: str, **fields: Any) -> None:
        if not self.ended and not self.deaf:
            self.transport.writeToChild(CONTROL_IN, encode(kind, **fields))

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == CONTROL_IN:
            self.deaf = True  # dying: its end of the pipe is closed before processEnded

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != CONTROL_OUT:
            return
        try:
            messages = self.reader.feed(data)
        except MessageError as e:
            self.supervisor.log.error("worker {index}: unreadable message: {error}", index=self.slot.index, error=e)
            return
        for message in messages:
            self.supervisor.on_message(self.slot, message)

    def signal(self, name: str | int) -> None:
        if not self.ended:
            try:
                self.transport.signalProcess(name)
            except ProcessExitedAlready:  # it went in the meantime
                return

    def processEnded(self, reason: Any) -> None:
        self.ended = True
        self.supervisor.worker_ended(self, reason)


@dataclass
class Confirmation:
    """One announcement of challenge answers: who made it, whose word it still waits for."""

    issuer: WorkerProcess
    ident: Any  # the issuer's own id for it
    waiting: set[WorkerProcess]
    timer: Any = None


Spawn = Callable[..., Any]


class Supervisor(MultiService):
    """The service of a ``workers = N`` process (N > 1)."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: Config,
        config_path: str | None = None,
        *,
        spawn: Spawn | None = None,
        load_config: Callable[[], Config] | None = None,
        executable: str = sys.executable,
        install_signals: bool = True,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.config_path = config_path
        self.spawn = spawn or reactor.spawnProcess
        self.load_config = load_config or (lambda: configuration.load(config_path))
        self.executable = executable
        self.install_signals = install_signals
        self.twist_options = twist_options(sys.argv)
        self.exit_status = 0
        self.terminating = False
        self.stopping = False
        self.announced = False
        self.log_output: Any = None
        self.listeners: list[BoundListener] = []
        self.slots = new_slots(config.server.workers)
        # Workers of a configuration replaced by SIGHUP, draining before they exit.
        self.retiring: set[WorkerProcess] = set()
        self.replacing = False
        self.admin = SupervisorAdmin(self)
        self.admin_listener: Listener | None = None
        self._all_gone: Deferred[None] | None = None
        self._kill_timer: Any = None
        self.confirmations: dict[int, Confirmation] = {}
        self._rounds = 0

    # -- listeners ---------------------------------------------------------------

    def wanted(self, config: Config) -> list[tuple[str, str]]:
        wanted = [("https", d) for d in config.server.https]
        wanted += [("http (ACME HTTP-01, redirect to https)", d) for d in config.server.http]
        return wanted

    def bind(self) -> bool:
        """Bind every listener the workers share; False (and logged) if one cannot be."""
        for label, description in self.wanted(self.config):
            bound = self.bind_one(label, description)
            if bound is None:
                return False
            self.listeners.append(bound)
        return True

    def bind_one(self, label: str, description: str, count: int | None = None) -> BoundListener | None:
        """Bind one listener and stop accepting on it; None (and logged) if it cannot be."""
        try:
            # haproxy: is read by the workers (tlsproxy.proxyprotocol); the socket is the inner endpoint's.
            endpoint = serverFromString(self.reactor, with_backlog(split_description(description)[1]))
            listening = endpoint.listen(_NoAccept())
        except Exception as e:  # a systemd: string with no such socket, a bad string
            self.log.critical("tlsproxy: {message}", message=cannot_listen(label, description, e))
            return None
        ports: list[Any] = []
        failures: list[Any] = []
        listening.addCallbacks(ports.append, failures.append)
        if failures or not ports:
            error = failures[0].value if failures else RuntimeError("the endpoint did not listen at once")
            self.log.critical("tlsproxy: {message}", message=cannot_listen(label, description, error))
            return None
        port = ports[0]
        port.stopReading()  # the workers accept; we never do
        host = port.getHost()
        where = f"{getattr(host, 'host', '')}:{host.port}" if hasattr(host, "port") else str(host)
        self.log.info(
            "{label} listening on {where} ({description}), shared by {count} workers",
            label=label,
            where=where,
            description=description,
            count=count or len(self.slots),
        )
        return BoundListener(label, description, port)

    # -- workers -----------------------------------------------------------------

    def argv(self, index: int) -> list[str]:
        # -P: the working directory is not put on sys.path (a stray tlsproxy/ there is not imported).
        argv = [self.executable, "-P", "-m", "twisted", *self.twist_options, "tlsproxy", "--worker", str(index)]
        if self.config_path:
            argv += ["--config", self.config_path]
        return argv

    def spec(self, slot: Slot) -> tuple[dict[int, Any], dict[str, Any]]:
        """The worker's descriptors (childFDs) and the spec that says which is which."""
        child_fds: dict[int, Any] = {0: 0, 1: 1, 2: 2, CONTROL_IN: "w", CONTROL_OUT: "r"}
        next_fd = CONTROL_OUT + 1
        child_fds[next_fd] = slot.handoff_in.fileno()
        spec: dict[str, Any] = {"index": slot.index, "count": len(self.slots), "handoff_in": next_fd}
        next_fd += 1
        outs = {}
        for other in self.slots:
            if other is not slot:
                child_fds[next_fd] = other.handoff_out.fileno()
                outs[str(other.index)] = next_fd
                next_fd += 1
        spec["handoff_out"] = outs
        listeners = []
        for bound in self.listeners:
            child_fds[next_fd] = bound.fd
            listeners.append({"label": bound.label, "description": bound.description, "fd": next_fd})
            next_fd += 1
        spec["listeners"] = listeners
        return child_fds, spec

    def start_worker(self, slot: Slot) -> None:
        slot.restart = None
        slot.ready = False
        slot.key_names = []
        child_fds, spec = self.spec(slot)
        process = WorkerProcess(self, slot, self.reactor.seconds())
        slot.process = process
        self.spawn(process, self.executable, self.argv(slot.index), env=dict(os.environ), childFDs=child_fds)
        process.send("start", **spec)
        self.log.info("worker {index} started (pid {worker_pid})", index=slot.index, worker_pid=process.pid)

    def worker_ended(self, process: WorkerProcess, reason: Any) -> None:
        self.forget_confirmer(process)
        slot = process.slot
        if slot.process is process:
            slot.process = None
            slot.ready = False
            slot.key_names = []
            self.broadcast_key_names()
        why = why_ended(reason)
        if process in self.retiring:
            self.retiring.discard(process)
            self.log.info("worker {index} of the configuration before (pid {worker_pid}) {why}",
                          index=slot.index, worker_pid=process.pid, why=why)  # fmt: skip
            self._check_all_gone()
            return
        self.admin.worker_gone(slot.index)
        if self.stopping:
            self.log.info("worker {index} (pid {worker_pid}) {why}", index=slot.index, worker_pid=process.pid, why=why)
            self._check_all_gone()
            return
        lived = self.reactor.seconds() - process.started
        slot.young_deaths = slot.young_deaths + 1 if lived < STABLE_AFTER else 1
        delay = restart_delay(slot.young_deaths)
        self.log.error(
            "worker {index} (pid {worker_pid}) {why} after {lived:.1f}s; replacing it{when}",
            index=slot.index,
            worker_pid=process.pid,
            why=why,
            lived=lived,
            when=f" in {delay:g}s ({slot.young_deaths} early deaths in a row)" if delay else "",
        )
        slot.restart = self.reactor.callLater(delay, self.start_worker, slot)

    def live(self) -> list[WorkerProcess]:
        return [slot.process for slot in self.slots if slot.process is not None and not slot.process.ended]

    # -- messages ----------------------------------------------------------------

    def on_message(self, slot: Slot, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "ready":
            slot.ready = True
            if all(s.ready for s in self.slots):
                if not self.announced:
                    self.announced = True
                    self.log.info(READY)
                if self.replacing:
                    self.replacing = False
                    self.log.info("configuration reloaded: {count} new workers serve it", count=len(self.slots))
        elif kind == "tickets":
            names = message.get("names")
            if isinstance(names, list):
                slot.key_names = [str(n) for n in names]
                self.broadcast_key_names()
        elif kind == "challenges" and "id" in message and slot.process is not None:
            self.confirm_challenges(slot.process, message["id"])
        elif kind == "loaded":
            self.challenges_loaded(slot, message)
        elif kind in ("renewed", "challenges"):  # the others read the store now
            for process in self.live():
                if process.slot is not slot:
                    process.send(kind, site=str(message.get("site", "")))
        elif kind in ("scraped", "readiness"):
            self.admin.answer(slot.index, message)
        else:
            self.log.warn("worker {index}: unknown message {kind}", index=slot.index, kind=kind)

    # -- challenge answers: every worker serves them before the CA looks -----------

    def confirm_challenges(self, issuer: WorkerProcess, ident: Any) -> None:
        """Tell every other live worker to load the issuer's answers; confirm to it once all did."""
        self._rounds += 1
        round_id = self._rounds
        waiting = {process for process in self.live() if process is not issuer}
        confirmation = Confirmation(issuer, ident, waiting)
        self.confirmations[round_id] = confirmation
        for process in waiting:
            process.send("challenges", site="", id=round_id)
        confirmation.timer = self.reactor.callLater(CHALLENGE_CONFIRM_TIMEOUT, self._confirm_late, round_id)
        self._confirm_if_done(round_id)

    def challenges_loaded(self, slot: Slot, message: dict[str, Any]) -> None:
        confirmation = self.confirmations.get(message.get("id"))  # type: ignore[arg-type]
        if confirmation is None or slot.process not in confirmation.waiting:
            return
        if not message.get("ok", True):
            self.log.warn("worker {index} could not read the challenge answers from the store", index=slot.index)
        confirmation.waiting.discard(slot.process)
        self._confirm_if_done(message["id"])

    def forget_confirmer(self, process: WorkerProcess) -> None:
        """A worker ended: its word is not waited for, and its own announcement needs no answer."""
        for round_id, confirmation in list(self.confirmations.items()):
            if confirmation.issuer is process:
                self._finish(round_id)
                continue
            confirmation.waiting.discard(process)
            self._confirm_if_done(round_id)

    def _confirm_if_done(self, round_id: int) -> None:
        confirmation = self.confirmations.get(round_id)
        if confirmation is not None and not confirmation.waiting:
            self._finish(round_id).issuer.send("confirmed", id=confirmation.ident, missing=[])
            self.log.info(
                "every worker serves worker {index}'s challenge answers; it asks the CA to validate",
                index=confirmation.issuer.slot.index,
            )

    def _confirm_late(self, round_id: int) -> None:
        confirmation = self.confirmations.get(round_id)
        if confirmation is None:
            return
        confirmation.timer = None
        missing = sorted(process.slot.index for process in confirmation.waiting)
        self.log.warn(
            "worker {missing} did not say it serves the challenge answers within {timeout:g}s; "
            "worker {index} asks the CA to validate anyway",
            missing=", ".join(map(str, missing)),
            timeout=CHALLENGE_CONFIRM_TIMEOUT,
            index=confirmation.issuer.slot.index,
        )
        self._finish(round_id).issuer.send("confirmed", id=confirmation.ident, missing=missing)

    def _finish(self, round_id: int) -> Confirmation:
        confirmation = self.confirmations.pop(round_id)
        if confirmation.timer is not None and confirmation.timer.active():
            confirmation.timer.cancel()
        confirmation.timer = None
        return confirmation

    def broadcast_key_names(self) -> None:
        owners = {str(slot.index): slot.key_names for slot in self.slots if slot.key_names}
        for process in self.live():
            process.send("tickets", owners=owners)

    # -- life cycle ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.install_signals:
            self.reactor.callWhenRunning(self._install_signal_handlers)
        if not self.bind():
            self.exit_status = 1
            self.reactor.callWhenRunning(self.reactor.stop)
            return
        if self.config.server.admin:
            self.start_admin(self.config.server.admin).addErrback(self._admin_failed)
        for slot in self.slots:
            self.start_worker(slot)

    def start_admin(self, description: str) -> Deferred[Any]:
        """Serve the admin endpoint on ``description``; fires with the port, or fails (logged)."""
        factory = HTTP11Factory(self.admin, self.reactor, Limits(), secure=False, tracker=ConnectionTracker())
        label = "admin (/healthz /readyz /metrics)"
        self.admin_listener = Listener(self.reactor, description, factory, label)
        self.admin_listener.startService()
        assert self.admin_listener.listening is not None

        def failed(failure: Any) -> Any:
            self.log.critical("tlsproxy: {message}", message=cannot_listen(label, description, failure.value))
            return failure

        return self.admin_listener.listening.addErrback(failed)

    def _admin_failed(self, failure: Any) -> None:
        self.exit_status = 1
        self.reactor.callWhenRunning(self.reactor.stop)

    def _move_admin(self, description: str) -> None:
        """A reload named another admin endpoint (or none)."""
        if self.admin_listener is not None:
            self.admin_listener.stopService()
            self.admin_listener = None
        if description:
            self.start_admin(description).addErrback(
                lambda _: self.log.error("the admin endpoint is off until a reload names one that binds")
            )

    def _install_signal_handlers(self) -> None:
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self.reload))
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, lambda signum, frame: self.reactor.callFromThread(self.reopen_logs))
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, frame: self.reactor.callFromThread(self.terminate, signum))

    def reopen_logs(self) -> None:
        """SIGUSR1 (logrotate): every worker reopens its access log file."""
        for process in self.live():
            process.signal(signal.SIGUSR1)  # (Twisted names only HUP, STOP, INT, KILL and TERM)

    def terminate(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.terminating:
            self.log.info("{signal}: already shutting down", signal=name)
            return
        self.terminating = True
        self.log.info("{signal}: shutting down every worker", signal=name)
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass

    def reload(self) -> None:
        """SIGHUP: check the configuration here; only a good one reaches the workers."""
        self.log.info("SIGHUP: checking the configuration before the workers reload")
        try:
            config = self.load_config()
            validate(config)
        except CANNOT_RUN as e:
            for problem in cannot_run(e):
                self.log.error("reload refused, every worker keeps the running configuration: {why}", why=problem)
            return
        if self.wanted(config) != self.wanted(self.config) or config.server.workers != len(self.slots):
            if not self.replace_workers(config):
                return
        else:
            for process in self.live():
                process.send("reload")
            self.log.info("configuration checked; {count} workers reload it", count=len(self.live()))
        if config.server.admin != self.config.server.admin:
            self._move_admin(config.server.admin)
        if self.log_output is not None:
            self.log_output.log_format = config.server.log_format
        self.config = config

    def replace_workers(self, config: Config) -> bool:
        """New listeners or another number of workers: new workers on the new configuration, the old drain.

        False (and nothing changed) if a new listener cannot be bound.
        """
        kept = {(bound.label, bound.description): bound for bound in self.listeners}
        listeners: list[BoundListener] = []
        fresh: list[BoundListener] = []
        for label, description in self.wanted(config):
            bound = kept.pop((label, description), None)
            if bound is None:
                bound = self.bind_one(label, description, config.server.workers)
                if bound is None:
                    for new in fresh:
                        new.port.stopListening()
                    self.log.error("reload refused, every worker keeps the running configuration (above)")
                    return False
                fresh.append(bound)
            listeners.append(bound)
        for gone in kept.values():  # the old workers close their own copies as they stop
            gone.port.stopListening()
        self.listeners = listeners
        self.log.info(
            "listeners or the number of workers changed: {count} new workers start, the old ones drain",
            count=config.server.workers,
        )
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            if slot.process is not None and not slot.process.ended:
                self.retiring.add(slot.process)
                # It stops accepting now and drains a little later, so that the
                # handshakes it began finish rather than being cut.
                slot.process.send("retire")
                self.reactor.callLater(RETIRE_AFTER, slot.process.signal, "TERM")
            slot.handoff_in.close()  # the old workers hold their own copies
            slot.handoff_out.close()
        self.slots = new_slots(config.server.workers)
        self.replacing = True
        for slot in self.slots:
            self.start_worker(slot)
        return True

    def stopService(self) -> Deferred[Any]:
        """Every worker drains (up to shutdown_grace), then the listeners close."""
        self.running = False
        self.stopping = True
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            slot.restart = None
        grace = self.config.server.shutdown_grace
        self._all_gone = Deferred()
        for process in [*self.live(), *self.retiring]:
            process.signal("TERM")
        self._kill_timer = self.reactor.callLater(grace + KILL_AFTER_GRACE, self._kill_stragglers)
        self._check_all_gone()

        def close(_: Any) -> Any:
            if self._kill_timer is not None and self._kill_timer.active():
                self._kill_timer.cancel()
            closing = [maybeDeferred(bound.port.stopListening) for bound in self.listeners]
            if self.admin_listener is not None:
                closing.append(maybeDeferred(self.admin_listener.stopService))
            for slot in self.slots:
                slot.handoff_in.close()
                slot.handoff_out.close()
            self.log.info("stopped: no worker left")
            return DeferredList(closing)

        return self._all_gone.addCallback(close)

    def _kill_stragglers(self) -> None:
        for process in [*self.live(), *self.retiring]:
            self.log.warn(
                "worker {index} (pid {worker_pid}) still running: SIGKILL",
                index=process.slot.index,
                worker_pid=process.pid,
            )
            process.signal("KILL")

    def _check_all_gone(self) -> None:
        if self._all_gone is not None and not self._all_gone.called and not self.live() and not self.retiring:
            self._all_gone.callback(None)


def build_supervisor(reactor: Any, config: Config, config_path: str | None, output: Any) -> Supervisor:
    """Check the configuration as a worker will, then the supervisor that runs them."""
    validate(config)
    for warning in preflight.warnings(config):
        Supervisor.log.warn("{warning}", warning=warning)
    if config_path is None and os.environ.get("TLSPROXY_CONFIG"):
        config_path = os.environ["TLSPROXY_CONFIG"]
    return Supervisor(reactor, config, config_path)

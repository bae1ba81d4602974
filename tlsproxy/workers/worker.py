"""One worker process: the whole proxy, on listening sockets its supervisor passed.

A worker is the single-process proxy (:class:`tlsproxy.tap.ProxyService`)
with four differences: it adopts the listeners it inherited instead of
binding them; it leaves the admin endpoint to the supervisor; it takes
SIGHUP and Ctrl-C from the supervisor only (over the control pipe, after the
supervisor checked the new configuration); and it passes a connection whose
session ticket another worker made to that worker (:mod:`tlsproxy.tls.handoff`).
It stops when the supervisor goes away (the control pipe closes, or the
kernel's parent-death signal).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.stdio import StandardIO
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tlsproxy import preflight
from tlsproxy.admin import AdminHandler, store_notes
from tlsproxy.config import Config, ConfigError, Problem
from tlsproxy.eventloop import streamline, tune_collector
from tlsproxy.listening import watch_refusals
from tlsproxy.tap import Listener, ProxyService
from tlsproxy.tls.handoff import Handoff, HandoffReceiver
from tlsproxy.workers.messages import LineReader, MessageError, encode

# The descriptors every worker starts with (the supervisor's childFDs).
CONTROL_IN = 3  # the supervisor writes, we read
CONTROL_OUT = 4  # we write, the supervisor reads
PR_SET_PDEATHSIG = 1
KEY_NAMES_EVERY = 1.0  # seconds between looks at our ticket key names

log = Logger(namespace="tlsproxy.worker")


def read_spec(fd: int = CONTROL_IN) -> dict[str, Any]:
    """The first message on the control pipe: which descriptor is what (read before the reactor runs)."""
    data = b""
    while not data.endswith(b"\n"):
        # A byte at a time: what follows the first line (the supervisor may have sent more
        # already) is the control protocol's to read.
        chunk = os.read(fd, 1)
        if not chunk:
            raise ConfigError([Problem("worker", "", "the supervisor closed the control pipe before saying anything")])
        data += chunk
    (spec,) = LineReader().feed(data)
    return spec


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the supervisor dies (Linux), besides watching the pipe."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pipe's end is enough
        pass


def accept_one_at_a_time(port: Any) -> None:
    """Take one connection from the shared queue per wake-up, as nginx does without multi_accept.

    Twisted's port accepts in a loop while the socket is readable, so the first worker awake
    took a whole burst (wrk's 32 keep-alive connections sat on one of two workers in half the
    runs; bench/README.md). One accept a turn leaves the next connections to an idle worker.
    """
    accept = port.doRead

    def doRead() -> Any:
        port.numberAccepts = 1  # Twisted's doRead reads it first, then grows it for next time
        return accept()

    port.doRead = doRead


class AdoptedListener(Listener):
    """Accept on a listening socket the supervisor bound (descriptor ``fd`` here)."""

    def __init__(self, reactor: Any, fd: int, description: str, factory: Any, label: str, refused: Any) -> None:
        super().__init__(reactor, description, factory, label, refused)
        self.fd = fd

    def startService(self) -> None:
        Service.startService(self)  # we bind nothing
        try:
            probe = socket.socket(fileno=self.fd)
            family = probe.family
            probe.detach()
            # (haproxy: listeners get the service's PROXY header reader as their factory.)
            endpoint = AdoptedStreamServerEndpoint(self.reactor, self.fd, family)
        except OSError as e:
            self.listening = fail(e)
            return
        self.listening = endpoint.listen(self.factory).addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.port = port
        accept_one_at_a_time(port)
        watch_refusals(port, self.reactor, self.label, self.refused)
        return port


class NotPassed(Listener):
    """A listener a reload added: only the supervisor binds, at its start."""

    def startService(self) -> None:
        Service.startService(self)
        self.listening = fail(
            OSError(f"{self.description} is new: with [server] workers, listeners change when tlsproxy restarts")
        )


class ControlProtocol(Protocol):
    """The worker's end of the control pipe."""

    def __init__(self, worker: WorkerService) -> None:
        self.worker = worker
        self.reader = LineReader()

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self.reader.feed(data)
        except MessageError as e:
            log.error("the supervisor sent something unreadable: {error}", error=str(e))
            return
        for message in messages:
            self.worker.on_message(message)

    def connectionLost(self, reason: Any = None) -> None:
        self.worker.supervisor_gone()


class WorkerService(ProxyService):
    """The proxy of one worker process."""

    log = Logger()

    def __init__(self, reactor: Any, config: Config, config_path: str | None, spec: dict[str, Any]) -> None:
        self.index = int(spec["index"])
        # One order per certificate whatever the number of workers: worker 0 orders, all serve.
        self.acme_role = "issuer" if self.index == 0 else "watcher"
        self.adopted = {(item["label"], item["description"]): int(item["fd"]) for item in spec["listeners"]}
        super().__init__(reactor, config, config_path)
        senders = {int(slot): socket.socket(fileno=int(fd)) for slot, fd in spec["handoff_out"].items()}
        for sender in senders.values():
            sender.setblocking(False)
        self.handoff = Handoff(self.index, senders, self.metrics.handed_off)
        self.https_factory.handoff = self.handoff
        self.receiver = HandoffReceiver(reactor, socket.socket(fileno=int(spec["handoff_in"])), self.https_factory)
        self.control: Any = None
        # Our announcements of challenge answers the supervisor has not yet confirmed, by id.
        self._confirming: dict[int, Deferred[None]] = {}
        self._announcements = 0
        self._names: list[str] = []
        self._names_loop = LoopingCall(self._report_key_names)
        self._names_loop.clock = reactor
        self._hook_certificates()

    # -- what differs from one process ----------------------------------------

    def _wanted(self, config: Config) -> dict[tuple[str, str], Any]:
        wanted = super()._wanted(config)
        return {key: factory for key, factory in wanted.items() if factory is not self.admin_factory}

    def _listener(self, key: tuple[str, str], factory: Any, refused: Any) -> Any:
        fd = self.adopted.get(key)
        if fd is None:
            return NotPassed(self.reactor, key[1], factory, key[0], refused)
        return AdoptedListener(self.reactor, fd, key[1], factory, key[0], refused)

    def _install_signal_handlers(self) -> None:
        super()._install_signal_handlers()  # SIGTERM drains, SIGUSR1 reopens the access log file
        # A terminal's Ctrl-C and SIGHUP reach the whole process group: the
        # supervisor decides what they mean and tells us.
        for name in ("SIGHUP", "SIGINT"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)

    def announce_ready(self) -> None:
        self.log.info("worker {index} ready", index=self.index)
        self.send("ready")

    def reload(self) -> None:
        super().reload()
        self._hook_certificates()

    def _certificate_services(self) -> list[Any]:
        from tlsproxy.acme.service import CertificateService

        return [s for s in self.generation.certificates if isinstance(s, CertificateService)]

    def _hook_certificates(self) -> None:
        """A renewal here is announced, so the other workers read the store at once, not at their next poll."""
        for service in self._certificate_services():
            service.renewed = lambda site: self.send("renewed", site=site)
            service.published = self.announce_challenges

    def announce_challenges(self) -> Deferred[None]:
        """Our answers are in the store: the others read it now; fires once the supervisor says they serve them."""
        self._announcements += 1
        ident = self._announcements
        confirmed: Deferred[None] = Deferred()
        self._confirming[ident] = confirmed
        self.send("challenges", id=ident)
        return confirmed

    def load_challenges(self, ident: Any) -> None:
        """Another worker's answers are in the store: read them, then say so (its order waits for that)."""
        scans = [service.scan() for service in self._certificate_services()]

        def loaded(results: list[tuple[bool, Any]]) -> None:
            self.send("loaded", id=ident, ok=all(ok and read for ok, read in results))

        DeferredList(scans, consumeErrors=True).addCallback(loaded)

    # -- life cycle ------------------------------------------------------------

    def startService(self) -> None:
        self.control = StandardIO(  # type: ignore[call-arg]  # (the POSIX one takes descriptors)
            ControlProtocol(self), stdin=CONTROL_IN, stdout=CONTROL_OUT, reactor=self.reactor
        )
        self.receiver.start()
        super().startService()
        self._names_loop.start(KEY_NAMES_EVERY, now=True)

    def stopService(self) -> Any:
        if self._names_loop.running:
            self._names_loop.stop()
        self.receiver.stop()
        return super().stopService()

    def stop_accepting(self) -> None:
        """New workers took over: accept nothing more, finish the handshakes begun, await SIGTERM."""
        self.log.info("worker {index}: new workers took over; accepting no more connections", index=self.index)
        for listener in self.listeners.values():
            port, listener.port = listener.port, None
            if port is not None:
                port.stopListening()

    def supervisor_gone(self) -> None:
        confirming, self._confirming = self._confirming, {}
        for confirmed in confirming.values():  # nobody will confirm: the orders go on
            confirmed.callback(None)
        if self.terminating:
            return
        self.log.warn("the supervisor is gone: stopping")
        self._terminate(signal.SIGTERM)

    # -- the control pipe --------------------------------------------------------

    def send(self, kind: str, **fields: Any) -> None:
        if self.control is not None:
            self.control.write(encode(kind, **fields))

    def on_message(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "reload":
            self.reload()
        elif kind == "retire":
            self.stop_accepting()
        elif kind == "challenges" and "id" in message:
            self.load_challenges(message["id"])
        elif kind in ("renewed", "challenges"):
            for service in self._certificate_services():
                service.scan()
        elif kind == "confirmed":
            confirmed = self._confirming.pop(message.get("id"), None)  # type: ignore[arg-type]
            if confirmed is not None:
                confirmed.callback(None)
        elif kind == "tickets":
            owners = message.get("owners", {})
            self.handoff.update({int(slot): [bytes.fromhex(n) for n in names] for slot, names in owners.items()})
        elif kind == "scrape":
            self.send("scraped", id=message.get("id"), text=self.metrics.render().decode("utf-8", "replace"))
        elif kind == "readiness":
            ident = message.get("id")
            admin = AdminHandler(self, self.metrics.render)
            admin.readiness().addCallback(
                lambda problems: self.send(
                    "readiness",
                    id=ident,
                    problems=problems,
                    upstreams=admin.upstream_states(),
                    notes=store_notes(self.generation),
                )
            )
        else:
            self.log.warn("unknown message from the supervisor: {kind}", kind=kind)

    def _report_key_names(self) -> None:
        """Tell the supervisor which ticket key names are ours (after a rotation or a reload)."""
        names = [g.key_name.hex() for g in self.generation.sni.tickets.generations if g.key_name is not None]
        if names != self._names:
            self._names = names
            self.send("tickets", names=names)


def build_worker(reactor: Any, config: Config, config_path: str | None, index: str, output: Any) -> WorkerService:
    """Read what the supervisor passed, tune the process like a single one, and build its service."""
    spec = read_spec()
    if str(spec.get("index")) != str(index):
        raise ConfigError([Problem(f"worker {index}", "", f"the supervisor's spec is for worker {spec.get('index')}")])
    die_with_parent()
    if output is not None:
        output.worker = int(index)
    streamline(reactor)
    tune_collector()
    problems = preflight.problems(config)
    if problems:
        raise ConfigError(problems)
    return WorkerService(reactor, config, config_path, spec)

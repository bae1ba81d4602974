"""``twist tlsproxy``: the composition root, the one place the service graph is built.

The listeners live as long as the process.  Everything the configuration
decides (TLS policy, SNI map, sites, certificate services) is one
:class:`Generation`; SIGHUP builds a new one from the re-read configuration and
swaps it in, so new connections get the new settings while open ones finish
on the old.  A configuration that does not load is refused and the running
one stays.
"""

from __future__ import annotations

import datetime
import errno
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger, LogLevel
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from tlsproxy import config as configuration
from tlsproxy import preflight
from tlsproxy.admin import AdminHandler
from tlsproxy.certs.challenges import HTTP01Answers, TLSALPN01Answers
from tlsproxy.certs.model import CertificateError, CertifiedKey, certificate_warnings
from tlsproxy.config import Config, ConfigError, Upstream
from tlsproxy.devca import CAError
from tlsproxy.eventloop import streamline, tune_collector
from tlsproxy.http.negotiate import NegotiatingFactory
from tlsproxy.http.plain import PlainHTTPHandler
from tlsproxy.http.server import HTTP11Factory, Limits
from tlsproxy.http.tracker import ConnectionTracker
from tlsproxy.listening import watch_refusals, with_backlog
from tlsproxy.logs import LogOutput
from tlsproxy.metrics import Metrics
from tlsproxy.proxy.accesslog import AccessLog, AccessLogFile
from tlsproxy.proxy.handler import ProxyHandler
from tlsproxy.proxy.health import HealthChecks
from tlsproxy.proxy.reqbuffer import threaded
from tlsproxy.proxyprotocol import ProxyHeaderFactory, split_description
from tlsproxy.tls.policy import TLSPolicy
from tlsproxy.tls.sni import SniMap, SniServer
from tlsproxy.tls.tickets import TicketKeyRotation
from tlsproxy.tls.transport import TLSServerFactory

READY = "tlsproxy: ready"
log = Logger(namespace="tlsproxy")


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Terminate TLS and proxy to your app (gunicorn, runserver, uvicorn).\n"
        "With --config (or TLSPROXY_CONFIG) it runs the sites of that TOML file; "
        "with neither and no TLSPROXY_* configuration variables it is the local HTTPS dev proxy: "
        "https://localhost:8443 in front of http://127.0.0.1:8000. "
        "SIGHUP reloads the configuration; SIGTERM drains and exits 0. "
        "Exit status 1: a listener could not bind; 2: the configuration cannot run."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: $TLSPROXY_CONFIG)."],
        ["worker", None, None, "Internal: run as worker INDEX of a supervisor ([server] workers)."],
    ]


def limits_of(config: Config) -> Limits:
    server = config.server
    return Limits(
        max_request_line=server.max_request_line,
        max_header_size=server.max_header_size,
        max_header_count=server.max_header_count,
        header_timeout=server.header_timeout,
        body_timeout=server.body_timeout,
        idle_timeout=server.idle_timeout,
        handshake_timeout=server.handshake_timeout,
    )


def policy_of(config: Config) -> TLSPolicy:
    tls = config.tls
    return TLSPolicy(min_version=tls.min_version, ciphers=tls.ciphers, dhparams=tls.dhparams, alpn=tls.alpn)


def https_port_of(config: Config) -> int:
    """The public HTTPS port redirects point at (443 unless a tcp: string says otherwise)."""
    for description in config.server.https:
        kind, _, rest = description.partition(":")
        if kind == "tcp":
            port = rest.split(":", 1)[0].removeprefix("port=")
            if port.isdigit() and int(port) != 0:
                return int(port)
    return 443


PRIVILEGED_PORT_ADVICE = (
    "ports below 1024 need privilege: let systemd bind them (deploy/systemd/tlsproxy.socket, "
    'https = ["systemd:domain=INET6:name=https"]), grant CAP_NET_BIND_SERVICE '
    "(deploy/systemd/capability/tlsproxy.service), or listen on a port from 1024 up (tcp:8443)"
)


def cannot_listen(label: str, description: str, error: BaseException) -> str:
    """One line that says which listener failed, why, and what to do about it."""
    cause = getattr(error, "socketError", None) or error
    code = getattr(cause, "errno", None)
    reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
    line = f"cannot listen on {description} ({label}): {reason}"
    if code in (errno.EACCES, errno.EPERM):
        return f"{line}; {PRIVILEGED_PORT_ADVICE}"
    if code == errno.EADDRINUSE:
        return f"{line}; another process listens there (ss -ltnp shows which): stop it or choose another port"
    if code == errno.EADDRNOTAVAIL:
        return f"{line}; the interface address is not one of this machine's"
    if description.startswith("systemd:"):
        return (
            f"{line}; systemd passed no such socket (LISTEN_FDS, LISTEN_FDNAMES): start tlsproxy.service"
            " with its .socket units (deploy/systemd), or listen on tcp:PORT instead"
        )
    return line


@dataclass
class Generation:
    """What one version of the configuration builds."""

    config: Config
    policy: TLSPolicy
    limits: Limits
    sni_map: SniMap
    sni: SniServer
    handler: ProxyHandler
    certificates: MultiService


def build_generation(
    reactor: Any,
    config: Config,
    http01: HTTP01Answers,
    alpn01: TLSALPN01Answers,
    metrics: Metrics | None,
    access_file: AccessLogFile | None = None,
    acme_role: str = "alone",
) -> Generation:
    """Everything a configuration decides, ready to serve; raises on bad certificate files."""
    policy = policy_of(config)
    sni_map = SniMap((site.name, site.hosts) for site in config.sites)
    sni = SniServer(policy, sni_map, alpn01)
    for site in config.sites:
        if site.tls == "files":
            certified = CertifiedKey.from_pem(
                Path(site.cert).read_bytes(), Path(site.key).read_bytes(), source=site.cert
            )
            sni_map.set_context(site.name, sni.context_for(certified))
            log.info(
                "site {site}: certificate from {cert} for {names}, issuer {issuer}, not after {not_after}",
                site=site.name,
                cert=site.cert,
                names=", ".join(certified.dns_names),
                issuer=certified.issuer,
                not_after=certified.not_after.isoformat(),
            )
            for warning in certificate_warnings(
                certified, datetime.datetime.fromtimestamp(reactor.seconds(), datetime.UTC)
            ):
                log.warn("site {site}: {cert}: {warning}", site=site.name, cert=site.cert, warning=warning)
    certificates = MultiService()
    TicketKeyRotation(reactor, sni.rotate_ticket_keys, config.tls.ticket_key_rotation).setServiceParent(certificates)
    _add_certificate_services(certificates, reactor, config, sni, http01, alpn01, metrics, acme_role)
    access_log = (
        AccessLog(reactor, file=access_file, stdout=config.server.access_log)
        if config.server.access_log or access_file is not None
        else None
    )
    handler = ProxyHandler(reactor, config.sites, config.server, access_log, dev=config.dev, metrics=metrics)
    HealthChecks(reactor, handler.groups).setServiceParent(certificates)  # runs while this generation is current
    watcher = handler.error_pages.watcher(reactor)  # maintenance files, looked for once a second
    if watcher is not None:
        watcher.setServiceParent(certificates)
    for site in config.sites:
        log.info(
            "site {site}: {hosts} -> {upstream} (certificate: {source}, HSTS: {hsts})",
            site=site.name,
            hosts=", ".join(site.hosts),
            upstream=", ".join(u.url for u in site.upstreams),
            source=site.tls,
            hsts=(site.hsts.header_value() or b"off").decode(),
        )
    log.info(
        "TLS {floor}+, ALPN {alpn}, key exchange groups {groups}, TLS 1.2 ciphers {ciphers}{dh}",
        floor=policy.min_version,
        groups=policy.groups,
        alpn=",".join(policy.alpn) or "off",
        ciphers=policy.ciphers,
        dh=", DH parameters from " + policy.dhparams if policy.dhparams else "",
    )
    return Generation(config, policy, limits_of(config), sni_map, sni, handler, certificates)


def _add_certificate_services(
    parent: MultiService,
    reactor: Any,
    config: Config,
    sni: SniServer,
    http01: HTTP01Answers,
    alpn01: TLSALPN01Answers,
    metrics: Metrics | None,
    acme_role: str = "alone",
) -> None:
    """Certificates that change while we run: ACME, watched files, the dev CA."""
    if any(site.tls in ("acme", "files") for site in config.sites):
        from tlsproxy.acme.service import CertificateService

        CertificateService(reactor, config, sni, http01, alpn01, metrics=metrics, role=acme_role).setServiceParent(
            parent
        )
    local = [site for site in config.sites if site.tls == "local"]
    if local:
        from tlsproxy import devca

        ca = devca.LocalCA.load_or_create(devca.default_caroot())
        if config.dev:
            log.info(
                "tlsproxy dev: https://localhost:{port}/ -> {upstream}",
                port=https_port_of(config),
                upstream=local[0].upstream.url,
            )
            log.info(
                "tlsproxy dev: certificates from the local CA in {root} (trust it once: tlsproxy ca install)",
                root=str(ca.root_pem_path.parent),
            )
            log.info(
                "tlsproxy dev: in Django's settings set SECURE_PROXY_SSL_HEADER = "
                '("HTTP_X_FORWARDED_PROTO", "https"), or its CSRF check refuses forms ("Origin checking failed")'
            )
            warn_if_no_app(reactor, local[0].upstream)
        else:
            log.info("local development CA: {root}", root=str(ca.root_pem_path))
        devca.LocalCertificateService(reactor, ca, sni, local).setServiceParent(parent)


APP_DIAL_TIMEOUT = 2.0


class _HangUp(Protocol):
    def connectionMade(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]


class _AppDial(ClientFactory):
    """One connection attempt to the dev app: a warning if it fails, nothing said if it connects."""

    protocol = _HangUp

    def __init__(self, where: str, hint: str) -> None:
        self.where = where
        self.hint = hint

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        log.warn(
            "tlsproxy dev: nothing answers on {where} yet: {hint} (until then every page is 502)",
            where=self.where,
            hint=self.hint,
        )


def warn_if_no_app(reactor: Any, upstream: Upstream) -> None:
    """Say at start-up when the dev app is not running (otherwise only the 502 page says it).

    One connection attempt through the reactor, never waited for: the proxy
    starts either way and the app may come up later.
    """
    factory = _AppDial(upstream.url.removeprefix("http://"), configuration.dev_app_hint(upstream))
    if upstream.is_unix:
        reactor.connectUNIX(upstream.unix_path, factory, timeout=APP_DIAL_TIMEOUT)
    else:
        reactor.connectTCP(upstream.host, upstream.port, factory, timeout=APP_DIAL_TIMEOUT)


@implementer(IOpenSSLServerConnectionCreator)
class CurrentSni:
    """Hands each new TLS connection to the SNI server of the current generation."""

    def __init__(self, sni: SniServer) -> None:
        self.sni = sni

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return self.sni.serverConnectionForTLS(protocol)


class Listener(Service):
    """Listen on one endpoint string; remember the port once bound."""

    log = Logger()

    def __init__(self, reactor: Any, description: str, factory: Any, label: str, refused: Any = None) -> None:
        self.reactor = reactor
        self.refused = refused  # counts connections refused at accept (out of file descriptors)
        self.description = description
        self.factory = factory
        self.label = label
        self.port: Any = None
        self.listening: Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        try:
            # A systemd: endpoint looks its socket up right here, and raises if none was passed.
            # haproxy: is ours (ProxyHeaderFactory, made by the service), not Twisted's wrapper.
            endpoint = serverFromString(self.reactor, with_backlog(split_description(self.description)[1]))
        except Exception as e:  # KeyError, IndexError, ValueError: whatever the parser met
            self.listening = fail(e)
            return
        self.listening = endpoint.listen(self.factory)
        self.listening.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.port = port
        watch_refusals(port, self.reactor, self.label, self.refused)
        host = port.getHost()
        where = f"{getattr(host, 'host', '')}:{host.port}" if hasattr(host, "port") else str(host)
        self.log.info(
            "{label} listening on {where} ({description})", label=self.label, where=where, description=self.description
        )
        return port

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None


# What loading a configuration and building its service raise when it cannot
# run here (the local CA's directory too): exit status 2 at start, a refused
# reload later; one line per problem (cannot_run).
CANNOT_RUN = (ConfigError, CertificateError, CAError, OSError)


def cannot_run(error: BaseException) -> list[str]:
    """The lines that tell a user why the configuration cannot run here."""
    if isinstance(error, ConfigError):
        return [str(problem) for problem in error.problems]
    return [str(error)]


class ProxyService(MultiService):
    """Everything one tlsproxy process runs."""

    log = Logger()
    # Who orders certificates (see CertificateService): a worker process says otherwise.
    acme_role = "alone"

    def __init__(
        self,
        reactor: Any,
        config: Config,
        config_path: str | None = None,
        load_config: Callable[[], Config] | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config_path = config_path
        # What SIGHUP re-reads: the file (or environment), unless the caller made
        # the configuration itself (tlsproxy dev's --upstream and --listen).
        self.load_config = load_config or (lambda: configuration.load(config_path))
        self.ready = False
        # What the process should exit with once the reactor stops: 1 when a
        # listener could not bind, so a supervisor (systemd Restart=on-failure) sees it.
        self.exit_status = 0
        self.terminating = False
        # The log output twist writes through, when it is ours: SIGHUP switches its format.
        self.log_output: LogOutput | None = None
        self.metrics = Metrics()
        self.http01 = HTTP01Answers()
        self.alpn01 = TLSALPN01Answers()
        # The access log file outlives generations: SIGUSR1 reopens it, SIGHUP may move it.
        self.access_file = self._access_file(config)
        self.generation = build_generation(
            reactor, config, self.http01, self.alpn01, self.metrics, self.access_file, acme_role=self.acme_role
        )
        generation = self.generation
        self.metrics.watch_certificates(
            lambda: {s: self.generation.sni_map.context_of(s) for s in self.generation.sni_map.sites}
        )
        self.metrics.watch_upstreams(lambda: [s for g in self.generation.handler.groups for s in g.states()])

        self.https_trackers = ConnectionTracker(self.metrics.open_connections.labels("https"))
        self.http_trackers = ConnectionTracker(self.metrics.open_connections.labels("http"))
        self.creator = CurrentSni(generation.sni)
        self.https_app = NegotiatingFactory(
            generation.handler, reactor, generation.limits, self.https_trackers, self.metrics
        )
        self.https_factory = TLSServerFactory(
            self.creator, self.https_app, reactor, handshake_timeout=generation.limits.handshake_timeout
        )
        self.plain = PlainHTTPHandler(self.http01, self._is_our_host, https_port_of(config), self._canonical)
        self.plain_factory = HTTP11Factory(
            self.plain, reactor, generation.limits, secure=False, tracker=self.http_trackers
        )
        self.admin_factory = HTTP11Factory(
            AdminHandler(self, self.metrics.render), reactor, Limits(), secure=False, tracker=ConnectionTracker()
        )
        self.listeners: dict[tuple[str, str], Listener] = {}
        self.proxy_header_factories: dict[int, ProxyHeaderFactory] = {}
        self._sync_listeners(config)
        generation.certificates.setServiceParent(self)

    def _access_file(self, config: Config) -> AccessLogFile | None:
        """The access log file ``config`` names: the open one if it is the same path (opened on first write)."""
        path = config.server.access_log_file
        current = getattr(self, "access_file", None)
        if current is not None and current.path == path:
            return current
        return AccessLogFile(path, self.reactor, threaded(self.reactor)) if path else None

    def reopen_logs(self) -> None:
        """SIGUSR1: reopen the access log file (logrotate has moved it)."""
        if self.access_file is not None:
            self.log.info("SIGUSR1: reopening {path}", path=self.access_file.path)
            self.access_file.reopen()

    def _is_our_host(self, host: str) -> bool:
        return self.generation.handler.is_our_host(host)

    def _canonical(self, host: str) -> str | None:
        return self.generation.handler.canonical.get(host)

    # -- listeners -------------------------------------------------------------

    def _proxied(self, config: Config, description: str, factory: Any) -> Any:
        """``factory``, behind a PROXY protocol reader if ``description`` is haproxy:...; one per factory."""
        if not split_description(description)[0]:
            return factory
        wrapper = self.proxy_header_factories.get(id(factory))
        if wrapper is None:
            wrapper = self.proxy_header_factories[id(factory)] = ProxyHeaderFactory(
                factory, config.server.trusted_proxies, self.reactor, config.server.handshake_timeout
            )
        # SIGHUP may change who is trusted: every wrapper follows the newest configuration.
        wrapper.trusted = tuple(config.server.trusted_proxies)
        wrapper.timeout = config.server.handshake_timeout
        return wrapper

    def _wanted(self, config: Config) -> dict[tuple[str, str], Any]:
        wanted: dict[tuple[str, str], Any] = {}
        for description in config.server.https:
            wanted[("https", description)] = self._proxied(config, description, self.https_factory)
        for description in config.server.http:
            wanted[("http (ACME HTTP-01, redirect to https)", description)] = self._proxied(
                config, description, self.plain_factory
            )
        if config.server.admin:
            wanted[("admin (/healthz /readyz /metrics)", config.server.admin)] = self.admin_factory
        return wanted

    def _sync_listeners(self, config: Config) -> list[tuple[tuple[str, str], Deferred[Any]]]:
        """Start listeners the config names and stop the ones it no longer does."""
        wanted = self._wanted(config)
        started = []
        for key in list(self.listeners):
            if key not in wanted:
                listener = self.listeners.pop(key)
                listener.disownServiceParent()
        for key, factory in wanted.items():
            if key not in self.listeners:
                refused = self.metrics.refused_connections.labels(key[0].split()[0])
                listener = self._listener(key, factory, refused)
                self.listeners[key] = listener
                listener.setServiceParent(self)
                if listener.listening is not None:
                    started.append((key, listener.listening))
        return started

    def _listener(self, key: tuple[str, str], factory: Any, refused: Any) -> Any:
        """The service that listens for ``key`` (label, endpoint string)."""
        return Listener(self.reactor, key[1], factory, key[0], refused)

    # -- life cycle ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # Before "ready" can be said: a SIGHUP sent on seeing it must find our handler.
        self.reactor.callWhenRunning(self._install_signal_handlers)
        waiting = []
        for (label, description), listener in self.listeners.items():
            if listener.listening is not None:
                waiting.append(listener.listening.addErrback(self._cannot_listen, label, description))
        gatherResults(waiting, consumeErrors=True).addCallbacks(self._ready, self._failed)

    def _install_signal_handlers(self) -> None:
        # After the reactor's own (installed while it starts): ours replace them.
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self.reload))
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, lambda signum, frame: self.reactor.callFromThread(self.reopen_logs))
        # Twisted would re-raise SIGTERM after shutdown (exit status 143); a
        # drained, orderly stop is a success, so stop the reactor ourselves.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, frame: self.reactor.callFromThread(self._terminate, signum))

    def _terminate(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.terminating:
            # systemd and docker send SIGTERM once, people press Ctrl-C twice.
            self.log.info(
                "{signal}: already shutting down; requests in flight have up to {grace:g}s (SIGKILL stops at once)",
                signal=name,
                grace=self.generation.config.server.shutdown_grace,
            )
            return
        self.terminating = True
        self.log.info("{signal}: shutting down", signal=name)
        try:
            self.reactor.stop()
        except ReactorNotRunning:  # stopping already (a listener failed)
            pass

    def _ready(self, _: Any) -> None:
        if not getattr(self.reactor, "running", True):
            # Listening already, but the signal handlers come with the running
            # reactor: say "ready" after them (callWhenRunning keeps the order).
            self.reactor.callWhenRunning(self._ready, None)
            return
        self._update_https_port()
        self.ready = True
        self.announce_ready()

    def announce_ready(self) -> None:
        self.log.info(READY)

    def _update_https_port(self) -> None:
        """Redirect to the port the first HTTPS listener really has (systemd sockets, tcp:0)."""
        for (label, _), listener in self.listeners.items():
            if (
                label == "https"
                and listener.port is not None
                and hasattr(listener.port.getHost(), "port")
                # Behind a load balancer, the port clients use is the balancer's.
                and not split_description(listener.description)[0]
            ):
                self.plain.https_port = listener.port.getHost().port
                break

    def _cannot_listen(self, failure: Any, label: str, description: str) -> Any:
        self.log.critical("tlsproxy: {message}", message=cannot_listen(label, description, failure.value))
        return failure

    def _forget_listener(self, failure: Any, key: tuple[str, str]) -> Any:
        """A listener a reload could not bind is forgotten, so the next SIGHUP tries it again."""
        listener = self.listeners.pop(key, None)
        if listener is not None:
            listener.disownServiceParent()
        return failure

    def _failed(self, failure: Any) -> None:
        self.exit_status = 1
        self.reactor.callWhenRunning(self.reactor.stop)

    def reload(self) -> None:
        """SIGHUP: re-read the configuration; swap it in, or keep the old one."""
        self.log.info("SIGHUP: reloading the configuration")
        try:
            config = self.load_config()
            problems = preflight.problems(config)
            if problems:
                raise ConfigError(problems)
            access_file = self._access_file(config)
            generation = build_generation(
                self.reactor, config, self.http01, self.alpn01, self.metrics, access_file, acme_role=self.acme_role
            )
        except CANNOT_RUN as e:
            for problem in cannot_run(e):
                self.log.error("reload refused, the running configuration stays: {problem}", problem=problem)
            return
        old = self.generation
        self.generation = generation
        if self.access_file is not None and self.access_file is not access_file:
            self.access_file.close()  # the path changed: what is pending goes out, then it is closed
        self.access_file = access_file
        if self.log_output is not None:
            self.log_output.log_format = config.server.log_format
        self.creator.sni = generation.sni
        self.https_app.handler = generation.handler
        self.https_app.limits = generation.limits
        self.https_factory.handshake_timeout = generation.limits.handshake_timeout
        self.plain_factory.limits = generation.limits
        self.plain.https_port = https_port_of(config)
        self._update_https_port()
        old.certificates.disownServiceParent()
        generation.certificates.setServiceParent(self)
        started = self._sync_listeners(config)
        # Idle keep-alive connections to the old apps are closed; requests in
        # flight keep theirs until they finish.  Open client connections send
        # their next requests to the new handler, which keeps the upstreams' health.
        old.handler.close(generation.handler)
        waiting = [
            listening.addErrback(self._cannot_listen, *key).addErrback(self._forget_listener, key)
            for key, listening in started
        ]
        gatherResults(waiting, consumeErrors=True).addCallbacks(
            lambda _: self.log.info("configuration reloaded from {source}", source=config.source),
            lambda _: self.log.error("reloaded, but a new listener failed (above); the others serve"),
        )

    def stopService(self) -> Deferred[Any]:
        """Stop accepting, let requests in flight finish (up to shutdown_grace), then stop."""
        self.running = False
        grace = self.generation.config.server.shutdown_grace
        self.log.info("stopping: no new connections; waiting up to {grace:g}s for requests in flight", grace=grace)
        stopping = [maybeDeferred(listener.stopService) for listener in self.listeners.values()]
        draining = [
            self.https_trackers.drain(self.reactor, grace),
            self.http_trackers.drain(self.reactor, grace),
        ]
        done = gatherResults(stopping + draining, consumeErrors=True)

        def finish(_: Any) -> Any:
            self.generation.handler.close()
            self.log.info("stopped")
            closing = [maybeDeferred(self.generation.certificates.stopService)]
            if self.access_file is not None:
                closing.append(self.access_file.close())
            return gatherResults(closing, consumeErrors=True)

        return done.addBoth(finish)


def build_service(
    reactor: Any, config: Config, config_path: str | None = None, load_config: Callable[[], Config] | None = None
) -> ProxyService:
    return ProxyService(reactor, config, config_path, load_config)


def prepare_service(
    reactor: Any, config: Config, config_path: str | None = None, load_config: Callable[[], Config] | None = None
) -> ProxyService:
    """Tune the process for proxying and build its service.

    The one path from a configuration to a service, for ``twist tlsproxy`` and
    ``tlsproxy dev`` alike, so the dev proxy runs what production runs (the
    direct event dispatch, the collector thresholds, the preflight checks).
    Raises one of CANNOT_RUN when the configuration cannot run here.
    """
    streamline(reactor)
    tune_collector()
    problems = preflight.problems(config)
    if problems:
        raise ConfigError(problems)
    for warning in preflight.warnings(config):
        log.warn("{warning}", warning=warning)
    return build_service(reactor, config, config_path, load_config)


def exit_with_status(service: ProxyService) -> None:
    """After shutdown, leave with the service's exit status when it is not 0.

    ``twist`` exits 0 whenever its reactor stops; a proxy that never listened
    must not look like a clean stop to systemd, so this ends the process once
    the shutdown has run (logs flushed first).
    """
    if service.exit_status:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(service.exit_status)


Build = Callable[[Any, Config, "Options", LogOutput | None], Any]


def makeService(options: Options, build: Build | None = None) -> Any:
    """``twist tlsproxy``: load the configuration, set the log output up, and ``build`` the service.

    ``build`` (reactor, config, options, log output) defaults to the one-process
    service; :mod:`tlsproxy.workers`, the plugin's entry, passes the one that
    may be a supervisor or one of its workers.
    """
    from twisted.internet import reactor

    try:
        config = configuration.load(options["config"])
        twist_options = getattr(options, "parent", None)
        output = None
        if twist_options is not None and not any(a.startswith("--log-format") for a in sys.argv):
            output = LogOutput(config.server.log_format, twist_options.get("logLevel") or LogLevel.info)
            twist_options["fileLogObserverFactory"] = output
            twist_options["logFormat"] = config.server.log_format
            output.install(reactor)  # access lines go straight to it, batched (tlsproxy/logs.py)
        if build is None:
            service = prepare_service(reactor, config, options["config"])
        else:
            service = build(reactor, config, options, output)
    except CANNOT_RUN as e:
        for line in cannot_run(e):
            print(f"tlsproxy: {line}", file=sys.stderr)
        # 2: a configuration that cannot run here; a restart will not help
        # (deploy/systemd's units say RestartPreventExitStatus=2).
        raise SystemExit(2) from None
    service.log_output = output
    reactor.addSystemEventTrigger("after", "shutdown", exit_with_status, service)
    return service

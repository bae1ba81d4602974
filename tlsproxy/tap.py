"""``twist tlsproxy``: the composition root, the one place the service graph is built."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from tlsproxy import config as configuration
from tlsproxy.acme.challenges import HTTP01Answers, TLSALPN01Answers
from tlsproxy.certs.model import CertificateError, CertifiedKey
from tlsproxy.config import Config, ConfigError
from tlsproxy.http.negotiate import NegotiatingFactory
from tlsproxy.http.plain import PlainHTTPHandler
from tlsproxy.http.server import HTTP11Factory, Limits
from tlsproxy.logs import observer_factory
from tlsproxy.proxy.accesslog import AccessLog
from tlsproxy.proxy.handler import ProxyHandler
from tlsproxy.tls.policy import TLSPolicy
from tlsproxy.tls.sni import SniMap, SniServer

READY = "tlsproxy: ready"


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Terminate TLS and proxy to your app (gunicorn, runserver, uvicorn).\n"
        "With --config (or TLSPROXY_CONFIG) it runs the sites of that TOML file; "
        "with neither and no TLSPROXY_* variables it is the local HTTPS dev proxy: "
        "https://localhost:8443 in front of http://127.0.0.1:8000."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: $TLSPROXY_CONFIG)."],
    ]


class Listener(Service):
    """Listen on one endpoint string; remember the port once bound."""

    log = Logger()

    def __init__(self, reactor: Any, description: str, factory: Any, label: str) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.label = label
        self.port: Any = None
        self.listening: Any = None

    def startService(self) -> None:
        super().startService()
        endpoint = serverFromString(self.reactor, self.description)
        self.listening = endpoint.listen(self.factory)
        self.listening.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.port = port
        host = port.getHost()
        where = f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}" if hasattr(host, "port") else str(host)
        self.log.info("{label} listening on {where} ({description})", label=self.label, where=where, description=self.description)
        return port

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None


class ProxyService(MultiService):
    """Everything one tlsproxy process runs; says "ready" once all listeners are up."""

    log = Logger()

    def __init__(self, reactor: Any, config: Config) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.listeners: list[Listener] = []
        self.handler: ProxyHandler | None = None
        self.plain_handler: PlainHTTPHandler | None = None

    def startService(self) -> None:
        super().startService()
        waiting = [listener.listening for listener in self.listeners]
        DeferredList(waiting, fireOnOneErrback=True, consumeErrors=True).addCallbacks(self._ready, self._failed)

    def _ready(self, _: Any) -> None:
        if self.plain_handler is not None:
            for listener in self.listeners:
                if listener.label == "https" and hasattr(listener.port.getHost(), "port"):
                    self.plain_handler.https_port = listener.port.getHost().port
                    break
        self.log.info(READY)

    def _failed(self, failure: Any) -> None:
        error = failure.value.subFailure if hasattr(failure.value, "subFailure") else failure
        self.log.critical("tlsproxy: cannot listen: {error}", error=error.getErrorMessage())
        self.reactor.callWhenRunning(self._exit)

    def _exit(self) -> None:
        self.reactor.stop()
        sys.exitcode = 1  # type: ignore[attr-defined]

    def stopService(self) -> Any:
        result = super().stopService()
        if self.handler is not None:
            self.handler.close()
        return result


def limits_of(config: Config) -> Limits:
    server = config.server
    return Limits(
        max_request_line=server.max_request_line,
        max_header_size=server.max_header_size,
        max_header_count=server.max_header_count,
        header_timeout=server.header_timeout,
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


def build_service(reactor: Any, config: Config) -> ProxyService:
    """Wire config -> TLS, SNI, certificates, handlers and listeners."""
    log = Logger(namespace="tlsproxy")
    top = ProxyService(reactor, config)
    policy = policy_of(config)
    sni_map = SniMap((site.name, site.hosts) for site in config.sites)
    http01 = HTTP01Answers()
    alpn01 = TLSALPN01Answers()
    sni = SniServer(policy, sni_map, alpn01)
    limits = limits_of(config)

    for site in config.sites:
        if site.tls == "files":
            certified = CertifiedKey.from_pem(Path(site.cert).read_bytes(), Path(site.key).read_bytes(), source=site.cert)
            sni_map.set_context(site.name, sni.context_for(certified))
            log.info(
                "site {site}: certificate from {cert} for {names}, issuer {issuer}, not after {not_after}",
                site=site.name,
                cert=site.cert,
                names=", ".join(certified.dns_names),
                issuer=certified.issuer,
                not_after=certified.not_after.isoformat(),
            )
    _add_certificate_services(top, reactor, config, sni, http01, alpn01)

    access_log = AccessLog(reactor) if config.server.access_log else None
    handler = ProxyHandler(reactor, config.sites, config.server, access_log, dev=config.dev)
    top.handler = handler
    for site in config.sites:
        log.info(
            "site {site}: {hosts} -> {upstream} (certificate: {source}, HSTS: {hsts})",
            site=site.name,
            hosts=", ".join(site.hosts),
            upstream=site.upstream.url,
            source=site.tls,
            hsts=(site.hsts.header_value() or b"off").decode(),
        )

    https_factory = TLSMemoryBIOFactory(sni, False, NegotiatingFactory(handler, reactor, limits))
    https_factory.noisy = False
    for description in config.server.https:
        listener = Listener(reactor, description, https_factory, "https")
        listener.setServiceParent(top)
        top.listeners.append(listener)
    log.info(
        "TLS {floor}+, ALPN {alpn}, TLS 1.2 ciphers {ciphers}{dh}",
        floor=policy.min_version,
        alpn=",".join(policy.alpn) or "off",
        ciphers=policy.ciphers,
        dh=", DH parameters from " + policy.dhparams if policy.dhparams else "",
    )

    if config.server.http:
        plain = PlainHTTPHandler(http01, handler.is_our_host, https_port_of(config))
        top.plain_handler = plain
        plain_factory = HTTP11Factory(plain, reactor, limits, secure=False)
        for description in config.server.http:
            listener = Listener(reactor, description, plain_factory, "http (ACME HTTP-01, redirect to https)")
            listener.setServiceParent(top)
            top.listeners.append(listener)
    return top


def _add_certificate_services(
    top: MultiService, reactor: Any, config: Config, sni: SniServer, http01: HTTP01Answers, alpn01: TLSALPN01Answers
) -> None:
    """Certificates that change while we run: ACME, watched files, the dev CA."""
    if any(site.tls in ("acme", "files") for site in config.sites):
        from tlsproxy.acme.service import CertificateService

        CertificateService(reactor, config, sni, http01, alpn01).setServiceParent(top)
    local = [site for site in config.sites if site.tls == "local"]
    if local:
        from tlsproxy import devca

        ca = devca.LocalCA.load_or_create(devca.default_caroot())
        log = Logger(namespace="tlsproxy")
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
        else:
            log.info("local development CA: {root}", root=str(ca.root_pem_path))
        devca.LocalCertificateService(reactor, ca, sni, local).setServiceParent(top)


def makeService(options: Options) -> ProxyService:
    from twisted.internet import reactor

    try:
        config = configuration.load(options["config"])
    except ConfigError as e:
        for problem in e.problems:
            print(f"tlsproxy: {problem}", file=sys.stderr)
        raise SystemExit(1) from None
    except CertificateError as e:
        print(f"tlsproxy: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    twist_options = getattr(options, "parent", None)
    if twist_options is not None and not any(a.startswith("--log-format") for a in sys.argv):
        twist_options["fileLogObserverFactory"] = observer_factory(config.server.log_format)
        twist_options["logFormat"] = config.server.log_format
    return build_service(reactor, config)

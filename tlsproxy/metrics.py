"""Prometheus metrics of one tlsproxy process, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from OpenSSL import SSL
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _CertificateCollector:
    """Reads not-after from the contexts being served right now, at scrape time."""

    def __init__(self, contexts: Callable[[], dict[str, SSL.Context | None]]) -> None:
        self.contexts = contexts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tlsproxy_certificate_not_after_seconds",
            "Expiry (Unix time) of the certificate served for each site",
            labels=["site"],
        )
        for site, context in self.contexts().items():
            if context is None:
                continue
            cert = SSL.Connection(context, None).get_certificate()
            if cert is not None:
                family.add_metric([site], cert.to_cryptography().not_valid_after_utc.timestamp())
        yield family


class Metrics:
    """Counters the proxy, the listeners and the certificate services update."""

    def __init__(self) -> None:
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tlsproxy_requests", "Requests answered, by site and status", ["site", "status"], registry=self.registry
        )
        self.upstream_latency = Histogram(
            "tlsproxy_upstream_latency_seconds",
            "Time from sending a request to the app until its response head",
            ["site"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.open_connections = Gauge(
            "tlsproxy_open_connections", "Client connections open now", ["listener"], registry=self.registry
        )
        self.handshakes = Counter("tlsproxy_tls_handshakes", "Completed TLS handshakes", registry=self.registry)
        self.handshake_failures = Counter(
            "tlsproxy_tls_handshake_failures",
            "TLS connections that closed before completing a handshake",
            registry=self.registry,
        )
        self.renewal_attempts = Counter(
            "tlsproxy_certificate_renewal_attempts", "Certificate orders attempted", ["site"], registry=self.registry
        )
        self.renewal_failures = Counter(
            "tlsproxy_certificate_renewal_failures", "Certificate orders that failed", ["site"], registry=self.registry
        )
        self._certificates: _CertificateCollector | None = None

    def watch_certificates(self, contexts: Callable[[], dict[str, Any]]) -> None:
        if self._certificates is None:
            self._certificates = _CertificateCollector(contexts)
            self.registry.register(self._certificates)  # type: ignore[arg-type]
        else:
            self._certificates.contexts = contexts

    def render(self) -> bytes:
        return generate_latest(self.registry)

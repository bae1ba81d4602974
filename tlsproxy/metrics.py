"""Prometheus metrics of one tlsproxy process.

Every update happens on the reactor thread, so the hot-path counters here are
plain integers (prometheus_client's own take a lock per update, which showed
up in the per-request profile); they are turned into Prometheus families only
when /metrics is scraped.  The process's own figures (``process_resident_memory_bytes``,
``process_open_fds``, CPU seconds...) come from prometheus_client's process
collector, read from /proc at scrape time.

The certificate expiry gauge is ``tlsproxy_certificate_expiry_timestamp_seconds``
(Prometheus's naming for a point in time); the former name,
``tlsproxy_certificate_not_after_seconds``, is still exported for one release.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from OpenSSL import SSL
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Count:
    """A counter or gauge value."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


class Histogram:
    """Counts per bucket (not cumulative until scraped), their sum and number."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value
        self.count += 1


class Family:
    """One metric name with its labelled children."""

    def __init__(self, kind: str, name: str, documentation: str, labels: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = labels
        self.children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = Histogram() if self.kind == "histogram" else Count()
        return child

    # Unlabelled families act as their single child.
    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def collect(self) -> Any:
        if self.kind == "histogram":
            family = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labelnames))
            for values, hist in self.children.items():
                running, buckets = 0, []
                for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), hist.counts, strict=True):
                    running += count
                    buckets.append((bound, running))
                family.add_metric(list(values), buckets, hist.sum)
            return family
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        plain = cls(self.name, self.documentation, labels=list(self.labelnames))
        for values, child in self.children.items():
            plain.add_metric(list(values), child.value)
        return plain


class Metrics:
    """Counters the proxy, the listeners and the certificate services update."""

    def __init__(self) -> None:
        self.requests = Family(
            "counter", "tlsproxy_requests", "Requests answered, by site and status", ("site", "status")
        )
        self.upstream_latency = Family(
            "histogram",
            "tlsproxy_upstream_latency_seconds",
            "Time from sending a request to the app until its response head",
            ("site",),
        )
        self.open_connections = Family(
            "gauge", "tlsproxy_open_connections", "Client connections open now", ("listener",)
        )
        self.handshakes = Family("counter", "tlsproxy_tls_handshakes", "Completed TLS handshakes")
        self.handshake_failures = Family(
            "counter", "tlsproxy_tls_handshake_failures", "TLS connections that closed before completing a handshake"
        )
        self.renewal_attempts = Family(
            "counter", "tlsproxy_certificate_renewal_attempts", "Certificate orders attempted", ("site",)
        )
        self.renewal_failures = Family(
            "counter", "tlsproxy_certificate_renewal_failures", "Certificate orders that failed", ("site",)
        )
        self.refused_connections = Family(
            "counter",
            "tlsproxy_refused_connections",
            "Connections refused at accept (out of file descriptors)",
            ("listener",),
        )
        self.handed_off = Family(
            "counter",
            "tlsproxy_tls_handed_off",
            "Resuming connections passed to the worker process whose ticket key made their ticket",
        )
        self.handshakes.labels()
        self.handshake_failures.labels()
        self._families = [
            self.requests,
            self.upstream_latency,
            self.open_connections,
            self.handshakes,
            self.handshake_failures,
            self.renewal_attempts,
            self.renewal_failures,
            self.refused_connections,
            self.handed_off,
        ]
        self._contexts: Callable[[], dict[str, Any]] = dict
        self._upstreams: Callable[[], Iterable[Any]] = list
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # type: ignore[arg-type]
        ProcessCollector(registry=self.registry)

    def watch_upstreams(self, states: Callable[[], Iterable[Any]]) -> None:
        """Where to read each upstream's state from at scrape time (balancer.MemberState values)."""
        self._upstreams = states

    def watch_certificates(self, contexts: Callable[[], dict[str, SSL.Context | None]]) -> None:
        """Where to read the served certificates' expiry from at scrape time."""
        self._contexts = contexts

    def collect(self) -> Iterator[Any]:
        for family in self._families:
            yield family.collect()
        expiry = GaugeMetricFamily(
            "tlsproxy_certificate_expiry_timestamp_seconds",
            "Expiry (Unix time) of the certificate served for each site",
            labels=["site"],
        )
        former = GaugeMetricFamily(
            "tlsproxy_certificate_not_after_seconds",
            "Deprecated, to be removed in the next release: tlsproxy_certificate_expiry_timestamp_seconds",
            labels=["site"],
        )
        for site, context in self._contexts().items():
            if context is None:
                continue
            cert = SSL.Connection(context, None).get_certificate()
            if cert is not None:
                when = cert.to_cryptography().not_valid_after_utc.timestamp()
                expiry.add_metric([site], when)
                former.add_metric([site], when)
        yield expiry
        yield former
        yield from self._collect_upstreams()

    def _collect_upstreams(self) -> Iterator[Any]:
        labels = ["site", "route", "upstream"]
        up = GaugeMetricFamily(
            "tlsproxy_upstream_up", "1 while an upstream takes requests, 0 while it is out", labels=labels
        )
        busy = GaugeMetricFamily("tlsproxy_upstream_in_flight", "Requests an upstream is serving now", labels=labels)
        failures = CounterMetricFamily(
            "tlsproxy_upstream_failures", "Failed connects, answerless closes and failed health checks", labels=labels
        )
        for state in self._upstreams():
            values = [state.site, state.route, state.url]
            up.add_metric(values, 1 if state.up else 0)
            busy.add_metric(values, state.in_flight)
            failures.add_metric(values, state.failures)
        yield up
        yield busy
        yield failures

    def render(self) -> bytes:
        return generate_latest(self.registry)

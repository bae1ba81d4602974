"""Metrics render as Prometheus text, with cumulative histogram buckets."""

from __future__ import annotations

import trustme
from prometheus_client.parser import text_string_to_metric_families

from tests.tlsutil import certified
from tlsproxy.metrics import Metrics
from tlsproxy.tls.policy import TLSPolicy


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_counters_and_histogram() -> None:
    """Counters count, and a histogram's buckets are cumulative with a +Inf total."""
    m = Metrics()
    m.requests.labels("a.test", "200").inc()
    m.requests.labels("a.test", "200").inc()
    m.requests.labels("a.test", "502").inc()
    for value in (0.004, 0.2, 99.0):
        m.upstream_latency.labels("a.test").observe(value)
    got = samples(m)
    assert got[("tlsproxy_requests_total", (("site", "a.test"), ("status", "200")))] == 2
    assert got[("tlsproxy_requests_total", (("site", "a.test"), ("status", "502")))] == 1
    assert got[("tlsproxy_upstream_latency_seconds_bucket", (("le", "0.005"), ("site", "a.test")))] == 1
    assert got[("tlsproxy_upstream_latency_seconds_bucket", (("le", "0.25"), ("site", "a.test")))] == 2
    assert got[("tlsproxy_upstream_latency_seconds_bucket", (("le", "60.0"), ("site", "a.test")))] == 2
    assert got[("tlsproxy_upstream_latency_seconds_bucket", (("le", "+Inf"), ("site", "a.test")))] == 3
    assert got[("tlsproxy_upstream_latency_seconds_count", (("site", "a.test"),))] == 3


def test_certificate_expiry_from_served_context() -> None:
    """The not-after gauge reads the certificate each site serves right now."""
    leaf = certified(trustme.CA(), "a.test")
    m = Metrics()
    m.watch_certificates(lambda: {"a.test": TLSPolicy().context_for(leaf), "waiting.test": None})
    got = samples(m)
    when = leaf.not_after.timestamp()
    assert got[("tlsproxy_certificate_expiry_timestamp_seconds", (("site", "a.test"),))] == when
    assert got[("tlsproxy_certificate_not_after_seconds", (("site", "a.test"),))] == when  # the former name, for now
    assert not any(labels == (("site", "waiting.test"),) for _, labels in got)


def test_process_metrics_are_exported() -> None:
    """/metrics carries the process collector's families (memory, descriptors, CPU) beside ours."""
    names = {family.name for family in text_string_to_metric_families(Metrics().render().decode())}
    assert {"process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds"} <= names
    assert "tlsproxy_requests" in names

"""The admin endpoint: /healthz, /readyz and /metrics, for orchestrators and Prometheus.

Off unless ``[server] admin`` names an endpoint; bind it to loopback or a
private interface, it has no authentication.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from tlsproxy.http import pages
from tlsproxy.http.exchange import Exchange

READINESS_TIMEOUT = 2.0


class AdminHandler:
    """Answers the three admin paths; anything else is 404."""

    log = Logger()

    def __init__(self, service: Any, render_metrics: Callable[[], bytes]) -> None:
        self.service = service
        self.render_metrics = render_metrics

    def handle(self, exchange: Exchange) -> None:
        path = exchange.head.target.split(b"?", 1)[0]
        if exchange.head.method not in (b"GET", b"HEAD"):
            pages.send(exchange, 405)
        elif path == b"/healthz":
            self._send(exchange, 200, b"ok\n")
        elif path == b"/metrics":
            self._send(exchange, 200, self.render_metrics(), b"text/plain; version=0.0.4; charset=utf-8")
        elif path == b"/readyz":
            self.readiness().addCallback(lambda problems: self._ready(exchange, problems))
        else:
            pages.send(exchange, 404)

    def readiness(self) -> Deferred[list[str]]:
        """Every reason the proxy is not ready yet (empty when it is)."""
        service = self.service
        problems: list[str] = []
        if not service.ready:
            problems.append("not listening yet")
        generation = service.generation
        for site in generation.config.sites:
            if generation.sni_map.context_of(site.name) is None:
                problems.append(f"site {site.name}: no certificate yet")
        checks = []
        for pool in generation.handler.pools:
            got = pool.connect()
            timer = service.reactor.callLater(READINESS_TIMEOUT, got.cancel)

            def connected(conn: Any, timer: Any = timer) -> None:
                if timer.active():
                    timer.cancel()
                conn.close()

            def failed(failure: Any, url: str = pool.describe(), timer: Any = timer) -> None:
                if timer.active():
                    timer.cancel()
                problems.append(f"upstream {url}: {failure.getErrorMessage()}")

            got.addCallbacks(connected, failed)
            checks.append(got)
        return DeferredList(checks).addCallback(lambda _: problems)

    def _ready(self, exchange: Exchange, problems: list[str]) -> None:
        if problems:
            self._send(exchange, 503, ("\n".join(problems) + "\n").encode())
        else:
            self._send(exchange, 200, b"ready\n")

    def _send(
        self, exchange: Exchange, status: int, body: bytes, content_type: bytes = b"text/plain; charset=utf-8"
    ) -> None:
        exchange.start_response(status, pages.REASONS.get(status, b""), [(b"Content-Type", content_type)], len(body))
        exchange.write(body)
        exchange.finish()

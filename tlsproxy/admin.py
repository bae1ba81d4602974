"""The admin endpoint: /healthz, /readyz and /metrics, for orchestrators and Prometheus.

Off unless ``[server] admin`` names an endpoint; bind it to loopback or a
private interface, it has no authentication.

/readyz asks each app a ``HEAD /`` and wants the head of an answer (any
status) within :data:`READINESS_TIMEOUT`: an app that accepts connections but
never answers is not ready.  A site (or route) with several upstreams is ready
while one of them answers; the body lists every upstream's state either way.
A dial or a probe still running at the deadline is left to finish and its
connection closed then (the dial cannot be cancelled).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from tlsproxy.http import pages
from tlsproxy.http.exchange import Exchange
from tlsproxy.proxy.health import UpstreamProbe

READINESS_TIMEOUT = 2.0
USER_AGENT = "tlsproxy-readiness"


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

        def note(why: str | None) -> None:
            if why:
                problems.append(why)

        checks = [self._group_ready(group).addCallback(note) for group in generation.handler.groups]
        return DeferredList(checks).addCallback(lambda _: problems)

    def _group_ready(self, group: Any) -> Deferred[str | None]:
        """A site (or route) is ready while one of its upstreams answers; why not, when none does."""
        host = group.site.removeprefix("*.") or "localhost"
        reactor = self.service.reactor
        probes = [
            UpstreamProbe(
                reactor,
                m.pool,
                host,
                "/",
                READINESS_TIMEOUT,
                method="HEAD",
                user_agent=USER_AGENT,
                label=f"upstream {m.url}",
            ).run()
            for m in group.members
        ]

        def verdict(results: list[tuple[bool, str | None]]) -> str | None:
            whys = [why for _, why in results]
            return None if None in whys else "; ".join(w for w in whys if w)

        return DeferredList(probes).addCallback(verdict)

    def upstream_states(self) -> list[dict[str, Any]]:
        """Each upstream's state as the balancer sees it, as plain values (workers send them on)."""
        return [asdict(state) for group in self.service.generation.handler.groups for state in group.states()]

    def upstream_lines(self) -> list[str]:
        """Each upstream's state: up or out, requests in flight, failures."""
        return [upstream_line(state) for state in self.upstream_states()]

    def _ready(self, exchange: Exchange, problems: list[str]) -> None:
        lines = "".join(f"{line}\n" for line in self.upstream_lines()).encode()
        if problems:
            self._send(exchange, 503, ("\n".join(problems) + "\n").encode() + lines)
        else:
            notes = "".join(f"note: {note}\n" for note in store_notes(self.service.generation))
            self._send(exchange, 200, b"ready\n" + notes.encode() + lines)

    def _send(
        self, exchange: Exchange, status: int, body: bytes, content_type: bytes = b"text/plain; charset=utf-8"
    ) -> None:
        exchange.start_response(status, pages.REASONS.get(status, b""), [(b"Content-Type", content_type)], len(body))
        exchange.write(body)
        exchange.finish()


def store_notes(generation: Any) -> list[str]:
    """A shared store that cannot be reached, said in /readyz's answer.

    Said, not a reason to be unready: every instance keeps serving the
    certificates it has, and an orchestrator that took them all out of the
    load balancer when Redis goes down would turn a store outage into a site outage.
    """
    notes = []
    for child in getattr(generation, "certificates", ()):
        problem = getattr(child, "store_problem", None)
        if problem:
            notes.append(f"{problem}; serving the certificates we have, renewals wait")
    return notes


def upstream_where(state: dict[str, Any]) -> str:
    return f"upstream {state['url']} (site {state['site']}" + (f" route {state['route']})" if state["route"] else ")")


def upstream_line(state: dict[str, Any]) -> str:
    """One line of /readyz for one upstream (``state`` as :meth:`AdminHandler.upstream_states` gives it)."""
    line = f"{upstream_where(state)}: {'up' if state['up'] else 'down'}"
    line += f", {state['in_flight']} in flight, {state['failures']} failures"
    return line + (f" ({state['why']})" if state["why"] else "")

"""One admin endpoint for all the workers, served by the supervisor.

/metrics asks every worker for its figures over the control pipe and merges
them: a counter, a histogram, the open connections and the requests in flight
are the sum over workers; any other gauge is a state each worker sees
(``tlsproxy_upstream_up``: 1 when any worker has the upstream up, as a client
reaches whichever worker takes it); a certificate's expiry is the earliest any
worker serves (one that did not swap yet shows); the ``process_*`` figures keep
one series per worker, with a ``worker`` label.

/readyz is ready when every worker is and says why not otherwise; it lists
each upstream once, up when any worker has it up, its requests in flight and
failures summed, with each worker's view in brackets when they disagree.  A
worker that does not answer within :data:`ASK_TIMEOUT` is left out (and named
by /readyz).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from tlsproxy.admin import upstream_line
from tlsproxy.http import pages
from tlsproxy.http.exchange import Exchange

ASK_TIMEOUT = 2.0
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
TEXT = b"text/plain; charset=utf-8"
# Gauges that count things each worker has (the proxy has their sum); any other gauge is a
# state every worker sees alike (``tlsproxy_upstream_up``): the proxy's is the highest.
ADDED_GAUGES = frozenset({"tlsproxy_open_connections", "tlsproxy_upstream_in_flight"})


def _earliest(name: str) -> bool:
    return name.startswith("tlsproxy_certificate_") or name.endswith("_created")


def _view(state: dict[str, Any]) -> str:
    return "up" if state["up"] else "down" + (f" ({state['why']})" if state["why"] else "")


def merge_upstreams(answers: Mapping[int, Any]) -> list[str]:
    """Each upstream's /readyz line over all workers (see the module docstring)."""
    seen: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    for index in sorted(answers):
        for state in answers[index].get("upstreams") or []:
            seen.setdefault((state["site"], state["route"], state["url"]), {})[index] = state
    lines = []
    for by_worker in seen.values():
        states = list(by_worker.values())
        up = [state for state in states if state["up"]]
        merged = dict(states[0], up=bool(up), why="" if up else states[0]["why"])
        merged["in_flight"] = sum(state["in_flight"] for state in states)
        merged["failures"] = sum(state["failures"] for state in states)
        line = upstream_line(merged)
        if 0 < len(up) < len(states):
            line += " [" + ", ".join(f"worker {index}: {_view(state)}" for index, state in by_worker.items()) + "]"
        lines.append(line)
    return lines


def merge_metrics(texts: Mapping[int, str]) -> bytes:
    """The Prometheus text of all workers as one proxy (see the module docstring)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for index in sorted(texts):
        for family in text_string_to_metric_families(texts[index]):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            table = values[family.name]
            per_worker = family.name.startswith("process_")
            for sample in family.samples:
                labels = dict(sample.labels)
                if per_worker:
                    labels["worker"] = str(index)
                key = (sample.name, tuple(sorted(labels.items())))
                if key not in table:
                    table[key] = sample.value
                elif _earliest(sample.name):
                    table[key] = min(table[key], sample.value)
                elif family.type == "gauge" and family.name not in ADDED_GAUGES:
                    table[key] = max(table[key], sample.value)
                else:
                    table[key] += sample.value
    for name, merged in families.items():
        for (sample_name, pairs), value in values[name].items():
            merged.add_sample(sample_name, dict(pairs), value)

    class _Merged:
        def collect(self) -> Iterable[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())  # type: ignore[arg-type]
    return generate_latest(registry)


class SupervisorAdmin:
    """/healthz, /readyz and /metrics of a supervisor and its workers."""

    log = Logger()

    def __init__(self, supervisor: Any) -> None:
        self.supervisor = supervisor
        self._ids = itertools.count(1)
        self._asking: dict[int, tuple[Deferred[dict[int, Any]], set[int], dict[int, Any]]] = {}

    # -- asking the workers --------------------------------------------------------

    def ask(self, kind: str) -> Deferred[dict[int, Any]]:
        """Send ``kind`` to every live worker; fires with their answers by index (those in time)."""
        ident = next(self._ids)
        done: Deferred[dict[int, Any]] = Deferred()
        processes = self.supervisor.live()
        waiting = {process.slot.index for process in processes}
        answers: dict[int, Any] = {}
        if not waiting:
            done.callback(answers)
            return done
        self._asking[ident] = (done, waiting, answers)
        timer = self.supervisor.reactor.callLater(ASK_TIMEOUT, self._finish, ident)
        done.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        for process in processes:
            process.send(kind, id=ident)
        return done

    def answer(self, index: int, message: dict[str, Any]) -> None:
        """A worker's answer (``scraped`` or ``readiness``) came in."""
        asking = self._asking.get(message.get("id"))  # type: ignore[arg-type]
        if asking is None:
            return  # too late
        _, waiting, answers = asking
        answers[index] = message
        waiting.discard(index)
        if not waiting:
            self._finish(message["id"])

    def worker_gone(self, index: int) -> None:
        """A worker ended: no answer is coming from it."""
        for ident, (_, waiting, _) in list(self._asking.items()):
            waiting.discard(index)
            if not waiting:
                self._finish(ident)

    def _finish(self, ident: int) -> None:
        asking = self._asking.pop(ident, None)
        if asking is not None:
            done, _, answers = asking
            done.callback(answers)

    # -- the endpoint ----------------------------------------------------------------

    def handle(self, exchange: Exchange) -> None:
        path = exchange.head.target.split(b"?", 1)[0]
        if exchange.head.method not in (b"GET", b"HEAD"):
            pages.send(exchange, 405)
        elif path == b"/healthz":
            self._send(exchange, 200, b"ok\n")
        elif path == b"/metrics":
            self.ask("scrape").addCallback(self._metrics, exchange)
        elif path == b"/readyz":
            self.ask("readiness").addCallback(self._readiness, exchange)
        else:
            pages.send(exchange, 404)

    def _metrics(self, answers: dict[int, Any], exchange: Exchange) -> None:
        texts = {index: str(message.get("text", "")) for index, message in answers.items()}
        self._send(exchange, 200, merge_metrics(texts), CONTENT_TYPE)

    def _readiness(self, answers: dict[int, Any], exchange: Exchange) -> None:
        problems: list[str] = []
        for slot in self.supervisor.slots:
            if slot.index not in answers:
                problems.append(f"worker {slot.index}: not running or not answering")
                continue
            for problem in answers[slot.index].get("problems") or []:
                line = f"worker {slot.index}: {problem}"
                problems.append(line)
        lines = "".join(f"{line}\n" for line in merge_upstreams(answers)).encode()
        if problems:
            self._send(exchange, 503, ("\n".join(problems) + "\n").encode() + lines)
        else:
            notes = dict.fromkeys(note for index in sorted(answers) for note in answers[index].get("notes") or [])
            said = "".join(f"note: {note}\n" for note in notes).encode()
            self._send(exchange, 200, b"ready\n" + said + lines)

    def _send(self, exchange: Exchange, status: int, body: bytes, content_type: bytes = TEXT) -> None:
        exchange.start_response(status, pages.REASONS.get(status, b""), [(b"Content-Type", content_type)], len(body))
        exchange.write(body)
        exchange.finish()

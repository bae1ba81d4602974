"""Active health checks: each upstream of a site with ``health_path`` is asked now and then.

A check is one ``GET health_path`` on a fresh connection with the site's first
host name, answered within ``health_timeout`` with one of ``health_status``.
A failing check takes the upstream out of its group; the first passing one
brings it back.  Checks run on the reactor like any request (a non-blocking
dial, a timer), one at a time per upstream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from tlsproxy.proxy.balancer import Member, UpstreamGroup
from tlsproxy.proxy.upstream import UpstreamError


def any_status(status: int) -> bool:
    """An answer of any status: the app is up, whatever it thinks of the path."""
    return True


class UpstreamProbe:
    """One request to an app on a fresh connection, with a deadline; fires with None (it passed) or why not.

    The active health checks below ask ``GET health_path`` and want one of
    ``health_status``; the admin's /readyz asks ``HEAD /`` and takes any
    answer.  ``label`` goes before every reason (/readyz names the upstream).
    Also the response sink of its request (see :class:`~tlsproxy.proxy.upstream.ResponseSink`).
    """

    def __init__(
        self,
        reactor: Any,
        pool: Any,
        host: str,
        path: str,
        timeout: float,
        healthy: Callable[[int], bool] = any_status,
        method: str = "GET",
        user_agent: str = "tlsproxy-health-check",
        label: str = "",
    ) -> None:
        self.reactor = reactor
        self.pool = pool
        self.host = host
        self.path = path
        self.method = method
        self.timeout = timeout
        self.healthy = healthy
        self.user_agent = user_agent
        self.label = label
        self.result: Deferred[str | None] = Deferred()
        self.connection: Any = None
        self._timer: Any = None

    def run(self) -> Deferred[str | None]:
        self._timer = self.reactor.callLater(self.timeout, self._expired)
        self.pool.connect().addCallbacks(self._connected, self._dial_failed)
        return self.result

    def _finish(self, why: str | None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.connection is not None:
            connection, self.connection = self.connection, None
            connection.close()
        if not self.result.called:
            self.result.callback(f"{self.label}: {why}" if why is not None and self.label else why)

    def _expired(self) -> None:
        waited = "not connected" if self.connection is None else "no answer"
        self._finish(f"{waited} within {self.timeout:g}s")

    def _connected(self, connection: Any) -> None:
        if self.result.called:  # the deadline passed while dialling: nobody wants this connection
            connection.close()
            return
        self.connection = connection
        head = (
            f"{self.method} {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUser-Agent: {self.user_agent}\r\n"
            "X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n"
        ).encode("ascii", "replace")
        # (request_complete stays False: this connection never goes back to the pool.)
        connection.send(head, self, self.method == "HEAD")

    def _dial_failed(self, failure: Failure) -> None:
        self._finish(failure.getErrorMessage())

    def _answered(self, status: int) -> None:
        self._finish(None if self.healthy(status) else f"{self.method} {self.path} answered {status}")

    # -- ResponseSink ------------------------------------------------------------

    def response_head(self, status: int, reason: bytes, fields: bytes, content_length: int | None) -> None:
        self._answered(status)

    def response_whole(self, status: int, reason: bytes, fields: bytes, body: bytes) -> None:
        self._answered(status)

    def response_data(self, data: bytes) -> None:
        pass

    def response_end(self) -> None:
        pass

    def response_failed(self, error: UpstreamError) -> None:
        self.connection = None  # the connection reported its own end
        self._finish(error.detail)

    def response_upgraded(self, connection: Any, rest: bytes) -> None:
        connection.close()

    def client_transport(self) -> Any:
        return None


class HealthChecks(Service):
    """Checks every upstream of the groups that have a ``health_path``, while running."""

    def __init__(self, reactor: Any, groups: Sequence[UpstreamGroup]) -> None:
        self.reactor = reactor
        self.groups = groups
        self._loops: list[LoopingCall] = []

    def startService(self) -> None:
        super().startService()
        for group in self.groups:
            if not group.balancing.health_path:
                continue
            for member in group.members:
                loop = LoopingCall(self.check, group, member)
                loop.clock = self.reactor
                self._loops.append(loop)
                # A check that errs (it should not) must not stop the checking.
                loop.start(group.balancing.health_interval, now=True).addErrback(lambda f: None)

    def stopService(self) -> None:
        super().stopService()
        loops, self._loops = self._loops, []
        for loop in loops:
            if loop.running:
                loop.stop()

    def check(self, group: UpstreamGroup, member: Member) -> Deferred[None]:
        """One check of ``member``; the loop waits for it before the next."""
        balancing = group.balancing
        probe = UpstreamProbe(
            self.reactor,
            member.pool,
            group.site.removeprefix("*.") or "localhost",
            balancing.health_path,
            balancing.health_timeout,
            balancing.healthy_status,
        )
        return probe.run().addCallback(lambda why: group.check_result(member, why))

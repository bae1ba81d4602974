"""The reverse proxy proper: route by Host, relay request and response, stream both.

Request bodies are read whole before the app is dialled (memory, then a
temporary file: see reqbuffer.py) and sent with a Content-Length, so a slow
client never ties up a gunicorn sync worker while it trickles an upload in,
and a WSGI app never reads a chunked body as empty.  A site with
``request_buffering = false`` streams bodies of known length over
``STREAM_ABOVE`` with back-pressure instead.  Responses are read as fast as
the app sends them: what a slow client has not taken yet waits in a
:class:`~tlsproxy.proxy.respbuffer.ResponseBuffer`, so the app's worker is
free once it has answered.  Past the buffer's cap, or for an answer that says
``X-Accel-Buffering: no``, the app is paused while the client is not reading.
A client that takes nothing for ``send_timeout`` is cut off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import partial
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tlsproxy.config import Server, Site, Upstream, dev_app_hint
from tlsproxy.http import pages
from tlsproxy.http.exchange import Exchange
from tlsproxy.http.wire import redirect_location, split_host_port
from tlsproxy.proxy import compress, static
from tlsproxy.proxy.access import AccessControl, literal_path
from tlsproxy.proxy.accesslog import ID_NAMES, AccessLog, begin
from tlsproxy.proxy.balancer import IDEMPOTENT, Member, UpstreamGroup, may_retry
from tlsproxy.proxy.errorpages import ErrorPages
from tlsproxy.proxy.headers import is_trusted, response_block, upstream_request_head
from tlsproxy.proxy.lifecycle import lifecycle
from tlsproxy.proxy.reqbuffer import (
    BodyStoreError,
    BufferLimits,
    BufferPool,
    RequestBody,
    fallback_directory,
    threaded,
)
from tlsproxy.proxy.respbuffer import BufferSpace, ResponseBuffer, accel_buffering
from tlsproxy.proxy.upstream import UpstreamConnection, UpstreamError, UpstreamPool, describe_connect_failure

STREAM_ABOVE = 1024 * 1024  # with request_buffering = false, larger bodies of known length stream
# The header names handle() looks for in its one pass: the request id's (accesslog.begin) and
# Accept-Encoding (compression); most requests have none of them.
_NOTED = ID_NAMES | {b"accept-encoding"}


class Stage(IntEnum):
    """Where a proxied request is in its life (its moves: ``REQUEST_MOVES``).

    The values are ordered so that the two questions asked most often are one
    comparison each (set lookups of enum members cost 0.6% of a request):
    from ``APP_FINISHED`` on, nothing more comes from the app; from ``OVER``
    on, nothing more goes to the client.  No move goes back below either.
    """

    NEW = 0  # made, not started
    RECEIVING_BODY = 1  # the body is read whole before the app is dialled
    DIALLING = 2  # waiting for a connection to the app (a pooled one comes at once)
    SENT = 3  # the head went to the app (a streamed or held body may still be going); no answer yet
    RELAYING = 4  # the app's head went to the client; its body follows
    TUNNEL = 5  # a 101 went to the client: bytes go both ways
    DRAINING = 6  # the app has answered whole; the client has not taken all of it yet
    TUNNEL_ENDED = 7  # the app's side of a tunnel closed; the client's follows
    DONE = 8  # the whole answer went to the client
    ABANDONED = 9  # ended early (an error page, a cut answer, the client left, a tunnel closed)


NEW, RECEIVING_BODY, DIALLING, SENT, RELAYING, TUNNEL, DRAINING, TUNNEL_ENDED, DONE, ABANDONED = Stage

# Every move a proxied request may make (tlsproxy/proxy/lifecycle.py checks them in tests).
REQUEST_MOVES: dict[Stage, frozenset[Stage]] = {
    NEW: frozenset({RECEIVING_BODY, DIALLING}),
    RECEIVING_BODY: frozenset({DIALLING, ABANDONED}),
    DIALLING: frozenset({DIALLING, SENT, ABANDONED}),  # DIALLING again: the next upstream
    SENT: frozenset({DIALLING, RELAYING, TUNNEL, DONE, ABANDONED}),  # DIALLING: a retry, or the next upstream
    RELAYING: frozenset({DRAINING, DONE, ABANDONED}),
    TUNNEL: frozenset({TUNNEL_ENDED, ABANDONED}),
    DRAINING: frozenset({DONE, ABANDONED}),
    TUNNEL_ENDED: frozenset({ABANDONED}),
    DONE: frozenset(),
    ABANDONED: frozenset(),
}
APP_FINISHED = DRAINING  # from this stage on, nothing more comes from the app ...
OVER = DONE  # ... and from this one on, nothing more goes to the client


@dataclass
class Route:
    """A site as the proxy uses it at run time."""

    site: Site
    group: UpstreamGroup
    hsts: bytes | None
    dev: bool = False
    latency: Any = None
    name: str = ""
    route_upstream: Upstream | None = None  # a [site.routes] prefix's app; None: the site's
    # (path prefix, route) for the site's [site.routes], longest prefix first.
    paths: tuple[tuple[bytes, Route], ...] = ()
    gated: bool = False  # from the site (set in __post_init__)
    compress: bool = False

    def __post_init__(self) -> None:
        self.name = self.site.name
        self.gated = self.site.gated  # read for every request: kept as plain attributes
        self.compress = self.site.compress

    @property
    def upstream(self) -> Upstream:
        return self.route_upstream or self.site.upstream


class ProxyHandler:
    """Send each request to its site's app and relay the answer."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        sites: Sequence[Site],
        server: Server,
        access_log: AccessLog | None = None,
        dev: bool = False,
        metrics: Any = None,
    ) -> None:
        self.reactor = reactor
        self.server = server
        self.access_log = access_log
        # The clock begin() reads for the log's duration; None without a log (a clock read saved per request).
        self._log_clock = reactor if access_log is not None else None
        self.dev = dev
        self.metrics = metrics
        self.trusted_proxies = server.trusted_proxies
        self._counters: dict[tuple[str, int], Any] = {}
        # Host header (as sent, port included) -> route: a cache, bounded below.
        self._by_raw_host: dict[bytes, Route] = {}
        pools: dict[str, UpstreamPool] = {}
        self.groups: list[UpstreamGroup] = []
        self.successor: ProxyHandler | None = None  # after a reload: where new requests go
        self._exact: dict[str, Route] = {}
        self._wild: dict[str, Route] = {}
        self.routes: list[Route] = []
        # A site's redirect_from name -> the site's own first host (its canonical name).
        self.canonical: dict[str, str] = {name: site.name for site in sites for name in site.redirect_from}
        for site in sites:

            def pool_for(upstream: Upstream) -> UpstreamPool:
                pool = pools.get(upstream.url)
                if pool is None:
                    pool = pools[upstream.url] = UpstreamPool(reactor, upstream, server.connect_timeout)
                return pool

            def group_for(upstreams: Sequence[Upstream], prefix: str = "", site: Site = site) -> UpstreamGroup:
                members = [Member(upstream, pool_for(upstream)) for upstream in upstreams]
                group = UpstreamGroup(reactor, members, site.balancing, site.name, prefix)
                self.groups.append(group)
                return group

            hsts = site.hsts.header_value()
            latency = metrics.upstream_latency.labels(site.name) if metrics is not None else None
            paths = tuple(
                (
                    path.prefix.encode("ascii"),
                    Route(
                        site, group_for(path.upstreams, path.prefix), hsts, dev, latency, route_upstream=path.upstream
                    ),
                )
                for path in site.routes
            )
            route = Route(site, group_for(site.upstreams), hsts, dev, latency, paths=paths)
            self.routes.append(route)
            for host in site.hosts:
                if host.startswith("*."):
                    self._wild[host[2:]] = route
                else:
                    self._exact[host] = route
        self.pools = list(pools.values())
        self.request_buffers = BufferPool(
            server.buffer_directory,
            BufferLimits(
                memory=server.request_buffer_memory,
                connection_memory=server.request_buffer_connection_memory,
                total_memory=server.request_buffer_total_memory,
            ),
            threaded(reactor),
            # The default place may not be writable (a dev run as a user): then the temp dir.
            fallback=None if server.buffer_dir else fallback_directory(),
        )
        self.response_buffers = BufferSpace(reactor, server.buffer_directory, server.max_response_buffer)
        self.error_pages = ErrorPages(sites, threaded(reactor))
        self.access = AccessControl(sites, reactor, threaded(reactor), self.error_pages, server)

    def route_for(self, host: str) -> Route | None:
        route = self._exact.get(host)
        if route is None and "." in host:
            route = self._wild.get(host.split(".", 1)[1])
        return route

    def is_our_host(self, host: str) -> bool:
        return self.route_for(host) is not None

    def handle(self, exchange: Exchange) -> None:
        if self.successor is not None:
            # A reload replaced this handler: a connection opened before it sends its next
            # requests to the new configuration (an upstream taken out gets no new ones).
            self.successor.handle(exchange)
            return
        sent_id = accepts = False
        for name, _ in exchange.head.headers:  # one pass for begin() and the compression check
            if name in _NOTED:
                if name == b"accept-encoding":
                    accepts = True
                else:
                    sent_id = True
        begin(exchange, self._log_clock, self.trusted_proxies, sent_id)  # its request id (and start time, for the log)
        raw_host = exchange.head.host
        served = getattr(exchange.transport, "served_names", None)
        if served is not None and not served.covers(raw_host):
            self.record(exchange, "-", 421, 0)  # another certificate's host: RFC 9110 15.5.20
            pages.send(exchange, 421)
            return
        route = self._by_raw_host.get(raw_host)
        if route is None:
            route = self.route_for(split_host_port(raw_host)[0])
            if route is not None:
                if len(self._by_raw_host) > 1024:
                    self._by_raw_host.clear()
                self._by_raw_host[raw_host] = route
        if route is None:
            self.record(exchange, "-", 404, 0)
            pages.send(exchange, 404)
            return
        if self.canonical and self._redirect_to_canonical(route, exchange):
            return
        if route.gated and not self.access.admit(
            route.site,
            exchange,
            partial(self.dispatch, route, exchange, accepts),
            partial(self.record, exchange, route.name),
        ):
            return  # refused, in maintenance, or dispatched once the password is checked (proxy/access.py)
        self.dispatch(route, exchange, accepts)

    def dispatch(self, route: Route, exchange: Exchange, accepts: bool = True) -> None:
        """A request the site's access rules let through: a static file, or on to the app.

        ``accepts`` False: the request has no Accept-Encoding (most API clients, health checks,
        load tests), so compress.wrap, which would look for it again, is not called.
        """
        if route.compress and accepts:
            exchange = compress.wrap(exchange, self.reactor, self.server.send_timeout)  # proxy/compress.py
        if route.site.static and static.serve(self, route, exchange):
            return  # a file under one of the site's [site.static] prefixes: ours, not the app's
        if route.paths:
            target = exchange.head.target
            if b"%" in target:
                target = literal_path(target)  # as the app will route it: /%77s/ is /ws/
            for prefix, path_route in route.paths:
                if target.startswith(prefix):
                    route = path_route  # [site.routes]: another app for this prefix, path unchanged
                    break
        length = exchange.head.content_length
        if length is not None and length > route.site.max_body_size:
            self.record(exchange, route.site.name, 413, 0)
            pages.send(exchange, 413)
            return
        ProxiedRequest(self, route, exchange).start()

    def _redirect_to_canonical(self, route: Route, exchange: Exchange) -> bool:
        """A request for one of the site's redirect_from names: 301/308 to its canonical name."""
        head = exchange.head
        host, port = split_host_port(head.host)
        canonical = self.canonical.get(host)
        if canonical is None:
            return False
        location = redirect_location(canonical, port or 443, head.target if head.target.startswith(b"/") else b"/")
        status = 301 if head.method in (b"GET", b"HEAD") else 308
        self.record(exchange, route.site.name, status, 0)
        pages.send(exchange, status, f"This site is {canonical}.", [(b"Location", location)])
        return True

    def record(
        self, exchange: Exchange, site: str, status: int, size: int, upstream: str = "-", received: int = 0
    ) -> None:
        """One finished request: the access log line and the request counter."""
        access_log = self.access_log
        if access_log is not None:
            if type(exchange) is not compress.CompressingExchange or not exchange.after_coding(
                lambda coded: access_log.log(exchange, status, coded, site, upstream, received)
            ):  # a compressed answer is logged with what the client got, once it is out
                access_log.log(exchange, status, size, site, upstream, received)
        if self.metrics is not None:
            key = (site, status)
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = self.metrics.requests.labels(site, str(status))
            counter.inc()

    def close(self, successor: ProxyHandler | None = None) -> None:
        """Let the pools go (busy connections end with their requests); ``successor`` takes new requests."""
        if successor is not None:
            self.successor = successor
            successor.access.adopt(self.access)  # guess counters outlive a reload (proxy/access.py)
            known = {(g.site, g.route): g for g in self.groups}
            for group in successor.groups:
                old = known.get((group.site, group.route))
                if old is not None:
                    group.adopt(old)
        for pool in self.pools:
            pool.close()


@implementer(IPushProducer)
@lifecycle("stage", NEW, REQUEST_MOVES)
class ProxiedRequest:
    """One request on its way to the app and its response on the way back.

    Its progress is ``stage`` alone (a :class:`Stage`); the other fields are
    facts about the request (streamed or held, retried once, logged) and the
    flow control, whose two pauses (the app's, the client's) come and go in
    any stage.
    """

    log = Logger()

    # State every request starts with; instances only store what changes
    # (one of these is made per request, so fewer assignments count).
    stage: Stage  # set first by the constructor (lifecycle.py says why not here)
    conn: UpstreamConnection | None = None
    member: Member | None = None  # the upstream of this attempt while it is in flight (balancer.py)
    chosen: Member | None = None  # ... and the last one chosen, kept for the logs
    tried: tuple[Member, ...] = ()  # upstreams that failed this request
    body: RequestBody | None = None  # the request body, held whole
    sink: _BodySink | None = None  # what the exchange hands the body to
    streaming = False  # request_buffering = false: the body goes to the app as it comes
    received = 0
    sent_bytes = 0
    status = 0
    retried = False  # the one retry on a fresh connection is spent
    pending_101: tuple[bytes, bytes] | None = None  # reason and fields of the app's 101
    timeout = 0.0
    last_activity = 0.0
    paused = False

    def __init__(self, handler: ProxyHandler, route: Route, exchange: Exchange) -> None:
        self.stage = NEW
        self.handler = handler
        self.route = route
        self.exchange = exchange
        self.clock = handler.reactor
        head = exchange.head
        self.method = head.method
        self.upgrade = bool(head.upgrade)
        self.body_complete = not (head.chunked or head.content_length)
        self.timer = exchange.deadline
        # The response policy: HSTS and Secure cookies only over HTTPS.
        secure = exchange.secure
        self.hsts = route.hsts if secure else None
        self.secure_cookies = secure and route.site.secure_cookies

    # -- request side ----------------------------------------------------------

    def start(self) -> None:
        self.exchange.set_observer(self)
        if self.body_complete:
            self.dial()
            return
        exchange = self.exchange
        head = exchange.head
        if (
            not self.route.site.request_buffering
            and head.content_length is not None
            and head.content_length > STREAM_ABOVE
        ):
            self.streaming = True
            self.send_continue()
            self.dial()
            return
        # Bodies of unknown length are held whole even with buffering off:
        # streamed chunked, a WSGI app would read them as empty.
        self.stage = RECEIVING_BODY
        self.body = self.handler.request_buffers.body(
            exchange.transport, exchange.pause_body, exchange.resume_body, self.body_failed
        )
        # A body that stops arriving is the client's fault (408), not the app's.
        self.set_timer(self.handler.server.body_timeout)
        self.send_continue()
        exchange.set_body_consumer(self.body_sink())

    def send_continue(self) -> None:
        """Answer ``Expect: 100-continue`` ourselves: we take the body, the app never sees Expect."""
        expect = self.exchange.head.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue":
            send = getattr(self.exchange, "send_continue", None)
            if send is not None:
                send()

    def body_data(self, data: bytes) -> None:
        if self.stage >= APP_FINISHED:
            return  # answered already (say a 401 to an upload): the rest is dropped
        self.received += len(data)
        if self.received > self.route.site.max_body_size:
            self.fail_request(413)
            return
        self.last_activity = self.clock.seconds()
        if self.streaming:
            if self.conn is not None:
                self.conn.write(data)
            return
        assert self.body is not None
        self.body.add(data)

    def body_end(self) -> None:
        self.body_complete = True
        if self.stage >= APP_FINISHED:
            return
        if self.streaming:
            if self.conn is not None:
                self.conn.request_complete = True
            return
        assert self.body is not None
        self.body.stored(self.dial)

    def body_failed(self, error: BodyStoreError) -> None:
        """The body could not be stored (a full disk: 507) or read back."""
        self.fail_request(error.status)  # RequestBody logged why

    def body_sent(self, conn: UpstreamConnection) -> None:
        conn.request_complete = True

    def body_sink(self) -> _BodySink:
        sink = self.sink = _BodySink(self)
        return sink

    def drop_body(self) -> None:
        """The request is over: its body's memory and file are given back."""
        if self.sink is not None:
            self.sink.request = None
        body = self.body
        if body is not None:
            self.body = None
            body.close()

    def framing(self) -> bytes | None:
        head = self.exchange.head
        if self.streaming:
            return b"content-length: %d" % (head.content_length or 0)
        if self.body is not None:
            return b"content-length: %d" % self.body.size
        if self.method in (b"POST", b"PUT", b"PATCH"):
            return b"content-length: 0"
        return None

    def dial(self, fresh: bool = False) -> None:
        if self.stage >= APP_FINISHED:
            return
        self.stage = DIALLING
        member = self.member
        if member is None:
            group = self.route.group
            member = group.lone
            # A lone upstream is never taken out passively: unless its health check failed
            # (or a reload brought an old outage), it is the choice without asking the clock.
            if member is None or member.check_failed or member.down_until or self.tried:
                member = group.choose(self.tried)
                if member is None:
                    self.no_upstream()
                    return
            self.member = self.chosen = member
            member.load[0] += 1  # in_flight, without the property: every request passes here
        got = member.pool.acquire(fresh=fresh or self.upgrade)
        if isinstance(got, UpstreamConnection):
            self.connected(got)
        else:
            # Dialling is timed by the pool (connect_timeout, a 504).
            # Until then the deadline only has to stop being the client's
            # idle timer; setting it later than that costs no new timer.
            self.set_timer(self.handler.server.upstream_timeout)
            got.addCallbacks(self.connected, self.connect_failed)

    def connect_failed(self, failure: Failure) -> None:
        if self.stage >= APP_FINISHED:
            return
        error = describe_connect_failure(failure, self.upstream)
        if self.member is not None:
            self.route.group.failed(self.member, error.detail)
        # Nothing reached the app: any request may go to the next upstream.
        if not self.next_upstream():
            self.fail(error)

    def next_upstream(self) -> bool:
        """Try the request on an upstream it has not failed on yet; False when none is left."""
        member = self.member
        if member is None or self.route.group.single:
            return False
        following = self.route.group.choose((*self.tried, member))
        if following is None:
            return False
        self.tried += (member,)
        self.leave_upstream()
        self.conn = None
        self.member = self.chosen = following
        following.load[0] += 1
        self.dial(fresh=True)
        return True

    def leave_upstream(self) -> None:
        """This attempt is over: the upstream has one request less in flight."""
        member, self.member = self.member, None
        if member is not None:
            member.load[0] -= 1

    def no_upstream(self) -> None:
        """Every upstream is down (or failed this request already): 503 at once, no waiting on any."""
        group = self.route.group
        self.abandon()
        self.log.warn("{where}: no upstream available", where=group.describe())
        self.logged(503)
        message = "The application behind this proxy is unavailable. Please try again shortly."
        retry_after = [(b"Retry-After", b"%d" % group.retry_after())]
        self.handler.error_pages.send(self.exchange, self.route.site, 503, message, retry_after)  # the site's page

    @property
    def upstream(self) -> Upstream:
        """The upstream of the last attempt (the route's first before one is chosen)."""
        chosen = self.chosen
        return chosen.upstream if chosen is not None else self.route.upstream

    def connected(self, conn: UpstreamConnection) -> None:
        if self.stage >= APP_FINISHED:
            conn.pool.release(conn)
            return
        self.stage = SENT
        self.conn = conn
        request_head = self.request_head
        if request_head is None:
            exchange = self.exchange
            head = exchange.head
            trusted = bool(self.handler.trusted_proxies) and is_trusted(
                exchange.client_address, self.handler.trusted_proxies
            )
            request_head = self.request_head = upstream_request_head(
                head.method,
                head.target,
                head.host,
                head.headers,
                exchange.client_address,
                b"https" if exchange.secure else b"http",
                exchange.server_port,
                trusted,
                head.upgrade,
                self.framing(),
            )
        conn.send(request_head, self, self.method == b"HEAD")
        self.sent_at = self.set_timer(self.handler.server.upstream_timeout)
        if self.streaming:
            conn.set_request_producer(_BodyPauser(self.exchange))
            if self.body_complete:
                conn.request_complete = True
            else:
                self.exchange.set_body_consumer(self.body_sink())
                self.exchange.resume_body()
        elif self.body is not None:
            # The whole body, again on a retry; the app's socket paces it.
            self.body.send(conn, self.body_sent)
        else:
            conn.request_complete = True

    sent_at = 0.0
    request_head: bytes | None = None  # as sent to the app (kept for a retry)

    # -- response side (ResponseSink) ---------------------------------------

    # What the client has not taken yet of a buffered answer, and since when
    # it has taken nothing.
    buffering = False
    relay: ResponseBuffer | None = None
    client_paused = False
    stalled_since = 0.0
    recorded = False  # the access-log line is written (a tunnel's at its start)

    def answered(self) -> None:
        """The app answered: its upstream's failures are forgiven (not at connect, so that an app
        that accepts and then closes unanswered still counts towards ``max_fails``)."""
        member = self.member
        if member is not None and (member.failures or member.down_until):
            self.route.group.succeeded(member)

    def response_head(self, status: int, reason: bytes, fields: bytes, content_length: int | None) -> None:
        self.answered()
        self.last_activity = now = self.clock.seconds()
        route = self.route
        if route.latency is not None:
            route.latency.observe(now - self.sent_at)
        if status == 101:
            self.pending_101 = (reason, fields)
            return
        self.stage = RELAYING
        self.status = status
        fields, allowed = accel_buffering(fields)
        self.buffering = allowed and route.site.response_buffering
        exchange = self.exchange
        exchange.start_response(status, reason, response_block(fields, self.hsts, self.secure_cookies), content_length)
        if self.conn is not None:
            exchange.register_producer(self)

    def response_whole(self, status: int, reason: bytes, fields: bytes, body: bytes) -> None:
        """The commonest answer: head and the whole body arrived in one read."""
        if self.stage >= APP_FINISHED:
            return
        self.stage = DONE
        member = self.member  # answered() and leave_upstream(), inline: the commonest answer
        if member is not None:
            if member.failures or member.down_until:
                self.route.group.succeeded(member)
            self.member = None
            member.load[0] -= 1
        if self.body is not None or self.sink is not None:
            self.drop_body()
        self.timer.clear()
        route = self.route
        if route.latency is not None:
            route.latency.observe(self.clock.seconds() - self.sent_at)
        self.status = status
        exchange = self.exchange
        self.conn = None
        fields, _ = accel_buffering(fields)
        exchange.respond(status, reason, response_block(fields, self.hsts, self.secure_cookies), body)
        self.logged(status, len(body))

    def response_data(self, data: bytes) -> None:
        self.last_activity = self.clock.seconds()
        relay = self.relay
        if relay is not None:
            relay.add(data)
        else:
            self.deliver(data)

    def response_end(self) -> None:
        if self.stage >= APP_FINISHED:
            return
        self.leave_upstream()
        self.drop_body()
        self.conn = None  # the app's connection goes back to the pool now
        relay = self.relay
        if relay is not None and not relay.empty:
            self.stage = DRAINING
            relay.end()  # delivered_all follows once the client has it all
            self.arm_timer()  # only the client's clock runs now
            return
        self.complete()

    def complete(self) -> None:
        """The whole answer went to the client."""
        if self.stage >= OVER:
            return
        self.stage = DONE
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.close()  # it may be empty yet hold its (now unneeded) file
        self.cancel_timer()  # before finish: on HTTP/1.1 the deadline goes back to the connection
        exchange = self.exchange
        exchange.unregister_producer()
        exchange.finish()
        self.logged(self.status)

    def response_failed(self, error: UpstreamError) -> None:
        if self.stage >= APP_FINISHED:
            return
        if (
            error.before_response
            and error.reused
            and not self.retried
            and self.method in IDEMPOTENT
            and not self.streaming
            and self.body_complete
        ):
            # The app closed an idle keep-alive connection as we reused it.
            self.retried = True
            self.conn = None
            self.dial(fresh=True)
            return
        if error.before_response and not error.reused and not self.exchange.response_started:
            # A fresh connection the app closed without a word (an app stopping, its queue
            # reset): count it against the upstream; it may have seen the request, so only
            # an idempotent one whose body we still hold goes to the next upstream.
            if self.member is not None:
                self.route.group.failed(self.member, error.detail)
            replayable = not self.streaming and self.body_complete
            if may_retry(reached_app=True, method=self.method, body_replayable=replayable) and self.next_upstream():
                return
        self.fail(error)

    def response_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        if not self.upgrade:
            # A 101 to a request that asked for no upgrade: not HTTP we can relay.
            conn.close()
            self.fail(UpstreamError(502, "the app switched protocols unasked", before_response=True))
            return
        self.stage = TUNNEL
        self.cancel_timer()
        self.leave_upstream()
        self.conn = conn
        reason, fields = self.pending_101 or (b"Switching Protocols", b"")
        out = response_block(fields, None, False, True)
        self.status = 101
        tunnel = _Tunnel(self)
        conn.tunnel_to(tunnel)
        self.exchange.start_response(101, reason, out, None)
        self.exchange.start_tunnel(conn)
        # Back-pressure both ways: a slow side pauses reading from the other.
        self.exchange.register_producer(tunnel)
        conn.set_request_producer(_BodyPauser(self.exchange))
        if rest:
            self.exchange.write(rest)
        self.logged(101)

    def client_transport(self) -> Any:
        return self.exchange.transport

    # -- the response buffer's output (BufferOutput) ----------------------------

    def deliver(self, data: bytes) -> None:
        self.sent_bytes += len(data)
        self.exchange.write(data)

    def delivered_all(self) -> None:
        self.complete()

    def pause_app(self) -> None:
        self.paused = True
        if self.conn is not None:
            self.conn.pause_response()

    def resume_app(self) -> None:
        self.paused = False
        self.touch()
        if self.conn is not None:
            self.conn.resume_response()

    def buffer_failed(self, detail: str) -> None:
        self.log.warn("{upstream}: {detail}; response cut short", upstream=self.upstream.url, detail=detail)
        self.cut(502)

    # -- failures --------------------------------------------------------------

    def abandon(self) -> None:
        """Nothing more goes to the client: drop what is buffered for it, stop its clock."""
        self.stage = ABANDONED
        self.leave_upstream()
        self.drop_body()
        self.cancel_timer()
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.close()
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def cut(self, status: int) -> None:
        """Cut a started answer off: the client sees a broken response, the log says ``status``."""
        if self.stage >= OVER:
            return
        self.abandon()
        self.exchange.abort()
        self.logged(status)

    def fail(self, error: UpstreamError) -> None:
        upstream = self.upstream
        if self.exchange.response_started:
            self.log.warn("{upstream}: {detail}; response cut short", upstream=upstream.url, detail=error.detail)
            self.cut(502)
            return
        self.abandon()
        self.log.warn("{upstream}: {detail}", upstream=upstream.url, detail=error.detail)
        message = None
        if self.route.dev and error.status == 502 and error.detail.startswith("cannot connect"):
            message = f"Nothing is listening on {upstream.url}: {dev_app_hint(upstream)} and reload this page."
        self.logged(error.status)
        self.handler.error_pages.send(self.exchange, self.route.site, error.status, message)  # the site's page, if any

    def fail_request(self, status: int) -> None:
        if self.stage >= APP_FINISHED:
            return
        self.abandon()
        self.logged(status)
        if self.exchange.response_started:
            self.exchange.abort()
        else:
            pages.send(self.exchange, status)

    def client_gone(self) -> None:
        """The client left first: 499 in the log, as nginx writes it."""
        if self.stage >= OVER:
            return
        self.abandon()
        self.logged(499)

    def client_too_slow(self) -> None:
        self.log.info(
            "{client} took nothing of the answer for {seconds:g}s; connection cut",
            client=self.exchange.client_address,
            seconds=self.handler.server.send_timeout,
        )
        self.cut(self.status)

    # -- timers ----------------------------------------------------------------

    # One deadline serves two clocks: the app's (upstream_timeout without a
    # byte, unless we paused it) and the client's (send_timeout without
    # taking a byte, while it does not read).

    def touch(self) -> None:
        self.last_activity = self.clock.seconds()

    def set_timer(self, seconds: float) -> float:
        """Time out after ``seconds`` without a byte from the app; returns now."""
        self.timeout = seconds
        self.last_activity = now = self.timer.set(seconds, self.timed_out)
        return now

    def cancel_timer(self) -> None:
        self.timer.clear()

    def arm_timer(self, now: float | None = None) -> None:
        """Set the deadline for whichever clock runs out first (or clear it if neither runs)."""
        if self.stage >= OVER or self.status == 101:
            return
        if now is None:
            now = self.clock.seconds()
        wait = math.inf
        if self.client_paused:
            wait = self.handler.server.send_timeout - (now - self.stalled_since)
        if self.stage < APP_FINISHED:
            # Waiting on a slow client is not the app's fault.
            wait = min(wait, self.timeout if self.paused else self.timeout - (now - self.last_activity))
        if wait == math.inf:
            self.timer.clear()
        else:
            self.timer.set(max(wait, 0.0), self.timed_out)

    def timed_out(self) -> None:
        if self.stage >= OVER:
            return
        now = self.clock.seconds()
        if self.client_paused and now - self.stalled_since >= self.handler.server.send_timeout:
            self.client_too_slow()
            return
        if self.stage < APP_FINISHED and not self.paused and now - self.last_activity >= self.timeout:
            seconds = self.timeout
            if self.stage is RECEIVING_BODY:
                if self.body is not None and self.body.waiting_on_disk:
                    self.last_activity = now  # our own disk is slow, not the client
                    self.arm_timer(now)
                    return
                self.fail_request(408)  # the body stopped arriving
                return
            self.fail(
                UpstreamError(504, f"no answer from the app within {seconds:g}s", before_response=not self.status)
            )
            return
        self.arm_timer(now)

    def logged(self, status: int, size: int | None = None) -> None:
        """One access-log line and one count per request, however it ended."""
        if self.recorded:
            return
        self.recorded = True
        self.handler.record(
            self.exchange,
            self.route.name,
            status,
            self.sent_bytes if size is None else size,
            (chosen.upstream if (chosen := self.chosen) is not None else self.route.upstream).url,  # the one last tried
            self.received,
        )

    # IPushProducer for the client's side: the client reads slower than the
    # app writes, so the answer goes to the buffer (or, unbuffered, reading
    # from the app pauses).

    def pauseProducing(self) -> None:
        if self.stage >= OVER:
            return
        self.client_paused = True
        self.stalled_since = now = self.clock.seconds()
        relay = self.relay
        if relay is None and self.buffering and self.stage < APP_FINISHED:
            relay = self.relay = ResponseBuffer(self.handler.response_buffers, self)
        if relay is not None:
            relay.pause()
        elif self.conn is not None:
            self.paused = True
            self.conn.pause_response()
        self.arm_timer(now)

    def resumeProducing(self) -> None:
        self.client_paused = False
        relay = self.relay
        if relay is not None:
            relay.resume()
            return
        self.paused = False
        self.touch()
        if self.conn is not None:
            self.conn.resume_response()

    def stopProducing(self) -> None:
        if self.conn is not None:
            self.conn.close()


class _BodySink:
    """Passes body bytes on until the request is over, then lets go of it.

    The exchange keeps its body consumer; through this, that is no cycle
    back to the request, which reference counting alone can then free.
    """

    __slots__ = ("request",)

    def __init__(self, request: ProxiedRequest | None) -> None:
        self.request = request

    def body_data(self, data: bytes) -> None:
        if self.request is not None:
            self.request.body_data(data)

    def body_end(self) -> None:
        if self.request is not None:
            self.request.body_end()


@implementer(IPushProducer)
class _Tunnel:
    """A request after its 101: bytes go both ways, and each side's pace holds the other.

    The app's connection writes the app's bytes here, and says here when it
    closed; the client's transport pauses and resumes reading from the app
    here.  The request keeps its stage, its log line and the app's
    connection (``request.conn``, None once the request is abandoned).
    Made only for an upgrade, so plain requests pay nothing for it.
    """

    __slots__ = ("request",)

    def __init__(self, request: ProxiedRequest) -> None:
        self.request = request

    def write(self, data: bytes) -> None:
        self.request.exchange.write(data)

    def finish(self) -> None:
        """The app closed its side: the client's is closed after what came before."""
        request = self.request
        if request.stage is TUNNEL:
            request.stage = TUNNEL_ENDED
        request.exchange.finish()

    def pauseProducing(self) -> None:
        if self.request.conn is not None:
            self.request.conn.pause_response()

    def resumeProducing(self) -> None:
        if self.request.conn is not None:
            self.request.conn.resume_response()

    def stopProducing(self) -> None:
        if self.request.conn is not None:
            self.request.conn.close()


@implementer(IPushProducer)
class _BodyPauser:
    """Pauses reading the client's body while the app's socket is full."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def pauseProducing(self) -> None:
        self.exchange.pause_body()

    def resumeProducing(self) -> None:
        self.exchange.resume_body()

    def stopProducing(self) -> None:
        pass

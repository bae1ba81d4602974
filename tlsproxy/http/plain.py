"""The port-80 side: ACME HTTP-01 answers, and a redirect to HTTPS for our hosts.

Only a host that a site lists is ever redirected, so the HTTP port cannot be
used as an open redirect; anything else gets 404.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from tlsproxy.certs.challenges import HTTP01Answers, is_valid_token
from tlsproxy.http import pages
from tlsproxy.http.exchange import Exchange
from tlsproxy.http.wire import redirect_location, split_host_port

CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"


class PlainHTTPHandler:
    """Answer HTTP-01 tokens; send every other request for a known host to HTTPS."""

    log = Logger()

    def __init__(
        self,
        answers: HTTP01Answers,
        is_our_host: Callable[[str], bool],
        https_port: int,
        canonical: Callable[[str], str | None] = lambda host: None,
    ) -> None:
        self.answers = answers
        self.is_our_host = is_our_host
        self.https_port = https_port
        # A redirect_from name goes straight to its site's canonical name: one hop, not two.
        self.canonical = canonical

    def handle(self, exchange: Exchange) -> None:
        head = exchange.head
        if head.target.startswith(CHALLENGE_PREFIX) and head.method in (b"GET", b"HEAD"):
            token = head.target[len(CHALLENGE_PREFIX) :].decode("ascii", "replace")
            answer = self.answers.get(token) if is_valid_token(token) else None
            if answer is None:
                pages.send(exchange, 404, "No such ACME challenge.")
                return
            body = answer.encode("ascii")
            self.log.info("answered HTTP-01 challenge for {host}", host=head.host.decode("ascii", "replace"))
            exchange.start_response(200, b"OK", [(b"Content-Type", b"text/plain")], len(body))
            exchange.write(body)
            exchange.finish()
            return
        host, _port = split_host_port(head.host)
        if not host or not self.is_our_host(host) or not head.target.startswith(b"/"):
            pages.send(exchange, 404)
            return
        location = redirect_location(self.canonical(host) or host, self.https_port, head.target)
        status = 301 if head.method in (b"GET", b"HEAD") else 308
        pages.send(exchange, status, "This site is served over HTTPS.", [(b"Location", location)])

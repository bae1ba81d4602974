"""Pick the certificate for each handshake by server name, and swap it live.

Every connection starts on a front context: it holds the session cache and
ticket keys, so resumption survives certificate swaps.  The front changes only
when the ticket keys rotate (see :mod:`tlsproxy.tls.tickets`); a ClientHello
that offers a ticket of the previous key starts on the previous front.  Before
OpenSSL reads the ClientHello the connection is moved to the context of the
site it names, whose session id context is derived from its certificate's
names (a renewal keeps it), so a session of one certificate is never resumed
under another.  The SNI callback then settles the context as OpenSSL sees it.
Swapping a certificate is replacing one entry of :class:`SniMap`; connections
already past their handshake keep the context they were given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from tlsproxy.certs.challenges import TLSALPN01Answers
from tlsproxy.tls.hello import ClientHello
from tlsproxy.tls.policy import ACME_TLS_ALPN, TLSPolicy
from tlsproxy.tls.tickets import TicketKeyRing, learn_key_name


class NoChallengePending(SSL.Error):
    """An ``acme-tls/1`` handshake for a name with no TLS-ALPN-01 challenge pending."""


def normalise_host(name: str | bytes | None) -> str | None:
    if name is None:
        return None
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            return None
    return name.lower().rstrip(".") or None


class SniMap:
    """Server name -> SSL context, by site, in configuration order.

    A name of a site that has no certificate yet maps to nothing, so its
    handshakes fail with an alert rather than showing another site's
    certificate.  A missing or unknown server name gets the first site's.
    """

    def __init__(self, sites: Iterable[tuple[str, Sequence[str]]] = ()) -> None:
        self._order: list[str] = []
        self._site_of: dict[str, str] = {}
        self._contexts: dict[str, SSL.Context] = {}
        self._on_demand: dict[str, Callable[[str], SSL.Context | None]] = {}
        for name, hosts in sites:
            self.add_site(name, hosts)

    def add_site(self, name: str, hosts: Sequence[str]) -> None:
        if name in self._order:
            raise ValueError(f"site {name!r} is already in the map")
        for host in hosts:
            key = normalise_host(host)
            assert key is not None
            if key in self._site_of:
                raise ValueError(f"host {host!r} already belongs to site {self._site_of[key]!r}")
        self._order.append(name)
        for host in hosts:
            self._site_of[normalise_host(host)] = name  # type: ignore[index]

    def set_context(self, site: str, context: SSL.Context) -> None:
        """Serve ``context`` for ``site`` from the next handshake on."""
        if site not in self._order:
            raise KeyError(site)
        self._contexts[site] = context

    def set_on_demand(self, site: str, issue: Callable[[str], SSL.Context | None]) -> None:
        """For names a site matches only by wildcard: ask ``issue(name)`` for a context."""
        self._on_demand[site] = issue

    def context_of(self, site: str) -> SSL.Context | None:
        return self._contexts.get(site)

    @property
    def sites(self) -> list[str]:
        return list(self._order)

    def site_for(self, server_name: str | bytes | None) -> str | None:
        """The site a server name belongs to: exact host, then wildcard."""
        host = normalise_host(server_name)
        if host is None:
            return None
        site = self._site_of.get(host)
        if site is None and "." in host:
            site = self._site_of.get("*." + host.split(".", 1)[1])
        return site

    def lookup(self, server_name: str | bytes | None) -> SSL.Context | None:
        site = self.site_for(server_name)
        if site is not None:
            issue = self._on_demand.get(site)
            if issue is not None:
                host = normalise_host(server_name)
                if host is not None and self._site_of.get(host) != site:
                    context = issue(host)
                    if context is not None:
                        return context
            return self._contexts.get(site)
        if self._order:
            return self._contexts.get(self._order[0])
        return None


@implementer(IOpenSSLServerConnectionCreator)
class SniServer:
    """Make server-side TLS connections that dispatch on SNI and ALPN."""

    log = Logger()

    def __init__(
        self,
        policy: TLSPolicy,
        sni_map: SniMap,
        alpn_answers: TLSALPN01Answers | None = None,
    ) -> None:
        self.policy = policy
        self.sni_map = sni_map
        self.alpn_answers = alpn_answers if alpn_answers is not None else TLSALPN01Answers()
        self.tickets = TicketKeyRing(self._new_front, learn_key_name)

    def _new_front(self) -> SSL.Context:
        front = self.policy.new_context(self.choose_alpn)
        front.set_tlsext_servername_callback(self._on_server_name)
        return front

    def rotate_ticket_keys(self) -> None:
        self.tickets.rotate()

    def context_for(self, certified):  # type: ignore[no-untyped-def]
        """A site context built with this server's policy and ALPN chooser."""
        return self.policy.context_for(certified, self.choose_alpn)

    def serverConnectionForTLS(self, protocol: object) -> SSL.Connection:
        """A connection on the front its ticket asks for, already on the context of the site it names."""
        hello: ClientHello | None = getattr(protocol, "client_hello", None)
        connection = SSL.Connection(self.tickets.front_for(hello), None)
        if hello is not None:
            context = self.sni_map.lookup(hello.server_name)
            if context is not None:
                connection.set_context(context)
        return connection

    def _on_server_name(self, connection: SSL.Connection) -> None:
        context = self.sni_map.lookup(connection.get_servername())
        if context is not None:
            connection.set_context(context)

    def choose_alpn(self, connection: SSL.Connection, offered: list[bytes]) -> bytes | object:
        if ACME_TLS_ALPN in offered:
            # RFC 8737: such a hello gets the challenge certificate or nothing.
            host = normalise_host(connection.get_servername())
            challenge = self.alpn_answers.get(host) if host else None
            if challenge is None:
                self.log.info("acme-tls/1 handshake for {host} with no challenge pending", host=host)
                # pyOpenSSL turns a raise into SSL_TLSEXT_ERR_ALERT_FATAL, which
                # OpenSSL sends as no_application_protocol (an empty choice
                # was an internal_error); the transport reports it as a failed
                # handshake.
                raise NoChallengePending(host)
            connection.set_context(challenge)
            return ACME_TLS_ALPN
        return self.policy.choose_protocol(offered)

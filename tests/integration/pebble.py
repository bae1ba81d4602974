"""Pebble (Let's Encrypt's ACME test server) and its DNS helper, as pytest fixtures.

``pebble`` (module scope) starts ``pebble-challtestsrv`` (DNS only, every name
-> 127.0.0.1, no AAAA) and ``pebble`` with a trustme certificate for its own
HTTPS, random nonce rejection left on, ``PEBBLE_VA_NOSLEEP=1``, and
``httpPort``/``tlsPort`` set to free ports where the test must serve HTTP-01 /
TLS-ALPN-01.  Both processes are always stopped.  Tests that use it are
skipped (with the reason) only when /usr/bin/pebble is not installed.

Use from a test module::

    from tests.integration.pebble import pebble, pebble_factory  # noqa: F401 (fixtures)
"""

from __future__ import annotations

import json
import shutil
import ssl
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.integration.procs import Process, free_port, wait_for_port

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
CHALLTESTSRV = shutil.which("pebble-challtestsrv") or "/usr/bin/pebble-challtestsrv"
HAVE_PEBBLE = Path(PEBBLE).exists() and Path(CHALLTESTSRV).exists()
requires_pebble = pytest.mark.skipif(
    not HAVE_PEBBLE, reason="pebble / pebble-challtestsrv not installed (apt-get install pebble)"
)


@dataclass
class Pebble:
    """A running Pebble: where it listens and how to trust it."""

    directory_url: str
    management_url: str
    ca_bundle: str
    http_port: int
    tls_port: int
    process: Process
    _ssl: ssl.SSLContext

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.management_url + path, context=self._ssl, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def roots_pem(self) -> bytes:
        """Pebble's root (new at every start), from the management port."""
        status, body = self._get("/roots/0")
        assert status == 200, body
        return body

    def intermediates_pem(self) -> bytes:
        status, body = self._get("/intermediates/0")
        assert status == 200, body
        return body

    def cert_status(self, serial: int) -> dict:
        """``/cert-status-by-serial/<hex>``: ``Status`` is "Valid" or "Revoked"."""
        status, body = self._get(f"/cert-status-by-serial/{serial:x}")
        assert status == 200, body
        return json.loads(body)


@contextmanager
def run_pebble(
    validity: int | None = None,
    env: dict[str, str] | None = None,
    http_port: int | None = None,
    tls_port: int | None = None,
    eab_keys: dict[str, str] | None = None,
) -> Iterator[Pebble]:
    """Start challtestsrv + pebble on free ports; stop both on exit."""
    with tempfile.TemporaryDirectory(prefix="pebble-") as tmp:
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        cert_path, key_path, ca_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem"), Path(tmp, "ca.pem")
        leaf.private_key_pem.write_to_path(str(key_path))
        leaf.cert_chain_pems[0].write_to_path(str(cert_path))
        ca.cert_pem.write_to_path(str(ca_path))
        dns_port, chall_mgmt, acme_port, mgmt_port = free_port(), free_port(), free_port(), free_port()
        http_port = http_port or free_port()
        tls_port = tls_port or free_port()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{acme_port}",
                "managementListenAddress": f"127.0.0.1:{mgmt_port}",
                "certificate": str(cert_path),
                "privateKey": str(key_path),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        if validity is not None:
            config["pebble"]["certificateValidityPeriod"] = validity
        if eab_keys:
            config["pebble"]["externalAccountBindingRequired"] = True
            config["pebble"]["externalAccountMACKeys"] = eab_keys
        config_path = Path(tmp, "pebble.json")
        config_path.write_text(json.dumps(config))
        dns = Process(
            [
                CHALLTESTSRV,
                "-defaultIPv6",
                "",
                "-defaultIPv4",
                "127.0.0.1",
                "-dns01",
                f"127.0.0.1:{dns_port}",
                "-management",
                f"127.0.0.1:{chall_mgmt}",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
            ]
        )
        try:
            wait_for_port(chall_mgmt)
            server = Process(
                [PEBBLE, "-config", str(config_path), "-dnsserver", f"127.0.0.1:{dns_port}"],
                env={"PEBBLE_VA_NOSLEEP": "1", **(env or {})},
            )
            try:
                wait_for_port(acme_port)
                wait_for_port(mgmt_port)
                context = ssl.create_default_context(cafile=str(ca_path))
                yield Pebble(
                    directory_url=f"https://127.0.0.1:{acme_port}/dir",
                    management_url=f"https://127.0.0.1:{mgmt_port}",
                    ca_bundle=str(ca_path),
                    http_port=http_port,
                    tls_port=tls_port,
                    process=server,
                    _ssl=context,
                )
            finally:
                server.stop()
        finally:
            dns.stop()


@pytest.fixture(scope="module")
def pebble() -> Iterator[Pebble]:
    """A Pebble for the whole test module (90-day certificates)."""
    if not HAVE_PEBBLE:
        pytest.skip("pebble / pebble-challtestsrv not installed (apt-get install pebble)")
    with run_pebble() as p:
        yield p


@pytest.fixture
def pebble_factory() -> Iterator:
    """``start(validity=..., env=...)`` -> a fresh Pebble, stopped after the test."""
    if not HAVE_PEBBLE:
        pytest.skip("pebble / pebble-challtestsrv not installed (apt-get install pebble)")
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield lambda **kw: stack.enter_context(run_pebble(**kw))


# ---------------------------------------------------------------------------
# In-process challenge listeners (until ``twist tlsproxy`` serves them itself)

_reactor_thread = None


def reactor_in_thread():  # type: ignore[no-untyped-def]
    """The global reactor, running in a daemon thread for the rest of the test session."""
    global _reactor_thread
    import threading

    from twisted.internet import reactor

    if _reactor_thread is None:
        _reactor_thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
        _reactor_thread.start()
    return reactor


class ChallengeListeners:
    """HTTP-01 (twisted.web on ``http_port``) and TLS-ALPN-01 (SniServer on ``tls_port``).

    ``sni`` also serves ordinary handshakes, so a test can install an issued
    certificate with ``sni.sni_map.set_context`` and look at what is served.
    """

    def __init__(self, http_port: int, tls_port: int, sites: list[tuple[str, list[str]]]) -> None:
        from tlsproxy.certs.challenges import HTTP01Answers, TLSALPN01Answers
        from tlsproxy.tls.policy import TLSPolicy
        from tlsproxy.tls.sni import SniMap, SniServer

        self.http01 = HTTP01Answers()
        self.alpn01 = TLSALPN01Answers()
        self.sni = SniServer(TLSPolicy(), SniMap(sites), self.alpn01)
        self.http_port, self.tls_port = http_port, tls_port
        self._ports: list = []

    def _listen(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory, Protocol
        from twisted.protocols.tls import TLSMemoryBIOFactory
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        answers = self.http01

        class Token(Resource):
            isLeaf = True

            def render_GET(self, request):  # type: ignore[no-untyped-def]
                token = request.postpath[0].decode() if request.postpath else ""
                answer = answers.get(token)
                if answer is None:
                    request.setResponseCode(404)
                    return b"no such challenge"
                request.setHeader(b"content-type", b"text/plain")
                return answer.encode()

        root = Resource()
        well_known = Resource()
        root.putChild(b".well-known", well_known)
        well_known.putChild(b"acme-challenge", Token())
        self._ports.append(reactor.listenTCP(self.http_port, Site(root), interface="127.0.0.1"))

        class Hello(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                self.transport.loseConnection()

        tls = TLSMemoryBIOFactory(self.sni, False, Factory.forProtocol(Hello))
        self._ports.append(reactor.listenTCP(self.tls_port, tls, interface="127.0.0.1"))

    def __enter__(self) -> ChallengeListeners:
        from twisted.internet.threads import blockingCallFromThread

        reactor = reactor_in_thread()
        blockingCallFromThread(reactor, self._listen)
        return self

    def __exit__(self, *exc: object) -> None:
        from twisted.internet.defer import gatherResults
        from twisted.internet.threads import blockingCallFromThread

        reactor = reactor_in_thread()
        ports, self._ports = self._ports, []
        blockingCallFromThread(reactor, lambda: gatherResults([p.stopListening() for p in ports]))


def served_certificate(port: int, server_name: str | None, roots_pem: bytes | None = None):  # type: ignore[no-untyped-def]
    """The leaf certificate a TLS handshake to 127.0.0.1:port for ``server_name`` shows.

    With ``roots_pem`` the chain and the name are verified against those roots.
    """
    import socket

    from cryptography import x509

    if roots_pem is not None:
        context = ssl.create_default_context(cadata=roots_pem.decode())
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)

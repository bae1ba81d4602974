"""Does the running proxy serve a challenge answer yet?  Asked before the CA is.

The ``tlsproxy renew`` and ``revoke`` commands publish their answers in the
store, and a running proxy picks them up on its next poll.  Rather than sleep
for a fixed time and hope, the command asks the proxy's own listeners, as the
CA will: ``GET /.well-known/acme-challenge/<token>`` on an http listener, or a
handshake offering ``acme-tls/1`` on an https listener.

An answer is one of three things:

- ``True``: a listener serves exactly this answer;
- ``False``: a listener answered with something else (the proxy has not
  loaded it yet), or too slowly;
- ``None``: nothing can tell, because no listener address is known
  (``systemd:`` sockets), or nothing accepts connections there (the proxy may
  be reachable some other way, behind a port mapping).

Every probe ends within its timeout, on the wall clock, whatever the peer does.

Everything here blocks; it is for the command line.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509

from tlsproxy.acme.alpn01 import ACME_IDENTIFIER_OID, acme_identifier_value
from tlsproxy.compat.twisted import parse_server_endpoint

Address = tuple[str, int] | str  # (host, port) for TCP, a path for a unix socket


def local_address(description: str) -> Address | None:
    """Where to reach a listener from this machine, or None when it cannot be known.

    ``tcp:80`` -> ("127.0.0.1", 80); ``tcp:443:interface=\\:\\:`` -> ("::1", 443);
    ``unix:/run/tlsproxy.sock`` -> "/run/tlsproxy.sock"; ``systemd:...`` -> None.
    """
    kind = description.split(":", 1)[0].lower()
    if kind not in ("tcp", "unix"):
        return None  # systemd: sockets, and ssl: (whose key files parsing would read)
    try:
        _kind, args, kwargs = parse_server_endpoint(description)
    except Exception:  # Twisted raises assorted types for bad strings
        return None
    if kind == "unix":
        path = args[0] if args else kwargs.get("address")
        return os.path.abspath(str(path)) if path else None
    try:
        port = int(args[0] if args else kwargs["port"])
    except (IndexError, KeyError, ValueError):
        return None
    interface = str(kwargs.get("interface", "")) or "0.0.0.0"  # noqa: S104 -- Twisted's own default
    try:
        unspecified = ipaddress.ip_address(interface).is_unspecified
    except ValueError:
        return None
    if unspecified:  # a wildcard listener is asked on loopback
        interface = "::1" if ":" in interface else "127.0.0.1"
    return interface, port


class Unreachable(Exception):
    """Nothing accepts connections at the address: no proxy there to ask."""


class _Deadline:
    """One probe's time, on the wall clock: every socket operation gets what is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer in time")
        return left


def _connect(address: Address, deadline: _Deadline) -> socket.socket:
    """A connected socket; Unreachable when nothing listens (refused, no such socket file)."""
    try:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(deadline.left())
            try:
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
            return sock
        return socket.create_connection(address, timeout=deadline.left())
    except (ConnectionRefusedError, FileNotFoundError) as e:
        raise Unreachable(f"{_where(address)}: {e.strerror or e}") from None


def _read_all(sock: socket.socket, deadline: _Deadline, limit: int = 65536) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        sock.settimeout(deadline.left())
        data = sock.recv(limit - size)
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


def http01_served(address: Address, host: str, token: str, key_authorization: str, timeout: float = 2.0) -> bool:
    """Whether ``address`` answers this token for ``host`` with exactly ``key_authorization``.

    The whole probe takes at most ``timeout`` seconds.  Raises Unreachable when
    nothing listens there; any other failure (a timeout included) is False.
    """
    request = f"GET /.well-known/acme-challenge/{token} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    deadline = _Deadline(timeout)
    try:
        with _connect(address, deadline) as sock:
            sock.settimeout(deadline.left())
            sock.sendall(request.encode("ascii"))
            answer = _read_all(sock, deadline)
    except Unreachable:
        raise
    except OSError:  # timeouts and resets
        return False
    head, sep, body = answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split(b" ")
    # CAs compare the body with trailing whitespace trimmed (RFC 8555 section 8.3)
    return bool(sep) and status[1:2] == [b"200"] and body.rstrip() == key_authorization.encode("ascii")


def alpn01_served(address: Address, host: str, key_authorization: str, timeout: float = 2.0) -> bool:
    """Whether an ``acme-tls/1`` handshake for ``host`` at ``address`` gets this answer's certificate.

    As RFC 8737 section 3 asks: ``acme-tls/1`` chosen, a certificate for exactly
    this one name, and a critical acmeIdentifier holding the answer's digest.
    The whole probe takes at most ``timeout`` seconds.  Raises Unreachable
    when nothing listens there; any other failure is False (the proxy refuses
    ``acme-tls/1`` for a name with no answer loaded).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a self-signed challenge certificate: its content is what counts
    context.set_alpn_protocols(["acme-tls/1"])
    deadline = _Deadline(timeout)
    try:
        with _connect(address, deadline) as raw:
            raw.settimeout(deadline.left())
            with context.wrap_socket(raw, server_hostname=host) as tls:
                chosen = tls.selected_alpn_protocol()
                der = tls.getpeercert(binary_form=True)
    except Unreachable:
        raise
    except OSError:  # timeouts, resets, and handshake failures (ssl.SSLError)
        return False
    if chosen != "acme-tls/1" or not der:
        return False
    try:
        cert = x509.load_der_x509_certificate(der)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        identifier = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    except Exception:  # not a certificate cryptography can read, or lacking either extension
        return False
    value = getattr(identifier.value, "value", b"")
    return (
        list(names) == [x509.DNSName(host)]
        and identifier.critical
        and value == acme_identifier_value(key_authorization)
    )


@dataclass(frozen=True)
class Answer:
    """One published answer, as the CA will look for it."""

    kind: str  # "http-01" or "tls-alpn-01"
    host: str
    token: str
    key_authorization: str


class ListenerCheck:
    """Asks this machine's listeners (from ``[server] http`` and ``https``) for an answer.

    Each probe takes at most ``timeout`` seconds.  After each call,
    ``last_error`` says why the answer was not seen served.
    """

    def __init__(self, http: Iterable[str], https: Iterable[str], timeout: float = 2.0) -> None:
        self.http = self._addresses(http)
        self.https = self._addresses(https)
        self.timeout = timeout
        self.last_error = ""

    @staticmethod
    def _addresses(descriptions: Iterable[str]) -> Sequence[Address]:
        found = (local_address(d) for d in descriptions)
        return tuple(a for a in found if a is not None)

    def __call__(self, answer: Answer) -> bool | None:
        """True when some listener serves ``answer``; False when one answers otherwise (or
        too slowly); None when there is no listener to ask or none accepts a connection."""
        addresses = self.http if answer.kind == "http-01" else self.https
        self.last_error = f"no {'http' if answer.kind == 'http-01' else 'https'} listener address to ask"
        reachable = False
        for address in addresses:
            try:
                if answer.kind == "http-01":
                    served = http01_served(address, answer.host, answer.token, answer.key_authorization, self.timeout)
                else:
                    served = alpn01_served(address, answer.host, answer.key_authorization, self.timeout)
            except Unreachable as e:
                if not reachable:
                    self.last_error = str(e)
                continue
            if served:
                self.last_error = ""
                return True
            reachable = True
            self.last_error = f"{_where(address)} does not serve it yet"
        return False if reachable else None


def _where(address: Address) -> str:
    if isinstance(address, str):
        return address
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

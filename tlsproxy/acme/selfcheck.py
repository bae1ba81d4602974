"""Does the running proxy serve a challenge answer yet?  Asked before the CA is.

The ``tlsproxy renew`` and ``revoke`` commands publish their answers in the
store, and a running proxy picks them up on its next poll.  Rather than sleep
for a fixed time and hope, the command asks the proxy's own listeners, as the
CA will: ``GET /.well-known/acme-challenge/<token>`` on an http listener, or a
handshake offering ``acme-tls/1`` on an https listener.

An answer is one of three things:

- ``True``: a listener serves exactly this answer;
- ``False``: a listener answered, with something else (the proxy has not
  loaded it yet);
- ``None``: nothing can tell, because no listener address is known
  (``systemd:`` sockets), or nothing listens there (the proxy may be
  reachable some other way, behind a port mapping).

Everything here blocks; it is for the command line.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509

from tlsproxy.acme.alpn01 import ACME_IDENTIFIER_OID, acme_identifier_value

Address = tuple[str, int] | str  # (host, port) for TCP, a path for a unix socket


def local_address(description: str) -> Address | None:
    """Where to reach a listener from this machine, or None when it cannot be known.

    ``tcp:80`` -> ("127.0.0.1", 80); ``tcp:443:interface=\\:\\:`` -> ("::1", 443);
    ``unix:/run/tlsproxy.sock`` -> "/run/tlsproxy.sock"; ``systemd:...`` -> None.
    """
    from twisted.internet.endpoints import _parseServer

    try:
        kind, args, kwargs = _parseServer(description, None)
    except Exception:  # Twisted raises assorted types for bad strings
        return None
    kind = (kind if isinstance(kind, str) else description.split(":", 1)[0]).lower()
    if kind == "unix":
        path = args[0] if args else kwargs.get("address")
        return str(path) if path else None
    if kind != "tcp":
        return None
    try:
        port = int(args[0] if args else kwargs["port"])
    except (IndexError, KeyError, ValueError):
        return None
    interface = str(kwargs.get("interface", ""))
    if interface in ("", "0.0.0.0"):  # noqa: S104 -- a wildcard listener is asked on loopback
        interface = "127.0.0.1"
    elif interface == "::":
        interface = "::1"
    return interface, port


def _connect(address: Address, timeout: float) -> socket.socket:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock
    return socket.create_connection(address, timeout=timeout)


def _read_all(sock: socket.socket, limit: int = 65536) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        data = sock.recv(limit - size)
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


def http01_served(address: Address, host: str, token: str, key_authorization: str, timeout: float = 2.0) -> bool:
    """Whether ``address`` answers this token for ``host`` with exactly ``key_authorization``.

    Raises OSError when nothing can be reached there; any other failure is False.
    """
    request = (f"GET /.well-known/acme-challenge/{token} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").encode(
        "ascii"
    )
    with _connect(address, timeout) as sock:
        try:
            sock.sendall(request)
            answer = _read_all(sock)
        except OSError:
            return False
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    status = head.split(b"\r\n", 1)[0].split(b" ")
    return len(status) >= 2 and status[1] == b"200" and body.strip() == key_authorization.encode("ascii")


def alpn01_served(address: Address, host: str, key_authorization: str, timeout: float = 2.0) -> bool:
    """Whether an ``acme-tls/1`` handshake for ``host`` at ``address`` gets this answer's certificate.

    Raises OSError when nothing can be reached there; a failed handshake is False
    (the proxy refuses ``acme-tls/1`` for a name with no answer loaded).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a self-signed challenge certificate: its content is what counts
    context.set_alpn_protocols(["acme-tls/1"])
    with _connect(address, timeout) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                chosen = tls.selected_alpn_protocol()
                der = tls.getpeercert(binary_form=True)
        except OSError:
            return False
    if chosen != "acme-tls/1" or not der:
        return False
    cert = x509.load_der_x509_certificate(der)
    try:
        extension = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    except x509.ExtensionNotFound:
        return False
    value = getattr(extension.value, "value", b"")
    return bool(extension.critical) and value == acme_identifier_value(key_authorization)


@dataclass(frozen=True)
class Answer:
    """One published answer, as the CA will look for it."""

    kind: str  # "http-01" or "tls-alpn-01"
    host: str
    token: str
    key_authorization: str


class ListenerCheck:
    """Asks this machine's listeners (from ``[server] http`` and ``https``) for an answer."""

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
        """True when some listener serves ``answer``, False when one answers otherwise, None when none answers."""
        addresses = self.http if answer.kind == "http-01" else self.https
        seen_other = False
        for address in addresses:
            try:
                if answer.kind == "http-01":
                    served = http01_served(address, answer.host, answer.token, answer.key_authorization, self.timeout)
                else:
                    served = alpn01_served(address, answer.host, answer.key_authorization, self.timeout)
            except (OSError, ValueError) as e:
                self.last_error = f"{_where(address)}: {e}"
                continue
            if served:
                return True
            seen_other = True
            self.last_error = f"{_where(address)} does not serve it yet"
        if not addresses:
            self.last_error = f"no {'http' if answer.kind == 'http-01' else 'https'} listener address to ask"
        return False if seen_other else None


def _where(address: Address) -> str:
    if isinstance(address, str):
        return address
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

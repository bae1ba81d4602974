"""TLS handshakes in memory: a pyOpenSSL client against a server connection, no sockets."""

from __future__ import annotations

from dataclasses import dataclass

import trustme
from cryptography import x509
from OpenSSL import SSL

from tlsproxy.certs.model import CertifiedKey


def certified(ca: trustme.CA, *names: str) -> CertifiedKey:
    """A trustme leaf for ``names`` as the value type the server serves."""
    cert = ca.issue_cert(*names, key_type=trustme.KeyType.ECDSA)
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    return CertifiedKey.from_pem(chain, cert.private_key_pem.bytes())


def challenge_context(name: str) -> SSL.Context:
    """A bare server context with a certificate of its own for ``name`` (a TLS-ALPN-01 answer's stand-in)."""
    challenge = certified(trustme.CA(), name)
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate(challenge.leaf)
    ctx.use_privatekey(challenge.key)
    return ctx


@dataclass
class Outcome:
    ok: bool
    error: str = ""
    cert: x509.Certificate | None = None
    alpn: bytes | None = None
    version: str = ""
    cipher: str = ""
    chain_serials: list[int] | None = None


def client_context(
    max_version: int | None = None,
    min_version: int | None = None,
    ciphers: str | None = None,
    alpn: list[bytes] | None = None,
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    if min_version is not None:
        ctx.set_min_proto_version(min_version)
    if ciphers is not None:
        ctx.set_cipher_list(ciphers.encode())
    if alpn:
        ctx.set_alpn_protos(alpn)
    return ctx


def handshake(
    server: SSL.Connection,
    client_ctx: SSL.Context,
    server_name: str | None = None,
) -> Outcome:
    """Run a full handshake by shuttling bytes between two memory BIOs."""
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    server.set_accept_state()
    if server_name is not None:
        client.set_tlsext_host_name(server_name.encode("idna"))
    done_client = done_server = False
    for _ in range(50):
        for conn, is_client in ((client, True), (server, False)):
            try:
                conn.do_handshake()
                if is_client:
                    done_client = True
                else:
                    done_server = True
            except SSL.WantReadError:
                pass
            except SSL.Error as e:
                return Outcome(ok=False, error=str(e))
        moved = False
        for src, dst in ((client, server), (server, client)):
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                continue
            dst.bio_write(data)
            moved = True
        if done_client and done_server and not moved:
            break
    if not (done_client and done_server):
        return Outcome(ok=False, error="handshake did not finish")
    # TLS 1.3 tickets arrive after the handshake: let the client read them.
    try:
        client.recv(1)
    except SSL.Error:
        pass
    peer = client.get_peer_certificate()
    chain = client.get_peer_cert_chain() or []
    return Outcome(
        chain_serials=[c.get_serial_number() for c in chain],
        ok=True,
        cert=peer.to_cryptography() if peer is not None else None,
        alpn=client.get_alpn_proto_negotiated() or None,
        version=client.get_protocol_version_name(),
        cipher=client.get_cipher_name() or "",
    )

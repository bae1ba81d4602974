"""The ACME client against the real Pebble: the shared contract, served certificates, revocation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.integration.pebble import ChallengeListeners, Pebble, pebble, requires_pebble, served_certificate  # noqa: F401
from tests.unit.test_acme_contract import CAContract, CAEnv, chains_to, fresh_names
from tlsproxy.acme.client import AcmeClient
from tlsproxy.acme.issuer import TableResponder, issue

pytestmark = requires_pebble


@pytest.fixture(scope="module")
def listeners(pebble: Pebble) -> Iterator[ChallengeListeners]:
    with ChallengeListeners(
        pebble.http_port, pebble.tls_port, [("served.example.test", ["served.example.test", "www.served.example.test"])]
    ) as ls:
        yield ls


def pebble_client(
    pebble: Pebble, key: ec.EllipticCurvePrivateKey | None = None, account_url: str | None = None
) -> AcmeClient:
    return AcmeClient(
        pebble.directory_url,
        key or ec.generate_private_key(ec.SECP256R1()),
        email="ops@example.test",
        agree_tos=True,
        ca_bundle=pebble.ca_bundle,
        account_url=account_url,
        poll_interval=0.1,
    )


class TestPebble(CAContract):
    """The contract against AcmeClient talking to Pebble."""

    @pytest.fixture
    def env(self, pebble: Pebble, listeners: ChallengeListeners) -> CAEnv:
        return CAEnv(
            ca=pebble_client(pebble),
            http01=listeners.http01,
            alpn01=listeners.alpn01,
            roots_pem=pebble.roots_pem,
            is_revoked=lambda cert: pebble.cert_status(cert.serial_number)["Status"] == "Revoked",
            make_ca=lambda key, url: pebble_client(pebble, key, url),
        )


def test_served_certificate_chains_to_pebble_root(pebble: Pebble, listeners: ChallengeListeners) -> None:
    """A certificate issued by Pebble and installed in the SNI map is served and verifies against Pebble's root."""
    names = ("served.example.test", "www.served.example.test")
    certified = issue(pebble_client(pebble), names, responder=TableResponder(listeners.http01, listeners.alpn01))
    listeners.sni.sni_map.set_context(names[0], listeners.sni.context_for(certified))
    for name in names:
        leaf = served_certificate(pebble.tls_port, name, pebble.roots_pem())
        assert leaf.serial_number == certified.leaf.serial_number
    assert chains_to(certified.chain, pebble.roots_pem())


def test_unknown_account_key_without_tos_fails_clearly(pebble: Pebble) -> None:
    """Registering without agree_tos is refused before anything is sent."""
    from tlsproxy.acme.client import AcmeError

    client = AcmeClient(pebble.directory_url, ec.generate_private_key(ec.SECP256R1()), ca_bundle=pebble.ca_bundle)
    with pytest.raises(AcmeError, match="terms of service"):
        client.account()


def test_ca_down_is_an_acme_error() -> None:
    """A CA nobody listens at gives an AcmeError with code 'connection'."""
    from tests.integration.procs import free_port
    from tlsproxy.acme.client import AcmeError

    client = AcmeClient(f"https://127.0.0.1:{free_port()}/dir", ec.generate_private_key(ec.SECP256R1()), agree_tos=True)
    with pytest.raises(AcmeError) as info:
        issue(client, fresh_names(1), responder=TableResponder(*_tables()))
    assert info.value.code == "connection"


def _tables():  # type: ignore[no-untyped-def]
    from tlsproxy.certs.challenges import HTTP01Answers, TLSALPN01Answers

    return HTTP01Answers(), TLSALPN01Answers()


EAB_KID = "kid-tlsproxy"
EAB_KEY = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"


def test_external_account_binding() -> None:
    """A CA that requires EAB: without it a clear error, with eab_kid/eab_hmac_key an account."""
    from tests.integration.pebble import run_pebble
    from tlsproxy.acme.client import AcmeError

    with run_pebble(eab_keys={EAB_KID: EAB_KEY}) as strict:

        def client(**eab: str) -> AcmeClient:
            return AcmeClient(
                strict.directory_url,
                ec.generate_private_key(ec.SECP256R1()),
                email="ops@example.test",
                agree_tos=True,
                ca_bundle=strict.ca_bundle,
                **eab,
            )

        with pytest.raises(AcmeError, match="external account binding"):
            client().account()
        with pytest.raises(AcmeError):
            client(eab_kid=EAB_KID, eab_hmac_key=EAB_KEY[::-1]).account()
        url = client(eab_kid=EAB_KID, eab_hmac_key=EAB_KEY).account()
        assert url.startswith("https://")

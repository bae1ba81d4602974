"""AcmeClient's own logic, against a stand-in for certbot's ClientV2 (no network)."""

from __future__ import annotations

from typing import Any

import pytest
from acme import messages
from cryptography.hazmat.primitives.asymmetric import ec

from tlsproxy.acme.client import AcmeClient, AcmeError, account_gone


class _CA:
    """Knows some account URLs; a request signed with another is refused as the CA says."""

    def __init__(self, client: AcmeClient, refusal: tuple[str, str]) -> None:
        self.client = client
        self.refusal = refusal
        self.known: set[str] = set()
        self.registered = 0
        self.posts: list[str] = []
        self.directory = {"newAccount": "https://ca.test/new-acct", "newOrder": "https://ca.test/new-order"}

    def external_account_required(self) -> bool:
        return False

    def new_account(self, registration: Any) -> messages.RegistrationResource:
        assert self.client._net.account is None, "newAccount must be signed with the key, not a kid"
        self.registered += 1
        url = f"https://ca.test/acct/{self.registered}"
        self.known.add(url)
        regr = messages.RegistrationResource(body=messages.Registration(), uri=url)
        self.client._net.account = regr
        return regr

    def _post(self, url: str, payload: Any, **kwargs: Any) -> Any:
        kid = self.client._net.account.uri
        self.posts.append(kid)
        if kid not in self.known:
            typ, detail = self.refusal
            raise messages.Error(typ="urn:ietf:params:acme:error:" + typ, detail=detail)
        return _Response()


class _Response:
    headers: dict[str, str] = {"Location": "https://ca.test/order/1"}

    def json(self) -> dict[str, Any]:
        return {"status": "pending", "finalize": "https://ca.test/fin/1", "authorizations": []}


@pytest.mark.parametrize(
    "refusal",
    [
        ("accountDoesNotExist", 'Account "https://ca.test/acct/old" not found'),
        ("unauthorized", 'Account is not valid, has status "deactivated"'),
    ],
)
def test_account_unknown_to_the_ca_is_registered_again(refusal: tuple[str, str]) -> None:
    """A stored account the CA refuses is registered again once, saved, and the order then goes through."""
    saved: list[str] = []
    client = AcmeClient(
        "https://ca.test/dir",
        ec.generate_private_key(ec.SECP256R1()),
        agree_tos=True,
        account_url="https://ca.test/acct/old",
        on_registered=saved.append,
    )
    ca = _CA(client, refusal)
    client._client = ca  # type: ignore[assignment]
    order = client.new_order(("example.com",))
    assert order.url == "https://ca.test/order/1"
    assert ca.posts == ["https://ca.test/acct/old", "https://ca.test/acct/1"]
    assert saved == ["https://ca.test/acct/1"] and ca.registered == 1


def test_other_refusals_are_not_a_new_account() -> None:
    """A refusal that is not about the account (a rate limit) is reported as is, with no registration."""
    client = AcmeClient(
        "https://ca.test/dir",
        ec.generate_private_key(ec.SECP256R1()),
        agree_tos=True,
        account_url="https://ca.test/acct/old",
    )
    ca = _CA(client, ("rateLimited", "too many orders"))
    client._client = ca  # type: ignore[assignment]
    with pytest.raises(AcmeError) as info:
        client.new_order(("example.com",))
    assert info.value.code == "rateLimited" and ca.registered == 0
    assert not account_gone(AcmeError("validating", "the authorization is invalid", "unauthorized"))

"""A blocking ACME v2 (RFC 8555) client on certbot's ``acme`` library, and the seam it fills.

:class:`CertificateAuthority` is the seam: the small set of calls issuance,
renewal, revocation and key rollover need, in plain values.  :class:`AcmeClient`
fills it against a real CA; the tests' fake CA fills it in memory, and one set
of contract tests runs against both.

Every call blocks (HTTP, polling with ``time.sleep``): the service runs them in
a thread, the ``tlsproxy`` command directly.  Beyond what the library does, this
client retries ``badNonce`` more than once (Pebble rejects a share of good
nonces on purpose), sends ``replaces`` (RFC 9773) and ``profile`` in new orders,
fetches renewal information, does the RFC 8555 key change, and turns every
failure into an :class:`AcmeError` that carries the CA's words and any
``Retry-After``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import certifi
import josepy as jose
import requests
from acme import client as acme_client
from acme import errors as acme_errors
from acme import jws as acme_jws
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.logger import Logger

from tlsproxy.acme.ari import AriError, RenewalInfo, cert_id, parse_renewal_info, parse_retry_after
from tlsproxy.compat.acme import RetryingNetwork, signed_post

USER_AGENT = "tlsproxy (acme-python)"
REVOCATION_REASONS = {
    "unspecified": 0,
    "keyCompromise": 1,
    "superseded": 4,
    "cessationOfOperation": 5,
}


log = Logger()


class AcmeError(Exception):
    """The CA (or the way to it) failed: ``what`` we did, ``detail`` it said.

    ``code`` is the ACME problem type without its URN prefix (``badNonce``,
    ``rateLimited``, ``connection`` for network failures...); ``retry_after`` is
    seconds the CA asked us to wait, if it said.
    """

    def __init__(self, what: str, detail: str, code: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"{what}: {detail}")
        self.what = what
        self.detail = detail
        self.code = code
        self.retry_after = retry_after


def account_gone(error: AcmeError) -> bool:
    """The CA no longer knows our account (deleted, or a CA that lost its data): register again."""
    if error.code == "accountDoesNotExist":
        return True
    return error.code == "unauthorized" and "account" in error.detail.lower()


@dataclass(frozen=True)
class Challenge:
    type: str
    url: str
    token: str
    status: str = "pending"


@dataclass(frozen=True)
class Authorization:
    url: str
    identifier: str
    status: str
    challenges: tuple[Challenge, ...] = ()
    error: str = ""

    def challenge(self, kind: str) -> Challenge | None:
        return next((c for c in self.challenges if c.type == kind), None)


@dataclass(frozen=True)
class Order:
    url: str
    status: str
    finalize_url: str
    authorizations: tuple[str, ...]
    certificate_url: str = ""
    error: str = ""


class CertificateAuthority(Protocol):
    """The calls the issuer makes of a CA (all blocking)."""

    directory_url: str

    def key_authorization(self, token: str) -> str: ...

    def account(self) -> str:
        """Register (or find) the account; its URL."""

    def supports_ari(self) -> bool: ...

    def new_order(self, hosts: tuple[str, ...], profile: str = "", replaces: str = "") -> Order: ...

    def authorization(self, url: str) -> Authorization: ...

    def answer(self, challenge: Challenge) -> None: ...

    def wait_authorization(self, url: str, timeout: float = 90.0) -> Authorization:
        """Poll until the authorization is no longer pending."""

    def finalize(self, order: Order, csr_der: bytes, timeout: float = 90.0) -> bytes:
        """The full-chain PEM of the finished order."""

    def renewal_info(self, cert: x509.Certificate) -> RenewalInfo | None:
        """The CA's renewal window, or None if it offers no ARI."""

    def revoke(self, cert: x509.Certificate, reason: int) -> None: ...

    def rollover(self, new_key: ec.EllipticCurvePrivateKey) -> None:
        """Change the account key (RFC 8555 section 7.3.5)."""


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


class _Body(jose.JSONDeSerializable):
    """A plain JSON request body (the library's message classes lack ``replaces``)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def to_partial_json(self) -> dict[str, Any]:
        return self.body

    @classmethod
    def from_json(cls, jobj: Any) -> _Body:
        return cls(jobj)


def _jwk(key: ec.EllipticCurvePrivateKey) -> jose.JWKEC:
    return jose.JWKEC(key=key)


def trust_bundle(extra: str) -> str:
    """A PEM file trusting the usual public roots plus ``extra`` (``[acme] ca_bundle``).

    requests' ``verify=`` takes one file that replaces the default roots, and
    ``ca_bundle`` is meant to add trust: a private CA's root must not make the
    public ones stop working.  The combined file holds certificates only.
    """
    combined = Path(certifi.where()).read_bytes() + b"\n" + Path(extra).read_bytes()
    digest = hashlib.sha256(combined).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"tlsproxy-trust-{digest}.pem"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tlsproxy-trust-")
        with os.fdopen(fd, "wb") as f:
            f.write(combined)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return str(path)


class AcmeClient:
    """:class:`CertificateAuthority` against a real ACME server.

    ``account_url`` is a registration from an earlier run (reused as is);
    ``on_registered`` is told the URL when a new account is made.  ``ca_bundle``
    is a PEM file that replaces the default trust for the CA's own HTTPS.
    """

    def __init__(
        self,
        directory_url: str,
        account_key: ec.EllipticCurvePrivateKey,
        *,
        email: str = "",
        agree_tos: bool = False,
        ca_bundle: str = "",
        eab_kid: str = "",
        eab_hmac_key: str = "",
        account_url: str | None = None,
        on_registered: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        poll_interval: float = 0.5,
        timeout: int = 30,
    ) -> None:
        self.directory_url = directory_url
        self._key = account_key
        self._email = email
        self._agree_tos = agree_tos
        self._eab = (eab_kid, eab_hmac_key)
        self._account_url = account_url
        self._on_registered = on_registered
        self._sleep = sleep
        self._poll_interval = poll_interval
        self._net = RetryingNetwork(
            key=_jwk(account_key),
            alg=jose.ES256,
            verify_ssl=trust_bundle(ca_bundle) if ca_bundle else True,  # type: ignore[arg-type]
            user_agent=USER_AGENT,
            timeout=timeout,
        )
        self._client: acme_client.ClientV2 | None = None

    # -- plumbing --------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one library call, turning its many failure types into AcmeError."""
        try:
            return fn()
        except messages.Error as e:
            code = (e.typ or "").rsplit(":", 1)[-1]
            retry = parse_retry_after(self._net.last_retry_after, _utcnow())
            seconds = (retry - _utcnow()).total_seconds() if retry else None
            raise AcmeError(what, e.detail or e.description or str(e), code, seconds) from None
        except requests.exceptions.RequestException as e:
            raise AcmeError(
                what, f"cannot reach {self.directory_url}: {e.__class__.__name__}: {e}", "connection"
            ) from None
        except acme_errors.ClientError as e:
            raise AcmeError(what, str(e), "client") from None
        except acme_errors.Error as e:
            raise AcmeError(what, f"{e.__class__.__name__}: {e}", "client") from None
        except (ValueError, KeyError, jose.DeserializationError) as e:
            raise AcmeError(what, f"unexpected answer from the CA: {e.__class__.__name__}: {e}", "malformed") from None

    @property
    def _acme(self) -> acme_client.ClientV2:
        if self._client is None:
            directory = self._call(
                "fetching the directory", lambda: acme_client.ClientV2.get_directory(self.directory_url, self._net)
            )
            self._client = acme_client.ClientV2(directory, self._net)
        return self._client

    def _post(self, what: str, url: str, body: dict[str, Any] | None, **kwargs: Any) -> requests.Response:
        payload = _Body(body) if body is not None else None
        return self._as_account(what, lambda: signed_post(self._acme, url, payload, **kwargs))

    def _as_account(self, what: str, fn: Callable[[], Any]) -> Any:
        """One call signed with the account; an account the CA no longer knows is registered again, once."""
        self.account()
        try:
            return self._call(what, fn)
        except AcmeError as e:
            if not account_gone(e):
                raise
            self._register_again(e)
        return self._call(what, fn)

    def _register_again(self, error: AcmeError) -> None:
        """Forget the account URL the CA refused and register this key anew (RFC 8555 section 7.3)."""
        log.warn(
            "the CA refuses account {account} ({detail}); registering again",
            account=self._account_url,
            detail=error.detail,
        )
        self._account_url = None
        self._net.account = None
        self.account()

    def key_authorization(self, token: str) -> str:
        thumbprint = _jwk(self._key).thumbprint()
        return f"{token}.{jose.b64encode(thumbprint).decode('ascii')}"

    # -- account ---------------------------------------------------------------

    def account(self) -> str:
        if self._account_url is not None:
            if self._net.account is None:
                self._net.account = messages.RegistrationResource(body=messages.Registration(), uri=self._account_url)
            return self._account_url
        acme = self._acme
        if not self._agree_tos:
            raise AcmeError(
                "registering an account",
                "the CA's terms of service are not agreed (acme.agree_tos)",
                "userActionRequired",
            )
        eab = None
        if self._eab[0]:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=_jwk(self._key).public_key(),
                kid=self._eab[0],
                hmac_key=self._eab[1],
                directory=acme.directory,
            )
        elif acme.external_account_required():
            raise AcmeError(
                "registering an account",
                "the CA requires external account binding (acme.eab_kid, acme.eab_hmac_key)",
                "externalAccountRequired",
            )
        registration = messages.NewRegistration.from_data(
            email=self._email or None, terms_of_service_agreed=True, external_account_binding=eab
        )

        def register() -> str:
            try:
                return str(acme.new_account(registration).uri)
            except acme_errors.ConflictError as e:  # this key already has an account: use it
                self._net.account = messages.RegistrationResource(body=messages.Registration(), uri=e.location)
                return str(e.location)

        url = self._call("registering an account", register)
        self._account_url = url
        if self._on_registered is not None:
            self._on_registered(url)
        return url

    def supports_ari(self) -> bool:
        try:
            self._acme.directory["renewalInfo"]
        except KeyError:
            return False
        return True

    def profiles(self) -> dict[str, str]:
        return dict(getattr(self._acme.directory.meta, "profiles", None) or {})

    # -- orders ------------------------------------------------------------------

    @staticmethod
    def _order(url: str, body: dict[str, Any]) -> Order:
        error = body.get("error") or {}
        return Order(
            url=url,
            status=str(body.get("status", "")),
            finalize_url=str(body.get("finalize", "")),
            authorizations=tuple(body.get("authorizations", ())),
            certificate_url=str(body.get("certificate", "") or ""),
            error=str(error.get("detail", "")) if isinstance(error, dict) else "",
        )

    def new_order(self, hosts: tuple[str, ...], profile: str = "", replaces: str = "") -> Order:
        body: dict[str, Any] = {"identifiers": [{"type": "dns", "value": h} for h in hosts]}
        if profile:
            body["profile"] = profile
        if replaces:
            body["replaces"] = replaces
        response = self._post(f"ordering a certificate for {', '.join(hosts)}", self._acme.directory["newOrder"], body)
        return self._order(response.headers.get("Location", ""), response.json())

    def authorization(self, url: str) -> Authorization:
        response = self._post("fetching an authorization", url, None)
        body = response.json()
        identifier = body.get("identifier", {}).get("value", "")
        challenges = tuple(
            Challenge(
                type=c.get("type", ""), url=c.get("url", ""), token=c.get("token", ""), status=c.get("status", "")
            )
            for c in body.get("challenges", ())
        )
        error = ""
        for c in body.get("challenges", ()):
            if isinstance(c.get("error"), dict):
                error = c["error"].get("detail", "")
        return Authorization(
            url=url, identifier=identifier, status=body.get("status", ""), challenges=challenges, error=error
        )

    def answer(self, challenge: Challenge) -> None:
        self._post(f"answering {challenge.type}", challenge.url, {})

    def wait_authorization(self, url: str, timeout: float = 90.0) -> Authorization:
        end = time.monotonic() + timeout
        while True:
            authz = self.authorization(url)
            if authz.status not in ("pending", "processing"):
                return authz
            if time.monotonic() > end:
                raise AcmeError(
                    "validating " + authz.identifier, f"still {authz.status} after {timeout:.0f}s", "timeout"
                )
            self._sleep(self._poll_interval)

    def finalize(self, order: Order, csr_der: bytes, timeout: float = 90.0) -> bytes:
        response = self._post("finalizing the order", order.finalize_url, {"csr": _b64(csr_der)})
        body = response.json()
        end = time.monotonic() + timeout
        while body.get("status") in ("pending", "ready", "processing"):
            if time.monotonic() > end:
                raise AcmeError("finalizing the order", f"still {body.get('status')} after {timeout:.0f}s", "timeout")
            self._sleep(self._poll_interval)
            body = self._post("polling the order", order.url, None).json()
        current = self._order(order.url, body)
        if current.status != "valid" or not current.certificate_url:
            raise AcmeError("finalizing the order", current.error or f"order is {current.status}", "orderNotValid")
        chain = self._post(
            "downloading the certificate",
            current.certificate_url,
            None,
            headers={"Accept": "application/pem-certificate-chain", "Content-Type": "application/jose+json"},
        )
        return chain.content

    # -- renewal information, revocation, key change -----------------------------

    def renewal_info(self, cert: x509.Certificate) -> RenewalInfo | None:
        if not self.supports_ari():
            return None
        try:
            ident = cert_id(cert)
        except AriError:
            return None
        url = self._acme.directory["renewalInfo"].rstrip("/") + "/" + ident
        response = self._call("fetching renewal information", lambda: self._net.get(url))
        try:
            return parse_renewal_info(response.json(), response.headers.get("Retry-After"), _utcnow())
        except (AriError, ValueError) as e:
            raise AcmeError("fetching renewal information", str(e), "malformed") from None

    def revoke(self, cert: x509.Certificate, reason: int) -> None:
        self._as_account("revoking the certificate", lambda: self._acme.revoke(cert, reason))

    def rollover(self, new_key: ec.EllipticCurvePrivateKey) -> None:
        account_url = self.account()
        url = self._acme.directory["keyChange"]
        old_public = _jwk(self._key).public_key().to_partial_json()
        payload = json.dumps({"account": account_url, "oldKey": old_public}).encode()
        inner = acme_jws.JWS.sign(payload, key=_jwk(new_key), alg=jose.ES256, nonce=None, url=url)
        self._call("changing the account key", lambda: signed_post(self._acme, url, inner))
        self._key = new_key
        self._net.key = _jwk(new_key)


def account_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

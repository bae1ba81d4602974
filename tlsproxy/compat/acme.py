"""acme's private parts: the network client's request hook and the signed POST.

Tested with acme 3.0 to 5.9.  The library keeps no Retry-After of a
response, retries a badNonce only once, and signs only its own message
classes in public calls; a POST of our own body (an order with ``replaces``,
ARI) goes through ``_post``.
"""

from __future__ import annotations

from typing import Any

import requests
from acme import client as acme_client
from acme import messages


class RetryingNetwork(acme_client.ClientNetwork):
    """ClientNetwork that retries badNonce a few times and remembers the last Retry-After.

    The library retries a badNonce once; a CA under load (and Pebble, which
    rejects 5% of nonces on purpose) can refuse several in a row.
    """

    nonce_retries = 5

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_retry_after: str | None = None

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        self.last_retry_after = response.headers.get("Retry-After")
        return response

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for _ in range(self.nonce_retries):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce":
                    raise
        return self._post_once(*args, **kwargs)


def signed_post(client: acme_client.ClientV2, url: str, payload: Any, **kwargs: Any) -> requests.Response:
    """POST ``payload`` (a JSONDeSerializable, a JWS, or None for POST-as-GET) signed with the account key."""
    response: requests.Response = client._post(url, payload, **kwargs)
    return response

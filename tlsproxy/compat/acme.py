"""acme's private parts: the network client's request hook and the signed POST.

Tested with acme 3.0 to 5.9.  The library keeps no Retry-After of a
response, and signs only its own message classes in public calls; a POST of
our own body (an order with ``replaces``, ARI) goes through ``_post``.
"""

from __future__ import annotations

from typing import Any

import requests
from acme import client as acme_client


class RecordingNetwork(acme_client.ClientNetwork):
    """ClientNetwork that remembers the last response's Retry-After."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_retry_after: str | None = None

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        self.last_retry_after = response.headers.get("Retry-After")
        return response


def signed_post(client: acme_client.ClientV2, url: str, payload: Any, **kwargs: Any) -> requests.Response:
    """POST ``payload`` (a JSONDeSerializable, a JWS, or None for POST-as-GET) signed with the account key."""
    response: requests.Response = client._post(url, payload, **kwargs)
    return response

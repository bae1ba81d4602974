"""ACME Renewal Information (RFC 9773): certificate identifiers and window parsing (pure)."""

from __future__ import annotations

import base64
import datetime
import email.utils
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from tlsproxy.acme.scheduler import Window


class AriError(ValueError):
    """A renewalInfo answer that does not say what RFC 9773 says it must."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def cert_id(cert: x509.Certificate) -> str:
    """The RFC 9773 section 4.1 identifier: base64url(AKI keyIdentifier) "." base64url(serial DER)."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise AriError("the certificate has no Authority Key Identifier") from None
    if aki.key_identifier is None:
        raise AriError("the Authority Key Identifier has no keyIdentifier")
    serial = cert.serial_number
    serial_bytes = serial.to_bytes((serial.bit_length() + 8) // 8, "big", signed=True)
    return f"{_b64(aki.key_identifier)}.{_b64(serial_bytes)}"


@dataclass(frozen=True)
class RenewalInfo:
    """One renewalInfo answer: the window and when to ask again."""

    window: Window
    retry_after: datetime.datetime
    explanation_url: str = ""


def parse_retry_after(value: str | None, now: datetime.datetime) -> datetime.datetime | None:
    """An HTTP Retry-After header (seconds or HTTP date) as a time."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return now + datetime.timedelta(seconds=int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when


DEFAULT_RETRY = datetime.timedelta(hours=6)
MIN_RETRY = datetime.timedelta(minutes=1)
MAX_RETRY = datetime.timedelta(days=1)


def parse_renewal_info(body: Any, retry_after_header: str | None, now: datetime.datetime) -> RenewalInfo:
    """Check a renewalInfo JSON body; clamp Retry-After to [1 minute, 1 day] (default 6 hours)."""
    if not isinstance(body, dict) or not isinstance(body.get("suggestedWindow"), dict):
        raise AriError("no suggestedWindow object")
    raw = body["suggestedWindow"]
    try:
        start = datetime.datetime.fromisoformat(str(raw["start"]).replace("Z", "+00:00"))
        end = datetime.datetime.fromisoformat(str(raw["end"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        raise AriError("suggestedWindow needs RFC 3339 start and end") from None
    if start.tzinfo is None or end.tzinfo is None:
        raise AriError("suggestedWindow times need a time zone")
    if end < start:
        raise AriError("suggestedWindow ends before it starts")
    retry = parse_retry_after(retry_after_header, now)
    if retry is None:
        retry = now + DEFAULT_RETRY
    retry = min(max(retry, now + MIN_RETRY), now + MAX_RETRY)
    explanation = body.get("explanationURL", "")
    return RenewalInfo(Window(start, end), retry, explanation if isinstance(explanation, str) else "")

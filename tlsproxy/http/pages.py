"""The short pages tlsproxy answers with itself: errors and redirects.

Never a traceback, never the app's internals: a status line, a sentence, and
``Connection: close`` where the protocol decided to close.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tlsproxy.http.exchange import Exchange

REASONS: dict[int, bytes] = {
    101: b"Switching Protocols",
    200: b"OK",
    204: b"No Content",
    301: b"Moved Permanently",
    304: b"Not Modified",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    421: b"Misdirected Request",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
    507: b"Insufficient Storage",
}

MESSAGES: dict[int, str] = {
    400: "The request could not be understood.",
    401: "This page needs a user name and password.",
    403: "Access to this page is not allowed from your address.",
    404: "There is no site here for this host name.",
    405: "This method is not supported here.",
    408: "The request took too long to arrive.",
    413: "The request body is larger than this site accepts.",
    414: "The request line is too long.",
    421: "This connection is not for this host name.",
    431: "The request headers are too large.",
    500: "Something went wrong in the proxy.",
    501: "This request uses a feature the proxy does not support.",
    502: "The application behind this proxy could not be reached.",
    503: "The site is not ready yet.",
    504: "The application behind this proxy took too long to answer.",
    505: "Only HTTP/1.0, HTTP/1.1 and HTTP/2 are spoken here.",
    507: "The proxy has no room to hold this request body right now. Please try again later.",
}


def render(status: int, message: str | None = None, request_id: str = "") -> bytes:
    reason = REASONS.get(status, b"Error").decode()
    text = escape(message if message is not None else MESSAGES.get(status, reason))
    # The id of the request in the access log, for a user to quote.
    quoted = f"\n<p>Request ID: <code>{escape(request_id)}</code></p>" if request_id else ""
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{status} {reason}</title></head>\n'
        f"<body><h1>{status} {reason}</h1>\n<p>{text}</p>{quoted}</body></html>\n"
    ).encode()


def send(
    exchange: Exchange, status: int, message: str | None = None, headers: list[tuple[bytes, bytes]] | None = None
) -> int:
    """Answer ``exchange`` with a short page and finish it; the body's size (for the access log)."""
    request_id = getattr(exchange, "request_id", "")
    body = render(status, message, request_id)
    fields = [(b"Content-Type", b"text/html; charset=utf-8"), (b"Cache-Control", b"no-store"), *(headers or [])]
    if request_id:
        fields.append((b"X-Request-ID", request_id.encode("ascii", "replace")))
    exchange.start_response(status, REASONS.get(status, b"Error"), fields, len(body))
    exchange.write(body)
    exchange.finish()
    return len(body)

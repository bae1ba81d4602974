"""The slow-client case's app, for gunicorn with one sync worker: /big?size=N and /small."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from urllib.parse import parse_qs

BLOCK = b"z" * 65536


def app(environ: dict, start_response: Callable) -> Iterator[bytes]:
    if environ["PATH_INFO"] == "/big":
        size = int(parse_qs(environ.get("QUERY_STRING", "")).get("size", ["10485760"])[0])
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))])
        return _blocks(size)
    body = b"x" * 100
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return iter([body])


def _blocks(size: int) -> Iterator[bytes]:
    while size > 0:
        block = BLOCK[: min(size, len(BLOCK))]
        size -= len(block)
        yield block

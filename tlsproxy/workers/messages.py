"""What the supervisor and its workers say to each other: one JSON object a line.

Challenge answers are confirmed, not waited for: the issuing worker sends
``challenges`` with its own ``id``; the supervisor gives each other live
worker ``challenges`` with a round ``id``; each reads the store and answers
``loaded`` (``id``, ``ok``); the issuer gets ``confirmed`` (its ``id``, the
``missing`` workers) once all did, or died, or the timeout passed.

Nothing secret ever goes through here: ticket keys stay inside each worker's
OpenSSL (see :mod:`tlsproxy.tls.handoff`); only their public names travel.
"""

from __future__ import annotations

import json
from typing import Any

# A line longer than this is a broken peer, not a message (metrics texts are far below).
MAX_LINE = 16 * 1024 * 1024


class MessageError(Exception):
    """The other side sent something that is not a message."""


def encode(kind: str, **fields: Any) -> bytes:
    return json.dumps({"type": kind, **fields}, separators=(",", ":")).encode() + b"\n"


class LineReader:
    """Bytes in, whole messages out."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_LINE:
            self._buffer = b""
            raise MessageError("a line longer than the limit")
        messages = []
        for line in lines:
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError as e:
                raise MessageError(f"not JSON: {e}") from None
            if not isinstance(message, dict) or not isinstance(message.get("type"), str):
                raise MessageError("not an object with a type")
            messages.append(message)
        return messages

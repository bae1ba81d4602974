"""Accept-Encoding (RFC 9110 12.5.3): which content codings a client takes, and how much it likes each.

One reading for every place that codes an answer (the app's answers
compressed on the way, precompressed static files), so that two of them never
disagree about what one client asked for.

- A coding the client names counts with its own q; any other takes ``*``'s;
  without ``*`` it is not accepted.  ``identity`` is accepted unless refused
  (``identity;q=0``, or ``*;q=0`` without an ``identity`` entry).
- Names are case-insensitive; ``x-gzip`` is ``gzip`` (RFC 9110 8.4.1.3).
- A coding named twice (in one line or in two) takes the lower q: a refusal
  anywhere holds.
- A q that is not a qvalue (``q=abc``, ``q=2``, ``q=-1``, ``q=1e0``) refuses the
  coding it is on: identity is always a safe answer, a coding the client may
  not read is not.
- No Accept-Encoding at all is read like an empty one (identity only): the RFC
  would allow any coding, but the clients that send none are the ones least
  likely to decode one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# RFC 9110 12.4.2's qvalue, with any number of decimals (a client's extra zeros harm no one).
_QVALUE = re.compile(r"(?:0(?:\.[0-9]*)?|1(?:\.0*)?)\Z")
_ALIASES = {"x-gzip": "gzip", "x-compress": "compress"}


@dataclass(frozen=True)
class AcceptEncoding:
    """What one Accept-Encoding said: the q of each coding it named, and of ``*`` (None: not named)."""

    listed: Mapping[str, float]
    star: float | None = None

    def weight(self, coding: str) -> float:
        """How much the client likes ``coding`` (0: not accepted); ``coding`` in lower case."""
        q = self.listed.get(coding)
        if q is not None:
            return q
        if self.star is not None:
            return self.star
        return 1.0 if coding == "identity" else 0.0

    def ranked(self, offered: Sequence[str]) -> list[str]:
        """The codings of ``offered`` the client accepts, most liked first; ties keep ``offered``'s order."""
        weighted = [(-self.weight(coding), order, coding) for order, coding in enumerate(offered)]
        return [coding for q, _, coding in sorted(weighted) if q < 0]

    def preferred(self, offered: Sequence[str]) -> str | None:
        """The best of ``offered`` for this client, or None when it accepts none of them."""
        best: tuple[float, str] | None = None
        for coding in offered:
            q = self.weight(coding)
            if q > 0 and (best is None or q > best[0]):
                best = (q, coding)
        return None if best is None else best[1]


def qvalue(text: str) -> float | None:
    """A q parameter's value, or None when it is not a qvalue."""
    text = text.strip()
    return float(text) if _QVALUE.match(text) else None


def parse_accept_encoding(value: bytes | None) -> AcceptEncoding:
    """Read an Accept-Encoding field value (lines already joined with commas); never raises."""
    weights: dict[str, float] = {}
    if value:
        for item in value.decode("latin-1").split(","):
            name, _, params = item.partition(";")
            name = name.strip().lower()
            if not name:
                continue
            q = 1.0
            for param in params.split(";"):
                key, _, text = param.partition("=")
                if key.strip().lower() == "q":
                    parsed = qvalue(text)
                    q = 0.0 if parsed is None else parsed
            name = _ALIASES.get(name, name)
            weights[name] = min(q, weights.get(name, q))
    star = weights.pop("*", None)
    return AcceptEncoding(weights, star)


def accept_encoding_of(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The request's Accept-Encoding lines as one value (RFC 9110 5.3), or None when it sent none."""
    values = []
    for name, value in headers:  # a plain loop: every request to a coding site passes here
        if name == b"accept-encoding":
            values.append(value)
    if not values:
        return None
    return values[0] if len(values) == 1 else b", ".join(values)

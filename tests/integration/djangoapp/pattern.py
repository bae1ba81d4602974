"""Deterministic bytes for downloads, shared by the app and the tests (no Django import here)."""

import hashlib
from collections.abc import Iterator

BLOCK = 64 * 1024


def blocks(size: int) -> Iterator[bytes]:
    """``size`` bytes in 64 KiB blocks; block k differs from block j, so a lost or reordered block shows."""
    k = 0
    while size > 0:
        block = (hashlib.sha256(b"%d" % k).digest() * (BLOCK // 32))[:size]
        size -= len(block)
        k += 1
        yield block


def digest(size: int) -> str:
    h = hashlib.sha256()
    for block in blocks(size):
        h.update(block)
    return h.hexdigest()

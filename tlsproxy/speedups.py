"""The C accelerator for the per-request pure functions, when it is there.

``tlsproxy._speedups`` is built from ``tlsproxy/_speedups.c`` by
``pip install``; it holds C versions of the request-head parser, the
response-head parser, the two header-policy functions that turn heads
into bytes for the other side, and an HPACK decoder for HTTP/2 requests
(whose pure Python version is the hpack library's).  Each gives the same result as its pure
Python version for every input (tests/unit/test_speedups.py compares them),
so the Python code is the specification and the fallback: without a C
compiler, or with ``TLSPROXY_PURE_PYTHON=1`` (or ``true``, ``yes``) in the environment, the pure
versions run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import ModuleType

from twisted.logger import Logger

log = Logger()
ON = ("1", "true", "yes")
OFF = ("0", "false", "no", "")


def pure_python(environ: Mapping[str, str]) -> bool:
    """Whether ``TLSPROXY_PURE_PYTHON`` asks for the pure versions; a value we cannot read does not.

    ``=0`` once turned the accelerator off as well as ``=1`` did; an unknown
    value is said (logged once the log starts) and leaves the default, on.
    """
    value = environ.get("TLSPROXY_PURE_PYTHON", "").strip().lower()
    if value in ON:
        return True
    if value not in OFF:
        log.warn(
            "TLSPROXY_PURE_PYTHON={value!r} is none of 1/true/yes (pure Python) or 0/false/no: "
            "the C accelerator stays on",
            value=environ["TLSPROXY_PURE_PYTHON"],
        )
    return False


def load(environ: Mapping[str, str]) -> ModuleType | None:
    """The C accelerator, unless it is not built or the environment turns it off."""
    if pure_python(environ):
        return None
    try:
        from tlsproxy import _speedups
    except ImportError:  # not built: the pure Python versions serve
        return None
    return _speedups


speedups: ModuleType | None = load(os.environ)

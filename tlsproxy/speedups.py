"""The C accelerator for the per-request pure functions, when it is there.

``tlsproxy._speedups`` is built from ``tlsproxy/_speedups.c`` by
``pip install``; it holds C versions of the request-head parser, the
response-head parser, the two header-policy functions that turn heads
into bytes for the other side, and an HPACK decoder for HTTP/2 requests
(whose pure Python version is the hpack library's).  Each gives the same result as its pure
Python version for every input (tests/unit/test_speedups.py compares them),
so the Python code is the specification and the fallback: without a C
compiler, or with ``TLSPROXY_PURE_PYTHON=1`` in the environment, the pure
versions run.
"""

from __future__ import annotations

import os
from types import ModuleType

speedups: ModuleType | None = None
if not os.environ.get("TLSPROXY_PURE_PYTHON"):
    try:
        from tlsproxy import _speedups
    except ImportError:  # not built: the pure Python versions serve
        pass
    else:
        speedups = _speedups

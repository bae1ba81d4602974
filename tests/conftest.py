"""Settings shared by every test."""

import os

from hypothesis import settings

# No per-example deadline: on a loaded CI machine one slow example (a GC pause, a busy
# neighbour) is not a failure. The properties and example counts stay as they are.
settings.register_profile("tlsproxy", deadline=None)
settings.load_profile("tlsproxy")

# Every state move of the proxy is checked against its table (tlsproxy/proxy/lifecycle.py), here
# and in the proxies the integration tests start: an illegal one raises there and then.
os.environ["TLSPROXY_CHECK_STATES"] = "1"

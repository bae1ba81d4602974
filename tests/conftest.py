"""Settings shared by every test."""

from hypothesis import settings

# No per-example deadline: on a loaded CI machine one slow example (a GC pause, a busy
# neighbour) is not a failure. The properties and example counts stay as they are.
settings.register_profile("tlsproxy", deadline=None)
settings.load_profile("tlsproxy")

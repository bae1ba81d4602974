"""tlsproxy: a TLS-terminating reverse proxy for Python web apps, on Twisted."""

__version__ = "0.1.0"

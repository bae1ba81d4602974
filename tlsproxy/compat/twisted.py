"""Twisted's private parts: endpoint-string parsing, the epoll reactor's loop, a transport's buffers.

Tested with Twisted 24.3 to 26.10.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import endpoints
from twisted.logger import ILogObserver, Logger

# The accept-time events a TCP port logs through its _logger (twisted.internet.tcp._accept).
EMFILE_REFUSED = "EMFILE recovery: Closed socket from {address}"
EMFILE_NOISE = (
    "EMFILE encountered; releasing reserved file descriptor.",
    "Re-reserving EMFILE recovery file descriptor.",
)
CANNOT_ACCEPT = "Could not accept new connection ({acceptError})"


def parse_server_endpoint(description: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """Split a server endpoint string as ``serverFromString`` would, without building anything.

    Returns (kind, args, kwargs); raises what Twisted raises for a bad string
    (its types vary: callers catch Exception).
    """
    kind, args, kwargs = endpoints._parseServer(description, None)
    return kind, tuple(args), dict(kwargs)


def reactor_poll_state(reactor: Any) -> tuple[Any, dict[int, Any], Any, Any]:
    """An epoll reactor's poller, its fd -> selectable map, and its dispatch and disconnect methods."""
    return reactor._poller, reactor._selectables, reactor._doReadOrWrite, reactor._disconnectSelectable


def nothing_buffered(transport: Any) -> bool:
    """True when a FileDescriptor transport holds no bytes waiting to be written."""
    return not transport.dataBuffer and not getattr(transport, "_tempDataBuffer", True)


def break_connector_cycle(transport: Any) -> None:
    """Drop the Connector -> transport reference of a client connection (it refers back)."""
    connector = getattr(transport, "connector", None)
    if connector is not None:
        connector.transport = None


def observe_port_log(port: Any, observer: ILogObserver) -> bool:
    """Send the log events a listening port writes while accepting to ``observer``.

    Twisted's TCP and UNIX ports log through a private ``_logger``; False (and
    nothing changed) for a port without one.
    """
    logger = getattr(port, "_logger", None)
    if not isinstance(logger, Logger):
        return False
    port._logger = Logger(namespace=logger.namespace, observer=observer)
    return True


def close_without_shutdown(transport: Any) -> None:
    """Close a TCP transport's descriptor with no ``shutdown(2)``: the socket lives on in another process.

    Twisted's TCP connections call ``shutdown`` before ``close`` unless their
    private ``_shouldShutdown`` says not to; a shutdown would end the TCP
    connection for the process the socket was passed to as well.
    """
    transport._shouldShutdown = False
    transport.loseConnection()

"""``twist tlsproxy``'s entry: one process, or a supervisor and ``[server] workers`` worker processes.

The supervisor (:mod:`.supervisor`) binds the listeners, or adopts systemd's,
and never accepts on them; each worker (:mod:`.worker`) is a ``twist
tlsproxy --worker INDEX`` that gets the listening sockets as inherited
descriptors and accepts on them, the kernel spreading the connections.  They
talk over a pair of pipes, one JSON object a line (:mod:`.messages`).  With
``workers = 1`` (the default) and for the dev proxy this is
:func:`tlsproxy.tap.makeService` unchanged.
"""

from __future__ import annotations

from typing import Any

from tlsproxy import tap
from tlsproxy.config import Config
from tlsproxy.tap import Options

__all__ = ["Options", "makeService"]


def build(reactor: Any, config: Config, options: Options, output: Any) -> Any:
    """The service of this process: a worker's, a supervisor's, or the single process's."""
    if options["worker"] is not None:
        from tlsproxy.workers.worker import build_worker

        return build_worker(reactor, config, options["config"], options["worker"], output)
    if config.server.workers > 1 and not config.dev:
        from tlsproxy.workers.supervisor import build_supervisor

        return build_supervisor(reactor, config, options["config"], output)
    return tap.prepare_service(reactor, config, options["config"])


def makeService(options: Options) -> Any:
    return tap.makeService(options, build)

"""``[server] workers = N``: a supervising process and N worker processes.

The supervisor (:mod:`.supervisor`) binds the listeners, or adopts systemd's,
and never accepts on them; each worker (:mod:`.worker`) is a ``twist
tlsproxy --worker INDEX`` that gets the listening sockets as inherited
descriptors and accepts on them, the kernel spreading the connections.  They
talk over a pair of pipes, one JSON object a line (:mod:`.messages`).
"""

from __future__ import annotations

from typing import Any

from tlsproxy.config import Config


def process_service(reactor: Any, config: Config, config_path: str | None, worker: str | None, output: Any) -> Any:
    """The service of a supervisor (``worker`` None) or of the worker with that index."""
    if worker is None:
        from tlsproxy.workers.supervisor import build_supervisor

        return build_supervisor(reactor, config, config_path, output)
    from tlsproxy.workers.worker import build_worker

    return build_worker(reactor, config, config_path, worker, output)

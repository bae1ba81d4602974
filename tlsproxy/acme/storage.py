"""Which store a configuration means: the state directory, or the fleet's Redis (``[store] url``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.threads import deferToThreadPool

from tlsproxy.certs.store import CertificateStore, Store
from tlsproxy.certs.ticketkeys import TicketKeys
from tlsproxy.config import Config, ConfigError, Problem, read_fernet_key
from tlsproxy.tls.sharedtickets import SharedTicketKeys


def open_store(config: Config) -> Store:
    """The configured store; opening it reads no more than the key file (a Redis client connects on first use).

    Raises ConfigError when the key file went missing since the configuration
    was loaded: a start or a reload then refuses it in one line.
    """
    settings = config.store
    if not settings.url:
        return CertificateStore(config.server.state_dir)
    from tlsproxy.certs.redis_store import RedisStore  # redis-py only where a fleet uses it

    key = read_fernet_key(settings.encryption_key_file) if settings.encryption_key_file else None
    if isinstance(key, str):  # checked when the configuration loaded; gone since
        raise ConfigError([Problem(config.source, "store.encryption_key_file", key)])
    return RedisStore(
        settings.url,
        config.server.state_dir,
        prefix=settings.prefix,
        lease=settings.lock_lease,
        encryption_key=key,
    )


def ticket_key_service(
    reactor: Any, config: Config, install: Callable[[TicketKeys], None], store: Store | None = None
) -> SharedTicketKeys | None:
    """Ticket keys shared through the configured store, for a fleet; None without ``[store] url``.

    The wiring for tap.py, once the ticket-key code can take keys from outside
    (``install``: current key for new tickets, previous one still accepted)::

        service = ticket_key_service(reactor, config, sni.install_ticket_keys)
        if service is not None:
            service.setServiceParent(certificates)  # instead of TicketKeyRotation
    """
    if not config.store.shared:
        return None
    return SharedTicketKeys(
        reactor,
        store if store is not None else open_store(config),
        config.tls.ticket_key_rotation,
        install,
        lambda f, *a, **kw: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a, **kw),
    )

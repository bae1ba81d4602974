"""Which store a configuration means: the state directory, or the fleet's Redis (``[store] url``)."""

from __future__ import annotations

from tlsproxy.certs.store import CertificateStore, Store, StoreError
from tlsproxy.config import Config, read_fernet_key


def open_store(config: Config) -> Store:
    """The configured store; opening it does no I/O (a Redis client connects on first use)."""
    settings = config.store
    if not settings.url:
        return CertificateStore(config.server.state_dir)
    from tlsproxy.certs.redis_store import RedisStore  # redis-py only where a fleet uses it

    key = read_fernet_key(settings.encryption_key_file) if settings.encryption_key_file else None
    if isinstance(key, str):  # checked when the configuration loaded; gone since
        raise StoreError(settings.encryption_key_file, key, "reading [store] encryption_key_file")
    return RedisStore(
        settings.url,
        config.server.state_dir,
        prefix=settings.prefix,
        lease=settings.lock_lease,
        encryption_key=key,
    )

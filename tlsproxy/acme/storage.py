"""Which store a configuration means: the state directory, or the fleet's Redis (``[store] url``)."""

from __future__ import annotations

from tlsproxy.certs.store import CertificateStore, Store
from tlsproxy.config import Config, ConfigError, Problem, read_fernet_key


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

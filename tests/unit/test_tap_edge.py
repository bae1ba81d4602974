"""The service's wiring of issue 16's parts: haproxy: listeners, the access log file, the maintenance watcher."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import trustme
from twisted.internet.testing import MemoryReactorClock

from tlsproxy import config as configuration
from tlsproxy.proxyprotocol import ProxyHeaderFactory
from tlsproxy.tap import ProxyService


class Config:
    def __init__(self, tmp_path: Path) -> None:
        leaf = trustme.CA().issue_cert("a.test")
        leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
        leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
        self.tmp = tmp_path
        self.path = tmp_path / "config.toml"

    def write(self, server: str = "", site: str = "") -> str:
        self.path.write_text(
            f'[server]\nhttps = ["haproxy:tcp:0:interface=127.0.0.1"]\nhttp = []\nstate_dir = "{self.tmp}"\n'
            f"{server}\n"
            f'[[site]]\nhosts = ["a.test"]\nupstream = "http://127.0.0.1:1"\ntls = "files"\n'
            f'cert = "{self.tmp / "cert.pem"}"\nkey = "{self.tmp / "key.pem"}"\n{site}\n'
        )
        return str(self.path)


def test_haproxy_listener_is_wrapped_and_follows_reloads(tmp_path: Path) -> None:
    """haproxy:tcp: listens through our PROXY header reader, whose trusted ranges follow SIGHUP."""
    cfg = Config(tmp_path)
    path = cfg.write('trusted_proxies = ["10.0.0.0/8"]')
    service = ProxyService(MemoryReactorClock(), configuration.load(path, environ={}), path)
    (listener,) = service.listeners.values()
    assert isinstance(listener.factory, ProxyHeaderFactory) and listener.factory.wrapped is service.https_factory
    cfg.write('trusted_proxies = ["192.0.2.0/24"]')
    service.reload()
    assert listener.factory.trusted == (ipaddress.ip_network("192.0.2.0/24"),)


def test_access_log_file_kept_across_reloads_and_reopened(tmp_path: Path) -> None:
    """One file object per path across reloads; SIGUSR1 asks it to reopen; a new path closes the old one."""
    cfg = Config(tmp_path)
    path = cfg.write(f'trusted_proxies = ["10.0.0.0/8"]\naccess_log_file = "{tmp_path / "a.log"}"')
    service = ProxyService(MemoryReactorClock(), configuration.load(path, environ={}), path)
    first = service.access_file
    assert first is not None and service.generation.handler.access_log.file is first
    service.reload()
    assert service.access_file is first
    reopened: list[bool] = []
    first.reopen = lambda: reopened.append(True)  # type: ignore[method-assign]
    service.reopen_logs()
    assert reopened == [True]
    cfg.write(f'trusted_proxies = ["10.0.0.0/8"]\naccess_log_file = "{tmp_path / "b.log"}"')
    service.reload()
    assert service.access_file is not first and first.closed
    assert service.generation.handler.access_log.file is service.access_file


def test_maintenance_watcher_runs_with_the_generation(tmp_path: Path) -> None:
    """A site with maintenance_file gets a watcher that lives and dies with its configuration."""
    cfg = Config(tmp_path)
    path = cfg.write('trusted_proxies = ["10.0.0.0/8"]', f'maintenance_file = "{tmp_path / "m.on"}"')
    service = ProxyService(MemoryReactorClock(), configuration.load(path, environ={}), path)
    names = [type(s).__name__ for s in service.generation.certificates]
    assert "TimerService" in names

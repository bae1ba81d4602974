"""SIGHUP with other upstreams: the old health checks stop, the new ones start, open connections move on."""

from __future__ import annotations

from pathlib import Path

import trustme
from twisted.internet.testing import MemoryReactorClock

from tlsproxy import config as configuration
from tlsproxy.tap import ProxyService


def test_reload_replaces_the_health_checks_and_hands_requests_on(tmp_path: Path) -> None:
    """After a reload only the new configuration's upstreams are checked, and the old handler forwards to the new."""
    leaf = trustme.CA().issue_cert("a.test")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    path = tmp_path / "config.toml"

    def write(ports: list[int]) -> None:
        upstreams = ", ".join(f'"http://127.0.0.1:{port}"' for port in ports)
        path.write_text(
            f'[server]\nhttps = ["tcp:0:interface=127.0.0.1"]\nhttp = []\nstate_dir = "{tmp_path}"\n'
            f'[[site]]\nhosts = ["a.test"]\nupstream = [{upstreams}]\ntls = "files"\n'
            f'cert = "{tmp_path / "cert.pem"}"\nkey = "{tmp_path / "key.pem"}"\n'
            'health_path = "/health"\nhealth_interval = 5\n'
        )

    reactor = MemoryReactorClock()
    write([8001, 8002])
    service = ProxyService(reactor, configuration.load(str(path), environ={}), str(path))
    service.startService()
    assert sorted(port for _, port, *_ in reactor.tcpClients) == [8001, 8002]
    old = service.generation.handler
    write([8002])
    service.reload()
    assert old.successor is service.generation.handler
    del reactor.tcpClients[:]
    reactor.advance(5)
    reactor.advance(5)
    dialled = [port for _, port, *_ in reactor.tcpClients]
    assert dialled and set(dialled) == {8002}, dialled

"""CertificateService and the commands against the real Pebble: issue, serve, restart, renew, revoke, share."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twisted.internet.threads import blockingCallFromThread
from twisted.logger import globalLogPublisher

from tests.integration.pebble import (  # noqa: F401 (pebble, pebble_factory are fixtures)
    ChallengeListeners,
    Pebble,
    pebble,
    pebble_factory,
    reactor_in_thread,
    requires_pebble,
    served_certificate,
)
from tests.unit.test_acme_contract import fresh_names
from tlsproxy.acme import commands
from tlsproxy.acme.issuer import TableResponder
from tlsproxy.acme.service import CertificateService
from tlsproxy.certs.store import CertificateStore
from tlsproxy.config import load

pytestmark = requires_pebble
ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp: Path, p: Pebble, hosts: tuple[str, ...], challenges: str = '["http-01", "tls-alpn-01"]') -> Path:
    path = tmp / "tlsproxy.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [server]
            state_dir = "{tmp / "state"}"
            [acme]
            directory = "{p.directory_url}"
            ca_bundle = "{p.ca_bundle}"
            agree_tos = true
            email = "ops@example.test"
            challenges = {challenges}
            [[site]]
            hosts = {list(hosts)!r}
            upstream = "http://127.0.0.1:8000"
            """
        ).replace("'", '"')
    )
    return path


def wait_until(predicate, deadline: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


@contextmanager
def logged() -> Iterator[list[dict[str, Any]]]:
    """The log events of every thread (the service's reactor runs in its own) while the block runs."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def is_not_due(event: dict[str, Any]) -> bool:
    return str(event.get("log_format", "")).startswith("certificate of {site} not due for renewal")


def start_service(listeners: ChallengeListeners, config) -> CertificateService:  # type: ignore[no-untyped-def]
    reactor = reactor_in_thread()
    svc = CertificateService(reactor, config, listeners.sni, listeners.http01, listeners.alpn01, poll_interval=0.2)
    blockingCallFromThread(reactor, svc.startService)
    return svc


def stop_service(svc: CertificateService) -> None:
    blockingCallFromThread(reactor_in_thread(), svc.stopService)


def test_service_issues_serves_and_restart_reuses(pebble: Pebble, tmp_path: Path) -> None:
    """First start issues for both names and serves a cert chaining to Pebble's root; a restart reuses it."""
    hosts = fresh_names(2)
    config = load(str(write_config(tmp_path, pebble, hosts)), environ={})
    with ChallengeListeners(pebble.http_port, pebble.tls_port, [(hosts[0], list(hosts))]) as ls:
        svc = start_service(ls, config)
        try:
            wait_until(lambda: ls.sni.sni_map.context_of(hosts[0]) is not None)
            for host in hosts:
                served = served_certificate(pebble.tls_port, host, pebble.roots_pem() + pebble.intermediates_pem())
            store = CertificateStore(config.server.state_dir)
            stored = store.load_certificate(hosts[0])
            assert served.serial_number == stored.leaf.serial_number
        finally:
            stop_service(svc)
    with ChallengeListeners(pebble.http_port, pebble.tls_port, [(hosts[0], list(hosts))]) as ls, logged() as events:
        svc = start_service(ls, config)
        try:
            wait_until(lambda: ls.sni.sni_map.context_of(hosts[0]) is not None)
            # The first check after the restart has decided: the stored certificate is not due.
            wait_until(lambda: any(e.get("site") == hosts[0] for e in list(events) if is_not_due(e)))
            assert store.load_certificate(hosts[0]).leaf.serial_number == stored.leaf.serial_number
            assert served_certificate(pebble.tls_port, hosts[0]).serial_number == stored.leaf.serial_number
        finally:
            stop_service(svc)


def test_tls_alpn01_only_through_service(pebble: Pebble, tmp_path: Path) -> None:
    """With challenges = ["tls-alpn-01"] the service still gets its certificate (validated on the TLS port)."""
    hosts = fresh_names(2)
    config = load(str(write_config(tmp_path, pebble, hosts, '["tls-alpn-01"]')), environ={})
    with ChallengeListeners(pebble.http_port, pebble.tls_port, [(hosts[0], list(hosts))]) as ls:
        svc = start_service(ls, config)
        try:
            wait_until(lambda: ls.sni.sni_map.context_of(hosts[0]) is not None)
        finally:
            stop_service(svc)


def test_short_lived_renewal_changes_served_serial(pebble_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With 8-second certificates the service renews by itself and the served serial changes."""
    p = pebble_factory(validity=8)
    hosts = fresh_names(1)
    config = load(str(write_config(tmp_path, p, hosts)), environ={})
    with ChallengeListeners(p.http_port, p.tls_port, [(hosts[0], list(hosts))]) as ls:
        svc = start_service(ls, config)
        try:
            wait_until(lambda: ls.sni.sni_map.context_of(hosts[0]) is not None)
            first = served_certificate(p.tls_port, hosts[0]).serial_number
            wait_until(lambda: served_certificate(p.tls_port, hosts[0]).serial_number != first, deadline=20)
        finally:
            stop_service(svc)


def test_ca_down_keeps_old_certificate(pebble_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """When the CA goes away, a renewal attempt fails, the old certificate keeps serving, a retry is scheduled."""
    p = pebble_factory()
    hosts = fresh_names(1)
    config = load(str(write_config(tmp_path, p, hosts)), environ={})
    store = CertificateStore(config.server.state_dir)
    with ChallengeListeners(p.http_port, p.tls_port, [(hosts[0], list(hosts))]) as ls:
        svc = start_service(ls, config)
        try:
            wait_until(lambda: ls.sni.sni_map.context_of(hosts[0]) is not None)
            serial = store.load_certificate(hosts[0]).leaf.serial_number
            p.process.stop()
            out = io.StringIO()
            assert commands.renew(config, hosts[0], True, out, responder=TableResponder(ls.http01, ls.alpn01)) == 1
            assert "cannot reach" in out.getvalue()
            meta = store.load_meta(hosts[0])
            assert meta.failures == 1 and meta.last_error and meta.next_attempt > meta.last_attempt
            assert served_certificate(p.tls_port, hosts[0]).serial_number == serial
        finally:
            stop_service(svc)


def test_revoke_command(pebble: Pebble, tmp_path: Path) -> None:
    """tlsproxy revoke shows as revoked in Pebble's management API and stores a fresh certificate."""
    hosts = fresh_names(1)
    config = load(str(write_config(tmp_path, pebble, hosts)), environ={})
    store = CertificateStore(config.server.state_dir)
    with ChallengeListeners(pebble.http_port, pebble.tls_port, [(hosts[0], list(hosts))]) as ls:
        responder = TableResponder(ls.http01, ls.alpn01)
        assert commands.renew(config, hosts[0], False, io.StringIO(), responder=responder) == 0
        old = store.load_certificate(hosts[0]).leaf.serial_number
        out = io.StringIO()
        assert commands.revoke(config, hosts[0], "keyCompromise", out, responder=responder) == 0, out.getvalue()
        assert pebble.cert_status(old)["Status"] == "Revoked"
        assert store.load_certificate(hosts[0]).leaf.serial_number != old
        out = io.StringIO()
        assert commands.account_rollover(config, out) == 0, out.getvalue()
        assert commands.renew(config, hosts[0], True, out, responder=responder) == 0, out.getvalue()


def test_account_unknown_to_the_ca_is_registered_again(pebble: Pebble, tmp_path: Path) -> None:
    """A stored account URL Pebble does not know (accountDoesNotExist) is replaced by a new registration."""
    hosts = fresh_names(1)
    config = load(str(write_config(tmp_path, pebble, hosts)), environ={})
    store = CertificateStore(config.server.state_dir)
    with ChallengeListeners(pebble.http_port, pebble.tls_port, [(hosts[0], list(hosts))]) as ls:
        responder = TableResponder(ls.http01, ls.alpn01)
        assert commands.renew(config, hosts[0], False, io.StringIO(), responder=responder) == 0
        first = store.registration(config.acme.directory_url)
        assert first
        # What a CA that deleted the account (or lost its data) gives back: an unknown account.
        gone = first.rstrip("/").rsplit("/", 1)[0] + "/999999999"
        store.save_registration(config.acme.directory_url, gone)
        out = io.StringIO()
        assert commands.renew(config, hosts[0], True, out, responder=responder) == 0, out.getvalue()
        again = store.registration(config.acme.directory_url)
        assert again not in (None, gone)


def test_two_processes_order_once(pebble: Pebble, tmp_path: Path) -> None:
    """Two `renew` processes on one state_dir at once: one orders, the other uses what it stored."""
    hosts = fresh_names(2)
    config_path = write_config(tmp_path, pebble, hosts)
    config = load(str(config_path), environ={})
    store = CertificateStore(config.server.state_dir)
    script = textwrap.dedent(
        f"""
        import sys
        from tlsproxy.config import load
        from tlsproxy.acme import commands
        from tlsproxy.acme.issuer import StoreResponder
        from tlsproxy.certs.store import CertificateStore
        config = load({str(config_path)!r}, environ={{}})
        sys.exit(commands.renew(config, {hosts[1]!r}, False, sys.stdout,
                                responder=StoreResponder(CertificateStore(config.server.state_dir), settle=0.5)))
        """
    )
    with ChallengeListeners(pebble.http_port, pebble.tls_port, [(hosts[0], list(hosts))]) as ls:
        stop = threading.Event()

        def relay() -> None:  # what a running proxy does with published answers
            while not stop.is_set():
                for token, keyauth in store.challenges("http-01").items():
                    ls.http01.put(token, keyauth)
                stop.wait(0.05)

        t = threading.Thread(target=relay, daemon=True)
        t.start()
        try:
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", script],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for _ in range(2)
            ]
            outputs = [proc.communicate(timeout=60)[0] for proc in procs]
        finally:
            stop.set()
            t.join(5)
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert sum("new certificate" in o for o in outputs) == 1, outputs
    assert sum("not due" in o for o in outputs) == 1, outputs

"""`twist tlsproxy` and `tlsproxy dev` start the same way: one path from a configuration to a tuned service."""

from __future__ import annotations

import gc
import io
import os
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import twisted.internet
import twisted.logger
from twisted.internet.epollreactor import EPollReactor
from twisted.logger import LogBeginner, LogLevel, LogPublisher

from tlsproxy import cli, tap
from tlsproxy.config import dev_config, load
from tlsproxy.eventloop import COLLECTOR_THRESHOLDS

LOCAL_SITE = (
    '[server]\nhttps = ["tcp:0:interface=127.0.0.1"]\n'
    '[[site]]\nhosts = ["localhost"]\nupstream = "http://127.0.0.1:8000"\ntls = "local"\n'
)


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No TLSPROXY_* from outside, a CA of the test's own, and the collector's thresholds put back after."""
    for name in list(os.environ):
        if name.startswith("TLSPROXY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TLSPROXY_CAROOT", str(tmp_path / "ca"))
    thresholds = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # CPython's default, whatever an earlier test left
    yield
    gc.set_threshold(*thresholds)


class IdleEPollReactor(EPollReactor):
    """A real epoll reactor, never installed, whose run() only records that it was asked to run."""

    ran = False

    def __init__(self) -> None:
        super().__init__()
        self.when_running: list[Callable[..., Any]] = []

    def callWhenRunning(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.when_running.append(callable)

    def run(self, installSignalHandlers: bool = True) -> None:
        self.ran = True

    def close(self) -> None:
        self.waker.connectionLost(None)  # type: ignore[attr-defined]
        self._poller.close()


@pytest.fixture
def reactor() -> Iterator[IdleEPollReactor]:
    made = IdleEPollReactor()
    yield made
    made.close()


def quiet_beginner() -> LogBeginner:
    """A log beginner of the test's own, so the global logging and warnings stay as they are."""
    ignore_warnings = types.SimpleNamespace(showwarning=lambda *a, **k: None)
    return LogBeginner(LogPublisher(), io.StringIO(), types.SimpleNamespace(), ignore_warnings)


def start_dev(reactor: IdleEPollReactor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """What `tlsproxy dev` runs, on ``reactor``; returns its service."""
    status = cli.run_dev(
        reactor, quiet_beginner(), dev_config(listen=("tcp:0",)), LogLevel.info, io.StringIO(), io.StringIO()
    )
    assert status == 0 and reactor.ran
    return service_of(reactor)


def service_of(reactor: IdleEPollReactor) -> tap.ProxyService:
    """The service a command asked ``reactor`` to start once running."""
    bound = [getattr(f, "__self__", None) for f in reactor.when_running]
    (service,) = [s for s in bound if isinstance(s, tap.ProxyService)]
    return service


def start_twist(reactor: IdleEPollReactor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """What `twist tlsproxy --config FILE` runs, with ``reactor`` as the global one; returns its service."""
    config = tmp_path / "tlsproxy.toml"
    config.write_text(LOCAL_SITE)
    monkeypatch.setattr(twisted.internet, "reactor", reactor, raising=False)
    options = tap.Options()
    options.parseOptions(["--config", str(config)])
    return tap.makeService(options)


@pytest.mark.parametrize("start", [start_dev, start_twist], ids=["tlsproxy dev", "twist tlsproxy"])
def test_both_commands_tune_the_process_and_the_reactor(
    start: Callable[..., Any], reactor: IdleEPollReactor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Either command leaves the collector thresholds set and the reactor on the direct dispatch."""
    assert "doIteration" not in vars(reactor)
    service = start(reactor, tmp_path, monkeypatch)
    assert isinstance(service, tap.ProxyService)
    assert service.reactor is reactor
    assert gc.get_threshold() == COLLECTOR_THRESHOLDS
    assert "doIteration" in vars(reactor)  # streamline() swapped in its own poll


def test_dev_command_runs_the_preflight_checks(
    reactor: IdleEPollReactor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configuration that cannot run here is one line on stderr and exit status 2, as with twist."""
    not_a_directory = tmp_path / "state"
    not_a_directory.write_text("")
    config = tmp_path / "acme.toml"
    config.write_text(
        f'[server]\nstate_dir = "{not_a_directory}"\nhttps = ["tcp:0"]\n[acme]\nagree_tos = true\n'
        '[[site]]\nhosts = ["example.com"]\nupstream = "http://127.0.0.1:8000"\n'
    )
    err = io.StringIO()
    status = cli.run_dev(reactor, quiet_beginner(), load(str(config)), LogLevel.info, io.StringIO(), err)
    assert status == cli.BAD_CONFIG
    assert f"{not_a_directory} is not a directory" in err.getvalue()
    assert not reactor.ran


def test_an_unusable_local_ca_is_one_line_and_status_2(
    reactor: IdleEPollReactor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA directory that cannot be made stops the dev proxy with its path and reason, not a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TLSPROXY_CAROOT", str(blocker / "ca"))
    err = io.StringIO()
    status = cli.run_dev(reactor, quiet_beginner(), dev_config(listen=("tcp:0",)), LogLevel.info, io.StringIO(), err)
    assert status == cli.BAD_CONFIG
    assert err.getvalue() == f"tlsproxy: {blocker / 'ca'}: cannot create the CA directory: Not a directory\n"
    assert not reactor.ran


def test_dev_reload_keeps_the_command_line(reactor: IdleEPollReactor, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGHUP in `tlsproxy dev --upstream URL` re-reads that command line, not the dev default's port 8000."""
    upstream = "http://127.0.0.1:9000"
    monkeypatch.setattr(twisted.internet, "reactor", reactor, raising=False)
    monkeypatch.setattr(twisted.logger, "globalLogBeginner", quiet_beginner())
    assert cli.main(["dev", "--upstream", upstream, "--listen", "tcp:0"], io.StringIO(), io.StringIO()) == 0
    service = service_of(reactor)
    service.reload()
    assert [site.upstream.url for site in service.generation.config.sites] == [upstream]

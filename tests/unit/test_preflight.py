"""Preflight: what the machine must offer a valid configuration, said in one line."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tlsproxy import preflight
from tlsproxy.config import Config, Upstream, parse

ACME_SITE = {"hosts": ["example.com"], "upstream": "http://127.0.0.1:8000"}


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    """A state_dir that is a file is refused for ACME sites, naming the key and the path."""
    state = tmp_path / "state"
    state.write_text("")
    config = parse({"server": {"state_dir": str(state)}, "acme": {"agree_tos": True}, "site": [ACME_SITE]}, "a.toml")
    (problem,) = preflight.problems(config)
    assert str(problem) == f"a.toml: server.state_dir: {state} is not a directory"


def test_state_dir_still_to_be_made_is_fine(tmp_path: Path) -> None:
    """A state_dir that does not exist yet but can be created is no problem."""
    assert preflight.state_dir_problem(str(tmp_path / "a" / "b")) is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_state_dir_not_writable(tmp_path: Path) -> None:
    """A read-only state_dir names the directory and the user."""
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs").chmod(0o500)
    try:
        why = preflight.state_dir_problem(str(tmp_path))
    finally:
        (tmp_path / "certs").chmod(0o700)
    assert why is not None and f"{tmp_path / 'certs'} is not writable by" in why


def test_local_sites_need_no_state_dir(tmp_path: Path) -> None:
    """Without ACME sites the state directory is not used, so not checked."""
    site = {**ACME_SITE, "tls": "local"}
    config = parse({"server": {"state_dir": "/proc/nope"}, "site": [site]}, "a.toml")
    assert preflight.problems(config) == []


def test_missing_and_wrong_app_sockets(tmp_path: Path) -> None:
    """A unix upstream that is missing, or not a socket, is a warning naming the site and path."""
    plain = tmp_path / "plain"
    plain.write_text("")
    sites = [
        {"hosts": ["a.test"], "upstream": f"unix:{tmp_path / 'missing.sock'}", "tls": "local"},
        {"hosts": ["b.test"], "upstream": f"unix:{plain}", "tls": "local"},
        {"hosts": ["c.test"], "upstream": "http://127.0.0.1:8000", "tls": "local"},
    ]
    found = preflight.warnings(parse({"site": sites}, "a.toml"))
    assert len(found) == 2
    assert found[0].startswith(f"a.toml: site[0].upstream: {tmp_path / 'missing.sock'} does not exist")
    assert found[1] == f"a.toml: site[1].upstream: {plain} is not a unix socket"


def test_missing_route_socket_is_named_with_file_and_prefix(tmp_path: Path) -> None:
    """A route's unix socket (daphne on /ws/) that is missing is a warning too, naming file, site and prefix."""
    sock = tmp_path / "daphne.sock"
    routes = {"/ws/": f"unix:{sock}"}
    site = {"hosts": ["a.test"], "upstream": "http://127.0.0.1:8000", "tls": "local", "routes": routes}
    (warning,) = preflight.warnings(parse({"site": [site]}, "a.toml"))
    assert warning.startswith(f'a.toml: site[0].routes."/ws/": {sock} does not exist (yet)')


def _fleet(url: str) -> Config:
    site = {**ACME_SITE, "tls": "local"}
    return parse({"store": {"url": url}, "site": [site]}, "fleet.toml")


def _raising(error: Exception) -> Callable[[], None]:
    def ping() -> None:
        raise error

    return ping


def test_store_refusing_credentials_is_a_problem_without_the_password() -> None:
    """A Redis that refuses the URL's password is a problem on store.url, the password itself not shown."""
    import redis

    config = _fleet("redis://:s3cret@127.0.0.1:6379/0")
    found, warned = preflight.store_findings(config, {}, _raising(redis.exceptions.AuthenticationError("WRONGPASS")))
    (problem,) = [str(p) for p in found]
    assert problem.startswith("fleet.toml: store.url: redis://:***@127.0.0.1:6379/0 refuses our credentials")
    assert "(WRONGPASS): fix the password" in problem
    assert "s3cret" not in problem and warned == []


def test_store_url_from_the_environment_is_blamed_on_the_variable() -> None:
    """With TLSPROXY_STORE_URL set, the refused credentials are the variable's."""
    import redis

    config = _fleet("redis://:s3cret@127.0.0.1:6379/0")
    environ = {"TLSPROXY_STORE_URL": "redis://:s3cret@127.0.0.1:6379/0"}
    found, _ = preflight.store_findings(config, environ, _raising(redis.exceptions.AuthenticationError("x")))
    assert str(found[0]).startswith("environment TLSPROXY_STORE_URL: store.url: ")


def test_store_unreachable_is_a_warning_only() -> None:
    """An unreachable Redis does not stop a fleet from starting: a warning, no problem."""
    import redis

    config = _fleet("redis://127.0.0.1:6379/0")
    found, warned = preflight.store_findings(config, {}, _raising(redis.exceptions.ConnectionError("refused")))
    assert found == []
    (warning,) = warned
    assert warning.startswith("fleet.toml: store.url: redis://127.0.0.1:6379/0 is unreachable from here (refused)")


def test_store_answering_with_an_error_is_a_problem() -> None:
    """A PING answered with an error (an ACL without rights, a database out of range) is a problem."""
    import redis

    config = _fleet("redis://127.0.0.1:6379/99")
    error = redis.exceptions.ResponseError("DB index is out of range")
    found, _ = preflight.store_findings(config, {}, _raising(error))
    assert [str(p) for p in found] == [
        "fleet.toml: store.url: redis://127.0.0.1:6379/99 answers with an error: DB index is out of range"
    ]


def test_no_store_asks_nothing() -> None:
    """Without [store] url nothing is pinged."""
    config = parse({"site": [{**ACME_SITE, "tls": "local"}]}, "one.toml")
    assert preflight.store_findings(config, {}, _raising(AssertionError("pinged"))) == ([], [])


def test_app_not_running_is_a_warning_naming_file_key_and_url(tmp_path: Path) -> None:
    """check connects to each app: a refused one is named with file, key, URL and why; a listening one is not."""
    stale = tmp_path / "stale.sock"
    stale.write_text("")  # exists: connected to; a missing one is warnings()'s to name
    site = {
        "hosts": ["a.test"],
        "tls": "local",
        "upstream": ["http://127.0.0.1:8101", "http://127.0.0.1:8102"],
        "routes": {"/ws/": f"unix:{stale}", "/gone/": f"unix:{tmp_path / 'missing.sock'}"},
    }
    tried = []

    def connect(upstream: Upstream, timeout: float) -> None:
        tried.append(upstream.url)
        if upstream.port == 8101:
            raise ConnectionRefusedError(111, "Connection refused")
        if upstream.is_unix:
            raise TimeoutError

    found = preflight.upstream_warnings(parse({"site": [site]}, "a.toml"), connect)
    assert tried == ["http://127.0.0.1:8101", "http://127.0.0.1:8102", f"unix:{stale}"]
    assert found == [
        "a.toml: site[0].upstream: http://127.0.0.1:8101 takes no connection now (Connection refused): its requests"
        " get 502 until the app listens there (the others take its requests)",
        f'a.toml: site[0].routes."/ws/": unix:{stale} takes no connection now (no answer within 1s): its requests'
        " get 502 until the app listens there",
    ]


def test_access_log_file_in_a_missing_directory_is_a_problem(tmp_path: Path) -> None:
    """An access_log_file whose directory is missing stops the start (no line would be written), naming the key."""
    path = tmp_path / "nope" / "access.log"
    site = {**ACME_SITE, "tls": "local"}
    config = parse({"server": {"access_log_file": str(path)}, "site": [site]}, "a.toml")
    (problem,) = preflight.problems(config)
    assert str(problem).startswith(f"a.toml: server.access_log_file: {tmp_path / 'nope'} does not exist: create it")


def test_access_log_file_that_is_a_directory_or_writable(tmp_path: Path) -> None:
    """A directory given as the log file is named so; a file in a writable directory is fine."""
    assert preflight.access_log_problem(str(tmp_path)) == f"{tmp_path} is a directory: name a file in it"
    assert preflight.access_log_problem(str(tmp_path / "access.log")) is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_access_log_file_not_writable(tmp_path: Path) -> None:
    """A log file this user may not write is named with the user."""
    log = tmp_path / "access.log"
    log.write_text("")
    log.chmod(0o400)
    why = preflight.access_log_problem(str(log))
    assert why is not None and f"may not write {log}" in why


def test_more_workers_than_cpus_is_a_warning() -> None:
    """workers above the CPU count is named with the key and "auto"; up to it, nothing is said."""
    site = {**ACME_SITE, "tls": "local"}
    config = parse({"server": {"workers": 100000}, "site": [site]}, "a.toml")
    warning = preflight.workers_warning(config, cpus=2)
    assert warning is not None
    assert warning.startswith("a.toml: server.workers: 100000 workers for the 2 CPU(s) this process may use")
    assert '"auto" runs one per CPU' in warning
    assert preflight.workers_warning(parse({"server": {"workers": 2}, "site": [site]}, "a.toml"), cpus=2) is None


def test_dev_default_app_not_running_says_how_to_start_it() -> None:
    """check with no configuration: the app on :8000 not running is told to start runserver."""
    from tlsproxy.config import dev_config

    def refused(upstream: Upstream, timeout: float) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    (warning,) = preflight.upstream_warnings(dev_config(), refused)
    assert warning.endswith("until the app listens there: start your app (for Django: python manage.py runserver)")

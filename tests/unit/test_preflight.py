"""Preflight: what the machine must offer a valid configuration, said in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tlsproxy import preflight
from tlsproxy.config import parse

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
    assert found[0].startswith(f"site[0].upstream: {tmp_path / 'missing.sock'} does not exist")
    assert found[1] == f"site[1].upstream: {plain} is not a unix socket"

"""Defaults are written once: an empty configuration builds the libraries' own defaults, as the example documents."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from tlsproxy import config
from tlsproxy.http.server import Limits
from tlsproxy.tap import limits_of, policy_of
from tlsproxy.tls.policy import TLSPolicy

EXAMPLE = Path(__file__).parents[2] / "config.example.toml"


def test_default_server_builds_the_default_limits() -> None:
    """A configuration that sets nothing gives the HTTP side exactly ``Limits()``."""
    assert limits_of(config.Config()) == Limits()


def test_default_tls_builds_the_default_policy() -> None:
    """A configuration that sets nothing gives the TLS side exactly ``TLSPolicy()``."""
    assert policy_of(config.Config()) == TLSPolicy()


def test_shared_keys_have_one_default() -> None:
    """Every [server] or [tls] key named like a Limits or TLSPolicy field has that field's default."""
    pairs = [(config.Server(), Limits()), (config.TLS(), TLSPolicy())]
    for ours, theirs in pairs:
        shared = {f.name for f in dataclasses.fields(ours)} & {f.name for f in dataclasses.fields(theirs)}
        assert shared, type(theirs).__name__
        assert {k: getattr(ours, k) for k in shared} == {k: getattr(theirs, k) for k in shared}


def test_example_shows_the_defaults() -> None:
    """config.example.toml ("every key, with its default") loads to the defaults, but for the site and agree_tos."""
    raw = tomllib.loads(EXAMPLE.read_text())
    loaded = config.load(str(EXAMPLE), {"TLSPROXY_ACME_AGREE_TOS": "true"})
    assert raw["acme"]["agree_tos"] is False
    assert loaded.server == config.Server()
    assert loaded.tls == config.TLS()
    assert dataclasses.replace(loaded.acme, agree_tos=False) == config.ACME()
    (site,) = loaded.sites
    assert site == config.Site(hosts=site.hosts, upstream=site.upstream)


def test_example_and_readme_name_every_process_variable() -> None:
    """Every TLSPROXY_ variable that is not configuration is named in the example and the README."""
    readme = (EXAMPLE.parent / "README.md").read_text()
    example = EXAMPLE.read_text()
    for name in config.PROCESS_ENV:
        assert name in example, name
        assert name in readme, name

"""tlsproxy certs / renew / revoke / account rollover against the fleet's Redis (a real redis-server)."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redisserver import RedisServer, running_redis
from tlsproxy.acme import commands
from tlsproxy.acme.issuer import TableResponder
from tlsproxy.acme.storage import open_store
from tlsproxy.acme.testing import FakeCA
from tlsproxy.certs.challenges import HTTP01Answers, TLSALPN01Answers
from tlsproxy.config import ACME, Config, Server, Site, Store, Upstream

UP = Upstream(url="http://127.0.0.1:8000", host="127.0.0.1", port=8000)
_prefixes = itertools.count()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


def fleet_config(tmp_path: Path, server: RedisServer, prefix: str, index: int) -> Config:
    return Config(
        server=Server(state_dir=str(tmp_path / f"state{index}")),
        acme=ACME(agree_tos=True),
        store=Store(url=server.url, prefix=prefix),
        sites=(Site(hosts=("example.com", "www.example.com"), upstream=UP),),
    )


@pytest.fixture
def fleet(tmp_path: Path, redis_server: RedisServer):  # type: ignore[no-untyped-def]
    prefix = f"cmd{next(_prefixes)}:"
    http01, alpn01 = HTTP01Answers(), TLSALPN01Answers()
    ca = FakeCA(http01=http01, alpn01=alpn01)
    kw = {"ca_factory": lambda c, s: ca, "responder": TableResponder(http01, alpn01)}
    configs = [fleet_config(tmp_path, redis_server, prefix, i) for i in range(2)]
    return configs, ca, kw


def test_renew_on_one_machine_is_seen_by_certs_on_another(fleet) -> None:  # type: ignore[no-untyped-def]
    """renew through one instance's config stores in Redis; certs through another's shows that certificate."""
    (one, two), ca, kw = fleet
    out = io.StringIO()
    assert commands.renew(one, "example.com", False, out, **kw) == 0
    serial = open_store(one).load_certificate("example.com").leaf.serial_number  # type: ignore[union-attr]
    out = io.StringIO()
    assert commands.certs(two, out, local_issuer=lambda: "") == 0
    text = out.getvalue()
    assert text.startswith("store: redis redis://127.0.0.1:") and f"serial:       {serial:x}" in text
    assert commands.renew(two, "example.com", False, io.StringIO(), **kw) == 0
    assert len(ca.orders) == 1  # not due on the other machine either


def test_certs_with_redis_down_shows_the_local_copy(fleet, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    """With Redis stopped, certs says the store is unreachable (exit 1) and shows this machine's copy."""
    (one, two), ca, kw = fleet
    assert commands.renew(one, "example.com", False, io.StringIO(), **kw) == 0
    commands.certs(two, io.StringIO(), local_issuer=lambda: "")  # the machine has served it: it has a copy
    serial = open_store(two).load_certificate("example.com").leaf.serial_number  # type: ignore[union-attr]
    redis_server.stop()
    out = io.StringIO()
    assert commands.certs(two, out, local_issuer=lambda: "") == 1
    text = out.getvalue()
    assert "store: UNREACHABLE" in text and f"serial:       {serial:x}" in text
    err = io.StringIO()
    assert commands.renew(two, "example.com", True, out, err=err, **kw) == 1
    assert "unreachable" in err.getvalue() and "Traceback" not in err.getvalue()


def test_revoke_and_rollover_on_the_shared_store(fleet) -> None:  # type: ignore[no-untyped-def]
    """revoke replaces the fleet's certificate; account rollover replaces the fleet's account key."""
    (one, two), ca, kw = fleet
    assert commands.renew(one, "example.com", False, io.StringIO(), **kw) == 0
    first = open_store(two).load_certificate("example.com").leaf.serial_number  # type: ignore[union-attr]
    assert commands.revoke(two, "example.com", "keyCompromise", io.StringIO(), **kw) == 0
    assert open_store(one).load_certificate("example.com").leaf.serial_number != first  # type: ignore[union-attr]
    err = io.StringIO()
    assert commands.account_rollover(two, io.StringIO(), ca_factory=kw["ca_factory"], err=err) == 1
    assert "no ACME account in redis" in err.getvalue()
    before = open_store(one).account_key()  # what the real CA factory makes with the first order
    out = io.StringIO()
    assert commands.account_rollover(two, out, ca_factory=kw["ca_factory"]) == 0
    after = open_store(one).load_account_key()
    assert after is not None and after.private_numbers() != before.private_numbers()
    assert open_store(one).load_staged_account_key() is None
    assert ca.rollovers == 1 and "redis" in out.getvalue()

"""The tlsproxy certs / renew / revoke / account rollover commands against the fake CA."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tlsproxy.acme import commands
from tlsproxy.acme.issuer import TableResponder
from tlsproxy.acme.testing import FakeCA
from tlsproxy.certs.challenges import HTTP01Answers, TLSALPN01Answers
from tlsproxy.certs.store import CertificateStore
from tlsproxy.config import ACME, Config, Server, Site, Upstream

UP = Upstream(url="http://127.0.0.1:8000", host="127.0.0.1", port=8000)


@pytest.fixture
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    http01, alpn01 = HTTP01Answers(), TLSALPN01Answers()
    ca = FakeCA(http01=http01, alpn01=alpn01)
    config = Config(
        server=Server(state_dir=str(tmp_path / "state")),
        acme=ACME(agree_tos=True),
        sites=(Site(hosts=("example.com", "www.example.com"), upstream=UP),),
    )
    kw = {"ca_factory": lambda c, s: ca, "responder": TableResponder(http01, alpn01)}
    return config, ca, kw, CertificateStore(config.server.state_dir)


def test_unknown_name_lists_names(env) -> None:  # type: ignore[no-untyped-def]
    """renew with a name no site has fails with exit 2 and lists the names that exist."""
    config, ca, kw, store = env
    out = io.StringIO()
    assert commands.renew(config, "nope.example", False, out, **kw) == 2
    assert "nope.example" in out.getvalue() and "www.example.com" in out.getvalue()


def test_renew_then_not_due_then_force(env) -> None:  # type: ignore[no-untyped-def]
    """renew orders when there is no certificate, says 'not due' next, and orders again with --force."""
    config, ca, kw, store = env
    out = io.StringIO()
    assert commands.renew(config, "www.example.com", False, out, **kw) == 0
    assert "new certificate" in out.getvalue()
    assert commands.renew(config, "example.com", False, out, **kw) == 0
    assert "not due" in out.getvalue()
    assert len(ca.orders) == 1
    assert commands.renew(config, "example.com", True, out, **kw) == 0
    assert len(ca.orders) == 2


def test_renew_error_is_reported(env) -> None:  # type: ignore[no-untyped-def]
    """A CA failure gives exit 1 and a one-line error with the CA's words."""
    config, ca, kw, store = env
    ca.down = True
    out = io.StringIO()
    assert commands.renew(config, "example.com", True, out, **kw) == 1
    assert out.getvalue().startswith("error: example.com:") and "connection refused" in out.getvalue()
    assert "connection refused" in store.load_meta("example.com").last_error


def test_certs_asks_the_caller_who_issues_local_leaves(tmp_path: Path) -> None:
    """A tls = "local" site is listed with the issuer the command line describes, and no store is read for it."""
    local = Site(hosts=("app.test",), upstream=UP, tls="local")
    config = Config(server=Server(state_dir=str(tmp_path / "state")), sites=(local,))
    out = io.StringIO()
    assert commands.certs(config, out, local_issuer=lambda: "CN=dev root") == 0
    assert out.getvalue().startswith("app.test\n")
    assert "  source:       local (" in out.getvalue() and "  issuer:       CN=dev root\n" in out.getvalue()


def test_certs_lists_sites(env) -> None:  # type: ignore[no-untyped-def]
    """certs shows each site's hosts, source, issuer, not-after and next renewal."""
    config, ca, kw, store = env
    out = io.StringIO()
    commands.certs(config, out, local_issuer=str)
    assert "none yet" in out.getvalue()
    commands.renew(config, "example.com", False, io.StringIO(), **kw)
    out = io.StringIO()
    assert commands.certs(config, out, local_issuer=str) == 0
    text = out.getvalue()
    for needle in (
        "example.com, www.example.com",
        "source:       acme",
        "Fake ACME Root",
        "not after:",
        "next renewal:",
    ):
        assert needle in text


def test_revoke_then_fresh_certificate(env) -> None:  # type: ignore[no-untyped-def]
    """revoke revokes the stored certificate at the CA and stores a fresh one."""
    config, ca, kw, store = env
    commands.renew(config, "example.com", False, io.StringIO(), **kw)
    old = store.load_certificate("example.com")
    out = io.StringIO()
    assert commands.revoke(config, "example.com", "keyCompromise", out, **kw) == 0
    assert ca.revoked == {old.leaf.serial_number: 1}
    assert store.load_certificate("example.com").leaf.serial_number != old.leaf.serial_number


def test_revoke_bad_reason_and_nothing_stored(env) -> None:  # type: ignore[no-untyped-def]
    """revoke refuses an unknown reason and says so when there is nothing to revoke."""
    config, ca, kw, store = env
    out = io.StringIO()
    assert commands.revoke(config, "example.com", "because", out, **kw) == 2
    assert "keyCompromise" in out.getvalue()
    out = io.StringIO()
    assert commands.revoke(config, "example.com", "superseded", out, **kw) == 1
    assert "no stored certificate" in out.getvalue()


def test_account_rollover(env) -> None:  # type: ignore[no-untyped-def]
    """account rollover changes the stored account key and tells the CA."""
    config, ca, kw, store = env
    out = io.StringIO()
    assert commands.account_rollover(config, out, ca_factory=kw["ca_factory"]) == 1
    store.account_key()
    before = store.account_key_path.read_bytes()
    out = io.StringIO()
    assert commands.account_rollover(config, out, ca_factory=kw["ca_factory"]) == 0
    assert store.account_key_path.read_bytes() != before
    assert ca.rollovers == 1
    assert not (store.account_dir / "key.next.pem").exists()


def test_renew_on_a_full_disk_is_one_error_line(env, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """ENOSPC while storing the new certificate: exit 1, one 'error:' line naming the store, the old pair kept."""
    config, ca, kw, store = env
    out = io.StringIO()
    assert commands.renew(config, "example.com", False, out, **kw) == 0
    old = store.load_certificate("example.com")

    def full(site: Path, certified):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device", str(site / ".v-x" / "key.pem"))

    monkeypatch.setattr(CertificateStore, "_write_version", staticmethod(full))
    out = io.StringIO()
    assert commands.renew(config, "example.com", True, out, **kw) == 1
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: example.com: saving the certificate of example.com")
    assert "No space left on device" in lines[0] and "Traceback" not in out.getvalue()
    assert store.load_certificate("example.com").leaf.serial_number == old.leaf.serial_number

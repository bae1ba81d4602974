"""[store]: the Redis URL and its companions validated with clear errors; a password is never shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from tlsproxy.acme.storage import open_store
from tlsproxy.certs.redis_store import RedisStore
from tlsproxy.certs.store import CertificateStore
from tlsproxy.certs.store_url import redact_url
from tlsproxy.config import ConfigError, parse

SITE = {"hosts": ["example.com"], "upstream": "http://127.0.0.1:8000", "tls": "acme"}
BASE = {"acme": {"agree_tos": True}, "site": [SITE]}


def problems(store: dict, environ: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse({**BASE, "store": store}, "site.toml", environ or {})
    return [str(p) for p in info.value.problems]


def test_no_store_is_the_state_directory(tmp_path: Path) -> None:
    """Without [store] the directory store in state_dir is used, as before."""
    cfg = parse({**BASE, "server": {"state_dir": str(tmp_path)}}, "site.toml", {})
    assert cfg.store.url == "" and not cfg.store.shared
    store = open_store(cfg)
    assert isinstance(store, CertificateStore) and store.root == tmp_path


def test_redis_url_from_file_and_environment(tmp_path: Path) -> None:
    """A redis:// URL opens the Redis store (no connection yet); TLSPROXY_STORE_URL overrides the file."""
    cfg = parse(
        {**BASE, "server": {"state_dir": str(tmp_path)}, "store": {"url": "redis://127.0.0.1:6379/0", "prefix": "a:"}},
        "site.toml",
        {"TLSPROXY_STORE_URL": "rediss://:pw@redis.internal:6380/2"},
    )
    assert cfg.store.url == "rediss://:pw@redis.internal:6380/2" and cfg.store.prefix == "a:"
    store = open_store(cfg)
    assert isinstance(store, RedisStore) and store.prefix == "a:"
    assert "pw" not in store.describe() and "pw" not in cfg.store.describe()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://:hunter2@example.com/", "expected"),
        ("redis://:hunter2@/0", "no host"),
        ("redis://:hunter2@redis:6379/zero", "database is a number"),
        ("redis://:hunter2@redis:notaport/0", "cannot be read"),
        ("unix://relative.sock", "absolute"),
    ],
)
def test_bad_urls_refused_without_the_password(url: str, reason: str) -> None:
    """A URL we cannot use is refused under store.url with the reason, and the password is not in it."""
    (found,) = problems({"url": url})
    assert "store.url" in found and reason in found
    assert "hunter2" not in found


def test_env_url_problem_names_the_variable() -> None:
    """A bad TLSPROXY_STORE_URL is reported as coming from that variable."""
    (found,) = problems({}, {"TLSPROXY_STORE_URL": "memcached://:pw@x:1/"})
    assert "TLSPROXY_STORE_URL" in found and ":pw@" not in found


def test_other_keys_checked() -> None:
    """Unknown keys, an empty prefix and a lease out of range are refused with what was expected."""
    found = problems({"url": "redis://r:6379/0", "prefix": "", "lock_lease": 1, "bogus": 1})
    assert any("store.bogus" in p and "unknown key" in p for p in found)
    assert any("store.prefix" in p for p in found)
    assert any("store.lock_lease" in p and "2 to 3600" in p for p in found)


def test_encryption_key_file(tmp_path: Path) -> None:
    """The key file must hold a Fernet key (a clear error otherwise, never its content); a good one seals keys."""
    missing = tmp_path / "missing.key"
    (found,) = problems({"url": "redis://r:6379/0", "encryption_key_file": str(missing)})
    assert "store.encryption_key_file" in found and "cannot read" in found
    bad = tmp_path / "bad.key"
    bad.write_text("not-a-key-but-a-secret-phrase\n")
    (found,) = problems({"url": "redis://r:6379/0", "encryption_key_file": str(bad)})
    assert "no Fernet key" in found and "secret-phrase" not in found
    good = tmp_path / "good.key"
    good.write_bytes(Fernet.generate_key() + b"\n")
    cfg = parse(
        {
            **BASE,
            "server": {"state_dir": str(tmp_path)},
            "store": {"url": "redis://r/0", "encryption_key_file": str(good)},
        },
        "site.toml",
        {},
    )
    store = open_store(cfg)
    assert isinstance(store, RedisStore) and store._seal(b"x").startswith(b"fernet:")


def test_redact_url() -> None:
    """Only the password is hidden; a URL without one is shown as it is."""
    assert redact_url("redis://user:pw@host:6379/1") == "redis://user:***@host:6379/1"
    assert redact_url("redis://:pw@[::1]:6379/0") == "redis://:***@[::1]:6379/0"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


def test_check_shows_the_store_without_its_password(tmp_path: Path) -> None:
    """`tlsproxy check` names the shared store, and never its password."""
    from tlsproxy.cli import describe

    cfg = parse({**BASE, "store": {"url": "redis://:hunter2@redis.internal:6379/3"}}, "site.toml", {})
    text = describe(cfg)
    assert "redis://:***@redis.internal:6379/3" in text and "hunter2" not in text


def test_key_file_gone_since_loading_is_a_config_error(tmp_path: Path) -> None:
    """A key file removed after the configuration loaded makes opening the store a one-line ConfigError."""
    good = tmp_path / "good.key"
    good.write_bytes(Fernet.generate_key())
    cfg = parse({**BASE, "store": {"url": "redis://r/0", "encryption_key_file": str(good)}}, "site.toml", {})
    good.unlink()
    with pytest.raises(ConfigError) as info:
        open_store(cfg)
    (problem,) = info.value.problems
    assert problem.key == "store.encryption_key_file" and "cannot read" in problem.reason

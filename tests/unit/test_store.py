"""The directory store: layout, permissions, atomic writes, meta round trip, locking."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import stat
import time
from pathlib import Path

import pytest
import trustme

from tlsproxy.certs.model import CertifiedKey
from tlsproxy.certs.store import CertificateStore, FileSignature, LockTimeout, SiteMeta, StoreError, atomic_write


def certified(*names: str) -> CertifiedKey:
    leaf = trustme.CA().issue_cert(*names)
    return CertifiedKey.from_pem(leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_and_load_roundtrip(tmp_path: Path) -> None:
    """A saved certificate loads back with the same serial, and meta records its facts."""
    store = CertificateStore(tmp_path / "state")
    c = certified("example.com")
    meta = store.save_certificate("example.com", c, SiteMeta(hosts=("example.com",)))
    loaded = store.load_certificate("example.com")
    assert loaded is not None and loaded.leaf.serial_number == c.leaf.serial_number
    assert store.load_meta("example.com") == meta
    assert meta.not_after == c.not_after and meta.serial == format(c.leaf.serial_number, "x")


def test_permissions(tmp_path: Path) -> None:
    """Keys are 0600 and directories 0700."""
    store = CertificateStore(tmp_path / "state")
    store.save_certificate("example.com", certified("example.com"), SiteMeta())
    store.account_key()
    assert mode(store.key_path("example.com")) == 0o600
    assert mode(store.account_key_path) == 0o600
    for d in (store.root, store.site_dir("example.com"), store.account_dir):
        assert mode(d) == 0o700


def test_account_key_made_once(tmp_path: Path) -> None:
    """The account key is an ECDSA P-256 key made once and then reused."""
    store = CertificateStore(tmp_path)
    key = store.account_key()
    assert key.curve.name == "secp256r1"
    assert store.account_key().private_numbers() == key.private_numbers()


def test_registrations_per_directory(tmp_path: Path) -> None:
    """Account URLs are kept per directory URL and can be forgotten."""
    store = CertificateStore(tmp_path)
    store.save_registration("https://a/dir", "https://a/acct/1")
    store.save_registration("https://b/dir", "https://b/acct/9")
    assert store.registration("https://a/dir") == "https://a/acct/1"
    store.save_registration("https://a/dir", None)
    assert store.registration("https://a/dir") is None and store.registration("https://b/dir")


def test_meta_roundtrip_and_garbage() -> None:
    """SiteMeta survives JSON; unreadable JSON gives an empty meta rather than an exception."""
    now = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    meta = SiteMeta(hosts=("a", "b"), ari_start=now, failures=3, last_error="boom", next_attempt=now)
    assert SiteMeta.from_json(meta.to_json()) == meta
    assert SiteMeta.from_json("{not json") == SiteMeta()
    assert SiteMeta.from_json('{"failures": -1, "hosts": 5}') == SiteMeta()


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    """atomic_write replaces the file and leaves nothing else behind."""
    target = tmp_path / "f"
    atomic_write(target, b"one")
    atomic_write(target, b"two", 0o600)
    assert target.read_bytes() == b"two" and os.listdir(tmp_path) == ["f"] and mode(target) == 0o600


def test_signature_changes_on_replace(tmp_path: Path) -> None:
    """Replacing a file changes its FileSignature; a missing file makes it incomplete."""
    target = tmp_path / "f"
    assert not FileSignature.of(target).complete
    atomic_write(target, b"one")
    first = FileSignature.of(target)
    atomic_write(target, b"one")
    assert FileSignature.of(target) != first


def test_bad_site_names_rejected(tmp_path: Path) -> None:
    """Names that could escape the store directory are refused."""
    store = CertificateStore(tmp_path)
    for bad in ("../etc", "a/b", "", ".hidden"):
        with pytest.raises(StoreError):
            store.site_dir(bad)


def test_bad_chain_raises_certificate_error(tmp_path: Path) -> None:
    """A corrupted stored chain raises CertificateError, without the key in the message."""
    from tlsproxy.certs.model import CertificateError

    store = CertificateStore(tmp_path)
    store.save_certificate("example.com", certified("example.com"), SiteMeta())
    store.chain_path("example.com").write_bytes(b"junk")
    with pytest.raises(CertificateError) as info:
        store.load_certificate("example.com")
    assert "PRIVATE" not in str(info.value)


def _hold(root: str, ready, release) -> None:  # type: ignore[no-untyped-def]
    with CertificateStore(root).locked():
        ready.set()
        release.wait(10)


def test_lock_excludes_other_processes(tmp_path: Path) -> None:
    """While another process holds the store lock, locking times out; afterwards it succeeds."""
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(tmp_path), ready, release))
    proc.start()
    try:
        assert ready.wait(10)
        with pytest.raises(LockTimeout):
            with CertificateStore(tmp_path).locked(timeout=0.2, poll=0.05):
                pass
    finally:
        release.set()
        proc.join(10)
    start = time.monotonic()
    with CertificateStore(tmp_path).locked(timeout=5):
        pass
    assert time.monotonic() - start < 5

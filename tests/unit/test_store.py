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


# ---------------------------------------------------------------------------
# A full disk in the middle of a renewal (the key and chain switch together)

_WRITE_STEPS = ("write", "fsync", "rename", "symlink", "mkdir")


class _DiskFull:
    """Counts the store's writing system calls and fails the ``fail_at``-th with ENOSPC."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self.failed = ""
        for name in _WRITE_STEPS:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name: str, real):  # type: ignore[no-untyped-def]
        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.calls == self.fail_at:
                self.failed = name
                raise OSError(28, "No space left on device")
            return real(*args, **kwargs)

        return call


def _steps_of_a_save(tmp_path: Path) -> int:
    """How many writing system calls one certificate save makes."""
    store = CertificateStore(tmp_path / "count")
    store.save_certificate("example.com", certified("example.com"), SiteMeta())
    with pytest.MonkeyPatch.context() as mp:
        counter = _DiskFull(mp, fail_at=0)
        store.save_certificate("example.com", certified("example.com"), SiteMeta())
    return counter.calls


def test_disk_full_at_any_step_keeps_a_matching_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC at every write step of a save leaves the old pair or the new one, never a mix, also after a restart."""
    steps = _steps_of_a_save(tmp_path)
    assert steps >= 8
    for step in range(1, steps + 1):
        root = tmp_path / f"s{step}"
        old, new = certified("example.com"), certified("example.com")
        CertificateStore(root).save_certificate("example.com", old, SiteMeta(hosts=("example.com",)))
        with pytest.MonkeyPatch.context() as mp:
            disk = _DiskFull(mp, fail_at=step)
            try:
                CertificateStore(root).save_certificate("example.com", new, SiteMeta(hosts=("example.com",)))
            except StoreError as e:
                assert e.reason == "No space left on device" and e.action and str(root) in e.path
            assert disk.failed, f"step {step} did not fail"
        # A fresh store object is a restarted process: it loads a valid pair (CertifiedKey checks key vs leaf).
        restarted = CertificateStore(root)
        loaded = restarted.load_certificate("example.com")
        assert loaded is not None, f"no certificate after ENOSPC at step {step} ({disk.failed})"
        assert loaded.leaf.serial_number in (old.leaf.serial_number, new.leaf.serial_number)
        # The next writer tidies leftovers, and the pair still reads the same.
        restarted.tidy("example.com")
        site = restarted.site_dir("example.com")
        assert not [p.name for p in site.iterdir() if p.name.startswith(".")], step
        assert len([p for p in site.iterdir() if p.name.startswith("v-")]) == 1, step
        reloaded = restarted.load_certificate("example.com")
        assert reloaded is not None and reloaded.leaf.serial_number == loaded.leaf.serial_number


def test_versions_are_private_and_switch_in_one_rename(tmp_path: Path) -> None:
    """A version directory is 0700 with a 0600 key; ``current`` is a symlink, and old versions are removed."""
    store = CertificateStore(tmp_path)
    store.save_certificate("example.com", certified("example.com"), SiteMeta())
    second = certified("example.com")
    store.save_certificate("example.com", second, SiteMeta())
    site = store.site_dir("example.com")
    current = site / "current"
    assert current.is_symlink()
    versions = [p for p in site.iterdir() if p.name.startswith("v-")]
    assert [p.name for p in versions] == [os.readlink(current)]
    assert mode(versions[0]) == 0o700 and mode(versions[0] / "key.pem") == 0o600
    assert mode(site) == 0o700
    loaded = store.load_certificate("example.com")
    assert loaded is not None and loaded.leaf.serial_number == second.leaf.serial_number


def test_old_layout_loads_and_migrates(tmp_path: Path) -> None:
    """A site stored as plain key.pem/fullchain.pem loads as it is; its next save moves it to a version."""
    store = CertificateStore(tmp_path)
    site = store.site_dir("example.com")
    site.mkdir(parents=True, mode=0o700)
    old = certified("example.com")
    atomic_write(site / "key.pem", old.key_pem(), 0o600)
    atomic_write(site / "fullchain.pem", old.chain_pem())
    atomic_write(site / "meta.json", SiteMeta(hosts=("example.com",)).to_json().encode())
    loaded = store.load_certificate("example.com")
    assert loaded is not None and loaded.leaf.serial_number == old.leaf.serial_number
    assert store.signature("example.com").complete
    new = certified("example.com")
    store.save_certificate("example.com", new, store.load_meta("example.com"))
    assert (site / "current").is_symlink()
    # The old names now lead into the current version, for a reader of the old layout.
    assert (site / "key.pem").is_symlink() and (site / "fullchain.pem").read_bytes() == new.chain_pem()
    reloaded = CertificateStore(tmp_path).load_certificate("example.com")
    assert reloaded is not None and reloaded.leaf.serial_number == new.leaf.serial_number


def test_reader_follows_a_version_removed_while_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader whose version is switched away and removed between resolving and reading reads the new one."""
    store = CertificateStore(tmp_path)
    store.save_certificate("example.com", certified("example.com"), SiteMeta())
    new = certified("example.com")
    real = CertificateStore._resolve
    swapped = []

    def resolve_then_swap(site: Path) -> Path:
        pair = real(site)
        if not swapped:
            swapped.append(True)
            store.save_certificate("example.com", new, SiteMeta())
        return pair

    monkeypatch.setattr(CertificateStore, "_resolve", staticmethod(resolve_then_swap))
    loaded = store.load_certificate("example.com")
    assert loaded is not None and loaded.leaf.serial_number == new.leaf.serial_number


def test_unchanged_meta_is_not_rewritten(tmp_path: Path) -> None:
    """Saving the same meta again leaves meta.json untouched (same inode and mtime)."""
    store = CertificateStore(tmp_path)
    meta = SiteMeta(hosts=("example.com",), failures=1)
    store.save_meta("example.com", meta)
    before = FileSignature.of(store.meta_path("example.com"))
    store.save_meta("example.com", meta)
    assert FileSignature.of(store.meta_path("example.com")) == before
    store.save_meta("example.com", SiteMeta(hosts=("example.com",), failures=2))
    assert FileSignature.of(store.meta_path("example.com")) != before


def test_meta_change_is_no_new_certificate(tmp_path: Path) -> None:
    """The site's signature (what the proxy polls) changes with key or chain, not with meta.json."""
    store = CertificateStore(tmp_path)
    store.save_certificate("example.com", certified("example.com"), SiteMeta())
    before = store.signature("example.com")
    store.save_meta("example.com", SiteMeta(failures=3))
    assert store.signature("example.com") == before
    store.save_certificate("example.com", certified("example.com"), SiteMeta())
    assert store.signature("example.com") != before


@pytest.fixture
def tiny_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 64 KiB tmpfs (root only); skipped where mounting is refused."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    import subprocess

    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_really_full_disk_keeps_the_old_pair(tiny_disk: Path) -> None:
    """On a real file system filled to a few bytes, a save fails as a StoreError and the old pair still loads."""
    store = CertificateStore(tiny_disk / "state")
    old = certified("example.com")
    store.save_certificate("example.com", old, SiteMeta(hosts=("example.com",)))
    filler = tiny_disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass
    new = certified("example.com")
    with pytest.raises(StoreError) as info:
        store.save_certificate("example.com", new, SiteMeta(hosts=("example.com",)))
    assert "No space left" in str(info.value)
    loaded = CertificateStore(tiny_disk / "state").load_certificate("example.com")
    assert loaded is not None and loaded.leaf.serial_number == old.leaf.serial_number
    filler.unlink()
    store.tidy("example.com")
    store.save_certificate("example.com", new, SiteMeta(hosts=("example.com",)))
    loaded = CertificateStore(tiny_disk / "state").load_certificate("example.com")
    assert loaded is not None and loaded.leaf.serial_number == new.leaf.serial_number

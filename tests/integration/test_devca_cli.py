"""`tlsproxy ca install|uninstall` against real NSS databases made by the real certutil."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tlsproxy.devca import LocalCA, TrustStores, ca_install, ca_path, ca_uninstall

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("certutil") is None, reason="certutil missing: apt-get install libnss3-tools"),
]

# The system store is left alone: these tests run as root in CI and must not change the host's trust.
NSS_ONLY = TrustStores(system=False)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return {**os.environ, "HOME": str(home), "TLSPROXY_CAROOT": str(tmp_path / "caroot")}


def nss_list(db: Path) -> str:
    result = subprocess.run(["certutil", "-L", "-d", f"sql:{db}"], capture_output=True, text=True, check=True)
    return result.stdout


def firefox_profile(home: Path) -> Path:
    profile = home / ".mozilla" / "firefox" / "abcd1234.default-release"
    profile.mkdir(parents=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{profile}", "--empty-password"], check=True, capture_output=True)
    return profile


def test_install_lists_root_in_new_nssdb_and_uninstall_removes_it(env: dict[str, str]) -> None:
    """Install creates ~/.pki/nssdb and trusts the root there (C,,); uninstall takes it out again."""
    db = Path(env["HOME"]) / ".pki" / "nssdb"
    out = io.StringIO()
    assert ca_install(env, out, stores=NSS_ONLY) == 0, out.getvalue()
    ca = LocalCA.load_or_create(Path(env["TLSPROXY_CAROOT"]))
    assert f"created the NSS database {db}" in out.getvalue()
    assert f"added the root to NSS database {db}" in out.getvalue()
    listing = nss_list(db)
    line = next(line for line in listing.splitlines() if ca.nickname in line)
    assert line.split()[-1] == "C,,"

    out = io.StringIO()
    assert ca_uninstall(env, out, stores=NSS_ONLY) == 0, out.getvalue()
    assert f"removed the root from NSS database {db}" in out.getvalue()
    assert ca.nickname not in nss_list(db)
    assert ca.root_pem_path.exists(), "uninstall keeps the CA itself"


def test_install_twice_is_idempotent(env: dict[str, str]) -> None:
    """A second install reuses the CA and reports the root as already trusted, adding nothing."""
    assert ca_install(env, io.StringIO(), stores=NSS_ONLY) == 0
    out = io.StringIO()
    assert ca_install(env, out, stores=NSS_ONLY) == 0
    assert out.getvalue().startswith("Using the local CA in ")
    assert "already trusted in NSS database" in out.getvalue()
    ca = LocalCA.load_or_create(Path(env["TLSPROXY_CAROOT"]))
    listing = nss_list(Path(env["HOME"]) / ".pki" / "nssdb")
    assert listing.count(ca.nickname) == 1


def test_firefox_profiles_are_included(env: dict[str, str]) -> None:
    """A Firefox profile with cert9.db gets the root too, and loses it on uninstall."""
    profile = firefox_profile(Path(env["HOME"]))
    out = io.StringIO()
    assert ca_install(env, out, stores=NSS_ONLY) == 0, out.getvalue()
    ca = LocalCA.load_or_create(Path(env["TLSPROXY_CAROOT"]))
    assert ca.nickname in nss_list(profile)
    assert ca_uninstall(env, io.StringIO(), stores=NSS_ONLY) == 0
    assert ca.nickname not in nss_list(profile)


def test_uninstall_when_never_installed_succeeds(env: dict[str, str]) -> None:
    """Uninstalling a CA that no store trusts changes nothing and exits 0."""
    LocalCA.load_or_create(Path(env["TLSPROXY_CAROOT"]))
    out = io.StringIO()
    assert ca_uninstall(env, out, stores=NSS_ONLY) == 0
    assert "removed" not in out.getvalue()


def test_path_names_the_caroot(env: dict[str, str]) -> None:
    """`ca path` prints $TLSPROXY_CAROOT, where install put the root."""
    out = io.StringIO()
    assert ca_path(env, out) == 0
    assert out.getvalue().strip() == env["TLSPROXY_CAROOT"]

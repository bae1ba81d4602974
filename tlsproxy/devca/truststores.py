"""The trust stores ``tlsproxy ca`` changes: the browsers' NSS databases and the system anchors.

Each change is a subprocess (``certutil``, ``update-ca-certificates``) run
through an injected ``runner`` with subprocess.run's shape, so tests record the
commands instead of running them.  Each function writes one line per store to
``out`` saying what it did or what the user should do, and returns whether
the store ended up as wanted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cryptography import x509

from tlsproxy.certs.store import atomic_write
from tlsproxy.devca.ca import LocalCA, home_of
from tlsproxy.devca.certificates import root_nickname

SYSTEM_ANCHORS = Path("/usr/local/share/ca-certificates")

Runner = Callable[..., subprocess.CompletedProcess]  # subprocess.run's shape


@dataclass(frozen=True)
class TrustStores:
    """Where ``ca install`` puts the root; tests point these at temporary places."""

    nss: bool = True
    system: bool = True
    system_dir: Path = SYSTEM_ANCHORS
    update_command: tuple[str, ...] = ("update-ca-certificates",)


def nss_databases(home: Path) -> list[Path]:
    """NSS databases the browsers read: Chromium's shared one, then Firefox profiles."""
    found = [home / ".pki" / "nssdb"]
    for root in (home / ".mozilla" / "firefox", home / "snap" / "firefox" / "common" / ".mozilla" / "firefox"):
        found += sorted(p.parent for p in root.glob("*/cert9.db"))
    return found


def system_anchor_name(ca: LocalCA | x509.Certificate) -> str:
    root = ca.root if isinstance(ca, LocalCA) else ca
    return f"tlsproxy-development-ca-{root.serial_number:x}"[:60] + ".crt"


def _run(runner: Runner, argv: list[str], environ: Mapping[str, str]) -> subprocess.CompletedProcess:
    return runner(argv, capture_output=True, text=True, env=dict(environ), check=False)


def _which(name: str, environ: Mapping[str, str]) -> str | None:
    return shutil.which(name, path=environ.get("PATH", os.defpath))


def _output(result: subprocess.CompletedProcess) -> str:
    return " ".join(((result.stderr or "") + " " + (result.stdout or "")).split()) or f"exit {result.returncode}"


def _nss_has(runner: Runner, certutil: str, db: Path, nickname: str, environ: Mapping[str, str]) -> bool:
    return _run(runner, [certutil, "-L", "-d", f"sql:{db}", "-n", nickname], environ).returncode == 0


# ---------------------------------------------------------------------------
# NSS (Chromium, Firefox)


def install_nss(ca: LocalCA, environ: Mapping[str, str], out: IO[str], runner: Runner) -> bool:
    """Trust ``ca`` in every NSS database, making Chromium's shared one if it is missing."""
    certutil = _which("certutil", environ)
    if certutil is None:
        print(
            "could not add the root to Chromium/Firefox (NSS): certutil not found;"
            " install it with `apt-get install libnss3-tools`, then run `tlsproxy ca install` again",
            file=out,
        )
        return False
    ok = True
    home = home_of(environ)
    for db in nss_databases(home):
        if not (db / "cert9.db").exists():
            if db != home / ".pki" / "nssdb":
                continue
            try:
                db.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as e:
                print(f"could not create the NSS database {db}: {e.strerror}", file=out)
                ok = False
                continue
            made = _run(runner, [certutil, "-N", "-d", f"sql:{db}", "--empty-password"], environ)
            if made.returncode != 0:
                print(f"could not create the NSS database {db}: {_output(made)}", file=out)
                ok = False
                continue
            print(f"created the NSS database {db}", file=out)
        if _nss_has(runner, certutil, db, ca.nickname, environ):
            print(f"already trusted in NSS database {db} as {ca.nickname!r}", file=out)
            continue
        argv = [certutil, "-A", "-d", f"sql:{db}", "-t", "C,,", "-n", ca.nickname, "-i", str(ca.root_pem_path)]
        added = _run(runner, argv, environ)
        if added.returncode != 0:
            print(f"could not add the root to NSS database {db}: {_output(added)}", file=out)
            ok = False
        else:
            print(f"added the root to NSS database {db} as {ca.nickname!r}", file=out)
    return ok


def remove_nss(root: x509.Certificate, environ: Mapping[str, str], out: IO[str], runner: Runner) -> bool:
    """Take ``root`` out of every NSS database that has it."""
    nickname = root_nickname(root)
    certutil = _which("certutil", environ)
    if certutil is None:
        print(
            "could not remove the root from Chromium/Firefox (NSS): certutil not found;"
            " install it with `apt-get install libnss3-tools`",
            file=out,
        )
        return False
    ok = True
    for db in nss_databases(home_of(environ)):
        if not (db / "cert9.db").exists() or not _nss_has(runner, certutil, db, nickname, environ):
            continue
        removed = _run(runner, [certutil, "-D", "-d", f"sql:{db}", "-n", nickname], environ)
        if removed.returncode != 0:
            print(f"could not remove the root from NSS database {db}: {_output(removed)}", file=out)
            ok = False
        else:
            print(f"removed the root from NSS database {db}", file=out)
    return ok


# ---------------------------------------------------------------------------
# The system store (Debian's update-ca-certificates)


def _system_writable(stores: TrustStores, is_root: bool | None) -> str | None:
    """None when the system store may be changed, else why not."""
    if is_root is None:
        is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if not stores.system_dir.is_dir():
        return f"{stores.system_dir} does not exist (not a Debian-style system)"
    if not is_root or not os.access(stores.system_dir, os.W_OK):
        return f"{stores.system_dir} is not writable by this user (the system store needs root)"
    return None


def install_system(
    ca: LocalCA,
    environ: Mapping[str, str],
    out: IO[str],
    runner: Runner,
    stores: TrustStores,
    is_root: bool | None,
) -> bool:
    """Add ``ca`` to the system anchors, or say the ``sudo`` lines that would (not a failure)."""
    target = stores.system_dir / system_anchor_name(ca)
    why = _system_writable(stores, is_root)
    if why is not None:
        print(f"skipped the system store: {why}; to add it there:", file=out)
        print(f"  sudo cp {ca.root_pem_path} {target} && sudo update-ca-certificates", file=out)
        return True
    if target.exists() and target.read_bytes() == ca.root_pem_path.read_bytes():
        print(f"already in the system store as {target}", file=out)
        return True
    try:
        atomic_write(target, ca.root_pem_path.read_bytes(), 0o644)
    except OSError as e:
        print(f"could not write {target}: {e.strerror}", file=out)
        return False
    return _update_system(target, "added the root to the system store as", environ, out, runner, stores)


def remove_system(
    root: x509.Certificate,
    environ: Mapping[str, str],
    out: IO[str],
    runner: Runner,
    stores: TrustStores,
    is_root: bool | None,
) -> bool:
    """Take ``root`` out of the system anchors, if install put it there."""
    target = stores.system_dir / system_anchor_name(root)
    if not target.exists():
        return True
    why = _system_writable(stores, is_root)
    if why is not None:
        print(f"could not remove {target}: {why}; run `sudo rm {target} && sudo update-ca-certificates`", file=out)
        return False
    try:
        target.unlink()
    except OSError as e:
        print(f"could not remove {target}: {e.strerror}", file=out)
        return False
    return _update_system(target, "removed the root from the system store:", environ, out, runner, stores)


def _update_system(
    target: Path, done: str, environ: Mapping[str, str], out: IO[str], runner: Runner, stores: TrustStores
) -> bool:
    command = _which(stores.update_command[0], environ) or (
        stores.update_command[0] if os.path.isabs(stores.update_command[0]) else None
    )
    if command is None:
        print(f"{done} {target}, but {stores.update_command[0]} was not found to apply it", file=out)
        return False
    result = _run(runner, [command, *stores.update_command[1:]], environ)
    if result.returncode != 0:
        print(f"{done} {target}, but {stores.update_command[0]} failed: {_output(result)}", file=out)
        return False
    print(f"{done} {target} ({' '.join(stores.update_command)} ran)", file=out)
    return True

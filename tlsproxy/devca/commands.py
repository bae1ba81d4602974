"""``tlsproxy ca path|install|uninstall``: what they print and the exit status they return.

Exit 0 when the stores are as wanted, 1 when a store could not be changed,
2 when the CA itself cannot be used.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from typing import IO

from tlsproxy.devca.ca import ROOT_KEY_NAME, CAError, LocalCA, default_caroot, read_root_only
from tlsproxy.devca.truststores import (
    Runner,
    TrustStores,
    install_nss,
    install_system,
    remove_nss,
    remove_system,
)

# What the commands change unless told otherwise: NSS and the system store.
EVERY_STORE = TrustStores()


def ca_path(environ: Mapping[str, str], out: IO[str]) -> int:
    """``tlsproxy ca path``: print the CA directory (made or not)."""
    print(default_caroot(environ), file=out)
    return 0


def ca_install(
    environ: Mapping[str, str],
    out: IO[str],
    *,
    stores: TrustStores = EVERY_STORE,
    runner: Runner = subprocess.run,
    is_root: bool | None = None,
) -> int:
    """``tlsproxy ca install``: make the CA if needed, trust it in NSS and the system store.

    Exit 0 when the browsers' NSS store trusts the root, 1 when something that
    should have worked did not, 2 when the CA itself cannot be used.
    """
    caroot = default_caroot(environ)
    try:
        existed = (caroot / ROOT_KEY_NAME).exists()
        ca = LocalCA.load_or_create(caroot, environ=environ)
    except CAError as e:
        print(f"error: {e}", file=out)
        return 2
    print(f"{'Using' if existed else 'Created'} the local CA in {caroot}", file=out)
    print(f"  root {ca.root.subject.rfc4514_string()}, SHA-256 {ca.fingerprint}", file=out)
    failed = False
    if stores.nss:
        failed |= not install_nss(ca, environ, out, runner)
    if stores.system:
        failed |= not install_system(ca, environ, out, runner, stores, is_root)
    return 1 if failed else 0


def ca_uninstall(
    environ: Mapping[str, str],
    out: IO[str],
    *,
    stores: TrustStores = EVERY_STORE,
    runner: Runner = subprocess.run,
    is_root: bool | None = None,
) -> int:
    """``tlsproxy ca uninstall``: take the root out of every store install put it in.

    The CA directory stays, so a later install trusts the same root again.
    """
    caroot = default_caroot(environ)
    try:
        root = read_root_only(caroot)
    except CAError as e:
        print(f"error: {e}", file=out)
        return 2
    if root is None:
        print(f"no local CA in {caroot}: nothing to uninstall", file=out)
        return 0
    ok = True
    if stores.nss:
        ok &= remove_nss(root, environ, out, runner)
    if stores.system:
        ok &= remove_system(root, environ, out, runner, stores, is_root)
    print(f"the local CA itself stays in {caroot}" + ("" if ok else "; some stores could not be cleaned"), file=out)
    return 0 if ok else 1

"""The local development CA: a private root that the developer's browsers trust.

Like mkcert: one root per user, made once in the user's data directory and
added to the browsers' trust stores by ``tlsproxy ca install``.  The running
proxy issues short-lived leaves from it in memory, so no leaf key is ever
written to disk, and re-issues them before they expire.

- :mod:`.certificates`: what the root and leaves contain, when to renew (pure);
- :mod:`.ca`: the root on disk (:class:`LocalCA`);
- :mod:`.service`: the Twisted service that serves and renews leaves;
- :mod:`.truststores`: NSS and the system store, through their commands;
- :mod:`.commands`: ``tlsproxy ca path|install|uninstall``.

The names below are the ones the rest of tlsproxy uses.
"""

from tlsproxy.devca.ca import CAError, LocalCA, default_caroot, read_root_only
from tlsproxy.devca.commands import ca_install, ca_path, ca_uninstall
from tlsproxy.devca.service import LocalCertificateService
from tlsproxy.devca.truststores import TrustStores

__all__ = [
    "CAError",
    "LocalCA",
    "LocalCertificateService",
    "TrustStores",
    "ca_install",
    "ca_path",
    "ca_uninstall",
    "default_caroot",
    "read_root_only",
]

"""Warnings about a configuration that loads but serves TLS worse than it could.

For ``tlsproxy check`` (and the start-up log): expired or incomplete
certificate files, chains out of order, weak TLS 1.2 suites.  Reads the
certificate files of ``tls = "files"`` sites, so it runs where blocking is
fine (the command line), never on the reactor.  It reads the whole
configuration, so it sits at the top with the command line, not in tls/.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from tlsproxy.certs.model import CertificateError, CertifiedKey, certificate_warnings
from tlsproxy.config import Config
from tlsproxy.tls.policy import PolicyError, cipher_warnings


def configuration_warnings(config: Config, now: datetime.datetime) -> list[str]:
    """Every warning for ``config``, each naming where it comes from."""
    warnings = []
    try:
        warnings += [f"tls.ciphers: {w}" for w in cipher_warnings(config.tls.ciphers, config.tls.alpn)]
    except PolicyError:
        pass  # loading the configuration reported it already
    for site in config.sites:
        if site.tls != "files":
            continue
        try:
            certified = CertifiedKey.from_pem(
                Path(site.cert).read_bytes(), Path(site.key).read_bytes(), source=site.cert
            )
        except (OSError, CertificateError):
            continue  # loading the configuration reported it already
        warnings += [f"site {site.name}: {site.cert}: {w}" for w in certificate_warnings(certified, now)]
    return warnings

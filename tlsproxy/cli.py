"""The ``tlsproxy`` command: check a configuration, run the dev proxy, manage certificates."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from twisted.logger import LogBeginner, LogLevel

from tlsproxy import config as configuration
from tlsproxy import preflight
from tlsproxy.audit import configuration_warnings
from tlsproxy.certs.model import CertificateError
from tlsproxy.config import Config, ConfigError
from tlsproxy.proxy.access import load_all
from tlsproxy.tls.policy import GROUPS, cipher_names

# Exit statuses of every command (README, "Exit statuses"): 0 done; 1 the
# operation failed (the CA refused, a port could not be bound); 2 bad usage or
# a configuration that cannot run (argparse uses 2 for usage errors too).
OK, BAD_CONFIG = 0, 2


def _load(path: str | None, err: TextIO) -> Config | None:
    """The configuration, checked against this machine; None once every problem is on ``err``."""
    try:
        config = configuration.load(path)
    except (ConfigError, CertificateError) as e:
        problems = e.problems if isinstance(e, ConfigError) else [e]
        for problem in problems:
            print(f"tlsproxy: {problem}", file=err)
        return None
    problems = preflight.problems(config)
    for problem in problems:
        print(f"tlsproxy: {problem}", file=err)
    return None if problems else config


def describe(config: Config) -> str:
    """The effective configuration as a person reads it; no secrets."""
    server, tls, acme = config.server, config.tls, config.acme
    lines = [
        f"configuration: {config.source}{' (local dev default)' if config.dev else ''}",
        "[server]",
        f"  https = {list(server.https)}",
        f"  http = {list(server.http)}",
        f"  state_dir = {server.state_dir}",
        f"  admin = {server.admin or '(off)'}",
        f"  workers = {server.workers}{' (one process)' if server.workers == 1 else ' (a supervisor and its workers)'}",
        f"  trusted_proxies = {[str(n) for n in server.trusted_proxies]}",
        f"  timeouts: connect {server.connect_timeout:g}s, upstream {server.upstream_timeout:g}s, "
        f"idle {server.idle_timeout:g}s, handshake {server.handshake_timeout:g}s, header {server.header_timeout:g}s",
        f"  limits: request line {server.max_request_line} B, headers {server.max_header_size} B "
        f"/ {server.max_header_count} fields",
        "[tls]",
        f"  min_version = {tls.min_version}",
        f"  ciphers = {tls.ciphers}",
        f"    selects: {', '.join(cipher_names(tls.ciphers))}",
        f"  dhparams = {tls.dhparams or '(none: DHE suites off)'}",
        f"  alpn = {list(tls.alpn)}",
        f"  key exchange groups: {GROUPS.replace(':', ', ')}",
    ]
    if any(site.tls == "acme" for site in config.sites):
        lines += [
            "[acme]",
            f"  directory = {acme.directory_url}",
            f"  email = {acme.email or '(none)'}",
            f"  agree_tos = {str(acme.agree_tos).lower()}",
            f"  challenges = {list(acme.challenges)}",
            f"  key_type = {acme.key_type}",
            f"  external account binding = {'yes (kid ' + acme.eab_kid + ')' if acme.eab_kid else 'no'}",
        ]
        if acme.ca_bundle:
            lines.append(f"  ca_bundle = {acme.ca_bundle}")
        if acme.profile:
            lines.append(f"  profile = {acme.profile}")
    if config.store.shared:  # the password stays out (redact_url)
        lines += ["[store]", f"  {config.store.describe()}, lock lease {config.store.lock_lease:g}s"]
        if config.store.encryption_key_file:
            lines.append(f"  keys encrypted with {config.store.encryption_key_file}")
    for site in config.sites:
        hsts = site.hsts.header_value()
        lines += [
            f"[[site]] {site.name}",
            f"  hosts = {list(site.hosts)}",
            f"  upstream = {', '.join(u.url for u in site.upstreams)}",
            f"  tls = {site.tls}" + (f" (cert {site.cert}, key {site.key})" if site.tls == "files" else ""),
            f"  hsts = {hsts.decode() if hsts else 'off'}",
            f"  secure_cookies = {str(site.secure_cookies).lower()}",
            f"  max_body_size = {site.max_body_size}",
        ]
        for mount in site.static:  # what tlsproxy serves itself, not the app
            note = " (media: uploads)" if mount.media else ""
            lines.append(f"  static {mount.prefix} = {mount.root}{note}, max-age {site.static_max_age}s unless hashed")
        lines += _balancing_lines(site)
        lines += describe_gate(site)
        lines.append(f"  compress = {'zstd, br, gzip (as the client asks)' if site.compress else 'off'}")
    if server.access_log_file:
        lines.append(f"access log file: {server.access_log_file} (JSON lines; SIGUSR1 reopens it)")
    return "\n".join(lines)


def describe_gate(site: configuration.Site) -> list[str]:
    """A site's access rules, error pages and maintenance switch, one line each."""
    lines = []
    for rule in reversed(site.access):  # "/" first, then the longer prefixes
        parts = []
        if rule.allow:
            parts.append("allow " + ", ".join(map(str, rule.allow)))
        if rule.deny:
            parts.append("deny " + ", ".join(map(str, rule.deny)))
        if rule.basic_auth is not None:
            passed = ", Authorization passed to the app" if rule.pass_authorization else ""
            parts.append(f"basic auth {rule.basic_auth.realm!r} ({rule.basic_auth.htpasswd}{passed})")
        lines.append(f"  access {rule.prefix}: {'; '.join(parts) or 'open'}")
    for status, path in site.error_pages:
        lines.append(f"  error page {status} = {path}")
    if site.maintenance_file:
        lines.append(f"  maintenance while {site.maintenance_file} exists")
    return lines


def _balancing_lines(site: configuration.Site) -> list[str]:
    """How a site with several upstreams (or health checks) picks one and finds one down."""
    b = site.balancing
    lines = []
    if len(site.upstreams) > 1:
        lines.append(f"  balance = {b.balance}, out after {b.max_fails} failed connects for {b.fail_timeout:g}s")
    if b.health_path:
        lines.append(
            f"  health check: GET {b.health_path} every {b.health_interval:g}s, "
            f"{'/'.join(b.health_status)} within {b.health_timeout:g}s"
        )
    for route in site.routes:
        if len(route.upstreams) > 1:
            lines.append(f"  route {route.prefix} = {', '.join(u.url for u in route.upstreams)}")
    return lines


def cmd_check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    config = _load(args.config, err)
    if config is None:
        return BAD_CONFIG
    try:
        users = load_all(config.sites, config.source)  # the htpasswd files of basic_auth: bcrypt lines only
    except ConfigError as e:
        for problem in e.problems:
            print(f"tlsproxy: {problem}", file=err)
        return BAD_CONFIG
    store_problems, store_warnings = preflight.store_findings(config)
    for problem in store_problems:
        print(f"tlsproxy: {problem}", file=err)
    if store_problems:
        return BAD_CONFIG
    print(describe(config), file=out)
    tls_warnings = configuration_warnings(config, datetime.datetime.now(datetime.UTC))
    app_warnings = preflight.upstream_warnings(config)
    app_warnings += [
        f"{config.source}: basic_auth: {path} has no users, so every request it guards gets 401:"
        f" add one with tlsproxy passwd {path} USER"
        for path, names in sorted(users.items())
        if not names
    ]
    for warning in [*preflight.warnings(config), *app_warnings, *store_warnings, *tls_warnings]:
        print(f"tlsproxy: warning: {warning}", file=err)
    print("configuration OK", file=out)
    return OK


def cmd_dev(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run the dev proxy in this process (what ``twist tlsproxy`` does with no config)."""

    def dev_config() -> Config:
        return configuration.dev_config(
            upstream=args.upstream or configuration.DEFAULT_DEV_UPSTREAM,
            listen=tuple(args.listen) if args.listen else configuration.DEFAULT_DEV_HTTPS,
        )

    try:
        config = dev_config()
    except ConfigError as e:
        for problem in e.problems:
            print(f"tlsproxy: {problem}", file=err)
        return BAD_CONFIG
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    level = LogLevel.levelWithName(args.log_level)
    return run_dev(reactor, globalLogBeginner, config, level, out, err, load_config=dev_config)


def run_dev(
    reactor: Any,
    log_beginner: LogBeginner,
    config: Config,
    level: LogLevel,
    out: TextIO,
    err: TextIO,
    load_config: Callable[[], Config] | None = None,
) -> int:
    """Serve ``config`` on ``reactor`` until it stops; the service comes from tap, as twist's does.

    ``load_config`` is what SIGHUP re-reads (the same command line's configuration).
    """
    from tlsproxy import tap
    from tlsproxy.logs import LogOutput

    output = LogOutput("text", level)
    output.install(reactor)  # access lines go straight to it, batched (tlsproxy/logs.py)
    log_beginner.beginLoggingTo([output(out)], redirectStandardIO=False)
    try:
        service = tap.prepare_service(reactor, config, load_config=load_config)
    except tap.CANNOT_RUN as e:
        for line in tap.cannot_run(e):
            print(f"tlsproxy: {line}", file=err)
        return BAD_CONFIG
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return service.exit_status


def _dev_ca_issuer() -> str:
    """Who issues the leaves of ``tls = "local"`` sites, as ``tlsproxy certs`` shows it."""
    from tlsproxy import devca

    caroot = devca.default_caroot()
    try:
        root = devca.read_root_only(caroot)
    except devca.CAError as e:
        return f"cannot read: {e}"
    return root.subject.rfc4514_string() if root is not None else f"none yet (made in {caroot} on first start)"


def cmd_certs(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from tlsproxy.acme import commands

    config = _load(args.config, err)
    return BAD_CONFIG if config is None else commands.certs(config, out, local_issuer=_dev_ca_issuer)


def cmd_renew(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from tlsproxy.acme import commands

    config = _load(args.config, err)
    return BAD_CONFIG if config is None else commands.renew(config, args.name, args.force, out, err=err)


def cmd_revoke(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from tlsproxy.acme import commands

    config = _load(args.config, err)
    return BAD_CONFIG if config is None else commands.revoke(config, args.name, args.reason, out, err=err)


def cmd_account(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from tlsproxy.acme import commands

    config = _load(args.config, err)
    return BAD_CONFIG if config is None else commands.account_rollover(config, out, err=err)


def cmd_ca(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from tlsproxy import devca

    if args.action == "path":
        return devca.ca_path(os.environ, out)
    wanted = {s.strip() for s in args.stores.split(",") if s.strip()}
    unknown = wanted - {"nss", "system"}
    if unknown:
        print(f"tlsproxy: --stores: unknown store {', '.join(sorted(unknown))} (nss, system)", file=err)
        return BAD_CONFIG
    stores = devca.TrustStores(nss="nss" in wanted, system="system" in wanted)
    action = devca.ca_install if args.action == "install" else devca.ca_uninstall
    return int(action(os.environ, out, stores=stores))


def cmd_passwd(args: argparse.Namespace, out: TextIO, err: TextIO, stdin: TextIO | None = None) -> int:
    """Add or change a user's bcrypt line in an htpasswd file (for basic_auth)."""
    import getpass
    import warnings

    from tlsproxy.passwd import PasswdError, set_password

    try:
        if args.stdin:
            password = (stdin or sys.stdin).readline().rstrip("\r\n")
        else:
            with warnings.catch_warnings():  # no terminal: getpass would echo the password, then fail
                warnings.simplefilter("error", getpass.GetPassWarning)
                password = getpass.getpass(f"password for {args.user}: ")
                if getpass.getpass("again: ") != password:
                    print("tlsproxy: the passwords differ; nothing changed", file=err)
                    return BAD_CONFIG
    except getpass.GetPassWarning:
        print(
            f"tlsproxy: no terminal to ask the password on: pipe it in with --stdin"
            f" (tlsproxy passwd {args.file} {args.user} --stdin); nothing changed",
            file=err,
        )
        return BAD_CONFIG
    except (EOFError, KeyboardInterrupt):
        print("\ntlsproxy: no password given; nothing changed", file=err)
        return BAD_CONFIG
    try:
        existed = set_password(
            args.file, args.user, password.encode("utf-8"), args.cost, 0o640 if args.group_readable else 0o600
        )
    except PasswdError as e:
        print(f"tlsproxy: {e}", file=err)
        return BAD_CONFIG
    except OSError as e:
        print(f"tlsproxy: cannot write {args.file}: {e.strerror}", file=err)
        return BAD_CONFIG
    print(
        f"{'changed' if existed else 'added'} {args.user} in {args.file}; reload tlsproxy (SIGHUP) to use it", file=out
    )
    return OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlsproxy", description="TLS front door for Python web apps.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", default=None, help="TOML configuration file (default: $TLSPROXY_CONFIG)")
        return p

    p = with_config(sub.add_parser("check", help="validate a configuration and print what would run"))
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("dev", help="run the local HTTPS dev proxy (https://localhost:8443)")
    p.add_argument("--upstream", help=f"your app's URL (default {configuration.DEFAULT_DEV_UPSTREAM})")
    p.add_argument(
        "--listen",
        action="append",
        help="a port or server endpoint string, repeatable; with no interface= it stays on localhost (default 8443)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warn", "error"],
        help="debug also shows failed handshakes (a browser that does not trust the CA yet)",
    )
    p.set_defaults(func=cmd_dev)
    p = sub.add_parser("ca", help="the local development CA: where it is, trust it, untrust it")
    p.add_argument("action", choices=["path", "install", "uninstall"])
    p.add_argument(
        "--stores",
        default="nss,system",
        help="trust stores to change: nss (Chromium, Firefox) and/or system (default: nss,system)",
    )
    p.set_defaults(func=cmd_ca)
    p = with_config(sub.add_parser("certs", help="list certificates: hosts, source, not-after, next renewal"))
    p.set_defaults(func=cmd_certs)
    p = with_config(sub.add_parser("renew", help="renew a site's certificate now if due (or --force)"))
    p.add_argument("name", help="any host of the site")
    p.add_argument("--force", action="store_true", help="renew even if not due")
    p.set_defaults(func=cmd_renew)
    p = with_config(sub.add_parser("revoke", help="revoke a site's certificate, then obtain a fresh one"))
    p.add_argument("name", help="any host of the site")
    p.add_argument(
        "--reason",
        default="unspecified",
        choices=["unspecified", "keyCompromise", "superseded", "cessationOfOperation"],
    )
    p.set_defaults(func=cmd_revoke)
    p = with_config(sub.add_parser("account", help="ACME account: rollover (RFC 8555 key change)"))
    p.add_argument("action", choices=["rollover"])
    p.set_defaults(func=cmd_account)
    p = sub.add_parser("passwd", help="add or change a user in an htpasswd file (bcrypt, for basic_auth)")
    p.add_argument("file", help="the htpasswd file (created if missing)")
    p.add_argument("user")
    p.add_argument("--stdin", action="store_true", help="read the password from the first line of stdin")
    p.add_argument("--cost", type=int, default=12, choices=range(4, 16), metavar="4..15", help="bcrypt cost (12)")
    p.add_argument("--group-readable", action="store_true", help="create the file 0640 rather than 0600")
    p.set_defaults(func=cmd_passwd)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args, out, err))


if __name__ == "__main__":
    raise SystemExit(main())

"""What the machine must offer a valid configuration: a writable state_dir, the app's socket.

:mod:`tlsproxy.config` decides what a configuration means; this module asks
whether this process, as the user it runs as, can use it here.  ``tlsproxy
check`` and ``twist tlsproxy`` both ask before they start, so a state
directory the service user cannot write is one line at start-up, not a
traceback at the first renewal.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from tlsproxy.certs.store_url import redact_url
from tlsproxy.config import Config, ConfigError, Problem, Upstream, available_cpus, dev_app_hint
from tlsproxy.proxy.access import load_all


def _user() -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
    except (ImportError, KeyError):  # pragma: no cover - no pwd entry (a container's arbitrary uid)
        return f"uid {os.geteuid()}"


def state_dir_problem(path: str) -> str | None:
    """Why this process cannot keep its ACME account, keys and certificates in ``path``, or None."""
    root = Path(path)
    try:
        return _state_dir_problem(root, path)
    except OSError as e:  # a parent this user may not even look into
        return f"{e.filename or path}: {e.strerror} for {_user()}"


def _state_dir_problem(root: Path, path: str) -> str | None:
    if not root.exists():
        parent = root.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"{path} does not exist, and {_user()} cannot create it in {parent}"
        return None
    if not root.is_dir():
        return f"{path} is not a directory"
    unusable: list[str] = []
    for directory, _, _ in os.walk(root, onerror=lambda e: unusable.append(str(e.filename))):
        if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
            unusable.append(directory)
    if unusable:
        where = unusable[0] + (f" (and {len(unusable) - 1} more)" if len(unusable) > 1 else "")
        return (
            f"{where} is not writable by {_user()}, which keeps the ACME account, keys and certificates"
            f" there: give {path} to that user (chown -R; systemd's StateDirectory= does it) or set another state_dir"
        )
    return None


def access_log_problem(path: str) -> str | None:
    """Why this process could not write its access log to ``path``, or None: else every line is lost."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path} is a directory: name a file in it"
    if not os.path.isdir(directory):
        return f"{directory} does not exist: create it (mkdir -p {directory}, writable by {_user()})"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else f"{_user()} may not write {path}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{_user()} may not create {path} in {directory}"
    return None


def problems(config: Config) -> list[Problem]:
    """What stops this configuration from running here (only ACME sites need state_dir)."""
    found = []
    if any(site.tls == "acme" for site in config.sites):
        why = state_dir_problem(config.server.state_dir)
        if why:
            found.append(Problem(config.source, "server.state_dir", why))
    if config.server.access_log_file:
        why = access_log_problem(config.server.access_log_file)
        if why:
            found.append(Problem(config.source, "server.access_log_file", why))
    try:  # the htpasswd files of basic_auth, named with the keys that name them
        load_all(config.sites, config.source)
    except ConfigError as e:
        found.extend(e.problems)
    return found


def store_findings(
    config: Config, environ: Mapping[str, str] | None = None, ping: Callable[[], object] | None = None
) -> tuple[list[Problem], list[str]]:
    """Whether the fleet's Redis lets us in, for ``tlsproxy check`` (a network round trip: never at start-up).

    Refused credentials (or any other answer than PONG) are a problem: they stay wrong until
    the URL is fixed.  An unreachable store is a warning: a fleet starts and serves without it.
    """
    if not config.store.shared:
        return [], []
    import redis

    environ = os.environ if environ is None else environ
    where = "environment TLSPROXY_STORE_URL" if environ.get("TLSPROXY_STORE_URL") else config.source
    url = config.store.url
    if ping is None:
        ping = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping
    shown = redact_url(url)
    try:
        ping()
    except redis.exceptions.AuthenticationError as e:  # a ConnectionError to redis-py: first
        why = (
            f"{shown} refuses our credentials ({e}):"
            " fix the password (or user) in the URL, redis://[USER]:PASSWORD@HOST:PORT/DB"
        )
        return [Problem(where, "store.url", why)], []
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
        why = (
            f"{shown} is unreachable from here ({e}): the proxy starts all the same and serves"
            " the certificates it has; renewals wait for the store"
        )
        return [], [f"{where}: store.url: {why}"]
    except redis.exceptions.RedisError as e:  # NOPERM, a database index out of range...
        return [Problem(where, "store.url", f"{shown} answers with an error: {e}")], []
    return [], []


def _connect(upstream: Upstream, timeout: float) -> None:
    if upstream.is_unix:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(upstream.unix_path)
    else:
        socket.create_connection((upstream.host, upstream.port), timeout=timeout).close()


def upstream_warnings(
    config: Config, connect: Callable[[Upstream, float], None] = _connect, timeout: float = 1.0
) -> list[str]:
    """Apps that take no connection now, for ``tlsproxy check`` (it connects: never at start-up).

    A missing socket file is said by :func:`warnings` already; this finds the app that is
    not running (a refused port, a stale socket file) before the first request gets a 502.
    """
    found = []
    for index, site in enumerate(config.sites):
        groups = [(f"site[{index}].upstream", site.upstreams)]
        groups += [(f'site[{index}].routes."{r.prefix}"', r.upstreams) for r in site.routes]
        for key, upstreams in groups:
            for upstream in upstreams:
                if upstream.is_unix and not os.path.exists(upstream.unix_path):
                    continue
                try:
                    connect(upstream, timeout)
                except TimeoutError:
                    why = f"no answer within {timeout:g}s"
                except OSError as e:
                    why = e.strerror or str(e)
                else:
                    continue
                others = " (the others take its requests)" if len(upstreams) > 1 else ""
                then = f": {dev_app_hint(upstream)}" if config.dev else ""  # runserver, for a newcomer
                found.append(
                    f"{config.source}: {key}: {upstream.url} takes no connection now ({why}): its requests"
                    f" get 502 until the app listens there{others}{then}"
                )
    return found


def static_warnings(config: Config) -> list[str]:
    """A static directory that is not there (yet): its files are 404 until collectstatic runs."""
    found = []
    for index, site in enumerate(config.sites):
        for mount in site.static:
            key = f'site[{index}].static."{mount.prefix}"'
            if not os.path.isdir(mount.root):
                why = "is not a directory" if os.path.exists(mount.root) else "does not exist (yet)"
                found.append(f"{config.source}: {key}: {mount.root} {why}: {mount.prefix} answers 404 until it does")
            elif not os.access(mount.root, os.R_OK | os.X_OK):
                found.append(f"{config.source}: {key}: {_user()} may not read {mount.root}")
    return found


def workers_warning(config: Config, cpus: int | None = None) -> str | None:
    """More workers than CPUs only add memory and context switches (workers = 100000 forks that many)."""
    cpus = available_cpus() if cpus is None else cpus
    workers = config.server.workers
    if workers <= cpus:
        return None
    return (
        f"{config.source}: server.workers: {workers} workers for the {cpus} CPU(s) this process may use:"
        ' the extra ones add memory and context switches, not speed; "auto" runs one per CPU'
    )


def warnings(config: Config) -> list[str]:
    """What may be fine at start-up but worth a look: an app socket that is not there (yet)."""
    found = static_warnings(config)
    too_many = workers_warning(config)
    if too_many:
        found.append(too_many)
    for index, site in enumerate(config.sites):
        for path in [u.unix_path for u in site.upstreams if u.unix_path]:
            _check_socket(found, f"{config.source}: site[{index}].upstream", path)
        for route in site.routes:  # Channels under daphne on a socket, say
            for path in [u.unix_path for u in route.upstreams if u.unix_path]:
                _check_socket(found, f'{config.source}: site[{index}].routes."{route.prefix}"', path)
    return found


def _check_socket(found: list[str], where: str, path: str) -> None:
    """An app's unix socket that is missing, not a socket, or not ours to connect to."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        found.append(
            f"{where}: {path} does not exist (yet): requests get 502 until the app"
            " listens there (gunicorn --bind unix:PATH, or gunicorn.socket with socket activation)"
        )
        return
    except OSError as e:
        found.append(f"{where}: cannot reach {path}: {e.strerror}")
        return
    if not stat.S_ISSOCK(mode):
        found.append(f"{where}: {path} is not a unix socket")
    elif not os.access(path, os.R_OK | os.W_OK):
        found.append(f"{where}: {_user()} may not connect to {path} (it needs write access)")

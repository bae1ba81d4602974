"""``[store] url``: what a Redis URL may say, and how it is shown without its password (pure)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

SCHEMES = ("redis", "rediss", "unix")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: what logs and messages may show."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<a store URL that cannot be parsed>"
    return urlunsplit((parts.scheme, f"{user}:***@{host}{port}", parts.path, parts.query, parts.fragment))


def check_store_url(url: str) -> str | None:
    """Why ``url`` is no Redis URL we can use, or None; the reason never quotes a password."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"cannot be read as a URL ({e})"
    if parts.scheme not in SCHEMES:
        return f'expected "redis://HOST:PORT/DB", "rediss://..." (TLS) or "unix:///PATH", found {redact_url(url)!r}'
    if parts.scheme == "unix":
        return None if parts.path.startswith("/") else "a unix:// URL needs an absolute socket path"
    if not parts.hostname:
        return f"no host in {redact_url(url)!r}"
    if port == 0:
        return "port 0 is no Redis port"
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        return f"the database is a number (redis://HOST:PORT/0), found {db!r}"
    return None

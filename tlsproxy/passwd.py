"""``tlsproxy passwd FILE USER``: add or change a bcrypt line in an htpasswd file, atomically.

The file is what ``htpasswd -B`` writes and what ``basic_auth.htpasswd``
reads.  It is rewritten through a temporary file in the same directory and
renamed over the old one, so a running proxy (reloading on SIGHUP) never
reads half a file.  A new file is 0600 (0640 with ``--group-readable``, for
a proxy that runs as another user of the file's group); an existing file
keeps its mode and owner.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import bcrypt

from tlsproxy.proxy.access import BCRYPT_MAX

DEFAULT_COST = 12


class PasswdError(Exception):
    """What is wrong with the user name, the password or the file."""


def check_user(user: str) -> None:
    if not user or ":" in user or any(not c.isprintable() for c in user) or user != user.strip():
        raise PasswdError(f"{user!r}: a user name is printable, without ':' or surrounding spaces")


def check_password(password: bytes) -> None:
    if not password:
        raise PasswdError("the password is empty")
    if len(password) > BCRYPT_MAX:
        raise PasswdError(f"the password is longer than {BCRYPT_MAX} bytes, all bcrypt reads")


def updated(text: str, user: str, line: str) -> tuple[str, bool]:
    """``text`` with ``user``'s line replaced by ``line`` (or added); True if it was there."""
    out, found = [], False
    for existing in text.splitlines():
        if existing.partition(":")[0] == user and not existing.lstrip().startswith("#"):
            if not found:
                out.append(line)
            found = True
        else:
            out.append(existing)
    if not found:
        out.append(line)
    return "\n".join(out) + "\n", found


def set_password(path: str, user: str, password: bytes, cost: int = DEFAULT_COST, mode: int = 0o600) -> bool:
    """Write ``user``'s bcrypt line into ``path``; True if the user was there before."""
    check_user(user)
    check_password(password)
    hashed = bcrypt.hashpw(password, bcrypt.gensalt(cost)).decode("ascii")
    target = Path(path)
    try:
        text = target.read_text(encoding="utf-8")
        st = target.stat()
    except FileNotFoundError:
        text, st = "", None
    except (OSError, UnicodeDecodeError) as e:
        raise PasswdError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    new_text, existed = updated(text, user, f"{user}:{hashed}")
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), (st.st_mode & 0o777) if st is not None else mode)
            if st is not None and os.geteuid() == 0:
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
            f.write(new_text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return existed

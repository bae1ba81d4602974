"""Who may reach a site or a path prefix: IP allow / deny lists and HTTP basic auth (bcrypt).

The same gate turns requests away while a site is in maintenance (503, see
errorpages.py); ACME HTTP-01 paths pass both.

The decisions are plain functions (which rule covers a path, whether an
address passes, what an Authorization header says); :class:`AccessControl`
is the thin part the proxy calls once per request of a restricted site.

- Paths are matched after percent-decoding and dot-segment removal:
  ``/%61dmin/`` and ``/static/../admin/`` are ``/admin/``.  gunicorn and
  Django keep dot segments, though (``/admin/../x`` is routed under
  ``admin/``), so the path as decoded once is matched too: a path whose two
  readings fall under different rules gets 400, and only a path that is an
  ACME one both ways is exempt.  ``/admin`` falls under a ``/admin/`` rule too.
- ``deny`` wins over ``allow``; a non-empty ``allow`` lets only its ranges
  in.  Refused addresses get 403; a missing or wrong password 401 with the
  realm.  ACME HTTP-01 paths are never restricted (a CA must reach them).
- bcrypt is slow on purpose (tens of milliseconds): checks run in the
  reactor's thread pool, at most :data:`MAX_RUNNING` at once so they never
  take the threads request buffering needs, with at most
  :data:`MAX_QUEUED` waiting (then 503).  A success is remembered for
  :data:`CACHE_SECONDS` under a SHA-256 of user, hash and password (the
  password itself is never kept), so a browser's every request does not
  cost a thread.
- Once basic auth let a request in, its ``Authorization`` header is taken
  off before the app sees it (the app has no use for the proxy's password,
  and its logs or error reports should never hold it), unless the rule says
  ``pass_authorization = true``.  Other rules' Authorization (an API's
  bearer token on a rule without basic auth) passes untouched.
- Password guessing is slowed per client address (an IPv6 client per /64,
  the block one host usually holds) and realm: after ``auth_fail_limit``
  wrong passwords within ``auth_fail_window`` seconds, :class:`GuessLimit`
  answers 429 with Retry-After until that window ends, before any bcrypt
  check and whatever the password (a limited client costs no thread, and
  learns nothing, not even from the success cache).  Checks still running
  count against the limit, so a burst of parallel guesses is cut at the
  limit too.  A success resets no counter (a client with one account of its
  own could otherwise guess the others' between its logins); failures simply
  age out.  At most :data:`GUESS_CLIENTS` clients are tracked, the least
  recently seen forgotten first.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import bcrypt
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from tlsproxy.config import AccessRule, BasicAuth, ConfigError, Network, Problem, Server, Site
from tlsproxy.http import pages
from tlsproxy.http.exchange import Exchange
from tlsproxy.proxy.errorpages import ErrorPages

ACME_PREFIX = b"/.well-known/acme-challenge/"
MAX_RUNNING = 2
MAX_QUEUED = 64
CACHE_SECONDS = 60.0
CACHE_ENTRIES = 4096
GUESS_CLIENTS = 10000
BCRYPT_PREFIXES = (b"$2y$", b"$2b$", b"$2a$")
# bcrypt reads at most 72 bytes of a password; htpasswd -B cuts it there, so do we.
BCRYPT_MAX = 72
# Checked for an unknown user of an empty file (otherwise another user's hash is, so
# that the answer takes as long as a wrong password's).
_DUMMY_HASH = b"$2b$05$fANfyjDUELMU6.6xf9WpiOsQNPfeOEc8Aco9pDBLVBURiwnL6UaSK"

# Not "tlsproxy.access": that namespace is the access log's records (tlsproxy/logs.py).
log = Logger(namespace="tlsproxy.auth")


class HtpasswdError(Exception):
    """An htpasswd file that cannot be used: ``path``, ``line`` (1-based, 0: the file) and ``reason``."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}" if line else f"{path}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


def parse_htpasswd(text: str, path: str) -> dict[str, bytes]:
    """user -> bcrypt hash from ``htpasswd -B`` lines; blank lines and # comments are skipped."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise HtpasswdError(path, number, "expected USER:HASH")
        digest = hashed.encode("ascii", "replace")
        if not digest.startswith(BCRYPT_PREFIXES) or len(digest) != 60:
            raise HtpasswdError(
                path, number, f"{user}: only bcrypt hashes are accepted (htpasswd -B, or tlsproxy passwd)"
            )
        users[user] = digest
    return users


def load_htpasswd(path: str) -> dict[str, bytes]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise HtpasswdError(path, 0, f"cannot read it: {e.strerror}") from None
    except UnicodeDecodeError:
        raise HtpasswdError(path, 0, "not UTF-8 text") from None
    return parse_htpasswd(text, path)


def htpasswd_files(sites: Iterable[Site]) -> set[str]:
    return {rule.basic_auth.htpasswd for site in sites for rule in site.access if rule.basic_auth is not None}


def htpasswd_keys(sites: Iterable[Site]) -> dict[str, list[str]]:
    """Each htpasswd file and the config keys that name it, as config errors name keys.

    A ``[[site.access]]`` table is named by its prefix: the rules are kept longest
    prefix first, not in the file's order.  A table that inherits the site's
    ``basic_auth`` is the site's key.
    """
    keys: dict[str, list[str]] = {}
    for index, site in enumerate(sites):
        base = next((rule.basic_auth for rule in site.access if rule.prefix == "/"), None)
        for rule in site.access:
            if rule.basic_auth is None:
                continue
            if rule.prefix == "/" or rule.basic_auth is base:
                key = f"site[{index}].basic_auth.htpasswd"
            else:
                key = f'site[{index}].access (prefix "{rule.prefix}").basic_auth.htpasswd'
            named = keys.setdefault(rule.basic_auth.htpasswd, [])
            if key not in named:
                named.append(key)
    return keys


def load_all(sites: Iterable[Site], source: str = "") -> dict[str, dict[str, bytes]]:
    """Every htpasswd file the sites name; a ConfigError names each one that cannot be used.

    Given the config's ``source``, each problem says the file and keys that named
    the htpasswd file, as every other config error does.
    """
    users, problems = {}, []
    keys = htpasswd_keys(sites)
    for path in sorted(keys):
        try:
            users[path] = load_htpasswd(path)
        except HtpasswdError as e:
            if source:
                where = f"{e.path}: line {e.line}: {e.reason}" if e.line else f"{e.path}: {e.reason}"
                problems.append(Problem(source, ", ".join(keys[path]), where))
            else:
                problems.append(Problem(e.path, f"line {e.line}" if e.line else "", e.reason))
    if problems:
        raise ConfigError(problems)
    return users


# -- the decisions -------------------------------------------------------------


def _unquote_all(data: bytes, rounds: int = 3) -> bytes:
    """Percent-decode until nothing changes (at most 3 rounds): a rule errs on the side of covering."""
    for _ in range(rounds):
        if b"%" not in data:
            break
        out = bytearray()
        i = 0
        while i < len(data):
            if data[i] == 0x25 and _is_hex(data[i + 1 : i + 3]):
                out.append(int(data[i + 1 : i + 3], 16))
                i += 3
            else:
                out.append(data[i])
                i += 1
        if bytes(out) == data:
            break
        data = bytes(out)
    return data


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def _target_path(target: bytes) -> bytes:
    """The path of ``target``, still encoded: no query, fragment, scheme or authority."""
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    if not path.startswith(b"/"):
        # absolute-form (http://host/path) or asterisk-form
        path = b"/" + path.split(b"://", 1)[1].partition(b"/")[2] if b"://" in path else b"/"
    return path


def literal_path(target: bytes) -> bytes:
    """The path as gunicorn hands it to Django: decoded once, dot and empty segments kept.

    Django routes by this: ``/private/x/../../public`` reaches a
    ``private/<path:rest>`` view.  A rule must cover it as well as the
    normalised :func:`request_path`.
    """
    path = _target_path(target)
    return _unquote_all(path, rounds=1) if b"%" in path else path


def request_path(target: bytes) -> bytes:
    """The path normalised: decoded, without dot segments or empty segments."""
    path = _unquote_all(_target_path(target))
    out: list[bytes] = []
    parts = path.split(b"/")
    for part in parts:
        if part in (b"", b"."):
            continue
        if part == b"..":
            if out:
                out.pop()
            continue
        out.append(part)
    trailing = parts[-1] in (b"", b".", b"..") and bool(out)
    return b"/" + b"/".join(out) + (b"/" if trailing else b"")


def rule_for(rules: Sequence[AccessRule], path: bytes) -> AccessRule | None:
    """The rule of the longest prefix covering ``path`` (``rules`` longest first); ``/admin`` is under ``/admin/``."""
    for rule in rules:
        prefix = rule.prefix.encode()
        if path.startswith(prefix) or path == prefix[:-1]:
            return rule
    return None


def address_allowed(rule: AccessRule, address: str) -> bool:
    """``deny`` wins; then a non-empty ``allow`` must hold the address."""
    if not (rule.allow or rule.deny):
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # not an IP address (a unix socket peer): no list can vouch for it
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    if _within(ip, rule.deny):
        return False
    return not rule.allow or _within(ip, rule.allow)


def _within(ip: Any, nets: Sequence[Network]) -> bool:
    return any(ip.version == net.version and ip in net for net in nets)


def basic_credentials(header: bytes | None) -> tuple[str, bytes] | None:
    """(user, password) from ``Authorization: Basic ...``, or None if absent or malformed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


def challenge(auth: BasicAuth) -> list[tuple[bytes, bytes]]:
    return [(b"WWW-Authenticate", b'Basic realm="%s", charset="UTF-8"' % auth.realm.encode("ascii"))]


# -- the password checks -------------------------------------------------------


RunInThread = Callable[..., "Deferred[Any]"]
Record = Callable[[int, int], None]  # status, bytes sent: the access log line and the count


def check_password(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password[:BCRYPT_MAX], hashed)
    except ValueError:  # a hash bcrypt cannot read
        return False


class Verifier:
    """bcrypt checks off the reactor, a few at a time, with successes remembered briefly."""

    def __init__(self, clock: Any, run: RunInThread) -> None:
        self.clock = clock
        self.run = run
        self.running = 0
        self.queue: deque[tuple[bytes, bytes, bytes, Deferred[bool]]] = deque()
        self.cache: dict[bytes, float] = {}

    def verify(self, user: str, password: bytes, users: dict[str, bytes]) -> Deferred[bool] | Literal[True] | None:
        """True now (a cached success), a Deferred, or None when too many checks wait."""
        hashed = users.get(user)
        key = hashlib.sha256(b"\0".join((user.encode(), hashed or b"", password))).digest()
        until = self.cache.get(key)
        if until is not None:
            if self.clock.seconds() < until:
                return True
            del self.cache[key]
        if len(self.queue) >= MAX_QUEUED:
            return None
        done: Deferred[bool] = Deferred()
        if hashed is None:
            self.queue.append((b"", password, next(iter(users.values()), _DUMMY_HASH), done))
            done.addCallback(lambda _: False)
        else:
            self.queue.append((key, password, hashed, done))
        self._next()
        return done

    def _next(self) -> None:
        while self.running < MAX_RUNNING and self.queue:
            key, password, hashed, done = self.queue.popleft()
            self.running += 1
            self.run(check_password, password, hashed).addBoth(self._checked, key, done)

    def _checked(self, result: Any, key: bytes, done: Deferred[bool]) -> None:
        self.running -= 1
        ok = result is True
        if ok and key:
            if len(self.cache) >= CACHE_ENTRIES:
                self.cache.clear()
            self.cache[key] = self.clock.seconds() + CACHE_SECONDS
        elif not isinstance(result, bool):
            log.failure("bcrypt check failed", result)
        self._next()
        done.callback(ok)


# -- slowing down guesses --------------------------------------------------------


def client_key(address: str) -> str:
    """Whose guesses these are: an IPv4 address, an IPv6 client's /64, or the peer as given (a unix socket)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


GuessKey = tuple[str, BasicAuth]  # client_key, and the realm (with its htpasswd file) guessed at


@dataclass(slots=True)
class _Tally:
    """One client's wrong passwords in its current window, and its checks still running."""

    start: float
    failures: int = 0
    running: int = 0


class GuessLimit:
    """At most ``limit`` wrong passwords per client and realm in ``window`` seconds; then wait till it ends.

    Fixed windows, opened by a client's first failure: two numbers per
    client whatever the limit, at worst twice the limit across a window's edge.
    """

    def __init__(self, clock: Any, limit: int, window: float, max_clients: int = GUESS_CLIENTS) -> None:
        self.clock = clock
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self.tallies: OrderedDict[GuessKey, _Tally] = OrderedDict()

    def wait(self, key: GuessKey) -> float:
        """Seconds ``key`` must wait before its next check; 0: check now."""
        tally = self.tallies.get(key)
        if tally is None:
            return 0.0
        now = self.clock.seconds()
        if tally.failures and not tally.start <= now < tally.start + self.window:
            tally.failures = 0  # the window has passed (or the clock went back)
        if tally.failures >= self.limit:
            return tally.start + self.window - now
        if tally.failures + tally.running >= self.limit:
            return 1.0  # checks already running may use up the window: known within a second
        if not tally.failures and not tally.running:
            del self.tallies[key]
        return 0.0

    def started(self, key: GuessKey) -> None:
        """A check for ``key`` is on its way to a thread."""
        tally = self._tally(key)
        tally.running += 1

    def checked(self, key: GuessKey, ok: bool) -> None:
        """A check for ``key`` came back: a failure counts in the window."""
        tally = self.tallies.get(key)
        if tally is None:  # forgotten meanwhile (many clients): a failure still counts
            if ok:
                return
            tally = self._tally(key)
        else:
            self.tallies.move_to_end(key)
        tally.running = max(tally.running - 1, 0)
        if ok:
            return
        now = self.clock.seconds()
        if not tally.failures or not tally.start <= now < tally.start + self.window:
            tally.start, tally.failures = now, 0
        tally.failures += 1
        if tally.failures == self.limit:
            log.warn(
                "{client}: {count} wrong passwords for realm {realm!r} within {window:g}s; "
                "answered 429 until the window ends",
                client=key[0],
                count=tally.failures,
                realm=key[1].realm,
                window=self.window,
            )

    def _tally(self, key: GuessKey) -> _Tally:
        tally = self.tallies.get(key)
        if tally is None:
            tally = self.tallies[key] = _Tally(self.clock.seconds())
            while len(self.tallies) > self.max_clients:
                self.tallies.popitem(last=False)
        else:
            self.tallies.move_to_end(key)
        return tally


@dataclass
class _Waiting:
    """A request whose password is being checked: its client may leave meanwhile."""

    gone: bool = False

    def client_gone(self) -> None:
        self.gone = True


class AccessControl:
    """Applies a site's access rules to each request before it is dispatched."""

    def __init__(
        self,
        sites: Iterable[Site],
        clock: Any,
        run: RunInThread,
        pages: ErrorPages | None = None,
        server: Server | None = None,
    ) -> None:
        # Read at start and reload (small files), never per request.
        self.users = load_all(sites)
        self.verifier = Verifier(clock, run)
        self.pages = pages
        server = server or Server()
        self.guesses: GuessLimit | None = None
        if server.auth_fail_limit:
            self.guesses = GuessLimit(clock, server.auth_fail_limit, server.auth_fail_window)

    def adopt(self, old: AccessControl) -> None:
        """Keep counting the guesses ``old`` counted (a reload must not wipe a guesser's slate)."""
        if self.guesses is not None and old.guesses is not None:
            self.guesses.tallies = old.guesses.tallies

    def admit(self, site: Site, exchange: Exchange, proceed: Callable[[], None], record: Record) -> bool:
        """True: go on now.  False: answered here (403, 401, 503), or ``proceed`` is called once checked."""
        target = exchange.head.target
        path = request_path(target)
        # The app routes the literal path (dot segments kept): both readings must agree,
        # or /app/../.well-known/acme-challenge/x would reach /app/ past every rule.
        literal = literal_path(target) if b"." in target or b"%" in target or b"//" in target else path
        if path.startswith(ACME_PREFIX) and literal.startswith(ACME_PREFIX):
            return True
        if self.pages is not None and self.pages.in_maintenance(site):
            record(503, self.pages.send_maintenance(exchange, site))
            return False
        rule = rule_for(site.access, path)
        if literal != path and rule_for(site.access, literal) is not rule:
            # A path whose readings fall under different rules: no answer is safe but a refusal.
            record(400, pages.send(exchange, 400, "Dot segments or encodings in this path cross an access rule."))
            return False
        if rule is None:
            return True
        if not address_allowed(rule, exchange.client_address):
            record(403, pages.send(exchange, 403))
            return False
        auth = rule.basic_auth
        if auth is None:
            return True
        credentials = basic_credentials(exchange.head.get(b"authorization"))
        if credentials is None:
            self._unauthorized(exchange, auth, record)
            return False
        guesses = self.guesses
        key: GuessKey | None = None
        if guesses is not None:
            key = (client_key(exchange.client_address), auth)
            wait = guesses.wait(key)
            if wait > 0:
                slow = "Too many wrong passwords from your address. Please wait before you try again."
                retry = b"%d" % max(math.ceil(wait), 1)
                record(429, pages.send(exchange, 429, slow, [(b"Retry-After", retry)]))
                return False
        user, password = credentials
        result = self.verifier.verify(user, password, self.users.get(auth.htpasswd, {}))
        if result is True:
            self._let_in(exchange, rule)
            return True
        if result is None:
            busy = "Too many password checks are waiting. Please try again."
            record(503, pages.send(exchange, 503, busy, [(b"Retry-After", b"1")]))
            return False
        if guesses is not None and key is not None:
            guesses.started(key)
            result.addCallback(self._counted, guesses, key)
        waiting = _Waiting()
        exchange.set_observer(waiting)
        result.addCallback(self._checked, exchange, rule, auth, waiting, proceed, record)
        return False

    @staticmethod
    def _counted(ok: bool, guesses: GuessLimit, key: GuessKey) -> bool:
        guesses.checked(key, ok)
        return ok

    @staticmethod
    def _let_in(exchange: Exchange, rule: AccessRule) -> None:
        """The password was right: the app gets the request, without it unless the rule passes it on."""
        if not rule.pass_authorization:
            head = exchange.head
            head.headers = [field for field in head.headers if field[0] != b"authorization"]

    def _checked(
        self,
        ok: bool,
        exchange: Exchange,
        rule: AccessRule,
        auth: BasicAuth,
        waiting: _Waiting,
        proceed: Callable[[], None],
        record: Record,
    ) -> None:
        if waiting.gone:
            record(499, 0)
            return
        if ok:
            self._let_in(exchange, rule)
            proceed()
        else:
            self._unauthorized(exchange, auth, record)

    def _unauthorized(self, exchange: Exchange, auth: BasicAuth, record: Record) -> None:
        record(401, pages.send(exchange, 401, headers=challenge(auth)))

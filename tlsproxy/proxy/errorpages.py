"""A site's own pages for 502, 503 and 504, and its maintenance switch.

Pages are read when the configuration is loaded (start and SIGHUP), never
per request; ``{request_id}`` in a page becomes the request's id, so a user
can quote it.  Maintenance mode is a file whose presence turns it on: the
file is looked for once a second in the thread pool (a stat on a stalled
disk must not stall the reactor), and the answer is kept in a set the
request path reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from tlsproxy.config import ConfigError, Problem, Site
from tlsproxy.http import pages
from tlsproxy.http.exchange import Exchange

MAX_PAGE = 1024 * 1024
POLL_SECONDS = 1.0
MAINTENANCE_MESSAGE = "This site is down for maintenance. Please try again in a few minutes."

log = Logger(namespace="tlsproxy.errorpages")
RunInThread = Callable[..., "Deferred[Any]"]


def load_pages(sites: Iterable[Site]) -> dict[str, dict[int, bytes]]:
    """site name -> status -> page; a ConfigError names each file that cannot be used."""
    found: dict[str, dict[int, bytes]] = {}
    problems = []
    for site in sites:
        for status, path in site.error_pages:
            try:
                size = os.stat(path).st_size
                if size > MAX_PAGE:
                    problems.append(Problem(path, "", f"an error page of {size} bytes (at most {MAX_PAGE})"))
                    continue
                found.setdefault(site.name, {})[status] = Path(path).read_bytes()
            except OSError as e:
                problems.append(Problem(path, "", f"cannot read the {status} page: {e.strerror}"))
    if problems:
        raise ConfigError(problems)
    return found


def _which_exist(paths: list[str]) -> set[str]:
    """In a thread: the paths that exist now."""
    return {path for path in paths if os.path.exists(path)}


class ErrorPages:
    """Answers with a site's own page when it has one; knows which sites are in maintenance."""

    def __init__(self, sites: Iterable[Site], run: RunInThread) -> None:
        sites = list(sites)
        self.pages = load_pages(sites)
        self.run = run
        self.maintenance = {site.name: site.maintenance_file for site in sites if site.maintenance_file}
        self.down: set[str] = set()  # sites whose maintenance file exists
        self._polling = False

    def send(
        self,
        exchange: Exchange,
        site: Site,
        status: int,
        message: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> int:
        """Answer ``exchange`` with ``status``: the site's page for it if there is one, else ours; its size."""
        page = self.pages.get(site.name, {}).get(status) if self.pages else None
        if page is None:
            return pages.send(exchange, status, message, headers)
        request_id = getattr(exchange, "request_id", "")
        body = page.replace(b"{request_id}", request_id.encode("ascii", "replace"))
        fields = [(b"Content-Type", b"text/html; charset=utf-8"), (b"Cache-Control", b"no-store"), *(headers or [])]
        if request_id:
            fields.append((b"X-Request-ID", request_id.encode("ascii", "replace")))
        exchange.start_response(status, pages.REASONS.get(status, b"Error"), fields, len(body))
        exchange.write(body)
        exchange.finish()
        return len(body)

    def in_maintenance(self, site: Site) -> bool:
        return site.name in self.down

    def send_maintenance(self, exchange: Exchange, site: Site) -> int:
        return self.send(exchange, site, 503, MAINTENANCE_MESSAGE, [(b"Retry-After", b"60")])

    def poll(self) -> None:
        """Look for the maintenance files (in a thread); one look at a time."""
        if self._polling or not self.maintenance:
            return
        self._polling = True
        self.run(_which_exist, sorted(set(self.maintenance.values()))).addBoth(self._looked)

    def _looked(self, result: Any) -> None:
        self._polling = False
        if not isinstance(result, set):
            log.warn("cannot look for maintenance files: {error}", error=result.getErrorMessage())
            return
        down = {name for name, path in self.maintenance.items() if path in result}
        for name in down - self.down:
            log.info("site {site}: maintenance mode on ({path} exists): 503", site=name, path=self.maintenance[name])
        for name in self.down - down:
            log.info("site {site}: maintenance mode off", site=name)
        self.down = down

    def watcher(self, clock: Any) -> TimerService | None:
        """The service that polls the maintenance files, or None if no site has one."""
        if not self.maintenance:
            return None
        service = TimerService(POLL_SECONDS, self.poll)
        service.clock = clock
        return service

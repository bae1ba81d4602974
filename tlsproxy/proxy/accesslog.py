"""One line per request, in the combined log format nginx and Apache write."""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import Logger

from tlsproxy.http.exchange import Exchange


def _quote(value: bytes | None) -> str:
    if not value:
        return "-"
    return value.decode("latin-1").replace("\\", "\\\\").replace('"', '\\"')


class AccessLog:
    """Combined-format lines through twisted.logger (namespace tlsproxy.access)."""

    def __init__(self, clock: Any, logger: Logger | None = None) -> None:
        self.clock = clock
        self.logger = logger or Logger(namespace="tlsproxy.access")
        self._second = -1
        self._stamp = ""

    def _timestamp(self) -> str:
        now = int(self.clock.seconds())
        if now != self._second:
            self._second = now
            self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now))
        return self._stamp

    def line(self, exchange: Exchange, status: int, size: int) -> str:
        head = exchange.head
        request = f"{_quote(head.method)} {_quote(head.target)} HTTP/{head.version.decode()}"
        return (
            f'{exchange.client_address} - - [{self._timestamp()}] "{request}" {status} {size or "-"} '
            f'"{_quote(head.get(b"referer"))}" "{_quote(head.get(b"user-agent"))}"'
        )

    def log(self, exchange: Exchange, status: int, size: int) -> None:
        line = self.line(exchange, status, size)
        self.logger.info("{access}", access=line, status=status, host=exchange.head.host.decode("latin-1"))

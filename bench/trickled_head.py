"""CPU time of a request head trickled one byte per read, by head size.

    python bench/trickled_head.py            # 4, 8, 16 and 30 KiB heads

The HTTP/1.1 server protocol is fed in memory (a StringTransport, a Clock):
no sockets, so what is measured is the parser's own work per read.  Linear
work shows as CPU time that doubles with the size; a rescan of the whole
pending head on every read would quadruple it (a 30 KiB head cost 1.6 s
that way).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tlsproxy.http.server import HTTP11ServerProtocol, Limits


class Answer:
    def handle(self, exchange) -> None:  # type: ignore[no-untyped-def]
        exchange.respond(200, b"OK", [], b"")


def head_of(size: int) -> bytes:
    start = b"GET / HTTP/1.1\r\nHost: bench\r\n"
    line = b"X-Pad-%03d: " + b"v" * 200 + b"\r\n"
    lines = [line % i for i in range((size - len(start)) // len(line % 0))]
    return start + b"".join(lines) + b"\r\n"


def cpu_seconds(head: bytes) -> float:
    limits = Limits(max_header_size=64 * 1024, max_header_count=1000)
    proto = HTTP11ServerProtocol(Answer(), Clock(), limits, secure=False)
    transport = StringTransport()
    proto.makeConnection(transport)
    reads = [head[i : i + 1] for i in range(len(head))]
    start = time.process_time()
    for data in reads:
        proto.dataReceived(data)
    elapsed = time.process_time() - start
    assert transport.value().startswith(b"HTTP/1.1 200 "), transport.value()[:80]
    return elapsed


def main() -> None:
    print("| head | reads | CPU |")
    print("|---:|---:|---:|")
    for kib in (4, 8, 16, 30):
        head = head_of(kib * 1024)
        print(f"| {len(head) / 1024:.1f} KiB | {len(head)} | {cpu_seconds(head) * 1000:.1f} ms |")


if __name__ == "__main__":
    main()

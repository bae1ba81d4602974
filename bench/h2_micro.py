"""The HTTP/2 server path alone, in memory: no TLS, no sockets, no app.

    python bench/h2_micro.py [--requests N] [--streams 1|10] [--body BYTES] [--profile] [--callgrind]

bench/instructions.py counts the whole proxy (TLS, the event loop, the upstream); this counts
only what H2ServerProtocol does with a client's frames and an immediate 100-byte answer, so a
change to the h2 path shows without the rest's noise. The requests are what h2load sends
(its seven fields, HPACK-coded by h2's client with a dynamic table), ``--streams`` HEADERS
frames per read. ``--body`` makes them uploads: POSTs with a Content-Length and one DATA frame
each, answered once the body has ended. ``--profile`` prints cProfile's functions by call count; ``--callgrind`` runs
this script under callgrind twice, serving the same N requests once and twice, and prints the
difference per request: what the h2 path costs in instructions, whatever else runs on the machine
(the client's encoding, the imports and the warm-up cancel out).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from h2.config import H2Configuration
from h2.connection import H2Connection
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tlsproxy.http.h2 import H2ServerProtocol
from tlsproxy.http.server import Limits

BODY = b"x" * 100
H2LOAD_FIELDS = [
    (b":method", b"GET"),
    (b":path", b"/small"),
    (b":scheme", b"https"),
    (b":authority", b"localhost:8443"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"user-agent", b"h2load nghttp2/1.52.0"),
]


class Answer:
    """Answers every request at once (an upload once its body has ended), as a cached or trivial upstream would."""

    def handle(self, exchange: Any) -> None:
        if exchange.head.method == b"POST":
            exchange.set_body_consumer(Body(exchange))
        else:
            exchange.respond(200, b"OK", [(b"content-type", b"text/plain"), (b"server", b"bench")], BODY)


class Body:
    """Takes a request's body and answers at its end."""

    def __init__(self, exchange: Any) -> None:
        self.exchange = exchange

    def body_data(self, data: bytes) -> None:
        pass

    def body_end(self) -> None:
        self.exchange.respond(200, b"OK", [(b"content-type", b"text/plain"), (b"server", b"bench")], BODY)


def client_reads(requests: int, streams: int, body: int = 0) -> list[bytes]:
    """What a client sends: preface and SETTINGS, then ``streams`` requests per read (uploads of ``body`` bytes)."""
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.increment_flow_control_window(2**31 - 1 - 65535)
    client.update_settings({4: 2**31 - 1})  # INITIAL_WINDOW_SIZE: our answers never wait
    # As if from the server: windows wide open both ways, so uploads never wait for a WINDOW_UPDATE here.
    client.receive_data(
        b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x04\x7f\xff\xff\xff"
        + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00"
        + (2**31 - 1 - 65535).to_bytes(4, "big")
    )
    reads = [client.data_to_send()]
    upload = [(b":method", b"POST"), *H2LOAD_FIELDS[1:], (b"content-length", b"%d" % body)]
    for _ in range(requests // streams):
        for _ in range(streams):
            stream = client.get_next_available_stream_id()
            if body:
                client.send_headers(stream, upload)
                client.send_data(stream, b"u" * body, end_stream=True)
            else:
                client.send_headers(stream, H2LOAD_FIELDS, end_stream=True)
        reads.append(client.data_to_send())
    return reads


def run(reads: list[bytes]) -> int:
    """Feed ``reads`` to one connection; the bytes it answered with."""
    server = H2ServerProtocol(Answer(), Clock(), Limits())
    transport = StringTransport()
    server.makeConnection(transport)
    out = 0
    for data in reads:
        server.dataReceived(data)
        out += len(transport.value())
        transport.clear()
    return out


def instructions(requests: int, streams: int, repeat: int, body: int) -> int:
    """callgrind's count of instructions for a run of this script serving ``requests`` requests ``repeat`` times."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        argv = [sys.executable, __file__, "--requests", str(requests), "--streams", str(streams)]
        argv += ["--repeat", str(repeat), "--body", str(body)]
        valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        subprocess.run([*valgrind, *argv], check=True, capture_output=True)
        annotated = subprocess.run(["callgrind_annotate", str(out)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", annotated)
    assert m is not None, "no totals in callgrind_annotate's output"
    return int(m.group(1).replace(",", ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1, help="serve the requests this many times")
    ap.add_argument("--body", type=int, default=0, help="uploads: each request a POST with a body this long")
    ap.add_argument("--profile", action="store_true", help="cProfile, functions by call count")
    ap.add_argument("--callgrind", action="store_true", help="instrument only the measured loop")
    args = ap.parse_args()
    reads = client_reads(args.requests, args.streams, args.body)
    run(client_reads(200, args.streams, args.body))  # warm: imports, caches
    n = (len(reads) - 1) * args.streams
    if args.callgrind:
        twice, once = (instructions(args.requests, args.streams, r, args.body) for r in (2, 1))
        print(f"{args.streams} per read: {(twice - once) / n:,.0f} instructions per request")
        return 0
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(reads)
        prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats("ncalls").print_stats(40)
        return 0
    start = time.perf_counter()
    out = sum(run(reads) for _ in range(args.repeat))
    took = time.perf_counter() - start
    n *= args.repeat
    print(f"{n} requests, {args.streams} per read: {n / took:,.0f} req/s, {out / n:.0f} bytes answered each")
    return 0


if __name__ == "__main__":
    sys.exit(main())

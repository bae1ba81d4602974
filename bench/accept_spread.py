"""How two worker processes share incoming connections: one shared accept queue or SO_REUSEPORT.

    python bench/accept_spread.py [--workers 2] [--connections 3000] [--concurrency 16] [--work-ms 1.0]

Each worker is an epoll loop (as Twisted's reactor is: level-triggered, no EPOLLEXCLUSIVE) that
accepts, reads a line, spends ``--work-ms`` of CPU (a stand-in for a TLS handshake) and answers
with its index.  With ``shared`` every worker waits on the one listening socket the parent bound
(what tlsproxy's supervisor passes); with ``reuseport`` each binds its own socket to the port and
the kernel hashes each new connection to one of them.  Prints each worker's share of the
connections and the client-side latency percentiles.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def burn(ms: float) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


def serve(index: int, listener: socket.socket, work_ms: float) -> None:
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    clients: dict[int, socket.socket] = {}
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue  # another worker took it
                conn.setblocking(False)
                clients[conn.fileno()] = conn
                poller.register(conn.fileno(), select.EPOLLIN)
                continue
            conn = clients.pop(fd)
            poller.unregister(fd)
            try:
                conn.recv(1024)
                burn(work_ms)
                conn.sendall(f"{index}\n".encode())
            except OSError:
                pass
            conn.close()


def listen(port: int, reuseport: bool) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(511)
    return s


def one(port: int) -> tuple[int, float]:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        c.sendall(b"hi\n")
        answer = c.recv(64)
    return int(answer), (time.perf_counter() - start) * 1000


def run(mode: str, workers: int, connections: int, concurrency: int, work_ms: float) -> str:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    shared = listen(port, False) if mode == "shared" else None
    pids = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:
            serve(index, shared if shared is not None else listen(port, True), work_ms)
            os._exit(0)
        pids.append(pid)
    time.sleep(0.5)
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda _: one(port), range(connections)))
    finally:
        for pid in pids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    counts = [sum(1 for w, _ in results if w == i) for i in range(workers)]
    lat = sorted(ms for _, ms in results)
    shares = " / ".join(f"{100 * c / connections:.0f}%" for c in counts)
    p50 = statistics.median(lat)
    p99 = lat[int(0.99 * (len(lat) - 1))]
    return f"| {mode} | {shares} | {p50:.1f} | {p99:.1f} | {lat[-1]:.1f} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--work-ms", type=float, default=1.0)
    args = ap.parse_args()
    print(
        f"{args.workers} workers, {args.connections} connections, {args.concurrency} at a time, "
        f"{args.work_ms:g} ms of CPU each, {os.cpu_count()} CPUs"
    )
    print()
    print("| accept | share of connections per worker | p50 ms | p99 ms | max ms |")
    print("| --- | --- | ---: | ---: | ---: |")
    for mode in ("shared", "reuseport"):
        print(run(mode, args.workers, args.connections, args.concurrency, args.work_ms), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

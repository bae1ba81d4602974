"""Open-loop HTTP/1.1-over-TLS client at a fixed request rate, for the latency figure of bench/run.py.

    python bench/fixed_rate.py PORT RATE SECONDS CONNS CAFILE [PATH]

Fires one GET every 1/RATE seconds (one second of warm-up first, not recorded), whatever
the server's pace: a request never waits for the previous one, only for a free connection
from a pool of CONNS keep-alive connections. A connection the server closed is reopened
by the next request that takes it, and that request's latency includes the new handshake.
Latency runs from the moment the request is fired (its timer fired and it asked the pool
for a connection) to the last byte of the response. Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import statistics
import sys


class Conn:
    def __init__(self) -> None:
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None
        self.used = False


async def main(port: int, rate: float, seconds: float, nconns: int, cafile: str, path: str) -> None:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    request = f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    pool: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(nconns):
        pool.put_nowait(Conn())
    lat: list[float] = []
    errors: list[str] = []
    late = 0
    reconnects = 0

    async def one(record: bool) -> None:
        nonlocal reconnects
        t0 = loop.time()
        c = await pool.get()
        try:
            for attempt in (1, 2):
                if c.w is None or c.w.is_closing() or (c.r is not None and c.r.at_eof()):
                    if c.w is not None:
                        c.w.close()
                    if c.used:
                        reconnects += 1
                    c.used = True
                    c.r, c.w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
                assert c.r is not None and c.w is not None
                try:
                    c.w.write(request)
                    head = await c.r.readuntil(b"\r\n\r\n")
                except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                    # The server closed a kept-alive connection between requests: reopen once.
                    c.w.close()
                    c.w = None
                    if attempt == 2:
                        raise
                    continue
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split()[1])
                hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                await c.r.readexactly(int(hdrs.get("content-length", "0")))
                if hdrs.get("connection", "").lower() == "close" or lines[0].startswith("HTTP/1.0"):
                    c.w.close()
                    c.w = None
                if status != 200:
                    raise ValueError(f"status {status}")
                break
            if record:
                lat.append((loop.time() - t0) * 1000)
        except Exception as e:  # counted, not fatal
            if record:
                errors.append(f"{type(e).__name__}: {e}")
            if c.w is not None:
                c.w.close()
            c.w = None
        finally:
            pool.put_nowait(c)

    tasks = []
    warm = int(rate)
    total = warm + int(rate * seconds)
    start = loop.time() + 0.05
    for i in range(total):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.010 and i >= warm:
            late += 1
        tasks.append(asyncio.ensure_future(one(i >= warm)))
    elapsed = loop.time() - (start + warm / rate)
    await asyncio.wait(tasks, timeout=30)
    lat.sort()
    out: dict[str, object] = {
        "sent": total - warm,
        "ok": len(lat),
        "errors": len(errors),
        "late_starts": late,
        "reconnects": reconnects,
        "fire_rate": (total - warm) / elapsed if elapsed > 0 else 0.0,
    }
    if errors:
        out["first_error"] = errors[0]
    if len(lat) >= 100:
        q = statistics.quantiles(lat, n=100)
        out.update(p50=q[49], p99=q[98], max=lat[-1])
    print(json.dumps(out), flush=True)
    for t in tasks:
        t.cancel()


if __name__ == "__main__":
    a = sys.argv
    asyncio.run(main(int(a[1]), float(a[2]), float(a[3]), int(a[4]), a[5], a[6] if len(a) > 6 else "/small"))

"""Hold N idle TLS connections open against a proxy, for the memory figure of bench/run.py.

    python bench/idle_conns.py PORT N CAFILE [SERVER_NAME]

Opens N connections to 127.0.0.1:PORT (at most 100 handshakes in flight), completes each
TLS handshake, sends nothing, and prints one line "opened OK FAILED". It then waits for a
line on stdin: "check" prints "alive K" (connections the server has not closed), "close"
(or end of input) closes them all and exits.
"""

from __future__ import annotations

import asyncio
import resource
import ssl
import sys


async def main(port: int, n: int, cafile: str, server_name: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, n + 100))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    gate = asyncio.Semaphore(100)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        async with gate:
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_name), 30
                )
            except (TimeoutError, OSError, ssl.SSLError):
                failed += 1
                return
            conns.append((r, w))

    await asyncio.gather(*(one() for _ in range(n)))
    # Let the server's post-handshake messages (TLS 1.3 session tickets) arrive and settle.
    await asyncio.sleep(0.5)
    print(f"opened {len(conns)} {failed}", flush=True)

    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        cmd = line.strip()
        if cmd == "check":
            alive = sum(1 for r, w in conns if not r.at_eof() and not w.is_closing())
            print(f"alive {alive}", flush=True)
            continue
        break
    for _r, w in conns:
        w.close()


if __name__ == "__main__":
    name = sys.argv[4] if len(sys.argv) > 4 else "localhost"
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], name))

"""Proxy CPU seconds and wall MiB/s per 100 MiB download and upload, repeated.

    python bench/transfers.py [--only tlsproxy|nginx] [--repeats N] [--size MiB]

The MiB/s rows of run.py swing with whatever else the machine runs; the CPU the proxy spends
on one transfer swings far less, so a change to the transfer path can be judged by it on a
shared VM. Same set-up as run.py (backend nginx and curl on core 1, the proxy on core 0,
buffering on in both proxies); downloads and uploads alternate, each figure is printed, and the
median per proxy ends the output. CPU is summed over the proxy's threads (file I/O runs in
tlsproxy's thread pool, and counts).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # the helpers of bench/run.py


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=["nginx", "tlsproxy"], help="measure only these (repeatable)")
    ap.add_argument("--repeats", type=int, default=5, help="transfers of each kind per proxy")
    ap.add_argument("--size", type=int, default=100, help="MiB per transfer")
    args = ap.parse_args()
    names = args.only or ["nginx", "tlsproxy"]
    size = args.size * bench.MiB
    with tempfile.TemporaryDirectory(prefix="tlsproxy-transfers-") as tmpname:
        tmp = Path(tmpname)
        logs = tmp / "logs"
        logs.mkdir()
        cert, key, cafile = bench.make_cert(tmp)
        big = tmp / "big.bin"
        with open(big, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(bench.MiB))
        backend_port = bench.free_port()
        backend_dir = tmp / "backend"
        backend = bench.start_nginx(
            "backend",
            backend_dir,
            bench.backend_conf(backend_dir, backend_port, big),
            backend_port,
            bench.LOAD_CPU,
            logs,
        )
        summary = []
        try:
            for name in names:
                port = bench.free_port()
                if name == "nginx":
                    d = tmp / "nginx"
                    proc = bench.start_nginx(
                        "nginx",
                        d,
                        bench.nginx_proxy_conf(d, port, backend_port, cert, key),
                        port,
                        bench.PROXY_CPU,
                        logs,
                    )
                else:
                    proc, _ = bench.start_tlsproxy(tmp, port, backend_port, cert, key, logs)
                ctx = bench.Ctx(port, proc.pid, cafile, big, bench.FULL, tmp, backend.pid)
                figures: dict[str, list[tuple[float, float]]] = {"download": [], "upload": []}
                try:
                    bench.check_proxies(ctx)
                    for _ in range(args.repeats):
                        for kind, extra, path in (
                            ("download", [], "/big"),
                            (
                                "upload",
                                [
                                    "--data-binary",
                                    f"@{big}",
                                    "-H",
                                    "Content-Type: application/octet-stream",
                                    "-H",
                                    "Expect:",
                                ],
                                "/upload",
                            ),
                        ):
                            before = bench.cpu_seconds(proc.pid)
                            code, down, up, secs = bench.curl(ctx, extra, path)
                            cpu = bench.cpu_seconds(proc.pid) - before
                            moved = down if kind == "download" else up
                            if code != 200 or moved != size:
                                raise bench.NA(f"{kind}: HTTP {code}, {moved} bytes moved")
                            mib_s = size / bench.MiB / secs
                            cpu_per_100 = cpu * 100 * bench.MiB / size
                            figures[kind].append((mib_s, cpu_per_100))
                            print(
                                f"{name} {kind}: {mib_s:6.0f} MiB/s, proxy CPU {cpu_per_100:.3f} s per 100 MiB",
                                flush=True,
                            )
                    rss = bench.rss_kib(proc.pid) / 1024
                finally:
                    proc.stop()
                for kind, rows in figures.items():
                    summary.append(
                        f"{name} {kind} median: {statistics.median(r[0] for r in rows):.0f} MiB/s, "
                        f"{statistics.median(r[1] for r in rows):.3f} CPU s per 100 MiB"
                    )
                summary.append(f"{name} RSS after the transfers: {rss:.1f} MiB")
        finally:
            backend.stop()
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print("\n".join(summary))
        print(f"load average at the end: {load}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Instructions per proxied request and per new connection, counted by callgrind.

    python bench/instructions.py [--only tlsproxy|nginx] [--requests N] [--connections N] [--h2] [--access-log]

Timings on a shared VM swing by a fifth between runs; instruction counts do not, so a change to
the hot path can be judged by them. Each proxy runs under `valgrind --tool=callgrind` with
instrumentation off; it is switched on only while the load runs:

- keep-alive: `h2load --h1 -n N -c 8` (8 connections, N requests, 8 handshakes included);
- new connections: `h2load --h1 -n N -c N` (each a full handshake, one request, a close);
- with --h2, HTTP/2 instead: `h2load -n N -c 10 -m 1` and `-m 10` (10 connections, 1 or 10
  concurrent streams each, 10 handshakes included).

User-space instructions only: the kernel's work and cache misses are not in these numbers (see
bench/README.md). Needs valgrind, h2load, nginx and the project's virtualenv, like run.py.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # the helpers of bench/run.py


def total_instructions(path: Path) -> int:
    out = subprocess.run(["callgrind_annotate", str(path)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", out)
    if not m:
        raise SystemExit(f"instructions: no totals in callgrind_annotate {path}")
    return int(m.group(1).replace(",", ""))


def count(
    name: str, tmp: Path, backend: int, cert: Path, key: str, load: list[str], n: int, access_log: bool = False
) -> float:
    """Instructions per request while ``load`` (an h2load command without the URL) runs.

    The same load runs once first, uncounted, so that code paths, caches and the pool are warm.
    """
    port = bench.free_port()
    out = tmp / f"{name}.callgrind"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    logs = tmp / "logs"
    if name == "nginx":
        d = tmp / "nginx"
        d.mkdir(exist_ok=True)
        (d / "nginx.conf").write_text(bench.nginx_proxy_conf(d, port, backend, cert, Path(key)))
        argv = [bench.NGINX, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")]
        proc = bench.Proc(name, valgrind + argv, bench.PROXY_CPU, logs)
        proc.wait_ready(None, port, 300)
    else:
        conf = tmp / "tlsproxy.toml"
        text = bench.tlsproxy_conf(port, backend, cert, Path(key), True)
        if access_log:  # the default users run: one line per request on stdout (bench/README.md, "Access log cost")
            text = text.replace("access_log = false", "access_log = true")
        conf.write_text(text)
        argv = [bench.twist_path(), "tlsproxy", "--config", str(conf)]
        proc = bench.Proc(name, valgrind + argv, bench.PROXY_CPU, logs, env={"PYTHONUNBUFFERED": "1"})
        proc.wait_ready("tlsproxy: ready", port, 300)
    url = f"https://localhost:{port}/small"
    try:
        bench.run_tool([*load, url], 1800)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], capture_output=True, check=True)
        result = bench.run_tool([*load, url], 1800)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], capture_output=True, check=True)
        if f"{n} succeeded" not in result:
            raise SystemExit(f"instructions: {name}: not all {n} requests succeeded:\n{result[-400:]}")
    finally:
        proc.stop()
    time.sleep(0.5)
    return total_instructions(out) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["tlsproxy", "nginx"], action="append")
    ap.add_argument("--requests", type=int, default=3000, help="keep-alive requests (default 3000)")
    ap.add_argument("--connections", type=int, default=200, help="new connections (default 200)")
    ap.add_argument("--h2", action="store_true", help="HTTP/2 requests, 1 and 10 streams per connection")
    ap.add_argument("--access-log", action="store_true", help="tlsproxy with its access log on (the default)")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_annotate", "callgrind_control", "h2load", bench.NGINX):
        if not bench.shutil.which(tool):
            print(f"instructions: {tool} not found", file=sys.stderr)
            return 2
    names = args.only or ["nginx", "tlsproxy"]
    with tempfile.TemporaryDirectory(prefix="tlsproxy-instructions-") as t:
        tmp = Path(t)
        (tmp / "logs").mkdir()
        cert, key, _ = bench.make_cert(tmp)
        big = tmp / "big.bin"
        big.write_bytes(b"x")
        port = bench.free_port()
        conf = bench.backend_conf(tmp / "backend", port, big)
        backend = bench.start_nginx("backend", tmp / "backend", conf, port, bench.LOAD_CPU, tmp / "logs")
        try:
            if args.h2:
                print("| proxy | instructions per h2 request, 10 conns x 1 stream | 10 conns x 10 streams |")
            else:
                print("| proxy | instructions per keep-alive request | per new connection (handshake + 1 request) |")
            print("|---|---:|---:|")
            for name in names:
                r, c, a = args.requests, args.connections, args.access_log
                if args.h2:
                    one = count(name, tmp, port, cert, str(key), ["h2load", "-n", str(r), "-c", "10", "-m", "1"], r, a)
                    ten = count(name, tmp, port, cert, str(key), ["h2load", "-n", str(r), "-c", "10", "-m", "10"], r, a)
                    print(f"| {name} | {one:,.0f} | {ten:,.0f} |", flush=True)
                    continue
                keep_alive = count(name, tmp, port, cert, str(key), ["h2load", "--h1", "-n", str(r), "-c", "8"], r, a)
                fresh = count(name, tmp, port, cert, str(key), ["h2load", "--h1", "-n", str(c), "-c", str(c)], c, a)
                print(f"| {name} | {keep_alive:,.0f} | {fresh:,.0f} |", flush=True)
        finally:
            backend.stop()
    return 0


if __name__ == "__main__":
    if os.environ.get("BENCH_PYTHON") and Path(os.environ["BENCH_PYTHON"]).resolve() != Path(sys.executable).resolve():
        os.execv(os.environ["BENCH_PYTHON"], [os.environ["BENCH_PYTHON"], *sys.argv])
    sys.exit(main())

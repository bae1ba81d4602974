"""Static files: tlsproxy's ``[site.static]`` next to nginx's ``alias``, and the proxy ratio in the same run.

    python bench/static_files.py [--seconds 5]

Each server in turn on core 0 (nginx: 1 worker), wrk and curl on core 1, the same
certificate (bench/run.py's helpers). Four rows:
  * a 10 KB file, keep-alive req/s (wrk, 32 connections): static from each server;
  * the same 10 KB file proxied from a backend nginx through each (the HTTP/1.1 proxy ratio
    in this run, which the static ratio is held against);
  * a 100 MiB file, MiB/s of one curl --http1.1 download, static from each.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (
    NA,
    NGINX_COMMON,
    PROXY_CPU,
    Proc,
    backend_conf,
    cpu_seconds,
    free_port,
    make_cert,
    nginx_proxy_conf,
    run_tool,
    start_nginx,
    tlsproxy_conf,
    twist_path,
    wrk,
)

SMALL = 10 * 1024
BIG = 100 * 1024 * 1024
CURL_FORMAT = "%{speed_download} %{size_download}"


def nginx_static_conf(d: Path, port: int, files: Path, cert: Path, key: Path) -> str:
    body = f"""\
  include /etc/nginx/mime.types;
  sendfile on;
  server {{
    listen 127.0.0.1:{port} ssl backlog=1024;
    server_name localhost;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    location /static/ {{ alias {files}/; }}
  }}"""
    return NGINX_COMMON.format(d=d, body=body)


def start_tlsproxy(d: Path, port: int, backend: int, cert: Path, key: Path, files: Path, logs: Path) -> Proc:
    conf = d / "tlsproxy.toml"
    text = tlsproxy_conf(port, backend, cert, key, True)
    conf.write_text(text + f'[site.static]\n"/static/" = "{files}"\n')
    p = Proc("tlsproxy", [twist_path(), "tlsproxy", "--config", str(conf)], PROXY_CPU, logs)
    try:
        p.wait_ready("tlsproxy: ready", port, 30)
    except NA:
        p.stop()
        raise
    return p


def rps(url: str, seconds: int, pid: int) -> tuple[float, float]:
    """Median req/s of three runs, and requests per CPU-second of the server (fairer on a busy machine)."""
    wrk(url, 2)  # warm
    runs = []
    for _ in range(3):
        cpu0 = cpu_seconds(pid)
        got = wrk(url, seconds)["rps"]
        busy = cpu_seconds(pid) - cpu0
        runs.append((got, got * seconds / busy if busy > 0 else 0.0))
    return sorted(runs)[1]


def mib_per_s(url: str, cafile: Path) -> float:
    out = run_tool(
        ["curl", "-sS", "--http1.1", "--cacert", str(cafile), "-o", "/dev/null", "-w", CURL_FORMAT, url],
        timeout=120,
    )
    speed, size = out.split()
    if int(size) != BIG:
        raise NA(f"curl got {size} bytes")
    return float(speed) / (1024 * 1024)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5, help="length of each wrk run (three per figure)")
    args = ap.parse_args()
    results: dict[str, dict[str, str]] = {"nginx": {}, "tlsproxy": {}}
    with tempfile.TemporaryDirectory(prefix="bench-static-") as tmp:
        t = Path(tmp)
        logs = t / "logs"
        logs.mkdir()
        cert, key, cafile = make_cert(t)
        files = t / "files"
        files.mkdir()
        (files / "small").write_bytes(os.urandom(SMALL))
        (files / "big").write_bytes(os.urandom(BIG))
        backend_port = free_port()
        # The backend serves the same 10 KB file at /big's place of run.py: its own alias.
        conf = backend_conf(t / "backend", backend_port, files / "small")
        backend = start_nginx("backend", t / "backend", conf, backend_port, "1", logs)
        try:
            servers: dict[str, Callable[[int], Proc]] = {
                "nginx": lambda port: start_nginx(
                    "nginx", t / "nginx", nginx_static_conf(t / "nginx", port, files, cert, key), port, PROXY_CPU, logs
                ),
                "tlsproxy": lambda port: start_tlsproxy(t, port, backend_port, cert, key, files, logs),
            }
            proxies: dict[str, Callable[[int], Proc]] = {
                "nginx": lambda port: start_nginx(
                    "nginx-proxy", t / "nginx-proxy",
                    nginx_proxy_conf(t / "nginx-proxy", port, backend_port, cert, key), port, PROXY_CPU, logs,
                ),
                "tlsproxy": lambda port: start_tlsproxy(t, port, backend_port, cert, key, files, logs),
            }  # fmt: skip
            for name in results:
                for row, start, path in (
                    ("static", servers[name], "/static/small"),
                    ("proxied", proxies[name], "/big"),
                ):
                    port = free_port()
                    print(f"bench: {name} {row}", file=sys.stderr)
                    try:
                        p = start(port)
                    except NA as e:
                        results[name][row] = f"n/a ({e})"
                        continue
                    try:
                        rate, per_cpu = rps(f"https://localhost:{port}{path}", args.seconds, p.pid)
                        results[name][row] = f"{rate:,.0f}"
                        results[name][row + "_cpu"] = f"{per_cpu:,.0f}"
                        if row == "static":
                            big = mib_per_s(f"https://localhost:{port}/static/big", cafile)
                            results[name]["big"] = f"{big:,.0f}"
                    except NA as e:
                        results[name][row] = f"n/a ({e})"
                    finally:
                        p.stop()
        finally:
            backend.stop()

    def ratio(row: str) -> str:
        try:
            a = float(results["tlsproxy"][row].replace(",", ""))
            b = float(results["nginx"][row].replace(",", ""))
        except (KeyError, ValueError):
            return "n/a"
        return f"{a / b:.2f}"

    lines = [
        "| | nginx | tlsproxy | tlsproxy / nginx |",
        "| --- | --- | --- | --- |",
        *(
            f"| {label} | {results['nginx'].get(row, 'n/a')} | {results['tlsproxy'].get(row, 'n/a')} | {ratio(row)} |"
            for label, row in (
                ("10 KB static file, keep-alive req/s (nginx `alias`)", "static"),
                ("  per server CPU-second", "static_cpu"),
                ("10 KB proxied from a backend nginx, keep-alive req/s", "proxied"),
                ("  per server CPU-second", "proxied_cpu"),
                ("100 MiB static file, one download, MiB/s", "big"),
            )
        ),
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

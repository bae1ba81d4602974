"""Compression: CPU cost per MB of gzip, brotli and zstd, and what a 5 MB JSON answer costs other connections.

    python bench/compression.py [--seconds 8] [--skip-servers]

Part 1 (in this process): tlsproxy's own coders (tlsproxy/proxy/compress.py) and a few
other levels, on a 5 MB JSON answer and on Django's admin CSS and JavaScript, fed in the
64 KiB slices the proxy uses: CPU ms per MB of input, MB/s, the coded size, and the
slowest single slice (the longest one compress call holds the reactor).

Part 2 (real processes, bench/run.py's helpers): a backend nginx (core 1) serves a 5 MB
JSON file; `twist tlsproxy` (core 0) proxies it and also serves the same file from
``[site.static]`` (no precompressed sibling, so it is coded on the fly). While curl
downloads the 5 MB answer over and over (one at a time, asking for identity, gzip or zstd,
core 1), bench/fixed_rate.py fires 200 small GETs per second on other keep-alive
connections: their latency (p50 / p99 / max) is what a compressing answer costs everyone
else. A separate run without the probe gives tlsproxy's CPU per MB of answer.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import brotli
import zstandard
from run import (
    LOAD_CPU,
    NA,
    PROXY_CPU,
    Proc,
    cpu_seconds,
    free_port,
    make_cert,
    run_tool,
    start_nginx,
    tlsproxy_conf,
    twist_path,
)
from run import NGINX_COMMON as COMMON

from tlsproxy.proxy import compress

MB = 1_000_000
SLICE = compress.SLICE


def big_json(size: int) -> bytes:
    """Rows like a REST API's list answer."""
    rows, total, i = [], 0, 0
    while total < size:
        row = json.dumps(
            {"id": i, "username": f"user{i}", "email": f"user{i}@example.com", "score": (i * 7919) % 1000 / 10,
             "is_active": i % 3 != 0, "groups": ["staff", "editors"][: i % 3], "last_login": "2026-12-03T15:00:00Z"}
        )  # fmt: skip
        rows.append(row)
        total += len(row) + 2
        i += 1
    return ("[" + ", ".join(rows) + "]").encode()


def admin_assets() -> bytes:
    import django

    root = Path(django.__file__).parent / "contrib/admin/static/admin"
    files = sorted(root.glob("css/*.css")) + sorted(root.glob("js/*.js"))
    return b"\n".join(f.read_bytes() for f in files)


class Gzip:
    def __init__(self, level: int) -> None:
        self.z = zlib.compressobj(level, zlib.DEFLATED, 31)

    def compress(self, data: memoryview) -> bytes:
        return self.z.compress(data)

    def finish(self) -> bytes:
        return self.z.flush(zlib.Z_FINISH)


class Brotli:
    def __init__(self, quality: int) -> None:
        self.z = brotli.Compressor(quality=quality, lgwin=compress.BROTLI_WINDOW_LOG)

    def compress(self, data: memoryview) -> bytes:
        return self.z.process(data)

    def finish(self) -> bytes:
        return self.z.finish()


class Zstd:
    def __init__(self, level: int) -> None:
        self.z = zstandard.ZstdCompressor(level=level).compressobj()

    def compress(self, data: memoryview) -> bytes:
        return self.z.compress(data)

    def finish(self) -> bytes:
        return self.z.flush()


CODERS: list[tuple[str, Callable[[], object]]] = [
    ("gzip level 1", lambda: Gzip(1)),
    (f"gzip level {compress.GZIP_LEVEL} (tlsproxy)", lambda: compress.encoder("gzip")),
    ("gzip level 6 (nginx gzip_comp_level 6, Django's GZipMiddleware)", lambda: Gzip(6)),
    ("brotli quality 3", lambda: Brotli(3)),
    (f"brotli quality {compress.BROTLI_QUALITY} (tlsproxy)", lambda: compress.encoder("br")),
    ("brotli quality 5", lambda: Brotli(5)),
    ("zstd level 1", lambda: Zstd(1)),
    (
        f"zstd level {compress.ZSTD_LEVEL}, window 2^{compress.ZSTD_WINDOW_LOG} (tlsproxy)",
        lambda: compress.encoder("zstd"),
    ),
    ("zstd level 6", lambda: Zstd(6)),
]


def cost(make: Callable[[], object], data: bytes, rounds: int = 5) -> dict[str, float]:
    """Median CPU over ``rounds`` codings of ``data`` in SLICE pieces, and the slowest slice seen."""
    runs, slowest, size = [], 0.0, 0
    view = memoryview(data)
    for _ in range(rounds):
        coder = make()
        cpu0 = time.process_time()
        out = 0
        for start in range(0, len(data), SLICE):
            t0 = time.thread_time()
            out += len(coder.compress(view[start : start + SLICE]))  # type: ignore[attr-defined]
            slowest = max(slowest, time.thread_time() - t0)
        out += len(coder.finish())  # type: ignore[attr-defined]
        runs.append(time.process_time() - cpu0)
        size = out
    cpu = statistics.median(runs)
    return {"ms_per_mb": cpu * 1000 / (len(data) / MB), "mb_s": len(data) / MB / cpu, "ratio": size / len(data),
            "slice_ms": slowest * 1000}  # fmt: skip


def part1() -> str:
    corpora = [("5 MB JSON answer", big_json(5 * MB)), ("Django admin CSS + JS", admin_assets())]
    lines = []
    for name, data in corpora:
        lines += [
            f"**{name}** ({len(data) / MB:.2f} MB), coded in {SLICE // 1024} KiB slices:",
            "",
            "| coder | CPU ms per MB | MB/s | coded size | slowest 64 KiB slice, ms |",
            "| --- | --- | --- | --- | --- |",
        ]
        for label, make in CODERS:
            c = cost(make, data)
            lines.append(
                f"| {label} | {c['ms_per_mb']:.1f} | {c['mb_s']:.0f} | {c['ratio'] * 100:.1f}% | {c['slice_ms']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- part 3 (printed second)


class Sink:
    """The client's exchange, minus the client: what the coder writes is counted and dropped."""

    def __init__(self, method: bytes = b"GET") -> None:
        from tlsproxy.http.exchange import RequestHead

        self.head = RequestHead(method, b"/", b"1.1", b"localhost", [(b"accept-encoding", b"gzip, zstd")])
        self.client_address, self.secure, self.server_port = "127.0.0.1", True, 443
        self.deadline = self.transport = None
        self.sent = 0
        self.done = False
        self.response_started = False

    def start_response(self, status: int, reason: bytes, headers: object, length: int | None) -> None:
        self.response_started = True

    def respond(self, status: int, reason: bytes, headers: object, body: bytes) -> None:
        self.sent += len(body)
        self.done = True

    def write(self, data: bytes) -> None:
        self.sent += len(data)

    def finish(self) -> None:
        self.done = True

    def register_producer(self, producer: object) -> None: ...

    def unregister_producer(self) -> None: ...

    def set_observer(self, observer: object) -> None: ...


def reactor_lag(rounds: int = 5) -> str:
    """A 1 ms heartbeat on the real reactor while CompressingExchange codes a 5 MB JSON answer given whole.

    The heartbeat's lateness is how long other connections would have waited: the reactor
    runs one slice per turn, so that is about one slice's CPU.  Beside it, the stall of the
    same answer coded in one call, as a coder without slices would hold the reactor.  Each
    run is a child process (a Twisted reactor cannot be restarted), pinned to the proxy's core.
    """
    data = big_json(5 * MB)
    rows = [
        "| coding | heartbeats | lateness p50 ms | p99 ms | max ms | max CPU between two beats, ms "
        "| the same 5 MB coded in one call, ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for coding in ("none", "gzip", "br", "zstd"):
        beats: list[list[float]] = []
        for _ in range(rounds):
            out = subprocess.run(
                ["taskset", "-c", PROXY_CPU, sys.executable, __file__, "--lag-child", coding],
                capture_output=True, text=True, check=True, timeout=120,
            ).stdout  # fmt: skip
            beats += json.loads(out)
        lags = sorted(b[0] for b in beats)
        cpu = max(b[1] for b in beats)
        q = statistics.quantiles(lags, n=100)
        one = "-"
        if coding != "none":
            t0 = time.thread_time()
            compress.compress_whole(coding, data) if coding != "gzip" else zlib.compress(data, compress.GZIP_LEVEL, 31)
            one = f"{(time.thread_time() - t0) * 1000:.1f}"
        label = "none (idle reactor)" if coding == "none" else coding
        rows.append(f"| {label} | {len(lags)} | {q[49]:.3f} | {q[98]:.3f} | {lags[-1]:.3f} | {cpu:.3f} | {one} |")
    return "\n".join(
        [
            f"**Reactor lateness while a {len(data) / MB:.2f} MB JSON answer is coded** (a 1 ms heartbeat on the "
            f"real reactor, {rounds} runs each, pinned to core {PROXY_CPU}):",
            "",
            *rows,
            "",
        ]
    )


def lag_child(coding: str) -> None:
    """One reactor run for reactor_lag(): per heartbeat, its lateness and our CPU since the last, ms, as JSON."""
    from twisted.internet import reactor

    data = big_json(5 * MB)
    lags: list[tuple[float, float]] = []
    sink = Sink()
    state = {"last": 0.0, "cpu": 0.0, "busy": True}

    def beat() -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        lags.append(((now - state["last"]) * 1000 - 1.0, (cpu - state["cpu"]) * 1000))
        state["last"], state["cpu"] = now, cpu
        if state["busy"]:
            reactor.callLater(0.001, beat)  # type: ignore[attr-defined]

    def done() -> None:
        state["busy"] = False
        reactor.stop()  # type: ignore[attr-defined]

    def check() -> None:
        if sink.done:
            reactor.callLater(0.01, done)  # type: ignore[attr-defined]
        else:
            reactor.callLater(0.001, check)  # type: ignore[attr-defined]

    def begin() -> None:
        state["last"], state["cpu"] = time.perf_counter(), time.thread_time()
        reactor.callLater(0.001, beat)  # type: ignore[attr-defined]
        if coding == "none":
            reactor.callLater(0.3, done)  # type: ignore[attr-defined]
            return
        exchange = compress.CompressingExchange(sink, coding, reactor, 60.0)  # type: ignore[arg-type]
        exchange.respond(200, b"OK", [(b"content-type", b"application/json")], data)
        reactor.callLater(0.001, check)  # type: ignore[attr-defined]

    reactor.callWhenRunning(begin)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    print(json.dumps(lags))


# ---------------------------------------------------------------- part 2


def backend_conf(d: Path, port: int, files: Path) -> str:
    body = f"""\
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /small {{ default_type text/plain; return 200 "small"; }}
    location = /big.json {{ default_type application/json; alias {files}/big.json; }}
  }}"""
    return COMMON.format(d=d, body=body)


def start_tlsproxy(d: Path, port: int, backend: int, cert: Path, key: Path, files: Path, logs: Path) -> Proc:
    conf = d / "tlsproxy.toml"
    conf.write_text(tlsproxy_conf(port, backend, cert, key, True) + f'[site.static]\n"/static/" = "{files}"\n')
    p = Proc("tlsproxy", [twist_path(), "tlsproxy", "--config", str(conf)], PROXY_CPU, logs)
    try:
        p.wait_ready("tlsproxy: ready", port, 30)
    except NA:
        p.stop()
        raise
    return p


def download(port: int, cafile: Path, path: str, coding: str) -> int:
    """One download of ``path`` asking for ``coding`` (curl does not decode: its CPU is not ours)."""
    out = run_tool(
        ["curl", "-sS", "--http1.1", "--cacert", str(cafile), "-H", f"Accept-Encoding: {coding}", "-o", "/dev/null",
         "-w", "%{http_code} %{size_download}", f"https://localhost:{port}{path}"],
        timeout=60,
    )  # fmt: skip
    status, size = out.split()
    if status != "200":
        raise NA(f"{path}: status {status}")
    return int(size)


def cpu_per_mb(pid: int, port: int, cafile: Path, path: str, coding: str, n: int, size: int) -> tuple[float, float]:
    """tlsproxy's CPU ms per MB of answer (before coding), and the coded size as a share."""
    download(port, cafile, path, coding)  # warm
    cpu0 = cpu_seconds(pid)
    got = sum(download(port, cafile, path, coding) for _ in range(n))
    busy = cpu_seconds(pid) - cpu0
    return busy * 1000 / (n * size / MB), got / (n * size)


def probe_under_load(port: int, cafile: Path, path: str | None, coding: str, seconds: int) -> dict[str, float]:
    """fixed_rate.py's latency for small GETs while the 5 MB answer is downloaded over and over."""
    stop = threading.Event()
    count = [0]

    def load() -> None:
        while not stop.is_set() and path is not None:
            download(port, cafile, path, coding)
            count[0] += 1

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    time.sleep(0.5)
    try:
        out = run_tool(
            [sys.executable, str(Path(__file__).parent / "fixed_rate.py"), str(port), "200", str(seconds), "16",
             str(cafile), "/small"],
            timeout=seconds + 60,
        )  # fmt: skip
    finally:
        stop.set()
        loader.join(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    if "p99" not in result:
        raise NA(f"probe: {result}")
    result["downloads"] = count[0]
    return result


def part2(seconds: int) -> str:
    size_note = ""
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        t = Path(tmp)
        logs = t / "logs"
        logs.mkdir()
        cert, key, cafile = make_cert(t)
        files = t / "files"
        files.mkdir()
        data = big_json(5 * MB)
        (files / "big.json").write_bytes(data)
        size_note = f"{len(data) / MB:.2f} MB"
        backend_port = free_port()
        backend = start_nginx("backend", t / "backend", backend_conf(t / "backend", backend_port, files), backend_port,
                              LOAD_CPU, logs)  # fmt: skip
        port = free_port()
        try:
            proxy = start_tlsproxy(t, port, backend_port, cert, key, files, logs)
        except NA:
            backend.stop()
            raise
        try:
            cpu_rows = ["| answer | identity | gzip | br | zstd |", "| --- | --- | --- | --- | --- |"]
            for label, path in (
                ("proxied from the app", "/big.json"),
                ("`[site.static]`, no sibling", "/static/big.json"),
            ):
                cells = []
                for coding in ("identity", "gzip", "br", "zstd"):
                    print(f"bench: cpu {path} {coding}", file=sys.stderr)
                    ms, share = cpu_per_mb(proxy.pid, port, cafile, path, coding, 6, len(data))
                    cells.append(f"{ms:.1f} ms ({share * 100:.0f}% sent)")
                cpu_rows.append(f"| {label} | " + " | ".join(cells) + " |")
            lag_rows = [
                "| while downloading | probe p50 ms | p99 ms | max ms | 5 MB downloads done |",
                "| --- | --- | --- | --- | --- |",
            ]
            cases: list[tuple[str, str | None, str]] = [("nothing (baseline)", None, "identity")]
            for label, path in (("proxied", "/big.json"), ("static", "/static/big.json")):
                cases += [(f"{label}, {coding}", path, coding) for coding in ("identity", "gzip", "br", "zstd")]
            for label, path, coding in cases:
                print(f"bench: probe {label}", file=sys.stderr)
                r = probe_under_load(port, cafile, path, coding, seconds)
                done = r["downloads"] if path else "-"
                lag_rows.append(f"| {label} | {r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.2f} | {done} |")
        finally:
            proxy.stop()
            backend.stop()
    return "\n".join(
        [
            f"**tlsproxy CPU per MB of answer** (the {size_note} JSON, 6 downloads each, curl --http1.1; "
            "in brackets the bytes sent as a share of the answer):",
            "",
            *cpu_rows,
            "",
            f"**Small GETs at 200/s on 16 other connections** ({seconds} s each) while curl downloads the "
            f"{size_note} JSON again and again, one at a time:",
            "",
            *lag_rows,
            "",
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=8, help="length of each probe run")
    ap.add_argument("--skip-servers", action="store_true", help="parts 1 and 3 only (no nginx, no tlsproxy)")
    ap.add_argument("--lag-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lag_child:
        lag_child(args.lag_child)
        return 0
    print(part1())
    print(reactor_lag())
    if not args.skip_servers:
        print(part2(args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

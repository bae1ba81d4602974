"""Side-by-side benchmark: tlsproxy vs nginx vs twisted.web's ReverseProxyResource.

    python bench/run.py [--quick] [--out FILE]

Starts, in a temporary directory on 127.0.0.1 with free ports:
  * a backend nginx (plain HTTP, 1 worker, core 1) serving /small (100 bytes), /big (100 MiB)
    and /upload (reads the whole request body, then answers 200);
  * one TLS proxy at a time, pinned to core 0, each with the same ECDSA P-256 certificate:
    nginx (1 worker, upstream keep-alive), tlsproxy (`twist tlsproxy --config ...`) and
    twisted.web.proxy.ReverseProxyResource on an ssl: endpoint (bench/twisted_reverse_proxy.py);
and drives each with the same load generators (wrk, h2load, curl, bench/idle_conns.py), all
pinned to core 1. Prints one markdown table and writes it to bench/results-latest.md.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROXY_CPU = "0"  # the proxy under test
LOAD_CPU = "1"  # load generators and the backend
SMALL_BODY = b"x" * 100
BIG_SIZE = 100 * 1024 * 1024
MiB = 1024 * 1024
# Mozilla intermediate TLS 1.2 suites: the same list as tlsproxy's default (tlsproxy/tls/policy.py).
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Plan:
    keepalive_s: int
    keepalive_repeats: int
    warmup_s: int
    handshakes: int
    handshake_rounds: int
    latency_s: int
    latency_rate: int
    latency_conns: int
    transfer_repeats: int
    idle_conns: int


FULL = Plan(
    keepalive_s=10,
    keepalive_repeats=3,
    warmup_s=2,
    handshakes=1000,
    handshake_rounds=3,
    latency_s=10,
    latency_rate=200,
    latency_conns=16,
    transfer_repeats=3,
    idle_conns=1000,
)
QUICK = Plan(
    keepalive_s=3,
    keepalive_repeats=1,
    warmup_s=1,
    handshakes=500,
    handshake_rounds=1,
    latency_s=4,
    latency_rate=200,
    latency_conns=16,
    transfer_repeats=1,
    idle_conns=1000,
)


class NA(Exception):
    """A figure that could not be measured; the message says why."""


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child in its own process group, pinned to a core, output to a log file."""

    def __init__(self, name: str, argv: list[str], cpu: str | None, logdir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.logpath = logdir / f"{name}.log"
        self._log = open(self.logpath, "w")
        # taskset execs the command, so the pid we get is the server's own.
        self.p = subprocess.Popen(
            ["taskset", "-c", cpu, *argv] if cpu is not None else argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        self.pid = self.p.pid

    def output(self) -> str:
        try:
            return self.logpath.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 3) -> str:
        lines = [ln for ln in self.output().splitlines() if ln.strip()]
        return " | ".join(lines[-n:])[-300:]

    def wait_ready(self, line: str | None, port: int, deadline: float) -> None:
        """Wait for ``line`` in the output (or, with None, for the port to accept)."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.p.poll() is not None:
                raise NA(f"{self.name} exited with {self.p.returncode}: {self.tail()}")
            if line is not None and line in self.output():
                return
            if line is None:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            time.sleep(0.05)
        raise NA(f"{self.name} not ready within {deadline:.0f}s: {self.tail()}")

    def stop(self) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.p.wait(5)
        self._log.close()


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, all its live threads, in seconds.

    The scheduler's own nanosecond count (/proc/PID/task/*/schedstat) where the kernel has
    it; otherwise utime + stime from /proc/PID/stat, which is sampled at clock ticks.
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                total += int((task / "schedstat").read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        total = 0
    if total:
        return total / 1e9
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise NA("no VmRSS")


def run_tool(argv: list[str], timeout: float, pinned: bool = True) -> str:
    """Run a load generator pinned to the load core (unless not ``pinned``); its stdout (stderr folded in)."""
    try:
        r = subprocess.run(
            ["taskset", "-c", LOAD_CPU, *argv] if pinned else argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise NA(f"{Path(argv[0]).name} timed out after {timeout:.0f}s") from None
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise NA(f"{Path(argv[0]).name} exit {r.returncode}: {out.strip()[-200:]}")
    return out


# ---------------------------------------------------------------- setup files


def make_cert(d: Path) -> tuple[Path, Path, Path]:
    import trustme

    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    leaf = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.ECDSA)
    cert, key, cafile = d / "cert.pem", d / "key.pem", d / "ca.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    os.chmod(key, 0o600)
    cafile.write_bytes(ca.cert_pem.bytes())
    return cert, key, cafile


NGINX_COMMON = """\
worker_processes 1;
master_process off;
daemon off;
worker_rlimit_nofile 16384;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;
{body}
}}
"""


def backend_conf(d: Path, port: int, big: Path) -> str:
    # /upload buffers the whole body in memory, then hands it to /sink over a loopback
    # connection, so the answer comes only after the last byte was read.
    body = f"""\
  upstream self {{ server 127.0.0.1:{port}; keepalive 4; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /small {{ default_type text/plain; return 200 "{SMALL_BODY.decode()}"; }}
    location = /big {{ default_type application/octet-stream; alias {big}; }}
    location = /upload {{
      client_max_body_size 0;
      client_body_buffer_size 128m;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://self/sink;
    }}
    location = /sink {{ client_max_body_size 0; return 200 "ok\\n"; }}
  }}"""
    return NGINX_COMMON.format(d=d, body=body)


def nginx_proxy_conf(d: Path, port: int, backend: int, cert: Path, key: Path) -> str:
    body = f"""\
  upstream backend {{ server 127.0.0.1:{backend}; keepalive 32; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} ssl http2 backlog=1024;
    server_name localhost;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers {CIPHERS};
    ssl_prefer_server_ciphers on;
    ssl_ecdh_curve X25519:prime256v1:secp384r1;
    ssl_session_cache shared:SSL:10m;
    client_max_body_size 200m;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-Proto https;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Forwarded-Port $server_port;
      # Buffering as tlsproxy's defaults: request bodies whole before the app is
      # contacted (nginx's default), answers read ahead into memory and then
      # temporary files of up to 1 GiB (nginx's default proxy_max_temp_file_size).
      proxy_request_buffering on;
      proxy_buffering on;
      client_body_buffer_size 1m;
    }}
  }}"""
    return NGINX_COMMON.format(d=d, body=body)


def tlsproxy_conf(port: int, backend: int, cert: Path, key: Path, backlog: bool) -> str:
    ep = f"tcp:{port}:interface=127.0.0.1" + (":backlog=1024" if backlog else "")
    return f"""\
[server]
https = ["{ep}"]
http = []
access_log = false
state_dir = "{cert.parent / "tlsproxy-state"}"

[[site]]
hosts = ["localhost"]
upstream = "http://127.0.0.1:{backend}"
tls = "files"
cert = "{cert}"
key = "{key}"
max_body_size = "200M"
hsts = {{ max_age = 0 }}
"""


def start_nginx(name: str, d: Path, conf: str, port: int, cpu: str | None, logdir: Path) -> Proc:
    d.mkdir(parents=True, exist_ok=True)
    (d / "nginx.conf").write_text(conf)
    p = Proc(name, [NGINX, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")], cpu, logdir)
    try:
        p.wait_ready(None, port, 10)
    except NA:
        p.stop()
        raise
    return p


def twist_path() -> str:
    near = Path(sys.executable).parent / "twist"
    return str(near) if near.exists() else (shutil.which("twist") or "twist")


def start_tlsproxy(d: Path, port: int, backend: int, cert: Path, key: Path, logdir: Path) -> tuple[Proc, str]:
    """Start tlsproxy; the note says if the endpoint backlog had to be left at its default."""
    errors = []
    for backlog in (True, False):
        conf = d / "tlsproxy.toml"
        conf.write_text(tlsproxy_conf(port, backend, cert, key, backlog))
        p = Proc(
            "tlsproxy",
            [twist_path(), "tlsproxy", "--config", str(conf)],
            PROXY_CPU,
            logdir,
            env={"PYTHONUNBUFFERED": "1"},
        )
        try:
            p.wait_ready("tlsproxy: ready", port, 30)
            return p, "" if backlog else "listen backlog left at Twisted's default 50"
        except NA as e:
            errors.append(str(e))
            p.stop()
    raise NA(errors[-1])


def start_reverse_proxy(port: int, backend: int, cert: Path, key: Path, logdir: Path) -> Proc:
    p = Proc(
        "reverseproxy",
        [sys.executable, str(HERE / "twisted_reverse_proxy.py"), str(port), str(backend), str(cert), str(key)],
        PROXY_CPU,
        logdir,
        env={"PYTHONUNBUFFERED": "1"},
    )
    try:
        p.wait_ready("reverse proxy: ready", port, 30)
    except NA:
        p.stop()
        raise
    return p


# ---------------------------------------------------------------- measurements


@dataclass
class Ctx:
    port: int
    pid: int
    cafile: Path
    big: Path
    plan: Plan
    tmp: Path
    backend_pid: int

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"


def check_proxies(c: Ctx) -> None:
    """One real request through the proxy: 200 and the backend's exact body, or NA."""
    sc = ssl.create_default_context(cafile=str(c.cafile))
    try:
        conn = http.client.HTTPSConnection("localhost", c.port, context=sc, timeout=10)
        conn.request("GET", "/small")
        r = conn.getresponse()
        body = r.read()
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        raise NA(f"GET /small failed: {e}") from None
    if r.status != 200 or body != SMALL_BODY:
        raise NA(f"GET /small gave {r.status} with {len(body)} bytes, not the backend's body")


def wrk(url: str, seconds: int, conns: int = 32, pinned: bool = True, threads: int = 1) -> dict[str, float]:
    out = run_tool(["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", url], timeout=seconds + 30, pinned=pinned)
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if not m:
        raise NA(f"no Requests/sec in wrk output: {out[-200:]}")
    res = {"rps": float(m.group(1)), "errors": 0.0}
    m = re.search(r"(\d+) requests in ", out)
    if m:
        res["requests"] = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    if m:
        res["errors"] += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["errors"] += sum(int(x) for x in m.groups())
    return res


def m_keepalive(c: Ctx) -> dict[str, object]:
    url = c.url + "/small"
    wrk(url, c.plan.warmup_s)  # connections, caches and the upstream pool warm
    runs = []
    for _ in range(c.plan.keepalive_repeats):
        cpu0, bcpu0, t0 = cpu_seconds(c.pid), cpu_seconds(c.backend_pid), time.monotonic()
        r = wrk(url, c.plan.keepalive_s)
        cpu1, bcpu1, t1 = cpu_seconds(c.pid), cpu_seconds(c.backend_pid), time.monotonic()
        runs.append((r["rps"], r, t1 - t0, cpu1 - cpu0, bcpu1 - bcpu0))
    runs.sort(key=lambda x: x[0])
    _rps, r, wall, busy, bbusy = runs[len(runs) // 2]  # the median run
    out: dict[str, object] = {
        "ka_rps": r["rps"],
        "ka_cpu": 100 * busy / wall,
        "ka_backend_cpu": 100 * bbusy / wall,
        "ka_per_cpu_s": r["rps"] * wall / busy if busy > 0 else NA("no CPU time recorded"),
    }
    if r["errors"]:
        out["ka_note"] = f"{int(r['errors'])} errors/non-2xx"
    return out


def m_handshakes(c: Ctx) -> dict[str, object]:
    n, rounds = c.plan.handshakes, c.plan.handshake_rounds
    ok = 0
    secs = cpu = 0.0
    for _ in range(rounds):
        cpu0 = cpu_seconds(c.pid)
        out = run_tool(["h2load", "--h1", "-n", str(n), "-c", str(n), c.url + "/small"], timeout=120)
        cpu += cpu_seconds(c.pid) - cpu0
        m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
        t = re.search(r"finished in ([\d.]+)(ms|s),", out)
        if not m or not t:
            raise NA(f"unexpected h2load output: {out[-200:]}")
        ok += int(m.group(1))
        secs += float(t.group(1)) / (1000 if t.group(2) == "ms" else 1)
    if ok == 0:
        raise NA(f"no request succeeded: {out[-200:]}")
    n *= rounds
    proto = re.search(r"TLS Protocol: (\S+)\s+Cipher: (\S+)", out)
    key = re.search(r"Server Temp Key: (\S+)", out)
    res: dict[str, object] = {
        "hs_cpu_ms": 1000 * cpu / ok,
        "hs_per_s": ok / secs,
        "hs_tls": f"{proto.group(1)} {proto.group(2)} {key.group(1) if key else ''}".strip() if proto else "?",
    }
    if ok != n:
        res["hs_note"] = f"{n - ok} of {n} failed"
    return res


def h2load(url: str, seconds: int, conns: int, streams: int) -> dict[str, float]:
    """Requests/s of ``h2load`` over HTTP/2 (ALPN h2) for ``seconds``, with its failure counts."""
    argv = ["h2load", "-c", str(conns), "-m", str(streams), "-D", str(seconds), "-t", "1", url]
    out = run_tool(argv, timeout=seconds + 60)
    if "Application protocol: h2" not in out:
        raise NA(f"h2 was not negotiated: {out[-200:]}")
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    t = re.search(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s", out)
    if not m or not t:
        raise NA(f"unexpected h2load output: {out[-200:]}")
    return {"rps": float(t.group(3)), "errors": float(int(m.group(2)) + int(m.group(3)))}


def m_h2(c: Ctx) -> dict[str, object]:
    """HTTP/2, as browsers speak it: 10 connections with 1 and with 10 streams each."""
    url = c.url + "/small"
    h2load(url, c.plan.warmup_s, 10, 10)
    out: dict[str, object] = {}
    for streams, key in ((1, "h2_rps_1"), (10, "h2_rps_10")):
        runs = []
        for _ in range(c.plan.keepalive_repeats):
            cpu0, t0 = cpu_seconds(c.pid), time.monotonic()
            r = h2load(url, c.plan.keepalive_s, 10, streams)
            busy, wall = cpu_seconds(c.pid) - cpu0, time.monotonic() - t0
            runs.append((r["rps"], r, busy, wall))
        runs.sort(key=lambda x: x[0])
        rps, r, busy, wall = runs[len(runs) // 2]
        out[key] = rps
        if key == "h2_rps_10":
            out["h2_cpu"] = 100 * busy / wall
        if r["errors"]:
            out["h2_note"] = f"{int(r['errors'])} failed or errored h2 requests ({streams} streams per connection)"
    return out


def m_latency(c: Ctx) -> dict[str, object]:
    p = c.plan
    out = run_tool(
        [
            sys.executable,
            str(HERE / "fixed_rate.py"),
            str(c.port),
            str(p.latency_rate),
            str(p.latency_s),
            str(p.latency_conns),
            str(c.cafile),
            "/small",
        ],
        timeout=p.latency_s + 60,
    )
    r = json.loads(out.strip().splitlines()[-1])
    if "p99" not in r:
        raise NA(f"only {r['ok']} of {r['sent']} requests answered ({r.get('first_error', '')})")
    res: dict[str, object] = {"lat_p50": r["p50"], "lat_p99": r["p99"], "lat_max": r["max"], "lat_rate": r["fire_rate"]}
    bits = []
    if r["errors"]:
        bits.append(f"{r['errors']} of {r['sent']} failed ({r.get('first_error', '')})")
    if r["late_starts"]:
        bits.append(f"{r['late_starts']} requests fired >10 ms late (client busy)")
    if r["reconnects"]:
        bits.append(f"{r['reconnects']} reconnects (server closed kept-alive connections)")
    if bits:
        res["lat_note"] = "; ".join(bits)
    return res


def curl(c: Ctx, extra: list[str], path: str) -> tuple[int, int, int, float]:
    out = run_tool(
        [
            "curl",
            "-sS",
            "--resolve",
            f"localhost:{c.port}:127.0.0.1",
            "--cacert",
            str(c.cafile),
            "--http1.1",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{size_upload} %{time_total}",
            *extra,
            c.url + path,
        ],
        timeout=180,
    )
    code, down, up, total = out.split()[-4:]
    return int(code), int(down), int(up), float(total)


def m_transfers(c: Ctx) -> dict[str, object]:
    res: dict[str, object] = {}
    for key, extra, path in (
        ("download", [], "/big"),
        (
            "upload",
            ["--data-binary", f"@{c.big}", "-H", "Content-Type: application/octet-stream", "-H", "Expect:"],
            "/upload",
        ),
    ):
        speeds = []
        try:
            for _ in range(c.plan.transfer_repeats):
                code, down, up, secs = curl(c, extra, path)
                size = down if key == "download" else up
                if code != 200 or size != BIG_SIZE:
                    raise NA(f"HTTP {code}, {size} bytes moved")
                speeds.append(BIG_SIZE / MiB / secs)
            res[key] = statistics.median(speeds)
        except NA as e:
            res[key] = e
    return res


def m_h2_download(c: Ctx) -> dict[str, object]:
    """The 100 MiB download over HTTP/2: one stream, paced by flow control (curl --http2)."""
    speeds = []
    for _ in range(c.plan.transfer_repeats):
        out = run_tool(
            [
                "curl",
                "-sS",
                "--resolve",
                f"localhost:{c.port}:127.0.0.1",
                "--cacert",
                str(c.cafile),
                "--http2",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{http_version} %{size_download} %{time_total}",
                c.url + "/big",
            ],
            timeout=180,
        )
        code, version, down, total = out.split()[-4:]
        if code != "200" or version != "2" or int(down) != BIG_SIZE:
            raise NA(f"HTTP/{version} {code}, {down} bytes moved")
        speeds.append(BIG_SIZE / MiB / float(total))
    return {"h2_download": statistics.median(speeds)}


def m_idle_memory(c: Ctx) -> dict[str, object]:
    n = c.plan.idle_conns
    time.sleep(1)
    before = rss_kib(c.pid)
    h = subprocess.Popen(
        ["taskset", "-c", LOAD_CPU, sys.executable, str(HERE / "idle_conns.py"), str(c.port), str(n), str(c.cafile)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert h.stdin and h.stdout
        line = h.stdout.readline().split()
        if not line or line[0] != "opened":
            raise NA("idle_conns.py did not report")
        opened, failed = int(line[1]), int(line[2])
        time.sleep(2)
        after = rss_kib(c.pid)
        h.stdin.write("check\n")
        h.stdin.flush()
        alive = int(h.stdout.readline().split()[1])
        h.stdin.write("close\n")
        h.stdin.flush()
        h.wait(30)
    finally:
        if h.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(h.pid, signal.SIGKILL)
            h.wait()
    if opened == 0:
        raise NA(f"no connection opened ({failed} failed)")
    res: dict[str, object] = {
        "rss_base": before / 1024,
        "rss_idle": (after - before) / 1024,
        "rss_per_conn": (after - before) / opened,
    }
    if failed or alive != opened:
        res["rss_note"] = f"{opened} opened, {failed} failed, {alive} still open at measurement"
    return res


# Idle memory first, on a process that has served one request only: after the 100 MiB
# transfers, allocator high-water marks would hide what 1,000 connections cost.
MEASURES: list[tuple[str, Callable[[Ctx], dict[str, object]]]] = [
    ("idle memory", m_idle_memory),
    ("keep-alive", m_keepalive),
    ("http/2", m_h2),
    ("handshakes", m_handshakes),
    ("latency", m_latency),
    ("transfers", m_transfers),
    ("http/2 download", m_h2_download),
]
ALL_KEYS = {
    "keep-alive": ["ka_rps", "ka_cpu", "ka_per_cpu_s"],
    "http/2": ["h2_rps_1", "h2_rps_10", "h2_cpu"],
    "handshakes": ["hs_cpu_ms", "hs_per_s"],
    "latency": ["lat_p50", "lat_p99", "lat_max"],
    "transfers": ["download", "upload"],
    "http/2 download": ["h2_download"],
    "idle memory": ["rss_base", "rss_idle", "rss_per_conn"],
}


def measure(name: str, start: Callable[[], Proc], common: dict, say: Callable[[str], None]) -> dict[str, object]:
    res: dict[str, object] = {}
    try:
        proc = start()
    except NA as e:
        say(f"  {name}: n/a ({e})")
        return {k: NA(str(e)) for ks in ALL_KEYS.values() for k in ks}
    try:
        c = Ctx(pid=proc.pid, **common)
        try:
            check_proxies(c)
        except NA as e:
            say(f"  {name}: n/a ({e})")
            return {k: NA(str(e)) for ks in ALL_KEYS.values() for k in ks}
        for label, fn in MEASURES:
            t0 = time.monotonic()
            try:
                res.update(fn(c))
            except NA as e:
                res.update({k: e for k in ALL_KEYS[label]})
            except Exception as e:  # a bug in one measurement must not lose the others
                res.update({k: NA(f"{type(e).__name__}: {e}") for k in ALL_KEYS[label]})
            if proc.p.poll() is not None:
                say(f"  {name}: process exited during {label}: {proc.tail()}")
                err = NA(f"{name} exited during {label}")
                for lb, _fn in MEASURES[[m[0] for m in MEASURES].index(label) + 1 :]:
                    res.update({k: err for k in ALL_KEYS[lb]})
                break
            say(f"  {name}: {label} done in {time.monotonic() - t0:.1f}s")
    finally:
        proc.stop()
    return res


# ---------------------------------------------------------------- slow clients

SLOW_CLIENTS = 20
SLOW_SIZE = 10 * MiB
SLOW_RATE = "1M"  # curl --limit-rate: bytes per second per slow client


def slow_nginx_conf(d: Path, port: int, app: int, cert: Path, key: Path) -> str:
    """nginx with its defaults for proxying (proxy_buffering on, temp files up to 1 GiB)."""
    body = f"""\
  server {{
    listen 127.0.0.1:{port} ssl backlog=1024;
    server_name localhost;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{ proxy_pass http://127.0.0.1:{app}; }}
  }}"""
    return NGINX_COMMON.format(d=d, body=body)


def start_gunicorn(port: int, logdir: Path) -> Proc:
    gunicorn = Path(sys.executable).parent / "gunicorn"
    argv = [str(gunicorn), "-w", "1", "-k", "sync", "-b", f"127.0.0.1:{port}", "--chdir", str(HERE), "slow_app:app"]
    p = Proc("gunicorn", argv, LOAD_CPU, logdir)
    try:
        p.wait_ready(None, port, 30)
    except NA:
        p.stop()
        raise
    return p


def m_slow_clients(port: int, cafile: Path, say: Callable[[str], None]) -> dict[str, object]:
    """20 clients read 10 MiB at 1 MiB/s each; meanwhile, how long does a small GET take?"""
    url = f"https://localhost:{port}"
    argv = [
        "taskset", "-c", LOAD_CPU, "curl", "-sS", "--http1.1", "--limit-rate", SLOW_RATE, "--cacert", str(cafile),
        "-o", "/dev/null", "-w", "%{http_code} %{size_download}", f"{url}/big?size={SLOW_SIZE}",
    ]  # fmt: skip
    curls = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        for _ in range(SLOW_CLIENTS)
    ]
    sc = ssl.create_default_context(cafile=str(cafile))
    times: list[float] = []
    try:
        time.sleep(1.0)  # the slow downloads are under way
        end = time.monotonic() + 6
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                conn = http.client.HTTPSConnection("localhost", port, context=sc, timeout=30)
                conn.request("GET", "/small")
                ok = conn.getresponse().read() == SMALL_BODY
                conn.close()
            except (OSError, http.client.HTTPException):
                ok = False
            times.append(time.monotonic() - t0 if ok else float("inf"))
            time.sleep(0.5)
        done = 0
        for p in curls:
            out, _ = p.communicate(timeout=120)
            done += out.strip() == f"200 {SLOW_SIZE}"
    finally:
        for p in curls:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    say(f"  small GET latencies (s): {', '.join(f'{t:.2f}' for t in times)}")
    return {
        "get_p50_ms": statistics.median(times) * 1000,
        "get_max_ms": max(times) * 1000,
        "slow_done": done,
    }


def run_slow_clients(tmp: Path, cert: Path, key: Path, cafile: Path, logs: Path, say: Callable[[str], None]) -> str:
    """The slow-client table: tlsproxy next to nginx, both in front of gunicorn -w 1."""
    app_port = free_port()
    app = start_gunicorn(app_port, logs)
    results: dict[str, dict[str, object]] = {}
    try:
        for name in ("nginx", "tlsproxy"):
            port = free_port()
            try:
                if name == "nginx":
                    d = tmp / "slow-nginx"
                    proc = start_nginx(name, d, slow_nginx_conf(d, port, app_port, cert, key), port, PROXY_CPU, logs)
                else:
                    proc, _ = start_tlsproxy(tmp, port, app_port, cert, key, logs)
            except NA as e:
                say(f"  {name}: n/a ({e})")
                continue
            try:
                results[name] = m_slow_clients(port, cafile, say)
            finally:
                proc.stop()
            say(f"  {name}: slow clients done")
    finally:
        app.stop()
    lines = [
        f"Slow clients: gunicorn -w 1 (sync), {SLOW_CLIENTS} clients each reading {SLOW_SIZE // MiB} MiB at "
        "1 MiB/s (curl --limit-rate 1M), a small GET every 0.5 s meanwhile (new TLS connection each).",
        "",
        "| | nginx (defaults) | tlsproxy |",
        "| --- | --- | --- |",
    ]
    rows = [
        ("get_p50_ms", "small GET latency, median (ms)", "{:,.0f}"),
        ("get_max_ms", "small GET latency, max (ms)", "{:,.0f}"),
        ("slow_done", f"slow downloads complete (of {SLOW_CLIENTS})", "{:d}"),
    ]
    for key_, label, fmt in rows:
        cells = [cell(results.get(n, {}).get(key_, NA("not run")), fmt) for n in ("nginx", "tlsproxy")]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- workers

WORKER_COUNTS = (1, 2)
WORKER_CORES = 2  # the cores the --workers case shares between the proxy, wrk and the backend
OTHERS_NOTED = 0.2  # cores used by processes outside the bench above which the table says so


def session_cpu(sid: int) -> dict[int, float]:
    """CPU-seconds of every live process in session ``sid``: a Proc's process and all it started.

    A Proc starts a new session, and neither nginx's nor tlsproxy's workers leave it, so this
    is the whole process tree (the supervisor or master is the process whose pid is ``sid``).
    """
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[3]) == sid:
                found[int(entry.name)] = cpu_seconds(int(entry.name))
        except (OSError, ValueError, IndexError):  # it went in the meantime
            continue
    return found


def machine_times(stat: str | None = None) -> dict[str, float]:
    """The machine's CPU-seconds so far, all cores, from /proc/stat's first line (or ``stat``'s).

    ``idle`` counts iowait too; ``irq`` is irq + softirq time the kernel charged to no process
    (some of loopback TCP's receive side); ``steal`` is what the VM's host took; ``total`` is
    every field (guest time is inside user), i.e. cores x seconds.
    """
    line = (stat if stat is not None else Path("/proc/stat").read_text()).splitlines()[0]
    fields = [int(x) for x in line.split()[1:9]]
    idle, iowait, irq, softirq, steal = fields[3:8]
    return {
        "idle": (idle + iowait) / CLK_TCK,
        "irq": (irq + softirq) / CLK_TCK,
        "steal": steal / CLK_TCK,
        "total": sum(fields) / CLK_TCK,
    }


def children_cpu() -> float:
    """CPU-seconds of this process's waited-for children (wrk, once it has exited)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass(frozen=True)
class RunCost:
    """Where the machine's CPU went during one keep-alive run of the --workers case (all in CPU-seconds)."""

    rps: float
    requests: int  # what wrk completed
    proxy: float  # CPU-seconds of the proxy's processes (master/supervisor and workers)
    wrk: float
    backend: float
    idle: float  # CPU-seconds no process used (all cores)
    irq: float  # irq + softirq time charged to no process
    steal: float  # taken by the VM's host
    total: float  # cores x wall seconds
    lead: float = 0.0  # the part of ``proxy`` the supervisor (or nginx's master) used; 0 for one process
    workers: tuple[float, ...] = ()  # each worker's CPU-seconds, when there is a supervisor

    @property
    def p(self) -> float:
        """The proxy's CPU-seconds per request."""
        return self.proxy / self.requests

    @property
    def b(self) -> float:
        """CPU-seconds per request of the rest of the bench: wrk, the backend, the kernel's uncharged irq time."""
        return (self.wrk + self.backend + self.irq) / self.requests

    @property
    def wall(self) -> float:
        return self.total / WORKER_CORES

    def cores(self, cpu_seconds: float) -> float:
        """``cpu_seconds`` of this run as a number of cores kept busy."""
        return cpu_seconds / self.wall

    @property
    def others(self) -> float:
        """CPU-seconds of everything else on the machine (other jobs, the bench's own python)."""
        return max(0.0, self.total - self.idle - self.irq - self.steal - self.proxy - self.wrk - self.backend)


def ratio_ceiling(p: float, b: float, cores: int = WORKER_CORES) -> float:
    """The best x2 / x1 req/s ratio when the proxy (``p`` CPU-s a request) shares ``cores`` with the rest (``b``).

    One worker is held to one core: R1 = 1/p. Two workers, the load generator and the backend
    share every core: R2 = cores/(p + b). So x2/x1 = cores * p/(p + b): the cheaper the proxy is
    next to what drives it, the less a second core can give it. Never below 1 (when b > p, one
    worker is not the bottleneck either, and a second changes nothing).
    """
    if p <= 0:
        raise ValueError("no proxy CPU recorded")
    return max(1.0, cores * p / (p + b))


def gap_factors(one: RunCost, two: RunCost) -> dict[str, float]:
    """Why achieved x2/x1 differs from ``ratio_ceiling`` of x1's costs: three factors whose product it is.

    achieved/ceiling = (1 / cores the proxy used in x1) x (share of the cores the proxy, wrk, the
    backend and the kernel's irq time used in x2) x (x1's cost per request / x2's), when the
    ceiling is not held at 1.
    """
    return {
        "x1_proxy_cores": one.cores(one.proxy),
        "x2_ours_share": (two.proxy + two.wrk + two.backend + two.irq) / two.total,
        "cost_x1_over_x2": (one.p + one.b) / (two.p + two.b),
    }


def costed_wrk(url: str, seconds: int, proxy_sid: int, backend_sid: int) -> tuple[dict[str, float], RunCost]:
    """One wrk -t2 -c32 run, unpinned, with the CPU each party used during it."""
    proxy0, backend0, wrk0, m0 = session_cpu(proxy_sid), session_cpu(backend_sid), children_cpu(), machine_times()
    r = wrk(url, seconds, pinned=False, threads=2)
    proxy1, backend1, wrk1, m1 = session_cpu(proxy_sid), session_cpu(backend_sid), children_cpu(), machine_times()
    if not r.get("requests"):
        raise NA("wrk reported no completed requests")

    def used(before: dict[int, float], after: dict[int, float], pids: list[int]) -> float:
        return sum(after[pid] - before.get(pid, 0.0) for pid in pids)

    workers = sorted(pid for pid in proxy1 if pid != proxy_sid)
    cost = RunCost(
        rps=r["rps"],
        requests=int(r["requests"]),
        proxy=used(proxy0, proxy1, list(proxy1)),
        wrk=wrk1 - wrk0,
        backend=used(backend0, backend1, list(backend1)),
        idle=m1["idle"] - m0["idle"],
        irq=m1["irq"] - m0["irq"],
        steal=m1["steal"] - m0["steal"],
        total=m1["total"] - m0["total"],
        lead=used(proxy0, proxy1, [proxy_sid] if workers and proxy_sid in proxy1 else []),
        workers=tuple(proxy1[pid] - proxy0.get(pid, 0.0) for pid in workers),
    )
    return r, cost


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def workers_table(results: dict[tuple[str, int], object]) -> list[str]:
    """The req/s row, where the CPU went in each run, and each proxy's ceiling against what it achieved."""
    runs = [(n, c) for n in ("nginx", "tlsproxy") for c in WORKER_COUNTS]
    header = " | ".join(f"{n} x{c}" for n, c in runs)
    costs = {k: v for k, v in results.items() if isinstance(v, RunCost)}

    def rps(key: tuple[str, int]) -> float | None:
        v = costs.get(key)
        return v.rps if v else None

    tp1, tp2, ng1, ng2 = rps(("tlsproxy", 1)), rps(("tlsproxy", 2)), rps(("nginx", 1)), rps(("nginx", 2))
    cells = [cell(costs[k].rps if k in costs else results.get(k, NA("not run")), "{:,.0f}") for k in runs]
    lines = [
        f"| | {header} | tlsproxy x2 / x1 | nginx x2 / x1 | tlsproxy x2 / nginx x2 |",
        "| --- | " + " | ".join("---:" for _ in range(len(runs) + 3)) + " |",
        f"| keep-alive req/s | {' | '.join(cells)} | {ratio(tp2, tp1)} | {ratio(ng2, ng1)} | {ratio(tp2, ng2)} |",
        "",
        "Where the CPU went in each run (CPU-seconds per request in microseconds; cores = CPU-seconds per"
        " wall second; the proxy's processes are its master or supervisor and its workers; p = the proxy's,"
        " b = the rest: wrk's, the backend's and the kernel's irq/softirq time, which it charges to no process"
        " and which on this machine is mostly loopback TCP):",
        "",
        f"| | {header} |",
        "| --- | " + " | ".join("---:" for _ in runs) + " |",
    ]
    rows: list[tuple[str, Callable[[RunCost], str]]] = [
        ("p: proxy CPU per request (us)", lambda c: us(c.p)),
        ("  of which the master / supervisor (us)", lambda c: us(c.lead / c.requests)),
        ("wrk CPU per request (us)", lambda c: us(c.wrk / c.requests)),
        ("backend nginx CPU per request (us)", lambda c: us(c.backend / c.requests)),
        ("kernel irq/softirq per request (us)", lambda c: us(c.irq / c.requests)),
        ("b: wrk + backend + irq per request (us)", lambda c: us(c.b)),
        ("b / p", lambda c: f"{c.b / c.p:.2f}"),
        ("proxy cores busy", lambda c: f"{c.cores(c.proxy):.2f}"),
        ("wrk + backend cores busy", lambda c: f"{c.cores(c.wrk + c.backend):.2f}"),
        ("kernel irq/softirq cores (charged to no process)", lambda c: f"{c.cores(c.irq):.2f}"),
        ("other processes' cores (not this bench)", lambda c: f"{c.cores(c.others):.2f}"),
        ("idle cores", lambda c: f"{c.cores(c.idle):.2f}"),
        ("stolen by the VM host (cores)", lambda c: f"{c.cores(c.steal):.2f}"),
    ]
    for label, show in rows:
        shown = [show(costs[k]) if k in costs else "n/a" for k in runs]
        lines.append(f"| {label} | {' | '.join(shown)} |")
    busy = max((c.cores(c.others) for c in costs.values()), default=0.0)
    if busy > OTHERS_NOTED:
        lines += [
            "",
            f"Other processes kept up to {busy:.2f} cores busy during these runs: req/s are not quiet-machine"
            " figures; CPU per request is the steadier measure.",
        ]
    lines += [
        "",
        f"Ceiling of x2 / x1 on {WORKER_CORES} shared cores: {WORKER_CORES}p / (p + b) with x1's p and b"
        " (one worker holds one core; two share every core with wrk and the backend):",
        "",
    ]
    for name in ("nginx", "tlsproxy"):
        one, two = costs.get((name, 1)), costs.get((name, 2))
        if one is None or two is None or one.requests == 0 or two.requests == 0:
            lines.append(f"- {name}: n/a")
            continue
        top = ratio_ceiling(one.p, one.b)
        achieved = two.rps / one.rps
        g = gap_factors(one, two)
        lines.append(
            f"- {name}: ceiling {top:.2f}, achieved {achieved:.2f}, achieved / ceiling {achieved / top:.2f};"
            f" p x2 / x1 {two.p / one.p:.2f}, b x2 / x1 {two.b / one.b:.2f};"
            f" x1's proxy used {g['x1_proxy_cores']:.2f} cores, x2's proxy + wrk + backend + irq"
            f" {g['x2_ours_share']:.0%} of the machine"
        )
        if two.workers:
            lines.append(
                f"  - {name} x2 per worker: "
                + ", ".join(f"{two.cores(w):.2f} cores" for w in two.workers)
                + f"; the {'supervisor' if name == 'tlsproxy' else 'master'} {two.cores(two.lead):.3f} cores"
            )
    lines += ["", "Targets:", ""]
    for label, a, b, bound in (
        ("tlsproxy workers = 2 >= 1.35x workers = 1", tp2, tp1, 1.35),
        ("tlsproxy workers = 2 >= 0.40 of nginx worker_processes 2", tp2, ng2, 0.40),
    ):
        if a is None or not b:
            lines.append(f"- {label}: n/a")
        else:
            met = a / b >= bound
            shown = f"{a / b:.2f}" if met or f"{a / b:.2f}" != f"{bound:.2f}" else f"{a / b:.3f}"  # not "0.40 NOT MET"
            lines.append(f"- {label}: {shown} -> {'MET' if met else 'NOT MET'}")
    return lines


def run_workers(tmp: Path, cert: Path, key: Path, logs: Path, plan: Plan, say: Callable[[str], None]) -> str:
    """Keep-alive req/s of tlsproxy `workers = 1` and 2 next to nginx `worker_processes 1` and 2, unpinned.

    Nothing is pinned: the proxy's processes, wrk (2 threads) and the backend nginx share every core,
    as they would on a small server. Each run also records the CPU each of them used.
    """
    big = tmp / "big.bin"
    big.write_bytes(b"")
    backend_port = free_port()
    d = tmp / "workers-backend"
    backend = start_nginx("backend", d, backend_conf(d, backend_port, big), backend_port, None, logs)
    results: dict[tuple[str, int], object] = {}
    try:
        for name in ("nginx", "tlsproxy"):
            for count in WORKER_COUNTS:
                port = free_port()
                try:
                    if name == "nginx":
                        d = tmp / f"workers-nginx-{count}"
                        conf = nginx_proxy_conf(d, port, backend_port, cert, key).replace(
                            "worker_processes 1;\nmaster_process off;", f"worker_processes {count};"
                        )
                        proc = start_nginx(f"nginx-{count}", d, conf, port, None, logs)
                    else:
                        conf_path = tmp / f"tlsproxy-workers-{count}.toml"
                        conf_path.write_text(
                            tlsproxy_conf(port, backend_port, cert, key, True).replace(
                                "[server]\n", f"[server]\nworkers = {count}\n", 1
                            )
                        )
                        proc = Proc(
                            f"tlsproxy-{count}",
                            [twist_path(), "tlsproxy", "--config", str(conf_path)],
                            None,
                            logs,
                            env={"PYTHONUNBUFFERED": "1"},
                        )
                        proc.wait_ready("tlsproxy: ready", port, 60)
                except NA as e:
                    results[(name, count)] = e
                    say(f"  {name} x{count}: n/a ({e})")
                    continue
                try:
                    url = f"https://localhost:{port}/small"
                    wrk(url, plan.warmup_s, pinned=False, threads=2)
                    runs = sorted(
                        (
                            costed_wrk(url, plan.keepalive_s, proc.pid, backend.pid)[1]
                            for _ in range(plan.keepalive_repeats)
                        ),
                        key=lambda c: c.rps,
                    )
                    median = runs[len(runs) // 2]
                    results[(name, count)] = median
                    say(
                        f"  {name} x{count}: {median.rps:,.0f} req/s; p {us(median.p)} us, b {us(median.b)} us"
                        " per request"
                    )
                except NA as e:
                    results[(name, count)] = e
                finally:
                    proc.stop()
    finally:
        backend.stop()
    lines = [
        "Worker processes: keep-alive requests/s (wrk -t2 -c32, 100 B body; median run), nothing pinned: the"
        " proxy's processes, wrk and the backend nginx share every core.",
        "",
        *workers_table(results),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- report

ROWS = [
    # key, label, unit format, higher is better
    ("ka_rps", "Keep-alive requests/s (wrk, 32 conns, 100 B body; median run)", "{:,.0f}", True),
    ("ka_cpu", "  proxy CPU during that run (% of one core)", "{:.0f}%", None),
    ("ka_per_cpu_s", "  keep-alive requests per proxy CPU-second", "{:,.0f}", True),
    ("h2_rps_1", "HTTP/2 requests/s (h2load, 10 conns x 1 stream; median run)", "{:,.0f}", True),
    ("h2_rps_10", "HTTP/2 requests/s (h2load, 10 conns x 10 streams; median run)", "{:,.0f}", True),
    ("h2_cpu", "  proxy CPU during the 10-stream run (% of one core)", "{:.0f}%", None),
    ("hs_cpu_ms", "Proxy CPU per full TLS handshake (ms; h2load --h1 -n N -c N)", "{:.3f}", False),
    ("hs_per_s", "  full handshakes/s (each with one request)", "{:,.0f}", True),
    ("lat_p50", "p50 latency at fixed rate (ms)", "{:.2f}", False),
    ("lat_p99", "p99 latency at fixed rate (ms)", "{:.2f}", False),
    ("lat_max", "  max latency at fixed rate (ms)", "{:.1f}", False),
    ("download", "100 MiB download (MiB/s, curl)", "{:,.0f}", True),
    ("upload", "100 MiB upload (MiB/s, curl)", "{:,.0f}", True),
    ("h2_download", "100 MiB download over HTTP/2 (MiB/s, curl --http2)", "{:,.0f}", True),
    ("rss_base", "Proxy RSS after one request, before idle connections (MiB)", "{:.1f}", False),
    ("rss_idle", "Proxy RSS added by 1,000 idle TLS connections (MiB)", "{:.1f}", False),
    ("rss_per_conn", "  per idle connection (KiB)", "{:.1f}", False),
]


def cell(v: object, fmt: str) -> str:
    if isinstance(v, NA):
        return f"n/a ({v})"
    if v is None:
        return "n/a"
    return fmt.format(v)


def ratio(a: object, b: object) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return f"{a / b:.2f}"
    return "n/a"


def num(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def render(results: dict[str, dict[str, object]], header: list[str], plan: Plan) -> str:
    ng, tp, rp = results["nginx"], results["tlsproxy"], results["ReverseProxyResource"]
    lines = [
        *header,
        "",
        "| metric | nginx | tlsproxy | ReverseProxyResource | tlsproxy / nginx | ReverseProxyResource / nginx |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label, fmt, _better in ROWS:
        if key.startswith("lat_"):
            label = label.replace("fixed rate", f"{plan.latency_rate} req/s")
        lines.append(
            f"| {label} | {cell(ng.get(key), fmt)} | {cell(tp.get(key), fmt)} | {cell(rp.get(key), fmt)} "
            f"| {ratio(tp.get(key), ng.get(key))} | {ratio(rp.get(key), ng.get(key))} |"
        )
    lines += ["", "Targets (one tlsproxy process against one nginx worker):", ""]

    def target(label: str, value: float | None, ok: Callable[[float], bool], shown: str) -> str:
        if value is None:
            return f"- {label}: n/a"
        return f"- {label}: {shown.format(value)} -> {'MET' if ok(value) else 'NOT MET'}"

    a, b = num(tp.get("ka_rps")), num(ng.get("ka_rps"))
    lines.append(
        target(
            "keep-alive requests/s >= 40% of nginx's",
            a / b if a is not None and b else None,
            lambda x: x >= 0.40,
            "{:.0%} of nginx",
        )
    )
    for key, shape in (("h2_rps_1", "1 stream"), ("h2_rps_10", "10 streams")):
        a, b = num(tp.get(key)), num(ng.get(key))
        lines.append(
            target(
                f"HTTP/2 requests/s ({shape} per connection) >= 40% of nginx's",
                a / b if a is not None and b else None,
                lambda x: x >= 0.40,
                "{:.0%} of nginx",
            )
        )
    a, b = num(tp.get("hs_cpu_ms")), num(ng.get("hs_cpu_ms"))
    lines.append(
        target(
            "CPU per full handshake <= 1/0.7 (1.43x) of nginx's",
            a / b if a is not None and b else None,
            lambda x: x <= 1 / 0.7,
            "{:.2f}x nginx",
        )
    )
    a, b = num(tp.get("ka_rps")), num(rp.get("ka_rps"))
    lines.append(
        target(
            "keep-alive requests/s >= 10x ReverseProxyResource's",
            a / b if a is not None and b else None,
            lambda x: x >= 10,
            "{:.1f}x ReverseProxyResource",
        )
    )
    notes = []
    for name, r in results.items():
        for k in ("ka_note", "h2_note", "hs_note", "lat_note", "rss_note", "start_note"):
            if r.get(k):
                notes.append(f"- {name}: {r[k]}")
        if r.get("hs_tls"):
            notes.append(f"- {name}: handshakes negotiated {r['hs_tls']}")
        if isinstance(r.get("ka_backend_cpu"), float):
            notes.append(f"- {name}: backend nginx CPU during the keep-alive run: {r['ka_backend_cpu']:.0f}% of core 1")
        if isinstance(r.get("lat_rate"), float):
            notes.append(f"- {name}: fixed-rate run achieved {r['lat_rate']:.0f} req/s")
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def machine() -> str:
    model = "?"
    with contextlib.suppress(Exception):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    return f"{os.cpu_count()} CPUs, {model}, Linux {platform.release()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run (about 2 minutes)")
    ap.add_argument("--out", default=str(HERE / "results-latest.md"), help="where to write the table")
    ap.add_argument(
        "--only",
        action="append",
        choices=["nginx", "tlsproxy", "ReverseProxyResource"],
        help="measure only these proxies (repeatable); the others show n/a",
    )
    ap.add_argument(
        "--workers",
        action="store_true",
        help="run only the worker-process case (tlsproxy workers = 1/2 vs nginx worker_processes 1/2, unpinned)",
    )
    ap.add_argument(
        "--slow-clients",
        action="store_true",
        help="run only the slow-client case (gunicorn -w 1; about 40 s) and print its table",
    )
    args = ap.parse_args()
    try:
        import trustme  # noqa: F401
        import twisted.web.proxy  # noqa: F401
    except ImportError as e:
        venv = os.environ.get("BENCH_PYTHON", "/tmp/venv/bin/python")
        if Path(venv).exists() and Path(venv).resolve() != Path(sys.executable).resolve():
            os.execv(venv, [venv, *sys.argv])
        print(f"bench: {e}; run with the project's virtualenv python", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    for tool in ("taskset", "wrk", "h2load", "curl", NGINX):
        if not shutil.which(tool):
            print(f"bench: {tool} not found", file=sys.stderr)
            return 2
    if (os.cpu_count() or 1) < 2:
        print("bench: needs at least 2 CPUs (proxy on core 0, load on core 1)", file=sys.stderr)
        return 2
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.monotonic()
    loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    stamp = datetime.datetime.now().astimezone()
    if args.workers:
        with tempfile.TemporaryDirectory(prefix="tlsproxy-bench-") as tmpname:
            tmp = Path(tmpname)
            logs = tmp / "logs"
            logs.mkdir()
            cert, key, cafile = make_cert(tmp)
            table = run_workers(tmp, cert, key, logs, plan, say)
        table = f"Run: {stamp:%Y-%m-%d %H:%M %Z} on {machine()}; load average before: {loadavg}.\n\n" + table
        print(table)
        out = HERE / "results-workers.md" if args.out == str(HERE / "results-latest.md") else Path(args.out)
        out.write_text(table)
        say(f"bench: table written to {out}")
        return 0
    if args.slow_clients:
        with tempfile.TemporaryDirectory(prefix="tlsproxy-bench-") as tmpname:
            tmp = Path(tmpname)
            logs = tmp / "logs"
            logs.mkdir()
            cert, key, cafile = make_cert(tmp)
            table = run_slow_clients(tmp, cert, key, cafile, logs, say)
        table = f"Run: {stamp:%Y-%m-%d %H:%M %Z} on {machine()}; load average before: {loadavg}.\n\n" + table
        print(table)
        out = HERE / "results-slow-clients.md" if args.out == str(HERE / "results-latest.md") else Path(args.out)
        out.write_text(table)
        say(f"bench: table written to {out}")
        return 0
    with tempfile.TemporaryDirectory(prefix="tlsproxy-bench-") as tmpname:
        tmp = Path(tmpname)
        logs = tmp / "logs"
        logs.mkdir()
        cert, key, cafile = make_cert(tmp)
        big = tmp / "big.bin"
        with open(big, "wb") as f:
            for _ in range(BIG_SIZE // MiB):
                f.write(os.urandom(MiB))
        backend_port = free_port()
        say(f"bench: temp dir {tmp}, backend on :{backend_port}")
        backend = start_nginx(
            "backend", tmp / "backend", backend_conf(tmp / "backend", backend_port, big), backend_port, LOAD_CPU, logs
        )
        results: dict[str, dict[str, object]] = {}
        b = {"rps": float("nan")}
        try:
            b = wrk(f"http://127.0.0.1:{backend_port}/small", plan.warmup_s + 2)
            say(f"bench: backend alone (plain HTTP, keep-alive, 32 conns): {b['rps']:,.0f} req/s")

            def common() -> dict[str, object]:
                return {
                    "port": free_port(),
                    "cafile": cafile,
                    "big": big,
                    "plan": plan,
                    "tmp": tmp,
                    "backend_pid": backend.pid,
                }

            # nginx
            cm = common()
            results["nginx"] = (
                measure(
                    "nginx",
                    lambda: start_nginx(
                        "nginx",
                        tmp / "nginx",
                        nginx_proxy_conf(tmp / "nginx", cm["port"], backend_port, cert, key),
                        cm["port"],
                        PROXY_CPU,
                        logs,
                    ),
                    cm,
                    say,
                )
                if not args.only or "nginx" in args.only
                else {}
            )
            # tlsproxy
            cm = common()
            note: list[str] = []

            def start_tp() -> Proc:
                p, n = start_tlsproxy(tmp, cm["port"], backend_port, cert, key, logs)
                if n:
                    note.append(n)
                return p

            results["tlsproxy"] = (
                measure("tlsproxy", start_tp, cm, say) if not args.only or "tlsproxy" in args.only else {}
            )
            if note:
                results["tlsproxy"]["start_note"] = note[0]
            # ReverseProxyResource
            cm = common()
            results["ReverseProxyResource"] = (
                measure(
                    "ReverseProxyResource",
                    lambda: start_reverse_proxy(cm["port"], backend_port, cert, key, logs),
                    cm,
                    say,
                )
                if not args.only or "ReverseProxyResource" in args.only
                else {}
            )
        finally:
            backend.stop()
    header = [
        f"Run: {stamp:%Y-%m-%d %H:%M %Z} on {machine()}; "
        f"{'--quick' if args.quick else 'full'} run, {time.monotonic() - started:.0f}s.",
        f"Proxy pinned to core {PROXY_CPU}; load generators and the backend nginx pinned to core {LOAD_CPU}. "
        f"Backend alone (plain HTTP keep-alive, 32 conns): {b['rps']:,.0f} req/s. "
        f"Load average before the run: {loadavg}.",
    ]
    table = render(results, header, plan)
    print(table)
    Path(args.out).write_text(table)
    say(f"bench: table written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

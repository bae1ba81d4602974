"""A real redis-server (the Debian package) on a free loopback port, for unit and integration tests."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trustme

from tests.integration.procs import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """One redis-server process with its own directory; ``stop`` and ``start`` again on the same port."""

    def __init__(self, directory: Path, password: str = "", tls: bool = False) -> None:
        self.directory = directory
        self.port = free_port()
        self.password = password
        self.tls = tls
        self.ca_pem = directory / "ca.pem"
        if tls:
            ca = trustme.CA()
            leaf = ca.issue_cert("127.0.0.1", "localhost")
            leaf.private_key_pem.write_to_path(str(directory / "key.pem"))
            leaf.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
            ca.cert_pem.write_to_path(str(self.ca_pem))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_pem}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, deadline: float = 20.0) -> None:
        argv = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.tls:
            argv[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            argv += ["--tls-cert-file", str(self.directory / "cert.pem"), "--tls-key-file"]
            argv += [
                str(self.directory / "key.pem"),
                "--tls-ca-cert-file",
                str(self.ca_pem),
                "--tls-auth-clients",
                "no",
            ]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + deadline
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
                    s = raw
                    if self.tls:
                        s = ssl.create_default_context(cafile=str(self.ca_pem)).wrap_socket(
                            raw, server_hostname="127.0.0.1"
                        )
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                    if reply.startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > end:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}: {log}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@contextmanager
def running_redis(password: str = "", tls: bool = False) -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="tlsproxy-redis-") as directory:
        server = RedisServer(Path(directory), password, tls)
        server.start()
        try:
            yield server
        finally:
            server.stop()

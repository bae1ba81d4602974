"""Start and stop the real processes that integration tests talk to.

Every process is started with a deadline for readiness (a port that accepts,
or a line in its output) and is always stopped, even when the test fails.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_EPHEMERAL = _ephemeral_range()
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Chosen below the kernel's ephemeral range: a port from bind(0) can be
    taken as the source port of some outgoing connection before the server
    that was meant to have it starts listening.
    """
    low = 20000
    high = min(_EPHEMERAL[0], 32768) - 1
    for _ in range(200):
        port = random.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port between {low} and {high}")


def wait_for_port(port: int, host: str = "127.0.0.1", deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > end:
                raise TimeoutError(f"nothing listened on {host}:{port} within {deadline}s") from None
            time.sleep(0.05)


class Process:
    """A running child whose combined output is collected line by line."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.argv = list(argv)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_line(self, needle: str, deadline: float = 30.0, start: int = 0) -> str:
        """The first output line (from index ``start``) containing ``needle``."""
        end = time.monotonic() + deadline
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if needle in line:
                        return line
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(
                        f"{self.argv[0]} exited {self.proc.returncode} before {needle!r}:\n{self.output}"
                    )
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no line with {needle!r} within {deadline}s:\n{self.output}")
                self._cond.wait(min(left, 0.2))

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signum)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


@contextmanager
def running(argv: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None) -> Iterator[Process]:
    process = Process(argv, env=env, cwd=cwd)
    try:
        yield process
    finally:
        process.stop()


READY = "tlsproxy: ready"


@contextmanager
def tlsproxy(config: Path | None, env: dict[str, str] | None = None, deadline: float = 30.0) -> Iterator[Process]:
    """``twist tlsproxy --config FILE`` from the installed package, until ready."""
    argv = [str(BIN / "twist"), "tlsproxy"]
    if config is not None:
        argv += ["--config", str(config)]
    with running(argv, env=env) as process:
        process.wait_for_line(READY, deadline)
        yield process
        # Its state moves are checked (tests/conftest.py): an illegal one fails the test that made it.
        assert "IllegalMove" not in process.output, process.output

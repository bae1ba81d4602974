"""Several upstreams behind one site, with real gunicorn instances behind the real `twist tlsproxy` (issue 16)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import PKI, Proxy, gunicorn, marker, proxy_config, start_proxy
from tests.integration.procs import free_port

pytestmark = pytest.mark.integration


def admin(port: int, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10, trust_env=False)


def eventually(check: Callable[[], bool], what: str, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline}s: {what}")
        time.sleep(0.1)


def up_metric(admin_port: int, url: str) -> str:
    """The value of tlsproxy_upstream_up for ``url`` ("" while it is not listed)."""
    for line in admin(admin_port, "/metrics").text.splitlines():
        if line.startswith("tlsproxy_upstream_up{") and f'upstream="{url}"' in line:
            return line.rsplit(" ", 1)[1]
    return ""


def reload(proxy: Proxy, where: Path, upstream: object, server: dict, **site: object) -> None:
    """Rewrite the proxy's configuration with another upstream list and SIGHUP it."""
    state_dir = where / f"state-{proxy.port}"
    text = proxy_config(proxy.port, upstream, proxy.pki, state_dir, server=server, **site)  # type: ignore[arg-type]
    proxy.config.write_text(text)
    mark = len(proxy.process.lines)
    proxy.process.signal(signal.SIGHUP)
    proxy.process.wait_for_line("configuration reloaded", 20, start=mark)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_one_gunicorn_mid_load_loses_no_get(pki: PKI, tmp_path: Path, how: signal.Signals) -> None:
    """One of two apps (unix socket, TCP) stopped or killed under load: every GET gets 200, later ones the other."""
    with gunicorn("unix", tmp_path) as first, gunicorn("tcp", tmp_path) as second:
        with start_proxy(tmp_path, [first.url, second.url], pki) as proxy:
            results: list[tuple[float, int, str]] = []
            stop = threading.Event()

            def load() -> None:
                with proxy.client(timeout=20) as client:
                    while not stop.is_set():
                        tag = marker()
                        started = time.monotonic()
                        status = client.get(f"/slow?seconds=0.1&m={tag}").status_code
                        results.append((started, status, tag))

            threads = [threading.Thread(target=load) for _ in range(4)]
            for thread in threads:
                thread.start()
            try:
                eventually(lambda: "GET /slow" in first.hits() and "GET /slow" in second.hits(), "both get load")
                # SIGTERM: gunicorn closes its socket and finishes what it has.  SIGKILL: requests
                # in flight there are cut off unanswered, and must be sent to the other one.
                first.process.signal(how)
                first.process.proc.wait(10)
                stopped_at = time.monotonic()
                time.sleep(2.0)
            finally:
                stop.set()
                for thread in threads:
                    thread.join(30)
            statuses = [status for _, status, _ in results]
            assert statuses and set(statuses) == {200}, [s for s in statuses if s != 200][:5]
            hits_first, hits_second = first.hits(), second.hits()
            lost = [tag for _, _, tag in results if tag not in hits_first and tag not in hits_second]
            assert lost == []
            later = [tag for started, _, tag in results if started > stopped_at]
            assert len(later) >= 5
            assert all(tag in hits_second for tag in later)
            assert "out for 10s" in proxy.process.output


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
def test_sighup_removing_an_upstream_lets_its_slow_request_finish(pki: PKI, tmp_path: Path, http2: bool) -> None:
    """SIGHUP without an upstream: its slow request ends with 200; new ones, even on old connections, avoid it."""
    with gunicorn("tcp", tmp_path) as one, gunicorn("tcp", tmp_path) as two:
        admin_port = free_port()
        server = {"upstream_timeout": 30, "admin": f"tcp:{admin_port}:interface=127.0.0.1"}
        # round_robin: without the hand-over, the old configuration would still send every
        # other request to the removed upstream (least_conn would avoid it: it is busy).
        with start_proxy(tmp_path, [one.url, two.url], pki, server=server, balance="round_robin") as proxy:
            tag = marker()
            answer: list[httpx.Response] = []

            def slow() -> None:
                with proxy.client(timeout=30) as client:
                    answer.append(client.get(f"/slow?seconds=4&m={tag}"))

            thread = threading.Thread(target=slow)
            thread.start()
            eventually(lambda: tag in one.hits() or tag in two.hits(), "the slow request reached an app")
            removed, kept = (one, two) if tag in one.hits() else (two, one)
            with proxy.client(http2=http2) as early:
                first = early.get("/whoami")  # a client connection from before the reload
                assert (first.status_code, first.http_version) == (200, "HTTP/2" if http2 else "HTTP/1.1")
                reload(proxy, tmp_path, [kept.url], server, balance="round_robin")
                states = admin(admin_port, "/readyz").text
                assert f"upstream {removed.url} (site localhost): down, 1 in flight" in states
                assert "draining: removed by a reload" in states
                tags = [marker() for _ in range(6)]
                for later in tags[:3]:
                    assert early.get(f"/whoami?m={later}").status_code == 200
                with proxy.client() as fresh:
                    for later in tags[3:]:
                        assert fresh.get(f"/whoami?m={later}").status_code == 200
            thread.join(30)
            assert len(answer) == 1
            assert (answer[0].status_code, answer[0].text) == (200, "slept")
            assert all(later in kept.hits() and later not in removed.hits() for later in tags)


def test_health_checks_take_a_failing_upstream_out_and_bring_it_back(pki: PKI, tmp_path: Path) -> None:
    """health_path: an app answering 503 is taken out (requests go to the other) and back once it answers 200."""
    admin_port = free_port()
    with gunicorn("tcp", tmp_path) as sick, gunicorn("tcp", tmp_path) as well:
        health_file = Path(str(sick.hits_log) + ".health")
        with start_proxy(
            tmp_path,
            [sick.url, well.url],
            pki,
            server={"admin": f"tcp:{admin_port}:interface=127.0.0.1"},
            health_path="/health",
            health_interval=0.5,
            health_timeout=2,
        ) as proxy:
            eventually(lambda: up_metric(admin_port, sick.url) == "1.0", "listed as up")
            health_file.write_text("503")
            eventually(lambda: up_metric(admin_port, sick.url) == "0.0", "taken out")
            ready = admin(admin_port, "/readyz")
            assert ready.status_code == 200  # the other one answers
            assert f"upstream {sick.url} (site localhost): down" in ready.text
            assert "GET /health answered 503" in ready.text
            assert f"upstream {well.url} (site localhost): up" in ready.text
            tags = [marker() for _ in range(8)]
            with proxy.client() as client:
                for tag in tags:
                    assert client.get(f"/whoami?m={tag}").status_code == 200
            assert all(tag in well.hits() and tag not in sick.hits() for tag in tags)
            health_file.unlink()
            eventually(lambda: up_metric(admin_port, sick.url) == "1.0", "back in")
            tags = [marker() for _ in range(8)]
            with proxy.client() as client:
                for tag in tags:
                    assert client.get(f"/whoami?m={tag}").status_code == 200
            assert any(tag in sick.hits() for tag in tags)
            assert "fails its health check, taken out" in proxy.process.output
            assert "passes its health check, back in" in proxy.process.output


def test_all_upstreams_down_is_503_at_once(pki: PKI, tmp_path: Path) -> None:
    """With every upstream refusing, the first request gets 502; the next ones 503 with Retry-After, at once."""
    admin_port = free_port()
    urls = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    with start_proxy(tmp_path, urls, pki, server={"admin": f"tcp:{admin_port}:interface=127.0.0.1"}) as proxy:
        with proxy.client() as client:
            assert client.get("/whoami").status_code == 502
            for _ in range(5):
                started = time.monotonic()
                response = client.get("/whoami")
                assert response.status_code == 503
                assert time.monotonic() - started < 1.0
                assert 1 <= int(response.headers["retry-after"]) <= 10
        ready = admin(admin_port, "/readyz")
        assert ready.status_code == 503
        for url in urls:
            assert f"upstream {url} (site localhost): down" in ready.text
        metrics = admin(admin_port, "/metrics").text
        assert f'tlsproxy_upstream_failures_total{{route="",site="localhost",upstream="{urls[0]}"}} 1.0' in metrics

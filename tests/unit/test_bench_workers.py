"""The arithmetic of bench/run.py's --workers case: CPU per request, the x2 / x1 ceiling, the table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

RUN_PY = Path(__file__).resolve().parents[2] / "bench" / "run.py"


@pytest.fixture(scope="module")
def run() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", RUN_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def cost(run: ModuleType, rps: float, seconds: float, p_us: float, wrk_us: float, backend_us: float, **kw: Any) -> Any:
    """A RunCost of ``seconds`` on 2 cores at ``rps``, with the given CPU per request, the rest idle."""
    requests = int(rps * seconds)
    proxy, wrk, backend = (requests * us / 1e6 for us in (p_us, wrk_us, backend_us))
    total = 2 * seconds
    fields = {"irq": 0.0, "steal": 0.0, **kw}
    idle = kw.get("idle", total - proxy - wrk - backend - fields["irq"] - fields["steal"])
    fields["idle"] = idle
    return run.RunCost(rps=rps, requests=requests, proxy=proxy, wrk=wrk, backend=backend, total=total, **fields)


def test_ceiling_is_two_p_over_p_plus_b(run: ModuleType) -> None:
    """2p/(p+b): 2 with a free load generator, 1.18 when it costs 0.7 of the proxy, never below 1."""
    assert run.ratio_ceiling(1.0, 0.0) == 2.0
    assert run.ratio_ceiling(1.0, 0.7) == pytest.approx(1.176, abs=1e-3)
    assert run.ratio_ceiling(1.0, 1.0) == 1.0
    assert run.ratio_ceiling(1.0, 3.0) == 1.0
    assert run.ratio_ceiling(1.0, 1.0, cores=4) == 2.0
    with pytest.raises(ValueError):
        run.ratio_ceiling(0.0, 1.0)


def test_machine_times_reads_the_first_line_of_proc_stat(run: ModuleType) -> None:
    """idle counts iowait, irq counts softirq, total is every field but guest, all in seconds."""
    tck = run.CLK_TCK
    first = f"cpu  {10 * tck} 0 {5 * tck} {20 * tck} {tck} 0 {2 * tck} {3 * tck} {7 * tck} 0"
    stat = first + "\ncpu0 1 2 3 4 5 6 7 8 9 10\n"
    assert run.machine_times(stat) == {"idle": 21.0, "irq": 2.0, "steal": 3.0, "total": 41.0}


def test_costs_per_request_and_cores(run: ModuleType) -> None:
    """p and b (wrk + backend + irq) are CPU-seconds per request; cores divide by wall time; others is the rest."""
    c = run.RunCost(
        rps=1000.0, requests=10_000, proxy=5.0, wrk=2.0, backend=1.0, idle=4.0, irq=1.0, steal=0.5, total=20.0
    )
    assert c.p == pytest.approx(5e-4)
    assert c.b == pytest.approx(4e-4)  # wrk, backend and the kernel's irq time
    assert c.wall == 10.0
    assert c.cores(c.proxy) == pytest.approx(0.5)
    assert c.others == pytest.approx(20.0 - 4.0 - 1.0 - 0.5 - 8.0)


def test_gap_factors_multiply_to_achieved_over_ceiling(run: ModuleType) -> None:
    """achieved/ceiling = (1/x1 proxy cores) x (x2's share of the machine) x (x1 cost / x2 cost)."""
    one = cost(run, 10_000, 10, 80, 30, 26, irq=0.5)  # the proxy at 0.8 core
    two = cost(run, 12_000, 10, 88, 31, 27, irq=0.6)  # 1.8 of 2 cores, 9% more per request
    g = run.gap_factors(one, two)
    assert g["x1_proxy_cores"] == pytest.approx(0.8)
    assert g["x2_ours_share"] == pytest.approx((12_000 * 146e-6 + 0.06) / 2)
    achieved = two.rps / one.rps
    ceiling = run.ratio_ceiling(one.p, one.b)
    assert g["x1_proxy_cores"] ** -1 * g["x2_ours_share"] * g["cost_x1_over_x2"] == pytest.approx(achieved / ceiling)


def test_workers_table_shows_costs_ceiling_and_targets(run: ModuleType) -> None:
    """The table has every run's p and b, each proxy's ceiling, achieved ratio and the targets' verdicts."""
    results = {
        ("nginx", 1): cost(run, 26_000, 10, 30, 25, 15),
        ("nginx", 2): cost(run, 26_500, 10, 30, 25, 15),
        ("tlsproxy", 1): cost(run, 13_000, 10, 70, 30, 19),
        ("tlsproxy", 2): cost(run, 15_600, 10, 75, 30, 19, lead=0.01, workers=(0.5, 0.49)),
    }
    text = "\n".join(run.workers_table(results))
    assert "| keep-alive req/s | 26,000 | 26,500 | 13,000 | 15,600 | 1.20 | 1.02 | 0.59 |" in text
    assert "| p: proxy CPU per request (us) | 30.0 | 30.0 | 70.0 | 75.0 |" in text
    assert "| b: wrk + backend + irq per request (us) | 40.0 | 40.0 | 49.0 | 49.0 |" in text
    assert "- nginx: ceiling 1.00, achieved 1.02" in text
    # tlsproxy: 2 x 70 / (70 + 49) = 1.18; 1.20 / 1.18 = 1.02; p grew 75/70 = 1.07.
    assert "- tlsproxy: ceiling 1.18, achieved 1.20, achieved / ceiling 1.02; p x2 / x1 1.07" in text
    assert "tlsproxy x2 per worker: 0.05 cores, 0.05 cores; the supervisor 0.001 cores" in text
    assert "- tlsproxy workers = 2 >= 1.35x workers = 1: 1.20 -> NOT MET" in text
    assert "- tlsproxy workers = 2 >= 0.40 of nginx worker_processes 2: 0.59 -> MET" in text
    assert "Other processes" not in text  # everything else was idle


def test_workers_table_says_when_other_work_shared_the_machine(run: ModuleType) -> None:
    """A run during which other processes used a core is labelled: its req/s are not quiet-machine figures."""
    quiet = cost(run, 10_000, 10, 50, 20, 10)
    loaded = cost(run, 8_000, 10, 50, 20, 10, idle=0.0)  # 20 s - 80,000 x 80 us ours: 13.6 s of others
    text = "\n".join(run.workers_table({("tlsproxy", 1): quiet, ("tlsproxy", 2): loaded}))
    assert "Other processes kept up to 1.36 cores busy during these runs" in text


def test_workers_table_says_na_for_a_run_that_failed(run: ModuleType) -> None:
    """A proxy that did not start shows n/a with the reason, and no ceiling."""
    results = {("nginx", 1): cost(run, 26_000, 10, 30, 25, 15), ("nginx", 2): run.NA("nginx exited with 1")}
    text = "\n".join(run.workers_table(results))
    assert "n/a (nginx exited with 1)" in text
    assert "- nginx: n/a" in text and "- tlsproxy: n/a" in text


def test_wrk_reports_completed_requests(run: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """wrk's "N requests in" count is kept: per-request CPU divides by it."""
    out = (
        "Running 3s test @ https://localhost:1/small\n  2 threads and 32 connections\n"
        "  27433 requests in 3.00s, 6.02MB read\nRequests/sec:   9137.53\nTransfer/sec:      2.01MB\n"
    )
    monkeypatch.setattr(run, "run_tool", lambda argv, timeout, pinned=True: out)
    assert run.wrk("https://localhost:1/small", 3, pinned=False, threads=2) == {
        "rps": 9137.53,
        "errors": 0.0,
        "requests": 27433.0,
    }


def test_a_target_missed_by_a_hair_shows_the_third_decimal(run: ModuleType) -> None:
    """0.397 of nginx is NOT MET and says 0.397, not 0.40."""
    results = {
        ("nginx", 2): cost(run, 10_000, 10, 30, 25, 15),
        ("tlsproxy", 2): cost(run, 3_970, 10, 70, 30, 19),
    }
    text = "\n".join(run.workers_table(results))
    assert "- tlsproxy workers = 2 >= 0.40 of nginx worker_processes 2: 0.397 -> NOT MET" in text

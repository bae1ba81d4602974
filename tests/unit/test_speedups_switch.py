"""TLSPROXY_PURE_PYTHON: 1/true/yes turn the C accelerator off, 0/false/no/empty leave it on, others are said."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from twisted.logger import globalLogPublisher

from tlsproxy import speedups


@pytest.fixture
def said() -> Any:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "tlsproxy.speedups":
            lines.append(event["log_format"].format(**event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.mark.parametrize("value", ["1", "true", "yes", "YES", " True "])
def test_on_values_ask_for_pure_python(value: str, said: list[str]) -> None:
    """Each spelling of "on" turns the accelerator off, silently."""
    assert speedups.pure_python({"TLSPROXY_PURE_PYTHON": value})
    assert speedups.load({"TLSPROXY_PURE_PYTHON": value}) is None
    assert said == []


@pytest.mark.parametrize("value", ["0", "false", "no", "No", ""])
def test_off_values_keep_the_accelerator(value: str, said: list[str]) -> None:
    """=0 (and false, no, empty) leaves the C accelerator on, silently."""
    assert not speedups.pure_python({"TLSPROXY_PURE_PYTHON": value})
    assert not speedups.pure_python({})
    assert said == []


def test_zero_keeps_the_built_accelerator_in_a_new_process() -> None:
    """A process started with TLSPROXY_PURE_PYTHON=0 uses the built C module (=0 once turned it off)."""
    pytest.importorskip("tlsproxy._speedups")
    code = "from tlsproxy.speedups import speedups; print(speedups is not None)"
    env = {**os.environ, "TLSPROXY_PURE_PYTHON": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout == "True\n"


def test_unknown_value_is_said_and_keeps_the_accelerator(said: list[str]) -> None:
    """A value that is neither on nor off gets one warning naming it, and the default (accelerator on)."""
    assert not speedups.pure_python({"TLSPROXY_PURE_PYTHON": "maybe"})
    assert len(said) == 1
    assert "TLSPROXY_PURE_PYTHON='maybe'" in said[0] and "stays on" in said[0]

"""Every TOML block of docs/django.md loads with `tlsproxy check`, so the page cannot rot."""

from __future__ import annotations

import io
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tlsproxy.cli import main

PAGE = Path(__file__).resolve().parents[2] / "docs" / "django.md"
BLOCK = re.compile(r"^```toml\n(.*?)^```$", re.S | re.M)


def blocks() -> list[str]:
    return BLOCK.findall(PAGE.read_text(encoding="utf-8"))


def as_config(text: str, first: dict[str, Any]) -> str:
    """A block as a whole file: a lone [[site]] borrows [server] and [acme] from the page's first block."""
    raw = tomllib.loads(text)
    if "server" in raw or "acme" in raw:
        return text
    head = {key: value for key, value in first.items() if key != "site"}
    lines = []
    for section, table in head.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n\n" + text


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def test_the_page_has_its_blocks() -> None:
    """The page shows the whole front first (static, media, compress, redirect_from, routes), then its parts."""
    found = blocks()
    assert len(found) >= 5
    whole = tomllib.loads(found[0])
    site = whole["site"][0]
    assert {"server", "acme"} <= whole.keys()
    assert {"redirect_from", "compress", "static", "routes"} <= site.keys()
    assert {"/static/", "/media/"} <= site["static"].keys() and "/ws/" in site["routes"]


@pytest.mark.parametrize("index", range(len(blocks())))
def test_block_passes_tlsproxy_check(index: int, tmp_path: Path) -> None:
    """Each TOML block of docs/django.md, as a file, gets exit 0 and "configuration OK" from `tlsproxy check`."""
    found = blocks()
    config = tmp_path / "config.toml"
    config.write_text(as_config(found[index], tomllib.loads(found[0])), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    code = main(["check", "--config", str(config)], out, err)
    assert code == 0, err.getvalue()
    assert "configuration OK" in out.getvalue()

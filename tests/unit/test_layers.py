"""The folders are layers: every import of tlsproxy points down (or sideways within a layer), never up."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

import tlsproxy

PACKAGE = Path(tlsproxy.__file__).parent

# Each unit (a folder of tlsproxy, or a module at its top) and its layer,
# lowest first.  A unit may import its own layer and the ones below.
LAYERS: dict[str, int] = {
    # Wrappers around the private APIs of our dependencies: they know nothing of ours.
    "compat": 0,
    # The event loop's helpers, shared by every protocol: the C accelerator,
    # timers, writes that go out now, and what a listening socket does.
    "_speedups": 1,
    "speedups": 1,
    "deadline": 1,
    "eventloop": 1,
    "listening": 1,
    # PROXY protocol headers, read before TLS or HTTP on a haproxy: listener.
    "proxyprotocol": 1,
    # The process's log lines on stdout: the access log hands its lines straight to them.
    "logs": 1,
    # Certificates as values, their store on disk, and the challenge tables
    # through which the issuer (acme) hands answers to the listeners (tls, http).
    "certs": 2,
    # TLS is the transport: it carries whatever protocol ALPN picks and knows no HTTP.
    "tls": 3,
    # HTTP/1.1 and HTTP/2 over that transport (negotiate reads the ALPN names of tls).
    "http": 4,
    # The configuration is a model of plain values: it validates against the TLS
    # policy and takes its defaults from the HTTP limits; acme and proxy read it.
    "config": 5,
    # Certificate issuance; it serves its challenges through tables of certs/.
    "acme": 6,
    # The proxy engine: HTTP exchanges relayed to the app.
    "proxy": 7,
    # What a process is assembled from: the service, the command line, the
    # admin and metrics endpoints, logging, the checks before start, the dev CA.
    "admin": 8,
    "audit": 8,
    "cli": 8,
    "devca": 8,
    "metrics": 8,
    "preflight": 8,
    "passwd": 8,
    "tap": 8,
    "workers": 8,
}

# Imports the layers above would allow but the design does not.
FORBIDDEN: list[tuple[str, str, str]] = [
    (
        "tlsproxy.proxy",
        "tlsproxy.tls.transport",
        "the proxy engine is transport-agnostic; writes that go out now live in tlsproxy.eventloop",
    ),
    (
        "tlsproxy.proxy",
        "tlsproxy.http.plain",
        "port 80's handler is not a library; host parsing lives in tlsproxy.http.wire",
    ),
]


@dataclasses.dataclass(frozen=True)
class Edge:
    source: str  # the importing module
    target: str  # the imported module (or module.name for ``from module import name``)
    line: int


def module_name(path: Path) -> str:
    parts = ("tlsproxy", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool = False) -> Iterator[Edge]:
    """Every tlsproxy import in ``source``, at any depth (functions, ``if TYPE_CHECKING``)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Edge(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                yield Edge(module, f"{target}.{alias.name}", node.lineno)


def all_edges() -> list[Edge]:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        found = imports_of(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
        edges += [e for e in found if e.target.split(".")[0] == "tlsproxy"]
    return edges


def unit_of(module: str) -> str:
    """``tlsproxy.http.server`` -> ``http``; ``tlsproxy.tap`` -> ``tap``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (node -> the nodes it imports), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node, [])
        if cycle:
            return cycle
    return None


def package_cycle(edges: list[Edge]) -> list[str] | None:
    """One cycle among the units, or None."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        a, b = unit_of(e.source), unit_of(e.target)
        if a and b and a != b:
            graph.setdefault(a, set()).add(b)
    return find_cycle(graph)


def module_cycle(edges: list[Edge], modules: set[str]) -> list[str] | None:
    """One cycle among the modules, or None (``from package import name`` counts as importing the package)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        target = e.target
        while target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in modules and not within(e.source, target):  # a module's own package is no cycle
            graph.setdefault(e.source, set()).add(target)
    return find_cycle(graph)


def where(edge: Edge) -> str:
    return f"{edge.source} (line {edge.line}) imports {edge.target}"


# -- the checker itself -------------------------------------------------------


def test_imports_found_at_any_depth() -> None:
    """Imports inside functions and relative imports are resolved and seen."""
    source = "import os\nfrom . import pages\ndef f():\n    from ..acme.challenges import X\n    import tlsproxy.tap\n"
    found = {(e.target, e.line) for e in imports_of(source, "tlsproxy.http.plain")}
    assert found == {
        ("os", 1),
        ("tlsproxy.http.pages", 2),
        ("tlsproxy.acme.challenges.X", 4),
        ("tlsproxy.tap", 5),
    }
    assert {e.target for e in imports_of("from . import wire", "tlsproxy.http", is_package=True)} == {
        "tlsproxy.http.wire"
    }


def test_cycle_finder_finds_a_cycle() -> None:
    """Two packages, or two modules, that import each other are reported as a cycle."""
    edges = [Edge("tlsproxy.tls.sni", "tlsproxy.acme.challenges", 1), Edge("tlsproxy.acme.x", "tlsproxy.tls.y", 1)]
    assert package_cycle(edges) == ["acme", "tls", "acme"]
    assert package_cycle(edges[:1]) is None
    modules = {"tlsproxy.http.server", "tlsproxy.http.h2", "tlsproxy.http"}
    loop = [
        Edge("tlsproxy.http.h2", "tlsproxy.http.server.Limits", 1),
        Edge("tlsproxy.http.server", "tlsproxy.http.h2", 9),
    ]
    assert module_cycle(loop, modules) == ["tlsproxy.http.h2", "tlsproxy.http.server", "tlsproxy.http.h2"]
    assert module_cycle([Edge("tlsproxy.http.server", "tlsproxy.http.pages", 1), *loop[:1]], modules) is None


# -- the rules ----------------------------------------------------------------


def test_every_unit_has_a_layer() -> None:
    """A new folder or top-level module must be given a layer before it is imported or imports."""
    units = {unit_of(module_name(p)) for p in PACKAGE.rglob("*.py")} - {""}
    assert units - LAYERS.keys() == set()


def test_imports_point_down() -> None:
    """No module imports a unit of a higher layer."""
    upward = [
        f"{where(e)}: {unit_of(e.source)} (layer {LAYERS[unit_of(e.source)]}) is below "
        f"{unit_of(e.target)} (layer {LAYERS[unit_of(e.target)]})"
        for e in all_edges()
        if unit_of(e.target) and LAYERS[unit_of(e.source)] < LAYERS[unit_of(e.target)]
    ]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize(("importer", "imported", "why"), FORBIDDEN)
def test_forbidden_imports(importer: str, imported: str, why: str) -> None:
    """Imports the layering allows but the design rules out stay out."""
    found = [where(e) for e in all_edges() if within(e.source, importer) and within(e.target, imported)]
    assert not found, f"{why}: " + "; ".join(found)


def test_no_cycle_between_units() -> None:
    """The units import each other without a cycle, within a layer too."""
    cycle = package_cycle(all_edges())
    assert cycle is None, " -> ".join(cycle or ())


def test_no_cycle_between_modules() -> None:
    """No two modules import each other, even through others or inside functions."""
    cycle = module_cycle(all_edges(), {module_name(p) for p in PACKAGE.rglob("*.py")})
    assert cycle is None, " -> ".join(cycle or ())


def test_tls_reads_no_http_limits() -> None:
    """The TLS layer gets its deadlines as numbers, never by reading the HTTP side's ``limits``."""
    reads = [
        f"{module_name(path)} line {node.lineno}"
        for path in sorted((PACKAGE / "tls").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute) and node.attr == "limits"
    ]
    assert not reads, "reads .limits: " + ", ".join(reads)

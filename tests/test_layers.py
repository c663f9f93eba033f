"""The package reads top to bottom: every import (at module level or inside a function) points to the same layer
or a lower one, and no set of modules imports itself round in a circle.

Layers, lowest first (README's package map): catalog (the page, the quant recipes, the device catalog); the
shared leaf modules (schema, config, stats, llamalog); gguf (the one header reader); sources (synthetic,
quantize, hub, local, probe models); measure (runner, worker, bench, memory, env); analysis (points, fit,
calibration, predict, summary); report; the command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "harness"

LAYERS: list[tuple[str, ...]] = [
    ("harness.catalog",),
    ("harness.schema", "harness.config", "harness.stats", "harness.llamalog"),
    ("harness.gguf",),
    ("harness.sources",),
    ("harness.measure",),
    ("harness.analysis",),
    ("harness.report",),
    ("harness.estimate", "harness.importer", "harness.simulate", "harness.query", "harness.compare", "harness.cli",
     "harness.__main__", "harness"),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer_of(mod: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for pre in prefixes:
            if (mod == pre or mod.startswith(pre + ".")) and len(pre) > best_len:
                best, best_len = i, len(pre)
    if best is None:
        raise AssertionError(f"{mod} is in no layer: add it to LAYERS (and README's package map)")
    return best


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The harness modules `path` imports anywhere in its body (`from harness.x import y` counts as harness.x.y
    where that is a module, else as harness.x)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("harness"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(p, known) - {m} for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def test_no_import_points_up_the_layers():
    g = graph()
    up = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
          for m, deps in g.items() for d in sorted(deps)
          if layer_of(d) > layer_of(m) and not (m.startswith(d + ".") or d == "harness")]
    assert not up, "imports pointing up the layers:\n" + "\n".join(up)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, f"import cycles: {found}"


@pytest.mark.parametrize("g, want", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set(), "c": {"b"}}, []),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["a", "b"], ["c", "d"]]),
])
def test_cycle_finder_finds_what_is_there(g, want):
    assert sorted(cycles(g)) == want


def test_the_checks_see_a_planted_cycle_and_an_upward_import(tmp_path):
    # hub <-> sources, as the house had it: the import walker must see both directions, lazy imports included
    (tmp_path / "hub.py").write_text("from harness.sources import base\n")
    (tmp_path / "base.py").write_text("def f():\n    from harness.sources import hub\n")
    known = {"harness.sources.hub", "harness.sources.base"}
    g = {"harness.sources.hub": imports_of(tmp_path / "hub.py", known),
         "harness.sources.base": imports_of(tmp_path / "base.py", known)}
    assert cycles(g) == [["harness.sources.base", "harness.sources.hub"]]
    (tmp_path / "bench.py").write_text("from harness.analysis import summary\n")
    assert imports_of(tmp_path / "bench.py", {"harness.analysis.summary"}) == {"harness.analysis.summary"}
    assert layer_of("harness.analysis.summary") > layer_of("harness.measure.bench")

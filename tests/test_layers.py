"""Layers point one way: the packages' import statements (every one, also those inside
functions, read with ast) draw no arrow from the core packages up to the MiniWorld plugin
or the training callbacks, and no package cycle; concept sources ("demo",
"miniworld:<name>") resolve through datamodules.sources, which MiniWorld registers with."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ["datamodules", "components", "lightning_modules", "samplers", "evaluation"]
UP = ["miniworld", "callbacks"]


def packages() -> list[str]:
    return sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests")


def import_graph() -> dict[str, dict[str, list[str]]]:
    """package -> {imported package: ['file:line', ...]}"""
    pkgs = set(packages())
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in pkgs}
    for pkg in pkgs:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in pkgs and top != pkg:
                        graph[pkg].setdefault(top, []).append(f"{f.relative_to(ROOT)}:{node.lineno}")
    return graph


def cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_core_never_imports_the_plugin_or_the_callbacks():
    graph = import_graph()
    assert set(CORE + UP) <= set(graph)
    arrows = {f"{src} -> {dst}": where for src in CORE for dst, where in graph[src].items() if dst in UP}
    assert not arrows, arrows


def test_no_package_cycle():
    graph = import_graph()
    assert cycles(graph) == []
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {}}) == [["a", "b", "c"]]  # the check itself


def test_concept_sources_resolve_through_the_registry(monkeypatch):
    import pytest

    from datamodules import sources
    from datamodules.concept import ConceptDataModule

    seen = []

    def fake(spec):
        seen.append(spec)
        return sources.ConceptSource(str(sources.resolve_source("demo").folder), "thing", "fake")

    monkeypatch.setitem(sources._SOURCES, "fake", fake)
    dm = ConceptDataModule(concept_dir="fake:one:two", resolution=32, batch_size=2)
    assert seen == ["one:two"] and dm.superclass == "thing"
    assert Path(dm.concept_dir) == Path(sources.resolve_source("demo").folder)
    assert sources.resolve_source("some/folder") is None and not sources.is_source("C_drive/x:y")
    mw = sources.resolve_source("miniworld:green_dotted_cube:3")  # miniworld registers itself when asked for
    assert Path(mw.folder, "concept.json").is_file() and mw.name == "green_dotted_cube"
    assert len([p for p in Path(mw.folder).iterdir() if p.suffix == ".png" and "_mask" not in p.stem]) == 3
    with pytest.raises(ValueError, match="Unknown MiniWorld concept"):
        sources.resolve_source("miniworld:nope")

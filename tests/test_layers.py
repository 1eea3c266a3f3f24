"""The rooms import one way, and no module imports itself back through others.

Reads every module's imports with ``ast`` (module-level and inside functions alike, since a
function-level import is still a dependency) and checks them against the layer table of
``docs/ARCHITECTURE.md``:

    base ← runtime ← service;  base, runtime ← training ← export;  roof (cli, demo) → all

A computed import (``importlib.import_module`` / ``__import__`` with anything but a
string literal) is refused too, since it would hide an edge from this test, unless the module
names it can import stand in a literal table in the same file (the lazy attributes of the
public API): each name in the table then counts as an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# source folder → installed package
SOURCES = {"modloc": "modloc", "engine": "modloc.engine", "training": "modloc.training",
           "export": "modloc.export"}

# room → the rooms it may import (itself included)
ALLOWED = {
    "version": {"version"},
    "base": {"version", "base"},
    "runtime": {"version", "base", "runtime"},
    "service": {"version", "base", "runtime", "service"},
    "training": {"version", "base", "runtime", "training"},
    "export": {"version", "base", "runtime", "training", "export"},
    "roof": {"version", "base", "runtime", "service", "training", "export", "roof"},
}


def room(module: str) -> str:
    """The room of a ``modloc`` module name."""
    if module == "modloc._version":
        return "version"
    for prefix, name in (("modloc.engine._native", "base"), ("modloc.engine._proto", "base"),
                         ("modloc.engine.base", "base"), ("modloc.engine.runtime", "runtime"),
                         ("modloc.engine.service", "service"), ("modloc.training", "training"),
                         ("modloc.export", "export")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    if module in ("modloc.engine",):  # the package docstring: imports nothing
        return "base"
    return "roof"  # modloc (the public API), modloc.cli, modloc.demo, modloc.__main__


def source_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            if "_proto" in relative.parts[:1]:
                continue  # generated at build time
            parts = [p for p in relative.parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def imports_of(module: str, path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """``(imported modloc modules, computed imports)`` of one source file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    computed = []
    table = {node.value for statement in tree.body if isinstance(statement, (ast.Assign, ast.AnnAssign))
             for node in ast.walk(statement)
             if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and node.value.startswith("modloc.")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # ``from package import submodule`` imports the submodule
            found.update(f"{target}.{alias.name}" for alias in node.names
                         if f"{target}.{alias.name}" in known)
        elif isinstance(node, ast.Call):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            if name in ("import_module", "__import__") and not (
                    node.args and isinstance(node.args[0], ast.Constant)):
                if not table:
                    computed.append(f"{path}:{node.lineno}")
                found.update(table)
            elif name in ("import_module", "__import__"):
                found.add(node.args[0].value)
    return {name for name in found if name == "modloc" or name.startswith("modloc.")}, computed


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = source_modules()
    known = set(modules)
    edges = {}
    for module, path in modules.items():
        targets, computed = imports_of(module, path, known)
        assert not computed, f"computed imports hide dependencies: {computed}"
        edges[module] = {t for t in targets if t != module}
    return edges


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{source} ({room(source)}) imports {target} ({room(target)})"
                  for source, targets in graph.items() for target in targets
                  if room(target) not in ALLOWED[room(source)])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_import_points_down_the_layers(graph):
    assert upward_edges(graph) == []


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_the_checks_catch_an_upward_edge_and_a_cycle():
    bad = {"modloc.engine.base.features": {"modloc.engine.runtime.pipeline"},
           "modloc.engine.runtime.pipeline": {"modloc.engine.base.features"},
           "modloc.training.trainer": {"modloc.engine.service.core"},
           "modloc.engine.service.core": set()}
    assert upward_edges(bad) == [
        "modloc.engine.base.features (base) imports modloc.engine.runtime.pipeline (runtime)",
        "modloc.training.trainer (training) imports modloc.engine.service.core (service)"]
    assert cycles(bad) == [["modloc.engine.base.features", "modloc.engine.runtime.pipeline"]]


def test_a_computed_import_is_reported(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("import importlib\nname = 'cli'\nimportlib.import_module(f'modloc.{name}')\n"
                    "from modloc.engine.base import vocab\n")
    found, computed = imports_of("modloc.engine.base.probe", path, {"modloc.engine.base.vocab"})
    assert computed == [f"{path}:3"]
    assert found == {"modloc.engine.base", "modloc.engine.base.vocab"}


def test_a_computed_import_from_a_literal_table_counts_its_names(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("import importlib\nTABLE = {'x': 'modloc.engine.service.core'}\n"
                    "def get(name):\n    return importlib.import_module(TABLE[name])\n")
    found, computed = imports_of("modloc.engine.base.probe", path, set())
    assert computed == [] and found == {"modloc.engine.service.core"}
    assert upward_edges({"modloc.engine.base.probe": found}) == [
        "modloc.engine.base.probe (base) imports modloc.engine.service.core (service)"]

"""The package's layering, read from its own import statements (function-level imports included):
no import cycle between modules, the bottom modules (run configuration, canvas, logical-axis
table) import nothing from dirl_jax, and dirl_jax never imports torch or torch_bridge (the torch
side depends on dirl_jax, never the reverse)."""

from __future__ import annotations

import ast
import pathlib

import pytest

from conftest import REPO

PACKAGE = REPO / "dirl_jax"
BOTTOM = ("dirl_jax.config", "dirl_jax.canvas", "dirl_jax.sharding")
FORBIDDEN_ROOTS = ("torch", "torch_bridge")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: pathlib.Path) -> set[str]:
    """Every absolute module an ``import`` / ``from ... import`` in ``path`` names; for
    ``from package import name`` the submodule ``package.name`` when it is one (importing a
    submodule runs its package's ``__init__`` first, which is not a dependency of the importer)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names}
            names.update(submodules & MODULES.keys() or {node.module})
    return names


def edges() -> dict[str, set[str]]:
    """Module -> the dirl_jax modules it imports."""
    return {name: {m for m in imported_names(path) if m in MODULES and m != name}
            for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def package_edges() -> dict[str, set[str]]:
    """The same graph between the top-level modules and subpackages (``dirl_jax.model.*`` is one
    node): two folders that import each other are a cycle even when their modules are not."""
    top = lambda name: ".".join(name.split(".")[:2])  # noqa: E731
    graph: dict[str, set[str]] = {}
    for name, targets in edges().items():
        graph.setdefault(top(name), set()).update(top(t) for t in targets if top(t) != top(name))
    return graph


def test_no_import_cycles():
    assert cycles(edges()) == []


def test_no_cycles_between_subpackages():
    assert cycles(package_edges()) == []


@pytest.mark.parametrize("bottom", BOTTOM)
def test_bottom_modules_import_nothing_from_the_package(bottom):
    assert bottom in MODULES
    inside = {m for m in imported_names(MODULES[bottom]) if m.split(".")[0] == "dirl_jax"}
    assert inside == set(), f"{bottom} imports {sorted(inside)}"


def test_the_package_never_imports_torch_or_torch_bridge():
    offenders = {name: sorted(m for m in imported_names(path)
                              if m.split(".")[0] in FORBIDDEN_ROOTS)
                 for name, path in MODULES.items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_checker_sees_a_cycle_and_a_bottom_import():
    """The checks themselves can fail: a two-module cycle is found, and a bottom module's
    package import is seen."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert "dirl_jax.attention" in package_edges()["dirl_jax.model"]
    assert "dirl_jax.attention" in edges()["dirl_jax.model.sdar"]

"""The package's layers, as a property of its imports: every capsbench module imports only from
its own layer or lower ones (function-level imports included), and no import circle exists."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "capsbench"
# Lowest first. A module may import from its own layer and the ones before it.
LAYERS = ["core", "data", "models", "attacks", "train", "report", "parts", "run", "cli"]
RUN = {"suite", "runner"}  # top-level modules of the run layer
CLI = {"cli", "__main__"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """'capsbench.train.step' -> 'train'; 'capsbench.runner' -> 'run'; 'capsbench' -> 'core'."""
    parts = module.split(".")
    if len(parts) == 1:
        return "core"  # capsbench/__init__.py: the version string only
    top = parts[1]
    if top in RUN:
        return "run"
    if top in CLI:
        return "cli"
    return top


def imports(path: Path) -> set[str]:
    """Every capsbench module ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("capsbench")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("capsbench"):
            subs = {f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}")}
            found |= subs if len(subs) == len(node.names) else subs | {node.module}  # `from pkg import submodule`
    return found


def is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@functools.cache
def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_top_level_folder_is_a_known_layer():
    tops = {layer(m) for m in graph()}
    assert tops <= set(LAYERS), f"modules outside the layers {LAYERS}: {sorted(tops - set(LAYERS))}"


@pytest.mark.parametrize("module", sorted(graph()))
def test_no_import_from_a_higher_layer(module):
    rank = LAYERS.index(layer(module))
    higher = sorted(m for m in graph()[module] if LAYERS.index(layer(m)) > rank)
    assert not higher, f"{module} ({layer(module)}) imports from higher layers: {higher}"


def test_no_import_circle():
    g = graph()
    edges = {m: {d for d in deps if d in g and d != m} for m, deps in g.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d] if d in path else [m, d]
                raise AssertionError(f"import circle: {' -> '.join(cycle)}")
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])

"""Guard rails for the layout (docs/design.md, section 3): dependencies run one way,
``tools -> ups -> pipeline``, and no two files import each other, directly or around a loop.

The imports are read from the source with ``ast`` (every ``import``, at any depth, type-checking
imports included), so a lazy import inside a function cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "ups")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports (``from a.b import c`` counts as a.b, or a.b.c when
    that is a module itself)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_is_read() -> None:
    """The checks below mean something only if the parser sees the imports we know of."""
    edges = graph()
    assert (
        "pipeline.shards" in edges["pipeline.loader"]
        or "pipeline.graph" in edges["pipeline.loader"]
    )
    assert "pipeline.loader" in edges["ups.training.train"]
    assert "pipeline.formats.zarr" in edges["pipeline.formats"]


def test_pipeline_imports_nothing_from_ups() -> None:
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in graph().items()
        if module.startswith("pipeline")
        for target in targets
        if target.split(".")[0] == "ups"
    )
    assert offenders == [], "pipeline/ must not depend on ups/: " + "; ".join(offenders)


def test_no_import_cycles_between_files() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ],
)
def test_the_cycle_finder_finds_cycles(edges, expected) -> None:
    assert find_cycle(edges) == expected

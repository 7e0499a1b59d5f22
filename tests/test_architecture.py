"""The import graph of the package: one direction, no circle (docs/ARCHITECTURE.md).

Every ``import`` statement in ``orthoreg/`` is read with ``ast`` — module-level and the lazy
ones inside functions alike, since a lazy import is still a design-level dependency — and
each module is placed in the layer named by docs/ARCHITECTURE.md. A module may import its
own layer or a lower one, never a higher one, and the module graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "orthoreg"

#: low → high; a prefix names a module or a whole subpackage (the longest prefix wins)
LAYERS: list[tuple[str, ...]] = [
    ("orthoreg._version", "orthoreg.errors", "orthoreg.utils"),
    ("orthoreg.regularizer",),
    ("orthoreg.taskvector",),
    ("orthoreg.heads", "orthoreg.paradigms", "orthoreg.zoo"),
    ("orthoreg.training",),
    ("orthoreg.merging",),
    ("orthoreg.evaluation",),
    ("orthoreg.diagnostics",),
    ("orthoreg.experiment", "orthoreg.clip", "orthoreg.integrations"),
    ("orthoreg.bench",),
    ("orthoreg.cli", "orthoreg.__main__", "orthoreg"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer of docs/ARCHITECTURE.md"
    return best


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``module`` imports (``from a import b`` counts a.b if it is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("orthoreg"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("orthoreg"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
    found.discard(module)
    return {name for name in found if name in modules}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer(graph: dict[str, set[str]]) -> None:
    for module in graph:
        layer_of(module)


def test_no_module_imports_a_higher_layer(graph: dict[str, set[str]]) -> None:
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, targets in graph.items() for b in sorted(targets)
              if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def test_import_graph_has_no_cycle(graph: dict[str, set[str]]) -> None:
    # a package's __init__ importing its own submodules is structure, not a cycle
    def edges(a: str) -> set[str]:
        return {b for b in graph[a] if not b.startswith(a + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges(node)):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt):], nxt]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a lazy import of the CLI from the penalty would be caught."""
    fake = tmp_path / "regularizer.py"
    fake.write_text("def f():\n    from orthoreg.cli import main\n", encoding="utf-8")
    modules = all_modules()
    targets = imports_of("orthoreg.regularizer", fake, modules)
    assert targets == {"orthoreg.cli"}
    assert layer_of("orthoreg.cli") > layer_of("orthoreg.regularizer")

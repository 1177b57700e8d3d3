"""The import rules of docs/ARCHITECTURE.md, read from the source (every import, function-level ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("gem3d", "privacy", "client", "server", "experiments")

# what each layer may not import (a prefix matches the package and its modules)
FORBIDDEN = {
    "gem3d": ("flwr", "opacus", "mlflow", "privacy", "client", "server", "experiments"),
    "privacy": ("flwr", "mlflow", "client", "server", "experiments"),
    "client": ("server", "mlflow", "experiments"),
    "server": ("client", "opacus"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package: str | None = None) -> set[str]:
    """Every module ``path`` imports (absolute names), at any depth of the file; ``package``: the file's package."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    if package is None:
        package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _sources() -> dict[str, Path]:
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    return {_module_name(p): p for p in files if "benchmarks" not in p.parts}


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    return {name: {m for m in _imports(path) if m in sources and m != name} for name, path in sources.items()}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_it_may(layer: str) -> None:
    broken = [
        f"{name} imports {imported}"
        for name, path in _sources().items()
        if name == layer or name.startswith(f"{layer}.")
        for imported in sorted(_imports(path))
        if any(imported == bad or imported.startswith(f"{bad}.") for bad in FORBIDDEN[layer])
    ]

    assert broken == []


@pytest.mark.parametrize(("library", "owners"), [("mlflow", ("experiments.tracking",)), ("opacus", ("privacy",))])
def test_a_framework_is_imported_in_one_place(library: str, owners: tuple[str, ...]) -> None:
    users = sorted(
        name
        for name, path in _sources().items()
        if any(m == library or m.startswith(f"{library}.") for m in _imports(path))
        and not any(name == owner or name.startswith(f"{owner}.") for owner in owners)
    )

    assert users == []


def test_there_is_no_import_cycle() -> None:
    graph = _graph()
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str], done: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycle = [*path[path.index(nxt) :], nxt]
                if not any(set(cycle) == set(c) for c in cycles):
                    cycles.append(cycle)
            elif nxt not in done:
                visit(nxt, [*path, nxt], done)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start], done)

    assert cycles == [], " | ".join(" -> ".join(c) for c in cycles)


def test_the_rule_reader_sees_a_cycle_when_there_is_one(tmp_path: Path) -> None:
    # the reader itself can fail: a package import inside a function still counts
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from experiments.cli import main\n    from . import sibling\n")

    assert {"experiments.cli", "experiments.cli.main", "experiments.sibling"} <= _imports(source, "experiments")

"""The package's floors (docs/ARCHITECTURE.md), checked from the source text.

Every ``import`` of a vitlens module (top-level or inside a function: a lazy import is still a
dependency) must point to the same package or a lower floor, and the package graph has no
circle. Parsing with ``ast`` rather than importing means the rule holds for code paths no test
happens to execute.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vitlens"

# Lower number = lower floor. A package may import its own floor's *listed* neighbours only
# where ALLOWED says so; anything on a strictly lower floor is always fine.
FLOORS = {
    "errors": 0,
    "utils": 1,
    "config": 1,
    "layers": 2,
    "data": 2,
    "io": 2,
    "models": 3,
    "text": 4,
    "train": 5,
    "analysis": 5,
    "study": 6,
    "cli": 7,
    "__init__": 8,
    "__main__": 8,
}
# Same-floor imports that are part of the design (none today: train and analysis never meet).
ALLOWED_SAME_FLOOR: set[tuple[str, str]] = set()


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _imported_packages(path: Path, rel_parts: tuple[str, ...] | None = None) -> set[str]:
    """Top-level vitlens packages that ``path`` imports (relative or absolute). ``rel_parts``: the
    module's place in the package, e.g. ('models', 'tokenizers', 'hybrid'); read from ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel_parts = rel_parts or path.relative_to(SRC).with_suffix("").parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = list(rel_parts[:-1])
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                if not target:  # "from .. import x" at the root: x are top-level packages
                    found.update(alias.name for alias in node.names)
                else:
                    found.add(target[0])
            elif node.module and node.module.split(".")[0] == "vitlens":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "vitlens" and len(parts) > 1:
                    found.add(parts[1])
    return {p for p in found if p in FLOORS}


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in FLOORS}
    for path in SRC.rglob("*.py"):
        pkg = _package_of(path)
        graph.setdefault(pkg, set()).update(_imported_packages(path) - {pkg})
    return graph


def test_every_package_has_a_floor():
    packages = {_package_of(p) for p in SRC.rglob("*.py")}
    missing = packages - set(FLOORS)
    assert not missing, f"packages without a floor in docs/ARCHITECTURE.md: {missing}"


def test_no_import_goes_up_a_floor():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        pkg = _package_of(path)
        for dep in _imported_packages(path) - {pkg}:
            same_allowed = FLOORS[dep] == FLOORS[pkg] and (pkg, dep) in ALLOWED_SAME_FLOOR
            if FLOORS[dep] >= FLOORS[pkg] and not same_allowed:
                bad.append(f"{path.relative_to(SRC)} ({pkg}, floor {FLOORS[pkg]}) imports {dep} "
                           f"(floor {FLOORS[dep]})")
    assert not bad, "imports against the floors:\n" + "\n".join(bad)


def test_models_and_analysis_do_not_import_train():
    graph = _graph()
    assert "train" not in graph["models"]
    assert "train" not in graph["analysis"]
    assert not graph["layers"] - {"errors", "utils", "config"}
    assert not graph["data"] - {"errors", "utils", "config"}
    assert not graph["io"] - {"errors", "utils", "config"}


def test_package_graph_has_no_circle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join(stack + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    # The rule is only as good as the parser: lazy, doubly-relative and absolute imports are found.
    path = tmp_path / "hybrid.py"
    path.write_text("from ..resnet import ResNet\n"
                    "def f():\n    from ...train.trainer import train\n    import vitlens.analysis.cka\n"
                    "from ... import data\n")
    found = _imported_packages(path, ("models", "tokenizers", "hybrid"))
    assert found == {"models", "train", "analysis", "data"}

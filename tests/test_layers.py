"""The package's layers (docs/architecture.md): the import-linter contracts of pyproject.toml hold,
a planted upward import breaks them, and the import graph has no cycle."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[test]')")


def lint(src: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with this repository's contracts on the package under ``src``."""
    return subprocess.run([str(LINT), "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=REPO,
                          env={"PYTHONPATH": str(src), "PATH": str(LINT.parent)}, capture_output=True, text=True)


def test_the_layer_contracts_hold():
    result = lint(REPO / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, planted, message", [
    # A model reaching up to the command line: the layers contract.
    ("models/cam.py", "from ..cli import main", "affinitynet.models is not allowed to import affinitynet.cli"),
    # A stage reaching into a sibling stage: the independence contract.
    ("stages/train_irn.py", "from .train_affinity import make_step",
     "affinitynet.stages.train_irn is not allowed to import affinitynet.stages.train_affinity"),
])
def test_a_planted_violation_breaks_a_contract(tmp_path, module, planted, message):
    copy = tmp_path / "src" / "affinitynet"
    shutil.copytree(REPO / "src" / "affinitynet", copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / module
    path.write_text(path.read_text() + f"\n{planted}  # noqa: E402, F401\n")
    result = lint(tmp_path / "src")
    assert result.returncode != 0
    assert message in " ".join(result.stdout.split()), result.stdout


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The import graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_the_import_graph_has_no_cycle():
    graph = grimp.build_graph("affinitynet")
    assert len(graph.modules) > 50
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = grimp.ImportGraph()
    for importer, imported in [("p.cli", "p.config"), ("p.config", "p.errors"), ("p.errors", "p.registry"),
                               ("p.registry", "p.config"), ("p.cli", "p.errors")]:
        graph.add_import(importer=importer, imported=imported)
    assert cycles(graph) == [["p.config", "p.errors", "p.registry"]]

"""The code's shape, as the project holds it: short modules and functions, no import cycles
between modules of ``pipeline/`` and ``stages/``, and an executor that knows no stage."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``PACKAGES``."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            dotted = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[dotted.removesuffix(".__init__")] = path
    return found


def imported(tree: ast.AST, known: dict[str, Path]) -> Iterator[str]:
    """The project modules a module imports, at module level or inside functions: for
    ``from a import b``, module ``a.b`` when it exists, else ``a``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in known:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                yield child if child in known else node.module


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: set(imported(ast.parse(path.read_text()), known)) - {name}
        for name, path in known.items()
    }


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path of imports from ``start`` back to itself, or None."""
    stack = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph[node]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_and_its_functions_are_short(name: str) -> None:
    path = modules()[name]
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path}: split it by job"
    assert ast.get_docstring(ast.parse(source)), f"{path}: say what the module is for"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            assert lines <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name}: {lines} lines"


def test_no_module_imports_itself_through_others() -> None:
    graph = import_graph()
    cycles = [cycle for name in sorted(graph) if (cycle := cycle_through(graph, name))]
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_executor_knows_no_stage() -> None:
    graph = import_graph()
    reach = {m for name, deps in graph.items() if name.startswith("pipeline") for m in deps}
    assert not [m for m in reach if m.startswith("stages")]


def test_the_model_its_training_step_and_host_import_without_ray_or_mlflow() -> None:
    """``benchmarks/train.py`` runs on accelerator hosts that have neither (a bare image: JAX,
    flax, optax, torch and the small wheels carried with it); a training host that loaded Ray
    for nothing would start a second later."""
    import subprocess
    import sys

    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'mlflow'):\n"
        "            raise ImportError(f'{name} is not on this host')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import stages.train.model, stages.train.optim, stages.train.sharding\n"
        "import stages.train.mfu, stages.train.trainer, benchmarks.train\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocker], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]

"""The core's shape: it never imports Prefect or the app layer (flows/, tasks/), and its imports form a DAG.

Every stage runs as a plain function (and each rank under torchrun) without Prefect. The import
graph counts every import, including ones inside functions, so no cycle can hide behind a
function-local import.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import ptflow

PACKAGE = Path(ptflow.__file__).resolve().parent
IMPORT_PREFECT = re.compile(r"^\s*(import\s+(prefect|flows|tasks)\b|from\s+(prefect|flows|tasks)\b)", re.MULTILINE)

WALK = """
import importlib, json, pkgutil, sys
import ptflow
names = [m.name for m in pkgutil.walk_packages(ptflow.__path__, "ptflow.")]
for name in names:
    importlib.import_module(name)
prefect = sorted(n for n in sys.modules if n == "prefect" or n.startswith("prefect."))
print(json.dumps({"imported": names, "prefect": prefect}))
"""


def test_importing_every_ptflow_module_leaves_prefect_out():
    result = subprocess.run([sys.executable, "-c", WALK], capture_output=True, text=True, timeout=120,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    modules = sorted("ptflow." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
                     for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")
    assert sorted(report["imported"]) == modules  # every module was imported, cli and card included
    assert report["prefect"] == []


def test_no_source_file_imports_prefect():
    offenders = [str(p.relative_to(PACKAGE.parent)) for p in sorted(PACKAGE.rglob("*.py"))
                 if IMPORT_PREFECT.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_the_check_would_catch_an_import():
    assert IMPORT_PREFECT.search("x = 1\nfrom prefect import flow\n")
    assert IMPORT_PREFECT.search("    import prefect.artifacts\n")
    assert not IMPORT_PREFECT.search('FRAMEWORKS = ("torch", "prefect")\n# import prefectish\n')


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """ptflow module -> the ptflow modules it imports anywhere in its source (top level or inside functions)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ptflow"):
                for alias in node.names:  # `from ptflow.data import dataset` imports the module ptflow.data.dataset
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("ptflow"))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if not state.get(nxt) and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if not state.get(start) and (found := visit(start, [])):
            return found
    return None


def test_import_graph_of_the_core_is_a_dag():
    graph = import_graph()
    assert len(graph) > 30 and "ptflow.train.loop" in graph["ptflow.train.rank"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_each_package_has_one_concern_and_init_files_import_nothing():
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert packages == ["config", "data", "publish", "store", "train"]
    for init in PACKAGE.rglob("__init__.py"):
        body = [n for n in ast.parse(init.read_text()).body if not isinstance(n, ast.Expr)]
        assert all(isinstance(n, ast.Assign) for n in body), f"{init} should hold a docstring (and constants) only"


def test_no_function_in_the_training_package_exceeds_80_lines():
    """The loop reads as named pieces (batch source, step, checkpointer, metrics), never one long function."""
    long = []
    for path in sorted((PACKAGE / "train").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long

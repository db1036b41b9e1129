"""The core package never imports Prefect: every stage runs as a plain function (and under accelerate launch)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import ptflow

PACKAGE = Path(ptflow.__file__).resolve().parent
IMPORT_PREFECT = re.compile(r"^\s*(import\s+prefect\b|from\s+prefect\b)", re.MULTILINE)

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

"""Run records: `ptflow runs`, `ptflow --version`, and what a re-used run_name replaces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ptflow
from ptflow.store import runs
from ptflow.store.layout import Layout

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"run_name": "nightly", "seed": 42, "train": {"learning_rate": 1e-3, "max_steps": 30},
          "output": {"hub_token": "hf_secret0123456789", "push_to_hub": False}}


def cli(*args: str, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PTFLOW_HOME": str(store), "PATH": "/usr/bin:/bin",
                                            "PYTHONPATH": ":".join(sys.path)})


def test_reusing_a_run_name_with_another_config_says_what_changes_and_what_it_replaces(tmp_path):
    layout = Layout(tmp_path)
    out = tmp_path / "runs" / "nightly"
    assert runs.begin(layout, "nightly", "a.yaml", [], CONFIG, out) is None  # the first run replaces nothing
    runs.finish(layout, "nightly", "completed", 30)
    assert runs.begin(layout, "nightly", "a.yaml", [], CONFIG, out) is None  # same config: a plain re-run
    changed = {**CONFIG, "train": {"learning_rate": 3e-4, "max_steps": 30}}
    note = runs.begin(layout, "nightly", "b.yaml", ["train.learning_rate=3e-4"], changed, out)
    assert "train.learning_rate 0.001 -> 0.0003" in note and str(out) in note and "another run_name" in note
    assert "max_steps" not in note
    assert "hf_secret" not in layout.run_record("nightly").read_text()  # secrets never reach the record


def test_runs_lists_state_last_step_lineage_and_output_folder(tmp_path):
    layout = Layout(tmp_path)
    runs.begin(layout, "done", "a.yaml", [], CONFIG, tmp_path / "runs" / "done")
    runs.finish(layout, "done", "completed", 30)
    layout.lineage_file("done").parent.mkdir(parents=True)
    layout.lineage_file("done").write_text(json.dumps({"key": "ab" * 32, "total_steps": 30}) + "\n")
    runs.begin(layout, "gone", "a.yaml", [], CONFIG, tmp_path / "out")
    record = json.loads(layout.run_record("gone").read_text())
    layout.run_record("gone").write_text(json.dumps({**record, "pid": 999999}))  # its process was killed
    result = cli("runs", store=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert lines["done"][1:3] == ["completed", "30"] and "abababababab" in result.stdout
    assert lines["gone"][1:3] == ["killed", "-"] and lines["gone"][-1] == str(tmp_path / "out")


def test_version_and_an_empty_store(tmp_path):
    assert cli("--version", store=tmp_path).stdout.strip() == f"ptflow {ptflow.__version__}"
    assert cli("runs", store=tmp_path).stdout.strip() == "no runs in this store yet"

"""Two `ptflow run`s of one config started together on one store (and one Prefect server).

What happens: the per-key file lock in the store (store.key_lock) lets one process build each
stage while the other waits and then reuses the result; training is also serialized by the
`ptflow-train-<run_name>` concurrency slot (tasks/placement.py). So both runs finish, every
store entry is built exactly once, and both runs report the same artifacts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, cli_env

from ptflow.store.entries import check_files, read_manifest
from ptflow.store.layout import MANIFEST

STAGES = ["load_tokenizer", "prepare_dataset", "train", "evaluate", "plot_loss", "write_model_card"]
FAST = ["train.max_steps=12", "train.save_steps=5", "train.eval_steps=6", "train.logging_steps=2",
        "data.cutoff_len=128", "data.val_size=8", "run_name=concurrent"]


def test_two_runs_of_one_config_at_once_build_each_entry_once(prefect_server, tmp_path):
    env = cli_env(tmp_path, PREFECT_API_URL=prefect_server)
    runs = []
    for name in ("a", "b"):
        summary = tmp_path / f"summary-{name}.json"
        runs.append((summary, subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", "configs/quickstart.yaml", *FAST], cwd=ROOT,
            env={**env, "PTFLOW_SUMMARY_JSON": str(summary)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)))
    outputs = [(summary, *proc.communicate(timeout=600), proc.returncode) for summary, proc in runs]
    for _, out, err, code in outputs:
        assert code == 0, err[-3000:]
        assert "Traceback" not in err
    rows = [{r["stage"]: r for r in json.loads(summary.read_text())["stages"]} for summary, *_ in outputs]

    for stage in STAGES:
        a, b = rows[0][stage], rows[1][stage]
        assert (a["key"], a["digest"], a["path"]) == (b["key"], b["digest"], b["path"]), stage
        assert sorted([a["cache"], b["cache"]]) == ["hit", "miss"], (stage, a["cache"], b["cache"])
        builder, other = ("a", b) if a["cache"] == "miss" else ("b", a)
        print(f"{stage}: built by run {builder}; the other run: hit ({other['reason']})")

    store = tmp_path / "store" / "cache"
    for stage_dir in sorted(p for p in store.iterdir() if p.is_dir()):
        entries = [p for p in stage_dir.iterdir() if p.is_dir()]
        assert not [p.name for p in entries if p.name.startswith(".tmp-")], stage_dir  # no abandoned write
        finished = [p for p in entries if (p / MANIFEST).is_file()]
        assert finished, stage_dir
        for folder in finished:
            assert check_files(folder, read_manifest(folder)) is None, folder
        if stage_dir.name in STAGES:
            assert len(finished) == 1, (stage_dir.name, [p.name for p in finished])

    out = Path(json.loads(outputs[0][0].read_text())["output_dir"])
    model = read_manifest(Path(rows[0]["train"]["path"]))
    assert (out / "model.safetensors").stat().st_size == model["files"]["model.safetensors"]["size"]
    lineage = (tmp_path / "store" / "lineage" / "concurrent.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"][:12] for line in lineage] == [rows[0]["train"]["key"]]  # recorded once

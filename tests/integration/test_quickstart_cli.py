"""`ptflow run configs/quickstart.yaml` as a user runs it (embedded Prefect), then again from cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import cli_env, run_cli

FAST = ["train.max_steps=20", "train.save_steps=10", "train.eval_steps=10", "data.val_size=8"]


def test_quickstart_runs_end_to_end_then_reuses_everything(tmp_path):
    env = cli_env(tmp_path, first_start=True, PTFLOW_SUMMARY_JSON=str(tmp_path / "summary.json"))  # a new user
    first = run_cli(env, "run", "configs/quickstart.yaml", *FAST)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    out = Path(summary["output_dir"])
    assert out == tmp_path / "store" / "runs" / "quickstart"
    assert f"outputs in {out}" in first.stdout
    assert summary["final_loss"] < summary["first_loss"]
    assert math.isfinite(summary["perplexity"])
    for name in ("model.safetensors", "trainer_log.jsonl", "train_results.json", "trainer_state.json",
                 "eval_results.json", "all_results.json", "training_loss.png", "training_eval_loss.png", "README.md",
                 "checkpoint-10"):
        assert (out / name).exists(), name
    assert "ptflow.train - train: step 20/20" in first.stdout + first.stderr  # progress reached the console

    second = run_cli(env, "run", "configs/quickstart.yaml", *FAST)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((tmp_path / "summary.json").read_text())
    assert [row["cache"] for row in again["stages"]] == ["hit"] * 6
    assert again["perplexity"] == summary["perplexity"]

"""`ptflow run` on a LLaMA-Factory pt YAML as it is (embedded Prefect): notes printed, LLaMA-Factory's output tree."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import cli_env, run_cli

# flat overrides in LLaMA-Factory's names, as `llamafactory-cli train lf.yaml key=value` takes them
FAST = ["max_steps=20", "save_steps=10", "eval_steps=10", "logging_steps=5", "cutoff_len=128", "val_size=8"]


def test_llamafactory_yaml_runs_through_the_flow_and_leaves_llamafactory_files(tmp_path):
    env = cli_env(tmp_path, PTFLOW_SUMMARY_JSON=str(tmp_path / "summary.json"))
    result = run_cli(env, "run", "configs/llamafactory_pt.yaml", *FAST, f"output_dir={tmp_path / 'saves'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "configs/llamafactory_pt.yaml: LLaMA-Factory pt config, mapped onto ptflow's sections" in result.stdout
    assert "  mapped   disable_gradient_checkpointing (line 10): -> train.gradient_checkpointing = False" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    out = Path(summary["output_dir"])
    assert out == tmp_path / "saves"
    for name in ("model.safetensors", "trainer_log.jsonl", "train_results.json", "trainer_state.json",
                 "eval_results.json", "all_results.json", "training_loss.png", "training_eval_loss.png", "README.md",
                 "checkpoint-10"):
        assert (out / name).exists(), name
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in log if "eval_loss" in r] == [10, 20]
    assert summary["final_loss"] < summary["first_loss"]

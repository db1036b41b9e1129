"""The pretrain flow under a real (temporary) Prefect API, on the quickstart's assets with few steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
STAGES = ["load_tokenizer", "prepare_dataset", "train", "evaluate", "plot_loss", "write_model_card"]
OUTPUT_FILES = ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "trainer_log.jsonl",
                "trainer_state.json", "train_results.json", "eval_results.json", "all_results.json",
                "training_loss.png", "training_eval_loss.png", "README.md", "checkpoint-20"]


def run_flow(store: Path, *extra: str) -> dict:
    from flows.pretrain import pretrain

    overrides = [f"store={store}", "train.max_steps=30", "train.save_steps=20", "train.eval_steps=15",
                 "train.logging_steps=5", "data.cutoff_len=128", "data.val_size=8",  # 1k-token steps, 8 eval docs
                 f"model.model_name_or_path={ROOT / 'configs/quickstart/model'}",
                 f"data.dataset_dir={ROOT / 'configs/quickstart/data'}", *extra]
    return pretrain(config_path=str(QUICKSTART), overrides=overrides)


def verdicts(summary: dict) -> dict[str, str]:
    return {row["stage"]: row["cache"] for row in summary["stages"]}


@pytest.fixture(scope="module")
def first_run(prefect_api, tmp_path_factory) -> dict:
    """One run into an empty store: the expensive part, shared read-only (no test runs the flow on this store)."""
    return run_flow(tmp_path_factory.mktemp("store"))


@pytest.fixture
def store(first_run, tmp_path) -> Path:
    """A store holding exactly what the first run left, this test's own to change."""
    import shutil

    return shutil.copytree(first_run["store"], tmp_path / "store", symlinks=True)


def test_first_run_trains_and_writes_every_output(first_run):
    summary = first_run
    assert verdicts(summary) == {stage: "miss" for stage in STAGES}
    assert summary["final_loss"] < summary["first_loss"] - 0.5
    assert math.isfinite(summary["perplexity"]) and summary["perplexity"] == pytest.approx(math.exp(summary["eval_loss"]))
    out = Path(summary["output_dir"])
    assert out == Path(summary["store"]) / "runs" / "quickstart"
    missing = [name for name in OUTPUT_FILES if not (out / name).exists()]
    assert not missing
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in log if "loss" in r] == [5, 10, 15, 20, 25, 30]
    assert [r["current_steps"] for r in log if "eval_loss" in r] == [15, 30]
    assert load_file(out / "model.safetensors")  # loadable weights, not an empty file
    results = json.loads((out / "all_results.json").read_text())
    assert {"train_loss", "eval_loss", "perplexity", "epoch"} <= set(results)


def test_second_run_reuses_every_stage_computing_each_key_once_even_from_a_copied_store(store, monkeypatch):
    from ptflow.store.stage import Stage

    computed: list[str] = []
    real = Stage.key_parts

    def counting(self, *args, **kwargs):
        computed.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Stage, "key_parts", counting)
    summary = run_flow(store)  # a copy of the first run's store, elsewhere: it is self-contained
    assert verdicts(summary) == {stage: "hit" for stage in STAGES}
    assert sorted(computed) == sorted(STAGES)  # one key computation per stage per run
    assert all(row["reason"] == "all key components unchanged" for row in summary["stages"])
    assert all(Path(row["path"]).is_relative_to(store) for row in summary["stages"])


def test_changing_cutoff_len_redoes_data_and_later_stages_only(store):
    summary = run_flow(store, "data.cutoff_len=64")
    rows = {row["stage"]: row for row in summary["stages"]}
    assert rows["load_tokenizer"]["cache"] == "hit"
    assert {s: rows[s]["cache"] for s in STAGES[1:]} == {s: "miss" for s in STAGES[1:]}
    assert "config.cutoff_len: 128 -> 64" in rows["prepare_dataset"]["reason"]


def test_bad_config_fails_before_any_stage(store):
    from ptflow.errors import ConfigError

    before = sorted(p.name for p in (store / "cache").iterdir())
    with pytest.raises(ConfigError, match=r"train\.learnig_rate.*Did you mean train\.learning_rate"):
        run_flow(store, "train.learnig_rate=1e-3")
    assert sorted(p.name for p in (store / "cache").iterdir()) == before


def test_forced_stage_is_rebuilt_named_so_and_identical_output_lets_training_hit(store):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    summary = run_flow(store, "orchestration.force=[prepare_dataset]")
    rows = {row["stage"]: row for row in summary["stages"]}
    assert (rows["prepare_dataset"]["cache"], rows["prepare_dataset"]["reason"]) == (
        "miss", "forced by orchestration.force/from_stage")
    assert {s: rows[s]["cache"] for s in ("load_tokenizer", "train", "evaluate", "plot_loss")} == dict.fromkeys(
        ("load_tokenizer", "train", "evaluate", "plot_loss"), "hit")  # the rebuilt dataset has the same digest
    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        names = {t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))}
    assert {"load_tokenizer [hit]", "prepare_dataset [forced]", "train [hit]", "evaluate [hit]"} <= names

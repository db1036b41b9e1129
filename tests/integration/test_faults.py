"""kill -9 of `ptflow run` in each stage, then a re-run: finished work is reused, nothing torn is loaded.

The CLI runs against one real Prefect server (PostgreSQL) so each run starts in seconds.
Kill points are `PTFLOW_KILL_AT` hooks (ptflow/faults.py) that SIGKILL the process there.
A run killed in training leaves its lineage slot taken until the server's 60 s lease runs out
(tasks/slots.py), so those runs are all killed first, each on a lineage of its own, and their
re-runs find the leases already expired instead of waiting out one after another.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import cli_env, run_cli

from ptflow.store.entries import check_files, read_manifest
from ptflow.store.layout import MANIFEST

STAGES = ["load_tokenizer", "prepare_dataset", "train", "evaluate", "plot_loss", "write_model_card"]
SMALL = ["train.max_steps=12", "train.save_steps=5", "train.eval_steps=6", "train.logging_steps=2",
         "data.cutoff_len=128", "data.val_size=8"]  # 8 held-out documents (streamed: the first 8 blocks)
FAST = [*SMALL, "run_name=faults"]
STREAMED = [*SMALL, "data.streaming=true", "run_name=faults-streamed"]
BUILT = ["load_tokenizer", "prepare_dataset", "evaluate", "plot_loss", "write_model_card"]  # killed at <stage>:built
IN_TRAINING = {  # test -> (kill point, overrides): the kills that leave a lineage slot taken
    "train:step-8": ("train:step-8", [*SMALL, "run_name=faults-step-8"]),
    "checkpoint:writing-10": ("checkpoint:writing-10", [*SMALL, "run_name=faults-writing-10"]),
    "streamed": ("train:step-8", STREAMED),
}


class Killed(NamedTuple):
    env: dict[str, str]
    store: Path
    args: list[str]


def kill_run(prefect_server: str, tmp_path: Path, point: str, args: list[str]) -> Killed:
    """`ptflow run` with a kill -9 at `point`; the env (its store, its summary file) serves the re-run."""
    env = cli_env(tmp_path, PREFECT_API_URL=prefect_server, PTFLOW_SUMMARY_JSON=str(tmp_path / "summary.json"))
    killed = run_cli({**env, "PTFLOW_KILL_AT": point}, "run", "configs/quickstart.yaml", *args, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    return Killed(env, tmp_path / "store", args)


@pytest.fixture(scope="module")
def killed_in_training(prefect_server, tmp_path_factory) -> dict[str, Killed]:
    return {name: kill_run(prefect_server, tmp_path_factory.mktemp("killed"), point, args)
            for name, (point, args) in IN_TRAINING.items()}


def finished(store: Path, stage: str) -> list[Path]:
    folder = store / "cache" / stage
    return [p for p in folder.iterdir() if (p / MANIFEST).exists()] if folder.is_dir() else []


def entries(store: Path) -> dict[str, tuple[str, int, int]]:
    """Each stage's finished entry as (folder name, inode, manifest mtime in ns): a rebuilt entry is a new folder
    with a new manifest, renamed into place under the same name."""
    found = {s: [(p.name, p.stat().st_ino, (p / MANIFEST).stat().st_mtime_ns) for p in finished(store, s)]
             for s in STAGES}
    assert all(len(names) <= 1 for names in found.values()), found
    return {s: names[0] for s, names in found.items() if names}


def rerun_summary(env: dict, args: list[str]) -> dict[str, dict]:
    rerun = run_cli(env, "run", "configs/quickstart.yaml", *args, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return {row["stage"]: row for row in json.loads(Path(env["PTFLOW_SUMMARY_JSON"]).read_text())["stages"]}


def assert_intact(store: Path) -> None:
    for s in STAGES:  # every stored artifact is intact by its manifest's digests
        for folder in finished(store, s):
            assert check_files(folder, read_manifest(folder)) is None, folder


def test_a_kill_at_each_stage_then_reruns_redo_only_the_interrupted_stage(prefect_server, tmp_path):
    """One store, killed after writing each stage's files (before its manifest) in turn: every re-run finishes the
    stage the previous run was killed in, is killed in the next, and never rebuilds an entry already finished."""
    env = cli_env(tmp_path, PREFECT_API_URL=prefect_server, PTFLOW_SUMMARY_JSON=str(tmp_path / "summary.json"))
    store, before = tmp_path / "store", {}
    for stage in BUILT:
        killed = run_cli({**env, "PTFLOW_KILL_AT": f"{stage}:built"}, "run", "configs/quickstart.yaml", *FAST,
                         timeout=300)
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert finished(store, stage) == []  # the interrupted write left no entry that could be taken for finished
        now = entries(store)
        assert set(now) == set(STAGES[:STAGES.index(stage)]), now  # every stage before it, finished once
        assert {s: now[s] for s in before} == before  # none finished earlier was rebuilt
        before = now
    rows = rerun_summary(env, FAST)
    assert {s: rows[s]["cache"] for s in STAGES} == {**{s: "hit" for s in STAGES[:-1]}, "write_model_card": "miss"}
    after = entries(store)
    assert set(after) == set(STAGES) and {s: after[s] for s in before} == before
    assert_intact(store)


@pytest.mark.parametrize("point", ["train:step-8", "checkpoint:writing-10"])
def test_a_kill_in_training_then_a_rerun_resumes_from_the_last_whole_checkpoint(point, killed_in_training):
    env, store, args = killed_in_training[point]
    assert finished(store, "train") == []
    before = entries(store)
    assert set(before) == {"load_tokenizer", "prepare_dataset"}
    rows = rerun_summary(env, args)
    assert rows["load_tokenizer"]["cache"] == rows["prepare_dataset"]["cache"] == "hit"
    assert rows["train"]["cache"] == "miss"
    assert {s: entries(store)[s] for s in before} == before
    stats = read_manifest(Path(rows["train"]["path"]))["stats"]
    assert stats["resumed_from"].endswith("checkpoint-5")  # step 8's kill, and checkpoint-10's torn write
    assert_intact(store)


def test_kill_during_streamed_training_resumes_from_the_data_cursor(killed_in_training):
    """A streamed run killed between checkpoints continues from the cursor saved at the last one."""
    env, _, streamed = killed_in_training["streamed"]
    rows = rerun_summary(env, streamed)
    assert rows["prepare_dataset"]["cache"] == "hit" and rows["train"]["cache"] == "miss"
    folder = Path(rows["train"]["path"])
    stats = read_manifest(folder)["stats"]
    assert stats["resumed_from"].endswith("checkpoint-5") and stats["streamed"]
    steps = [json.loads(line)["current_steps"] for line in (folder / "trainer_log.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == steps and steps[-1] == 12  # no step logged twice after the resume
    cursor = json.loads((folder / "checkpoint-10" / "ptflow_checkpoint.json").read_text())["data_cursor"]
    assert cursor["epoch"] == 0 and cursor["offset"] > 0


def test_gc_lists_and_removes_the_temp_folder_a_kill_left(prefect_server, tmp_path):
    """kill -9 between writing prepare_dataset's files and renaming them in leaves `.tmp-*`; gc sweeps it."""
    env = cli_env(tmp_path, PREFECT_API_URL=prefect_server)
    killed = run_cli({**env, "PTFLOW_KILL_AT": "prepare_dataset:built"}, "run", "configs/quickstart.yaml", *FAST,
                     timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    store = tmp_path / "store"
    [left] = (store / "cache" / "prepare_dataset").glob(".tmp-*")
    assert str(left) not in run_cli(env, "cache", "gc", "--dry-run", "--store", str(store)).stdout  # too fresh
    an_hour_ago = time.time() - 3600
    os.utime(left, (an_hour_ago, an_hour_ago))
    dry = run_cli(env, "cache", "gc", "--dry-run", "--store", str(store))
    assert dry.returncode == 0 and f"would remove {left}  (temp folder left by an interrupted write" in dry.stdout
    assert left.is_dir()
    swept = run_cli(env, "cache", "gc", "--store", str(store))
    assert swept.returncode == 0 and f"removed {left}" in swept.stdout
    assert not left.exists() and finished(store, "load_tokenizer")  # finished entries stay
    assert run_cli(env, "cache", "verify", "--store", str(store)).returncode == 0

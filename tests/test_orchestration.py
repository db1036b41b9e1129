"""Orchestration without Prefect: predicting hit/miss/resume, forcing stages, lineage for continual pretraining,
the orchestration config section, store roots, and `ptflow deploy --dry-run`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ptflow.config.loading import load_config
from ptflow.config.schema import STAGE_ORDER, OrchestrationSection
from ptflow.errors import ConfigError, StoreError
from ptflow.store.entries import Artifact, build_or_reuse
from ptflow.store.layout import Layout
from ptflow.store.lineage import read_lineage, record, start_from_key, start_model
from ptflow.store.stage import Stage
from ptflow.store.verdict import evict, locate, predict

ROOT = Path(__file__).resolve().parents[1]


def toy_stage(name: str = "toy") -> Stage:
    """A stage as the planner sees one: a typed Stage whose components come from the task's arguments."""
    def build(section, layout, parts=None):
        raise AssertionError("the planner never builds")

    return Stage(name, version=1, components=lambda section, layout: {"config": section, "inputs": {}}, build=build)


def build_toy(layout: Layout, section: dict, stage: str = "toy", files: dict[str, str] | None = None) -> Artifact:
    def build(folder: Path) -> dict:
        for name, text in (files or {"out.txt": "x"}).items():
            (folder / name).write_text(text)
        return {"n": 1}

    return build_or_reuse(layout, stage, toy_stage(stage).key_parts(section, layout), build)


def test_predict_says_miss_with_reason_then_hit(layout):
    stage = toy_stage()
    first = predict(layout, stage.plan({"lr": 1}, layout))
    assert (first.cached, first.label, first.reason) == (False, "miss", "no earlier artifact of this stage in the store")
    built = build_toy(layout, {"lr": 1})
    assert first.key == built.key
    assert predict(layout, stage.plan({"lr": 1}, layout)).label == "hit"
    changed = predict(layout, stage.plan({"lr": 2}, layout))
    assert (changed.label, changed.reason) == ("miss", "changed config.lr: 1 -> 2")


def test_predict_names_the_checkpoint_a_resumable_stage_will_resume_from(layout):
    key = toy_stage().plan({"lr": 1}, layout).key
    work = layout.work("toy", key)
    for step, complete in ((10, True), (20, True), (30, False)):  # checkpoint-30 is torn (no metadata)
        folder = work / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        for name in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
            (folder / name).write_bytes(b"x")
        if complete:
            (folder / "ptflow_checkpoint.json").write_text(json.dumps({"step": step}))
    verdict = predict(layout, toy_stage().plan({"lr": 1}, layout))
    assert (verdict.cached, verdict.resume_step, verdict.label) == (False, 20, "resume from step 20")


def test_evict_removes_the_artifact_and_its_checkpoints_so_the_stage_rebuilds(layout, tmp_path):
    built = build_toy(layout, {"lr": 1})
    layout.work("toy", built.key).mkdir()
    linked = tmp_path / "out.txt"
    linked.hardlink_to(built.dir / "out.txt")  # like an output_dir's file
    assert evict(layout, "toy", built.key)
    assert not built.dir.exists() and not layout.work("toy", built.key).exists()
    assert linked.read_text() == "x"  # the user's copy survives
    assert not evict(layout, "toy", built.key)
    rebuilt = build_toy(layout, {"lr": 1})
    assert (rebuilt.hit, rebuilt.digest) == (False, built.digest)
    assert [p.name for p in layout.stage_dir("toy").iterdir() if not p.name.endswith(".lock")] == [built.key]


def test_locate_finds_by_key_or_says_how_to_share_the_store(layout):
    built = build_toy(layout, {"lr": 1})
    found = locate(layout, "toy", built.key)
    assert (found.path, found.digest, found.hit) == (built.path, built.digest, True)
    with pytest.raises(StoreError, match=r"toy: artifact 0123456789ab is missing in the store at .*share one store"):
        locate(layout, "toy", "0123456789abcdef")
    (built.dir / "out.txt").write_text("changed!")
    with pytest.raises(StoreError, match=r"is unusable \(cached entry is damaged \(out.txt has 8 bytes"):
        locate(layout, "toy", built.key)


def test_orchestration_section_forced_stages_and_typos():
    assert OrchestrationSection().forced_stages() == set()
    section = OrchestrationSection(force="prepare_dataset, evaluate", from_stage="plot_loss")
    assert section.forced_stages() == {"prepare_dataset", "evaluate", "plot_loss", "write_model_card"}
    assert OrchestrationSection(from_stage="load_tokenizer").forced_stages() == set(STAGE_ORDER)


def test_orchestration_errors_name_the_key_and_the_fix():
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs/quickstart.yaml", ["orchestration.force=[trian]", "orchestration.from_stage=eval",
                                                       "orchestration.placement=gpu", "orchestration.plcement=local"])
    problems = "\n".join(info.value.problems)
    assert "orchestration.force: got ['trian']; 'trian' is not a stage; did you mean train?" in problems
    assert "orchestration.from_stage: got 'eval'; 'eval' is not a stage; did you mean evaluate?" in problems
    assert "orchestration.placement: got 'gpu'; expected 'local' or 'gpu-pool'" in problems
    assert "orchestration.plcement: unknown key. Did you mean orchestration.placement?" in problems
    with pytest.raises(ConfigError, match="continue_from needs a model with full weights, but lora"):
        load_config(ROOT / "configs/quickstart.yaml", ["orchestration.continue_from=latest", "train.finetuning_type=lora",
                                                       "model.train_from_scratch=false"])


def test_continual_config_is_valid():
    cfg = load_config(ROOT / "configs/continual.yaml")
    assert (cfg.orchestration.continue_from, cfg.orchestration.placement, cfg.run_name) == ("latest", "local", "continual")


def fake_model(layout: Layout, name: str) -> Artifact:
    return build_toy(layout, {"model": name}, stage="train", files={"config.json": "{}", "model.safetensors": name})


def fake_dataset(digest: str) -> Artifact:
    return Artifact("prepare_dataset", "k" * 32, "/nowhere", digest)


def test_lineage_continues_from_the_newest_model_unless_it_saw_this_data(make_config, layout):
    cfg = make_config(run_name="nightly", orchestration={"continue_from": "latest"})
    first = start_model(cfg, layout, fake_dataset("d1"))
    assert (first.section, first.parent) == (cfg.model, None)
    m1 = fake_model(layout, "m1")
    assert record(layout, "nightly", m1, first, fake_dataset("d1"), flow_run="run-1")
    assert not record(layout, "nightly", m1, first, fake_dataset("d1"))  # a re-run that hit: no second entry

    again = start_model(cfg, layout, fake_dataset("d1"))  # same data: redo that step from the same start
    assert (again.section, again.parent) == (cfg.model, None)
    grown = start_model(cfg, layout, fake_dataset("d2"))  # a new shard: continue from m1
    assert grown.parent == m1.key
    assert grown.section.model_name_or_path == m1.path and grown.section.train_from_scratch is False
    assert grown.section.model_copy(update={"model_name_or_path": cfg.model.model_name_or_path,
                                            "train_from_scratch": True}) == cfg.model
    m2 = fake_model(layout, "m2")
    record(layout, "nightly", m2, grown, fake_dataset("d2"), flow_run="run-2")
    assert start_model(cfg, layout, fake_dataset("d2")).parent == m1.key  # re-run of night 2
    assert start_model(cfg, layout, fake_dataset("d3")).parent == m2.key  # night 3
    entries = read_lineage(layout, "nightly")
    assert [(e["key"], e["parent"], e["dataset"], e["flow_run"]) for e in entries] == [
        (m1.key, None, "d1", "run-1"), (m2.key, m1.key, "d2", "run-2")]
    assert entries[0]["path"] == f"cache/train/{m1.key}"
    assert read_lineage(layout, "other-run") == []


def test_lineage_start_is_the_same_on_another_worker(make_config, layout, tmp_path):
    cfg = make_config(orchestration={"continue_from": "latest"})
    model = fake_model(layout, "m1")
    assert start_from_key(cfg, layout, model.key).section.model_name_or_path == model.path
    assert start_from_key(cfg, layout, None).section == cfg.model
    with pytest.raises(StoreError, match="share one store"):
        start_from_key(cfg, Layout(tmp_path / "elsewhere"), model.key)


def test_continue_from_a_folder(make_config, layout, tmp_path):
    cfg = make_config(orchestration={"continue_from": str(tmp_path)})
    start = start_model(cfg, layout, fake_dataset("d1"))
    assert (start.section.model_name_or_path, start.section.train_from_scratch, start.parent) == (
        str(tmp_path), False, None)
    missing = make_config(orchestration={"continue_from": str(tmp_path / "nope")})
    with pytest.raises(StoreError, match="continue_from: .* is not a folder"):
        start_model(missing, layout, fake_dataset("d1"))


def test_broken_lineage_line_is_reported_with_its_place(layout):
    path = layout.lineage_file("x")
    path.parent.mkdir(parents=True)
    path.write_text('{"key": "a"}\nnot json\n')
    with pytest.raises(StoreError, match=r"x.jsonl:2: not a JSON line"):
        read_lineage(layout, "x")


def test_store_roots_local_file_urls_and_object_stores(tmp_path):
    assert Layout.resolve(f"file://{tmp_path}/store").root == tmp_path / "store"
    assert Layout.resolve(str(tmp_path / "store")).lineage_file("nightly") == tmp_path / "store/lineage/nightly.jsonl"
    for url in ("s3://AKIA123:hunter2@bucket/ptflow", "gs://user:ya29tok@bucket/ptflow"):
        with pytest.raises(StoreError, match="the URL holds credentials") as error:
            Layout.resolve(url)
        assert "hunter2" not in str(error.value) and "ya29tok" not in str(error.value)


def ptflow(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_deploy_dry_run_lists_pools_then_applies_prefect_yaml():
    result = ptflow("deploy", "--dry-run", "--pool-type", "gpu=kubernetes", "--code-dir", "/opt/ptflow")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].endswith("-m prefect work-pool create cpu --type process")
    assert lines[1].endswith(f"-m prefect work-pool create gpu --type kubernetes --base-job-template "
                             f"{ROOT}/infra/k8s/gpu-work-pool.json")
    assert lines[2].startswith("PTFLOW_PROJECT_DIR=/opt/ptflow ") and lines[2].endswith("prefect --no-prompt deploy --all")


def test_deploy_errors_are_readable(tmp_path):
    result = ptflow("deploy", "--dry-run", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "prefect.yaml not found: run ptflow deploy from the project folder" in result.stderr
    result = ptflow("deploy", "--dry-run", "--pool-type", "gpu=slurm")
    assert result.returncode == 2
    assert "--pool-type 'gpu=slurm': expected POOL=TYPE with POOL one of cpu, gpu" in result.stderr

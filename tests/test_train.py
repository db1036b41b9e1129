"""Stage train, by plain calls on CPU: loss falls, exact resume, torn and foreign checkpoints, NaN, outputs."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_assets import Interrupted, stop_at

from ptflow import interrupt
from ptflow.config.schema import DataSection, ModelSection, TrainSection
from ptflow.data.dataset import prepare_dataset
from ptflow.errors import CheckpointError, DataError, TrainingError
from ptflow.store.entries import stage_key
from ptflow.store.layout import Layout
from ptflow.train import build
from ptflow.train import loop as training
from ptflow.train.checkpoint import META
from ptflow.train.loop import DataOrder, train

CHECKPOINT_FILES = {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                    META}
OUTPUT_FILES = {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "trainer_log.jsonl",
                "trainer_state.json", "train_results.json"}
STEPS, SAVE = 12, 4


@pytest.fixture(scope="module")
def dataset(repeated_dataset):
    return repeated_dataset  # conftest.py: 30 blocks of 16


@pytest.fixture(scope="module")
def scratch(tiny_model_dir):
    return ModelSection(model_name_or_path=str(tiny_model_dir), train_from_scratch=True)


def settings(**kw) -> TrainSection:
    base = dict(max_steps=STEPS, learning_rate=3e-3, per_device_train_batch_size=4, logging_steps=1,
                save_steps=SAVE, lr_scheduler_type="cosine", warmup_steps=2)
    return TrainSection(**{**base, **kw})


def read_log(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "trainer_log.jsonl").read_text().splitlines()]


def losses(folder) -> dict[int, float]:
    return {r["current_steps"]: r["loss"] for r in read_log(folder) if "loss" in r}


def children(layout: Layout) -> list[str]:
    return sorted(p.name for p in layout.stage_dir("train").iterdir() if not p.name.endswith(".lock"))


@pytest.fixture(scope="module")
def run_a(scratch, tokenizer_artifact, dataset, tmp_path_factory):
    """The uninterrupted reference run."""
    return train(scratch, settings(), tokenizer_artifact, dataset, Layout(tmp_path_factory.mktemp("store-a")))


def test_loss_falls(scratch, tokenizer_artifact, dataset, layout):
    artifact = train(scratch, settings(max_steps=30, save_strategy="no", warmup_steps=0, lr_scheduler_type="constant"),
                     tokenizer_artifact, dataset, layout)
    assert not [p for p in artifact.dir.iterdir() if p.name.startswith("checkpoint-")]  # save_strategy: no
    curve = [loss for _, loss in sorted(losses(artifact.dir).items())]
    assert len(curve) == 30
    assert curve[0] == pytest.approx(math.log(4096), abs=0.2)  # random init: about uniform over the vocabulary
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 1.0
    assert artifact.stats["final_loss"] == curve[-1] and artifact.stats["first_loss"] == curve[0]
    assert artifact.stats["tokens_per_step"] == 4 * 16
    assert (artifact.stats["parameters"], artifact.stats["trainable_parameters"]) == (149_664, 149_664)


def test_output_files_and_checkpoint_names(run_a):
    folder = run_a.dir
    names = {p.name for p in folder.iterdir()}
    assert OUTPUT_FILES <= names
    checkpoints = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]  # the last too, as HF
    assert {p.name for p in (folder / "checkpoint-8").iterdir()} == CHECKPOINT_FILES
    meta = json.loads((folder / "checkpoint-8" / META).read_text())
    assert meta["step"] == 8 and meta["tokens_seen"] == 8 * 64
    assert set(meta["fingerprint"]) == {"dataset", "tokenizer", "train_config", "world_size", "train_schedule",
                                        "global_batch"}
    assert meta["fingerprint"]["world_size"] == 1 and meta["fingerprint"]["global_batch"] == 4
    log = read_log(folder)
    assert [r["current_steps"] for r in log] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "epoch", "percentage", "tokens_per_s_per_device", "total_tokens"):
        assert key in log[-1], key
    assert log[-1]["percentage"] == 100.0 and log[-1]["total_tokens"] == STEPS * 64
    state = json.loads((folder / "trainer_state.json").read_text())
    assert (state["global_step"], state["max_steps"]) == (STEPS, STEPS)
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, STEPS + 1))
    assert state["log_history"][-1]["train_loss"] == pytest.approx(run_a.stats["train_loss"])  # HF's summary entry
    # the rate each step used (HF's warmup starts at 0), not the next step's
    assert [r["lr"] for r in log][:4] == pytest.approx([0.0, 1.5e-3, 3e-3, 3e-3 * 0.5 * (1 + math.cos(math.pi / 10))])
    results = json.loads((folder / "train_results.json").read_text())
    assert {"epoch", "train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second"} <= set(results)
    assert results["train_tokens"] == STEPS * 64
    assert results["epoch"] == pytest.approx(STEPS / 7, abs=1e-4)  # 30 blocks // 4 per step = 7 steps per epoch


def test_output_model_loads_with_transformers(run_a, dataset):
    from transformers import AutoModelForCausalLM

    from ptflow.data.dataset import open_blocks

    model = AutoModelForCausalLM.from_pretrained(run_a.dir, dtype=torch.float32)
    saved = load_file(run_a.dir / "model.safetensors")
    assert torch.equal(model.state_dict()["model.layers.1.mlp.down_proj.weight"],
                       saved["model.layers.1.mlp.down_proj.weight"])
    blocks, _ = open_blocks(dataset, "train")
    ids = torch.from_numpy(blocks[:8].astype("int64"))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < math.log(4096) - 0.5  # it learned something
    assert loss == pytest.approx(run_a.stats["final_loss"], abs=0.5)


@pytest.fixture
def store_a(run_a, tmp_path) -> Layout:
    """A copy of run_a's store (run_a's own stays as it finished, for the tests that compare with it)."""
    return Layout(shutil.copytree(run_a.dir.parents[2], tmp_path / "store-a", symlinks=True))


def test_second_call_hits_and_cadence_does_not_change_the_key(run_a, scratch, tokenizer_artifact, dataset, store_a):
    layout = store_a
    again = train(scratch, settings(logging_steps=3, save_steps=5, resume_from_checkpoint=False), tokenizer_artifact,
                  dataset, layout)
    assert (again.hit, again.key) == (True, run_a.key)


def test_changed_hyperparameter_misses_and_names_it(run_a, scratch, tokenizer_artifact, dataset, store_a):
    other = train(scratch, settings(learning_rate=1e-3), tokenizer_artifact, dataset, store_a)
    assert not other.hit and other.key != run_a.key
    assert other.reason == "changed config.train.learning_rate: 0.003 -> 0.001"


def assert_same_run(folder, reference) -> None:
    steps = [r["current_steps"] for r in read_log(folder)]
    assert steps == list(range(1, STEPS + 1))  # every step once: the lost tail is not duplicated
    got, want = losses(folder), losses(reference)
    assert got.keys() == want.keys()
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5), step
    a, b = load_file(folder / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)


def test_interrupted_run_resumes_from_the_newest_checkpoint_exactly(run_a, scratch, tokenizer_artifact, dataset,
                                                                    layout):
    with pytest.raises(Interrupted):
        train(scratch, settings(), tokenizer_artifact, dataset, layout, on_log=stop_at(10))
    key = run_a.key
    assert children(layout) == [f"{key}.work"]  # nothing published; the work folder keeps its checkpoints
    work = layout.work("train", key)
    assert sorted(p.name for p in work.iterdir() if p.is_dir()) == ["checkpoint-4", "checkpoint-8"]
    assert [r["current_steps"] for r in read_log(work)] == list(range(1, 11))

    resumed = train(scratch, settings(), tokenizer_artifact, dataset, layout)
    assert not resumed.hit
    assert resumed.stats["resumed_from"] == str(work / "checkpoint-8")
    assert children(layout) == [key]
    assert_same_run(resumed.dir, run_a.dir)


def test_a_stop_request_whose_interrupt_was_lost_stops_training_after_that_step(run_a, scratch, tokenizer_artifact,
                                                                                dataset, layout, monkeypatch):
    def lost_ctrl_c(record: dict) -> None:  # the handler ran, its KeyboardInterrupt died in a finalizer
        if record.get("current_steps") == 5:
            monkeypatch.setattr(interrupt, "_requested", KeyboardInterrupt)

    with pytest.raises(KeyboardInterrupt):
        train(scratch, settings(), tokenizer_artifact, dataset, layout, on_log=lost_ctrl_c)
    work = layout.work("train", run_a.key)
    assert [r["current_steps"] for r in read_log(work)] == list(range(1, 6))
    assert sorted(p.name for p in work.iterdir() if p.is_dir()) == ["checkpoint-4"]


def test_torn_checkpoint_is_skipped_for_the_previous_one(run_a, scratch, tokenizer_artifact, dataset, layout):
    with pytest.raises(Interrupted):
        train(scratch, settings(), tokenizer_artifact, dataset, layout, on_log=stop_at(10))
    work = layout.work("train", run_a.key)
    (work / "checkpoint-8" / META).unlink()  # killed while writing checkpoint-8
    resumed = train(scratch, settings(), tokenizer_artifact, dataset, layout)
    assert resumed.stats["resumed_from"] == str(work / "checkpoint-4")
    assert_same_run(resumed.dir, run_a.dir)
    assert {p.name for p in (resumed.dir / "checkpoint-8").iterdir()} == CHECKPOINT_FILES  # rewritten whole


def test_resume_false_starts_over(run_a, scratch, tokenizer_artifact, dataset, layout):
    with pytest.raises(Interrupted):
        train(scratch, settings(), tokenizer_artifact, dataset, layout, on_log=stop_at(6))
    fresh = train(scratch, settings(resume_from_checkpoint=False), tokenizer_artifact, dataset, layout)
    assert fresh.stats["resumed_from"] is None
    assert_same_run(fresh.dir, run_a.dir)


def test_resume_from_a_checkpoint_of_another_dataset_is_refused(run_a, scratch, tokenizer_artifact,
                                                                repeated_data_dir, layout):
    other = prepare_dataset(DataSection(dataset="rep", dataset_dir=str(repeated_data_dir), cutoff_len=8),
                            tokenizer_artifact, layout)
    foreign = run_a.dir / "checkpoint-8"
    with pytest.raises(CheckpointError, match=r"train\.resume_from_checkpoint: .*checkpoint-8 was made by a different "
                                              r"run; changed: dataset \(checkpoint [0-9a-f]{16}, now [0-9a-f]{16}\)\. "
                                              r"Set train\.resume_from_checkpoint: false") as info:
        train(scratch, settings(resume_from_checkpoint=str(foreign)), tokenizer_artifact, other, layout)
    assert "tokenizer" not in str(info.value) and "train_config" not in str(info.value)


def test_resume_from_a_missing_or_incomplete_checkpoint(run_a, scratch, tokenizer_artifact, dataset, layout, tmp_path):
    with pytest.raises(CheckpointError, match=r"train\.resume_from_checkpoint: .*nowhere is not a directory"):
        train(scratch, settings(resume_from_checkpoint=str(tmp_path / "nowhere")), tokenizer_artifact, dataset,
              layout)
    torn = shutil.copytree(run_a.dir / "checkpoint-4", tmp_path / "checkpoint-4")
    (torn / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-4 is not a complete ptflow checkpoint"):
        train(scratch, settings(resume_from_checkpoint=str(torn)), tokenizer_artifact, dataset, layout)


def test_explicit_checkpoint_of_the_same_run_resumes(run_a, scratch, tokenizer_artifact, dataset, layout):
    resumed = train(scratch, settings(resume_from_checkpoint=str(run_a.dir / "checkpoint-4")), tokenizer_artifact,
                    dataset, layout)
    assert resumed.stats["resumed_from"] == str(run_a.dir / "checkpoint-4")
    got, want = losses(resumed.dir), losses(run_a.dir)
    assert sorted(got) == list(range(5, STEPS + 1))  # a fresh folder: only the steps run here are logged
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-5)


def test_huge_learning_rate_stops_with_a_training_error(scratch, tokenizer_artifact, dataset, layout):
    with pytest.raises(TrainingError, match=r"train: loss \S+ / grad norm \S+ is not finite at step 2; stopped without "
                                            r"saving\. Lower train\.learning_rate"):
        train(scratch, settings(learning_rate=1e10, warmup_steps=0), tokenizer_artifact, dataset, layout)
    work = layout.work("train", stage_key(training.STAGE.key_parts(
        scratch, settings(learning_rate=1e10, warmup_steps=0), tokenizer_artifact, dataset, layout, 42)))
    assert not (work / "model.safetensors").exists()
    assert not [p for p in work.iterdir() if p.name.startswith("checkpoint-")]


def test_nan_loss_names_its_step_and_keeps_only_good_checkpoints(scratch, tokenizer_artifact, dataset, layout,
                                                                 monkeypatch):
    real_build = build.build_model

    def build_with_nan_at_step_3(*args, **kwargs):
        model = real_build(*args, **kwargs)
        calls = []

        def poison(module, args, kwargs, output):
            calls.append(1)
            if len(calls) == 3 and kwargs.get("labels") is not None:
                output.loss = output.loss * float("nan")
            return output

        model.register_forward_hook(poison, with_kwargs=True)
        return model

    monkeypatch.setattr(build, "build_model", build_with_nan_at_step_3)
    config = settings(logging_steps=5, save_steps=2)  # the NaN is seen at step 3, checked by step 4's checkpoint
    with pytest.raises(TrainingError, match=r"not finite at step 3;"):
        train(scratch, config, tokenizer_artifact, dataset, layout)
    work = layout.work("train", stage_key(training.STAGE.key_parts(scratch, config, tokenizer_artifact, dataset, layout, 42)))
    assert sorted(p.name for p in work.iterdir() if p.is_dir()) == ["checkpoint-2"]
    assert not (work / "model.safetensors").exists()
    weights = load_file(work / "checkpoint-2" / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert children(layout) == [work.name]


def test_freeze_trains_only_the_chosen_layer(tiny_weights_dir, tokenizer_artifact, dataset, layout):
    model = ModelSection(model_name_or_path=str(tiny_weights_dir))
    artifact = train(model, settings(finetuning_type="freeze", freeze_trainable_layers=1, max_steps=4),
                     tokenizer_artifact, dataset, layout)
    assert artifact.stats["trainable_parameters"] == 9280
    before, after = load_file(tiny_weights_dir / "model.safetensors"), load_file(artifact.dir / "model.safetensors")
    for name, tensor in before.items():
        if name.startswith("model.layers.1.") and name.endswith("proj.weight"):
            assert not torch.equal(after[name], tensor), name
        elif not name.startswith("model.layers.1."):
            assert torch.equal(after[name], tensor), name


def test_lora_run_writes_an_adapter_that_peft_loads(tiny_weights_dir, tokenizer_artifact, dataset, layout):
    from peft import AutoPeftModelForCausalLM

    model = ModelSection(model_name_or_path=str(tiny_weights_dir))
    artifact = train(model, settings(finetuning_type="lora", lora_rank=4, max_steps=4), tokenizer_artifact, dataset,
                     layout)
    names = {p.name for p in artifact.dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_log.jsonl", "train_results.json"} <= names
    assert "model.safetensors" not in names
    assert artifact.stats["trainable_parameters"] == 4096
    adapter = load_file(artifact.dir / "adapter_model.safetensors")
    assert any(".lora_B." in k and t.abs().sum() > 0 for k, t in adapter.items())  # B starts at zero: it trained
    loaded = AutoPeftModelForCausalLM.from_pretrained(artifact.dir, dtype=torch.float32)
    state = loaded.state_dict()
    for name, tensor in adapter.items():
        match = [k for k in state if k.startswith(name.removesuffix(".weight")) and k.endswith(".weight")]
        assert len(match) == 1 and torch.equal(state[match[0]], tensor), name
    net, device = training.load_trained_model(artifact.dir)
    assert device.type == "cpu" and hasattr(net, "peft_config")


def test_batch_larger_than_the_dataset(scratch, tokenizer_artifact, dataset, layout):
    with pytest.raises(DataError, match=r"one optimizer step needs 64 blocks .* but the dataset has 30; lower the "
                                        "batch size or add data"):
        train(scratch, settings(per_device_train_batch_size=16, gradient_accumulation_steps=4), tokenizer_artifact,
              dataset, layout)


def test_data_order_seeks_directly():
    order = DataOrder(n_blocks=30, per_step=4, seed=7)
    walked = [order.step_indices(s).tolist() for s in range(21)]
    assert order.steps_per_epoch == 7
    assert all(len(set(b)) == 4 for b in walked)
    assert len({i for b in walked[:7] for i in b}) == 28  # one epoch: no block twice
    assert walked[7:14] != walked[:7]  # a new permutation each epoch
    fresh = DataOrder(n_blocks=30, per_step=4, seed=7)
    assert fresh.step_indices(19).tolist() == walked[19]  # seeking to step 19 needs no replay
    assert DataOrder(30, 4, seed=8).step_indices(0).tolist() != walked[0]


def test_lora_merged_model_matches_the_adapter_model(tiny_weights_dir, tokenizer_artifact, dataset, layout):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    model = ModelSection(model_name_or_path=str(tiny_weights_dir))
    artifact = train(model, settings(finetuning_type="lora", lora_rank=4, max_steps=4, save_merged_model=True),
                     tokenizer_artifact, dataset, layout)
    merged = AutoModelForCausalLM.from_pretrained(artifact.dir / "merged", dtype=torch.float32).eval()
    adapted = AutoPeftModelForCausalLM.from_pretrained(artifact.dir, dtype=torch.float32).eval()
    ids = torch.arange(3, 19).view(1, 16)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5)
    assert (artifact.dir / "merged" / "tokenizer.json").exists()


def test_doc_mask_restarts_positions_and_blocks_attention_across_documents(scratch, tokenizer_artifact,
                                                                          repeated_data_dir, layout):
    from transformers import AutoModelForCausalLM

    from ptflow.data.dataset import open_blocks, open_doc_starts
    from ptflow.train.loop import document_positions

    data = prepare_dataset(DataSection(dataset="rep", dataset_dir=str(repeated_data_dir), cutoff_len=16,
                                       doc_mask=True), tokenizer_artifact, layout)
    blocks, _ = open_blocks(data, "train")
    starts = open_doc_starts(data, "train")
    row = next(i for i in range(len(blocks)) if len(starts[i]) > 1)  # a block holding a document boundary
    positions = document_positions(starts, [row], 16)[0]
    bounds = [*map(int, starts[row]), 16]
    first, second, third = bounds[0], bounds[1], bounds[2]
    assert positions[second] == 0 and positions[second - 1] == second - first - 1
    assert positions[second:third].tolist() == list(range(third - second))
    artifact = train(scratch, settings(max_steps=2), tokenizer_artifact, data, layout)
    assert all(math.isfinite(r["loss"]) for r in read_log(Path(artifact.dir)) if "loss" in r)
    net = AutoModelForCausalLM.from_pretrained(str(artifact.dir)).eval()
    ids = torch.from_numpy(np.asarray(blocks[row], dtype=np.int64))[None]
    with torch.no_grad():
        packed = net(input_ids=ids, position_ids=positions[None]).logits[0, second:third]
        alone = net(input_ids=ids[:, second:third]).logits[0]
        leaky = net(input_ids=ids).logits[0, second:third]
    assert torch.allclose(packed, alone, atol=1e-5)  # the second document does not see the first
    assert not torch.allclose(leaky, alone, atol=1e-3)  # without doc_mask it would


def test_key_holds_no_source_code_and_no_device_count(scratch, tokenizer_artifact, dataset, layout, monkeypatch):
    import inspect

    from ptflow.train import launch

    parts = training.STAGE.key_parts(scratch, settings(), tokenizer_artifact, dataset, layout)
    assert {"code", "world_size"}.isdisjoint(parts) and "world_size" not in parts["config"]
    assert parts["format"] == training.STAGE.version and set(parts["libraries"]) == {"torch", "transformers", "peft"}
    # An 8-GPU worker and a CPU worker compute the same key for the same config.
    for devices in (1, 8):
        monkeypatch.setattr(launch, "device_count", lambda: devices)
        assert stage_key(training.STAGE.key_parts(scratch, settings(), tokenizer_artifact, dataset, layout)) \
            == stage_key(parts)
    # An edited module (a hotfix) changes no key: the source is not read at all.
    monkeypatch.setattr(inspect, "getsource", lambda obj: pytest.fail("the key read source code"))
    assert stage_key(training.STAGE.key_parts(scratch, settings(), tokenizer_artifact, dataset, layout)) == \
        stage_key(parts)


def test_a_changed_key_resumes_the_same_work_by_its_fingerprint(run_a, scratch, tokenizer_artifact, dataset, layout,
                                                                monkeypatch, caplog):
    with pytest.raises(Interrupted):
        train(scratch, settings(), tokenizer_artifact, dataset, layout, on_log=stop_at(10))
    old = layout.work("train", run_a.key)
    # A format-version bump (or a library upgrade on the worker) gives the same run a new key ...
    monkeypatch.setattr(training, "STAGE", training.STAGE.__class__(**{**training.STAGE.__dict__, "version": 99}))
    with caplog.at_level(logging.INFO, logger="ptflow.checkpoint"):
        resumed = train(scratch, settings(), tokenizer_artifact, dataset, layout)
    assert resumed.key != run_a.key
    # ... and it continues from the newest checkpoint of the old work folder instead of step 0.
    assert Path(resumed.stats["resumed_from"]).name == "checkpoint-8"
    assert not old.exists()  # moved, not copied: no orphaned work folder is left behind
    assert "resuming from checkpoint-8" in caplog.text
    assert_same_run(resumed.dir, run_a.dir)


def test_work_of_another_dataset_is_not_adopted(run_a, scratch, tokenizer_artifact, dataset, layout, monkeypatch):
    with pytest.raises(Interrupted):
        train(scratch, settings(), tokenizer_artifact, dataset, layout, on_log=stop_at(6))
    other = settings(learning_rate=settings().learning_rate * 2)  # another config: another fingerprint
    with pytest.raises(Interrupted):
        train(scratch, other, tokenizer_artifact, dataset, layout, on_log=stop_at(1))
    work = [p for p in layout.stage_dir("train").glob("*.work") if p.name != f"{run_a.key}.work"]
    assert len(work) == 1 and not list(work[0].glob("checkpoint-*"))  # started over, nothing adopted
    assert (layout.work("train", run_a.key) / "checkpoint-4").is_dir()


def truncate(path, keep: float = 0.0) -> None:
    path.chmod(0o644)  # a finished entry's files are read-only
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


def flip_byte(path) -> None:
    st, data = path.stat(), bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("damage, problem", [
    (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt has 0 bytes"),
    (lambda c: truncate(c / "trainable.safetensors", 0.5), "trainable.safetensors has"),
    (lambda c: flip_byte(c / "trainable.safetensors"), "trainable.safetensors content changed"),
])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_intact_one(run_a, scratch, tokenizer_artifact, dataset,
                                                                        layout, caplog, damage, problem):
    with pytest.raises(Interrupted):
        train(scratch, settings(), tokenizer_artifact, dataset, layout, on_log=stop_at(10))
    work = layout.work("train", run_a.key)
    damage(work / "checkpoint-8")
    resumed = train(scratch, settings(), tokenizer_artifact, dataset, layout)
    assert resumed.stats["resumed_from"] == str(work / "checkpoint-4")
    assert f"skipping damaged checkpoint checkpoint-8 ({problem}" in caplog.text
    assert_same_run(resumed.dir, run_a.dir)


def test_a_finished_entry_drops_a_damaged_checkpoint_and_stays_a_hit(run_a, scratch, tokenizer_artifact, dataset,
                                                                    layout):
    first = train(scratch, settings(), tokenizer_artifact, dataset, layout)
    truncate(first.dir / "checkpoint-4" / "optimizer.pt", 0.5)
    again = train(scratch, settings(), tokenizer_artifact, dataset, layout)
    assert again.hit and again.digest == first.digest
    assert sorted(p.name for p in again.dir.iterdir() if p.is_dir()) == ["checkpoint-12", "checkpoint-8"]


def test_damaged_final_weights_resume_from_the_newest_intact_checkpoint(run_a, scratch, tokenizer_artifact, dataset,
                                                                        layout):
    first = train(scratch, settings(), tokenizer_artifact, dataset, layout)
    truncate(first.dir / "model.safetensors", 0.5)
    again = train(scratch, settings(), tokenizer_artifact, dataset, layout)
    assert not again.hit and again.stats["resumed_from"] == str(layout.work("train", run_a.key) / "checkpoint-12")
    assert_same_run(again.dir, run_a.dir)  # re-exported from the final checkpoint, not retrained


def test_train_loss_and_the_first_log_after_a_resume_match_an_unbroken_run(scratch, tokenizer_artifact, dataset,
                                                                           tmp_path_factory):
    config = settings(logging_steps=3, save_steps=4)  # checkpoint-4 falls between the logs at steps 3 and 6
    unbroken = train(scratch, config, tokenizer_artifact, dataset, Layout(tmp_path_factory.mktemp("unbroken")))
    layout = Layout(tmp_path_factory.mktemp("broken"))
    with pytest.raises(Interrupted):
        train(scratch, config, tokenizer_artifact, dataset, layout, on_log=stop_at(6))
    resumed = train(scratch, config, tokenizer_artifact, dataset, layout)
    assert resumed.stats["resumed_from"].endswith("checkpoint-4")
    assert losses(resumed.dir) == pytest.approx(losses(unbroken.dir), abs=1e-6)  # step 6 covers steps 4-6
    want = json.loads((unbroken.dir / "train_results.json").read_text())["train_loss"]
    assert json.loads((resumed.dir / "train_results.json").read_text())["train_loss"] == pytest.approx(want, abs=1e-6)
    assert resumed.stats["train_loss"] == pytest.approx(unbroken.stats["train_loss"], abs=1e-6)


def test_pure_bf16_resumes_exactly_with_stochastic_rounding(scratch, tokenizer_artifact, dataset, tmp_path):
    """The rounding noise is a function of (seed, step): a resumed bf16 run rounds as the uninterrupted one did."""
    config = settings(max_steps=6, save_steps=3, pure_bf16=True, learning_rate=5e-5)
    whole = train(scratch, config, tokenizer_artifact, dataset, Layout(tmp_path / "whole"))
    assert whole.stats["precision"] == "pure bf16"
    layout = Layout(tmp_path / "split")
    with pytest.raises(Interrupted):
        train(scratch, config, tokenizer_artifact, dataset, layout, on_log=stop_at(4))
    resumed = train(scratch, config, tokenizer_artifact, dataset, layout)
    assert resumed.stats["resumed_from"].endswith("checkpoint-3")
    assert losses(resumed.dir) == losses(whole.dir)
    weights, reference = load_file(resumed.dir / "model.safetensors"), load_file(whole.dir / "model.safetensors")
    assert all(torch.equal(weights[name], reference[name]) for name in reference)


def test_compile_caches_point_into_the_store_while_training_and_are_restored(tmp_path, monkeypatch):
    import os

    from ptflow.train.compile_cache import compile_caches_in

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/users/own/triton")  # a cache the user chose is kept
    with compile_caches_in(Layout(tmp_path).compile_cache()) as folder:
        assert folder.parent == tmp_path / "compile-cache" and folder.name.startswith(f"torch-{torch.__version__}")
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder / "inductor")
        assert os.environ["TRITON_CACHE_DIR"] == "/users/own/triton"
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and os.environ["TRITON_CACHE_DIR"] == "/users/own/triton"

"""GPU paths of the train stage: bf16 + compile, flex_attention document masking, streaming on CUDA, DDP and FSDP
over NCCL on two GPUs.

Skipped without a CUDA device (CI has none); run on a GPU machine with `python -m pytest tests/test_gpu.py`.
The CPU-side refusal of flex_attention runs everywhere.
"""

from __future__ import annotations

import json

import pytest
import torch
from distributed_worker import launch, train_steps
from tiny_assets import Interrupted, stop_at

from ptflow.config.schema import DataSection, ModelSection, TrainSection
from ptflow.data.dataset import prepare_dataset
from ptflow.errors import TrainingError
from ptflow.store.layout import Layout
from ptflow.train.distributed import Ranks
from ptflow.train.loop import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def run(tiny_model_dir, tokenizer_artifact, dataset, folder, attn="sdpa", **train_kw):
    model = ModelSection(model_name_or_path=str(tiny_model_dir), train_from_scratch=True, attn_implementation=attn)
    settings = TrainSection(**{"max_steps": 6, "learning_rate": 3e-3, "per_device_train_batch_size": 4,
                               "logging_steps": 1, "save_steps": 3, "bf16": True, **train_kw})
    artifact = train(model, settings, tokenizer_artifact, dataset, Layout(folder))
    log = [json.loads(line) for line in (artifact.dir / "trainer_log.jsonl").read_text().splitlines()]
    return artifact, {r["current_steps"]: r["loss"] for r in log if "loss" in r}, log


@pytest.fixture(scope="module")
def masked(tiny_data_dir, tokenizer_artifact, session_layout):
    return prepare_dataset(DataSection(dataset="stdlib_docs", dataset_dir=str(tiny_data_dir), cutoff_len=64,
                                       doc_mask=True), tokenizer_artifact, session_layout)


def test_flex_attention_is_refused_for_cpu_training(tiny_model_dir, tokenizer_artifact, masked, tmp_path,
                                                    monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainingError, match="flex_attention trains only on a CUDA GPU"):
        run(tiny_model_dir, tokenizer_artifact, masked, tmp_path, attn="flex_attention")


@cuda
def test_flex_attention_document_masking_matches_sdpa(tiny_model_dir, tokenizer_artifact, masked, tmp_path):
    """Both kernels see the same block-diagonal masks (restarting position ids): same losses within bf16 noise."""
    _, sdpa, _ = run(tiny_model_dir, tokenizer_artifact, masked, tmp_path / "sdpa")
    _, flex, _ = run(tiny_model_dir, tokenizer_artifact, masked, tmp_path / "flex", attn="flex_attention")
    assert sdpa.keys() == flex.keys()
    for step in sdpa:
        assert flex[step] == pytest.approx(sdpa[step], rel=3e-2), step


@cuda
@pytest.mark.parametrize("scope", ["layers", "model"])
def test_bf16_compiled_training_on_the_gpu(tiny_model_dir, tokenizer_artifact, masked, tmp_path, scope):
    artifact, losses, log = run(tiny_model_dir, tokenizer_artifact, masked, tmp_path, torch_compile=True,
                                compile_scope=scope, pure_bf16=scope == "model")
    assert losses[6] < losses[1]
    assert all(r["mfu"] is not None for r in log if "loss" in r)  # the GPU has a peak-FLOPs entry (tiny model: ~1e-5)
    assert artifact.stats["precision"] in ("bf16 autocast, fp32 master", "pure bf16")


@cuda
def test_streamed_training_on_the_gpu_resumes_exactly(tiny_model_dir, tokenizer_artifact, tiny_data_dir,
                                                      session_layout, tmp_path):
    streamed = prepare_dataset(DataSection(dataset="stdlib_docs", dataset_dir=str(tiny_data_dir), cutoff_len=64,
                                           streaming=True), tokenizer_artifact, session_layout)
    whole, want, _ = run(tiny_model_dir, tokenizer_artifact, streamed, tmp_path / "a")
    layout = Layout(tmp_path / "b")
    model = ModelSection(model_name_or_path=str(tiny_model_dir), train_from_scratch=True)
    settings = TrainSection(max_steps=6, learning_rate=3e-3, per_device_train_batch_size=4, logging_steps=1,
                            save_steps=3, bf16=True)
    with pytest.raises(Interrupted):
        train(model, settings, tokenizer_artifact, streamed, layout, on_log=stop_at(5))
    resumed = train(model, settings, tokenizer_artifact, streamed, layout)
    assert resumed.stats["resumed_from"].endswith("checkpoint-3")
    log = [json.loads(line) for line in (resumed.dir / "trainer_log.jsonl").read_text().splitlines()]
    got = {r["current_steps"]: r["loss"] for r in log if "loss" in r}
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-3), step


@two_gpus
def test_ddp_and_fsdp_over_nccl_match_one_gpu(tmp_path):
    """Each rank on its own GPU (LOCAL_RANK), DDP with that device id, FSDP shards there: one GPU's losses."""
    report = launch(tmp_path / "report.json", cuda=True)
    one = train_steps(Ranks(torch.device("cuda", 0)), fsdp=False)
    assert (report["world"], report["backend"], report["device"]) == (2, "nccl", "cuda:0")
    assert report["ddp"]["device_ids"] == [0] and report["ddp"]["param_device"] == "cuda:0"
    assert report["fsdp"]["mode"] == "fsdp" and report["fsdp"]["param_device"] == "cuda:0"
    for mode in ("ddp", "fsdp"):
        assert report[mode]["losses"] == pytest.approx(one["losses"], abs=1e-4), mode
        assert report[mode]["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-3), mode


@two_gpus
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_gpus_train_compiled_layers_in_bf16_like_one(tiny_model_dir, tokenizer_artifact, masked, tmp_path, fsdp):
    """The train stage on two GPUs (compiled decoder layers inside DDP, or FSDP's compiled layer forwards), with
    gradient accumulation: the losses of one GPU taking the same global batch, within bf16 noise."""
    _, one, _ = run(tiny_model_dir, tokenizer_artifact, masked, tmp_path / "one", torch_compile=True,
                    num_processes=1)
    two, losses, _ = run(tiny_model_dir, tokenizer_artifact, masked, tmp_path / "two", torch_compile=True,
                         num_processes=2, per_device_train_batch_size=1, gradient_accumulation_steps=2, fsdp=fsdp)
    assert ("FSDP over 2 processes" in two.stats["speedups"]) == fsdp
    assert losses.keys() == one.keys()
    for step in one:
        assert losses[step] == pytest.approx(one[step], rel=3e-2), step

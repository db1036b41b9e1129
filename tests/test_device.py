"""Where training and evaluation run (train.use_cpu) and what bf16 means there, on a CPU-only test machine.

A GPU host is simulated by patching torch.cuda's queries; nothing here touches a real GPU.
"""

from __future__ import annotations

import pytest
import torch

from ptflow.config.schema import ModelSection, TrainSection
from ptflow.errors import TrainingError
from ptflow.train import device, launch

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture
def gpu_host(monkeypatch):
    """torch.cuda says: 4 GPUs, a Tesla V100 (no native bf16) unless the test flips `bf16`."""
    host = {"bf16": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: host["bf16"])
    return host


def model(**kw) -> ModelSection:
    return ModelSection(model_name_or_path="m", **kw)


def test_use_cpu_trains_and_evaluates_on_the_cpu_of_a_gpu_host(gpu_host):
    assert device.train_on_cpu(TrainSection(use_cpu=True))
    assert not device.train_on_cpu(TrainSection())
    assert device.eval_device(True) == CPU and device.eval_device(False) == CUDA
    assert launch.resolve_num_processes(None, use_cpu=True) == 1
    assert launch.resolve_num_processes(None) == 4
    assert launch.resolve_num_processes(2, use_cpu=True) == 2  # gloo DDP on the CPU when asked for


def test_bf16_is_refused_on_a_gpu_without_bf16(gpu_host):
    for train, key in ((TrainSection(bf16=True), "train.bf16"), (TrainSection(pure_bf16=True), "train.pure_bf16")):
        with pytest.raises(TrainingError) as info:
            device.check_device(model(), train, CUDA)
        assert str(info.value).startswith(f"{key}: Tesla V100-SXM2-32GB has no bf16 support")
        assert "train.use_cpu: true" in str(info.value)
    device.check_device(model(), TrainSection(), CUDA)  # fp32 runs
    assert device.eval_autocast(CUDA) is None  # evaluation falls back to fp32 there
    gpu_host["bf16"] = True
    device.check_device(model(), TrainSection(bf16=True), CUDA)
    assert device.eval_autocast(CUDA) == torch.bfloat16


def test_bf16_on_the_cpu_is_cpu_autocast(gpu_host):
    device.check_device(model(), TrainSection(bf16=True, use_cpu=True), CPU)
    assert device.eval_autocast(CPU) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the loop's autocast does with bf16 on the CPU
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_flex_attention_with_use_cpu_is_refused_naming_use_cpu(gpu_host):
    with pytest.raises(TrainingError, match="flex_attention trains only on a CUDA GPU .* train.use_cpu: true"):
        device.check_device(model(attn_implementation="flex_attention"), TrainSection(use_cpu=True), CPU)


def test_use_cpu_is_not_part_of_the_train_key():
    assert TrainSection(use_cpu=True).digest_fields() == TrainSection().digest_fields()

"""Where training and evaluation run, and what `bf16` means there (LLaMA-Factory's `use_cpu` and `bf16`).

The device is every visible GPU, else the CPU; `train.use_cpu: true` picks the CPU even on a GPU host,
for training and evaluation alike, as transformers' `use_cpu` does. bf16 on a CUDA GPU without bf16
support (before Ampere) is refused, as transformers refuses it; on the CPU it is PyTorch's CPU bf16
autocast (fp32 master weights, matmuls in bf16: the same numerics as on a GPU, usually slower than fp32
unless the CPU has AMX or AVX512-BF16), where transformers would refuse unless `use_cpu` is set.

    ranks = Ranks.open(cpu=train_on_cpu(train))     # ptflow/train/distributed.py
    check_device(model_section, train, ranks.device)
"""

from __future__ import annotations

import torch

from ptflow.config.schema import ModelSection, TrainSection
from ptflow.errors import TrainingError


def train_on_cpu(train: TrainSection) -> bool:
    """Train on the CPU: when asked for, or when there is no GPU (torchrun ranks then talk over gloo, not NCCL)."""
    return train.use_cpu or not torch.cuda.is_available()


def check_device(model: ModelSection, train: TrainSection, device: torch.device) -> None:
    """Refuse settings the chosen device cannot run, before the model is built."""
    if model.attn_implementation == "flex_attention" and device.type != "cuda":
        where = "train.use_cpu: true trains on the CPU" if train.use_cpu else "this machine has no CUDA GPU"
        raise TrainingError(f"model.attn_implementation: flex_attention trains only on a CUDA GPU (PyTorch has no "
                            f"CPU backward for it) and {where}; use sdpa here or run the train stage on a GPU worker")
    if (train.bf16 or train.pure_bf16) and device.type == "cuda" and not bf16_supported(device):
        key = "train.pure_bf16" if train.pure_bf16 else "train.bf16"
        raise TrainingError(f"{key}: {torch.cuda.get_device_name(device)} has no bf16 support (it needs an Ampere or "
                            f"newer GPU); set {key.split('.')[1]}: false to train in fp32, or train.use_cpu: true to "
                            "train on the CPU with bf16 autocast")


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 on this CUDA device (emulation does not count: it is slower than fp32)."""
    return torch.cuda.is_bf16_supported(including_emulation=False) if device.type == "cuda" else True


def eval_device(use_cpu: bool) -> torch.device:
    """The evaluate stage's device: the first GPU unless `train.use_cpu` (or there is none)."""
    return torch.device("cpu" if use_cpu or not torch.cuda.is_available() else "cuda")


def eval_autocast(device: torch.device) -> torch.dtype | None:
    """The evaluate stage runs in bf16 autocast on a GPU that supports it, in fp32 elsewhere (CPU included)."""
    return torch.bfloat16 if device.type == "cuda" and bf16_supported(device) else None

"""Assemble what a run trains: the model with its precision, kernels and wrapper (DDP or FSDP); AdamW; the schedule.

Precision is ours (bf16 autocast or pure bf16 weights), not a wrapper's. With
`pure_bf16` the weights are bf16 and updated by `StochasticRoundingAdamW` (fp32 step, stochastic
rounding), since plain AdamW on bf16 weights drops every update under half a bf16 ulp.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptflow.config.schema import ModelSection, TrainSection
from ptflow.train import sharding
from ptflow.train.bf16_adamw import StochasticRoundingAdamW
from ptflow.train.distributed import Ranks
from ptflow.train.init_weights import initialize
from ptflow.train.kernels import apply_speedups, base_causal_lm
from ptflow.train.model import build_model, count_parameters, setup_finetuning
from ptflow.train.telemetry import matmul_parameters

log = logging.getLogger("ptflow.train")

@dataclass
class Built:
    net: torch.nn.Module  # wrapped for its mode by `Ranks.wrap`: as it is, DDP or FSDP2
    n_total: int
    n_trainable: int
    n_matmul: int  # parameters in a per-token matmul (MFU's N: no input embedding table)
    speedups: list[str] = field(default_factory=list)


def build_net(section: ModelSection, model_dir: Path, train: TrainSection, vocab_size: int, seed: int,
              ranks: Ranks) -> Built:
    """The model to train on this rank's device, in its precision, with activation checkpointing, kernels, compile
    and its wrapper (DDP, or FSDP with `train.fsdp`) applied; build the optimizer after it (FSDP swaps parameters)."""
    sharded = train.fsdp and ranks.world > 1
    # FSDP shards a model too big for one device: from scratch, it stays on the meta device until it is sharded,
    # then each rank initialises only its shards; saved weights load on the CPU, then shard
    net = setup_finetuning(build_model(section, model_dir, vocab_size, seed, ranks.device, sharded), train)
    if train.pure_bf16:
        net.to(torch.bfloat16)
    if train.gradient_checkpointing:
        if hasattr(net, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_total, n_trainable = count_parameters(net)
    n_matmul = matmul_parameters(base_causal_lm(net))  # before sharding: full shapes
    speedups = apply_speedups(net, train.model_copy(update={"torch_compile": False}) if sharded else train)
    if sharded:
        if train.torch_compile:
            speedups.append(sharding.compile_layers(net))
        speedups.append(f"FSDP over {ranks.world} processes")
    net = ranks.wrap(net, fsdp=sharded, bf16_autocast=train.bf16 and not train.pure_bf16,
                     bucket_cap_mb=train.ddp_bucket_cap_mb)
    if sharded and section.train_from_scratch:
        initialize(net, ranks.device, seed)
    return Built(net, n_total, n_trainable, n_matmul, speedups)


def build_optimizer(net, train: TrainSection, device: torch.device, seed: int) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA); for bf16 weights the stochastic-rounding AdamW, which loses no update on average."""
    if train.pure_bf16:
        return StochasticRoundingAdamW(param_groups(net, train.weight_decay), lr=train.learning_rate,
                                       betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon,
                                       seed=seed)
    return torch.optim.AdamW(param_groups(net, train.weight_decay), lr=train.learning_rate,
                             betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon,
                             fused=device.type == "cuda")


def build_scheduler(optimizer, train: TrainSection, total_steps: int):
    from transformers import get_scheduler

    warmup = train.warmup_steps or math.ceil(train.warmup_ratio * total_steps)
    return get_scheduler(train.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=scheduler_kwargs(train, total_steps))


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scheduler_kwargs(train: TrainSection, total_steps: int) -> dict | None:
    if train.lr_scheduler_type == "warmup_stable_decay":
        return {"num_decay_steps": max(1, total_steps // 10)}
    if train.lr_scheduler_type == "cosine_with_min_lr":
        return {"min_lr_rate": 0.1}
    return None

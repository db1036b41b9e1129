"""FSDP (`train.fsdp`): parameters, gradients and AdamW states sharded across the training processes.

PyTorch's FSDP2 (`fully_shard`), one unit per decoder layer plus the root (embeddings, final norm,
head), on the process group `distributed.Ranks` set up (NCCL on GPUs, gloo on CPUs, so the CPU
tests exercise the same code). The rest of the train stage stays as it is: the same batches per
rank as DDP. Checkpoints are sharded: every rank writes its own shards of the weights and AdamW
states through `torch.distributed.checkpoint` (DCP), so a save moves no tensor between ranks and
needs no rank to hold the full state; DCP re-shards at load, onto any number of ranks (or one plain
model). Only the final model is gathered to full tensors on rank 0, so it loads with `from_pretrained`.

With `torch_compile`, each decoder layer's forward is compiled (not the module call), so FSDP's
all-gather hooks run outside the compiled graph.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ptflow.train.kernels import base_causal_lm

WRITE_THREADS = 8  # files (and writer threads) per rank in a sharded checkpoint


def decoder_layers(model):
    causal_lm = base_causal_lm(model)
    return getattr(causal_lm, causal_lm.base_model_prefix).layers


def shard(model, device: torch.device, world: int, bf16_autocast: bool) -> None:
    """Shard `model` in place across `world` processes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    # bf16 autocast: gather bf16 copies of the fp32 master shards, reduce gradients in fp32
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_autocast \
        else MixedPrecisionPolicy()
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed again at once by backward: keep them gathered
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def compile_layers(model) -> str:
    for layer in decoder_layers(model):
        layer.forward = torch.compile(layer.forward, dynamic=False)
    return "torch.compile (each decoder layer's forward, FSDP hooks eager)"


def save_sharded(model, optimizer, folder: Path, background_group=None):
    """Every rank writes its shards of the weights and optimizer state into `folder` (a collective).

    With `background_group` (a gloo group: DCP coordinates a background save over CPU collectives, apart from
    training's NCCL ones) the shards are copied to host memory and written by a thread; returns its future.
    """
    from torch.distributed.checkpoint import FileSystemWriter, async_save, save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optimizer_state = get_state_dict(model, optimizer)
    # several files per rank, written by parallel threads (and hashed in parallel afterwards): one ~60 GB file per
    # rank of a 10B model would be written and hashed by a single thread
    writer = FileSystemWriter(folder, thread_count=WRITE_THREADS)
    state = {"model": weights, "optimizer": optimizer_state}
    if background_group is not None:
        return async_save(state, storage_writer=writer, process_group=background_group)
    save(state, storage_writer=writer)
    return None


def load_sharded(model, optimizer, folder: Path) -> None:
    """Read a DCP checkpoint into `model`/`optimizer`, re-sharding to however they are laid out now."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optimizer_state = get_state_dict(model, optimizer)  # the current layout: DCP fills it in place
    state = {"model": weights, "optimizer": optimizer_state}
    load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_weights(model) -> dict:
    """The full model state dict on rank 0's CPU (a collective: every rank calls it), for the exported model."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def without_tied(model, state: dict) -> dict:
    """A full state dict minus second names of shared parameters (tied embeddings), as save_pretrained expects."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    unique = {name for name, _ in model.named_parameters()}
    return {name: tensor for name, tensor in state.items() if name not in every - unique}


def load_full_states(model, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Put full (unsharded) weights and optimizer state, as one process saves them, into the sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True, strict=False))


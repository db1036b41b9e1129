"""The train stage's one distributed stack, plain PyTorch as torchtitan: process group, device, model wrapper.

`Ranks.open` reads torchrun's environment (WORLD_SIZE, LOCAL_RANK; the group gives the rank): one process per GPU
with NCCL, or gloo ranks on the CPU (`train.use_cpu`, or no GPU: how the tests run two ranks);
without torchrun it is one process and no group. `wrap` gives the model for its mode: as it is
(one process), `DistributedDataParallel`, or FSDP2 (`sharding.shard`). What differs between the
modes (skipping the gradient reduction while accumulating, the global gradient norm, the module
to save) lives here, so the step and the loop never ask which mode they run in.

Plain torch rather than accelerate so that DDP and FSDP2 go through the same code (FSDP2 was
already raw torch) and DDP's own settings are ours to choose: gradients are views into DDP's
reduction buckets (`gradient_as_bucket_view`: no second copy of the gradients), no search for
unused parameters (frozen and LoRA-base parameters have requires_grad False, which DDP skips).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ptflow.errors import TrainingError
from ptflow.train import sharding

# HF Trainer's ddp_timeout: a barrier waits while rank 0 hashes and renames a large checkpoint
TIMEOUT = timedelta(seconds=1800)
# DDP's all-reduce bucket when train.ddp_bucket_cap_mb is unset: fewer, larger all-reduces than PyTorch's 25 MB
# (llama-1.1b on 2 H200s: 94.0% per-GPU efficiency at 100 MB, 94.4% at 400, 88.6% at 25)
BUCKET_MB = 100


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def check_backend(backend: str, device: torch.device) -> None:
    """NCCL moves only CUDA tensors: a NCCL group with CPU training would fail at its first collective."""
    if backend == "nccl" and device.type != "cuda":
        raise TrainingError(f"train: the process group uses nccl, which runs only on CUDA GPUs, but this rank trains "
                            f"on {device.type} (train.use_cpu: true, or no GPU); CPU ranks need gloo")


def local_device(cpu: bool, local_rank: int) -> torch.device:
    """This rank's device: its GPU (LOCAL_RANK), made the current one before any CUDA work, or the CPU."""
    if cpu:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise TrainingError(f"train.num_processes: local rank {local_rank} needs GPU {local_rank}, but this machine "
                            f"shows {count} GPU(s); run at most one process per GPU")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@dataclass
class Ranks:
    """This process's place among the training processes and the operations that span them."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this object created the group, so `close` ends it
    mode: str = "single"  # set by `wrap`: "single" (one process), "ddp" or "fsdp"
    _cpu_group: object = field(default=None, init=False, repr=False)  # `cpu_group`, made on first use

    @classmethod
    def open(cls, cpu: bool) -> Ranks:
        """Join torchrun's ranks (creating the group unless the caller already did), or run as one process."""
        world, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        device = local_device(cpu, local_rank)
        if world == 1 and not dist.is_initialized():
            return cls(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(backend_for(device), timeout=TIMEOUT,
                                    device_id=device if device.type == "cuda" else None)
        else:  # the caller's group (a script that set up torch.distributed itself): it must suit this device
            check_backend(dist.get_backend(), device)
        return cls(device, dist.get_rank(), dist.get_world_size(), local_rank, owns)

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order (a collective: every rank calls it)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (a collective: every rank calls it)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (a collective, and a device sync: for occasional decisions)."""
        if self.world == 1:
            return flag
        value = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def cpu_group(self):
        """A gloo group over the same ranks, for collectives from a background thread (DCP's async save) that must
        not interleave with training's NCCL ones; created once, by every rank (a collective)."""
        if self._cpu_group is None:
            self._cpu_group = dist.new_group(backend="gloo")
        return self._cpu_group

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over every rank (a new tensor; the input is left as it is)."""
        if self.world == 1:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    def wrap(self, net: torch.nn.Module, fsdp: bool = False, bf16_autocast: bool = False,
             bucket_cap_mb: int | None = None) -> torch.nn.Module:
        """`net` on this rank's device, as one process runs it, under DDP, or sharded by FSDP2 (in place).

        DDP does not broadcast buffers before each forward (its default): a causal LM's buffers (rotary
        frequencies) are constants, identical on every rank from the start.
        """
        if self.world > 1 and fsdp:
            sharding.shard(net, self.device, self.world, bf16_autocast)  # moves each unit's shards to the device
            self.mode = "fsdp"
            return net
        net.to(self.device)  # before the optimizer exists: its state is created (or loaded) on the device
        if self.world == 1:
            return net
        from torch.nn.parallel import DistributedDataParallel

        self.mode = "ddp"
        return DistributedDataParallel(net, device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                                       gradient_as_bucket_view=True, find_unused_parameters=False,
                                       broadcast_buffers=False, bucket_cap_mb=bucket_cap_mb or BUCKET_MB)

    def unwrap(self, net: torch.nn.Module) -> torch.nn.Module:
        """The model itself (what is saved and evaluated): DDP's inner module; an FSDP2 model is its own."""
        return net.module if self.mode == "ddp" else net

    def gradient_sync(self, net: torch.nn.Module, on: bool):
        """Reduce gradients across ranks in this forward/backward (`on`) or keep accumulating locally.

        Accumulation reduces only on a step's last micro-batch: DDP's `no_sync` around the others;
        FSDP2 keeps the switch on the module (`set_requires_gradient_sync`) until it is flipped.
        """
        if self.mode == "fsdp":
            net.set_requires_gradient_sync(on)
        elif self.mode == "ddp" and not on:
            return net.no_sync()
        return nullcontext()

    def clip(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """The global gradient norm (clipping to `max_norm` when > 0) as a plain tensor, in every mode.

        After DDP's reduction every rank holds the same full gradients; FSDP2's are DTensor shards,
        whose norm torch combines across ranks (`full_tensor` makes it a plain tensor).
        """
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def full_weights(self, net: torch.nn.Module) -> dict | None:
        """FSDP: the gathered full state dict on rank 0 (a collective: every rank calls it); else None (unsharded)."""
        return sharding.full_weights(net) if self.mode == "fsdp" else None

    def close(self) -> None:
        """End the group this object created, once every rank has got here (rank 0 exports while the others wait).

        Only a NCCL group is destroyed (PyTorch warns about leaked NCCL resources otherwise). A gloo group is
        left to the process's exit: its teardown once hung a CPU rank in CI, the main thread joining a gloo
        thread that was itself waiting for the GIL (seen with gdb).
        """
        if self.owns_group and dist.is_initialized():
            self.barrier()
            if dist.get_backend() == "nccl":
                dist.destroy_process_group()
            self.owns_group = False

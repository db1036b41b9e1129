"""One optimizer step: token-weighted gradient accumulation over micro-batches and ranks, clip, update.

The loss of a step is the mean over every labelled token of the step, on every rank (what
transformers' Trainer does with `num_items_in_batch`), not a mean of per-micro-batch means: with
padded rows (`packing: false`) micro-batches hold different token counts, and equal weights would
make the gradient depend on how a step is cut into micro-batches. So the step's labelled tokens
are counted up front (summed across ranks), each micro-batch's loss is its *sum* over tokens
divided by that global count, and multiplied by the world size because DDP and FSDP average
gradients over ranks. The model computes the sum itself when given `num_items_in_batch`, which
keeps liger's fused linear cross-entropy (no logits) and compiled forwards working unchanged.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ptflow.config.schema import TrainSection
from ptflow.train import sharding
from ptflow.train.batches import StepBatch
from ptflow.train.kernels import attention_backend


def global_labelled(batch: StepBatch, padded: bool, world: int, device: torch.device) -> torch.Tensor:
    """Labelled tokens of the whole optimizer step across ranks (one all-reduce, only when rows are padded)."""
    count = batch.count.clone() if batch.count is not None else torch.tensor(float(batch.labelled), device=device)
    if world > 1:
        if padded:
            dist.all_reduce(count)
        else:
            count *= world  # full rows: every rank holds the same number of targets
    return count


@dataclass
class StepRunner:
    """Runs optimizer steps on a prepared model; returns the step's loss (global token mean) and grad norm."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    accelerator: object
    train: TrainSection
    sharded: bool
    padded: bool

    def __post_init__(self):
        self.world = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.autocast_on = self.train.bf16 and not self.train.pure_bf16

    def __call__(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self.accumulate(batch)
        grad_norm = self.clip()
        self.optimizer.step()
        self.last_lr = self.scheduler.get_last_lr()[0]  # the rate this step used, as HF Trainer logs it
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            loss = self.accelerator.reduce(loss, reduction="sum")
        return loss, grad_norm

    def accumulate(self, batch: StepBatch) -> torch.Tensor:
        """Backward over every micro-batch; returns this rank's share of the step's mean loss."""
        # per-rank divisor: global count / world, so DDP/FSDP's averaging over ranks leaves sum / global count
        divisor = global_labelled(batch, self.padded, self.world, self.device) / self.world
        last = len(batch.micro) - 1
        total = torch.zeros((), device=self.device)
        for i, (ids, labels, mask, positions) in enumerate(batch.micro):
            with self._sync(i == last), attention_backend(self.train), \
                    torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_on):
                loss = self.net(input_ids=ids, labels=labels, attention_mask=mask, position_ids=positions,
                                num_items_in_batch=divisor).loss
            self.accelerator.backward(loss)
            total += loss.detach().float()
        return total / self.world  # summed over ranks by the caller: the step's token mean

    def _sync(self, last: bool):
        """Reduce gradients only on the last micro-batch of the step."""
        if self.sharded:
            self.net.set_requires_gradient_sync(last)
            return nullcontext()
        return self.accelerator.no_sync(self.net) if not last and self.world > 1 else nullcontext()

    def clip(self) -> torch.Tensor:
        if self.sharded:
            return sharding.clip_grad_norm(self.params, self.train.max_grad_norm)
        if self.train.max_grad_norm > 0:
            return self.accelerator.clip_grad_norm_(self.params, self.train.max_grad_norm)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))

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

from dataclasses import dataclass

import torch

from ptflow.config.schema import TrainSection
from ptflow.train.batches import StepBatch
from ptflow.train.distributed import Ranks
from ptflow.train.kernels import attention_backend


def global_labelled(batch: StepBatch, padded: bool, ranks: Ranks) -> torch.Tensor:
    """Labelled tokens of the whole optimizer step across ranks (one all-reduce, only when rows are padded)."""
    if padded:
        return ranks.sum(batch.count)
    return batch.count * ranks.world  # full rows: every rank holds the same number of targets


@dataclass
class StepRunner:
    """Runs optimizer steps on the wrapped model (`Ranks.wrap`); returns the step's loss (global token mean) and
    grad norm."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    ranks: Ranks
    train: TrainSection
    padded: bool

    def __post_init__(self):
        self.world, self.device = self.ranks.world, self.ranks.device
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.autocast_on = self.train.bf16 and not self.train.pure_bf16

    def __call__(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self.accumulate(batch)
        grad_norm = self.ranks.clip(self.params, self.train.max_grad_norm)
        self.optimizer.step()
        self.last_lr = self.scheduler.get_last_lr()[0]  # the rate this step used, as HF Trainer logs it
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.ranks.sum(loss), grad_norm

    def accumulate(self, batch: StepBatch) -> torch.Tensor:
        """Backward over every micro-batch; returns this rank's share of the step's mean loss."""
        # per-rank divisor: global count / world, so DDP/FSDP's averaging over ranks leaves sum / global count
        divisor = global_labelled(batch, self.padded, self.ranks) / self.world
        last = len(batch.micro) - 1
        total = torch.zeros((), device=self.device)
        for i, (ids, labels, mask, positions) in enumerate(batch.micro):
            with self.ranks.gradient_sync(self.net, i == last):  # reduce only on the step's last micro-batch
                with attention_backend(self.train), \
                        torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_on):
                    loss = self.net(input_ids=ids, labels=labels, attention_mask=mask, position_ids=positions,
                                    num_items_in_batch=divisor).loss
                loss.backward()
            total += loss.detach().float()
        return total / self.world  # summed over ranks by the caller: the step's token mean

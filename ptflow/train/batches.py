"""Where each optimizer step's micro-batches come from: stored blocks or a stream, behind one interface.

`StoredBatches` reads the memory-mapped blocks of a prepared dataset in the order `DataOrder`
gives (step s is a pure function of (seed, s), so a resume seeks straight to it);
`StreamedBatches` packs a stream of shards as it goes and keeps the data cursor after every
step for checkpoints; under torchrun the ranks of a node share each shard's tokens (node_tokens.py). Both cut a step's blocks into the same per-rank micro-batches and count
the labelled tokens of the step up front, which the token-weighted loss divides by.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ptflow.data.node_tokens import NodeTokens
from ptflow.data.stream import BlockStream, Cursor, StreamPlan
from ptflow.data.workers import default_workers
from ptflow.train.eval_loss import batch_tensors, document_positions


@dataclass
class StepBatch:
    """One optimizer step on this rank: micro-batches (ids, labels, mask, positions) and its labelled tokens.

    `count` is `labelled` already on the device, copied in the prefetch thread like the batch: building it in
    the step from a Python number would be a blocking host-to-device copy, a GPU sync every step.
    """

    micro: list[tuple]
    labelled: int
    count: torch.Tensor


@dataclass(frozen=True)
class Slicing:
    """How a step's blocks are cut: rows of micro-batch i on this rank are (i × world + rank) × mb onwards."""

    micro_batch: int
    accumulation: int
    rank: int
    world: int
    seq_len: int
    device: torch.device

    def rows(self, indices: np.ndarray, i: int) -> np.ndarray:
        first = (i * self.world + self.rank) * self.micro_batch
        return indices[first: first + self.micro_batch]


class BatchSource(Protocol):
    padded: bool  # rows may end in padding (packing: false), so the labelled-token count varies per step

    def take(self, step: int) -> StepBatch: ...
    def epoch_at(self, step: int) -> float: ...
    def cursor_at(self, step: int) -> dict | None: ...
    def describe(self) -> str: ...
    def report(self) -> dict | None: ...
    def close(self) -> None: ...


class DataOrder:
    """Which blocks make up optimizer step `step`, computed directly (O(1) seek)."""

    def __init__(self, n_blocks: int, per_step: int, seed: int):
        self.n_blocks, self.per_step, self.seed = n_blocks, per_step, seed
        self.steps_per_epoch = n_blocks // per_step
        self._epoch, self._perm = -1, None

    def step_indices(self, step: int) -> np.ndarray:
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        start = offset * self.per_step
        return np.sort(self._perm[start: start + self.per_step])  # sorted: sequential reads from the memmap


def labelled_tokens(labels: torch.Tensor) -> int:
    """Targets the loss is taken over: labels after the one-token shift that are not -100."""
    return int((labels[:, 1:] != -100).sum())


def cut_step(blocks, lengths, doc_starts, indices: np.ndarray, cut: Slicing) -> StepBatch:
    """This rank's micro-batches of one step's blocks, on the device, and their labelled-token count."""
    micro, labelled = [], 0
    for i in range(cut.accumulation):
        rows = cut.rows(indices, i)
        ids, labels, mask = batch_tensors(blocks, lengths, rows)
        positions = None if doc_starts is None else document_positions(doc_starts, rows, cut.seq_len)
        labelled += labelled_tokens(labels)
        micro.append(tuple(None if t is None else to_device(t, cut.device) for t in (ids, labels, mask, positions)))
    return StepBatch(micro, labelled, to_device(torch.tensor(float(labelled)), cut.device))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class StoredBatches:
    """Blocks of a prepared dataset, one seeded permutation per epoch."""

    def __init__(self, blocks, lengths, doc_starts, per_step: int, seed: int, cut: Slicing):
        self.blocks, self.lengths, self.doc_starts, self.cut = blocks, lengths, doc_starts, cut
        self.order = DataOrder(len(blocks), per_step, seed)
        self.padded = lengths is not None

    def take(self, step: int) -> StepBatch:
        return cut_step(self.blocks, self.lengths, self.doc_starts, self.order.step_indices(step), self.cut)

    def epoch_at(self, step: int) -> float:
        return step / self.order.steps_per_epoch

    def cursor_at(self, step: int) -> dict | None:
        return None  # the step number is the cursor

    def describe(self) -> str:
        return f"{len(self.blocks)} train blocks"

    def report(self) -> dict | None:
        return None

    def close(self) -> None:
        pass


class StreamedBatches:
    """Blocks packed from a stream of shards; every rank reads the whole stream and keeps its rows, and with `node`
    (torchrun, several ranks on this node) each shard is tokenized once per node, not once per rank."""

    def __init__(self, plan: StreamPlan, tokenizer, cursor: Cursor | None, start_step: int, per_step: int,
                 cut: Slicing, node: NodeTokens | None = None):
        self.plan, self.per_step, self.cut, self.padded = plan, per_step, cut, False
        self.stream = BlockStream(plan, tokenizer, cursor, workers=default_workers(beside_training=True), node=node)
        self.cursors = {start_step: self.stream.cursor() if cursor is None else cursor}  # cursor after each step

    def take(self, step: int) -> StepBatch:
        blocks, starts, self.cursors[step + 1] = self.stream.take(self.per_step)
        self.cursors.pop(step - 1, None)  # a checkpoint only ever asks for the step just done
        return cut_step(blocks, None, starts, np.arange(self.per_step), self.cut)

    def epoch_at(self, step: int) -> float:
        at = self.cursors.get(step) or Cursor()
        return at.epoch + at.shard / len(self.plan.shards)

    def cursor_at(self, step: int) -> dict | None:
        return self.cursors[step].to_json()

    def describe(self) -> str:
        return f"blocks streamed from {len(self.plan.shards)} shards"

    def report(self) -> dict | None:
        """What this rank tokenized itself and what it read from another rank's token files."""
        return {**self.stream.tokenizing, "tokenize_cpu_s": round(self.stream.tokenizing["tokenize_cpu_s"], 3)}

    def close(self) -> None:
        self.stream.close()


class Prefetch:
    """Reads step s + 1's batch in a background thread while step s trains (pinned, non-blocking copies)."""

    def __init__(self, source: BatchSource, start_step: int, total_steps: int):
        self.source, self.total = source, total_steps
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = self.pool.submit(source.take, start_step) if start_step < total_steps else None

    def next(self, step: int) -> StepBatch:
        batch = self.pending.result()
        self.pending = self.pool.submit(self.source.take, step + 1) if step + 1 < self.total else None
        return batch

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.source.close()

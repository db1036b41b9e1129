"""Token-weighted next-token loss over packed blocks: used by training's periodic evaluation and the evaluate stage.

The loss is the sum of per-token losses over all predicted tokens divided by their count
(not a mean of batch means), so it does not depend on the batch size. With document masking
(`data.doc_mask`) the position ids restart at every document start, exactly as in training, so
no token attends to another document. Under several processes each rank evaluates its own
contiguous slice of the blocks and the sums and counts are all-reduced: N ranks do 1/N of the work.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from ptflow.data.packing import segments


def batch_tensors(blocks: np.ndarray, lengths: np.ndarray | None, index) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """input_ids, labels (-100 on padding) and attention mask for the blocks at `index`."""
    ids = torch.from_numpy(np.asarray(blocks[index], dtype=np.int64))
    if lengths is None:
        return ids, ids, None
    mask = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(np.asarray(lengths[index], dtype=np.int64))[:, None]
    labels = ids.masked_fill(~mask, -100)
    return ids, labels, mask.long()


def document_positions(doc_starts, rows, seq_len: int) -> torch.Tensor:
    """Position ids restarting at every document start (data.doc_mask).

    transformers reads restarting position ids as packed sequences and masks attention across
    them (block-diagonal causal mask), so no token attends to another document.
    """
    return torch.from_numpy(np.stack([segments(doc_starts[int(r)], seq_len)[1] for r in rows]).astype(np.int64))


def eval_batches(n_blocks: int, batch_size: int, rank: int, world: int) -> list[tuple[np.ndarray, bool]]:
    """(rows, counted) per batch of this rank's slice; every rank gets the same number of batches.

    Sharded (FSDP) forwards are collectives, so a rank whose slice ran out repeats a row and
    does not count it rather than skipping a forward the other ranks make.
    """
    shares = np.array_split(np.arange(n_blocks), world)
    n_batches = math.ceil(len(shares[0]) / batch_size)  # the first share is the largest
    mine = shares[rank]
    batches = []
    for b in range(n_batches):
        rows = mine[b * batch_size: (b + 1) * batch_size]
        batches.append((rows, True) if len(rows) else (np.zeros(1, dtype=np.int64), False))
    return batches


@torch.no_grad()
def eval_loss(model, blocks: np.ndarray, lengths: np.ndarray | None, batch_size: int, device,
              autocast_dtype: torch.dtype | None = None, doc_starts=None, rank: int = 0,
              world: int = 1) -> tuple[float, int]:
    """Token-weighted mean next-token loss over all blocks (all ranks'), and the number of predicted tokens."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, predicted tokens
    for rows, counted in eval_batches(len(blocks), batch_size, rank, world):
        ids, labels, mask = batch_tensors(blocks, lengths, rows)
        extra = {} if doc_starts is None else \
            {"position_ids": document_positions(doc_starts, rows, ids.shape[1]).to(device)}
        ids, labels = ids.to(device), labels.to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            logits = model(input_ids=ids, attention_mask=None if mask is None else mask.to(device), **extra).logits
        if counted:
            targets = labels[:, 1:]
            totals[0] += torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                                           ignore_index=-100, reduction="sum")
            totals[1] += (targets != -100).sum()
    if world > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    total, count = totals[0].item(), int(totals[1].item())
    return (total / count if count else float("nan")), count


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")

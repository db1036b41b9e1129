"""Token-weighted next-token loss over packed blocks: used by training's periodic evaluation and the evaluate stage.

The loss is the sum of per-token losses over all predicted tokens divided by their count
(not a mean of batch means), so it does not depend on the batch size.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def batch_tensors(blocks: np.ndarray, lengths: np.ndarray | None, index) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """input_ids, labels (-100 on padding) and attention mask for the blocks at `index`."""
    ids = torch.from_numpy(np.asarray(blocks[index], dtype=np.int64))
    if lengths is None:
        return ids, ids, None
    mask = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(np.asarray(lengths[index], dtype=np.int64))[:, None]
    labels = ids.masked_fill(~mask, -100)
    return ids, labels, mask.long()


@torch.no_grad()
def eval_loss(model, blocks: np.ndarray, lengths: np.ndarray | None, batch_size: int, device,
              autocast_dtype: torch.dtype | None = None) -> tuple[float, int]:
    """Token-weighted mean next-token loss over all blocks, and the number of predicted tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids, labels, mask = batch_tensors(blocks, lengths, slice(start, start + batch_size))
        ids, labels = ids.to(device), labels.to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            logits = model(input_ids=ids, attention_mask=None if mask is None else mask.to(device)).logits
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                                   ignore_index=-100, reduction="sum")
        total += losses.item()
        count += int((targets != -100).sum())
    model.train(was_training)
    return (total / count if count else float("nan")), count


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")

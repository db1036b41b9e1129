"""Which documents, in which order: `num_samples`, `max_samples` and `mix_strategy`, as LLaMA-Factory does them.

Selection works on document indices only (the tokens stay in the cache), so it is cheap and exact:

- `num_samples` (a dataset_info entry): a seeded permutation of the dataset, cut or extended by
  sampling with replacement when larger than the dataset (every document appears at least once).
- `max_samples`: then keep the first N documents of each dataset.
- `mix_strategy`: `concat` appends the datasets in order; `interleave_under` / `interleave_over`
  reproduce `datasets.interleave_datasets` with `stopping_strategy` first_exhausted / all_exhausted
  (round robin without `interleave_probs`; otherwise a seeded draw of the source of each document,
  bit-identical to `datasets` for the same seed).

    order = mix([np.arange(3), np.arange(5)], "interleave_under", None, seed=42)   # (source, document) pairs
    eval_docs = held_out(hashes, val_size=0.05)   # val_size: which documents are held out, by content hash
"""

from __future__ import annotations

import zlib

import numpy as np

from ptflow.errors import DataError


def select(n_docs: int, name: str, num_samples: int | None, max_samples: int | None, seed: int) -> np.ndarray:
    """Indices of a dataset's documents after num_samples (seeded per dataset name) and max_samples."""
    indices = np.arange(n_docs, dtype=np.int64)
    if num_samples is not None:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        indices = rng.permutation(n_docs)[:num_samples]
        if num_samples > n_docs:  # every document once, the rest drawn with replacement
            indices = np.concatenate([indices, rng.choice(n_docs, num_samples - n_docs)])
    if max_samples is not None:
        indices = indices[:max_samples]
    return indices


def mix(selections: list[np.ndarray], strategy: str, probabilities: list[float] | None, seed: int
        ) -> tuple[np.ndarray, np.ndarray]:
    """(source index, document index) of every document of the mixed dataset, in order."""
    lengths = np.array([len(s) for s in selections], dtype=np.int64)
    k = len(selections)
    if strategy == "concat" or k == 1 and probabilities is None:
        source = np.repeat(np.arange(k), lengths)
        position = np.concatenate([np.arange(n) for n in lengths]) if k else np.zeros(0, np.int64)
    else:
        source, position = interleave(lengths, probabilities, seed, oversample=strategy == "interleave_over")
    doc = np.empty(len(source), dtype=np.int64)
    for s in range(k):
        at = source == s
        doc[at] = selections[s][position[at]]
    return source, doc


def interleave(lengths: np.ndarray, probabilities: list[float] | None, seed: int, oversample: bool
               ) -> tuple[np.ndarray, np.ndarray]:
    """`datasets.interleave_datasets` (map-style) as (source, position in source) arrays."""
    k = len(lengths)
    if probabilities is None:
        rows = int(lengths.max()) if oversample else int(lengths.min())
        position = np.arange(rows).reshape(-1, 1) % lengths.reshape(1, -1)
        return np.tile(np.arange(k), rows), position.ravel()
    drawable = np.asarray(probabilities, dtype=np.float64) > 0
    rng = np.random.default_rng(seed)
    blocks, counts = [], np.zeros(k, dtype=np.int64)
    reached = np.zeros(k, dtype=bool)
    while not (reached[drawable].all() if oversample else reached[drawable].any()):
        block = rng.choice(k, size=1000, p=probabilities)  # 1000 at a time, as datasets draws them
        blocks.append(block)
        counts += np.bincount(block, minlength=k)
        reached = counts >= lengths
    draws = np.concatenate(blocks)
    occurrences = [np.flatnonzero(draws == s) for s in range(k)]
    exhausted_at = [occ[lengths[s] - 1] for s, occ in enumerate(occurrences) if drawable[s] and len(occ) >= lengths[s]]
    stop = max(exhausted_at) if oversample else min(exhausted_at)
    source = draws[: stop + 1]
    position = np.empty(len(source), dtype=np.int64)
    for s in range(k):
        at = np.flatnonzero(source == s)
        position[at] = np.arange(len(at)) % max(lengths[s], 1)
    return source, position


def held_out(hashes: np.ndarray, val_size: float) -> np.ndarray:
    """Which documents `val_size` holds out, by the content hash of each (before packing, as LLaMA-Factory splits).

    A fraction f holds out every document whose hash is below f * 2^64: about f of them, and always the same ones,
    so when the corpus grows no earlier eval document is ever trained on. A count N holds out the N distinct
    documents of smallest hash; a grown corpus's N smallest are then a subset of the earlier eval documents plus
    new ones, which keeps the same guarantee. Copies of a held-out document are held out with it.
    """
    shown = int(val_size) if val_size >= 1 else val_size
    if val_size < 1:
        held = hashes < np.uint64(min(int(val_size * 2**64), 2**64 - 1))
    else:
        distinct = np.unique(hashes)
        if int(val_size) >= len(distinct):
            raise DataError(f"data.val_size: {shown} asks for {int(val_size)} of {len(distinct)} distinct "
                            "documents, leaving none to train on; lower val_size or add data")
        held = hashes <= distinct[int(val_size) - 1]
    if held.all():
        raise DataError(f"data.val_size: {shown} holds out all {len(hashes)} documents, leaving none to train "
                        "on; lower val_size or add data")
    return held

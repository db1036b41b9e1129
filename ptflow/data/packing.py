"""Packing: documents (ids + EOS) into fixed-length blocks, and where documents start inside them.

`pack` concatenates the whole corpus and cuts it into `cutoff_len` blocks: only the final partial
block is dropped. LLaMA-Factory instead packs each 1000-document `datasets.map` batch on its own
and drops every batch's remainder (up to cutoff_len - 1 tokens per 1000 documents), masks EOS out
of the loss because pad == EOS, and writes BOS over the first token of every block when the
tokenizer has `add_bos_token`; none of that happens here (docs/data.md).

`truncate` (packing: false) gives each document its own block, cut at `cutoff_len` and padded,
with its length. `doc_starts` records, for each packed block, the offsets where a document starts
(always 0, then every position after an EOS), as CSR arrays (`offsets`, `starts`): what training
needs to block attention across documents and restart positions (`segments`).

    blocks, dropped = pack(stream, cutoff_len)
    offsets, starts = doc_starts(doc_ends, len(blocks), cutoff_len)
    segment_ids, position_ids = segments(starts[offsets[i]:offsets[i + 1]], cutoff_len)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def pack(stream: np.ndarray, cutoff_len: int) -> tuple[np.ndarray, int]:
    """(blocks: a view of shape (n, cutoff_len), tokens dropped: the final partial block only)."""
    n = len(stream) // cutoff_len
    return stream[: n * cutoff_len].reshape(n, cutoff_len), len(stream) - n * cutoff_len


def truncate(stream: np.ndarray, doc_ends: np.ndarray, cutoff_len: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """One block per document, cut at cutoff_len and padded: (blocks, lengths, tokens dropped, padding tokens)."""
    starts = np.concatenate([[0], doc_ends[:-1]]).astype(np.int64)
    full = doc_ends - starts
    lengths = np.minimum(full, cutoff_len).astype(np.int32)
    blocks = np.full((len(doc_ends), cutoff_len), pad_id, dtype=stream.dtype)
    for i, (start, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        blocks[i, :n] = stream[start: start + n]
    dropped = int((full - lengths).sum())
    padding = int(len(doc_ends) * cutoff_len - lengths.sum())
    return blocks, lengths, dropped, padding


def doc_starts(doc_ends: np.ndarray, n_blocks: int, cutoff_len: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of document starts per packed block: block i's starts are starts[offsets[i]:offsets[i + 1]].

    A block always starts a segment at 0 (the tail of a document cut by the previous block counts
    as a document of its own: it cannot attend to what is in another block anyway).
    """
    end = n_blocks * cutoff_len
    inner = np.asarray(doc_ends[:-1], dtype=np.int64)
    inner = inner[inner < end]
    positions = np.union1d(np.arange(n_blocks, dtype=np.int64) * cutoff_len, inner)
    block = positions // cutoff_len
    offsets = np.searchsorted(block, np.arange(n_blocks + 1)).astype(np.int64)
    return offsets, (positions % cutoff_len).astype(np.int32)


def select_rows(offsets: np.ndarray, starts: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CSR of `rows` (in that order)."""
    rows = np.asarray(rows, dtype=np.int64)
    counts = offsets[rows + 1] - offsets[rows]
    new_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    index = np.repeat(offsets[rows] - new_offsets[:-1], counts) + np.arange(int(new_offsets[-1]))
    return new_offsets, starts[index]


def segments(block_starts: np.ndarray, cutoff_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment id, position within its document) of every token of one block, from its document starts."""
    arange = np.arange(cutoff_len)
    segment = np.searchsorted(block_starts, arange, side="right") - 1
    return segment, arange - np.asarray(block_starts)[segment]


@dataclass(frozen=True)
class DocStarts:
    """Memory-mapped document starts of one split's blocks (written with `doc_mask: true`)."""

    offsets: np.ndarray
    starts: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, block: int) -> np.ndarray:
        return np.asarray(self.starts[self.offsets[block]: self.offsets[block + 1]])


def save_doc_starts(folder: Path, split: str, offsets: np.ndarray, starts: np.ndarray) -> None:
    np.save(folder / f"{split}_doc_offsets.npy", offsets)
    np.save(folder / f"{split}_doc_starts.npy", starts)


def load_doc_starts(folder: Path, split: str) -> DocStarts | None:
    path = folder / f"{split}_doc_offsets.npy"
    if not path.exists():
        return None
    return DocStarts(np.load(path), np.load(folder / f"{split}_doc_starts.npy", mmap_mode="r"))

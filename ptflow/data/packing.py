"""Packing: documents (ids + EOS) into fixed-length blocks, and where documents start inside them.

`Packer` is the one packer of both the stored and the streamed dataset: it is fed runs of
documents (a cached shard, a chunk of mixed documents, or what is left of a streamed shard) and
returns each `cutoff_len` block as soon as it is full, holding back at most one partial block, so
memory is bounded by what is fed, never by the corpus. Only the final partial block is dropped.
LLaMA-Factory instead packs each 1000-document `datasets.map` batch on its own and drops every
batch's remainder (up to cutoff_len - 1 tokens per 1000 documents), masks EOS out of the loss
because pad == EOS, and writes BOS over the first token of every block when the tokenizer has
`add_bos_token`; none of that happens here (docs/data.md).

`truncate` (packing: false) gives each document its own block, cut at `cutoff_len` and padded,
with its length. Document starts of packed blocks (always 0, then every position after an EOS)
come out as CSR arrays (`offsets`, `starts`) from `block_starts`, the one builder: what training
needs to block attention across documents and restart positions (`segments`). `BlockFile`
appends rows to a `.npy` file whose row count is known up front (no corpus-sized array in RAM).

    packer = Packer(cutoff_len, np.uint16)
    blocks, (offsets, starts), used = packer.feed(tokens, doc_ends)   # per run of documents
    segment_ids, position_ids = segments(starts[offsets[i]:offsets[i + 1]], cutoff_len)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class Packer:
    """Runs of documents in, full `cutoff_len` blocks out, with the document starts of each block."""

    def __init__(self, cutoff_len: int, dtype: np.dtype | str):
        self.length = cutoff_len
        self.carry = np.zeros(0, dtype=np.dtype(dtype))  # the partial block
        self.carry_starts = np.zeros(0, dtype=np.int64)  # document starts inside it (> 0)

    def feed(self, tokens: np.ndarray, ends: np.ndarray, new_doc: bool = True, limit: int | None = None
             ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], int]:
        """(the blocks this run completes, their document starts as CSR, tokens of the run consumed).

        `ends`: document ends within `tokens`; `new_doc`: tokens[0] begins a document (a new shard
        does; the rest of a shard read on from a cursor does not); `limit`: complete at most this many
        blocks and consume only what they need (a stream's `take`), so the cursor is a block boundary.
        """
        size, held = self.length, len(self.carry)
        n = (held + len(tokens)) // size
        used = len(tokens)
        if limit is not None and n >= limit:
            n = limit
            used = max(0, n * size - held)
        head = tokens[:used]
        ends = np.asarray(ends, dtype=np.int64)
        positions = [self.carry_starts, held + ends[(ends > 0) & (ends < used)]]
        if new_doc and held and used:
            positions.insert(1, np.array([held], dtype=np.int64))
        positions = np.concatenate(positions)
        blocks = np.empty((n, size), dtype=self.carry.dtype)
        if n:
            first = size - held
            blocks[0, :held] = self.carry
            blocks[0, held:] = head[:first]
            blocks[1:] = np.asarray(head[first: first + (n - 1) * size]).reshape(n - 1, size)
            self.carry = np.array(head[first + (n - 1) * size:])  # a copy: no memory map stays referenced
        else:
            self.carry = np.concatenate([self.carry, head])
        self.carry_starts = positions[positions > n * size] - n * size
        return blocks, block_starts(positions, n, size), used

    def drop(self) -> int:
        """Discard the partial block (the end of the corpus, or of a pass over a stream); its token count."""
        dropped = len(self.carry)
        self.carry = self.carry[:0]
        self.carry_starts = self.carry_starts[:0]
        return dropped


def block_starts(positions: np.ndarray, n_blocks: int, cutoff_len: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of document starts per block from the positions where documents start in the blocks' concatenation:
    block i's starts are starts[offsets[i]:offsets[i + 1]].

    A block always starts a segment at 0 (the tail of a document cut by the previous block counts
    as a document of its own: it cannot attend to what is in another block anyway).
    """
    end = n_blocks * cutoff_len
    inner = np.asarray(positions, dtype=np.int64)
    inner = inner[inner < end]
    every = np.union1d(np.arange(n_blocks, dtype=np.int64) * cutoff_len, inner)
    block = every // cutoff_len
    offsets = np.searchsorted(block, np.arange(n_blocks + 1)).astype(np.int64)
    return offsets, (every % cutoff_len).astype(np.int32)


def pack(stream: np.ndarray, cutoff_len: int) -> tuple[np.ndarray, int]:
    """(blocks of shape (n, cutoff_len), tokens dropped: the final partial block only) of a whole stream."""
    packer = Packer(cutoff_len, stream.dtype)
    blocks, _, _ = packer.feed(stream, np.zeros(0, dtype=np.int64))
    return blocks, packer.drop()


def doc_starts(doc_ends: np.ndarray, n_blocks: int, cutoff_len: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of document starts of the first `n_blocks` packed blocks of a stream with these document ends."""
    return block_starts(np.asarray(doc_ends, dtype=np.int64)[:-1], n_blocks, cutoff_len)


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


class BlockFile:
    """A `.npy` file of `rows` x `cutoff_len` written by appending rows in order (what `np.save` would write)."""

    def __init__(self, path: Path, rows: int, cutoff_len: int, dtype: np.dtype):
        self.path, self.rows, self.written = Path(path), rows, 0
        self.file = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": (rows, cutoff_len)}
        np.lib.format.write_array_header_1_0(self.file, header)

    def append(self, blocks: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(blocks).data)  # its buffer: no copy into bytes
        self.written += len(blocks)

    def close(self) -> None:
        self.file.close()
        if self.written != self.rows:
            raise RuntimeError(f"{self.path}: wrote {self.written} of {self.rows} rows (a packing bug)")

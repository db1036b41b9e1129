"""The stored dataset's blocks: the selected and mixed documents of cached shards, packed and written as they fill.

Memory is bounded by a shard, not the corpus: `DocumentOrder` holds only per-document indices
(which shard, where, how long), `runs` memory-maps shards one at a time and gathers mixed
documents at most CHUNK_TOKENS at a time, the one `Packer` turns each run into blocks, and the
blocks are appended to `<split>.npy` (`BlockFile`). Blocks come out exactly as packing the whole
concatenated split would cut them. Each split is a document order of its own: `val_size` holds out
documents (by content hash, mixing.held_out) before packing.

    order = DocumentOrder.of(sources, shards, section, seed, "concat", "train")
    written = write_blocks(order, section, folder, dtype, pad_id, "train")
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ptflow.data.mixing import held_out, mix, select
from ptflow.data.packing import BlockFile, Packer, save_doc_starts, truncate
from ptflow.data.shards import SourceShards, open_doc_hashes
from ptflow.data.sources import Source

if TYPE_CHECKING:
    from ptflow.config.schema import DataSection

CHUNK_TOKENS = 1 << 21  # mixed documents gathered per step (a run of one shard is taken whole)
LONG_RUN = 4096  # mean run length (tokens) above which runs are copied slice by slice, not by one fancy index


@dataclass
class DocumentOrder:
    """Every selected document in training order, as (shard, start in shard, length): no tokens."""

    paths: list[str]  # shard folders
    shard: np.ndarray
    start: np.ndarray
    length: np.ndarray
    per_source: dict[str, tuple[int, int]]  # name -> (documents, tokens) in the mix

    @property
    def total(self) -> int:
        return int(self.length.sum())

    @classmethod
    def empty(cls) -> "DocumentOrder":
        none = np.zeros(0, dtype=np.int64)
        return cls([], none.astype(np.int32), none, none, {})

    @classmethod
    def of(cls, sources: list[Source], shards: dict[str, SourceShards], section: "DataSection", seed: int,
           strategy: str, part: str = "all") -> "DocumentOrder":
        """num_samples, max_samples and mixing applied to document indices (mixing.py), from the shards' doc ends;
        then the `part` of them val_size assigns ("train", "eval" or "all": held out by content hash)."""
        paths, shard_of, starts, lengths, selections = [], [], [], [], []
        for source in sources:
            index, begin, size = [], [], []
            for result in shards[source.name].shards:
                ends = np.load(Path(result.path) / "doc_ends.npy")
                index.append(np.full(len(ends), len(paths), dtype=np.int32))
                begin.append(np.concatenate([[0], ends[:-1]]).astype(np.int64)[: len(ends)])  # none if empty
                size.append(np.diff(ends, prepend=0).astype(np.int64))
                paths.append(result.path)
            shard_of.append(_cat(index, np.int32))
            starts.append(_cat(begin, np.int64))
            lengths.append(_cat(size, np.int64))
            selections.append(select(len(lengths[-1]), source.name, source.num_samples, section.max_samples, seed))
        strategy = strategy if len(sources) > 1 else "concat"
        source_of, doc = mix(selections, strategy, section.interleave_probs if strategy != "concat" else None, seed)
        base = np.concatenate([[0], np.cumsum([len(ln) for ln in lengths])[:-1]]).astype(np.int64)
        if section.val_size and part != "all":
            hashes = _cat([open_doc_hashes(p) for p in paths], np.uint64)[base[source_of] + doc]
            held = held_out(hashes, section.val_size)
            keep = held if part == "eval" else ~held
            source_of, doc = source_of[keep], doc[keep]
        per_source = {}
        for s, source in enumerate(sources):
            mine = lengths[s][doc[source_of == s]]
            per_source[source.name] = (len(mine), int(mine.sum()))
        ids = base[source_of] + doc
        return cls(paths, _cat(shard_of, np.int32)[ids], _cat(starts, np.int64)[ids], _cat(lengths, np.int64)[ids],
                   per_source)

    def runs(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(tokens, document ends within them) of consecutive documents, a chunk or one shard's run at a time."""
        if not len(self.length):
            return
        # where a new run starts: another shard, or not the next document of the same shard
        follows = (self.shard[1:] == self.shard[:-1]) & (self.start[1:] == self.start[:-1] + self.length[:-1])
        run_start = np.flatnonzero(np.concatenate([[True], ~follows]))
        run_end = np.append(run_start[1:], len(self.length))
        cum = np.concatenate([[0], np.cumsum(self.length)])
        run_at, run_to = cum[run_start], cum[run_end]  # token positions of each run in the order
        first = 0
        while first < len(run_start):
            # one whole run, or as many runs as fit in CHUNK_TOKENS (at least one)
            last = max(first + 1, int(np.searchsorted(run_to, run_at[first] + CHUNK_TOKENS, "right")))
            docs = slice(int(run_start[first]), int(run_end[last - 1]))
            tokens = self._gather(run_start[first:last], run_to[first:last] - run_at[first:last])
            yield tokens, np.cumsum(self.length[docs])
            first = last

    def _gather(self, run_start: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """The tokens of runs of `sizes` tokens from documents `run_start`, shard by shard through memory maps."""
        first_doc = self.start[run_start]
        if len(run_start) == 1:
            tokens = _open_tokens(self.paths[self.shard[run_start[0]]])
            return np.array(tokens[first_doc[0]: first_doc[0] + sizes[0]])
        shard = self.shard[run_start]
        out_at = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        if sizes.mean() >= LONG_RUN:  # few long runs (whole shards in concat order): a slice copy each
            opened = {s: _open_tokens(self.paths[s]) for s in np.unique(shard).tolist()}
            out = np.empty(int(sizes.sum()), dtype=next(iter(opened.values())).dtype)
            for s, at, first, n in zip(shard.tolist(), out_at.tolist(), first_doc.tolist(), sizes.tolist()):
                out[at: at + n] = opened[s][first: first + n]
            return out
        out = None
        for s in np.unique(shard).tolist():
            tokens = _open_tokens(self.paths[s])
            mine = shard == s
            if out is None:
                out = np.empty(int(sizes.sum()), dtype=tokens.dtype)
            out[_ranges(out_at[mine], sizes[mine])] = tokens[_ranges(first_doc[mine], sizes[mine])]
        return out


def _open_tokens(path: str) -> np.ndarray:
    return np.load(Path(path) / "tokens.npy", mmap_mode="r")


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenated aranges [starts[i], starts[i] + sizes[i])."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return np.repeat(starts - offsets, sizes) + np.arange(int(sizes.sum()))


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)


def count_blocks(order: DocumentOrder, section: "DataSection") -> int:
    """Blocks the documents make: full cutoff_len blocks when packing, else one per document."""
    return order.total // section.cutoff_len if section.packing else len(order.length)


# --------------------------------------------------------------------------- writing


@dataclass
class SplitFile:
    """One split being written: its blocks file, per-block lengths (packing: false) and document starts (doc_mask)."""

    blocks: BlockFile
    lengths: list[np.ndarray] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)  # document starts per block
    starts: list[np.ndarray] = field(default_factory=list)
    tokens: int = 0

    def add(self, blocks: np.ndarray, lengths: np.ndarray | None, csr: tuple[np.ndarray, np.ndarray] | None) -> None:
        self.blocks.append(blocks)
        self.tokens += int(blocks.size if lengths is None else lengths.sum())
        if lengths is not None:
            self.lengths.append(lengths)
        if csr is not None:
            self.counts.append(np.diff(csr[0]))
            self.starts.append(csr[1])

    def close(self, folder: Path, split: str, packing: bool, doc_mask: bool) -> None:
        self.blocks.close()
        if not packing:
            np.save(folder / f"{split}_lengths.npy", _cat(self.lengths, np.int32))
        if doc_mask and packing:
            offsets = np.concatenate([[0], np.cumsum(_cat(self.counts, np.int64))]).astype(np.int64)
            save_doc_starts(folder, split, offsets, _cat(self.starts, np.int32))


@dataclass
class Written:
    """What `write_blocks` wrote: tokens and blocks of the split, tokens dropped (final partial block, or cut),
    padding."""

    tokens: int
    blocks: int
    dropped: int
    padding: int


def write_blocks(order: DocumentOrder, section: "DataSection", folder: Path, dtype: np.dtype, pad_id: int,
                 split: str) -> Written:
    """Pack `order` into `<split>.npy` (+ lengths or document starts), appending blocks as they fill."""
    out = SplitFile(BlockFile(folder / f"{split}.npy", count_blocks(order, section), section.cutoff_len, dtype))
    packer, dropped, padding = Packer(section.cutoff_len, dtype), 0, 0
    for tokens, ends in order.runs():
        if section.packing:
            blocks, csr, _ = packer.feed(tokens, ends)
            out.add(blocks, None, csr if section.doc_mask else None)
        else:
            blocks, lengths, cut, pad = truncate(tokens, ends, section.cutoff_len, pad_id)
            out.add(blocks, lengths, None)
            dropped, padding = dropped + cut, padding + pad
    dropped += packer.drop()
    out.close(folder, split, section.packing, section.doc_mask)
    return Written(out.tokens, out.blocks.rows, dropped, padding)

"""Streaming mode (`data.streaming: true`): tokenize and pack while training, nothing stored.

For corpora larger than the disk the token cache would need. `prepare_dataset` checks the sources
and writes a *stream plan* (`stream.json`: every shard of every file, each file's size and mtime)
plus the held-out eval blocks (the first blocks in file order); the train stage then reads shards,
tokenizes them in worker processes a few shards ahead, concatenates the documents (each followed
by EOS) and cuts `cutoff_len` blocks as non-streamed packing does. Each pass reads the training
shards in a seeded random order (`shuffle_shards`, a new order per pass) or in file order.

Resuming needs no replay: a `Cursor` (pass, shard index, tokens of that shard already consumed,
documents of its dataset before it) is saved in every checkpoint; a resumed run recomputes the
pass's order, re-reads only the one shard the cursor points into and drops the consumed tokens.
At the end of a pass the final partial block is dropped and the next pass starts, so `max_steps`
decides how long training runs. Under torchrun every rank reads the whole stream; with a `NodeTokens`
(node_tokens.py) the ranks of a node tokenize each shard once between them and memory-map it. In file order datasets are read one after the other (concat) and
`max_samples` keeps the first N documents of each.

    stream = BlockStream(StreamPlan.load(folder), tokenizer_dir, cursor, workers=2)
    blocks, doc_starts, cursor = stream.take(16)   # (16, cutoff_len) tokens, the cursor after them
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ptflow.data.node_tokens import Fetched, NodeTokens
from ptflow.data.packing import Packer
from ptflow.data.shards import Encoder, encode_shard, encoding_for, worker_state
from ptflow.data.sources import Shard, Source, plan_shards
from ptflow.data.workers import WorkerPool
from ptflow.errors import DataError

log = logging.getLogger("ptflow.stream")

PLAN_FILE = "stream.json"


@dataclass(frozen=True)
class Cursor:
    """Where the next block starts: `offset` tokens into shard `shard` of pass `epoch`.

    `docs_before` counts the documents of that shard's dataset in earlier shards of the pass, so
    `max_samples` is applied on resume without reading them again.
    """

    epoch: int = 0
    shard: int = 0
    offset: int = 0
    docs_before: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    def again(self, epoch: int) -> "Cursor":
        """The same place in another pass."""
        return Cursor(epoch, self.shard, self.offset, self.docs_before)

    @classmethod
    def from_json(cls, data: dict) -> "Cursor":
        return cls(**{k: int(data[k]) for k in ("epoch", "shard", "offset", "docs_before")})


@dataclass
class StreamPlan:
    """The shards to read, in order, and what the train stage needs to read them as prepare_dataset planned."""

    shards: list[Shard]
    limits: dict[str, int | None]  # max_samples per dataset
    files: dict[str, dict]  # path -> {"size", "mtime_ns"} at planning time
    cutoff_len: int
    doc_mask: bool
    batch_size: int
    start: Cursor = field(default_factory=Cursor)  # after the held-out val_size blocks
    shuffle_seed: int | None = None  # shards of each pass in a seeded random order; None: in order

    @classmethod
    def for_sources(cls, sources: list[Source], section, seed: int = 42) -> "StreamPlan":
        shards = [shard for source in sources for shard in plan_shards(source)]
        files = {}
        for source in sources:
            for file in source.files:
                stat = Path(file).stat()
                files[str(file)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        return cls(shards, {s.name: section.max_samples for s in sources}, files, section.cutoff_len,
                   section.doc_mask, section.preprocessing_batch_size,
                   shuffle_seed=seed if getattr(section, "shuffle_shards", False) else None)

    def order(self, epoch: int) -> list[int]:
        """The shards pass `epoch` reads, in order: those from the training start on (earlier ones hold only
        held-out blocks), permuted by (seed, pass) when shuffling."""
        shards = list(range(self.start.shard, len(self.shards)))
        if self.shuffle_seed is None:
            return shards
        return [shards[i] for i in np.random.default_rng([self.shuffle_seed, epoch]).permutation(len(shards))]

    def save(self, folder: Path) -> None:
        data = {"shards": [asdict(s) for s in self.shards], "limits": self.limits, "files": self.files,
                "cutoff_len": self.cutoff_len, "doc_mask": self.doc_mask, "batch_size": self.batch_size,
                "start": self.start.to_json(), "shuffle_seed": self.shuffle_seed}
        (Path(folder) / PLAN_FILE).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> "StreamPlan":
        data = json.loads((Path(folder) / PLAN_FILE).read_text())
        return cls([Shard(**s) for s in data["shards"]], data["limits"], data["files"], data["cutoff_len"],
                   data["doc_mask"], data["batch_size"], Cursor.from_json(data["start"]), data.get("shuffle_seed"))

    def check_unchanged(self) -> None:
        """Files must be as planned: the dataset's key (hence the run's) was computed from their bytes."""
        for path, was in self.files.items():
            try:
                stat = os.stat(path)
            except OSError:
                raise DataError(f"{path}: streamed dataset file is gone since prepare_dataset planned the stream; "
                                "restore it or re-run the flow so the dataset stage plans again") from None
            if stat.st_size != was["size"] or stat.st_mtime_ns != was["mtime_ns"]:
                raise DataError(f"{path}: changed since prepare_dataset planned the stream (size {was['size']} -> "
                                f"{stat.st_size}); re-run the flow so the dataset stage plans again")

    @property
    def total_bytes(self) -> int:
        return sum(f["size"] for f in self.files.values())


def is_streamed(folder: str | Path) -> bool:
    return (Path(folder) / PLAN_FILE).exists()


@dataclass
class _Piece:
    """Tokens of one shard, `offset` of them consumed."""

    index: int
    epoch: int
    tokens: np.ndarray
    ends: np.ndarray  # document ends within `tokens`
    offset: int
    docs_before: int
    first: int  # the offset it was read from

    @property
    def left(self) -> int:
        return len(self.tokens) - self.offset


class BlockStream:
    """`cutoff_len` blocks in reading order from a cursor, with the cursor after each `take`."""

    def __init__(self, plan: StreamPlan, tokenizer, cursor: Cursor | None = None, workers: int = 0,
                 lookahead: int | None = None, node: NodeTokens | None = None):
        if not plan.shards:
            raise DataError("data.streaming: the stream plan has no shards (no data files)")
        self.plan = plan
        self.start = cursor or plan.start
        self.encoding = encoding_for(tokenizer, plan.batch_size)
        self.encoder = Encoder.of(tokenizer)
        self.pool = None
        if workers > 0 and self.encoding.tokenizer_json is not None:
            self.pool = WorkerPool(workers, worker_state, (self.encoding,))
        self.packer = Packer(plan.cutoff_len, self.encoding.dtype)
        self.node = node  # shares tokenized shards with the other ranks of this node
        self.tokenizing = {"tokenized_shards": 0, "tokenize_cpu_s": 0.0, "shared_shards": 0}  # by this rank
        self.lookahead = lookahead or max(2, 2 * workers)
        self.pending: deque[tuple[int, int, Future | None]] = deque()  # (pass, shard index, tokens when pooled)
        self.orders: dict[int, list[int]] = {}
        self.epoch = self.start.epoch  # the pass the next block belongs to
        self.next_epoch, self.next_pos = self.start.epoch, 0
        self.entry: Cursor | None = None  # applied to the next shard read: the resume point
        if cursor is not None:  # resuming: the cursor's shard, part way in
            order = self._order(cursor.epoch)
            if cursor.shard not in order:
                raise DataError(f"data cursor {cursor} points at shard {cursor.shard}, which this stream does not "
                                "train on; the dataset changed since the checkpoint was written")
            self.next_pos, self.entry = order.index(cursor.shard), cursor
        self.piece: _Piece | None = None
        self.docs_seen: dict[str, int] = {}  # documents of each dataset read so far in the current pass
        self.blocks_this_pass = 0
        self.whole_pass = self.entry is None  # whether this pass is read from its start

    def close(self) -> None:
        if self.pool is not None:  # shared: let running fetches finish, so none writes a file after the release
            self.pool.close(wait=self.node is not None)
            self.pool = None
        if self.node is not None:
            for epoch, index, _ in self.pending:
                self.node.release(self.plan.shards[index], epoch)
            self.pending.clear()
            self._release_piece()
            self.node.close()

    def __enter__(self) -> "BlockStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self.orders:
            self.orders = {e: o for e, o in self.orders.items() if e >= epoch - 1}
            self.orders[epoch] = self.plan.order(epoch)
        return self.orders[epoch]

    def _full(self, source: str) -> bool:
        limit = self.plan.limits.get(source)
        return limit is not None and self.docs_seen.get(source, 0) >= limit

    def _submit(self) -> None:
        """Queue the next shards (tokenized ahead by the pool), skipping datasets that reached max_samples."""
        while len(self.pending) < self.lookahead:
            epoch, order = self.next_epoch, self._order(self.next_epoch)
            index = order[self.next_pos]
            shard = self.plan.shards[index]
            self.next_pos += 1
            if self.next_pos == len(order):
                self.next_epoch, self.next_pos = epoch + 1, 0
            if epoch == self.epoch and self.entry is None and self._full(shard.source):
                continue  # holds no wanted document
            future = None
            if self.pool is not None:
                future = self.pool.submit(*((_fetch_in_worker, (self.node, shard, epoch)) if self.node is not None
                                            else (_encode_in_worker, shard)))
            self.pending.append((epoch, index, future))

    def _next_piece(self) -> _Piece | None:
        """The next shard's tokens, or None when the current pass has no shard left."""
        self._submit()
        epoch, index, future = self.pending[0]
        if epoch != self.epoch:
            return None
        self.pending.popleft()
        shard = self.plan.shards[index]
        entry, self.entry = self.entry, None
        if entry is None and index == self.plan.start.shard:  # the held-out blocks come first in this shard
            entry = self.plan.start
        if entry is not None:  # its dataset had docs_before documents already (max_samples reads in order)
            self.docs_seen = {shard.source: entry.docs_before}
        before = self.docs_seen.get(shard.source, 0)
        limit = self.plan.limits.get(shard.source)
        if limit is not None and before >= limit:
            tokens, ends = np.zeros(0, np.dtype(self.encoding.dtype)), np.zeros(0, np.int64)
            if future is not None:
                future.cancel()
            if self.node is not None:
                self.node.release(shard, epoch)
        else:
            tokens, ends = self._tokens(shard, epoch, future)
            if limit is not None and before + len(ends) > limit:
                keep = limit - before
                tokens, ends = tokens[: int(ends[keep - 1])], ends[:keep]
        self.docs_seen[shard.source] = before + len(ends)
        offset = entry.offset if entry is not None else 0
        if offset > len(tokens):
            raise DataError(f"{shard.where}: the checkpoint's data cursor points {offset} tokens into this shard but "
                            f"it has {len(tokens)}; the file changed since the checkpoint was written")
        return _Piece(index, epoch, tokens, ends, offset, before, offset)

    def _tokens(self, shard: Shard, epoch: int, future: Future | None) -> tuple[np.ndarray, np.ndarray]:
        """A shard's (tokens, document ends): tokenized by this rank, or shared by another rank of the node."""
        if self.node is None:
            tokens, ends, cpu_s = future.result() if future is not None else _encode_timed(shard, self.encoder,
                                                                                           self.encoding)
            self._count(Fetched("", True, cpu_s))
            return tokens, ends
        fetched = future.result() if future is not None else self._fetch(shard, epoch)
        self._count(fetched)
        while (opened := self.node.open(fetched)) is None:  # removed after the fetch (a stale record): again
            fetched = self._fetch(shard, epoch)
            self._count(fetched)
        return opened

    def _fetch(self, shard: Shard, epoch: int) -> Fetched:
        return self.node.fetch(shard, epoch, lambda: encode_shard(shard, self.encoder, self.encoding))

    def _count(self, fetched: Fetched) -> None:
        self.tokenizing["tokenized_shards" if fetched.built else "shared_shards"] += 1
        self.tokenizing["tokenize_cpu_s"] += fetched.cpu_s

    def _release_piece(self) -> None:
        """This rank has packed the current piece's shard (or stops): its node-shared files may go."""
        if self.node is not None and self.piece is not None:
            self.node.release(self.plan.shards[self.piece.index], self.piece.epoch)
        self.piece = None

    def _end_pass(self) -> None:
        if self.blocks_this_pass == 0 and self.whole_pass:
            raise DataError(f"data.dataset: a whole pass over the streamed datasets holds fewer than cutoff_len="
                            f"{self.plan.cutoff_len} tokens; add data or lower data.cutoff_len")
        log.info("stream: pass %d over the data ended after %d blocks (final partial block dropped); starting pass %d",
                 self.epoch + 1, self.blocks_this_pass, self.epoch + 2)
        self.packer.drop()
        self.epoch += 1
        self.blocks_this_pass = 0
        self.docs_seen = {}
        self.whole_pass = True

    def take(self, n: int) -> tuple[np.ndarray, list[np.ndarray] | None, Cursor]:
        """The next `n` blocks (n, cutoff_len), their document starts (doc_mask) and the cursor after them."""
        parts, starts = [], [] if self.plan.doc_mask else None
        row = 0
        while row < n:
            if self.piece is None or self.piece.left == 0:
                self._release_piece()
                self.piece = self._next_piece()
                if self.piece is None:  # the pass ended inside a block: it is dropped, the row refilled next pass
                    self._end_pass()
                    continue
            piece = self.piece
            ends = piece.ends[piece.ends > piece.offset] - piece.offset
            blocks, (offsets, block_starts), used = self.packer.feed(
                piece.tokens[piece.offset:], ends, new_doc=piece.offset == piece.first, limit=n - row)
            piece.offset += used
            parts.append(blocks)
            if starts is not None and len(blocks):  # (np.split would give one empty array for no block)
                starts.extend(np.split(block_starts, offsets[1:-1]))
            row += len(blocks)
            self.blocks_this_pass += len(blocks)
        blocks = np.concatenate(parts) if parts else np.empty((0, self.plan.cutoff_len), np.dtype(self.encoding.dtype))
        return blocks, starts, self.cursor()

    def cursor(self) -> Cursor:
        """Where the next block starts."""
        piece = self.piece
        if piece is None:
            return self.start
        return Cursor(piece.epoch, piece.index, piece.offset, piece.docs_before)


def _encode_timed(shard: Shard, encoder: Encoder, encoding) -> tuple[np.ndarray, np.ndarray, float]:
    started = time.thread_time()
    tokens, ends = encode_shard(shard, encoder, encoding)
    return tokens, ends, time.thread_time() - started


def _encode_in_worker(state: dict, shard: Shard) -> tuple[np.ndarray, np.ndarray, float]:
    return _encode_timed(shard, state["encoder"], state["encoding"])


def _fetch_in_worker(state: dict, item: tuple[NodeTokens, Shard, int]) -> Fetched:
    node, shard, epoch = item
    return node.fetch(shard, epoch, lambda: encode_shard(shard, state["encoder"], state["encoding"]))


def hold_out(plan: StreamPlan, tokenizer, n_blocks: int) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """The first `n_blocks` blocks of the files in order (val_size as a count), moving `plan.start` past them, and a
    check that at least one training block follows."""
    in_order = replace(plan, shuffle_seed=None)
    with BlockStream(in_order, tokenizer) as stream:
        blocks, starts, cursor = stream.take(n_blocks) if n_blocks else (
            np.zeros((0, plan.cutoff_len), dtype=np.dtype(stream.encoding.dtype)), [] if plan.doc_mask else None,
            plan.start)
        if stream.epoch > 0:
            raise DataError(f"data.val_size: {n_blocks} held-out blocks use up the whole stream; lower val_size")
        stream.take(1)
        if stream.epoch > 0:
            raise DataError(f"data.val_size: {n_blocks} held-out blocks leave less than one training block in the "
                            "stream; lower val_size or add data")
    plan.start = Cursor(0, cursor.shard, cursor.offset, cursor.docs_before)
    return blocks, starts

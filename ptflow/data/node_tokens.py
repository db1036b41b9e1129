"""Streaming under torchrun: the ranks of one node tokenize each shard once and share its tokens through files.

Every rank reads the whole stream and keeps its own rows (packing is global and equals the
one-process run), so without sharing each of a node's LOCAL_WORLD_SIZE ranks tokenized every
shard. Here the first rank to need a shard takes the shard's flock, tokenizes it into
`<folder>/<name>/` (tokens.npy, ends.npy) and lets go; the others wait on the lock, find the
folder and memory-map it. `name` digests the shard (file, range, format, column) and the
tokenizer. The folder is written as `.<name>.tmp-<pid>` and renamed in, so a rank killed
mid-write leaves only a temp folder, which the next writer of that shard removes; the kernel
drops a dead holder's lock.

Disk stays bounded: the shard's lock file records which (pass, local rank) fetched it and which
ranks have passed it in each pass; a rank `release`s a shard once it has packed it (or stops), and
when no rank holds a fetch of it and every local rank has passed it in each pass any rank has
(a shard last in one pass may come first in the next), its files are removed, so about the
lookahead of the slowest rank is on disk. Reading never depends on that cleanup: a shard whose files are gone
is tokenized again, so a stale record (a rank killed before a resume) costs time, never other blocks.

    node = NodeTokens.from_env(Layout.node_tokens(work_folder), tokenizer_digest)   # None outside torchrun
    fetched = node.fetch(shard, epoch, lambda: encode_shard(shard, encoder, encoding))   # a worker or inline
    tokens, ends = node.open(fetched)                                              # memory-mapped
    node.release(shard, epoch)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ptflow import faults
from ptflow.data.sources import Shard
from ptflow.store.entries import file_lock, sha256_json

LOCK_SUFFIX = ".lock"  # per shard; holds its record: {"holding": [[pass, rank], ...], "passed": {pass: [ranks]}}


@dataclass(frozen=True)
class Fetched:
    """Where a shard's token files are, and whether this call tokenized it (with the CPU seconds that took)."""

    path: str
    built: bool
    cpu_s: float = 0.0


@dataclass(frozen=True)
class NodeTokens:
    """The token files a node's ranks share for one training run (picklable: tokenizer workers fetch too)."""

    folder: str
    local_rank: int
    local_world: int
    tokenizer_digest: str

    @classmethod
    def from_env(cls, folder: Path, tokenizer_digest: str) -> "NodeTokens | None":
        """Sharing for this rank from torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE; None when it is alone on its node."""
        world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return cls(str(folder), int(os.environ.get("LOCAL_RANK", "0")), world, tokenizer_digest)

    def name(self, shard: Shard) -> str:
        return sha256_json({"shard": asdict(shard), "tokenizer": self.tokenizer_digest})[:32]

    def _lock(self, name: str):
        return file_lock(Path(self.folder) / f"{name}{LOCK_SUFFIX}")

    def fetch(self, shard: Shard, epoch: int, encode: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Fetched:
        """The shard's token folder for pass `epoch`, tokenizing it with `encode` unless a rank of this node
        already did; held for this rank until it `release`s the shard for that pass."""
        name = self.name(shard)
        final = Path(self.folder) / name
        with self._lock(name) as handle:
            record = _read(handle)
            if [epoch, self.local_rank] not in record["holding"]:
                _write(handle, {**record, "holding": [*record["holding"], [epoch, self.local_rank]]})
            if final.is_dir():
                return Fetched(str(final), False)
            for stale in final.parent.glob(f".{name}.tmp-*"):  # a writer killed mid-write: never renamed in
                shutil.rmtree(stale, ignore_errors=True)
            started = time.thread_time()
            tokens, ends = encode()
            cpu_s = time.thread_time() - started
            tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
            tmp.mkdir()
            np.save(tmp / "tokens.npy", tokens)
            np.save(tmp / "ends.npy", ends)
            faults.point("stream:tokens-written")
            os.rename(tmp, final)
        return Fetched(str(final), True, cpu_s)

    def open(self, fetched: Fetched) -> tuple[np.ndarray, np.ndarray] | None:
        """(tokens memory-mapped, document ends), or None when the files were removed since the fetch (every
        other rank passed the shard in an earlier pass): fetch again. Once mapped, a removal no longer matters."""
        folder = Path(fetched.path)
        try:
            return np.load(folder / "tokens.npy", mmap_mode="r"), np.load(folder / "ends.npy")
        except FileNotFoundError:
            return None

    def release(self, shard: Shard, epoch: int) -> None:
        """This rank has passed `shard` in pass `epoch` (or skips it); the files go when no rank holds them and no
        rank has yet to reach them in a pass another rank has passed."""
        name = self.name(shard)
        with self._lock(name) as handle:
            record = _read(handle)
            holding = [h for h in record["holding"] if h != [epoch, self.local_rank]]
            passed = {**record["passed"], str(epoch): sorted({*record["passed"].get(str(epoch), []), self.local_rank})}
            if len(passed[str(epoch)]) >= self.local_world:
                del passed[str(epoch)]
            if holding or passed:  # a rank still reads it, or has yet to reach it in a pass another rank passed
                _write(handle, {"holding": holding, "passed": passed})
            else:  # the lock file too: safe while held, file_lock re-opens a lock file removed under it
                _remove(Path(self.folder) / name)
                (Path(self.folder) / f"{name}{LOCK_SUFFIX}").unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the folder once it is empty (every shard released by every local rank)."""
        try:
            Path(self.folder).rmdir()
        except OSError:
            pass  # not empty: another rank still reads, or a killed run's files wait for a resume or gc


def _read(handle) -> dict:
    handle.seek(0)
    try:
        record = json.loads(handle.read() or "{}")
    except ValueError:
        record = {}  # a rank killed mid-write of the record: only when the files go is affected
    return {"holding": record.get("holding", []), "passed": record.get("passed", {})}


def _write(handle, record: dict) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(record))
    handle.flush()


def _remove(folder: Path) -> None:
    """Rename away, then delete, so no rank maps half of it (one that already mapped it keeps its pages)."""
    if folder.is_dir():
        doomed = folder.with_name(f".{folder.name}.del-{os.getpid()}")
        os.rename(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
